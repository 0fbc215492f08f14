"""The fast NCA step (fired cells only, custom VJP) equals the plain formulation.

The reference below is the textbook step ``x + nca_update(x) * fire_mask`` with JAX autodiff;
``rollout`` must give the same states and gradients on the compacted path, on the dense path
(traced fire rate), and when more cells fire than the static capacity (extra chunks).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_level_params

from mednca_jax import model as M

C, HID = 6, 16


def _reference(p, x, image, key, steps, rate):
    for k in jax.random.split(key, steps):
        x = M.reset_inputs(x + M.nca_update(p, x) * M.fire_mask(k, x.shape, rate), image)
    return x


def _loss(fn, p, x, rate):
    out = fn(p, x, x[..., :1], jax.random.PRNGKey(7), 5, rate)
    return jnp.sum(jnp.sin(out))


def _fast(p, x, image, key, steps, rate):
    return M.rollout(p, x, image, key, steps, rate)[0]


def _compare(rate, traced=False, shape=(3, 12, 10, C)):
    p = random_level_params(jax.random.PRNGKey(0), C, HID, scale=1.0)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    fast = (lambda p, x, r: _loss(_fast, p, x, r)) if traced else (lambda p, x, r: _loss(_fast, p, x, rate))
    ref_v, ref_g = jax.value_and_grad(lambda p, x: _loss(_reference, p, x, rate), argnums=(0, 1))(p, x)
    v, g = jax.jit(jax.value_and_grad(fast, argnums=(0, 1)))(p, x, jnp.float32(rate))
    np.testing.assert_allclose(v, ref_v, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_compacted_path_equals_reference(rate):
    assert M.fired_capacity(3 * 12 * 10, rate) is not None  # really the compacted path
    _compare(rate)


def test_dense_path_equals_reference():
    _compare(0.5, traced=True)
    assert M.fired_capacity(360, 0.0) is None and M.fired_capacity(360, jnp.float32(0.5)) is not None


@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_overflowing_the_capacity_is_exact(monkeypatch, rate):
    monkeypatch.setattr(M, "SPARSE_SIGMAS", -6.0)  # capacity far below the fired count: extra chunks run
    cap = M.fired_capacity(360, rate)
    assert cap is not None and cap < 360 * (1 - rate) * 0.8
    _compare(rate)


ON_CPU = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the step is split in pieces on CPU only")


@ON_CPU
@pytest.mark.parametrize("path", ["compacted", "overflow", "dense"])
def test_cells_in_independent_pieces_equal_reference(monkeypatch, path):
    # Two usable cores and small pieces: each step's cells are processed in two chains.
    monkeypatch.setattr(M, "usable_cores", lambda: [0, 1])
    monkeypatch.setattr(M, "MIN_ROWS_PER_CHAIN", 8)
    if path == "overflow":
        monkeypatch.setattr(M, "SPARSE_SIGMAS", -6.0)
    assert M.cell_chains(M.fired_capacity(360, 0.5)) == 2 and M._row_pieces(21) == [(0, 10), (10, 21)]
    _compare(0.5, traced=path == "dense")


@ON_CPU
def test_one_piece_on_one_core(monkeypatch):
    monkeypatch.setattr(M, "usable_cores", lambda: [3])
    assert M.cell_chains(100_000) == 1
    monkeypatch.setattr(M, "usable_cores", lambda: [0, 1])
    assert M.cell_chains(100_000) == 2 and M.cell_chains(2 * M.MIN_ROWS_PER_CHAIN - 1) == 1


def test_neighbour_table_is_the_reflect_padded_im2col():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 4, 3))
    cols = M._gather_cols(x.reshape(-1, 3), jnp.asarray(M._neighbour_table((2, 5, 4))[:-1]))
    np.testing.assert_array_equal(cols, M.im2col3x3(x).reshape(-1, 27))


@pytest.mark.parametrize(
    "steps,cells,p_fire,cap",
    [(4, 4096, 0.5, 2152), (3, 100, 0.5, 40), (4, 70, 1.0, 70), (4, 70, 0.0, 8), (5, 130, 0.3, 200), (2, 64, 0.9, 64)],
)
def test_fired_indices_is_nonzero_per_step(steps, cells, p_fire, cap):
    # Cell counts that are and are not multiples of the compaction's block, capacities below,
    # at and above the fired counts, nothing and everything fired.
    fired = jnp.asarray(np.random.default_rng(cells).random((steps, cells)) < p_fire)
    idx, more = jax.jit(M._fired_indices, static_argnums=1)(fired, cap)
    for s, f in enumerate(np.asarray(fired)):
        first = np.flatnonzero(f)[:cap]
        np.testing.assert_array_equal(idx[s], np.r_[first, np.full(cap - first.size, cells)])
    assert bool(more) == bool((np.asarray(fired).sum(axis=1) > cap).any())
