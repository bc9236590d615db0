"""tquant.save / tquant.load: bit-identical round trips and clear errors on damaged checkpoints."""
import json
import os

import pytest
import torch

import tquant
from tquant.modules import PackedLinear
from tests.tiny_models import tiny_model, token_batch


@pytest.fixture(scope="module", params=[("llama", "gptq", 4, 32, dict(act_order=True, group_order="act")),  # perm + tied embeddings
                                        ("qwen2", "gptq", 3, -1, {}),                   # q/k/v biases
                                        ("opt", "rtn", 8, 32, {}),
                                        ("llama", "gptq", 2, 32, dict(act_order=True, static_groups=True))])
def saved(request, tmp_path_factory):
    arch, method, bits, gs, opts = request.param
    model = tiny_model(arch)
    tquant.quantize(model, method, bits=bits, group_size=gs, calib=token_batch(8), progress=False, **opts)
    path = str(tmp_path_factory.mktemp("ckpt"))
    tquant.save(model, path)
    return model, path


def test_reload_is_bit_identical(saved):
    model, path = saved
    ids = token_batch(2, seed=9)
    loaded = tquant.load(path)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)
    assert sum(isinstance(m, PackedLinear) for m in loaded.modules()) == len(model.config.quantization_config["layers"])
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_saved_files_have_no_pickle(saved):
    _, path = saved
    assert sorted(f for f in os.listdir(path) if not f.endswith(".json")) == ["model.safetensors"]
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["quantization_config"]["quant_method"] == "tquant"


def _copy(path, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_tampered_weights_are_detected(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    f = dst / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="modified after saving.*save the model again"):
        tquant.load(str(dst))


def test_truncated_weights_are_detected(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        tquant.load(str(dst))


def test_missing_files_are_reported(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    os.remove(dst / "model.safetensors")
    with pytest.raises(ValueError, match="incomplete"):
        tquant.load(str(dst))
    os.remove(dst / "tquant.json")
    with pytest.raises(ValueError, match="not a tquant checkpoint"):
        tquant.load(str(dst))


def test_foreign_format_is_refused(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    cfg = json.load(open(dst / "config.json"))
    cfg["quantization_config"]["format"] = "something-else"
    json.dump(cfg, open(dst / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported tquant format"):
        tquant.load(str(dst))


def test_saving_an_unquantized_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no tquant quantization_config"):
        tquant.save(tiny_model("llama"), str(tmp_path))


def test_saving_over_a_checkpoint_needs_overwrite(saved, tmp_path):
    model, _ = saved
    path = str(tmp_path / "out")
    tquant.save(model, path)
    before = open(os.path.join(path, "model.safetensors"), "rb").read()
    with pytest.raises(ValueError, match="already holds a checkpoint .*overwrite=True"):
        tquant.save(model, path)
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == before  # untouched
    tquant.save(model, path, overwrite=True)
    assert torch.equal(tquant.load(path)(token_batch(1)).logits, model(token_batch(1)).logits)
    for lone in ("config.json", "model.safetensors"):  # any part of a checkpoint counts
        other = tmp_path / lone.replace(".", "_")
        other.mkdir()
        (other / lone).write_text("{}")
        with pytest.raises(ValueError, match=f"already holds a checkpoint \\({lone}\\)"):
            tquant.save(model, str(other))
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "README.md").write_text("mine")
    tquant.save(model, str(unrelated))  # a non-empty folder without a checkpoint is fine
    assert (unrelated / "README.md").read_text() == "mine"
