"""The ``torch`` backend: sparse, chunked PyTorch for CPUs and GPUs without Triton.

Ops not defined here fall back to :mod:`fastsae.ops._reference`.
"""
