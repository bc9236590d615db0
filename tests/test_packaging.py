"""The wheel: built from a copy of the sources, pure Python, every subpackage and the shipped tuned kernel configs in
it, installable into a fresh venv with no compiler and no index, and importable from outside the repository."""
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["tquant", "tquant.calib", "tquant.formats", "tquant.kernels", "tquant.kv", "tquant.methods", "tquant.streaming",
               "tquant.modules", "tquant.tools"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the package's files (the checkout gets no build/ or egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("tquant", "autotune_cache"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    (found,) = (tmp / "dist").glob("*.whl")
    return found


def test_the_distribution_name_is_not_the_other_tquant():
    """`tquant` on PyPI is an unrelated package; this one is tquant-triton (and imports as tquant)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "tquant-triton"
    assert project["scripts"] == {"tquant": "tquant.cli:main"}
    assert 'pip install tquant-triton' in (ROOT / "README.md").read_text()


def test_wheel_is_pure_python_with_every_subpackage_and_the_configs(wheel):
    assert wheel.name == "tquant_triton-0.1.0-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    compiled = [n for n in names if n.endswith((".so", ".pyd", ".dll", ".dylib", ".c", ".pyc"))]
    assert not compiled
    packages = {str(p.parent.relative_to(ROOT)).replace(os.sep, ".") for p in (ROOT / "tquant").rglob("__init__.py")}
    assert set(SUBPACKAGES) <= packages
    sources = {str(p.relative_to(ROOT)).replace(os.sep, "/") for p in (ROOT / "tquant").rglob("*.py")}
    assert sources <= set(names), f"left out of the wheel: {sorted(sources - set(names))}"  # a new subpackage
    configs = {f"tquant/autotune_cache/{p.name}" for p in (ROOT / "autotune_cache").glob("*.json")}
    assert configs and configs <= set(names)
    metadata = zipfile.ZipFile(wheel).read("tquant_triton-0.1.0.dist-info/METADATA").decode()
    assert "Name: tquant-triton" in metadata


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (seeing this Python's packages: torch etc. are not reinstalled) with the wheel installed from
    the file alone: no index, no dependencies, no build step."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True, text=True)
    return path


def run_outside(venv: Path, *args, cwd) -> str:
    """A command of the venv, run from a folder outside the repository (the checkout must not be imported)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, check=True,
                          capture_output=True, text=True).stdout


def test_installed_wheel_runs_the_command(venv, tmp_path):
    out = run_outside(venv, "python", "-c", "import sys, tquant, tquant.cli; print(tquant.__file__); "
                      "print(sorted({'torch', 'transformers', 'triton'} & set(sys.modules)))", cwd=tmp_path)
    where, heavy = out.splitlines()
    assert Path(where).is_relative_to(venv) and heavy == "[]"
    assert "quantize" in run_outside(venv, "tquant", "--help", cwd=tmp_path)


@pytest.mark.slow
def test_installed_wheel_runs_the_demos_imports(venv, tmp_path):
    """What `tquant demo` and the quickstart import, and the shipped configs found in the installed package."""
    out = run_outside(venv, "python", "-c", """
import tquant, tquant.cli
from tquant.cli import greedy_answer
from tquant.models import load_model, model_bytes
from tquant.tools.eval import perplexity
from tquant.kernels.autotune_cache import SHIPPED_DIR
assert callable(tquant.quantize) and callable(tquant.save) and callable(tquant.load) and 'gptq' in tquant.methods()
print(SHIPPED_DIR)
print(sorted(p.name for p in SHIPPED_DIR.glob('*.json')))
""", cwd=tmp_path)
    shipped, configs = out.splitlines()
    assert Path(shipped) == venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / \
        "tquant" / "autotune_cache"
    assert configs == str(sorted(p.name for p in (ROOT / "autotune_cache").glob("*.json")))
