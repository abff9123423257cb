# Winograd F(2x2, 3x3) for the 3x3 convolutions of stride 1 and padding 1 with an even
# output (included by _infer.pxi; BLAS from set_gemm).  Per 2x2 output tile and channel,
# the 4x4 input patch d becomes V = B^T d B, the kernel g of each (out, in) channel pair
# U = G g G^T (``wino_kernels``), and for each of the 16 positions xi of the 4x4 tile
# one product M[xi] = V[xi] (tiles x C) @ U[xi] (C x O); the output tile is A^T M A.
# 16 multiplications per tile and channel pair instead of 36, at the price of the
# transforms (adds only):
#     B^T = [1  0 -1  0]      G = [ 1    0    0 ]      A^T = [1  1  1  0]
#           [0  1  1  0]          [1/2  1/2  1/2]            [0  1 -1 -1]
#           [0 -1  1  0]          [1/2 -1/2  1/2]
#           [0  1  0 -1]          [ 0    0    1 ]
# The backward is the adjoint of each step: dM = A dY A^T, dV[xi] = dM[xi] @ U[xi]^T,
# dd = B dV B^T added into the input gradient (the patches of neighbouring tiles
# overlap), dU[xi] = V[xi]^T @ dM[xi] and dg = G^T dU G (``wino_kernel_grad``).
#
# The samples go in groups of about WINO_TILES tiles, one work item each, in one
# parallel region per pass: a group's transforms run sample by sample on C-contiguous
# channel vectors (an NCHW sample is first transposed into the thread's buffer), its
# 16 products are BLAS calls on the thread.  The groups depend on the shape only and
# each writes its own outputs (the weight gradient: a partial sum per group, added in
# order by the caller), so the values do not depend on the thread count.

cdef enum:
    WINO_TILES = 64  # tiles per group of samples (64 per product: as fast as 512 here)
    # values between the 16 matrices of a group beyond their own: with T*C a multiple of
    # 4 KB, the transforms' 16 streams fell into one set of the L1 cache (their loops
    # took 3x as long as the 16 products)
    WINO_PAD = 16


cdef inline Py_ssize_t _wino_per_group(Py_ssize_t tiles) noexcept nogil:
    """Samples per group of a sample of ``tiles`` tiles."""
    return max(1, WINO_TILES // tiles)


def wino_groups(Py_ssize_t N, Py_ssize_t H, Py_ssize_t W):
    """The number of sample groups of an (N, H, W) output: the weight gradient's partial
    sums."""
    cdef Py_ssize_t per = _wino_per_group((H // 2) * (W // 2))
    return (N + per - 1) // per


cdef int _wino_pad_sample(const real* x, real* P, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                          Py_ssize_t sC, Py_ssize_t sH, Py_ssize_t sW) noexcept nogil:
    """The sample into the interior of P, (H+2) x (W+2) x C channel-last (its border
    zeroed by the caller once).  Returns 1 when the sample holds a value that is not
    finite, else 0."""
    cdef Py_ssize_t h, w, c
    cdef real* row
    cdef real v
    cdef int bad = 0
    for h in range(H):
        row = P + ((h + 1) * (W + 2) + 1) * C
        if sC == 1:
            for w in range(W):
                for c in range(C):
                    v = x[h * sH + w * sW + c]
                    row[w * C + c] = v
                    bad |= _nonfinite(v)
        elif sW == 1:  # channel planes: a transpose
            _transpose(x + h * sH, sC, row, C, C, W)
            for w in range(W * C):
                bad |= _nonfinite(row[w])
        else:  # stores in order, loads strided: stores out of order were 3x as slow
            for w in range(W):
                for c in range(C):
                    v = x[c * sC + h * sH + w * sW]
                    row[w * C + c] = v
                    bad |= _nonfinite(v)
    return bad


cdef extern from "_wino.h" nogil:
    void fn_wino_input_f32(const float* P, float* V, Py_ssize_t C, Py_ssize_t H,
                           Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TC)
    void fn_wino_input_f64(const double* P, double* V, Py_ssize_t C, Py_ssize_t H,
                           Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TC)
    void fn_wino_output_f32(const float* M, float* Y, Py_ssize_t O, Py_ssize_t H,
                            Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TO)
    void fn_wino_output_f64(const double* M, double* Y, Py_ssize_t O, Py_ssize_t H,
                            Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TO)
    int fn_nonfinite_f32(float v)
    int fn_nonfinite_f64(double v)
    void fn_transpose_f32(const float* src, Py_ssize_t ls, float* dst, Py_ssize_t ld,
                          Py_ssize_t R, Py_ssize_t K)
    void fn_transpose_f64(const double* src, Py_ssize_t ls, double* dst, Py_ssize_t ld,
                          Py_ssize_t R, Py_ssize_t K)
    int fn_wino_grad_output_f32(const float* D, float* dM, Py_ssize_t O, Py_ssize_t H,
                                 Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TO)
    int fn_wino_grad_output_f64(const double* D, double* dM, Py_ssize_t O, Py_ssize_t H,
                                 Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TO)
    void fn_wino_grad_input_f32(const float* dV, float* P, Py_ssize_t C, Py_ssize_t H,
                                Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TC)
    void fn_wino_grad_input_f64(const double* dV, double* P, Py_ssize_t C, Py_ssize_t H,
                                Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TC)


cdef inline void _wino_input(const real* P, real* V, Py_ssize_t C, Py_ssize_t H,
                             Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TC) noexcept nogil:
    if real is float:
        fn_wino_input_f32(P, V, C, H, W, t0, TC)
    else:
        fn_wino_input_f64(P, V, C, H, W, t0, TC)


cdef inline void _wino_output(const real* M, real* Y, Py_ssize_t O, Py_ssize_t H,
                              Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TO) noexcept nogil:
    if real is float:
        fn_wino_output_f32(M, Y, O, H, W, t0, TO)
    else:
        fn_wino_output_f64(M, Y, O, H, W, t0, TO)


cdef inline int _nonfinite(real v) noexcept nogil:
    if real is float:
        return fn_nonfinite_f32(v)
    else:
        return fn_nonfinite_f64(v)


cdef inline int _wino_grad_output(const real* D, real* dM, Py_ssize_t O, Py_ssize_t H,
                                  Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TO) noexcept nogil:
    """dM of a sample; returns 1 when D holds a value that is not finite, else 0."""
    if real is float:
        return fn_wino_grad_output_f32(D, dM, O, H, W, t0, TO)
    else:
        return fn_wino_grad_output_f64(D, dM, O, H, W, t0, TO)


cdef inline void _wino_grad_input(const real* dV, real* P, Py_ssize_t C, Py_ssize_t H,
                                  Py_ssize_t W, Py_ssize_t t0, Py_ssize_t TC) noexcept nogil:
    if real is float:
        fn_wino_grad_input_f32(dV, P, C, H, W, t0, TC)
    else:
        fn_wino_grad_input_f64(dV, P, C, H, W, t0, TC)


cdef inline void _transpose(const real* src, Py_ssize_t ls, real* dst, Py_ssize_t ld,
                            Py_ssize_t R, Py_ssize_t K) noexcept nogil:
    """dst[j * ld + i] = src[i * ls + j] for i < R, j < K."""
    if real is float:
        fn_transpose_f32(src, ls, dst, ld, R, K)
    else:
        fn_transpose_f64(src, ls, dst, ld, R, K)


cdef inline void _to_channels_last(const real* x, real* out, Py_ssize_t C, Py_ssize_t HW,
                                   Py_ssize_t sC) noexcept nogil:
    """out (HW x C) from a channel-planar sample x (C planes of HW values, sC apart)."""
    _transpose(x, sC, out, C, C, HW)


cdef inline void _to_planes(const real* x, real* out, Py_ssize_t C, Py_ssize_t HW) noexcept nogil:
    """out (C planes of HW values) from a channel-last sample x (HW x C)."""
    _transpose(x, C, out, HW, HW, C)


def sample_transpose(cnp.ndarray x, cnp.ndarray out, Py_ssize_t R, Py_ssize_t K):
    """out[n] = x[n]^T for each sample n: x read as (N, R, K), out written (N, K, R), both
    C-contiguous of one float dtype and size (the channels-first flatten of a
    channels-last tensor, ``ops.FlattenChannelsFirst``, and its gradient).  One thread:
    NumPy's strided copy took ~15 us for the digits CNN's (32, 4*4, 32)."""
    cdef int kind = _kind(x)
    cdef Py_ssize_t n = _same_size(x, x, "x")
    _same_size(out, x, "out")
    if not cnp.PyArray_ISWRITEABLE(out):
        raise ValueError("out: expected a writable array")
    if R < 0 or K < 0 or (n and (R * K == 0 or n % (R * K))):
        raise ValueError(f"R, K: expected sizes whose product divides {n}, got {R} and {K}")
    if n == 0:
        return
    cdef char* xp = <char*>cnp.PyArray_DATA(x)
    cdef char* op = <char*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t step = R * K * cnp.PyArray_ITEMSIZE(x), i
    with nogil:
        for i in range(n // (R * K)):
            if kind == 0:
                _transpose(<const float*>(xp + i * step), K, <float*>(op + i * step), R, R, K)
            else:
                _transpose(<const double*>(xp + i * step), K, <double*>(op + i * step), R,
                           R, K)


cdef bint _wino_forward_group(const real* x, const real* U, real* V, real* y, real* buf,
                              int kind, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t C,
                              Py_ssize_t O, Py_ssize_t H, Py_ssize_t W, Py_ssize_t sN,
                              Py_ssize_t sC, Py_ssize_t sH, Py_ssize_t sW,
                              bint nhwc) noexcept nogil:
    """Samples [n0, n1): V (the group's 16 x tiles x C, kept for the weight gradient),
    the 16 products, y.  ``buf``: the padded sample ((H+2)(W+2)C, border zero), then
    M (16 x tiles x O), then an NCHW sample's channel-last output (H W O).  False, at
    once, when an input value is not finite (the transforms would turn an inf into NaNs
    where the direct sum gives inf: the caller computes such inputs by im2col)."""
    cdef Py_ssize_t tps = (H // 2) * (W // 2)
    cdef Py_ssize_t T = (n1 - n0) * tps
    cdef real* P = buf
    cdef real* M = P + (H + 2) * (W + 2) * C
    cdef Py_ssize_t TCp = T * C + WINO_PAD, TOp = T * O + WINO_PAD
    cdef real* Yc = M + 16 * TOp
    cdef Py_ssize_t n, xi
    for n in range(n0, n1):
        if _wino_pad_sample(x + n * sN, P, C, H, W, sC, sH, sW) != 0:
            return False
        _wino_input(P, V, C, H, W, (n - n0) * tps, TCp)
    for xi in range(16):
        _mm(kind, False, False, <int>T, <int>O, <int>C, <char*>(V + xi * TCp),
            <char*>(U + xi * C * O), <char*>(M + xi * TOp), False)
    for n in range(n0, n1):
        if nhwc:
            _wino_output(M, y + n * H * W * O, O, H, W, (n - n0) * tps, TOp)
        else:
            _wino_output(M, Yc, O, H, W, (n - n0) * tps, TOp)
            _to_planes(Yc, y + n * O * H * W, O, H * W)
    return True


cdef bint _wino_backward_group(const real* g, const real* U, const real* V, real* dx,
                               real* dU, real* buf, int kind, Py_ssize_t n0, Py_ssize_t n1,
                               Py_ssize_t C, Py_ssize_t O, Py_ssize_t H, Py_ssize_t W,
                               bint nhwc) noexcept nogil:
    """Samples [n0, n1): dM from the output gradient g, then with ``dx`` the input
    gradient (dV = dM @ U^T per xi, scattered back) and with ``dU`` the group's partial
    weight gradient (V^T @ dM per xi, 16 x C x O).  ``buf``: dM (16 x tiles x O), dV
    (16 x tiles x C), the padded sample gradient ((H+2)(W+2)C), an NCHW sample's
    channel-last output gradient (H W O).  False, at once, when a value of g is not
    finite (see _wino_forward_group)."""
    cdef Py_ssize_t tps = (H // 2) * (W // 2)
    cdef Py_ssize_t T = (n1 - n0) * tps
    cdef Py_ssize_t HW = H * W
    cdef real* dM = buf
    cdef Py_ssize_t TCp = T * C + WINO_PAD, TOp = T * O + WINO_PAD
    cdef real* dV = dM + 16 * TOp
    cdef real* P = dV + 16 * TCp
    cdef real* Dc = P + (H + 2) * (W + 2) * C
    cdef Py_ssize_t n, xi, i, h
    for n in range(n0, n1):
        if nhwc:
            if _wino_grad_output(g + n * HW * O, dM, O, H, W, (n - n0) * tps, TOp) != 0:
                return False
        else:
            _to_channels_last(g + n * O * HW, Dc, O, HW, HW)
            if _wino_grad_output(Dc, dM, O, H, W, (n - n0) * tps, TOp) != 0:
                return False
    if dU != NULL:
        for xi in range(16):
            _mm(kind, True, False, <int>C, <int>O, <int>T, <char*>(V + xi * TCp),
                <char*>(dM + xi * TOp), <char*>(dU + xi * C * O), False)
    if dx == NULL:
        return True
    for xi in range(16):
        _mm(kind, False, True, <int>T, <int>C, <int>O, <char*>(dM + xi * TOp),
            <char*>(U + xi * C * O), <char*>(dV + xi * TCp), False)
    for n in range(n0, n1):
        for i in range((H + 2) * (W + 2) * C):
            P[i] = 0
        _wino_grad_input(dV, P, C, H, W, (n - n0) * tps, TCp)
        if nhwc:
            for h in range(H):
                for i in range(W * C):
                    dx[n * HW * C + h * W * C + i] = P[((h + 1) * (W + 2) + 1) * C + i]
        else:
            for h in range(H):  # each interior row (W x C) into row h of the C planes
                _transpose(P + ((h + 1) * (W + 2) + 1) * C, C, dx + n * C * HW + h * W, HW,
                           W, C)
    return True


cdef inline void _wino_geometry(cnp.ndarray a, bint nhwc, Py_ssize_t* N, Py_ssize_t* C,
                                Py_ssize_t* H, Py_ssize_t* W) except *:
    if cnp.PyArray_NDIM(a) != 4:
        raise ValueError(f"expected a 4-D array, got shape {(<object>a).shape}")
    N[0] = cnp.PyArray_DIMS(a)[0]
    C[0] = cnp.PyArray_DIMS(a)[3 if nhwc else 1]
    H[0] = cnp.PyArray_DIMS(a)[1 if nhwc else 2]
    W[0] = cnp.PyArray_DIMS(a)[2 if nhwc else 3]
    if H[0] % 2 or W[0] % 2 or H[0] < 2 or W[0] < 2:
        raise ValueError(f"expected an even height and width, got shape {(<object>a).shape}")


cdef inline Py_ssize_t _wino_vgroup(Py_ssize_t per, Py_ssize_t tps, Py_ssize_t C) noexcept nogil:
    """Values of V per group of samples."""
    return 16 * (per * tps * C + WINO_PAD)


def wino_forward(cnp.ndarray x not None, cnp.ndarray U not None, cnp.ndarray y not None,
                 bint nhwc, int nthreads=1):
    """y = the 3x3 convolution (stride 1, padding 1) of x (4-D, NCHW or NHWC, any
    strides, even H and W) with the kernels transformed into U (C-contiguous, 16 x C x O:
    ``U[xi, c, o] = (G g[o, c] G^T)[xi]``).  y: C-contiguous, the output (N, O, H, W) or
    (N, H, W, O).  Returns V, the transformed input, for ``wino_backward``; None, y
    then unfinished, when x holds a value that is not finite (an inf would come out as
    NaN through the transforms, where the direct sum gives inf)."""
    if _sgemm == NULL:
        raise RuntimeError("wino_forward: no BLAS set (set_gemm)")
    cdef int kind = _kind(x)
    cdef Py_ssize_t N, C, H, W
    _wino_geometry(x, nhwc, &N, &C, &H, &W)
    cdef Py_ssize_t O = cnp.PyArray_SIZE(U) // (16 * C) if C > 0 else 0
    _check_matrix(U, x, 16 * C, O, "U")
    cdef Py_ssize_t tps = (H // 2) * (W // 2)
    _check_out(y, x, N * O * H * W, "y")
    cdef Py_ssize_t per = _wino_per_group(tps)
    cdef Py_ssize_t ng = (N + per - 1) // per
    cdef Py_ssize_t vgroup = _wino_vgroup(per, tps, C)
    cdef cnp.ndarray V = np.empty(ng * vgroup if C > 0 else 0, x.dtype)  # gaps never read
    if N == 0 or C == 0 or O == 0:
        y[...] = 0
        return V
    if max(per * tps, C, O) > 2147483647:
        raise ValueError("shapes: matrices larger than BLAS's int")
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(x)
    cdef Py_ssize_t s0 = _stride(x, 0), s1 = _stride(x, 3 if nhwc else 1)
    cdef Py_ssize_t s2 = _stride(x, 1 if nhwc else 2), s3 = _stride(x, 2 if nhwc else 3)
    cdef Py_ssize_t nbuf = (H + 2) * (W + 2) * C + 16 * (per * tps * O + WINO_PAD) + H * W * O
    cdef int nt = max(1, min(nthreads, ng))
    cdef char* bufs = <char*>PyMem_RawCalloc(nt * nbuf, isz)  # the padding zero once
    cdef char* ok = <char*>PyMem_RawMalloc(ng)  # per group: its inputs were finite
    if bufs == NULL or ok == NULL:
        PyMem_RawFree(bufs)
        PyMem_RawFree(ok)
        raise MemoryError()
    cdef char* xp = <char*>cnp.PyArray_DATA(x)
    cdef char* up = <char*>cnp.PyArray_DATA(U)
    cdef char* vp = <char*>cnp.PyArray_DATA(V)
    cdef char* yp = <char*>cnp.PyArray_DATA(y)
    cdef Py_ssize_t gi, n0, n1
    for gi in prange(ng, nogil=True, schedule='static', num_threads=nt):
        n0 = gi * per
        n1 = min(N, n0 + per)
        if kind == 0:
            ok[gi] = _wino_forward_group(<const float*>xp, <const float*>up,
                                <float*>vp + gi * vgroup, <float*>yp,
                                <float*>bufs + threadid() * nbuf, kind, n0, n1, C, O, H, W,
                                s0, s1, s2, s3, nhwc)
        else:
            ok[gi] = _wino_forward_group(<const double*>xp, <const double*>up,
                                <double*>vp + gi * vgroup, <double*>yp,
                                <double*>bufs + threadid() * nbuf, kind, n0, n1, C, O, H, W,
                                s0, s1, s2, s3, nhwc)
    PyMem_RawFree(bufs)
    cdef bint finite = True
    for gi in range(ng):
        finite = finite and ok[gi]
    PyMem_RawFree(ok)
    return V if finite else None


def wino_backward(cnp.ndarray g not None, object U, object V, object dx, object dU,
                  bint nhwc, int nthreads=1):
    """The backward of ``wino_forward``: from the output gradient g (C-contiguous, the
    output's shape and layout), the input gradient into ``dx`` (C-contiguous 4-D, the
    input's shape; needs U) and/or the per-group partial sums of the transformed weight
    gradient into ``dU`` (C-contiguous, ``wino_groups(N, H, W)`` x 16 x C x O, to be
    summed over the groups in order; needs the forward's V).  None skips either.
    Returns True; False, the outputs then unfinished, when g holds a value that is not
    finite (see ``wino_forward``)."""
    if _sgemm == NULL:
        raise RuntimeError("wino_backward: no BLAS set (set_gemm)")
    cdef int kind = _kind(g)
    if not cnp.PyArray_IS_C_CONTIGUOUS(g):
        raise ValueError("g: expected a C-contiguous array")
    cdef Py_ssize_t N, O, H, W, C
    _wino_geometry(g, nhwc, &N, &O, &H, &W)
    cdef Py_ssize_t tps = (H // 2) * (W // 2)
    cdef Py_ssize_t per = _wino_per_group(tps)
    cdef Py_ssize_t ng = (N + per - 1) // per
    if dx is not None:
        C = (<object>dx).shape[3 if nhwc else 1] if (<object>dx).ndim == 4 else -1
    elif dU is not None:
        C = (<object>dU).size // (ng * 16 * O) if O > 0 else 0
    else:
        return True
    cdef Py_ssize_t vgroup = _wino_vgroup(per, tps, C)
    cdef char* dxp = NULL
    cdef char* dup = NULL
    cdef char* vp = NULL
    cdef char* up = NULL
    if dx is not None:
        _check_out(dx, g, N * C * H * W, "dx")
        if U is None:
            raise ValueError("U: the transformed kernels are needed for dx")
        _check_matrix(U, g, 16 * C, O, "U")
        dxp = <char*>cnp.PyArray_DATA(dx)
        up = <char*>cnp.PyArray_DATA(U)
    if dU is not None:
        _check_out(dU, g, ng * 16 * C * O, "dU")
        if V is None:
            raise ValueError("V: the forward's transformed input is needed for dU")
        _check_matrix(V, g, ng, vgroup, "V")
        dup = <char*>cnp.PyArray_DATA(dU)
        vp = <char*>cnp.PyArray_DATA(V)
    if N == 0 or C == 0 or O == 0:
        if dx is not None:
            dx[...] = 0
        if dU is not None:
            dU[...] = 0
        return True
    if max(per * tps, C, O) > 2147483647:
        raise ValueError("shapes: matrices larger than BLAS's int")
    cdef Py_ssize_t isz = cnp.PyArray_ITEMSIZE(g)
    cdef Py_ssize_t nbuf = (16 * (per * tps * (O + C) + 2 * WINO_PAD) + (H + 2) * (W + 2) * C
                            + H * W * max(C, O))
    cdef int nt = max(1, min(nthreads, ng))
    cdef char* bufs = <char*>PyMem_RawMalloc(nt * nbuf * isz)
    cdef char* ok = <char*>PyMem_RawMalloc(ng)  # per group: its gradient was finite
    if bufs == NULL or ok == NULL:
        PyMem_RawFree(bufs)
        PyMem_RawFree(ok)
        raise MemoryError()
    cdef char* gp = <char*>cnp.PyArray_DATA(g)
    cdef Py_ssize_t gi, n0, n1
    for gi in prange(ng, nogil=True, schedule='static', num_threads=nt):
        n0 = gi * per
        n1 = min(N, n0 + per)
        if kind == 0:
            ok[gi] = _wino_backward_group(<const float*>gp, <const float*>up,
                                 NULL if vp == NULL else <const float*>vp + gi * vgroup,
                                 <float*>dxp,
                                 NULL if dup == NULL else <float*>dup + gi * 16 * C * O,
                                 <float*>bufs + threadid() * nbuf, kind, n0, n1, C, O, H, W,
                                 nhwc)
        else:
            ok[gi] = _wino_backward_group(<const double*>gp, <const double*>up,
                                 NULL if vp == NULL else <const double*>vp + gi * vgroup,
                                 <double*>dxp,
                                 NULL if dup == NULL else <double*>dup + gi * 16 * C * O,
                                 <double*>bufs + threadid() * nbuf, kind, n0, n1, C, O, H, W,
                                 nhwc)
    PyMem_RawFree(bufs)
    cdef bint finite = True
    for gi in range(ng):
        finite = finite and ok[gi]
    PyMem_RawFree(ok)
    return finite

# ------------------------------------------------------------------ kernel transform ----
cdef inline void _g3(real a, real b, real c, real* out) noexcept nogil:
    """G (a, b, c): (a, (a + b + c) / 2, (a - b + c) / 2, c)."""
    out[0] = a
    out[1] = (a + b + c) * <real>0.5
    out[2] = (a - b + c) * <real>0.5
    out[3] = c


cdef inline void _gt4(real a, real b, real c, real d, real* out) noexcept nogil:
    """G^T (a, b, c, d): (a + (b + c) / 2, (b - c) / 2, d + (b + c) / 2)."""
    out[0] = a + (b + c) * <real>0.5
    out[1] = (b - c) * <real>0.5
    out[2] = d + (b + c) * <real>0.5


cdef void _wino_kernels_loop(const real* w, real* U, Py_ssize_t O, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t o, c, i, j
    cdef real r[12]   # G g: 4 rows of 3
    cdef real q[4]
    cdef const real* g
    for o in range(O):
        for c in range(C):
            g = w + (o * C + c) * 9
            for j in range(3):  # G g, column by column
                _g3(g[j], g[3 + j], g[6 + j], q)
                for i in range(4):
                    r[i * 3 + j] = q[i]
            for i in range(4):  # then (.) G^T, row by row
                _g3(r[i * 3], r[i * 3 + 1], r[i * 3 + 2], q)
                for j in range(4):
                    U[((i * 4 + j) * C + c) * O + o] = q[j]


cdef int _wino_kernel_grad_loop(const real* dU, Py_ssize_t ng, real* dw, Py_ssize_t O,
                                Py_ssize_t C) noexcept nogil:
    """-1 when out of memory."""
    cdef Py_ssize_t o, c, i, j, gi, xi
    cdef Py_ssize_t n = 16 * C * O
    cdef real d[16]
    cdef real r[12]   # G^T dU: 3 rows of 4
    cdef real q[3]
    cdef real* acc = <real*>malloc(n * sizeof(real))
    if acc == NULL:
        return -1
    for i in range(n):  # the groups' partial sums, added in group order (none: zeros)
        acc[i] = dU[i] if ng > 0 else 0
    for gi in range(1, ng):
        for i in range(n):
            acc[i] = acc[i] + dU[gi * n + i]
    for c in range(C):
        for o in range(O):
            for xi in range(16):
                d[xi] = acc[(xi * C + c) * O + o]
            for j in range(4):  # G^T d, column by column
                _gt4(d[j], d[4 + j], d[8 + j], d[12 + j], q)
                for i in range(3):
                    r[i * 4 + j] = q[i]
            for i in range(3):  # then (.) G, row by row
                _gt4(r[i * 4], r[i * 4 + 1], r[i * 4 + 2], r[i * 4 + 3], q)
                for j in range(3):
                    dw[(o * C + c) * 9 + i * 3 + j] = q[j]
    free(acc)
    return 0


def wino_kernels(cnp.ndarray w not None, cnp.ndarray U not None):
    """U[xi, c, o] = (G g G^T)[xi] of each kernel g = w[o, c] (w: C-contiguous (O, C, 3,
    3); U: C-contiguous, 16 * C * O values of w's dtype)."""
    cdef int kind = _kind(w)
    if cnp.PyArray_NDIM(w) != 4 or (<object>w).shape[2:] != (3, 3) \
            or not cnp.PyArray_IS_C_CONTIGUOUS(w):
        raise ValueError(f"w: expected a C-contiguous (O, C, 3, 3) array, got shape "
                         f"{(<object>w).shape}")
    cdef Py_ssize_t O = (<object>w).shape[0], C = (<object>w).shape[1]
    _check_out(U, w, 16 * C * O, "U")
    cdef void* wp = cnp.PyArray_DATA(w)
    cdef void* up = cnp.PyArray_DATA(U)
    with nogil:
        if kind == 0:
            _wino_kernels_loop(<const float*>wp, <float*>up, O, C)
        else:
            _wino_kernels_loop(<const double*>wp, <double*>up, O, C)


def wino_kernel_grad(cnp.ndarray dU not None, cnp.ndarray dw not None):
    """dw[o, c] = G^T (sum over the groups of dU[:, :, c, o]) G: the kernels' gradient
    from ``wino_backward``'s partial sums (C-contiguous (groups, 16, C, O)), the groups
    added in order; dw: C-contiguous (O, C, 3, 3) of dU's dtype."""
    cdef int kind = _kind(dU)
    if cnp.PyArray_NDIM(dU) != 4 or (<object>dU).shape[1] != 16 \
            or not cnp.PyArray_IS_C_CONTIGUOUS(dU):
        raise ValueError(f"dU: expected a C-contiguous (groups, 16, C, O) array, got shape "
                         f"{(<object>dU).shape}")
    cdef Py_ssize_t ng = (<object>dU).shape[0], C = (<object>dU).shape[2]
    cdef Py_ssize_t O = (<object>dU).shape[3]
    if (<object>dw).shape != (O, C, 3, 3):
        raise ValueError(f"dw: expected shape {(O, C, 3, 3)}, got {(<object>dw).shape}")
    _check_out(dw, dU, O * C * 9, "dw")
    cdef void* dp = cnp.PyArray_DATA(dU)
    cdef void* wp = cnp.PyArray_DATA(dw)
    cdef int rc
    with nogil:
        if kind == 0:
            rc = _wino_kernel_grad_loop(<const float*>dp, ng, <float*>wp, O, C)
        else:
            rc = _wino_kernel_grad_loop(<const double*>dp, ng, <double*>wp, O, C)
    if rc < 0:
        raise MemoryError()
