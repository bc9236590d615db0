"""Mutation testing of the core maths, one file at a time (docs/testing.md).

    python tests/mutation.py tquant/formats/quantizer.py        # run that file's mutants, then print its scores
    python tests/mutation.py --scores                           # the table of every file, nothing run
    python tests/mutation.py --survivors tquant/formats/nuq.py  # the diff of each surviving mutant

Needs mutmut 3 (`pip install -e .[mutation]`). Each file runs in its own folder .mutation/<file>/ (git-ignored; delete
it to start afresh) with pyproject.toml's [tool.mutmut] settings, that file as the only one mutated and TESTS[file] as
the only tests a mutant may run (mutmut runs, of those, the ones that call the mutated function). Mutants run one at a
time under nice with one torch thread. Verdicts are cached: a rerun tries only mutants whose function changed, or all
of them again with --again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the fast tests (seconds in all) that cover each file; missing files are left out
_KV_CACHE = "tests/kv/test_kv_cache.py::"
_KVQUANT = "tests/methods/test_kvquant.py::"
_WA = "tests/methods/test_weight_activation.py::"
_QUIP = "tests/methods/test_quip_sharp.py::"
_KVQ_ATTN = "tests/kv/test_kernels_kvquant_attention.py::"
TESTS = {
    "tquant/formats/quantizer.py": ["tests/formats/test_quantizer.py", "tests/formats/test_quantizer_maths.py"],
    "tquant/formats/packing.py": ["tests/formats/test_quantizer.py", "tests/formats/test_packing.py"],
    "tquant/formats/hadamard.py": ["tests/formats/test_hadamard.py"],
    "tquant/formats/nuq.py": ["tests/formats/test_nuq.py",
                              _KVQUANT + "test_nuq_beats_a_uniform_grid_on_heavy_tailed_data",
                              _KVQUANT + "test_fisher_weights_pull_centroids_toward_heavily_weighted_points"],
    "tquant/kv/uniform_format.py": ["tests/kv/test_uniform_format.py",
                                    _KV_CACHE + "test_kv_formats_round_trip_within_half_a_step",
                                    _KV_CACHE + "test_kv_keys_are_grouped_per_channel_values_per_token",
                                    _KV_CACHE + "test_kv_formats_bad_input_raises"],
    "tquant/methods/gptq.py": ["tests/methods/test_gptq.py", "tests/methods/test_gptq_maths.py"],
    "tquant/calib/smoothing.py": ["tests/calib/test_smoothing.py",
                                  _WA + "test_smoothing_keeps_the_float_model_exact",
                                  _WA + "test_gqa_v_proj_absorbs_o_projs_tied_scale",
                                  _WA + "test_absorber_is_not_fooled_by_a_saturated_silu_gate",
                                  _WA + "test_smoothquant_static_scales_and_runtime_smoothing"],
    "tquant/formats/e8p_codebook.py": ["tests/formats/test_e8p_codebook.py",
                                       _QUIP + "test_block_ldlq_beats_nearest_rounding_on_the_proxy",
                                       _QUIP + "test_block_ldlq_buffers_match_the_plain_loop",
                                       "tests/kernels/test_kernels_e8p.py::test_kernels_e8p_reference_layout"],
    "tquant/kv/kvquant_format.py": ["tests/kv/test_kvquant_format.py", "tests/methods/test_kvquant.py",
                                    _KVQ_ATTN + "test_kernels_kvquant_attention_matches_reference",
                                    _KVQ_ATTN + "test_kernels_kvquant_attention_outliers_change_the_output_as_the_"
                                                "reference_says",
                                    _KVQ_ATTN + "test_kernels_kvquant_attention_bad_input_raises"],
}
STATUS = {0: "survived", 1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
          255: "timeout", 5: "no tests", 33: "no tests", None: "not run"}


def workdir(path: str) -> Path:
    return ROOT / ".mutation" / Path(path).stem


def _toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def prepare(path: str) -> Path:
    """The folder of one file's run: links to tquant/, tests/ and autotune_cache/, and a pyproject.toml holding the
    repository's [tool.mutmut] narrowed to that file and its tests (and its pytest settings)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    settings = dict(project["tool"]["mutmut"], only_mutate=[path],
                    pytest_add_cli_args_test_selection=[t for t in TESTS[path] if (ROOT / t.split("::")[0]).exists()])
    lines = ["[tool.mutmut]"]
    for key, value in settings.items():
        lines.append(f"{key} = {_toml_list(value) if isinstance(value, list) else json.dumps(value)}")
    lines.append("\n[tool.pytest.ini_options]")
    for key, value in project["tool"]["pytest"]["ini_options"].items():
        lines.append(f"{key} = {_toml_list(value) if isinstance(value, list) else json.dumps(value)}")
    work = workdir(path)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("tquant", "tests", "autotune_cache"):
        if not (work / name).exists():
            (work / name).symlink_to(ROOT / name)
    config = "\n".join(lines) + "\n"
    if not (work / "pyproject.toml").exists() or (work / "pyproject.toml").read_text() != config:
        (work / "pyproject.toml").write_text(config)
    return work


def verdicts(path: str) -> dict[str, str]:
    meta = workdir(path) / "mutants" / (path + ".meta")
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: STATUS.get(code, f"other ({code})") for name, code in codes.items()}


def scores(paths: list[str]) -> None:
    """One row per file; the score counts mutants no selected test reaches as survivors."""
    print("| file | mutants | killed | survived | timeout | no tests | not run | score |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in paths:
        c = Counter(verdicts(path).values())
        tried = c["killed"] + c["survived"] + c["timeout"] + c["no tests"]
        score = f"{100 * (c['killed'] + c['timeout']) / tried:.1f} %" if tried else "-"
        print(f"| {path} | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['timeout']} | {c['no tests']} | "
              f"{c['not run']} | {score} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help=f"files to mutate (default: all of {list(TESTS)})")
    parser.add_argument("--scores", action="store_true", help="print the table only, run nothing")
    parser.add_argument("--survivors", action="store_true", help="show each surviving mutant's diff, run nothing")
    parser.add_argument("--again", action="store_true", help="forget the cached verdicts (and mutants) first")
    parser.add_argument("--mutants", nargs="+", default=[], metavar="NAME",
                        help="(re)run only these mutants of the one file given (names as --survivors prints them)")
    args = parser.parse_args()
    files = args.files or list(TESTS)
    unknown = [f for f in files if f not in TESTS]
    if unknown:
        parser.error(f"no tests are listed for {unknown}; known: {list(TESTS)}")
    if args.mutants and len(files) != 1:
        parser.error("--mutants needs exactly one file")
    if shutil.which("mutmut") is None and not args.scores:
        parser.error("mutmut is not installed: pip install -e .[mutation]")
    for path in files:
        if args.survivors:
            for name, status in sorted(verdicts(path).items()):
                if status in ("survived", "no tests"):
                    print(f"# {status}")
                    subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=workdir(path), check=False)
        elif not args.scores:
            if args.again:
                shutil.rmtree(workdir(path) / "mutants", ignore_errors=True)
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRITON_INTERPRET="1")
            subprocess.run(["nice", "-n", "10", sys.executable, "-m", "mutmut", "run", "--max-children", "1",
                            *args.mutants], cwd=prepare(path), env=env, check=False)
    if not args.survivors:
        scores(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
