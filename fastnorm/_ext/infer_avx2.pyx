# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""fastnorm._ext.infer compiled with -mavx2 -mfma (see infer.pyx); loaded only on CPUs
that support both."""
include "_infer.pxi"
