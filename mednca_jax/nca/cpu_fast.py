"""The fast CPU backend: the rule of :mod:`mednca_jax.nca.rule` on fired cells only, custom VJP.

Derived from the rule, not a second definition of it: the perception enters only as its
linear filters ``K (k,)*ndim + (C, F)`` and ``b (F,)`` (:func:`perceptions.filters_of`), so
any linear perception, learned or fixed, of any odd window ``k`` runs here, on states of any
spatial rank ``(B, *S, C)``; the MLP is the rule's ``fc0``/``fc1``. Each cell reads its
``k**ndim`` reflect-padded neighbours through a neighbour table (:func:`_neighbour_table`).
``tests/test_equivalence.py`` and ``tests/test_cpu_fast.py`` check states and gradients
against the reference rollout on the same fire masks (compacted, dense, overflow chunks,
pieces, blocks; 2D and 3D; several windows). Float32, the ``mlp`` update without norm.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.nca.remat import blocked_scan
from mednca_jax.nca.perceptions import filters_of, get_perception
from mednca_jax.nca.rule import Params, Rule

# Why this exists (measured on a 2-core CPU, 2D, C=16, hidden 128, 48x16x16 cells, fwd+bwd): autodiff
# of the reference formulation spends most of its time outside the matmuls (concatenations
# along the 16-wide channel axis, transposes feeding the weight gradients, rematerialisation)
# and computes the MLP for every cell although only the fired ones (~half at fire 0.5) change.
# Here one step
#   * gathers the k x k (x k) reflect neighbourhoods of the fired cells only (static capacity, see
#     :func:`fired_capacity`; more fired cells than that are processed in extra chunks, so the
#     result never depends on the capacity),
#   * runs the forward cell-major ``(cells, features)`` and the backward feature-major
#     ``(features, cells)``: there the weight gradients contract over the minor axis of both
#     operands (2-3x faster on XLA:CPU than the cell-major transposed products autodiff
#     produces), while the forward's products are faster cell-major,
#   * leaves the input channels alone (fc1's columns for them are zero, see :func:`_prepare`)
#     instead of rewriting the image into them every step,
#   * scatters the update back, and in the backward scatter-adds the neighbourhood gradients,
#   * saves only the state and the fired indices for the backward, which recomputes the
#     perception and fc0 (on this memory-bound CPU, cheaper than storing them per step),
#   * multiplies with weights laid out once per rollout (:func:`_prepare`).
SPARSE_MAX_FRACTION = 0.8  # above this capacity / cells the compaction does not pay off
SPARSE_SIGMAS = 3.0  # capacity margin in standard deviations of the fired count


def fired_capacity(n_cells: int, fire_rate: float | jax.Array) -> int | None:
    """Static capacity for the fired cells of one step, or ``None`` for the dense path.

    The fired count is Binomial(n, 1 - fire_rate); the capacity is its mean plus
    ``SPARSE_SIGMAS`` standard deviations (exceeded with p < 1e-3 per step, and then handled
    exactly, in an extra chunk). Each sigma of margin costs ~1% more work at 2000-6000 cells;
    3 sigmas instead of 6 measured 2-4% faster, the rare extra chunk included. A traced
    ``fire_rate`` has no static value: dense.
    """
    if isinstance(fire_rate, jax.core.Tracer):
        return None
    q = 1.0 - float(fire_rate)
    cap = q * n_cells + SPARSE_SIGMAS * math.sqrt(n_cells * q * (1.0 - q)) + 8
    cap = int(math.ceil(cap / 8.0) * 8)
    return cap if cap <= SPARSE_MAX_FRACTION * n_cells else None


def _flat(a: jax.Array) -> jax.Array:
    return a.reshape(-1, a.shape[-1])


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())))


class Lattice(NamedTuple):
    """The cells a rollout runs on (static): ``grid = (B, *S)`` (the state without its
    channel axis, flattened row-major to ``N = B * prod(S)`` cells) and the odd window ``k``
    of the perception."""

    grid: tuple[int, ...]
    k: int

    @property
    def taps(self) -> int:
        """Neighbours per cell, ``k**ndim``."""
        return self.k ** (len(self.grid) - 1)


def _reflect(n: int, r: int) -> np.ndarray:
    """Source index of every position ``-r .. n - 1 + r`` of an axis of ``n`` reflect-padded
    by ``r`` (mirrored without repeating the border, repeatedly when ``r >= n`` as
    ``jnp.pad(mode="reflect")``)."""
    i = np.arange(-r, n + r)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.abs(i) % period
    return np.where(i >= n, period - i, i)  # -1 -> 1, n -> n - 2


@lru_cache(maxsize=32)
def _neighbour_table(lattice: Lattice) -> np.ndarray:
    """``(N + 1, k**ndim)`` flat indices of the reflect-padded window of every cell.

    Column ``t`` is the neighbour at kernel offset ``np.unravel_index(t, (k,)*ndim)`` (minus
    ``k // 2`` along each axis): the row-major order of the kernel's spatial axes, so that
    ``K.reshape(k**ndim * C, F)`` multiplies the gathered columns (the im2col order). The
    extra row ``N`` (the padding index of the compaction) points at ``N`` again.
    """
    b, spatial, k = lattice.grid[0], lattice.grid[1:], lattice.k
    nd, r = len(spatial), k // 2
    strides = [int(np.prod(spatial[a + 1 :], dtype=np.int64)) for a in range(nd)]
    cell = np.zeros(spatial + (k,) * nd, np.int64)
    for a, (n, stride) in enumerate(zip(spatial, strides)):
        src = _reflect(n, r)
        window = np.stack([src[o : o + n] for o in range(k)], -1) * stride  # (n, k)
        shape = [1] * (2 * nd)
        shape[a], shape[nd + a] = n, k
        cell = cell + window.reshape(shape)  # spatial axis a and kernel axis a
    n_cells = int(np.prod(spatial, dtype=np.int64))
    taps = lattice.taps
    table = (np.arange(b)[:, None, None] * n_cells + cell.reshape(1, n_cells, taps)).reshape(b * n_cells, taps)
    return np.concatenate([table, np.full((1, taps), b * n_cells)]).astype(np.int32)


def _neighbours(idx: jax.Array, lattice: Lattice) -> jax.Array:
    """Flat neighbour indices ``(K, k**ndim)`` of cells ``idx (K,)`` (``N`` maps to ``N``).

    A table lookup rather than index arithmetic: XLA fuses arithmetic into the consuming
    gather and recomputes it for every channel (measured ~3x slower gathers).
    """
    return jnp.asarray(_neighbour_table(lattice)).at[idx].get(mode="promise_in_bounds")


def _take_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
    # Clamped gather: padding indices (N) read the last row; their results are never used
    # (dropped by the scatter, zero cotangent). Cheaper than mode="fill" (no select pass).
    return a.at[jnp.minimum(idx, a.shape[0] - 1)].get(mode="promise_in_bounds")


def _scatter_add_rows(a: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
    """``a.at[idx].add(rows, mode="drop")`` for ``a (N, C)``, ``idx (M,)``, ``rows (M, C)``.

    Written as a scatter whose window spans both dims, so that XLA gets the updates in its
    canonical ``(M, 1, C)`` form: ``.at[].add`` made XLA:CPU copy the neighbourhood gradients
    (3.6 MB, ~0.2 ms per step at 6320 cells) only to move a size-1 axis.
    """
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(1, 2), inserted_window_dims=(), scatter_dims_to_operand_dims=(0,))
    return jax.lax.scatter_add(a, idx[:, None], rows[:, None, :], dims, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _prepare(rule: Rule, params: Params, n_in: int) -> Params:
    """The weights in the layouts the fast step multiplies with, built once per rollout.

    The forward runs cell-major (``k``, ``w0``, ``w1``), the backward feature-major (``kt``,
    ``w0t``): on XLA:CPU each is the faster layout for its products (measured: the cell-major
    forward 1.2-1.5x faster at 2248-6488 cells, the feature-major weight gradients 1.5-3x).
    Outside the scan on purpose: inside, XLA folds these transposes into the dots, which then
    run as slower transposed-operand products. Gradients flow back to ``params`` through
    this function.

    fc1's columns of the ``n_in`` input channels are zeroed: the update then leaves the
    image in those channels bit for bit, so a rollout writes it once instead of every step.
    The original overwrites these outputs each step, so they get no gradient there either.
    """
    c = params["fc1"]["kernel"].shape[1]
    w0 = params["fc0"]["kernel"]
    w0 = jnp.concatenate([w0[c:], w0[:c], params["fc0"]["bias"][None]], axis=0)  # rows [conv | x | bias]
    w = {"w0": w0, "w0t": w0.T, "w1": jnp.asarray(params["fc1"]["kernel"]).at[:, :n_in].set(0.0)}
    kernel, kbias = filters_of(rule, params)
    kmat = kernel.reshape(-1, kernel.shape[-1])  # rows ordered (offset, c_in): the neighbourhood columns' order
    return {"k": kmat, "kt": kmat.T, "kbias": kbias, **w}


# A depthwise perception (depthwise, sobel) runs through its dense filters too, mostly zeros.
# Its compact form multiplied elementwise with the gathered columns and summed over the taps
# measured 7x slower than the dense product (3D 7x7x7, C=16, 4 x 32x32x26 cells, 10 steps fwd+bwd:
# 110 s against 15 s; 2-core AMD EPYC, shared and busy, 2026-12-03).
def _conv(w: Params, cols: jax.Array) -> jax.Array:
    """The perception ``(K, F)`` of cells with neighbourhood columns ``cols (K, T*C)``."""
    return cols @ w["k"] + w["kbias"]


def _conv_t(w: Params, cols: jax.Array) -> jax.Array:
    """:func:`_conv` feature-major, ``(F, K)``."""
    return _dot(w["kt"], cols, (1, 1)) + w["kbias"][:, None]


def _conv_backward(w: Params, cols: jax.Array, gconv_t: jax.Array) -> tuple[Params, jax.Array]:
    """The perception's filter gradients (in the layout of :func:`_prepare`, bias excluded)
    and ``dL/dcols (K, T*C)``, given ``dL/dconv`` as ``gconv_t (F, K)``."""
    return {"k": jnp.zeros_like(w["k"]), "kt": _dot(gconv_t, cols, (1, 0))}, _dot(gconv_t, w["kt"], (0, 0))  # (F, T*C)


def _centre(w: Params, cols: jax.Array) -> jax.Array:
    """The cells' own state ``(K, C)``: the centre block of their columns ``cols (K, T*C)``
    (``T = k**ndim`` neighbours, the centre is number ``T // 2``)."""
    c = w["w1"].shape[1]
    t = cols.shape[1] // c // 2
    return cols[:, t * c : (t + 1) * c]


def _update_rows(w: Params, cols: jax.Array) -> jax.Array:
    """The update ``d (K, C)`` of cells with neighbourhood columns ``cols (K, T*C)``,
    cell-major: ``y = [conv x | x | 1] (K, F+C+1)`` (the ones column folds fc0's bias into
    the matmul), ``d = relu(y @ w0) @ w1``."""
    conv = _conv(w, cols)  # (K, F)
    y = jnp.concatenate([conv, _centre(w, cols), jnp.ones((cols.shape[0], 1), cols.dtype)], axis=1)
    return jax.nn.relu(y @ w["w0"]) @ w["w1"]


def _hidden_t(w: Params, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Feature-major recomputation for the backward: ``y_t (F+C+1, K)`` holding ``[conv x | x |
    1]`` and fc0's pre-activation ``h_t (hidden, K)``, from columns ``cols (K, T*C)``."""
    conv_t = _conv_t(w, cols)  # (F, K)
    ones = jnp.ones((1, cols.shape[0]), cols.dtype)
    y_t = jnp.concatenate([conv_t, _centre(w, cols).T, ones], axis=0)
    return y_t, w["w0t"] @ y_t


def _update_backward(w: Params, cols: jax.Array, gd_t: jax.Array) -> tuple[Params, jax.Array, jax.Array]:
    """Gradients given ``dL/dd`` as ``gd_t (C, K)``; recomputes the perception and fc0.

    Returns ``(gradients in the layout of _prepare, dL/dcols (K, T*C) through the convs,
    dL/dx_centre (C, K) through fc0's x columns)``; the two input parts are scattered
    separately by the caller (adding the centre into the columns costs a pass over them).
    """
    f = w["kbias"].shape[0]
    y_t, h_t = _hidden_t(w, cols)
    g_w1 = _dot(jax.nn.relu(h_t), gd_t, (1, 1))  # (hidden, C)
    gh_t = jnp.where(h_t > 0, w["w1"] @ gd_t, 0.0)  # (hidden, K)
    g_w0 = _dot(y_t, gh_t, (1, 1))  # (F+C+1, hidden)
    gy_t = w["w0"][:-1] @ gh_t  # (F+C, K)
    gconv_t = gy_t[:f]
    g_kernel, gcols = _conv_backward(w, cols, gconv_t)
    grads = {**g_kernel, "kbias": gconv_t.sum(axis=1), "w0": g_w0, "w0t": jnp.zeros_like(w["w0t"]), "w1": g_w1}
    return grads, gcols, gy_t[f:]


MIN_ROWS_PER_CHAIN = 512  # smaller pieces gained nothing (batch-1 level 0: 160 cells)


def cell_chains(n_rows: int, pieces: int) -> int:
    """Into how many independent pieces one step splits the work on ``n_rows`` fired cells,
    given the backend's ``pieces`` (a machine fact decided at the entry point, see
    :func:`mednca_jax.machine.backend_for`).

    XLA:CPU runs independent ops concurrently, one per core, but runs a matmul of a few
    thousand rows on one core. Two pieces (gather, perception, MLP, and their backward) run
    side by side. Measured on 2 cores: batch-1 inference 17 % faster, batch 4 10 %, batch
    32 unchanged, a one-process train step 6-9 % faster; on one core 3 % slower, and 3 or 4
    pieces on 2 cores gained less. Pieces under ``MIN_ROWS_PER_CHAIN`` rows gain nothing.
    """
    return max(1, min(pieces, n_rows // MIN_ROWS_PER_CHAIN))


def _row_pieces(n_rows: int, pieces: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the :func:`cell_chains` near-equal pieces of ``n_rows`` rows."""
    k = cell_chains(n_rows, pieces)
    bounds = [i * n_rows // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _gather_cols(xf: jax.Array, nb: jax.Array) -> jax.Array:
    """Neighbourhood columns ``(K, T*C)`` from neighbour indices ``nb (K, T)`` (padding ``N``
    reads the last row, see :func:`_take_rows`).

    A row gather: on CPU ~3x cheaper than slicing the padded state once per offset and
    concatenating the slices (measured 2D, 3x3).
    """
    return _take_rows(xf, nb).reshape(nb.shape[0], -1)


# ---- blocks: bounded gathered columns for large windows
# A piece whose gathered columns would exceed BLOCK_ABOVE_BYTES runs as a loop over blocks of
# about BLOCK_BYTES of columns each, so that a large window (7x7x7 x 16 channels: 22 KB per
# cell) does not materialise its columns for every fired cell at once (~1 GB per step for a
# batch of 4 volumes of 32x32x26). 2D 3x3 pieces stay far below the threshold (12288 cells
# of 16 channels: 7 MB) and run unblocked. Measured (10 steps fwd+bwd, C=16, hidden 64,
# 4 x 32x32x26 cells, fire 0.5, 2 pieces; 2-core AMD EPYC, shared, 2026-12-03): 3x3x3
# learned 1.87 s unblocked, 1.60 s in blocks of 2 MB; 7x7x7 depthwise 14.8 s unblocked,
# 12.6 / 9.1 / 10.5 s in blocks of 0.5 / 2 / 8 MB.
BLOCK_ABOVE_BYTES = 32 << 20
BLOCK_BYTES = 2 << 20


def _block_rows(n_rows: int, lattice: Lattice, channels: int) -> int:
    """Rows per block of a piece of ``n_rows`` cells (``n_rows``: one block, no loop)."""
    row_bytes = 4 * lattice.taps * channels
    if n_rows * row_bytes <= BLOCK_ABOVE_BYTES:
        return n_rows
    return max(8, BLOCK_BYTES // row_bytes // 8 * 8)


def _blocks_of(idx: jax.Array, rows: int, n_cells: int) -> jax.Array:
    """``idx (P,)`` padded with ``n_cells`` (the padding index) to ``(P / rows, rows)``."""
    n = -(-idx.shape[0] // rows)
    return jnp.pad(idx, (0, n * rows - idx.shape[0]), constant_values=n_cells).reshape(n, rows)


def _piece_rows(w: Params, xf: jax.Array, idx: jax.Array, lattice: Lattice) -> jax.Array:
    """The update ``d (P, C)`` of the cells ``idx (P,)`` (padding ``N``: unused rows)."""
    rows = _block_rows(idx.shape[0], lattice, xf.shape[1])
    one = lambda i: _update_rows(w, _gather_cols(xf, _neighbours(i, lattice)))  # noqa: E731
    if rows >= idx.shape[0]:
        return one(idx)
    return jax.lax.map(one, _blocks_of(idx, rows, xf.shape[0])).reshape(-1, xf.shape[1])[: idx.shape[0]]


def _piece_backward(w, xf, piece, g, grads, gx, lattice):
    """Adds the gradients of the update of the cells ``piece (P,)`` given ``g = dL/dd`` as
    rows ``g[piece]`` (padding ``N``: no gradient) to ``grads`` (or None) and ``gx``."""

    def one(piece, grads, gx):
        nb = _neighbours(piece, lattice)
        cols = _gather_cols(xf, nb)
        gd_t = jnp.where(piece[:, None] < g.shape[0], _take_rows(g, piece), 0.0).T  # padding: no gradient
        more, gcols, gxc_t = _update_backward(w, cols, gd_t)
        grads = more if grads is None else jax.tree_util.tree_map(jnp.add, grads, more)
        gx = gx.at[piece].add(gxc_t.T, mode="drop", unique_indices=True, indices_are_sorted=True)
        return grads, _scatter_add_rows(gx, nb.reshape(-1), gcols.reshape(-1, g.shape[-1]))

    rows = _block_rows(piece.shape[0], lattice, xf.shape[1])
    if rows >= piece.shape[0]:
        return one(piece, grads, gx)
    if grads is None:
        grads = jax.tree_util.tree_map(jnp.zeros_like, w)
    return jax.lax.scan(lambda carry, p: (one(p, *carry), None), (grads, gx), _blocks_of(piece, rows, xf.shape[0]))[0]


# ---- every cell (fire rate unknown at trace time, or most cells fire)
@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense_update(w: Params, xf: jax.Array, m: jax.Array, lattice: Lattice, pieces: int) -> jax.Array:
    """``xf + d * m`` computed for every cell; ``xf (N, C)``, ``m (N,)`` float."""
    n = xf.shape[0]
    if _block_rows(n, lattice, xf.shape[1]) < n:
        d = jnp.concatenate([_piece_rows(w, xf, jnp.arange(a, b), lattice) for a, b in _row_pieces(n, pieces)])
        return xf + d * m[:, None]
    nb = jnp.asarray(_neighbour_table(lattice)[:-1])
    d = jnp.concatenate([_update_rows(w, _gather_cols(xf, nb[a:b])) for a, b in _row_pieces(n, pieces)])
    return xf + d * m[:, None]


def _dense_update_fwd(w, xf, m, lattice, pieces):
    return _dense_update(w, xf, m, lattice, pieces), (w, xf, m)


def _dense_update_bwd(lattice, pieces, res, g):
    w, xf, m = res
    n = xf.shape[0]
    gd = g * m[:, None]
    grads, gx = None, g
    if _block_rows(n, lattice, xf.shape[1]) < n:
        for a, b in _row_pieces(n, pieces):
            grads, gx = _piece_backward(w, xf, jnp.arange(a, b), gd, grads, gx, lattice)
        return grads, gx, None
    nb = jnp.asarray(_neighbour_table(lattice)[:-1])
    for a, b in _row_pieces(n, pieces):
        more, gcols, gxc_t = _update_backward(w, _gather_cols(xf, nb[a:b]), gd[a:b].T)
        grads = more if grads is None else jax.tree_util.tree_map(jnp.add, grads, more)
        gx = _scatter_add_rows(gx.at[a:b].add(gxc_t.T), nb[a:b].reshape(-1), gcols.reshape(-1, g.shape[-1]))
    return grads, gx, None


_dense_update.defvjp(_dense_update_fwd, _dense_update_bwd)


# ---- fired cells only
def _chunk_indices(m: jax.Array, chunk: jax.Array, cap: int) -> jax.Array:
    """Indices of the fired cells number ``[chunk*cap, (chunk+1)*cap)``, padded with ``N``."""
    order = _fired_indices(m[None], m.shape[0] + cap)[0][0]
    return jax.lax.dynamic_slice(order, (chunk * cap,), (cap,))


def _extra_chunks(m: jax.Array, cap: int, body: Callable, init: tuple) -> tuple:
    # More fired cells than the capacity (p < 1e-3 per step): process the rest chunk by chunk.
    # The cond keeps XLA from hoisting the (chunk-independent) full compaction out of the loop,
    # where it would run every step (measured ~0.25 ms per step).
    count = jnp.sum(m, dtype=jnp.int32)

    def loop(init):
        return jax.lax.while_loop(lambda s: s[0] * cap < count, lambda s: (s[0] + 1,) + body(s[0], *s[1:]), (1,) + init)[1:]

    return jax.lax.cond(count > cap, loop, lambda init: init, init)


def _add_update(w: Params, xf: jax.Array, out: jax.Array, idx: jax.Array, lattice: Lattice, pieces: int) -> jax.Array:
    """``out`` plus the update of the cells ``idx (K,)`` (padding ``N`` dropped), from state ``xf``."""
    parts = [idx[a:b] for a, b in _row_pieces(idx.shape[0], pieces)]
    d = jnp.concatenate([_piece_rows(w, xf, p, lattice) for p in parts])
    return out.at[idx].add(d, mode="drop", unique_indices=True, indices_are_sorted=True)


def _add_backward(w, xf, idx, g, grads, gx, lattice, pieces):
    """Adds the gradients of :func:`_add_update` given ``g = dL/dout`` to ``grads`` (or None)
    and ``gx``, in :func:`cell_chains` independent pieces as the forward."""
    for piece in [idx[a:b] for a, b in _row_pieces(idx.shape[0], pieces)]:
        grads, gx = _piece_backward(w, xf, piece, g, grads, gx, lattice)
    return grads, gx


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fired_update(
    w: Params, xf: jax.Array, m: jax.Array, idx: jax.Array, lattice: Lattice, pieces: int, overflow_possible: bool,
) -> jax.Array:
    """``xf + d * m`` computing ``d`` only at the fired cells.

    ``m (N,)`` bool; ``idx (cap,)`` the first ``cap`` fired cells in order, padded with ``N``.
    With ``overflow_possible=False`` the caller knows that at most ``cap`` cells fired: no
    check and no extra chunks, so the scatter can update the state in place (the check reads
    the old state afterwards, which cost two state copies per step, ~5 % of a batch-1
    inference).
    """
    cap = idx.shape[0]
    out = _add_update(w, xf, xf, idx, lattice, pieces)
    if overflow_possible:
        more = lambda c, o: (_add_update(w, xf, o, _chunk_indices(m, c, cap), lattice, pieces),)  # noqa: E731
        (out,) = _extra_chunks(m, cap, more, (out,))
    return out


def _fired_update_fwd(w, xf, m, idx, lattice, pieces, overflow_possible):
    return _fired_update(w, xf, m, idx, lattice, pieces, overflow_possible), (w, xf, m, idx)


def _fired_update_bwd(lattice, pieces, overflow_possible, res, g):
    w, xf, m, idx = res
    cap = idx.shape[0]
    grads, gx = _add_backward(w, xf, idx, g, None, g, lattice, pieces)
    if overflow_possible:
        more = lambda c, gr, gx_: _add_backward(w, xf, _chunk_indices(m, c, cap), g, gr, gx_, lattice, pieces)  # noqa: E731
        grads, gx = _extra_chunks(m, cap, more, (grads, gx))
    return grads, gx, None, None


_fired_update.defvjp(_fired_update_fwd, _fired_update_bwd)


_PREFIX_BLOCK = 64  # cells per block of the compaction's running count


def _fired_indices(fired: jax.Array, cap: int) -> tuple[jax.Array, jax.Array]:
    """``(S, N)`` bool masks -> ``(S, cap)`` int32: the first ``cap`` fired cells of each step in
    order, padded with ``N`` (what ``jnp.nonzero(size=cap, fill_value=N)`` gives per step),
    and whether any step has more than ``cap`` fired cells (bool scalar).

    One compaction for all steps (per step it costs ~0.3 ms of small-op overhead on CPU), and
    not through ``jnp.nonzero``, which is 2.4x slower here (64 x 4096 cells: 2.0 against 0.81
    ms; with the masks computed once, see :func:`_fired_cells`, a batch-1 inference got 4 %
    faster). The running count of fired cells
    is a matmul with a triangular matrix inside blocks of 64 cells (exact in float32) plus a
    cumsum over the block totals; each fired cell is then scattered to its slot in one flat
    scatter, whose last element collects the cells that get no slot.
    """
    s, n = fired.shape
    b = _PREFIX_BLOCK
    nb = -(-n // b)
    rows = s * nb
    blocks = jnp.pad(fired, ((0, 0), (0, nb * b - n))).reshape(rows, b).astype(jnp.float32)
    within = blocks @ jnp.triu(jnp.ones((b, b), jnp.float32))  # inclusive count inside each block
    # Per block (small arrays, so that the per-cell pass below needs no index arithmetic):
    # the flat slot before its first cell, the end of its step's slots, its first cell. The
    # totals are sliced from the float product: sliced after the int conversion, XLA fused
    # this per-block work into the per-cell pass (measured 1.5x slower).
    totals = within[:, -1].astype(jnp.int32).reshape(s, nb)
    step_start = jnp.arange(s, dtype=jnp.int32)[:, None] * cap
    base = (jnp.cumsum(totals, axis=1) - totals + step_start - 1).reshape(rows, 1)
    end = ((step_start + cap) * jnp.ones((1, nb), jnp.int32)).reshape(rows, 1)
    first_cell = (jnp.arange(rows, dtype=jnp.int32) % nb * b).reshape(rows, 1)
    slot = within.astype(jnp.int32) + base
    slot = jnp.where((blocks > 0) & (slot < end), slot, s * cap)
    cells = first_cell + jax.lax.broadcasted_iota(jnp.int32, (rows, b), 1)
    # promise_in_bounds: every slot is in [0, s * cap]; "drop" with out-of-range slots instead
    # measured 5x slower.
    out = jnp.full((s * cap + 1,), n, jnp.int32).at[slot.reshape(-1)].set(cells.reshape(-1), mode="promise_in_bounds")
    return out[:-1].reshape(s, cap), jnp.any(jnp.sum(totals, axis=1) > cap)



def _flat_step(
    w: Params, xf: jax.Array, fired: jax.Array, idx: jax.Array | None, lattice: Lattice, pieces: int
) -> jax.Array:
    """``xf + d * fired`` on the flattened state ``xf (N, C)``, ``N = B * prod(S)``, with
    weights ``w`` from :func:`_prepare` (which keeps the input channels as they are);
    ``fired (N,)`` bool; ``idx`` from :func:`_fired_indices`, or ``None``: dense."""
    if idx is None:
        return _dense_update(w, xf, fired.astype(xf.dtype), lattice, pieces)
    return _fired_update(w, xf, fired, idx, lattice, pieces, True)


def _fired_cells(masks: jax.Array) -> jax.Array:
    """``(steps, B, *S)`` bool masks -> ``(steps, N)`` bool, ``N = B * prod(S)``, computed once.

    The sqrt leaves 0 and 1 as they are. It is there because XLA counts it as expensive and so
    materialises the masks; otherwise it fuses the Threefry hash (~100 integer ops per number)
    into each consumer of the masks, three or four times over (~1 ms of a batch-1 inference).
    """
    return jnp.sqrt(masks.reshape(masks.shape[0], -1).astype(jnp.float32)) > 0


def _step_inputs(fired: jax.Array, fire_rate: float | jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Per-step scan inputs from ``fired (S, N)``: the masks, the fired indices ``(S, cap)`` and
    whether a step has more fired cells than ``cap`` (bool scalar); both None on the dense path."""
    cap = fired_capacity(fired.shape[-1], fire_rate)
    if cap is None:
        return fired, None, None
    return (fired,) + _fired_indices(fired, cap)


def _scan_steps(
    step: Callable[[jax.Array, tuple], jax.Array], x: jax.Array, xs: tuple, trajectory: bool
) -> tuple[jax.Array, jax.Array | None]:
    def body(carry, a):
        new = step(carry, a)
        return new, (new if trajectory else None)

    return jax.lax.scan(body, x, xs)


def unsupported(rule: Rule) -> str | None:
    """Why this backend cannot run ``rule`` (``None``: it runs it exactly). Derived from the
    description: a linear perception (its filters are all it reads) of any odd window and
    spatial rank, the ``mlp`` update with norm ``none``, float32."""
    if not get_perception(rule.perception).linear:
        return f"runs linear perceptions only, and perception {rule.perception!r} is not linear"
    if rule.update != "mlp":
        return f"runs the 'mlp' update only, not update {rule.update!r}"
    if rule.norm != "none":
        return f"runs the 'mlp' update without normalisation only, not norm {rule.norm!r}"
    if rule.precision != "float32":
        return f"computes in float32 only, not model.precision={rule.precision!r}"
    return None


def check_supported(rule: Rule) -> None:
    """Raise ``ValueError`` naming what this backend lacks for ``rule`` (:func:`unsupported`)."""
    why = unsupported(rule)
    if why:
        raise ValueError(f"backend 'cpu_fast' {why}; use model.backend='reference' or 'auto'")


def rollout(
    rule: Rule,
    params: Params,
    x: jax.Array,
    image: jax.Array,
    masks: jax.Array,
    fire_rate: float | jax.Array,
    *,
    pieces: int = 1,
    remat: str = "none",
    trajectory: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """The reference rollout (:func:`mednca_jax.nca.rollout.reference_rollout`) on the fast path.

    ``x (B, *S, C)`` of any spatial rank, ``image (B, *S, n_in)`` (already in ``x``'s input
    channels), ``masks (steps, B, *S)`` bool; ``fire_rate`` only sizes the compaction (a
    traced rate runs the dense path). ``remat``: ``"none"`` and ``"step"`` store one state per
    step (each step's custom VJP recomputes its activations from the state); ``"nested"``
    also checkpoints blocks of ~sqrt(steps) steps. Returns ``(state, trajectory (steps, B,
    *S, C) or None)``.
    """
    check_supported(rule)
    steps = masks.shape[0]
    lattice = Lattice(tuple(x.shape[:-1]), rule.kernel_size)
    w = _prepare(rule, params, image.shape[-1])
    fired_all = _fired_cells(masks)

    def run(carry, fired):
        fired, idx, overflow = _step_inputs(fired, fire_rate)
        exact = partial(_scan_steps, lambda c, a: _flat_step(w, c, *a, lattice, pieces), xs=(fired, idx), trajectory=trajectory)
        if idx is None:
            return exact(carry)
        # When no step of the block has more fired cells than the capacity, the scan runs the
        # capped step; otherwise the exact one, chunk by chunk. At fire 0.5 a step overflows
        # with p ~ 5e-4 (4096 cells) to 7e-4 (12288), so ~3-5 % of 64-step rollouts are exact.
        capped = partial(
            _scan_steps, lambda c, a: _fired_update(w, c, *a, lattice, pieces, False), xs=(fired, idx), trajectory=trajectory
        )
        return jax.lax.cond(overflow, exact, capped, carry)

    # Written once: the steps leave the input channels unchanged (see _prepare).
    if remat == "nested":
        xf, traj = blocked_scan(run, _flat(x), fired_all, steps)
    else:
        xf, traj = run(_flat(x), fired_all)
    if traj is not None:
        traj = traj.reshape((steps,) + x.shape)
    return xf.reshape(x.shape), traj
