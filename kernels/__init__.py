"""Triton kernels of fastdiff, one file per op (installed as the subpackage fastdiff.kernels).

Importing this package needs Triton; fastdiff.backends decides whether it can be used."""
