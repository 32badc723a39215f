"""Optional CUDA kernels, compiled on first use with ``torch.utils.cpp_extension.load`` (never at install).

Each kernel has a torch fallback with the same signature; a wrapper dispatches to the kernel only for CUDA
tensors and only when it builds, so CPU machines never need a compiler or nvcc.
"""
