"""Driver shared by the compiled backends (Numba and Cython): picks a kernel shape for a
canonical view, splits the work, merges partial sums.  The kernel modules mirror each
other, so one driver serves both.

Two kernel shapes cover every normalization and layout:

- *segments* (``Ks > 1`` or ``M == 1``): a group is M contiguous runs of ``Kc*Ks`` values.
  One task per group computes the group's sums and then applies the affine while the
  group is still in cache, so x is read from memory about once.  When there are few, large
  groups (BatchNorm with fewer channels than threads, LayerNorm of one long row), each
  group is split into parts whose partial sums are merged, then applied in a second pass.
- *columns* (``Ks == 1`` and ``M > 1``, the channels-last layouts): x is ``(P, M, W)``; row
  blocks accumulate per-column sums in their own float64 buffers, merged in a fixed order,
  then one more pass applies per-column coefficients.

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

    # -- helpers -------------------------------------------------------------------------
    def _threads(self):
        n = _config.get_num_threads()
        self.k.prepare(n)
        return n

    @staticmethod
    def _flat_param(p, dtype):
        return _EMPTY[np.dtype(dtype)] if p is None else p

    @staticmethod
    def _is_columns(dims):
        P, M, G, Kc, Ks = dims
        return Ks == 1 and M > 1

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
        """Row blocks per p for the column shape."""
        per_p = _cdiv(M * W, _config.MIN_CHUNK_ELEMENTS)
        return max(1, min(M, per_p, _cdiv(_config.MAX_CHUNKS, P)))

    # -- the backend interface (see fastnorm.kernels) -------------------------------------
    def forward(self, x, dims, weight, bias, eps, center, y):
        nt = self._threads()
        P, M, G, Kc, Ks = dims
        xf, yf = x.reshape(-1), y.reshape(-1)
        w = self._flat_param(weight, x.dtype)
        b = self._flat_param(bias, x.dtype)
        if self._is_columns(dims):
            W = G * Kc
            nch = self._row_blocks(P, M, W)
            if center:  # one value of each group (its first row) as the shift
                shift = np.repeat(x.reshape(P, M, G, Kc)[:, 0, :, :1], Kc, axis=2)
                shift = shift.astype(np.float64).reshape(-1)
            else:
                shift = np.zeros(P * W)
            s1 = np.empty(P * nch * W)
            s2 = np.empty(P * nch * W)
            self.k.col_sums(xf, P, M, W, nch, shift, s1, s2, nt)
            s1 = s1.reshape(P, nch, G, Kc).sum(axis=(1, 3)).reshape(-1)
            s2 = s2.reshape(P, nch, G, Kc).sum(axis=(1, 3)).reshape(-1)
            mean, var = self._moments(s1, s2, shift.reshape(P, G, Kc)[:, :, 0].reshape(-1),
                                      M * Kc, center)
            alpha, beta = self._coefficients(mean, 1.0 / np.sqrt(var + eps), weight, bias,
                                             P, G, Kc)
            self.k.col_apply(xf, P, M, W, nch, alpha, beta, yf, nt)
            return mean, var
        nparts = self._nparts(dims)
        mean = np.empty(P * G)
        var = np.empty(P * G)
        if nparts == 1:
            self.k.seg_forward(xf, P, M, G, Kc, Ks, w, b, float(eps), bool(center), yf,
                               mean, var, nt)
            return mean, var
        if center:
            shift = x.reshape(P, M, G, Kc * Ks)[:, 0, :, 0].astype(np.float64).reshape(-1)
        else:
            shift = np.zeros(P * G)
        s1 = np.empty(P * G * nparts)
        s2 = np.empty(P * G * nparts)
        self.k.seg_sums(xf, P, M, G, Kc, Ks, nparts, shift, s1, s2, nt)
        mean, var = self._moments(s1.reshape(-1, nparts).sum(1), s2.reshape(-1, nparts).sum(1),
                                  shift, M * Kc * Ks, center)
        self.k.seg_apply(xf, P, M, G, Kc, Ks, nparts, mean, 1.0 / np.sqrt(var + eps), w, b,
                         yf, nt)
        return mean, var

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

    def apply(self, x, dims, mean, invstd, weight, bias, y):
        nt = self._threads()
        P, M, G, Kc, Ks = dims
        xf, yf = x.reshape(-1), y.reshape(-1)
        if self._is_columns(dims):
            W = G * Kc
            alpha, beta = self._coefficients(mean, invstd, weight, bias, P, G, Kc)
            self.k.col_apply(xf, P, M, W, self._row_blocks(P, M, W), alpha, beta, yf, nt)
            return
        self.k.seg_apply(xf, P, M, G, Kc, Ks, self._nparts(dims),
                         np.ascontiguousarray(mean, np.float64),
                         np.ascontiguousarray(invstd, np.float64),
                         self._flat_param(weight, x.dtype), self._flat_param(bias, x.dtype),
                         yf, nt)

    def backward(self, dy, x, dims, mean, invstd, weight, center, dx, param_grads):
        nt = self._threads()
        P, M, G, Kc, Ks = dims
        n = M * Kc * Ks
        mean = np.ascontiguousarray(mean, np.float64)
        invstd = np.ascontiguousarray(invstd, np.float64)
        dyf, xf = dy.reshape(-1), x.reshape(-1)
        dxf = _EMPTY[x.dtype] if dx is None else dx.reshape(-1)
        w = self._flat_param(weight, x.dtype)
        if self._is_columns(dims):
            W = G * Kc
            nch = self._row_blocks(P, M, W)
            mean_w = np.repeat(mean.reshape(P, G), Kc, axis=1).reshape(-1)
            sdy = np.empty(P * nch * W)
            sdyxc = np.empty(P * nch * W)
            self.k.col_grad_sums(dyf, xf, P, M, W, nch, mean_w, sdy, sdyxc, nt)
            sdy = sdy.reshape(P, nch, G, Kc).sum(axis=1)
            sdyxc = sdyxc.reshape(P, nch, G, Kc).sum(axis=1)
            if dx is not None:
                wk = np.ones((1, G, Kc)) if weight is None else weight.astype(np.float64).reshape(1, G, Kc)
                A = (sdy * wk).sum(axis=2)
                B = (sdyxc * wk).sum(axis=2)
                k1, k2, k3 = self._backward_coefficients(mean.reshape(P, G), invstd.reshape(P, G),
                                                         A, B, n, center)
                k1 = (k1[:, :, None] * wk).reshape(-1)
                k2 = np.repeat(k2, Kc, axis=1).reshape(-1)
                k3 = np.repeat(k3, Kc, axis=1).reshape(-1)
                self.k.col_apply_backward(dyf, xf, P, M, W, nch, k1, k2, k3, dxf, nt)
            return self._param_grads(sdy, sdyxc, invstd, P, G, Kc, param_grads)
        row_norm = Ks == 1 and M == 1 and G == 1  # one parameter per value of the row
        want = param_grads and not row_norm
        nparts = self._nparts(dims)
        if nparts == 1:
            sdy = np.empty(P * G * Kc if want else 0)
            sdyxc = np.empty(P * G * Kc if want else 0)
            self.k.seg_backward(dyf, xf, P, M, G, Kc, Ks, mean, invstd, w, bool(center), dxf,
                                sdy, sdyxc, want, nt)
        else:
            A = np.empty(P * G * nparts)
            B = np.empty(P * G * nparts)
            sdy = np.empty(P * G * nparts * Kc if want else 0)
            sdyxc = np.empty(P * G * nparts * Kc if want else 0)
            self.k.seg_grad_sums(dyf, xf, P, M, G, Kc, Ks, nparts, mean, w, A, B, sdy, sdyxc,
                                 want, nt)
            if want:
                sdy = sdy.reshape(P * G, nparts, Kc).sum(axis=1).reshape(-1)
                sdyxc = sdyxc.reshape(P * G, nparts, Kc).sum(axis=1).reshape(-1)
            if dx is not None:
                A = A.reshape(-1, nparts).sum(1)
                B = B.reshape(-1, nparts).sum(1)
                _, k2, k3 = self._backward_coefficients(mean, invstd, A, B, n, center)
                self.k.seg_apply_backward(dyf, xf, P, M, G, Kc, Ks, nparts, invstd, k2, k3, w,
                                          dxf, nt)
        if not param_grads:
            return None, None
        if row_norm:
            K = Kc
            dweight = np.empty(K)
            dbias = np.empty(K)
            nblk = max(1, min(_cdiv(P * K, _config.MIN_CHUNK_ELEMENTS), _cdiv(K, 64),
                              _config.MAX_CHUNKS))
            self.k.row_param_grads(dyf, xf, P, K, nblk, mean, invstd, dweight, dbias, nt)
            return dweight, dbias
        return self._param_grads(sdy.reshape(P, G, Kc), sdyxc.reshape(P, G, Kc), invstd,
                                 P, G, Kc, True)

    @staticmethod
    def _backward_coefficients(mean, invstd, A, B, n, center):
        """dx = dy * weight * k1 + x * k2 + k3 per group (A = sum g, B = sum g (x - mean))."""
        if not center:
            A = np.zeros_like(A)
        k2 = -invstd ** 3 * B / n
        k3 = invstd * (mean * invstd * invstd * B / n - A / n)
        return invstd, k2, k3

    @staticmethod
    def _param_grads(sdy, sdyxc, invstd, P, G, Kc, param_grads):
        if not param_grads:
            return None, None
        dweight = (sdyxc.reshape(P, G, Kc) * invstd.reshape(P, G, 1)).sum(axis=0).reshape(-1)
        dbias = sdy.reshape(P, G, Kc).sum(axis=0).reshape(-1)
        return dweight, dbias
