"""The CUDA backend of paca (entry point ``cuda`` in the ``paca.backends`` group).

Importing this package does not touch the GPU or import Triton; both happen on first use.
"""

from paca_cuda.backend import CUDABackend

__all__ = ["CUDABackend"]
