"""Optional CUDA extensions from ``csrc/cuda/*.cu``, built just in time where CUDA exists.

setup.py stays torch-free, so CUDA kernels are compiled on first use by ``torch.utils.cpp_extension.load``
into torch's extension cache (``TORCH_EXTENSIONS_DIR``); concurrent builders wait on torch's file lock.
A failed build warns once and the caller's torch path is used from then on.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Optional

import torch

CSRC_CUDA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc", "cuda")


class JitExtension:
    def __init__(self, name: str, source: str, cuda_flags: tuple[str, ...] = ()):
        """``cuda_flags``: extra nvcc flags; an ``-arch``/``-gencode`` among them replaces torch's own."""
        self.name, self.source = name, os.path.join(CSRC_CUDA, source)
        self.cuda_flags = ["-O3", *cuda_flags]
        self._lock = threading.Lock()
        self._module: Any = None
        self.error: Optional[str] = None

    def load(self, verbose: bool = False) -> Any:
        """The compiled module, or None (no CUDA, no source, or the build failed: see ``error``)."""
        if self._module is not None or self.error is not None:
            return self._module
        with self._lock:
            if self._module is not None or self.error is not None:
                return self._module
            if not torch.cuda.is_available():
                self.error = "CUDA is not available"
                return None
            if not os.path.exists(self.source):
                self.error = f"kernel source not found: {self.source}"
                return None
            try:
                from torch.utils.cpp_extension import load

                self._module = load(name=self.name, sources=[self.source], extra_cuda_cflags=self.cuda_flags,
                                    verbose=verbose)
            except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
                self.error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"{self.name} unavailable, using the torch path ({self.error})", stacklevel=3)
        return self._module
