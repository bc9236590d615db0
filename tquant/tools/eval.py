"""Evaluating a (quantized) model: perplexity on held-out text and EleutherAI lm-eval-harness tasks.

evaluate() runs any of them (and tquant.tools.speed's report) in one call; result_rows and format_table print it."""
from __future__ import annotations

import contextlib
import difflib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tquant.calib.data import NAMED_SOURCES, source_tokens


def _input_device(model, device) -> torch.device:
    """Where inputs go: `device` if given, else the device of the model's first parameter (its embedding)."""
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def eval_tokens(source: str, tokenizer) -> torch.Tensor:
    """The "eval" split of a named source; a hub source that cannot be reached raises ConnectionError saying
    what to do instead."""
    try:
        return source_tokens(source, tokenizer, "eval")
    except OSError as err:  # datasets' ConnectionError, a missing cache entry offline, a failed download
        raise ConnectionError(
            f"text source {source!r} needs the Hugging Face dataset hub, which could not be reached "
            f"({type(err).__name__}: {err}). Use the offline corpus instead (source 'pydoc', --ppl pydoc), or "
            "connect to the hub (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or fill the datasets cache "
            "(HF_DATASETS_CACHE) on a machine that can"
        ) from err


def perplexity(
    model,
    source="pydoc",
    *,
    tokenizer=None,
    seqlen: int = 512,
    n_windows: int | None = None,
    batch_size: int = 1,
    device=None,
    progress: bool = True,
    decode_from: int | None = None,
) -> float:
    """Perplexity of a causal LM on consecutive, non-overlapping windows of held-out tokens.

    source is a named source (the "eval" split of tquant.calib.data.source_tokens; needs tokenizer) or
    a 1-D integer tensor of token ids. Windows w_1..w_N of seqlen tokens are cut from the start of the
    tokens (N = all full windows, or at most n_windows). Each window predicts its seqlen - 1 next tokens:

        NLL = sum_n sum_{t=1}^{seqlen-1} -log p(w_n[t] | w_n[:t]),    ppl = exp(NLL / (N * (seqlen - 1)))

    i.e. exp of the mean of the per-window losses. The model runs in eval mode (its mode is restored
    afterwards) under no_grad with use_cache=False, batch_size windows at a time; NLL accumulates in
    float64. Inputs go to `device` if given, else to the device of the model's first parameter.

    decode_from=P runs each window as generation does, through a KV cache (the model's quantized cache,
    tquant.kv_cache, when it has one; else transformers' DynamicCache): tokens [0, P) in one forward (the
    prefill), then one token a forward, so every later prediction reads the cached (quantized) keys and values.
    The predictions and the formula are the same. progress=True shows a bar over the windows (on stderr);
    progress=False runs silently.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (one next-token prediction), got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(source, str):
        check_sources([source])
        if tokenizer is None:
            raise ValueError(f"source={source!r} is a named source and needs tokenizer=")
        ids = eval_tokens(source, tokenizer)
    elif isinstance(source, torch.Tensor):
        if source.dim() != 1 or source.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"source token ids must be a 1-D integer tensor, got shape {tuple(source.shape)} {source.dtype}"
            )
        ids = source.long()
    else:
        raise ValueError(f"source must be one of {NAMED_SOURCES} or a 1-D tensor of token ids, got {type(source).__name__}")

    if decode_from is not None and not 1 <= decode_from < seqlen:
        raise ValueError(f"decode_from must be in [1, seqlen={seqlen}), got {decode_from}")
    n_full = ids.numel() // seqlen
    if n_full == 0:
        raise ValueError(f"need at least seqlen={seqlen} tokens for one window, got {ids.numel()}: give more text or "
                         "a smaller seqlen")
    if n_windows is not None:
        if n_windows < 1:
            raise ValueError(f"n_windows must be at least 1, got {n_windows}")
        n_full = min(n_full, n_windows)
    windows = ids[: n_full * seqlen].view(n_full, seqlen)
    dev = _input_device(model, device)

    nll = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=n_full, desc="perplexity", unit="window", disable=not progress) as bar:
            for start in range(0, n_full, batch_size):
                batch = windows[start : start + batch_size].to(dev)
                if decode_from is None:
                    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                else:
                    logits = _decoded_logits(model, batch, decode_from)[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
                nll += loss.double().cpu()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return math.exp(nll.item() / (n_full * (seqlen - 1)))


def _decoded_logits(model, batch, prefill: int) -> torch.Tensor:
    """Logits [B, T, V] of batch [B, T]: a prefill of `prefill` tokens, then one token a forward, one cache."""
    from transformers import DynamicCache

    from ..config import tquant_config
    from ..kv.hook import kv_cache
    from ..models import cache_kwarg

    cache = kv_cache(model) if "kv_cache" in (tquant_config(model.config) or {}) else DynamicCache()
    out = [model(input_ids=batch[:, :prefill], use_cache=True, **{cache_kwarg(model): cache}).logits]
    for t in range(prefill, batch.shape[1]):
        out.append(model(input_ids=batch[:, t : t + 1], use_cache=True, **{cache_kwarg(model): cache}).logits)
    return torch.cat(out, dim=1)


@contextlib.contextmanager
def _hflm_safe(model):
    """While HFLM wraps the model: its model.tie_weights() call would re-tie an lm_head that quantization untied
    from the embedding back to the float embedding, silently undoing its quantization, and it reads a config's
    quantization_config as a transformers quantizer's (tquant's is none); disable the one, hide the other."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None:
        del model.config.quantization_config
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights
        if qc is not None:
            model.config.quantization_config = qc


def _metrics(task_results: dict) -> dict:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, "alias": ...} -> {"acc": v, "acc_stderr": s}.

    Metric keys are "metric,filter"; the default filter "none" is dropped, other filters stay as
    "metric,filter". Non-metric entries (alias, name, sample_len) are left out."""
    out = {}
    for key, value in task_results.items():
        metric, sep, filt = key.partition(",")
        if sep:
            out[metric if filt == "none" else key] = value
    return out


def lm_eval(
    model,
    tasks,
    *,
    tokenizer,
    batch_size: int | str = 1,
    max_length: int | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path=None,
    device=None,
    return_raw: bool = False,
) -> dict | tuple[dict, dict]:
    """Run lm-eval-harness tasks on an in-memory (possibly quantized) model: {task: {metric: value}}.

    The model is wrapped in lm-eval's HFLM(pretrained=model, tokenizer=tokenizer) and evaluated with
    lm_eval.simple_evaluate. tasks is a task name or a list of lm-eval task / group / tag names;
    include_path is a folder (or list of folders) of extra task YAMLs (a local task there runs offline,
    e.g. `dataset_path: json` with `dataset_kwargs: {data_files: {test: /path/data.jsonl}}`). limit caps
    the examples per task (a float < 1 is a fraction); max_length is HFLM's context length (default: from
    the model config). device overrides where inputs go (default: the model's device; the model is not
    moved). With return_raw=True returns (metrics, lm-eval's full result dict).

    Metric names drop lm-eval's ",none" filter suffix, e.g. {"arc_easy": {"acc": 0.6, "acc_stderr": 0.01}}.
    Hub tasks need the dataset hub; offline, set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 to fail fast.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("tquant.tools.eval.lm_eval needs EleutherAI lm-eval-harness: pip install lm-eval") from e

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("tasks is empty; give lm-eval task names, e.g. ['arc_easy']")
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not Path(t).is_file()]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; closest names: {hints}. "
            "Custom task YAMLs go in a folder passed as include_path="
        )

    with _hflm_safe(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    if device is not None:
        lm._device = torch.device(device)  # HFLM takes the device of a pre-built model from model.device
    raw = simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, task_manager=manager
    )
    metrics = {task: _metrics(res) for task, res in raw["results"].items()}
    return (metrics, raw) if return_raw else metrics


def zero_shot_average(metrics: dict, tasks) -> float | None:
    """Mean "acc" over the requested tasks that report one (lm_eval's metrics; None when none does)."""
    accs = [metrics[t]["acc"] for t in tasks if "acc" in metrics.get(t, {})]
    return sum(accs) / len(accs) if accs else None


def check_sources(names) -> None:
    """ValueError naming the entries of names that are no named text source."""
    unknown = [s for s in names if s not in NAMED_SOURCES]
    if unknown:
        raise ValueError(f"unknown text source(s) {unknown}; named sources are {NAMED_SOURCES}")


def evaluate(
    model,
    tokenizer,
    *,
    ppl=(),
    seqlen: int = 512,
    n_windows: int | None = None,
    tasks=(),
    batch_size: int = 1,
    max_length: int | None = None,
    limit: int | float | None = None,
    include_path=None,
    speed: dict | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity on each named source in ppl, lm-eval tasks (batch_size also batches the perplexity windows) and,
    with speed= (tquant.tools.speed.speed_report's keyword arguments; {} for its defaults), a speed report:
    {"ppl": {source: ppl}, "tasks": {task: metrics}, "zero_shot_avg": mean acc, "speed": report}, the parts asked for.
    """
    check_sources(ppl)
    out = {}
    if ppl:
        out["ppl"] = {s: perplexity(model, s, tokenizer=tokenizer, seqlen=seqlen, n_windows=n_windows,
                                    batch_size=batch_size, progress=progress) for s in ppl}
    if tasks:
        out["tasks"] = lm_eval(model, tasks, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                               limit=limit, include_path=include_path)
        out["zero_shot_avg"] = zero_shot_average(out["tasks"], tasks)
    if speed is not None:
        from .speed import speed_report

        out["speed"] = speed_report(model, tokenizer, progress=progress, **speed)
    return out


def result_rows(result: dict) -> dict:
    """evaluate()'s result as {table label: value}: "ppl SOURCE", "TASK METRIC" (stderrs left out),
    "zero-shot avg acc" and the speed report's summary."""
    from .speed import speed_summary

    rows = {f"ppl {s}": v for s, v in result.get("ppl", {}).items()}
    for task, metrics in result.get("tasks", {}).items():
        rows |= {f"{task} {m}": v for m, v in metrics.items() if "stderr" not in m and isinstance(v, (int, float))}
    if "tasks" in result:
        rows["zero-shot avg acc"] = result["zero_shot_avg"]
    if "speed" in result:
        rows |= speed_summary(result["speed"])
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"
    return str(value)


def format_table(header, rows) -> str:
    """Rows (lists of cells: numbers, strings or None) under header, in aligned columns, the first left-aligned."""
    cells = [list(map(str, header))] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
