"""tquant export DIR OUT --format ...: a saved tquant checkpoint becomes a compressed-tensors / GPTQ one that
tquant.load reads back with the same weights."""
import json

import pytest
import torch

import tquant
from tquant.cli import main
from tests.interop.helpers import dequantized, packed_layers, quantized


@pytest.mark.parametrize("fmt,extra,method", [("compressed-tensors", [], "compressed-tensors"),
                                              ("gptq", ["--gptq-format", "v2"], "gptq")])
def test_export_command(tmp_path, capsys, fmt, extra, method):
    model = quantized(bits=4, group_size=32, sym=False)
    tquant.save(model, str(tmp_path / "saved"))
    main(["export", str(tmp_path / "saved"), str(tmp_path / "out"), "--format", fmt, *extra])
    assert f"wrote {fmt} checkpoint" in capsys.readouterr().out
    qc = json.load(open(tmp_path / "out" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == method
    loaded = tquant.load(str(tmp_path / "out"))
    for name, mod in packed_layers(model).items():
        assert torch.equal(dequantized(loaded.get_submodule(name)), dequantized(mod))
    with pytest.raises(SystemExit, match="already holds a checkpoint"):  # no silent overwrite
        main(["export", str(tmp_path / "saved"), str(tmp_path / "out"), "--format", fmt, *extra])
    for mod in packed_layers(model).values():  # v1 (the default) cannot store a zero point of 0
        mod.zeros[0, 0] = 0
    tquant.save(model, str(tmp_path / "zero"))
    with pytest.raises(SystemExit, match=r"zero point of 0 cannot be stored in GPTQ v1"):
        main(["export", str(tmp_path / "zero"), str(tmp_path / "v1"), "--format", "gptq"])
