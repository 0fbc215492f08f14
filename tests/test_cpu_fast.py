"""The fast CPU backend: its pieces (neighbour table, compaction, piece split, blocks) and its
equivalence with the reference rollout in any spatial rank and window, on the same masks
(values and gradients). The 2D 3x3 equivalence in depth: test_equivalence.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mednca_jax.nca import cpu_fast
from mednca_jax.nca.backends import Backend
from mednca_jax.nca.perceptions import PERCEPTIONS, Perception
from mednca_jax.nca.rollout import rollout
from mednca_jax.nca.rule import Rule, fire_masks, init_level, sample_keys

C, HIDDEN = 6, 12


def test_piece_count_follows_the_backend_and_the_row_count():
    assert cpu_fast.cell_chains(100_000, 1) == 1
    assert cpu_fast.cell_chains(100_000, 2) == 2
    assert cpu_fast.cell_chains(2 * cpu_fast.MIN_ROWS_PER_CHAIN - 1, 2) == 1
    assert cpu_fast._row_pieces(2100, 2) == [(0, 1050), (1050, 2100)]


def _im2col(x: np.ndarray, k: int) -> np.ndarray:
    """Reflect-padded windows of ``x (B, *S, c)`` as ``(B * prod(S), k**ndim * c)``, offsets in
    the row-major order of the kernel axes (what ``K.reshape(-1, F)`` multiplies)."""
    spatial, r = x.shape[1:-1], k // 2
    xp = np.pad(x, [(0, 0)] + [(r, r)] * len(spatial) + [(0, 0)], mode="reflect")
    blocks = []
    for offset in np.ndindex(*(k,) * len(spatial)):
        window = tuple(slice(o, o + n) for o, n in zip(offset, spatial))
        blocks.append(xp[(slice(None),) + window])
    return np.concatenate(blocks, axis=-1).reshape(-1, k ** len(spatial) * x.shape[-1])


@pytest.mark.parametrize(
    "grid,k",
    [((2, 5, 4), 3), ((1, 6, 5), 5), ((1, 4, 7), 7), ((2, 3, 5, 4), 3), ((1, 6, 5, 4), 5), ((1, 2, 3, 1), 5)],
    ids=["2d-k3", "2d-k5", "2d-k7-wider-than-an-axis", "3d-k3", "3d-k5", "3d-k5-axes-of-1-2-3"],
)
def test_neighbour_table_is_the_reflect_padded_im2col(grid, k):
    # Includes windows wider than an axis (reflected repeatedly, as jnp.pad does) and axes of 1.
    x = np.random.default_rng(2).standard_normal(grid + (3,)).astype(np.float32)
    lattice = cpu_fast.Lattice(grid, k)
    table = cpu_fast._neighbour_table(lattice)
    assert table.shape == (int(np.prod(grid)) + 1, k ** (len(grid) - 1)) and (table[-1] == np.prod(grid)).all()
    cols = cpu_fast._gather_cols(jnp.asarray(x.reshape(-1, 3)), jnp.asarray(table[:-1]))
    np.testing.assert_array_equal(cols, _im2col(x, k))
    # the centre column is the cell itself
    np.testing.assert_array_equal(table[:-1, lattice.taps // 2], np.arange(np.prod(grid)))


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


def test_blocks_bound_the_gathered_columns():
    lat = cpu_fast.Lattice((4, 32, 32, 26), 7)  # 7x7x7 windows of 16 channels: 22 KB per cell
    rows = cpu_fast._block_rows(50_000, lat, 16)
    assert rows % 8 == 0 and rows * lat.taps * 16 * 4 <= cpu_fast.BLOCK_BYTES
    # the 2D 3x3 training and grouped-inference pieces run unblocked
    assert cpu_fast._block_rows(48 * 16 * 16, cpu_fast.Lattice((48, 16, 16), 3), 16) == 48 * 16 * 16
    assert cpu_fast._block_rows(8 * 64 * 64, cpu_fast.Lattice((8, 64, 64), 3), 16) == 8 * 64 * 64
    np.testing.assert_array_equal(cpu_fast._blocks_of(jnp.arange(5), 2, 9), [[0, 1], [2, 3], [4, 9]])


# --------------------------------------------------------------------------- against the reference
def _level(perception: str, k: int, ndim: int):
    rule = Rule(perception, k, "mlp", "none", C, HIDDEN, 1, ndim, "float32")
    params = init_level(jax.random.PRNGKey(k + 10 * ndim), rule)
    # fc1 starts at zero (a fresh NCA is the identity, which tests nothing)
    params["fc1"]["kernel"] = 0.5 * jax.random.normal(jax.random.PRNGKey(1), params["fc1"]["kernel"].shape) / np.sqrt(HIDDEN)
    return rule, params


def _value_and_grads(rule, params, x, image, masks, rate, backend, remat):
    target = jax.random.normal(jax.random.PRNGKey(7), x.shape)

    def loss(p, x0):
        out, _ = rollout(p, x0, image, jax.random.PRNGKey(0), masks.shape[0], rate, rule=rule, backend=backend,
                         remat=remat, masks=masks)
        return jnp.sum(jnp.tanh(out) * target), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return out, grads


def _close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    scale = float(np.max(np.abs(want)))
    assert scale > 0, f"{what}: nothing to compare"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * scale, err_msg=what)


def _compare(perception, k, spatial, rate, pieces=1, remat="none", steps=4, batch=2, expect="sparse"):
    rule, params = _level(perception, k, len(spatial))
    x = 0.5 * jax.random.normal(jax.random.PRNGKey(3), (batch,) + spatial + (C,))
    image = jax.random.uniform(jax.random.PRNGKey(4), (batch,) + spatial + (1,))
    masks = fire_masks(sample_keys(jax.random.PRNGKey(5), batch), steps, spatial, rate)
    n = batch * int(np.prod(spatial))
    assert (cpu_fast.fired_capacity(n, rate) is None) == (expect == "dense")  # really the path named
    # The reference without remat: checkpointing changes neither values nor gradients there
    # (test_equivalence.py), and this keeps its compile time out of the suite.
    want = _value_and_grads(rule, params, x, image, masks, rate, Backend("reference"), "none")
    got = _value_and_grads(rule, params, x, image, masks, rate, Backend("cpu_fast", pieces), remat)
    _close(got[0], want[0], "final state")
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree_util.tree_leaves(want[1])):
        if np.any(np.asarray(w)):
            _close(g, w, f"gradient {jax.tree_util.keystr(path)}")
        else:  # the input channels of x get no gradient (the image overwrites them)
            np.testing.assert_array_equal(g, w)


# Each case covers several features at once (every case compiles two rollouts' gradients,
# which dominates the time of this suite): rank 3 with windows 3 and 5, rank 2 with 5 and 7,
# the three built-in perceptions, the compacted (fire 0.5) and dense (fire 0) paths, one and
# two pieces, remat none and nested, overflow chunks and blocks.
CASES = [
    # perception, k, spatial, fire rate, pieces, remat, extra chunks, blocks, path
    ("learned", 3, (6, 5, 4), 0.5, 2, "nested", True, False, "sparse"),
    ("sobel", 3, (6, 5, 4), 0.0, 1, "none", False, False, "dense"),
    ("depthwise", 5, (6, 5, 4), 0.5, 1, "none", False, True, "sparse"),
    ("learned", 5, (9, 7), 0.0, 2, "none", False, True, "dense"),
    ("depthwise", 7, (9, 7), 0.5, 1, "nested", True, False, "sparse"),
]


def _case_id(c) -> str:
    more = "-overflow" * c[6] + "-blocks" * c[7]
    return f"{len(c[2])}d-{c[0]}-k{c[1]}-fire{c[3]}-pieces{c[4]}-{c[5]}{more}"


@pytest.mark.parametrize("perception,k,spatial,rate,pieces,remat,overflow,blocks,path", CASES, ids=map(_case_id, CASES))
def test_cpu_fast_equals_reference(monkeypatch, perception, k, spatial, rate, pieces, remat, overflow, blocks, path):
    # Pieces of a few rows, so that two pieces run on these small grids.
    monkeypatch.setattr(cpu_fast, "MIN_ROWS_PER_CHAIN", 16)
    n = 2 * int(np.prod(spatial))
    if overflow:  # capacity far below the fired count: extra chunks run
        monkeypatch.setattr(cpu_fast, "SPARSE_SIGMAS", -6.0)
        assert cpu_fast.fired_capacity(n, rate) < 0.4 * n
    if blocks:  # blocks of 8 rows: the block loops (forward map, backward scan) run, the last one padded
        monkeypatch.setattr(cpu_fast, "BLOCK_ABOVE_BYTES", 0)
        monkeypatch.setattr(cpu_fast, "BLOCK_BYTES", 1)
        assert cpu_fast._block_rows(100, cpu_fast.Lattice((2,) + spatial, k), C) == 8
    _compare(perception, k, spatial, rate, pieces, remat, expect=path)


# --------------------------------------------------------------------------- what it refuses
def test_unsupported_names_what_is_missing(monkeypatch):
    def rule(**kw):
        return Rule(**{"perception": "learned", "channels": C, "hidden": HIDDEN, **kw})

    assert cpu_fast.unsupported(rule()) is None
    assert cpu_fast.unsupported(rule(ndim=3, kernel_size=7, perception="depthwise")) is None
    assert cpu_fast.unsupported(rule(ndim=1, kernel_size=5)) is None
    assert cpu_fast.unsupported(rule(ndim=3, perception="sobel")) is None
    monkeypatch.setitem(PERCEPTIONS, "squares", Perception(lambda r: r.channels, lambda k, r: {}, apply=lambda p, x, r: x * x))
    assert "'squares' is not linear" in cpu_fast.unsupported(rule(perception="squares"))
    assert "'gru'" in cpu_fast.unsupported(rule(update="gru"))
    assert "norm 'batch'" in cpu_fast.unsupported(rule(norm="batch"))
    assert "float32" in cpu_fast.unsupported(rule(precision="bfloat16")) and "bfloat16" in cpu_fast.unsupported(rule(precision="bfloat16"))
    with pytest.raises(ValueError, match="cpu_fast.*norm 'batch'"):
        cpu_fast.check_supported(rule(norm="batch", ndim=3))
