"""Sharded checkpoints (issue 27): tquant.save(model, path, max_shard_size=...) past the size writes transformers'
model-0000i-of-0000N.safetensors + model.safetensors.index.json, the manifest covers every shard, tquant.load reads it
bit-identically and names the file it refuses (damaged, missing, extra, outside the folder)."""
import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import tquant
from tquant.serialization import INDEX, shard_bytes, split_shards
from tests.tiny_models import tiny_model, token_batch

LIMIT = "50KB"  # the tiny Llama's ~0.3 MB of tensors in several shards; the 99 KB embedding alone in one


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    tquant.quantize(m, "gptq", bits=4, group_size=32, calib=token_batch(8), progress=False, act_order=True,
                    group_order="act")  # a perm buffer and tied embeddings ride along
    return m


@pytest.fixture(scope="module")
def sharded(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    tquant.save(model, str(path), max_shard_size=LIMIT)
    return path


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _rewrite_index(dst, edit):
    """Edit the index and put its new sha256 / size in the manifest (so only the index check can refuse it)."""
    index = json.load(open(dst / INDEX))
    edit(index)
    json.dump(index, open(dst / INDEX, "w"))
    manifest = json.load(open(dst / "tquant.json"))
    manifest.update(sha256=_sha(dst / INDEX), bytes=os.path.getsize(dst / INDEX))
    json.dump(manifest, open(dst / "tquant.json", "w"))


def test_shards_index_and_manifest(model, sharded):
    files = sorted(os.listdir(sharded))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in files
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.load(open(sharded / INDEX))
    state = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:  # whole tensors; a shard past the limit holds one tensor alone
        with safe_open(sharded / shard, framework="pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= shard_bytes(LIMIT) or len(sizes) == 1
    manifest = json.load(open(sharded / "tquant.json"))
    assert manifest["weights"] == INDEX and manifest["sha256"] == _sha(sharded / INDEX)
    assert manifest["shards"] == {s: {"sha256": _sha(sharded / s), "bytes": os.path.getsize(sharded / s)}
                                  for s in shards}


def test_sharded_reload_is_bit_identical(model, sharded):
    loaded = tquant.load(str(sharded))
    ids = token_batch(2, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_below_the_size_one_file_as_before(model, tmp_path):
    tquant.save(model, str(tmp_path))  # default 5GB
    assert "model.safetensors" in os.listdir(tmp_path) and INDEX not in os.listdir(tmp_path)
    assert set(json.load(open(tmp_path / "tquant.json"))) == {"weights", "sha256", "bytes", "tquant_version"}


def test_overwrite_leaves_no_stale_shard(model, sharded, tmp_path):
    dst = _copy(sharded, tmp_path)
    tquant.save(model, str(dst), overwrite=True)
    assert not [f for f in os.listdir(dst) if f.startswith("model-") or f == INDEX]
    tquant.save(model, str(dst), overwrite=True, max_shard_size=LIMIT)
    assert "model.safetensors" not in os.listdir(dst)
    tquant.load(str(dst))
    for lone in ("model-00002-of-00003.safetensors", INDEX):  # a shard or an index alone is a checkpoint too
        other = tmp_path / lone
        other.mkdir()
        (other / lone).write_text("{}")
        with pytest.raises(ValueError, match=f"already holds a checkpoint \\({lone}\\)"):
            tquant.save(model, str(other), max_shard_size=LIMIT)
        with pytest.raises(ValueError, match=f"already holds a checkpoint \\({lone}\\)"):
            tquant.export(model, str(other), format="gptq", gptq_format="gptq_v2")


def test_a_damaged_shard_is_named(sharded, tmp_path):
    dst = _copy(sharded, tmp_path)
    f = sorted(dst.glob("model-*"))[1]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{f.name} was modified after saving"):
        tquant.load(str(dst))
    f.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match=f"{f.name} is truncated"):
        tquant.load(str(dst))


def test_a_missing_shard_is_named(sharded, tmp_path):
    dst = _copy(sharded, tmp_path)
    last = sorted(dst.glob("model-*"))[-1]
    os.remove(last)
    with pytest.raises(ValueError, match=f"incomplete: {last.name} is missing"):
        tquant.load(str(dst))


def test_an_extra_shard_is_named(sharded, tmp_path):
    dst = _copy(sharded, tmp_path)
    shutil.copy(sorted(dst.glob("model-*"))[0], dst / "model-00009-of-00009.safetensors")
    with pytest.raises(ValueError, match="model-00009-of-00009.safetensors is not part of this checkpoint"):
        tquant.load(str(dst))


def test_an_index_naming_a_file_outside_the_folder_is_refused(sharded, tmp_path):
    dst = _copy(sharded, tmp_path)
    first = sorted(dst.glob("model-*"))[0].name
    shutil.copy(dst / first, tmp_path / "outside.safetensors")  # a real file, so only the path rule can refuse it
    _rewrite_index(dst, lambda i: i["weight_map"].update({k: "../outside.safetensors" for k, v in
                                                          i["weight_map"].items() if v == first}))
    with pytest.raises(ValueError, match=r"index.json: shard '../outside.safetensors' is not a file name inside"):
        tquant.load(str(dst))


def test_an_index_disagreeing_with_the_manifest_or_shards_is_refused(sharded, tmp_path):
    dst = _copy(sharded, tmp_path)
    names = sorted(f.name for f in dst.glob("model-*"))
    shutil.copy(dst / names[0], dst / "other.safetensors")
    _rewrite_index(dst, lambda i: i["weight_map"].update({k: "other.safetensors" for k, v in
                                                          i["weight_map"].items() if v == names[0]}))
    with pytest.raises(ValueError, match="names shard 'other.safetensors', which tquant.json does not list"):
        tquant.load(str(dst))
    shutil.rmtree(dst)
    dst = _copy(sharded, tmp_path)
    weight_map = json.load(open(dst / INDEX))["weight_map"]
    moved = next(k for k, v in weight_map.items() if list(weight_map.values()).count(v) > 1)  # its shard stays named
    other = next(n for n in names if n != weight_map[moved])
    _rewrite_index(dst, lambda i: i["weight_map"].update({moved: other}))
    with pytest.raises(ValueError, match=f"({other} lacks|{weight_map[moved]} holds) tensor '{moved}', against"):
        tquant.load(str(dst))


@pytest.mark.parametrize("value,expected", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500mb", 5 * 10**8),
                                            ("1.5KB", 1500), (1000, 1000), (None, None)])
def test_shard_size_reads_as_transformers_does(value, expected):
    assert shard_bytes(value) == expected


@pytest.mark.parametrize("value", ["5 apples", "", 0, -1, True, 2.5, "GB"])
def test_a_bad_shard_size_is_refused_before_writing(model, tmp_path, value):
    with pytest.raises(ValueError, match=r"max_shard_size=.*expected a positive number of bytes"):
        tquant.save(model, str(tmp_path / "x"), max_shard_size=value)
    assert not (tmp_path / "x").exists()


def test_no_tensor_is_split():
    t = {"a": torch.zeros(10), "big": torch.zeros(100), "b": torch.zeros(5), "c": torch.zeros(5)}
    assert [list(s) for s in split_shards(t, 60)] == [["a"], ["big"], ["b", "c"]]
    assert [list(s) for s in split_shards(t, None)] == [["a", "big", "b", "c"]]


def test_exports_are_sharded_as_transformers_reads_them(model, tmp_path):
    """compressed-tensors and GPTQ exports past the size: transformers' index, read by transformers (with the
    compressed-tensors decompressor) and by tquant.load."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    m = tiny_model("llama")
    tquant.quantize(m, "rtn", bits=4, group_size=32, progress=False)
    out = str(tmp_path / "ct")
    tquant.export(m, out, format="compressed-tensors", max_shard_size=LIMIT)
    assert INDEX in os.listdir(out) and "model.safetensors" not in os.listdir(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)).eval()
    ids = token_batch(2, seed=9)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, m(ids).logits)
        assert torch.equal(tquant.load(out)(ids).logits, m(ids).logits)
    tquant.export(m, out, format="gptq", gptq_format="gptq_v2", overwrite=True)  # under the size: one file again
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]


def test_cli_max_shard_size(model, sharded, tmp_path):
    from tquant.cli import main

    main(["export", str(sharded), str(tmp_path / "out"), "--format", "gptq", "--gptq-format", "v2",
          "--max-shard-size", LIMIT])
    assert INDEX in os.listdir(tmp_path / "out")
    ids = token_batch(2, seed=9)
    with torch.no_grad():
        assert torch.allclose(tquant.load(str(tmp_path / "out"))(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(SystemExit, match="max_shard_size='lots'"):
        main(["export", str(sharded), str(tmp_path / "bad"), "--format", "gptq", "--max-shard-size", "lots"])
    with pytest.raises(SystemExit, match="max_shard_size='lots'"):  # refused before any model is loaded
        main(["quantize", "--model", str(tmp_path / "no-such-model"), "--method", "rtn", "--out",
              str(tmp_path / "q"), "--max-shard-size", "lots"])
