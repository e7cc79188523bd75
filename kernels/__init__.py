"""Compute kernels: Triton kernels for CUDA, each beside its pure-torch reference and CPU path.

A leaf package: it imports only torch (and triton, lazily, on CUDA).
"""
