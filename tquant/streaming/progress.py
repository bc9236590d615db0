"""The record of a streaming run, in OUT/.tquant-streaming/: what a stopped run continues from (resume=True).

    progress.json                    {"tquant_version", "model": the source's fingerprint, "options": every option
                                      of the run, "calibration": sha256 of the calibration ids, "tuple_out",
                                      "blocks": [{"specs": {layer: spec}, "shards": [shard record]}, ...] (block i =
                                      entry i, in the order written), "states" / "method_state": file record or null}
    block-00003-1.safetensors ...    block 3's quantized tensors (split at max_shard_size); shard record =
                                     {"file", "sha256", "bytes", "tensors": {name: bytes}}
    states-00004.safetensors         the calibration hidden states entering block 4, the first not done ("0", "1",
                                     ... one per calibration batch)
    method-00004.pt                  the method's run state at that point (what its report gathers: QQQ's alphas,
                                     SpQR's bit counts, ...; torch.save of plain containers, numbers and tensors, read
                                     back with weights_only=True)
A block's files are written whole before progress.json names them, and progress.json is replaced atomically (the
files of the block before are removed only after), so a run stopped at any point keeps every block it names; a
resumed run checks their sizes and sha256 first. At the end the shards move into OUT under their final names, the
move noted first ("moved": {work file: final name}), so a run stopped after it still finds them. Resuming with
another model, tquant version, option or calibration set is refused, naming it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time

import torch
from safetensors.torch import load_file, save_file

from ..methods.base import Method
from ..serialization import (
    CHECKPOINT_FILES,
    FILE_METADATA,
    file_sha256,
    remove_weights,
    split_shards,
)
from ..version import __version__

log = logging.getLogger("tquant")

WORK = ".tquant-streaming"
RECORD = "progress.json"
PLAIN = (type(None), bool, int, float, str, torch.Tensor)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def recorded(value):
    """An option as progress.json keeps it: numbers, short strings and lists of them as they are; a tensor or a long
    value (calibration texts) as its sha256."""
    if isinstance(value, torch.Tensor):
        return "sha256:" + tensor_sha256(value)
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = json.dumps(value, sort_keys=True)
    except TypeError:
        return repr(value)  # a torch.device, ...
    return value if len(text) <= 200 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _run_state(method: Method) -> dict:
    """The method's attributes that are not its options (what it gathers over the run), checked to be plain."""
    fields = {f.name for f in dataclasses.fields(method)}
    state = {k: v for k, v in vars(method).items() if k not in fields}

    def check(where, value):
        if isinstance(value, (list, tuple)):
            for v in value:
                check(where, v)
        elif isinstance(value, dict):
            for k, v in value.items():
                check(where, k)
                check(where, v)
        elif not isinstance(value, PLAIN):
            raise ValueError(  # noqa: TRY004 - a refusal, reported as the others
                f"method {method.name!r} keeps a {type(value).__name__} in {where} between blocks, which a "
                "resumable streaming run cannot record: quantize in memory, without streaming")

    for key, value in state.items():
        check(key, value)
    return state


class Progress:
    """The record of one streaming run into folder `out` (module docstring). open() starts or resumes one."""

    def __init__(self, out: str, record: dict):
        self.out, self.work, self.record = out, os.path.join(out, WORK), record

    @classmethod
    def open(cls, out: str, model: dict, options: dict, resume: bool, overwrite: bool) -> Progress:
        """The run's record: a new one, or (resume) the one in out, checked against this model and these options
        and its files against their sha256. A stopped run is not replaced unless overwrite."""
        work = os.path.join(out, WORK)
        path = os.path.join(work, RECORD)
        if resume and os.path.isfile(path):
            with open(path) as f:
                progress = cls(out, json.load(f))
            progress._check(model, options)
            return progress
        if os.path.isdir(work) and not overwrite:
            raise ValueError(f"{out!r} holds a streaming run stopped after {_blocks_done(path)} blocks: continue it "
                             "with resume=True (tquant quantize --streaming --resume), or start again with "
                             "overwrite=True (--overwrite)")
        if resume:
            log.info(f"nothing to resume in {out}: starting at block 0")
        if overwrite:  # the folder's earlier checkpoint and run go now, so that a resumed run finds neither
            shutil.rmtree(work, ignore_errors=True)
            if os.path.isdir(out):
                remove_weights(out)
                for name in CHECKPOINT_FILES:
                    if os.path.isfile(os.path.join(out, name)):
                        os.remove(os.path.join(out, name))
        os.makedirs(work, exist_ok=True)
        progress = cls(out, {"tquant_version": __version__, "model": model, "options": options, "calibration": None,
                             "tuple_out": False, "blocks": [], "states": None, "method_state": None})
        progress._write()
        return progress

    def _check(self, model: dict, options: dict) -> None:
        again = "resume with the same model and options, or start again with overwrite=True (--overwrite)"
        where = os.path.join(self.work, RECORD)
        if self.record.get("tquant_version") != __version__:
            raise ValueError(f"the stopped run in {self.out!r} was made by tquant {self.record.get('tquant_version')}, "
                             f"this is {__version__}: start again with overwrite=True (--overwrite)")
        if self.record["model"] != model:
            changed = sorted(k for k in set(model) | set(self.record["model"])
                             if model.get(k) != self.record["model"].get(k))
            raise ValueError(f"cannot resume: the model differs from the stopped run's ({changed[0]} changed, "
                             f"{where}); {again}")
        for key in sorted(set(options) | set(self.record["options"])):
            now, then = options.get(key), self.record["options"].get(key)
            if now != then:
                raise ValueError(f"cannot resume: option {key}={now!r} here, {key}={then!r} in the stopped run "
                                 f"({where}); {again}")
        start = time.monotonic()
        for record in self._files():
            full = self._where(record["file"])
            if not os.path.isfile(full) or os.path.getsize(full) != record["bytes"] or \
                    file_sha256(full) != record["sha256"]:
                raise ValueError(f"cannot resume: {full} is missing or changed since it was written (its size or "
                                 "sha256 differs from progress.json); start again with overwrite=True (--overwrite)")
        log.info(f"resuming at block {len(self.record['blocks'])}: the files of the blocks before it checked "
                 f"(sha256) in {time.monotonic() - start:.1f} s")

    def _files(self) -> list[dict]:
        return self.shards() + [r for r in (self.record["states"], self.record["method_state"]) if r is not None]

    def _where(self, file: str) -> str:
        """Where work file `file` is: in the work folder, or in out under its final name once moved there."""
        full, moved = os.path.join(self.work, file), self.record.get("moved", {}).get(file)
        return full if moved is None or os.path.exists(full) else os.path.join(self.out, moved)

    def check_calibration(self, calib: torch.Tensor | None) -> None:
        """Record the calibration ids' sha256 (a new run), or refuse ids other than the stopped run's."""
        digest = None if calib is None else tensor_sha256(calib)
        if self.record["blocks"] and self.record["calibration"] != digest:
            raise ValueError("cannot resume: the calibration token ids differ from the stopped run's (another "
                             "tokenizer, calibration source or sampling?); resume with the same ones, or start again "
                             "with overwrite=True (--overwrite)")
        self.record["calibration"] = digest
        self._write()

    def resume_point(self, method: Method, device: torch.device):
        """(first block not done, the hidden states entering it (on `device`, where the driver runs the blocks: the
        file holds them on the CPU) or None, {layer: spec} of the blocks done, tuple_out), and the method's run state
        put back."""
        blocks = self.record["blocks"]
        if not blocks:
            return 0, None, {}, False
        if self.record["method_state"] is not None:
            state = torch.load(os.path.join(self.work, self.record["method_state"]["file"]), weights_only=True)
            for key, value in state.items():
                setattr(method, key, value)
        states = None
        if self.record["states"] is not None:
            saved = load_file(os.path.join(self.work, self.record["states"]["file"]))
            states = [saved[str(b)].to(device) for b in range(len(saved))]
        specs = {name: spec for b in blocks for name, spec in b["specs"].items()}
        return len(blocks), states, specs, self.record["tuple_out"]

    def write_shards(self, stem: str, tensors: dict[str, torch.Tensor], limit: int | None) -> list[dict]:
        """tensors written as work-folder shards stem-1.safetensors, ... of at most `limit` bytes; their records
        (with {tensor name: bytes})."""
        records = []
        for j, shard in enumerate(split_shards(tensors, limit)):
            name = f"{stem}-{j + 1}.safetensors"
            save_file(shard, os.path.join(self.work, name), metadata=FILE_METADATA)
            sizes = {n: t.numel() * t.element_size() for n, t in shard.items()}
            records.append(self._record(name) | {"tensors": sizes})
        return records

    def _record(self, name: str) -> dict:
        full = os.path.join(self.work, name)
        return {"file": name, "sha256": file_sha256(full), "bytes": os.path.getsize(full)}

    def commit(self, i: int, tensors: dict[str, torch.Tensor], limit: int | None, specs: dict, states,
               tuple_out: bool, method: Method) -> None:
        """Block i done: its quantized tensors, the states entering block i + 1 and the method's run state written,
        then named in progress.json; the states and run state of block i's start removed after."""
        if len(self.record["blocks"]) != i:
            raise RuntimeError(f"block {i} written out of order: progress.json holds {len(self.record['blocks'])}")
        shards = self.write_shards(f"block-{i:05d}", tensors, limit)
        before = [r["file"] for r in (self.record["states"], self.record["method_state"]) if r is not None]
        states_record = None
        if states is not None:
            states_record = f"states-{i + 1:05d}.safetensors"
            save_file({str(b): h.detach().cpu().contiguous() for b, h in enumerate(states)},
                      os.path.join(self.work, states_record), metadata=FILE_METADATA)
            states_record = self._record(states_record)
        torch.save(_run_state(method), os.path.join(self.work, f"method-{i + 1:05d}.pt"))
        self.record["blocks"].append({"specs": specs, "shards": shards})
        self.record.update(tuple_out=tuple_out, states=states_record,
                           method_state=self._record(f"method-{i + 1:05d}.pt"))
        self._write()
        for name in before:
            os.remove(os.path.join(self.work, name))

    def shards(self) -> list[dict]:
        """Every block's shard records, in block order."""
        return [s for b in self.record["blocks"] for s in b["shards"]]

    def move(self, records: list[dict], names: list[str]) -> None:
        """The work-folder shards `records` moved into out as `names`, the move first noted in progress.json: a run
        stopped from here on (while the manifest hashes them, say) finds them there when resumed."""
        self.record["moved"] = {r["file"]: name for r, name in zip(records, names)}
        self._write()
        for record, name in zip(records, names):
            if os.path.exists(os.path.join(self.work, record["file"])):
                os.replace(os.path.join(self.work, record["file"]), os.path.join(self.out, name))

    def _write(self) -> None:
        tmp = os.path.join(self.work, RECORD + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=1)
        os.replace(tmp, os.path.join(self.work, RECORD))

    def remove(self) -> None:
        shutil.rmtree(self.work)


def _blocks_done(path: str) -> str:
    """How many blocks the record at `path` names, for messages ("?" when it is unreadable)."""
    try:
        with open(path) as f:
            return str(len(json.load(f)["blocks"]))
    except (OSError, ValueError, KeyError, TypeError):
        return "?"
