import os

# Run Triton kernels on the CPU interpreter unless told otherwise (TRITON_INTERPRET=0 on a GPU machine).
# Triton reads this when a kernel is decorated, so it is set before any test module imports tquant.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
