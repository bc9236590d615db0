import os

import pytest

# Run Triton kernels on the CPU interpreter unless told otherwise (TRITON_INTERPRET=0 on a GPU machine).
# Triton reads this when a kernel is decorated, so it is set before any test module imports tquant.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")


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
