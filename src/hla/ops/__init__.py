"""Math of the architecture: one sub-package per op (reference, PyTorch chunked path, kernels)."""
