# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""The Cython kernels compiled with -mavx2 -mfma (see kernels.pyx); loaded only on CPUs
that support both."""
include "_kernels.pxi"
