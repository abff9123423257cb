# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Small helpers for the inference plans of fused models (``fastnorm/fuse.py``) and the
convolutions of ``fastnorm.ops``.

A batch-1 request of a small CNN is a handful of tiny arrays, where each NumPy call
(~0.5-1 us) and each typed-memoryview argument of a Cython ``def`` (~0.15 us, plus the
fused-type dispatch) costs more than the arithmetic.  So these functions take plain
ndarrays, check dtype, rank, contiguity and sizes themselves, and run loops with the GIL
released: single-threaded by default (requests are parallel across Python threads), the
samples of a batch on ``nthreads`` OpenMP threads where a function takes it (training):

- ``im2col(x, cols, kernel, stride, padding, nhwc, nthreads=1)``: the column matrix of a 2-D
  convolution, zeros for the padding, from an input of any strides (a view of the
  previous layer's output is read in place): NCHW ``(N, C*kH*kW, Ho*Wo)``, NHWC
  ``(N*Ho*Wo, kH*kW*C)``, the layouts of ``ops.conv2d``'s im2col.
- ``relu(x, out, nthreads=1)``, ``relu_backward(grad, out, gx, nthreads=1)``: the ReLU
  op's passes for C-contiguous arrays, with PyTorch's semantics (NumPy's ``maximum`` with
  a scalar took 5x a copy).
- ``bias_relu(y, bias, inner, relu)``: ``y += bias`` per channel and optionally ReLU, in
  place, for a C-contiguous ``y`` read as ``(outer, C, inner)``.
- ``max_pool(x, out, kernel, stride, padding, nhwc)``: max pooling with the semantics of
  ``ops.max_pool2d`` (padding never wins, a NaN in a window gives NaN).
- ``col2im(cols, gx, kernel, stride, padding, nhwc, nthreads=1)``: im2col's adjoint.
- ``batched_matmul(a, b, out, ta, tb, nthreads=1)``: a BLAS product per sample, the
  samples on the threads (BLAS's sgemm/dgemm from ``set_gemm``).
- ``conv_forward``, ``conv_backward``: a convolution's im2col, products and col2im
  sample by sample in one parallel region per pass.
- ``sample_transpose(x, out, R, K)``: each sample's (R, K) matrix transposed (the
  channels-first flatten of a channels-last tensor).
- ``wino_forward``, ``wino_backward``: 3x3 convolutions of stride 1 and padding 1 by
  Winograd F(2x2, 3x3) (``_wino.pxi``, transforms in ``_wino.h``).

Apart from the products (BLAS's arithmetic) and Winograd's transforms (adds in a fixed
order), no arithmetic beyond one add per value and comparisons, so results are exactly
those of the NumPy code they replace whatever the compiler flags.

``infer_avx2`` is this module built with -mavx2 -mfma (``fastnorm._backend.infer_module``
loads it on CPUs that have both): the copies and selects of im2col, col2im, ReLU and
pooling run on 256-bit vectors ((32,8,8,16) NHWC im2col 30 -> 16 us).
"""
include "_infer.pxi"
