"""QoQ (W4A8KV4): the method on tiny random models, its weight clipping search, and its options."""
import pytest
import torch

import tquant
from tquant.methods.qoq import clip_ratios
from tquant.modules import ActQuantLinear
from tquant.formats.weights import QuantizedWeight
from tests.methods.test_weight_activation import CALIB, layers, quantized, rel_err
from tests.tiny_models import tiny_model

OFF = dict(kv_bits=16, smooth_attention=0, rotate=False, smooth_xw=False, reorder=False, calib_range=False)


def test_clip_ratios_pick_each_groups_best_ratio_on_the_output_error():
    """Per row and group, the chosen ratio's ||X_g (w_g - q_g)||^2 is the least over the grid (H = 2/T X^T X)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.rand(64, generator=g) * 3
    w = torch.randn(8, 64, generator=g)
    w[:, 5] *= 8
    grid = 10
    chosen = clip_ratios(w, 2 / 256 * x.t() @ x, 16, grid)
    assert chosen.shape == (8, 4) and (chosen < 1).any()

    def group_errors(ratio):
        delta = w - QuantizedWeight.from_progressive(w, 16, clip=ratio).dequantize()
        return torch.stack([((x[:, i * 16:(i + 1) * 16] @ delta[:, i * 16:(i + 1) * 16].t()) ** 2).sum(0)
                            for i in range(4)], dim=1)  # [N, G]

    every = torch.stack([group_errors(1 - 0.5 * i / grid) for i in range(grid)])  # [grid, N, G]
    picked = torch.stack([every[round((1 - r.item()) * 2 * grid), n, j] for (n, j), r in
                          zip([(n, j) for n in range(8) for j in range(4)], chosen.flatten())]).reshape(8, 4)
    torch.testing.assert_close(picked, every.amin(0), rtol=1e-4, atol=1e-6)


def test_qoq_builds_w4a8_zero_point_layers_and_the_kv4_cache():
    model, reference = quantized("llama", "qoq", group_size=32, smooth_grid=4, clip_grid=5)
    mods = layers(model)
    assert len(mods) == 14
    for m in mods.values():
        assert m.bits == 4 and m.act_bits == 8 and m.group_zero is not None and m.group_scale.min() >= 1
    qc = model.config.quantization_config
    assert qc["method"] == "qoq" and qc["kv_cache"]["method"] == "qoq_kv4" and qc["kv_cache"]["kv_bits"] == 4
    assert len(qc["kv_cache"]["smooth_scales"]) == 2  # SmoothAttention folded into both layers' q / k_proj
    report = qc["report"]
    assert len(report["clip_ratio"]) == 14 and all(0.5 < r <= 1 for r in report["clip_ratio"].values())
    # the output modules: down_proj <- up_proj, and o_proj <- v_proj with the scale tied under GQA
    assert set(report["alpha"]) == {f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj",
                                                                                     "self_attn.o_proj")}
    rtn, _ = quantized("llama", "zeroquant", bits=4, group_size=32)  # W4A8 round-to-nearest on QQQ's grid
    assert rel_err(model, reference) < rel_err(rtn, reference)
    assert all(m.perm is not None and sorted(m.perm.tolist()) == list(range(m.in_features)) for m in mods.values())


def test_qoq_steps_lower_the_error_of_plain_progressive_rtn():
    plain, reference = quantized("llama", "qoq", group_size=32, **OFF)
    full, _ = quantized("llama", "qoq", group_size=32, kv_bits=16, smooth_attention=0, smooth_grid=4, clip_grid=10)
    assert rel_err(full, reference) < rel_err(plain, reference)
    assert "kv_cache" not in plain.config.quantization_config


def test_qoq_gqa_o_proj_switch():
    """gqa_o_proj=False leaves o_proj unsmoothed under GQA (down_proj only); the tied smoothing lowers the error."""
    off, reference = quantized("llama", "qoq", group_size=32, kv_bits=16, smooth_attention=0, smooth_grid=4,
                               reorder=False, calib_range=False, rotate=False, gqa_o_proj=False)
    on, _ = quantized("llama", "qoq", group_size=32, kv_bits=16, smooth_attention=0, smooth_grid=4, reorder=False,
                      calib_range=False, rotate=False)
    assert set(off.config.quantization_config["report"]["alpha"]) == {f"model.layers.{i}.mlp.down_proj"
                                                                        for i in range(2)}
    assert len(on.config.quantization_config["report"]["alpha"]) == 4
    assert rel_err(on, reference) <= rel_err(off, reference)


@pytest.mark.parametrize("group_size", [-1, 32])
def test_qoq_save_load_is_bit_identical(tmp_path, group_size):
    model, _ = quantized("llama", "qoq", group_size=group_size, smooth_grid=2, clip_grid=3)
    tquant.save(model, tmp_path)
    loaded = tquant.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(CALIB).logits, model(CALIB).logits)
    assert all(isinstance(m, ActQuantLinear) and m.group_zero is not None for m in layers(loaded).values())


@pytest.mark.parametrize("options,message", [
    (dict(bits=8), "4 bits"),
    (dict(act_bits=4), "8-bit activations"),
    (dict(kv_bits=3), "kv_bits=3"),
    (dict(kv_bits=16), "smooth_attention=0 with kv_bits=16"),
    (dict(clip_grid=0), "clip_grid"),
])
def test_qoq_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        tquant.quantize(tiny_model("llama"), "qoq", calib=CALIB, device="cpu", progress=False, **options)


def test_qoq_reorder_sorts_channels_by_activation_salience():
    """With reorder, storage column k holds the input channel of k-th largest mean square (diag H), and the layer
    computes x[..., perm] against the reordered grid: its dequantized weight is back in input order."""
    from tquant.methods import get_method
    from tquant.methods.gptq import HessianState

    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 8, bias=False)
    x = torch.randn(128, 64, generator=g) * torch.rand(64, generator=g) * 4
    method = get_method("qoq")(group_size=16, clip_grid=4)
    state = HessianState("layer", linear)
    state.add_batch(x)
    qw = method.quantize(state, linear, "layer")
    assert torch.equal(qw.perm, torch.argsort((x ** 2).mean(0), descending=True, stable=True))
    err = (qw.dequantize() - linear.weight).norm() / linear.weight.norm()
    assert err < 0.2 and qw.act_bits == 8


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rotation_keeps_the_float_model_and_removes_input_outliers(arch):
    """rotate_residual: the logits stay within 1e-5, the norms' weights become 1, a tied lm_head is untied, and
    q_proj's input (RMSNorm output with outlier channels from its weight) has its largest channel far closer to
    the mean channel (the Hadamard spreads outliers over all channels)."""
    from tests.methods.test_weight_activation import with_outliers
    from tquant.calib.rotation import rotate_residual

    model = with_outliers(tiny_model(arch))

    def q_input_peak():
        seen = []
        hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        logits = model(CALIB).logits
        hook.remove()
        channel = seen[0].abs().amax((0, 1))
        return logits, (channel.max() / channel.mean()).item()

    with torch.no_grad():
        reference, before = q_input_peak()
        rotate_residual(model)
        logits, after = q_input_peak()
    assert ((logits - reference).norm() / reference.norm()).item() < 1e-5
    assert all(torch.all(b.input_layernorm.weight == 1) for b in model.model.layers)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert before > 4 and after < before / 3


def test_rotation_refuses_models_it_cannot_fold():
    from tquant.calib.rotation import rotate_residual

    with pytest.raises(ValueError, match="Llama-style model"):
        rotate_residual(tiny_model("opt"))
    with pytest.raises(ValueError, match="no Hadamard matrix"):
        rotate_residual(tiny_model("llama", hidden_size=100, intermediate_size=160))


def test_rotation_of_a_bf16_model_stays_in_bf16():
    """The rotation runs on a bf16 model as it is (its check on float32 copies of one block at a time, so no float32
    copy of the model is made; the old whole-model logits check could not pass in bf16): every parameter stays bf16
    and the logits stay as close to the float model's as one bf16 rounding of the weights allows."""
    from tquant.calib.rotation import rotate_residual

    model = tiny_model("llama", dtype=torch.bfloat16)
    float_model = tiny_model("llama")
    with torch.no_grad():
        reference = float_model(CALIB).logits
        rotate_residual(model)
        logits = model(CALIB).logits.float()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert ((logits - reference).norm() / reference.norm()).item() < 3e-2


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_rotation_refuses_blocks_that_read_the_stream_otherwise(arch):
    """Gemma-2/3 norm the attention and MLP outputs before the residual add and scale by (1 + weight): the names
    match a Llama block's, the maths does not; the block check names the block and leaves every weight as it was."""
    from tquant.calib.rotation import rotate_residual

    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="block 0 .* changed its output"):
        rotate_residual(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_qoq_without_calibrated_steps_is_data_free():
    model = tiny_model("llama")
    tquant.quantize(model, "qoq", group_size=32, smooth_attention=0, smooth_xw=False, reorder=False,
                    calib_range=False, device="cpu", progress=False)  # rotation + progressive grid + KV4: no calib=
    assert len(layers(model)) == 14 and model.config.quantization_config["kv_cache"]["smooth_scales"] is None
    with pytest.raises(ValueError, match="needs calibration data"):
        tquant.quantize(tiny_model("llama"), "qoq", device="cpu", progress=False)
