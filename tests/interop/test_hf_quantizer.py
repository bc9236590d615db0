"""transformers.AutoModelForCausalLM.from_pretrained(tquant checkpoint) after `import tquant`
(tquant.interop.hf_quantizer): the same module types, tensors (dtypes included) and logits as tquant.load, for a
weight-only method (PackedLinear), a W8A8 one (ActQuantLinear) and a KV-cache method; the checks of tquant.load
(manifest, layer specs, tensor names / shapes / dtypes, validate) refuse a damaged folder; `import tquant` stays
free of transformers and registers the quantizer whichever of the two is imported first."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import tquant
from tests.interop.helpers import logits, quantized
from tests.tiny_models import tiny_model, token_batch

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def from_pretrained(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


def same_model(hf, ref):
    assert [(n, type(m)) for n, m in hf.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()]
    hf_t = dict(hf.state_dict()) | dict(hf.named_buffers())
    ref_t = dict(ref.state_dict()) | dict(ref.named_buffers())
    assert sorted(hf_t) == sorted(ref_t)
    for name, t in ref_t.items():
        assert hf_t[name].dtype == t.dtype and torch.equal(hf_t[name], t), name
    assert torch.equal(logits(hf), logits(ref))


def kv_model():
    model = quantized("rtn", bits=4, group_size=32)
    tquant.quantize(model, "kivi", kv_bits=2, group_size=16, progress=False)
    return model


def w8a8_model():
    model = tiny_model("llama", num_key_value_heads=6)  # MHA: SmoothQuant folds every factor
    tquant.quantize(model, "smoothquant", calib=token_batch(8), progress=False)
    return model


def bf16_model():
    model = tiny_model("llama", dtype=torch.bfloat16)
    tquant.quantize(model, "rtn", bits=4, group_size=32, sym=False, progress=False)
    return model


MODELS = {
    "rtn-asym": lambda: quantized("rtn", bits=4, group_size=32, sym=False),
    "gptq-act-order": lambda: quantized("gptq", bits=4, group_size=32, act_order=True),
    "rtn-bf16": bf16_model,
    "smoothquant-w8a8": w8a8_model,
    "kivi-kv": kv_model,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{case: folder written by tquant.save}, built on first use."""
    made = {}

    def get(case):
        if case not in made:
            made[case] = str(tmp_path_factory.mktemp(case) / "ckpt")
            tquant.save(MODELS[case](), made[case])
        return made[case]
    return get


@pytest.mark.parametrize("case", list(MODELS))
def test_from_pretrained_gives_what_tquant_load_gives(saved, case):
    path = saved(case)
    hf, ref = from_pretrained(path), tquant.load(path)
    same_model(hf, ref)
    assert hf.config.quantization_config.to_dict() == json.load(open(os.path.join(path, "config.json")))[
        "quantization_config"]
    if case == "kivi-kv":  # generate() runs on the quantized cache, as tquant.load hooks it
        assert getattr(hf.generate, "_tquant_kv", False)
        ids = token_batch(1, seqlen=8, seed=4)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=256)
        assert torch.equal(hf.generate(ids, **kw), ref.generate(ids, **kw))


def test_the_loaded_model_saves_with_tquant_not_save_pretrained(saved, tmp_path):
    hf = from_pretrained(saved("rtn-asym"))
    with pytest.raises(ValueError, match="not serializable"):
        hf.save_pretrained(str(tmp_path / "hf"))
    tquant.save(hf, str(tmp_path / "again"))  # its TquantConfig is the checkpoint's quantization_config
    same_model(tquant.load(str(tmp_path / "again")), tquant.load(saved("rtn-asym")))


def copy_of(path, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(path, out)
    return out


def edit_config(path, fn):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    fn(config["quantization_config"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_a_damaged_weights_file_is_refused(saved, tmp_path):
    path = copy_of(saved("rtn-asym"), tmp_path)
    weights = os.path.join(path, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-5] ^= 1
    open(weights, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="was modified after saving: its sha256"):
        from_pretrained(path)


def test_a_folder_without_the_manifest_is_refused(saved, tmp_path):
    path = copy_of(saved("rtn-asym"), tmp_path)
    os.remove(os.path.join(path, "tquant.json"))
    with pytest.raises(ValueError, match="tquant.json is missing"):
        from_pretrained(path)


def test_edited_layer_specs_are_refused(saved, tmp_path):
    path = copy_of(saved("rtn-asym"), tmp_path)
    edit_config(path, lambda qc: qc["layers"]["model.layers.0.mlp.up_proj"].update(bits=8))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.qweight: checkpoint shape"):
        from_pretrained(path)
    edit_config(path, lambda qc: qc["layers"]["model.layers.0.mlp.up_proj"].update(type="mystery", bits=4))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj' has unknown module type 'mystery'"):
        from_pretrained(path)
    edit_config(path, lambda qc: qc["layers"].pop("model.layers.0.mlp.up_proj"))
    with pytest.raises(ValueError, match=r"the checkpoint has a tensor 'model\.layers\.0\.mlp\.up_proj\.\w+' that "
                                         "the model does not"):
        from_pretrained(path)


def test_validate_runs_on_the_loaded_tensors(tmp_path):
    """A zero point off its grid passes the manifest only when the manifest is rewritten too: validate() catches
    it after transformers loaded the tensors."""
    model = quantized("rtn", bits=4, group_size=32, sym=False)
    model.model.layers[0].mlp.up_proj.scales[0, 0] = float("inf")
    tquant.save(model, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.scales: not finite"):
        from_pretrained(str(tmp_path / "bad"))


def test_a_stray_single_file_beside_shards_is_refused(tmp_path):
    model = quantized("rtn", bits=4, group_size=32)
    path = str(tmp_path / "sharded")
    tquant.save(model, path, max_shard_size="40KB")
    ref = tquant.load(path)
    same_model(from_pretrained(path), ref)  # sharded: read through the index
    shards = sorted(f for f in os.listdir(path) if f.startswith("model-0"))
    assert len(shards) > 1
    shutil.copyfile(os.path.join(path, shards[0]), os.path.join(path, "model.safetensors"))  # what transformers
    # reads first
    with pytest.raises(ValueError, match=r"transformers would read \['model.safetensors'\]"):
        from_pretrained(path)


def run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          check=True).stdout


def test_import_tquant_does_not_import_transformers_and_registers_on_its_import():
    out = run("import sys, tquant; print('transformers' in sys.modules, 'torch' in sys.modules); "
              "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m; print(m['tquant'].__name__)")
    assert out.split() == ["False", "False", "TquantHfQuantizer"]


def test_registered_when_transformers_came_first():
    out = run("import transformers.quantizers.auto as a; assert 'tquant' not in a.AUTO_QUANTIZER_MAPPING; "
              "import tquant; print(a.AUTO_QUANTIZER_MAPPING['tquant'].__name__, "
              "a.AUTO_QUANTIZATION_CONFIG_MAPPING['tquant'].__name__)")
    assert out.split() == ["TquantHfQuantizer", "TquantConfig"]


def test_pipelines_and_lm_eval_take_the_folder(tmp_path):
    """What the issue asks the route for: transformers' pipeline and lm-eval's HFLM load a tquant folder by path."""
    from tests.tiny_models import byte_tokenizer

    path = str(tmp_path / "ckpt")
    tquant.save(quantized("rtn", bits=4, group_size=32), path, tokenizer=byte_tokenizer())
    ref = tquant.load(path)
    pipe = transformers.pipeline("text-generation", model=path, device="cpu")
    assert type(pipe.model.model.layers[0].mlp.up_proj) is type(ref.model.layers[0].mlp.up_proj)
    ids = token_batch(1, seqlen=6, seed=5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=256)
    assert torch.equal(pipe.model.generate(ids, **kw), ref.generate(ids, **kw))
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    lm = huggingface.HFLM(pretrained=path, device="cpu", batch_size=1)
    same_model(lm.model, ref)
