"""Driver shared by the compiled backends (Numba and Cython): picks a kernel shape for a
canonical view, splits the work, merges partial sums.  The kernel modules mirror each
other, so one driver serves both.

Two kernel shapes cover every normalization and layout:

- *segments* (``Ks > 1`` or ``M == 1``): a group is M contiguous runs of ``Kc*Ks`` values.
  One task per group computes the group's sums and then applies the affine while the
  group is still in cache, so x is read from memory about once.  When there are few, large
  groups (BatchNorm with fewer channels than threads, LayerNorm of one long row), each
  group is split into parts whose partial sums are merged, then applied in a second pass.
- *columns* (``M > 1`` and ``Ks == 1``, the channels-last layouts; or ``Ks > 1`` with at
  least ``RUN_COLUMNS_MIN_ELEMENTS`` values, large BatchNorm NCHW inputs): x is
  ``(P, M, W, Ks)``, a column being a run of Ks values per row; row blocks read x in
  memory order and accumulate per-column sums in their own float64 buffers, merged in a
  fixed order, then one more pass applies per-column coefficients.  (A group of strided
  runs read group by group defeats the prefetchers: (256,32,28,28) sums took 1.3 ms
  against 0.43 ms in memory order.)

Work is split by problem size only (see _config), so results do not depend on the thread
count.
"""
import numpy as np

from .. import _config

_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32),
          np.dtype(np.float64): np.empty(0, np.float64)}


def _cdiv(a, b):
    return -(-a // b)


class CompiledBackend:
    def __init__(self, name, kernels):
        self.name = name
        self.k = kernels
        # whole passes in one call (Cython modules; see train_fused)
        self._forward_fused = getattr(kernels, "forward_fused", None)
        self._backward_fused = getattr(kernels, "backward_fused", None)
        self._apply_fused = getattr(kernels, "apply_fused", None)
        if hasattr(kernels, "stream_min_bytes"):  # Cython: streaming stores for large outputs
            kernels.stream_min_bytes(_config.STREAM_MIN_BYTES)
        # Each norm in one call from its user-facing arguments
        # (Cython; fastnorm.norms tries them first, see _kernels.pxi), with this driver's
        # split thresholds
        self.bn_train = getattr(kernels, "bn_train", None)
        self.bn_eval = getattr(kernels, "bn_eval", None)
        self.bn_backward = getattr(kernels, "bn_backward", None)
        self.row_train = getattr(kernels, "row_train", None)
        self.row_backward = getattr(kernels, "row_backward", None)
        self.group_train = getattr(kernels, "group_train", None)
        self.group_backward = getattr(kernels, "group_backward", None)
        if hasattr(kernels, "configure"):
            kernels.configure(_config.PARALLEL_MIN_ELEMENTS, _config.RUN_COLUMNS_MIN_ELEMENTS,
                              _config.MIN_CHUNK_ELEMENTS, _config.MAX_CHUNKS,
                              _config.SPLIT_UNITS_BELOW, _config.SPLIT_MIN_ELEMENTS)

    # -- helpers -------------------------------------------------------------------------
    def _threads(self, size):
        """Threads for a pass over ``size`` values: one below PARALLEL_MIN_ELEMENTS, where
        waking a thread team costs more than it saves (and far more on a busy machine)."""
        n = 1 if size < _config.PARALLEL_MIN_ELEMENTS else _config.get_num_threads()
        self.k.prepare(n)
        return n

    @staticmethod
    def _flat_param(p, dtype):
        return _EMPTY[np.dtype(dtype)] if p is None else p

    @staticmethod
    def _is_columns(dims):
        P, M, G, Kc, Ks = dims
        return M > 1 and (Ks == 1 or P * M * G * Kc * Ks >= _config.RUN_COLUMNS_MIN_ELEMENTS)

    @staticmethod
    def _nparts(dims):
        """How many parts each group of the segment shape is split into (1: none)."""
        P, M, G, Kc, Ks = dims
        n = M * Kc * Ks
        if P * G >= _config.SPLIT_UNITS_BELOW or n < _config.SPLIT_MIN_ELEMENTS:
            return 1
        return max(1, min(_config.MAX_CHUNKS // (P * G), n // _config.MIN_CHUNK_ELEMENTS))

    @staticmethod
    def _row_blocks(P, M, W):
        """Row blocks per p for the column shape: an even number above one, so that two
        threads take as many (not the thread count: the blocks fix the summation order,
        the same for any count).  (8,14,14,256) NHWC forward+backward, 2 threads, 25
        blocks -> 26: 144-149 -> 141-144 us (one process, alternating, 300 rounds, twice)."""
        per_p = _cdiv(M * W, _config.MIN_CHUNK_ELEMENTS)
        per_p += per_p & 1 if per_p > 1 else 0
        return max(1, min(M, per_p, _cdiv(_config.MAX_CHUNKS, P)))

    # -- the backend interface (see fastnorm.kernels) -------------------------------------
    def forward(self, x, dims, weight, bias, eps, center, y):
        P, M, G, Kc, Ks = dims
        if not self._is_columns(dims) and self._nparts(dims) == 1:
            nt = self._threads(x.size)  # fused: each group summed and applied while in cache
            mean = np.empty(P * G)
            var = np.empty(P * G)
            self.k.seg_forward(x.reshape(-1), P, M, G, Kc, Ks, self._flat_param(weight, x.dtype),
                               self._flat_param(bias, x.dtype), float(eps), bool(center),
                               y.reshape(-1), mean, var, nt)
            return mean, var
        mean, var = self.moments(x, dims, center)
        self.apply(x, dims, mean, 1.0 / np.sqrt(var + eps), weight, bias, y)
        return mean, var

    def moments(self, x, dims, center):
        """Mean and biased variance (mean square without ``center``) per group."""
        nt = self._threads(x.size)
        P, M, G, Kc, Ks = dims
        xf = x.reshape(-1)
        if self._is_columns(dims):
            W = G * Kc
            nch = self._nch(dims)
            if center:  # one value of each group (its first row) as the shift
                gshift = x.reshape(P, M, G, Kc, Ks)[:, 0, :, 0, 0].astype(np.float64)
            else:
                gshift = np.zeros((P, G))
            shift = np.repeat(gshift, Kc, axis=1).reshape(-1)
            s1 = np.empty(P * nch * W)
            s2 = np.empty(P * nch * W)
            self.k.col_sums(xf, P, M, W, Ks, nch, shift, s1, s2, nt)
            s1 = s1.reshape(P, nch, G, Kc).sum(axis=(1, 3)).reshape(-1)
            s2 = s2.reshape(P, nch, G, Kc).sum(axis=(1, 3)).reshape(-1)
            return self._moments(s1, s2, gshift.reshape(-1), M * Kc * Ks, center)
        nparts = self._nparts(dims)
        if center:
            shift = x.reshape(P, M, G, Kc * Ks)[:, 0, :, 0].astype(np.float64).reshape(-1)
        else:
            shift = np.zeros(P * G)
        s1 = np.empty(P * G * nparts)
        s2 = np.empty(P * G * nparts)
        self.k.seg_sums(xf, P, M, G, Kc, Ks, nparts, shift, s1, s2, nt)
        return self._moments(s1.reshape(-1, nparts).sum(1), s2.reshape(-1, nparts).sum(1),
                             shift, M * Kc * Ks, center)

    @staticmethod
    def _moments(s1, s2, shift, n, center):
        """Mean and biased variance from sums of d = x - shift and d*d."""
        if not center:
            return np.zeros_like(s1), s2 / n
        d = s1 / n
        var = np.maximum(s2 / n - d * d, 0.0)
        return d + shift, var

    @staticmethod
    def _coefficients(mean, invstd, weight, bias, P, G, Kc):
        """Per (p, channel) alpha, beta with y = x * alpha + beta, as flat float64."""
        a = np.broadcast_to(invstd.reshape(P, G, 1), (P, G, Kc))
        if weight is not None:
            a = a * weight.astype(np.float64).reshape(1, G, Kc)
        b = -mean.reshape(P, G, 1) * a
        if bias is not None:
            b = b + bias.astype(np.float64).reshape(1, G, Kc)
        return np.ascontiguousarray(a, np.float64).reshape(-1), np.ascontiguousarray(b).reshape(-1)

    def _nch(self, dims):
        """Row blocks per p of the column shape (1 for segments), as the general path
        splits the work."""
        P, M, G, Kc, Ks = dims
        return self._row_blocks(P, M, G * Kc * Ks) if self._is_columns(dims) else 1

    def _apply_call(self, x, dims, mean, invstd, var, eps, weight, bias, y):
        """The module's ``apply_fused`` with statistics as invstd, or as var (invstd None)
        and eps; False when there is none or fused passes are off."""
        if self._apply_fused is None or not _config.FUSED_PASSES:
            return False
        self._apply_fused(x, *dims, self._nch(dims), mean, invstd, var, eps, weight, bias,
                          y, self._threads(x.size))
        return True

    def apply_fused(self, x, dims, mean, invstd, weight, bias, y):
        """``apply`` in one call where the backend has ``apply_fused`` (the eval paths:
        no NumPy steps, no memoryview arguments; 0.4 us instead of 2.5 us for a
        (1, 16, 8, 8) BatchNorm), else ``apply``.  ``mean``/``invstd`` any float dtype,
        P*G values."""
        if not self._apply_call(x, dims, mean, invstd, None, 0.0, weight, bias, y):
            self.apply(x, dims, mean, invstd, weight, bias, y)

    def _backward_split(self, dims):
        """(nch, nrch, nblk) for the one-call backward, or None where it does not serve:
        few large groups split into parts (the segment shape with ``_nparts`` > 1) and
        long rows.  Work is split as the general path splits it: ``nch`` row blocks of
        the column shape, ``nrch`` x ``nblk`` chunks for the parameter gradients of row
        norms."""
        if not _config.FUSED_PASSES:
            return None
        P, M, G, Kc, Ks = dims
        if self._is_columns(dims):
            return self._nch(dims), 1, 1
        if self._nparts(dims) != 1:
            return None
        if not self._is_row_norm(dims):
            return 1, 1, 1
        nrch, nblk = self._row_chunks(P, Kc)
        if nblk > 1:  # long rows: the general path (a work row per chunk: measured faster)
            return None
        return 1, nrch, nblk

    def train_fused(self, x, dims, weight, bias, eps, center, y, mean, invstd,
                    running_mean, running_var, momentum):
        """The whole training forward in one call (``forward_fused``): y, the saved
        statistics into ``mean`` (None without center) and ``invstd`` (flat, P*G values,
        any float dtype), running buffers moved towards the statistics averaged over P.
        Returns False, having done nothing, for few large groups split into parts or
        when the kernel module has no such call (Numba): the general path's NumPy glue around
        the kernels costs more than their arithmetic below ~1M values (a (32, 16, 8, 8)
        BatchNorm: ~20 us of 30)."""
        if self._forward_fused is None or not _config.FUSED_PASSES:
            return False
        if not self._is_columns(dims) and self._nparts(dims) != 1:
            return False  # few large groups, split into parts: the general path
        self._forward_fused(x, *dims, self._nch(dims), weight, bias, eps, center, y, mean,
                            invstd, running_mean, running_var, momentum,
                            self._threads(x.size))
        return True

    def eval_fused(self, x, dims, mean, var, eps, weight, bias, y):
        """y = (x - mean) / sqrt(var + eps) * weight + bias from running statistics
        (P*G values each, any float dtype) in one call (``apply_fused``).  False when not
        taken."""
        return self._apply_call(x, dims, mean, None, var, eps, weight, bias, y)

    def backward_fused(self, dy, x, dims, mean, invstd, weight, center, dx, dweight, dbias):
        """``backward`` in one call: dx and, when given, the parameter gradients into
        ``dweight``/``dbias``; ``mean`` (None: zeros) and ``invstd`` the saved statistics
        in any float dtype.  False when not taken (see ``_backward_split``)."""
        split = None if self._backward_fused is None else self._backward_split(dims)
        if split is None:
            return False
        self._backward_fused(dy, x, *dims, *split, mean, invstd, weight, center, dx,
                             dweight, dbias, self._threads(x.size))
        return True

    def apply(self, x, dims, mean, invstd, weight, bias, y):
        nt = self._threads(x.size)
        P, M, G, Kc, Ks = dims
        xf, yf = x.reshape(-1), y.reshape(-1)
        mean = np.ascontiguousarray(mean, np.float64)
        invstd = np.ascontiguousarray(invstd, np.float64)
        if self._is_columns(dims):
            W = G * Kc
            alpha, beta = self._coefficients(mean, invstd, weight, bias, P, G, Kc)
            self.k.col_apply(xf, P, M, W, Ks, self._nch(dims), alpha, beta, yf, nt)
            return
        self.k.seg_apply(xf, P, M, G, Kc, Ks, self._nparts(dims), mean, invstd,
                         self._flat_param(weight, x.dtype), self._flat_param(bias, x.dtype),
                         yf, nt)

    def backward(self, dy, x, dims, mean, invstd, weight, center, dx, param_grads):
        P, M, G, Kc, Ks = dims
        mean = np.ascontiguousarray(mean, np.float64)
        invstd = np.ascontiguousarray(invstd, np.float64)
        row_norm = self._is_row_norm(dims)  # one parameter per value of the row
        want = param_grads and not row_norm
        nrch, nblk = self._row_chunks(P, Kc) if row_norm else (1, 1)
        if row_norm and param_grads and dx is not None and nblk == 1:
            # rows, not split into column blocks: dx and the parameter gradients of a block
            # of rows while it is in cache ((4096,1024) LayerNorm, Numba: see rows_backward)
            nt = self._threads(x.size)
            dweight = np.empty(nrch * Kc)
            dbias = np.empty(nrch * Kc)
            self.k.rows_backward(dy.reshape(-1), x.reshape(-1), P, Kc, nrch, mean, invstd,
                                 self._flat_param(weight, x.dtype), bool(center),
                                 dx.reshape(-1), dweight, dbias, nt)
            return dweight.reshape(nrch, Kc).sum(axis=0), dbias.reshape(nrch, Kc).sum(axis=0)
        fused_rows = getattr(self.k, "rows_apply_backward_pgrads", None)
        if row_norm and param_grads and dx is not None and nrch == 1 and nblk > 1 \
                and fused_rows is not None:
            # a few long rows: their sums, then dx and the parameter gradients by blocks of
            # columns over all rows, reading dy and x once for both ((8, 2**20): 9.4 -> 7.6 ms)
            A, B, _, _ = self._grad_sums(dy, x, dims, mean, weight, False)
            k2, k3 = self._dx_coefficients(mean, invstd, A, B, Kc, center)
            dweight = np.empty(Kc)
            dbias = np.empty(Kc)
            fused_rows(dy.reshape(-1), x.reshape(-1), P, Kc, nblk, mean, invstd, k2, k3,
                       self._flat_param(weight, x.dtype), dx.reshape(-1), dweight, dbias,
                       self._threads(x.size))
            return dweight, dbias
        if not self._is_columns(dims) and self._nparts(dims) == 1:
            nt = self._threads(x.size)  # fused: sums and dx of each group while it is in cache
            sdy = np.empty(P * G * Kc if want else 0)
            sdyxc = np.empty(P * G * Kc if want else 0)
            self.k.seg_backward(dy.reshape(-1), x.reshape(-1), P, M, G, Kc, Ks, mean, invstd,
                                self._flat_param(weight, x.dtype), bool(center),
                                _EMPTY[x.dtype] if dx is None else dx.reshape(-1),
                                sdy, sdyxc, want, nt)
        else:
            A, B, sdy, sdyxc = self._grad_sums(dy, x, dims, mean, weight, want)
            if dx is not None:
                self.apply_backward(dy, x, dims, mean, invstd, weight, A, B, M * Kc * Ks,
                                    center, dx)
        if not param_grads:
            return None, None
        if row_norm:
            return self._row_param_grads(dy, x, dims, mean, invstd)
        return self._param_grads(sdy, sdyxc, invstd, P, G, Kc)

    def grad_sums(self, dy, x, dims, mean):
        """Per-channel sums of dy and dy * (x - mean), shape (P * G * Kc,) each."""
        return self._grad_sums(dy, x, dims, np.ascontiguousarray(mean, np.float64), None,
                               True)[2:]

    def _grad_sums(self, dy, x, dims, mean, weight, want):
        """(A, B, sdy, sdyxc): per group A = sum(g), B = sum(g * (x - mean)), g = dy *
        weight; with ``want`` the per-channel sums of dy and dy * (x - mean)."""
        nt = self._threads(x.size)
        P, M, G, Kc, Ks = dims
        dyf, xf = dy.reshape(-1), x.reshape(-1)
        if self._is_columns(dims):
            wk = None if weight is None else weight.astype(np.float64).reshape(G, Kc)
            W = G * Kc
            nch = self._nch(dims)
            mean_w = np.repeat(mean.reshape(P, G), Kc, axis=1).reshape(-1)
            sdy = np.empty(P * nch * W)
            sdyxc = np.empty(P * nch * W)
            self.k.col_grad_sums(dyf, xf, P, M, W, Ks, nch, mean_w, sdy, sdyxc, nt)
            sdy = sdy.reshape(P, nch, G, Kc).sum(axis=1)
            sdyxc = sdyxc.reshape(P, nch, G, Kc).sum(axis=1)
            A = (sdy if wk is None else sdy * wk).sum(axis=2).reshape(-1)
            B = (sdyxc if wk is None else sdyxc * wk).sum(axis=2).reshape(-1)
            return A, B, sdy.reshape(-1), sdyxc.reshape(-1)
        nparts = self._nparts(dims)
        A = np.empty(P * G * nparts)
        B = np.empty(P * G * nparts)
        sdy = np.empty(P * G * nparts * Kc if want else 0)
        sdyxc = np.empty(P * G * nparts * Kc if want else 0)
        self.k.seg_grad_sums(dyf, xf, P, M, G, Kc, Ks, nparts, mean,
                             self._flat_param(weight, x.dtype), A, B, sdy, sdyxc, want, nt)
        if want:
            sdy = sdy.reshape(P * G, nparts, Kc).sum(axis=1).reshape(-1)
            sdyxc = sdyxc.reshape(P * G, nparts, Kc).sum(axis=1).reshape(-1)
        return A.reshape(-1, nparts).sum(1), B.reshape(-1, nparts).sum(1), sdy, sdyxc

    def apply_backward(self, dy, x, dims, mean, invstd, weight, sum_g, sum_gxc, n, center, dx):
        """dx = invstd * (g - sum_g/n - (x - mean) * invstd^2 * sum_gxc/n), g = dy * weight,
        with given per-group sums over n values (n may count values on other processes)."""
        nt = self._threads(x.size)
        P, M, G, Kc, Ks = dims
        mean = np.ascontiguousarray(mean, np.float64)
        invstd = np.ascontiguousarray(invstd, np.float64)
        k2, k3 = self._dx_coefficients(mean, invstd, sum_g, sum_gxc, n, center)
        dyf, xf, dxf = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
        if self._is_columns(dims):
            W = G * Kc
            k1 = np.broadcast_to(invstd.reshape(P, G, 1), (P, G, Kc))
            if weight is not None:
                k1 = k1 * weight.astype(np.float64).reshape(1, G, Kc)
            k1 = np.ascontiguousarray(k1, np.float64).reshape(-1)
            self.k.col_apply_backward(dyf, xf, P, M, W, Ks, self._nch(dims), k1,
                                      np.repeat(k2.reshape(P, G), Kc, axis=1).reshape(-1),
                                      np.repeat(k3.reshape(P, G), Kc, axis=1).reshape(-1),
                                      dxf, nt)
            return
        self.k.seg_apply_backward(dyf, xf, P, M, G, Kc, Ks, self._nparts(dims), mean, invstd,
                                  k2, k3, self._flat_param(weight, x.dtype), dxf, nt)

    @staticmethod
    def _dx_coefficients(mean, invstd, sum_g, sum_gxc, n, center):
        """(k2, k3) per group of dx = invstd * g + x * k2 + k3 from the group's sums over
        n values (float64 mean/invstd; without ``center``, sum_g does not count)."""
        A = np.asarray(sum_g, np.float64) if center else np.zeros(invstd.size)
        B = np.asarray(sum_gxc, np.float64)
        return -invstd ** 3 * B / n, invstd * (mean * invstd * invstd * B / n - A / n)

    @staticmethod
    def _is_row_norm(dims):
        P, M, G, Kc, Ks = dims
        return Ks == 1 and M == 1 and G == 1

    def _row_param_grads(self, dy, x, dims, mean, invstd):
        """Column sums over the rows.  Short rows: chunks of whole rows, read contiguously,
        each into its own accumulator row (merged here); long rows (few of them): blocks
        of columns, each owning its outputs (no accumulators)."""
        nt = self._threads(x.size)
        P, K = dims[0], dims[3]
        nrch, nblk = self._row_chunks(P, K)
        dweight = np.empty(nrch * K)
        dbias = np.empty(nrch * K)
        self.k.row_param_grads(dy.reshape(-1), x.reshape(-1), P, K, nrch, nblk, mean, invstd,
                               dweight, dbias, nt)
        return dweight.reshape(nrch, K).sum(axis=0), dbias.reshape(nrch, K).sum(axis=0)

    @staticmethod
    def _row_chunks(P, K):
        """(nrch, nblk): chunks of the P rows times blocks of the K columns for the
        parameter gradients of row norms."""
        nblk = max(1, min(_config.MAX_CHUNKS, K // _config.MIN_CHUNK_ELEMENTS))
        nrch = max(1, min(_config.MAX_CHUNKS // nblk, _cdiv(P * K, _config.MIN_CHUNK_ELEMENTS),
                          P, (1 << 22) // K))
        return nrch, nblk

    @staticmethod
    def _param_grads(sdy, sdyxc, invstd, P, G, Kc):
        dweight = (sdyxc.reshape(P, G, Kc) * invstd.reshape(P, G, 1)).sum(axis=0).reshape(-1)
        dbias = sdy.reshape(P, G, Kc).sum(axis=0).reshape(-1)
        return dweight, dbias
