"""Pieces of the fast CPU backend that its equivalence with the reference does not pin:
the neighbour table, the compaction, the piece split. (Equivalence: test_equivalence.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mednca_jax.nca import cpu_fast


def test_piece_count_follows_the_backend_and_the_row_count():
    assert cpu_fast.cell_chains(100_000, 1) == 1
    assert cpu_fast.cell_chains(100_000, 2) == 2
    assert cpu_fast.cell_chains(2 * cpu_fast.MIN_ROWS_PER_CHAIN - 1, 2) == 1
    assert cpu_fast._row_pieces(2100, 2) == [(0, 1050), (1050, 2100)]


def test_neighbour_table_is_the_reflect_padded_im2col():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 4, 3))
    cols = cpu_fast._gather_cols(x.reshape(-1, 3), jnp.asarray(cpu_fast._neighbour_table((2, 5, 4))[:-1]))
    # im2col of the reflect-padded state: column block 3*dh + dw is the neighbour (dh-1, dw-1)
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    im2col = np.concatenate([xp[:, i : i + 5, j : j + 4] for i in range(3) for j in range(3)], axis=-1)
    np.testing.assert_array_equal(cols, im2col.reshape(-1, 27))


@pytest.mark.parametrize(
    "steps,cells,p_fire,cap",
    [(4, 4096, 0.5, 2152), (3, 100, 0.5, 40), (4, 70, 1.0, 70), (4, 70, 0.0, 8), (5, 130, 0.3, 200), (2, 64, 0.9, 64)],
)
def test_fired_indices_is_nonzero_per_step(steps, cells, p_fire, cap):
    # Cell counts that are and are not multiples of the compaction's block, capacities below,
    # at and above the fired counts, nothing and everything fired.
    fired = jnp.asarray(np.random.default_rng(cells).random((steps, cells)) < p_fire)
    idx, more = jax.jit(cpu_fast._fired_indices, static_argnums=1)(fired, cap)
    for s, f in enumerate(np.asarray(fired)):
        first = np.flatnonzero(f)[:cap]
        np.testing.assert_array_equal(idx[s], np.r_[first, np.full(cap - first.size, cells)])
    assert bool(more) == bool((np.asarray(fired).sum(axis=1) > cap).any())
