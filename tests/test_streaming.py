"""Streaming quantization (issue 28): tquant.quantize_to_disk reads a float model block by block from its safetensors
shards and writes a tquant checkpoint whose tensors and config equal those of the in-memory tquant.quantize +
tquant.save; a run stopped after block k resumes at block k to the same checkpoint, and refuses to resume with
another model, option or calibration; what cannot stream is refused by name. Mixture-of-experts checkpoints:
tests/test_streaming_moe.py. The peak memory measured: benchmarks/streaming_memory.py."""
import gc
import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tquant
from tests.tiny_models import VOCAB, byte_tokenizer, tiny_model, token_batch
from tquant.api import make_method
from tquant.cli import main
from tquant.config import tquant_config
from tquant.models import load_model
from tquant.serialization import SHARD_NAME, shard_bytes
from tquant.streaming.progress import RECORD, WORK, Progress

BLOCKS = 4
CALIB = token_batch(8)
OPTIONS = {"bits": 4, "group_size": 32, "batch_size": 4, "progress": False}
SHARD = "60KB"  # several output shards a block for the tiny Llama's ~0.3 MB


class Stop(Exception):
    """What the tests' on_block raises to stop a run after a block (a kill, without killing)."""


def _save_source(path, arch="llama", dtype=torch.float32, seed=0):
    """A tiny model of BLOCKS blocks saved in 100 KB shards, with a tokenizer."""
    layers = {"layer_types": ["full_attention"] * BLOCKS} if arch == "qwen2" else {}  # one per block
    tiny_model(arch, seed=seed, dtype=dtype, num_hidden_layers=BLOCKS, **layers).save_pretrained(
        path, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{arch: a float model folder in 100 KB safetensors shards}: llama (float32, tied head), qwen2 (bf16, untied),
    gpt2 (Conv1D layers)."""
    dtypes = {"llama": torch.float32, "qwen2": torch.bfloat16, "gpt2": torch.float32}
    return {arch: _save_source(tmp_path_factory.mktemp(arch), arch, dtype) for arch, dtype in dtypes.items()}


@pytest.fixture(scope="module")
def in_memory(sources, tmp_path_factory):
    """in_memory(arch, method, **options): the folder tquant.quantize + tquant.save make of that source (with the
    base_model streaming records), made once."""
    made = {}

    def make(arch, method, **options):
        key = (arch, method, tuple(sorted(options.items())))
        if key not in made:
            model, _ = load_model(sources[arch])
            tquant.quantize(model, method, calib=CALIB, **OPTIONS, **options)
            tquant_config(model.config)["base_model"] = sources[arch]
            made[key] = str(tmp_path_factory.mktemp(f"{arch}-{method}"))
            tquant.save(model, made[key], max_shard_size=SHARD)
        return made[key]

    return make


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items()}


def assert_same_checkpoint(expected, got):
    """Every tensor of the same name, dtype and bytes; config.json equal; the same logits once loaded."""
    te, tg = tensors(expected), tensors(got)
    assert te.keys() == tg.keys()
    for name in te:
        assert te[name].dtype == tg[name].dtype and torch.equal(te[name], tg[name]), name
    assert read_json(expected, "config.json") == read_json(got, "config.json")
    ids = token_batch(2, seed=5)
    with torch.no_grad():
        assert torch.equal(tquant.load(expected)(ids).logits, tquant.load(got)(ids).logits)


@pytest.mark.parametrize("arch, method", [("llama", "rtn"), ("llama", "gptq"), ("qwen2", "rtn"), ("gpt2", "rtn")])
def test_streaming_equals_in_memory(sources, in_memory, tmp_path, arch, method):
    out = str(tmp_path / "q")
    assert tquant.quantize_to_disk(sources[arch], out, method, calib=CALIB, max_shard_size=SHARD, **OPTIONS) == out
    assert_same_checkpoint(in_memory(arch, method), out)
    files = os.listdir(out)
    shards = sorted(f for f in files if SHARD_NAME.fullmatch(f))
    assert WORK not in files and "tokenizer.json" in files and len(shards) > BLOCKS
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for shard in shards:  # whole tensors; a shard past the limit holds one tensor alone
        sizes = [t.nbytes for t in load_file(os.path.join(out, shard)).values()]
        assert sum(sizes) <= shard_bytes(SHARD) or len(sizes) == 1


def test_lm_head_and_embeddings_stream_too(sources, in_memory, tmp_path):
    out = str(tmp_path / "q")
    tquant.quantize_to_disk(sources["qwen2"], out, "gptq", calib=CALIB, lm_head=True, embeddings=True, **OPTIONS)
    assert_same_checkpoint(in_memory("qwen2", "gptq", lm_head=True, embeddings=True), out)


def test_one_float_block_in_memory_at_a_time(sources, tmp_path):
    """When block i is written, every decoder layer built by the run is back on the meta device and no float
    nn.Linear of a block is alive (the head is the one float linear left): the run holds one block at a time."""
    before = {id(o) for o in gc.get_objects() if issubclass(type(o), nn.Module)}
    seen = []

    def check(i, n):
        gc.collect()
        new = [o for o in gc.get_objects() if issubclass(type(o), nn.Module) and id(o) not in before]
        layers = [m for m in new if type(m).__name__ == "LlamaDecoderLayer"]
        assert len(layers) == BLOCKS and all(t.is_meta for m in layers for t in [*m.parameters(), *m.buffers()])
        live = [m for m in new if isinstance(m, nn.Linear) and not m.weight.is_meta]
        assert [m.out_features for m in live] == [VOCAB], f"block {i}: float linears alive {live}"
        seen.append(i)

    tquant.quantize_to_disk(sources["llama"], str(tmp_path / "q"), "gptq", calib=CALIB, on_block=check, **OPTIONS)
    assert seen == list(range(BLOCKS))


@pytest.mark.parametrize("method", ["gptq", "spqr"])  # spqr: a run state to carry over (its bit counts, reported)
def test_a_stopped_run_resumes_at_its_block(sources, in_memory, tmp_path, caplog, method):
    out = str(tmp_path / "q")

    def stop_after_block_1(i, n):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        tquant.quantize_to_disk(sources["llama"], out, method, calib=CALIB, on_block=stop_after_block_1, **OPTIONS)
    record = read_json(out, WORK, RECORD)
    assert len(record["blocks"]) == 2 and not any(SHARD_NAME.fullmatch(f) for f in os.listdir(out))
    calls = []
    with caplog.at_level(logging.INFO, logger="tquant"):
        tquant.quantize_to_disk(sources["llama"], out, method, calib=CALIB, resume=True,
                                on_block=lambda i, n: calls.append((i, n)), **OPTIONS)
    assert calls == [(2, BLOCKS), (3, BLOCKS)]
    assert any(r.getMessage().startswith("resuming at block 2") for r in caplog.records)
    assert_same_checkpoint(in_memory("llama", method), out)


def test_resumed_states_go_where_the_blocks_run(sources, tmp_path):
    """The hidden states a resumed run reads back (the file holds them on the CPU) go to the device the driver runs
    the blocks on, where its masks and rotary tables are (left on the CPU, a GPU run's resume failed in block 2's
    first norm: 'Expected all tensors to be on the same device'), in the run's dtype (bf16 here), one [batch, tokens,
    hidden] tensor per calibration batch. The meta device stands in for a GPU."""
    out = str(tmp_path / "q")

    def stop_after_block_0(i, n):
        raise Stop

    with pytest.raises(Stop):
        tquant.quantize_to_disk(sources["qwen2"], out, "gptq", calib=CALIB, on_block=stop_after_block_0, **OPTIONS)
    progress = Progress(out, read_json(out, WORK, RECORD))
    first, states, specs, _ = progress.resume_point(make_method("gptq", bits=4, group_size=32), torch.device("meta"))
    assert first == 1 and "model.layers.0.self_attn.q_proj" in specs and len(states) == 2
    assert all(h.is_meta and h.dtype == torch.bfloat16 and h.shape == (4, CALIB.shape[1], 96) for h in states)


class StopOnSave:
    """A tokenizer whose save stops the run in its last step: the shards are in place, the manifest not yet."""

    def save_pretrained(self, path):
        raise Stop


def test_a_run_stopped_while_finishing_resumes(sources, in_memory, tmp_path):
    out = str(tmp_path / "q")
    with pytest.raises(Stop):
        tquant.quantize_to_disk(sources["llama"], out, "rtn", tokenizer=StopOnSave(), **OPTIONS)
    files = os.listdir(out)
    assert any(SHARD_NAME.fullmatch(f) for f in files) and "tquant.json" not in files and WORK in files
    tquant.quantize_to_disk(sources["llama"], out, "rtn", resume=True, **OPTIONS)
    assert_same_checkpoint(in_memory("llama", "rtn"), out)


@pytest.fixture
def stopped(sources, tmp_path):
    """A gptq run into tmp_path/q stopped after block 0."""
    out = str(tmp_path / "q")

    def stop(i, n):
        raise Stop

    with pytest.raises(Stop):
        tquant.quantize_to_disk(sources["llama"], out, "gptq", calib=CALIB, on_block=stop, **OPTIONS)
    return out


def test_resume_refuses_another_option_calibration_or_model(sources, stopped, tmp_path):
    src = sources["llama"]
    options = dict(OPTIONS, calib=CALIB)
    with pytest.raises(ValueError, match=r"cannot resume: option bits=3 here, bits=4 in the stopped run"):
        tquant.quantize_to_disk(src, stopped, "gptq", resume=True, **dict(options, bits=3))
    with pytest.raises(ValueError, match=r"cannot resume: option percdamp=0\.1 here, percdamp=0\.01 in the "
                                         r"stopped run"):
        tquant.quantize_to_disk(src, stopped, "gptq", resume=True, percdamp=0.1, **options)
    with pytest.raises(ValueError, match=r"cannot resume: option calib='sha256:"):
        tquant.quantize_to_disk(src, stopped, "gptq", resume=True, **dict(options, calib=token_batch(8, seed=2)))
    other = _save_source(tmp_path / "other", seed=1)  # the same architecture, other weights
    with pytest.raises(ValueError, match=r"cannot resume: the model differs from the stopped run's \(model-00001"):
        tquant.quantize_to_disk(other, stopped, "gptq", resume=True, **options)
    with pytest.raises(ValueError, match=r"holds a streaming run stopped after 1 blocks: continue it with "
                                         r"resume=True"):
        tquant.quantize_to_disk(src, stopped, "gptq", **options)


def test_resume_refuses_a_changed_block_file_and_overwrite_starts_again(sources, in_memory, stopped):
    block_file = os.path.join(stopped, WORK, "block-00000-1.safetensors")
    with open(block_file, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00")
    with pytest.raises(ValueError, match=r"block-00000-1.safetensors is missing or changed since it was written"):
        tquant.quantize_to_disk(sources["llama"], stopped, "gptq", calib=CALIB, resume=True, **OPTIONS)
    tquant.quantize_to_disk(sources["llama"], stopped, "gptq", calib=CALIB, overwrite=True, **OPTIONS)
    assert_same_checkpoint(in_memory("llama", "gptq"), stopped)
    with pytest.raises(ValueError, match="holds a finished checkpoint: nothing to resume"):
        tquant.quantize_to_disk(sources["llama"], stopped, "gptq", calib=CALIB, resume=True, **OPTIONS)


def test_what_cannot_stream_is_refused_by_name(sources, tmp_path):
    src, out = sources["llama"], str(tmp_path / "q")
    with pytest.raises(ValueError, match=r"'kivi' quantizes the KV cache, which streaming does not write"):
        tquant.quantize_to_disk(src, out, "kivi", kv_bits=4)
    with pytest.raises(ValueError, match=r"method 'qoq' cannot stream: its whole-model steps \(prepare_model, "
                                         r"kv_cache_method"):
        tquant.quantize_to_disk(src, out, "qoq", calib=CALIB)
    with pytest.raises(ValueError, match=r"method 'abq' cannot stream: its whole-model steps \(prepare_model:"):
        tquant.quantize_to_disk(src, out, "abq", calib=CALIB)
    with pytest.raises(ValueError, match=r"nowhere' is not a folder \(a hub id: download it first"):
        tquant.quantize_to_disk(str(tmp_path / "nowhere"), out, "rtn")
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(os.path.join(src, "config.json"), old)
    (old / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no safetensors weights .* \(it holds pytorch_model.bin\)"):
        tquant.quantize_to_disk(str(old), out, "rtn")
    done = str(tmp_path / "done")
    tquant.quantize_to_disk(src, done, "rtn", **OPTIONS)
    with pytest.raises(ValueError, match=r"holds a model quantized already \(quantization_config: tquant\)"):
        tquant.quantize_to_disk(done, out, "rtn")
    assert not os.path.exists(out)  # every refusal came before anything was written


def test_a_line_per_block_with_the_time_left(sources, tmp_path, caplog):
    out = str(tmp_path / "q")
    with caplog.at_level(logging.INFO, logger="tquant"):
        tquant.quantize_to_disk(sources["llama"], out, "rtn", **dict(OPTIONS, progress=True))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rtn: block")]
    assert len(lines) == BLOCKS
    for i, line in enumerate(lines):
        assert line.startswith(f"rtn: block {i + 1}/{BLOCKS} (model.layers.{i}) done in ")
        assert ", ETA " in line and "; elapsed " in line
    assert lines[-1].endswith("(all blocks done)")


def test_cli_streaming_and_resume(sources, tmp_path, capsys):
    out = str(tmp_path / "q")
    main(["quantize", "--model", sources["llama"], "--method", "gptq", "--bits", "4", "--group-size", "32",
          "--calib", "pydoc", "--n-samples", "4", "--seqlen", "32", "--streaming", "--out", out])
    assert "saved gptq (4-bit weights) model to" in capsys.readouterr().out
    config = read_json(out, "config.json")["quantization_config"]
    assert config["base_model"] == sources["llama"] and len(config["layers"]) == 7 * BLOCKS
    assert tquant.load(out)(token_batch(1)).logits.isfinite().all()
    with pytest.raises(SystemExit, match="--resume continues a stopped --streaming run: give --streaming too"):
        main(["quantize", "--model", sources["llama"], "--method", "rtn", "--resume", "--out", str(tmp_path / "r")])
