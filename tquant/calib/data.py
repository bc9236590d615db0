"""Text sources for calibration and evaluation.

Named sources:
    "pydoc"      CPython's bundled prose (pydoc_data.topics), always available offline. Documents are
                 joined in sorted key order with blank lines; calibration windows come from the first 70 %
                 of the tokens and evaluation from the last 30 %.
    "wikitext2"  wikitext-2-raw-v1 train / test through `datasets` (needs the hub).
    "c4"         allenai/c4 en validation shard (calibration from one shard, evaluation from the other).
    "pile"       the Pile validation set (calibration and evaluation halves).
    "auto"       wikitext2 when the hub is reachable, else pydoc (immediately when HF_HUB_OFFLINE or
                 HF_DATASETS_OFFLINE is set, otherwise after the hub request fails, with a warning).
"""
from __future__ import annotations

import os
import random
import warnings
from typing import Sequence

import torch

NAMED_SOURCES = ("auto", "pydoc", "wikitext2", "c4", "pile")
PYDOC_CALIB_FRACTION = 0.7


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _hub_texts(name: str) -> tuple[str, str]:
    """(calibration text, evaluation text) of a hub data set (ImportError saying what to install or use instead
    where the `datasets` package is missing: it is imported here only, so the offline corpus needs none)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"text source {name!r} is read through Hugging Face `datasets`, which is not installed: "
                          "pip install datasets, or use the offline corpus: source 'pydoc' (--calib pydoc, "
                          "--ppl pydoc)") from err

    if name == "wikitext2":
        train = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        test = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(train["text"]), "\n\n".join(test["text"])
    if name == "c4":
        calib = datasets.load_dataset(
            "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
        )
        val = datasets.load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )
        return "\n\n".join(calib["text"][:20000]), " ".join(val["text"][:1100])
    if name == "pile":
        val = datasets.load_dataset("mit-han-lab/pile-val-backup", split="validation")
        texts = val["text"]
        half = len(texts) // 2
        return "\n\n".join(texts[:half][:20000]), "\n\n".join(texts[half:][:2000])
    raise ValueError(f"unknown text source {name!r}; named sources are {NAMED_SOURCES}")


def _check_source(name: str) -> None:
    if name not in NAMED_SOURCES:
        raise ValueError(f"unknown text source {name!r}; named sources are {NAMED_SOURCES}")


def source_tokens(name: str, tokenizer, split: str) -> torch.Tensor:
    """1-D token ids of the calibration ("calib") or evaluation ("eval") part of a named source."""
    _check_source(name)
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    if name == "pydoc":
        ids = tokenizer(_pydoc_text(), return_tensors="pt").input_ids[0]
        cut = int(len(ids) * PYDOC_CALIB_FRACTION)
        return ids[:cut] if split == "calib" else ids[cut:]
    if name == "auto":
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            return source_tokens("pydoc", tokenizer, split)
        try:
            return source_tokens("wikitext2", tokenizer, split)
        except Exception as e:  # no hub: any failure of the download falls back to the offline corpus
            warnings.warn(f"wikitext2 is unreachable ({type(e).__name__}); using the offline pydoc corpus")
            return source_tokens("pydoc", tokenizer, split)
    calib_text, eval_text = _hub_texts(name)
    text = calib_text if split == "calib" else eval_text
    return tokenizer(text, return_tensors="pt").input_ids[0]


# How much calibration a method gets: fewer than MIN_CALIB_TOKENS tokens is refused (a few tokens give GPTQ a
# rank-deficient Hessian and a broken model: calib=["hi", "ok"] took SmolLM2-135M's perplexity from 12 to 183),
# fewer than RECOMMENDED_CALIB_TOKENS warns (every table in docs/methods.md uses 16 x 512 tokens or more). Checked
# on models at least MIN_CHECKED_WIDTH channels wide, i.e. every real language model (SmolLM2-135M: 576, GPT-2:
# 768); narrower, test-sized models calibrate on whatever they are given.
MIN_CALIB_TOKENS = 512
RECOMMENDED_CALIB_TOKENS = 16 * 512
MIN_CHECKED_WIDTH = 256


def check_calibration_size(n_tokens: int, method: str, width: int | None) -> None:
    """ValueError below MIN_CALIB_TOKENS calibration tokens, a UserWarning below RECOMMENDED_CALIB_TOKENS, for a
    model `width` (hidden size) channels wide; nothing for a narrower (test-sized) model or an unknown width."""
    if width is None or width < MIN_CHECKED_WIDTH or n_tokens >= RECOMMENDED_CALIB_TOKENS:
        return
    how = ('calib="pydoc" (offline) or "wikitext2" with the default n_samples=128, seqlen=512 (65536 tokens), or '
           'more / longer texts')
    if n_tokens < MIN_CALIB_TOKENS:
        raise ValueError(f"method {method!r} got {n_tokens} calibration tokens; it needs at least {MIN_CALIB_TOKENS} "
                         f"({RECOMMENDED_CALIB_TOKENS} or more recommended): give {how}")
    warnings.warn(f"method {method!r} got only {n_tokens} calibration tokens; {RECOMMENDED_CALIB_TOKENS} or more are "
                  f"recommended (quality suffers below that): give {how}", stacklevel=3)


def random_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """n_samples windows of seqlen tokens at seeded random offsets: LongTensor [n_samples, seqlen]."""
    if ids.numel() <= seqlen:
        raise ValueError(f"need more than seqlen={seqlen} tokens for calibration, got {ids.numel()}: give more text "
                         "or a smaller seqlen=")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(n_samples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def calibration_data(
    calib, tokenizer=None, *, n_samples: int = 128, seqlen: int = 512, seed: int = 0
) -> torch.Tensor:
    """Normalize the `calib` argument of tquant.quantize into LongTensor [n, seqlen].

    calib may be: a LongTensor [n, L] (used as is) or 1-D ids (cut into random windows); a list of
    strings (tokenized one by one, each truncated to seqlen; needs tokenizer); or a named source.
    """
    if isinstance(calib, str):
        if tokenizer is None:
            raise ValueError(f"calib={calib!r} is a named source and needs tokenizer=")
        return random_windows(source_tokens(calib, tokenizer, "calib"), n_samples, seqlen, seed)
    if isinstance(calib, torch.Tensor):
        if calib.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"calibration token ids must be an integer tensor, got {calib.dtype}")
        if calib.numel() == 0:
            raise ValueError("the calibration set is empty")
        if calib.dim() == 1:
            return random_windows(calib.long(), n_samples, seqlen, seed)
        if calib.dim() == 2:
            return calib.long()
        raise ValueError(f"calibration ids must be 1-D or 2-D [n, seqlen], got shape {tuple(calib.shape)}")
    if isinstance(calib, Sequence) and all(isinstance(t, str) for t in calib):
        if len(calib) == 0:
            raise ValueError("the calibration set is empty")
        if tokenizer is None:
            raise ValueError("calib is a list of strings and needs tokenizer=")
        rows = [tokenizer(t, return_tensors="pt").input_ids[0, :seqlen] for t in calib]
        length = min(len(r) for r in rows)
        if length == 0:
            raise ValueError("a calibration text tokenized to zero tokens")
        return torch.stack([r[:length] for r in rows])
    raise ValueError(
        f"calib must be token ids, a list of strings or one of {NAMED_SOURCES}; got {type(calib).__name__}"
    )
