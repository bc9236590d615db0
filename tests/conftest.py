import os

import pytest

# Run Triton kernels on the CPU interpreter unless told otherwise (TRITON_INTERPRET=0 on a GPU machine).
# Triton reads this when a kernel is decorated, so it is set before any test module imports tquant.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers share the machine's cores, and torch gives every process one intra-op thread per core: with
# -n 2 on 2 cores that is 4 OpenMP threads spinning on 2 cores, which made the CPU tests of the methods 7x slower
# (109 s against 15 s for test_awq, test_quip_sharp and test_abq). Each worker (and the subprocesses its tests start,
# through OMP_NUM_THREADS) takes its share of the cores instead.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="the full tier: also the tests marked slow (the real offline model, long interpreter runs)")


def pytest_collection_modifyitems(config, items):
    """The default tier leaves out the tests marked slow; --full (what CI runs) keeps them."""
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="slow tier: run with --full")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
