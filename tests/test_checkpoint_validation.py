"""tquant.load validates a checkpoint before any kernel reads it (issue 26, section 2).

Edits are made to copies of the committed fixtures (tests/fixtures/checkpoints/, one per module type; never the
committed files), and the sha256 manifest is rewritten after each edit so that the checksum cannot be what catches
it. Each load must then either give the saved model (bit-identical logits for edits that change nothing; load and
finite logits for edits that keep a valid but different model) or raise a ValueError naming the layer / tensor /
file it refuses. Never an IndexError, never a forward on invalid indices.
"""
import hashlib
import json
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tquant
from tquant.formats.packing import unpack_codes
from tquant.modules import module_for_spec

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoints")
NAMES = sorted(os.listdir(ROOT))
_CACHE = {}


def fixture(name):
    """(tensors, config, manifest, expected) of a committed fixture, read once (never written)."""
    if name not in _CACHE:
        path = os.path.join(ROOT, name)
        _CACHE[name] = (load_file(os.path.join(path, "model.safetensors")),
                        json.load(open(os.path.join(path, "config.json"))),
                        json.load(open(os.path.join(path, "tquant.json"))),
                        torch.load(os.path.join(path, "expected.pt")))
    return _CACHE[name]


def saved_logits(name):
    """The unmutated fixture's logits on its probe, loaded and computed on this machine once (bit-identical to what
    a load "as saved" must give here; expected.pt's were computed on another machine's BLAS)."""
    key = ("logits", name)
    if key not in _CACHE:
        with torch.no_grad():
            _CACHE[key] = tquant.load(os.path.join(ROOT, name))(fixture(name)[3]["probe"]).logits
    return _CACHE[key]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def write(name, dst, tensors=None, config=None, manifest=None):
    """A copy of fixture `name` at dst with the given tensors / config / manifest edits, the manifest's sha256 and
    size rewritten for the weights file it names (so the checksum passes)."""
    shutil.copytree(os.path.join(ROOT, name), dst)
    weights = os.path.join(dst, "model.safetensors")
    if tensors is not None:
        os.chmod(weights, 0o644)
        save_file(tensors, weights, metadata={"format": "pt"})
    if config is not None:
        json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    manifest = dict(fixture(name)[2] if manifest is None else manifest)
    named = manifest.get("weights")
    target = os.path.join(dst, named) if isinstance(named, str) else None
    if target and os.path.isfile(target):
        manifest.update(sha256=_sha(target), bytes=os.path.getsize(target))
    json.dump(manifest, open(os.path.join(dst, "tquant.json"), "w"))
    return dst


def quantized_layers(name):
    return fixture(name)[1]["quantization_config"]["layers"]


def layer_tensors(name, layer):
    return sorted(k for k in fixture(name)[0] if k.startswith(layer + "."))


# ---- mutations: each draws an edit of fixture `name` and returns (tensors, config, manifest, extra, expect) ----
# expect: ("same",) bit-identical logits | ("valid",) loads, finite logits | ("loads",) loads | ("error", text the
# message names)

LINEAR_FIXTURES = [n for n in NAMES if quantized_layers(n)]


def _tensor(draw, name, want=lambda k, t: True):
    tensors = fixture(name)[0]
    keys = [k for layer in quantized_layers(name) for k in layer_tensors(name, layer) if want(k, tensors[k])]
    return draw(st.sampled_from(keys)) if keys else None


def _edit(name, key, fn):
    tensors = dict(fixture(name)[0])
    t = tensors[key].clone()
    tensors[key] = fn(t)
    return tensors


def _layer_of(key):
    return key.rsplit(".", 1)[0]


def _spec(name, key):
    return quantized_layers(name)[_layer_of(key)]


def m_noop(draw, name):
    key = _tensor(draw, name)
    return _edit(name, key, lambda t: t), None, None, None, ("same",)


def m_index_out_of_range(draw, name):
    """perm outside 0..K-1; CSR row pointers not from 0 to nnz or not monotone; columns >= K; zero points and
    group multiples off their grids; SpQR stats with bits above scale code | zero."""
    leaves = ("perm", "row_ptr", "cols", "stats", "w_zero", "w_sum", "group_scale", "group_zero")  # w_sum: code sums
    key = _tensor(draw, name, lambda k, t: k.rsplit(".", 1)[1] in leaves)
    if key is None:
        return m_nonfinite(draw, name)
    leaf, spec, t0 = key.rsplit(".", 1)[1], _spec(name, key), fixture(name)[0][key]
    i = draw(st.integers(0, t0.numel() - 1))
    k = spec.get("in_features")
    if leaf == "perm":
        value = draw(st.sampled_from([k, k + 1, 10**6, -1, 2**31 - 1, -(2**31)]))
    elif leaf == "row_ptr":
        nnz = int(t0[-1])
        kind = draw(st.sampled_from(["start", "end", "drop"]))
        if kind == "start":
            i, value = 0, draw(st.integers(1, nnz + 10))
        elif kind == "end":
            i, value = t0.numel() - 1, draw(st.sampled_from([nnz - 1, nnz + 1, 10**6, -1]))
        else:
            i = draw(st.integers(1, t0.numel() - 2))
            value = int(t0[i + 1]) + draw(st.integers(1, 1000))  # above the next row's start
    elif leaf == "cols":
        value = draw(st.integers(k, 2**15 - 1) | st.integers(-(2**15), -1))  # negative int16: >= 2^15 unsigned
    elif leaf == "stats":
        value = draw(st.integers(2 ** (spec["scale_bits"] + spec["bits"]), 255))
    elif leaf == "w_zero":
        value = draw(st.integers(2 ** spec["bits"], 255))
    elif leaf == "w_sum":
        value = int(t0.view(-1)[i]) + draw(st.sampled_from([-1, 1, 2**20]))
    elif leaf == "group_scale":
        value = draw(st.integers(-128, 0))
    else:  # group_zero
        value = draw(st.integers(2 ** spec["bits"], 127) | st.integers(-128, -1))

    def put(t):
        t.view(-1)[i] = value
        return t
    return _edit(name, key, put), None, None, None, ("error", key)


def m_perm_duplicate(draw, name):
    key = _tensor(draw, name, lambda k, t: k.endswith(".perm"))
    if key is None:
        return m_index_out_of_range(draw, name)
    n = fixture(name)[0][key].numel()
    i, j = draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))

    def dup(t):
        t[i] = t[j]
        return t
    return _edit(name, key, dup), None, None, None, ("error", f"{key}: not a permutation")


def m_perm_swap(draw, name):
    """Another valid permutation: a different model, loaded."""
    key = _tensor(draw, name, lambda k, t: k.endswith(".perm"))
    if key is None:
        return m_code_change(draw, name)
    n = fixture(name)[0][key].numel()
    i, j = draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))

    def swap(t):
        t[[i, j]] = t[[j, i]]
        return t
    return _edit(name, key, swap), None, None, None, ("valid",)


def m_code_change(draw, name):
    """A packed code word / sign plane / lattice index set to any value of its dtype: every bit pattern is valid (an
    FP8 weight: every byte but e4m3fn's NaN codes 0x7F / 0xFF)."""
    leaves = ("qweight", "planes", "codes", "codes2")
    key = _tensor(draw, name, lambda k, t: k.rsplit(".", 1)[1] in leaves)
    t0 = fixture(name)[0][key]
    i = draw(st.integers(0, t0.numel() - 1))
    fp8 = t0.dtype == torch.float8_e4m3fn
    info = torch.iinfo(torch.uint8 if fp8 else t0.dtype)
    value = draw(st.integers(info.min, info.max).filter(lambda v: not fp8 or v & 0x7F != 0x7F))
    if key.endswith(".qweight") and t0.dtype == torch.int32 and _spec(name, key)["type"] == "act_quant_linear":
        value = int(t0.view(-1)[i])  # W4A8: (code - zero) * multiple must stay int8 (quantization checks it)
    if key.endswith(".planes") and _spec(name, key)["type"] == "bitplane_linear":  # w_sum holds the codes' sums
        return m_perm_swap(draw, name) if name != "abq_w4a8" else m_noop(draw, name)

    def put(t):
        (t.view(torch.uint8) if fp8 else t).view(-1)[i] = value
        return t
    return _edit(name, key, put), None, None, None, ("valid",)


def m_nonfinite(draw, name):
    key = _tensor(draw, name, lambda k, t: t.is_floating_point())
    t0 = fixture(name)[0][key]
    i = draw(st.integers(0, t0.numel() - 1))
    # e4m3fn has no inf (torch saturates it to +-448): NaN is its one non-finite value
    value = draw(st.sampled_from([float("nan")] if t0.dtype == torch.float8_e4m3fn else
                                 [float("nan"), float("inf"), float("-inf")]))

    def put(t):
        t.view(-1)[i] = value
        return t
    return _edit(name, key, put), None, None, None, ("error", f"{key}: not finite")


def _packed_group(name, scales_key, i):
    """(codes present float64 [group_size], zero, bits, qweight key) of the group holding flat element i of a
    packed layer's scales (PackedLinear / PackedEmbedding "scales", PackedExperts "<proj>_scales" [E, G, N])."""
    tensors, spec = fixture(name)[0], _spec(name, scales_key)
    qkey = scales_key[:-len("scales")] + "qweight"
    scales, qweight = tensors[scales_key], tensors[qkey]
    if scales.dim() == 3:
        e, i = divmod(i, scales[0].numel())
        scales, qweight, zeros = scales[e], qweight[e], tensors[scales_key[:-len("scales")] + "zeros"][e]
    else:
        zeros = tensors[scales_key[:-len("scales")] + "zeros"]
    g, n = divmod(i, scales.shape[1])
    size = spec.get("group_size") or spec[scales_key.rsplit(".", 1)[1][:-len("scales")] + "group_size"]
    codes = unpack_codes(qweight, spec["bits"], scales.shape[0] * size)[g * size:(g + 1) * size, n]
    return codes.double(), zeros[g, n].double(), qkey


def m_grid_past_dtype(draw, name):
    """A packed layer's group scale set near the dtype's largest value M: refused (naming qweight) when a code the
    group holds has |(code - zero) * scale| > M (computed here in float64), else a valid grid (the model loads; its
    logits may be inf)."""
    key = _tensor(draw, name, lambda k, t: k.endswith("scales") and _spec(name, k)["type"] in
                  ("packed_linear", "packed_embedding", "packed_experts"))
    if key is None:
        return m_nonfinite(draw, name)
    t0 = fixture(name)[0][key]
    i = draw(st.integers(0, t0.numel() - 1))
    big = torch.finfo(t0.dtype).max
    value = draw(st.sampled_from([big, -big, big / 2, big / 3, big / 4, big / 7, big / 8, big / 15]))
    codes, zero, qkey = _packed_group(name, key, i)
    past = (((codes - zero) * torch.tensor(value, dtype=t0.dtype).double()).abs() > big).any()

    def put(t):
        t.view(-1)[i] = value
        return t
    return _edit(name, key, put), None, None, None, ("error", f"{qkey}") if past else ("loads",)


def m_dtype(draw, name):
    """Any tensor of a quantized layer in another dtype (integers exact; floats to float64 or integers)."""
    key = _tensor(draw, name)
    t0 = fixture(name)[0][key]
    choices = ([torch.float64, torch.int32, torch.int16] if t0.is_floating_point() else
               [d for d in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32,
                            torch.float16) if d != t0.dtype])
    dtype = draw(st.sampled_from(choices))
    return _edit(name, key, lambda t: t.to(dtype)), None, None, None, ("error", f"{key}: checkpoint dtype")


def m_shape(draw, name):
    """A tensor one longer or shorter along a dimension, dropped, or a tensor the model does not have."""
    key = _tensor(draw, name)
    kind = draw(st.sampled_from(["grow", "shrink", "drop", "extra"]))
    tensors = dict(fixture(name)[0])
    t = tensors[key]
    if kind == "drop":
        del tensors[key]
    elif kind == "extra":
        tensors[_layer_of(key) + ".extra"] = t.clone()
        return tensors, None, None, None, ("error", _layer_of(key) + ".extra")
    else:
        dim = draw(st.integers(0, t.dim() - 1))
        if kind == "shrink" and t.shape[dim] > 1:
            tensors[key] = t.narrow(dim, 0, t.shape[dim] - 1).clone()
        else:
            tensors[key] = torch.cat([t, t.narrow(dim, 0, 1)], dim)
    return tensors, None, None, None, ("error", key)


SIZE_KEYS = ("bits", "planes", "group_size", "in_features", "out_features", "num_embeddings", "embedding_dim")
OTHER_VALUES = [0, 1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 95, 97, 192, 193, -1, 2**40, "4", None, 4.0, True, [4]]


def m_spec(draw, name):
    """A config.json layer-spec entry: a size changed (bits, group_size, in / out features: their tensors no longer
    fit), a flag flipped, an unknown key, a key removed (with the default it had: no change), a layer renamed."""
    config = json.loads(json.dumps(fixture(name)[1]))
    layers = config["quantization_config"]["layers"]
    layer = draw(st.sampled_from(sorted(layers)))
    spec = layers[layer]
    kind = draw(st.sampled_from(["size", "flag", "unknown", "remove", "rename"]))
    flags = [k for k, v in spec.items() if isinstance(v, bool)]
    if kind == "size" and any(k in spec for k in SIZE_KEYS):
        key = draw(st.sampled_from([k for k in SIZE_KEYS if k in spec]))
        value = draw(st.sampled_from([v for v in OTHER_VALUES if not (v == spec[key] and type(v) is type(spec[key]))]))
        spec[key] = value
        return None, config, None, None, ("error", layer)
    if kind == "flag" and flags:
        key = draw(st.sampled_from(flags))
        spec[key] = not spec[key]
        return None, config, None, None, ("error", layer)
    if kind == "remove":
        key = draw(st.sampled_from(sorted(k for k in spec if k != "type")))
        defaults = getattr(module_for_spec(spec), "spec_defaults", {})
        same = key in defaults and defaults[key] == spec[key]
        del spec[key]
        return None, config, None, None, ("same",) if same else ("error", layer)
    if kind == "rename":
        layers[layer + "_x"] = layers.pop(layer)
        return None, config, None, None, ("error", layer)
    spec[draw(st.sampled_from(["scale", "extra", "Bits", "tquant"]))] = draw(st.sampled_from([1, True, "x", None]))
    return None, config, None, None, ("error", layer)


def m_kv_spec(draw, name):
    """The KV-cache spec: an unknown key, an unsupported option, an unknown method; or another valid option."""
    config = json.loads(json.dumps(fixture(name)[1]))
    spec = config["quantization_config"]["kv_cache"]
    kind = draw(st.sampled_from(["unknown", "bits", "group", "method", "valid"]))
    if kind == "unknown":
        spec["codebook_x"] = [1, 2]
    elif kind == "bits":
        spec["kv_bits"] = draw(st.sampled_from([0, 1, 5, 16, "2"]))
    elif kind == "group":
        spec["group_size"] = draw(st.sampled_from([0, -1, 7, 1000]))
    elif kind == "method":
        spec["method"] = draw(st.sampled_from(["kivi2", "gptq", "", 3]))
    else:
        spec["kv_bits"] = draw(st.sampled_from([4, 8]))
        return None, config, None, None, ("valid",)
    return None, config, None, None, ("error", "kv_cache")


def m_manifest(draw, name):
    """The manifest: its weights file outside the folder ('..', an absolute path, a symlink out), missing, or an
    unknown key; or a symlink to the weights inside the folder (the same model)."""
    kind = draw(st.sampled_from(["parent", "absolute", "symlink_out", "missing", "unknown", "symlink_in"]))
    manifest = dict(fixture(name)[2])

    def extra(dst):  # a real copy of the weights beside the folder, so only the path rule can refuse it
        outside = os.path.join(os.path.dirname(dst), "outside.safetensors")
        shutil.copy(os.path.join(dst, "model.safetensors"), outside)
        return outside
    if kind == "parent":
        manifest["weights"] = "../outside.safetensors"
    elif kind == "absolute":
        manifest["weights"] = "ABSOLUTE"
    elif kind in ("symlink_out", "symlink_in"):
        manifest["weights"] = "link.safetensors"
    elif kind == "missing":
        manifest["weights"] = "model2.safetensors"
        return None, None, manifest, None, ("error", "model2.safetensors is missing")
    else:
        manifest["extra"] = 1
        return None, None, manifest, None, ("error", "unknown keys ['extra']")

    def prepare(dst):
        outside = extra(dst)
        if kind == "absolute":
            return {"weights": outside}
        if kind == "symlink_out":
            os.symlink(outside, os.path.join(dst, "link.safetensors"))
        if kind == "symlink_in":
            os.symlink(os.path.join(dst, "model.safetensors"), os.path.join(dst, "link.safetensors"))
        return {}
    return None, None, manifest, prepare, ("same",) if kind == "symlink_in" else ("error", "tquant.json: weights")


MUTATIONS = {m.__name__: m for m in (m_noop, m_index_out_of_range, m_perm_duplicate, m_perm_swap, m_code_change,
                                     m_nonfinite, m_grid_past_dtype, m_dtype, m_shape, m_spec, m_manifest)}


def run_mutation(name, tensors, config, manifest, prepare, expect):
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "ckpt")
        write(name, dst, tensors, config)
        manifest = dict(fixture(name)[2] if manifest is None else manifest)
        if prepare is not None:
            manifest.update(prepare(dst))
        target = os.path.join(dst, manifest["weights"])
        if os.path.isfile(target):
            manifest.update(sha256=_sha(target), bytes=os.path.getsize(target))  # the checksum passes
        json.dump(manifest, open(os.path.join(dst, "tquant.json"), "w"))
        if expect[0] == "error":
            with pytest.raises(ValueError) as err:
                tquant.load(dst)
            assert expect[1] in str(err.value), (expect, str(err.value))
            return
        model = tquant.load(dst)
        if expect[0] == "loads":
            return
        probe, logits = fixture(name)[3]["probe"], saved_logits(name)
        with torch.no_grad():
            got = model(probe).logits
        if expect[0] == "same":
            assert torch.equal(got, logits)
        else:
            assert torch.isfinite(got).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_mutated_checkpoint_loads_as_saved_or_is_refused_by_name(data):
    kind = data.draw(st.sampled_from(sorted(MUTATIONS)), label="mutation")
    name = data.draw(st.sampled_from(NAMES if kind == "m_manifest" else LINEAR_FIXTURES), label="fixture")
    run_mutation(name, *MUTATIONS[kind](data.draw, name))


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_a_mutated_kv_cache_spec_is_refused_by_name(data):
    run_mutation("kivi_kv2", *m_kv_spec(data.draw, "kivi_kv2"))


# ---- the cases the issue names, spelled out ----

def _one(tmp_path, name, key, fn):
    return write(name, str(tmp_path / "ckpt"), tensors=_edit(name, key, fn))


def test_an_out_of_range_perm_names_layer_tensor_and_remedy(tmp_path, monkeypatch):
    key = "model.layers.0.mlp.down_proj.perm"

    def put(t):
        t[0] = 10**6
        return t
    dst = _one(tmp_path, "gptq_w4_g32_actorder", key, put)
    from tquant.modules import PackedLinear
    monkeypatch.setattr(PackedLinear, "_matmul", lambda *a: pytest.fail("a kernel ran on the invalid checkpoint"))
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.down_proj\.perm: not a permutation of 0\.\.191 "
                                         r"\(value 1000000 at 0\): the checkpoint was edited or damaged; quantize and "
                                         r"save it again$"):
        tquant.load(dst)


def test_spqr_csr_is_checked(tmp_path):
    layer = "model.layers.1.mlp.down_proj"  # K = 192

    def cols(t):
        t[3] = 191 + 1
        return t
    with pytest.raises(ValueError, match=rf"{layer}\.cols: column 192 at 3 is outside 0\.\.191"):
        tquant.load(_one(tmp_path / "a", "spqr_w3", layer + ".cols", cols))

    def ptr(t):
        t[5] = t[6] + 1
        return t
    with pytest.raises(ValueError, match=rf"{layer}\.row_ptr: not monotone"):
        tquant.load(_one(tmp_path / "b", "spqr_w3", layer + ".row_ptr", ptr))


def test_nan_scale_is_refused(tmp_path):
    key = "model.layers.0.self_attn.q_proj.scales"

    def nan(t):
        t[1, 2] = float("nan")
        return t
    with pytest.raises(ValueError, match=rf"{key}: not finite \(nan at flat index"):
        tquant.load(_one(tmp_path, "rtn_w3_g32_embeddings", key, nan))


def _fp16_group(tensors, layer, bits, group_size):
    """(g, n, reach, whole) of a group of a packed layer whose codes present stop short of the grid's extreme:
    reach = max |code - zero| over its codes, whole = the same over every code 0..2^bits - 1, reach < whole."""
    zeros = tensors[layer + ".zeros"].double()
    codes = unpack_codes(tensors[layer + ".qweight"], bits, zeros.shape[0] * group_size).view(zeros.shape[0],
                                                                                             group_size, -1)
    reach = torch.maximum(zeros - codes.amin(1), codes.amax(1) - zeros)
    whole = torch.maximum(zeros, 2**bits - 1 - zeros)
    g, n = (reach < whole).nonzero()[0].tolist()
    return g, n, reach[g, n].item(), whole[g, n].item()


def test_a_code_past_the_fp16_range_is_refused_naming_layer_dtype_and_value(tmp_path, monkeypatch):
    """An fp16 checkpoint whose scale puts a code a group holds past 65504 is refused, one whose grid passes 65504
    only at codes no weight of the group holds loads (with that weight finite)."""
    from tquant.formats.packing import dequantize_packed
    from tquant.modules import PackedLinear

    name, layer = "rtn_w3_g32_embeddings", "model.layers.0.self_attn.q_proj"
    spec = quantized_layers(name)[layer]
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in fixture(name)[0].items()}
    g, n, reach, whole = _fp16_group(tensors, layer, spec["bits"], spec["group_size"])
    big = torch.finfo(torch.float16).max
    inside = torch.tensor(big / reach, dtype=torch.float16)  # rounded: maybe 1 ulp past big / reach
    while inside.double() * reach > big:
        inside = torch.nextafter(inside, torch.tensor(0.0, dtype=torch.float16))
    past = torch.nextafter(inside, torch.tensor(big, dtype=torch.float16))
    assert inside.double() * whole > big and past.double() * reach > big  # the grid's outer code passes big

    def with_scale(scale, folder):
        tensors[layer + ".scales"] = fixture(name)[0][layer + ".scales"].half()
        tensors[layer + ".scales"][g, n] = scale
        return write(name, str(tmp_path / folder), tensors=dict(tensors))

    model = tquant.load(with_scale(inside, "inside"))
    q = model.get_submodule(layer)
    assert torch.isfinite(dequantize_packed(q.qweight, q.scales, q.zeros, q.bits, q.group_size, 96).half()).all()
    monkeypatch.setattr(PackedLinear, "_matmul", lambda *a: pytest.fail("a kernel ran on the invalid checkpoint"))
    with pytest.raises(ValueError) as err:
        tquant.load(with_scale(past, "past"))
    message = str(err.value)
    assert message.startswith(f"{layer}.qweight: code "), message
    assert f"past torch.float16's largest value 65504 (group {g} of output {n}" in message, message
    assert f"= {past.item() * reach:.6g}" in message or f"= {-past.item() * reach:.6g}" in message, message
    assert message.endswith("quantize and save it again"), message


def test_weights_outside_the_folder_are_refused(tmp_path):
    secret = tmp_path / "elsewhere.safetensors"
    shutil.copy(os.path.join(ROOT, "bcq_q3", "model.safetensors"), secret)
    for weights in ("../elsewhere.safetensors", str(secret), "sub/../../elsewhere.safetensors"):
        dst = str(tmp_path / f"ckpt{len(weights)}")
        manifest = dict(fixture("bcq_q3")[2], weights=weights, sha256=_sha(secret))
        write("bcq_q3", dst, manifest=manifest)
        with pytest.raises(ValueError, match="tquant.json: weights .* inside the checkpoint folder"):
            tquant.load(dst)


def test_an_unknown_layer_spec_key_is_refused(tmp_path):
    config = json.loads(json.dumps(fixture("qqq_w4a8_g32")[1]))
    config["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["act_order"] = True
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj: layer spec has unknown keys \['act_order'\]"):
        tquant.load(write("qqq_w4a8_g32", str(tmp_path / "ckpt"), config=config))


def test_the_committed_fixtures_are_untouched():
    for name in NAMES:
        path = os.path.join(ROOT, name)
        manifest = json.load(open(os.path.join(path, "tquant.json")))
        assert _sha(os.path.join(path, "model.safetensors")) == manifest["sha256"]
