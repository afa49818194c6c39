"""Numba CPU kernels. Each public kernel has a plain NumPy ``*_ref`` twin in the same module."""
