"""Several quantization methods / configs on one model in one call, printed as a table like the papers'.

    rows = compare("default", ["rtn:bits=4,group_size=64", "gptq:bits=4"], ppl=("pydoc",), n_windows=8)
    print(compare_table(rows))

A config is "method:key=value,key=value" (values read as JSON: 4, false, 0.5; else strings) or (method, options);
its options are tquant.quantize's keyword arguments (bits, group_size, sym, lm_head, method options). Each config
quantizes a fresh deep copy of the base model, loaded once.
"""
from __future__ import annotations

import copy
import json
import time

from tqdm.auto import tqdm

from .eval import evaluate, format_table
from ..methods import get_method
from ..models import load_model, model_bytes


def parse_option(text: str) -> tuple[str, object]:
    """"key=value" -> (key, value), the value read as JSON where it parses (4, false, 0.5, null), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"an option is key=value, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def parse_config(config) -> tuple[str, str, dict]:
    """(label, method, options) of "method:key=value,..." or (method, options); an unknown method raises now."""
    if isinstance(config, str):
        method, _, rest = config.partition(":")
        method, options, label = method.strip(), dict(parse_option(o) for o in rest.split(",") if o.strip()), config
    else:
        method, options = config[0], dict(config[1])
        label = method + (":" + ",".join(f"{k}={json.dumps(v)}" for k, v in options.items()) if options else "")
    get_method(method)
    return label, method, options


def stored_bits(model) -> float | None:
    """Bits a weight of the quantized linears takes in an fp16 checkpoint: every buffer of each quantized linear
    module but the bias (float buffers counted at 16 bits, float8 ones at 8), over the weights it holds; None with no
    such module."""
    from ..modules import QuantizedLinear

    bits = params = 0
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            bits += sum(b.numel() * (min(16, b.element_size() * 8) if b.is_floating_point() else b.element_size() * 8)
                        for name, b in mod.named_buffers() if name != "bias")
            params += mod.in_features * mod.out_features
    return bits / params if params else None


def _quantized(base, tokenizer, method: str, options: dict, label: str, **quantize_args):
    """A quantized deep copy of base; a config's ValueError names the config."""
    import tquant

    model = copy.deepcopy(base)
    try:
        return tquant.quantize(model, method, tokenizer=tokenizer, **quantize_args, **options)
    except ValueError as err:
        raise ValueError(f"config {label!r}: {err}") from err


def compare(model, configs, *, baseline: bool = True, calib="pydoc", n_samples: int = 128, calib_seqlen: int = 512,
            device=None, ppl=("pydoc",), progress: bool = True, **eval_options) -> list[dict]:
    """One row per config (after the unquantized model's, with baseline=True):
    {"config", "method", "options", "bits" (stored_bits; the float dtype's bits for the baseline), "size_mib",
    "quantize_s", and tquant.tools.eval.evaluate's "ppl", "tasks", "zero_shot_avg", "speed"}.

    model: a tquant.models.load_model name ("default": the offline SmolLM2-135M, an HF path / id, a .gguf file),
    loaded on device, or a callable returning (model, tokenizer). Quantization calibrates on n_samples windows of
    calib_seqlen tokens of calib, on device. eval_options go to evaluate (seqlen, n_windows, tasks, speed, ...).
    """
    entries = [parse_config(c) for c in configs]
    base, tok = load_model(model, device=device or "cpu") if isinstance(model, str) else model()
    if baseline:
        dtype = next(base.parameters()).dtype
        entries.insert(0, (str(dtype).removeprefix("torch."), None, {}))
    rows = []
    bar = tqdm(entries, desc="compare", unit="config", disable=not progress)
    for label, method, options in bar:
        bar.set_postfix_str(label)
        start = time.time()
        if method is None:
            qmodel, bits = base, dtype.itemsize * 8
        else:
            qmodel = _quantized(base, tok, method, options, label, calib=calib, n_samples=n_samples,
                                seqlen=calib_seqlen, device=device, progress=progress)
            bits = stored_bits(qmodel)
        row = {"config": label, "method": method or "none", "options": options, "bits": bits,
               "size_mib": model_bytes(qmodel) / 2**20, "quantize_s": time.time() - start}
        rows.append(row | evaluate(qmodel, tok, ppl=ppl, progress=progress, **eval_options))
        del qmodel
    return rows


def compare_table(rows: list[dict]) -> str:
    """compare()'s rows as a table: config, bits, ppl per source, zero-shot average, MiB, decode tokens/s (the
    last two columns where measured)."""
    sources = list(dict.fromkeys(s for r in rows for s in r.get("ppl", {})))
    header = ["config", "bits", *(f"ppl {s}" for s in sources)]
    tasks, speed = any("tasks" in r for r in rows), any("speed" in r for r in rows)
    header += ["0-shot avg"] * tasks + ["MiB"] + ["decode tok/s"] * speed
    table = []
    for r in rows:
        cells = [r["config"], r["bits"], *(r.get("ppl", {}).get(s) for s in sources)]
        cells += [r.get("zero_shot_avg")] * tasks + [r["size_mib"]]
        cells += [r["speed"]["decode_tokens_per_s"] if "speed" in r else None] * speed
        table.append(cells)
    return format_table(header, table)
