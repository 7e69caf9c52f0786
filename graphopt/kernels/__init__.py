"""Triton kernels and their torch.library ops (installed as ``graphopt.kernels``).

Triton is imported lazily inside each kernel module, so graphopt works on machines without a GPU.
"""
