"""Depthwise convolution in any spatial rank: each output channel reads one input channel.

M3D-NCA's perception is a depthwise ``7x7x7`` conv (``groups = C``). Run through its dense
filters (``K (k,)*n + (C, C)``, all but the diagonal zero) it costs ``C`` times the work, and
XLA:CPU's grouped convolution (``feature_group_count``) is slower still. Measured on a busy
2-core AMD EPYC (2026-12-03), one ``7x7x7`` conv of 4 x 32x32x26 cells, C=16, value and
gradient: dense 6.3 s, grouped 22 s, this module 0.39 s (forward 45 ms, input gradient
67 ms, kernel gradient 0.28 s); ``3x3x3``: dense 0.47 s, this module 0.13 s.

* forward: shifted multiply-adds, a scan over the first axis's ``k`` offsets with the
  other ``k**(n-1)`` taps unrolled (one fused loop each; a fully unrolled ``7x7x7`` compiled
  for a minute and autodiff of it ran 10 s);
* input gradient: the same on the zero-padded output gradient with the kernel flipped;
* kernel gradient: per offset along the first ``n - 1`` axes, one matmul per channel over
  all cells' rows, ``(Z', rows) @ (rows, Z)``, whose ``k`` diagonals along the last axis
  are the taps (a Toeplitz product; per-tap reductions over the cells measured 2.3x slower);
  for large windows (``7x7x7``) the correlation by FFT instead (relative difference to the
  Toeplitz products 5e-7 on random data).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp


def _taps(k: int, n: int) -> list[tuple[int, ...]]:
    return list(itertools.product(range(k), repeat=n))


def _pairwise_sum(terms: list[jax.Array]) -> jax.Array:
    # a tree of additions: float32 rounding grows with log2(len) instead of len (343 taps)
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _shifted_sum(xp: jax.Array, kernel: jax.Array) -> jax.Array:
    """``out[b, s, c] = sum_t xp[b, s + t, c] * kernel[t, c]``: ``xp (B, *(S + k - 1), C)``,
    ``kernel (k,)*n + (C,)`` -> ``(B, *S, C)``."""
    n, k = xp.ndim - 2, kernel.shape[0]
    size = tuple(s - k + 1 for s in xp.shape[1:-1])
    rest = _taps(k, n - 1)

    def body(out, a):
        slab = jax.lax.dynamic_slice_in_dim(xp, a, size[0], axis=1)
        w = jax.lax.dynamic_index_in_dim(kernel, a, 0, keepdims=False)
        terms = [slab[(slice(None), slice(None)) + tuple(slice(o, o + s) for o, s in zip(t, size[1:]))] * w[t] for t in rest]
        return out + _pairwise_sum(terms), None

    out = jnp.zeros(xp.shape[:1] + size + xp.shape[-1:], xp.dtype)
    return jax.lax.scan(body, out, jnp.arange(k))[0]


def _kernel_grad(xp: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """``sum_{b, s} xp[b, s + t, c] * g[b, s, c]`` for every tap ``t``: ``(k,)*n + (C,)``.

    Large windows (``k**n >= FFT_TAPS``) by FFT, small ones by Toeplitz products."""
    if k ** (g.ndim - 2) >= FFT_TAPS:
        return _kernel_grad_fft(xp, g, k)
    return _kernel_grad_toeplitz(xp, g, k)


# From this many taps on, the kernel gradient is taken by FFT (7x7x7 = 343: 157 ms against
# 272 ms by Toeplitz products; 3x3x3: 43 against 23 ms; 4 x 32x32x26 cells, C=16, a busy
# 2-core AMD EPYC, 2026-12-07).
FFT_TAPS = 100


def _kernel_grad_fft(xp: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """The correlation of ``xp`` with ``g`` at lags ``[0, k)`` per axis, by FFT over ``xp``'s
    grid: ``g`` zero-padded to it, no lag wraps around (``s + t < S + k - 1``)."""
    n = g.ndim - 2
    axes, grid = tuple(range(1, n + 1)), xp.shape[1:-1]
    spec = jnp.fft.rfftn(xp, s=grid, axes=axes) * jnp.conj(jnp.fft.rfftn(g, s=grid, axes=axes))
    corr = jnp.fft.irfftn(spec.sum(0), s=grid, axes=tuple(range(n)))
    return corr[(slice(0, k),) * n].astype(xp.dtype)


def _kernel_grad_toeplitz(xp: jax.Array, g: jax.Array, k: int) -> jax.Array:
    n, c = g.ndim - 2, g.shape[-1]
    size, last = g.shape[1:-1], xp.shape[-2]
    xt = jnp.moveaxis(xp, -1, 0)  # (C, B, *S'): rows of the matmul contiguous per channel
    gt = jnp.moveaxis(g, -1, 0).reshape(c, -1, size[-1])  # (C, rows, Z)
    diag = (jnp.arange(k)[:, None] + jnp.arange(size[-1])[None, :], jnp.arange(size[-1])[None, :])  # P[z + t, z]

    def body(_, i):
        offset = [(i // k ** (n - 2 - a)) % k for a in range(n - 1)]
        start = (0, 0, *offset, 0)
        s = jax.lax.dynamic_slice(xt, start, (c, xt.shape[1], *size[:-1], last)).reshape(c, -1, last)  # (C, rows, Z')
        p = jax.lax.dot_general(s, gt, (((1,), (1,)), ((0,), (0,))), precision=jax.lax.Precision.HIGHEST)  # (C, Z', Z)
        return None, p[:, diag[0], diag[1]].sum(-1)  # (C, k)

    out = jax.lax.scan(body, None, jnp.arange(k ** (n - 1)))[1]  # (k**(n-1), C, k)
    return jnp.moveaxis(out.reshape((k,) * (n - 1) + (c, k)), -2, -1)


@jax.custom_vjp
def depthwise_valid(xp: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise cross-correlation without padding: ``xp (B, *(S + k - 1), C)``, ``kernel
    (k,)*n + (C,)`` -> ``(B, *S, C)``, float32."""
    return _shifted_sum(xp, kernel)


def _fwd(xp, kernel):
    return _shifted_sum(xp, kernel), (xp, kernel)


def _bwd(res, g):
    xp, kernel = res
    n, k = xp.ndim - 2, kernel.shape[0]
    gp = jnp.pad(g, [(0, 0)] + [(k - 1, k - 1)] * n + [(0, 0)])
    flipped = kernel[(slice(None, None, -1),) * n]
    return _shifted_sum(gp, flipped), _kernel_grad(xp, g, k)


depthwise_valid.defvjp(_fwd, _bwd)


def depthwise_conv_reflect(x: jax.Array, kernel: jax.Array, precision: str = "float32") -> jax.Array:
    """Reflect-padded depthwise conv ``(B, *S, C) -> (B, *S, M*C)`` with ``kernel (k,)*n + (C,
    M)``: feature ``m*C + c`` is filter ``m`` on channel ``c`` (the layout of a perception's
    depthwise form, :mod:`mednca_jax.nca.perceptions`). ``precision="bfloat16"`` rounds the
    inputs to bfloat16 and accumulates in float32, as :func:`~mednca_jax.nca.rule.conv_reflect`."""
    n, r = x.ndim - 2, kernel.shape[0] // 2
    xp = jnp.pad(x, [(0, 0)] + [(r, r)] * n + [(0, 0)], mode="reflect")
    if precision == "bfloat16":
        xp, kernel = (a.astype(jnp.bfloat16).astype(jnp.float32) for a in (xp, kernel))
    return jnp.concatenate([depthwise_valid(xp, kernel[..., m]) for m in range(kernel.shape[-1])], axis=-1)
