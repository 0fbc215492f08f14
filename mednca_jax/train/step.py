"""The optimiser, the train state and the pure, jit-compiled train step.

``train_step(state, batch, key) -> (state, metrics)`` is compiled once per run: the config
and the optimiser are closed over (static), only arrays flow in. With a device mesh the
batch is sharded along its first axis and params / optimiser state are replicated; the step
is a ``shard_map`` in which each device works on its rows and only the loss sums and the
gradients are added across devices. Every sample draws its random numbers from its own key
(``fold_in(key, i)``, made before the batch is split), so N devices compute the same step as
one (up to float rounding).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mednca_jax import networks
from mednca_jax.augment import augment_batch, augment_keys_of
from mednca_jax.config import Config, TrainConfig
from mednca_jax.losses import LOSS_SUMS, has_foreground
from mednca_jax.nca.backends import Backend
from mednca_jax.nca.rule import sample_keys

Batch = dict[str, jax.Array]  # {"image": (B, H, W, n_in), "label": (B, H, W, n_out)}


class TrainState(NamedTuple):
    """Everything the train step carries from one batch to the next.

    ``ema``: exponential moving average of ``params`` (``train.ema_decay > 0``; else None),
    what validation, the best checkpoint and export use (:func:`eval_params`).
    ``budget_used``: float32 scalar, the fraction of the time budget (``train.time_limit_min``)
    used before this step; the host loop sets it (:func:`with_budget_used`), the budget
    schedules read it, the others ignore it.
    """

    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: batches seen
    ema: Any = None
    budget_used: Any = None


def is_budget_schedule(tcfg: TrainConfig) -> bool:
    return tcfg.schedule.startswith("budget_")


def _anneal(kind: str, lr_final: float, f: jax.Array) -> jax.Array:
    """1 at ``f = 0`` to ``lr_final`` at ``f = 1``: ``"cosine"`` ``r + (1 - r)·(1 + cos πf)/2``,
    ``"exponential"`` ``r**f`` (``r = lr_final``)."""
    f = jnp.clip(jnp.asarray(f, jnp.float32), 0.0, 1.0)
    r = lr_final
    if kind == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + jnp.cos(jnp.pi * f))
    return jnp.power(jnp.float32(r), f)


def _warm(tcfg: TrainConfig, step: jax.Array) -> jax.Array | float:
    """Linear warm-up from 1/100 to 1 over ``warmup_steps``."""
    if tcfg.warmup_steps == 0:
        return 1.0
    return jnp.minimum(1.0, 0.01 + 0.99 * jnp.asarray(step, jnp.float32) / tcfg.warmup_steps)


def learning_rate_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """The step-count schedules, after an optional linear warm-up of ``warmup_steps``:
    ``"exponential"``, ``lr * lr_decay**step`` (the original's per-batch exponential decay), and
    ``"cosine"``, from ``lr`` to ``lr * lr_final`` over ``num_steps`` (the same curve as
    ``budget_cosine`` with the fraction of steps for the fraction of time: a pure function of
    the step, so two runs of one config are identical whatever the machine's speed). See
    :func:`budget_learning_rate` for the time-budgeted ones."""
    if tcfg.schedule == "cosine":
        return lambda step: tcfg.lr * _warm(tcfg, step) * _anneal("cosine", tcfg.lr_final, jnp.asarray(step, jnp.float32) / tcfg.num_steps)
    decay = optax.exponential_decay(tcfg.lr, transition_steps=1, decay_rate=tcfg.lr_decay)
    if tcfg.warmup_steps == 0:
        return decay
    warm = optax.linear_schedule(tcfg.lr / 100.0, tcfg.lr, tcfg.warmup_steps)
    return optax.join_schedules([warm, decay], [tcfg.warmup_steps])


def budget_learning_rate(tcfg: TrainConfig, step: jax.Array, budget_used: jax.Array) -> jax.Array:
    """The learning rate of the time-budgeted schedules (``train.schedule = "budget_*"``).

    ``lr · warm(step) · anneal(f)`` with ``f = clip(budget_used, 0, 1)`` the fraction of
    ``train.time_limit_min`` used: ``warm`` rises linearly from 1/100 to 1 over
    ``warmup_steps`` (in steps, like the exponential schedule's), ``anneal`` goes from 1 to
    ``lr_final`` at the end of the budget: ``budget_cosine``: ``r + (1 - r)·(1 + cos πf)/2``;
    ``budget_exponential``: ``r**f`` (``r = lr_final``).

    Why the fraction of the budget is an input: a 10-minute and a 60-minute run should both
    end annealed, and the number of steps that fit in the budget is unknown in advance (it
    depends on the machine and its load). Estimating steps-per-minute after a warm-up and
    fixing a step count would miss the end whenever the speed changes (validation, other jobs,
    a resume on another machine). Instead the host passes the elapsed fraction each step as an
    array in the train state (:func:`with_budget_used`): no retracing, and the learning rate is
    a pure function of ``(step, budget_used)``. The elapsed time is saved in every checkpoint
    (``meta.elapsed_s``), so a resumed run continues the schedule where it stopped. By design
    this schedule depends on wall-clock time: two runs of the same config take different
    learning rates at the same step; the LR at step s after a resume equals the uninterrupted
    run's only when the same elapsed time is fed in. (``"cosine"`` is the step-count twin
    for runs that must be reproducible.)
    """
    if not is_budget_schedule(tcfg):
        raise ValueError(f"train.schedule={tcfg.schedule!r} is not a budget schedule")
    return tcfg.lr * _warm(tcfg, step) * _anneal(tcfg.schedule.removeprefix("budget_"), tcfg.lr_final, budget_used)


def current_learning_rate(tcfg: TrainConfig, state: TrainState) -> jax.Array:
    """The learning rate the next update of ``state`` uses, whatever the schedule."""
    if is_budget_schedule(tcfg):
        return budget_learning_rate(tcfg, state.step, state.budget_used)
    return learning_rate_schedule(tcfg)(state.step)


def scale_by_budget_learning_rate(tcfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """``updates · -budget_learning_rate(count, budget_used)``, ``budget_used`` passed to
    ``update`` as an extra argument (optax's extra-args protocol; ``optax.chain`` forwards it)."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, budget_used, **extra):
        del params, extra
        lr = budget_learning_rate(tcfg, state.count, budget_used)
        updates = jax.tree_util.tree_map(lambda u: (-lr * u).astype(u.dtype), updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """Adam with the original's defaults (betas (0.5, 0.5), eps 1e-8) on ``train.schedule``,
    after clipping the gradient to global norm ``train.clip_grad_norm`` when that is > 0.

    With clipping off and the exponential schedule this is exactly the original optimiser
    (``optax.adam``, the same state layout). A budget schedule's ``update`` needs the extra
    argument ``budget_used`` (float32 scalar, see :func:`budget_learning_rate`).
    """
    if is_budget_schedule(tcfg):
        adam = optax.chain(
            optax.scale_by_adam(b1=tcfg.betas[0], b2=tcfg.betas[1], eps=tcfg.eps), scale_by_budget_learning_rate(tcfg)
        )
    else:
        adam = optax.adam(learning_rate_schedule(tcfg), b1=tcfg.betas[0], b2=tcfg.betas[1], eps=tcfg.eps)
    if tcfg.clip_grad_norm > 0:
        # Without clipping an independent reproduction of the original diverged silently.
        return optax.chain(optax.clip_by_global_norm(tcfg.clip_grad_norm), adam)
    return adam


def init_train_state(params: Any, tx: optax.GradientTransformation, ema: bool = False) -> TrainState:
    """A fresh state; ``ema=True`` starts the moving average at ``params`` (``train.ema_decay > 0``)."""
    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: the train step donates its state
    average = jax.tree_util.tree_map(jnp.array, params) if ema else None
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), average, jnp.zeros((), jnp.float32))


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``decay · ema + (1 - decay) · params``, leaf by leaf."""
    return optax.incremental_update(params, ema, 1.0 - decay)


def eval_params(state: TrainState) -> Any:
    """The params to validate, keep as best and export: the EMA when there is one."""
    return state.params if state.ema is None else state.ema


def budget_fraction(tcfg: TrainConfig, elapsed_s: float) -> np.float32:
    """The fraction of ``train.time_limit_min`` that ``elapsed_s`` seconds are (0 without a limit)."""
    if not tcfg.time_limit_min:
        return np.float32(0.0)
    return np.float32(elapsed_s / (tcfg.time_limit_min * 60.0))


def with_budget_used(state: TrainState, tcfg: TrainConfig, elapsed_s: float) -> TrainState:
    """``state`` with ``budget_used`` set from the run's elapsed time, for budget schedules
    (a host scalar: the step takes it as an input, no retracing); unchanged otherwise."""
    if not is_budget_schedule(tcfg):
        return state
    return state._replace(budget_used=budget_fraction(tcfg, elapsed_s))


def loss_fn(params: Any, cfg: Config, batch: Batch, keys: jax.Array, backend: Backend) -> tuple[jax.Array, jax.Array]:
    """The loss (``train.loss``) of one batch with per-sample ``keys (B,)``; also returns
    whether the (cropped) labels had any foreground."""
    logits, labels = networks.forward_train(params, cfg, batch["image"], batch["label"], keys, backend)
    to_sums, from_sums = LOSS_SUMS[cfg.train.loss]
    return from_sums(to_sums(logits, labels)), has_foreground(labels)


def loss_and_grads(
    params: Any, cfg: Config, batch: Batch, keys: jax.Array, backend: Backend, axis: str | None = None
) -> tuple[jax.Array, Any, jax.Array]:
    """``(loss, grads, active)`` of one batch with per-sample ``keys (B,)``, or with ``axis``
    of the whole batch whose rows these are (inside ``shard_map``).

    The loss (``train.loss``) is a function of batch sums (:data:`mednca_jax.losses.LOSS_SUMS`): each part differentiates its
    sums, the sums are added over ``axis``, and the loss's gradient with respect to them is
    pulled back through each part's VJP. Nothing is differentiated through a collective.
    ``active``: whether the (cropped) labels have any foreground.
    """

    to_sums, from_sums = LOSS_SUMS[cfg.train.loss]

    def sums(p):
        logits, labels = networks.forward_train(p, cfg, batch["image"], batch["label"], keys, backend)
        return to_sums(logits, labels)

    s, pullback = jax.vjp(sums, params)
    if axis is not None:
        s = jax.lax.psum(s, axis)
    loss, g_sums = jax.value_and_grad(from_sums)(s)
    (grads,) = pullback(g_sums)
    if axis is not None:
        grads = jax.lax.psum(grads, axis)
    return loss, grads, jnp.any(s[:, 3] > 0)  # labels are in [0, 1]: a positive sum is foreground


def _train_step(
    state: TrainState, batch: Batch, keys: jax.Array, *, cfg: Config, tx: optax.GradientTransformation,
    backend: Backend, axis: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on ``batch`` with per-sample keys ``keys (B,)``."""
    # Augmentation ([augment]): its own key stream, derived from each sample's key.
    if cfg.augment.enabled:
        batch = augment_batch(batch, augment_keys_of(keys), cfg.augment)
    loss, grads, active = loss_and_grads(state.params, cfg, batch, keys, backend, axis)
    extra = {"budget_used": state.budget_used} if is_budget_schedule(cfg.train) else {}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    # A batch without foreground makes no update at all, as in the original (whose loss is 0
    # there and which then skips optimizer.step(); Adam would otherwise still move).
    keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
    params = jax.tree_util.tree_map(keep, params, state.params)
    opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
    ema = state.ema
    if cfg.train.ema_decay > 0:
        if ema is None:
            raise ValueError("train.ema_decay > 0 needs a state with an EMA: init_train_state(params, tx, ema=True)")
        ema = jax.tree_util.tree_map(keep, ema_update(state.ema, params, cfg.train.ema_decay), state.ema)
    metrics = {
        "loss": loss,
        "lr": current_learning_rate(cfg.train, state),
        "grad_norm": optax.tree.norm(grads),
        "skipped": jnp.logical_not(active),
    }
    return TrainState(params, opt_state, state.step + 1, ema, state.budget_used), metrics


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over all (global) devices."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by the number of devices ({n}) for "
            f"data-parallel training; use e.g. batch_size={max(n, batch_size - batch_size % n)}"
        )


def make_train_step(
    cfg: Config, tx: optax.GradientTransformation, mesh: Mesh | None = None, *, backend: Backend
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted ``train_step(state, batch, key) -> (state, metrics)`` for this config.

    With ``mesh``, the batch must be sharded with :func:`batch_sharding` (see
    :func:`put_batch`) and the state replicated; outputs keep those shardings. ``backend``:
    the resolved backend (:func:`mednca_jax.machine.backend_for`, at the entry point).
    """
    if mesh is None:
        def single(state, batch, key):
            keys = sample_keys(key, batch["image"].shape[0])
            return _train_step(state, batch, keys, cfg=cfg, tx=tx, backend=backend)

        return jax.jit(single, donate_argnums=0)
    check_batch_divisible(cfg.train.batch_size, mesh)

    # Each device runs the whole step on its rows with its samples' keys; only the loss sums
    # and the gradients cross devices. Letting XLA partition the global program instead moved
    # the gathers of every NCA step across devices.
    def local_step(state, batch, keys):
        return _train_step(state, batch, keys, cfg=cfg, tx=tx, backend=backend, axis="data")

    # check_vma=False: the custom VJPs of the NCA step return per-device gradients that the
    # psum above makes equal; the outputs are replicated by construction.
    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("data"), PartitionSpec("data")),
        out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False,
    )

    def step(state, batch, key):
        return sharded(state, batch, sample_keys(key, batch["image"].shape[0]))

    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(rep, data, rep), out_shardings=(rep, rep), donate_argnums=0)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh | None) -> Batch:
    """Move a host batch to the devices: sharded along the batch axis with a mesh.

    With several processes, each passes its own slice of the global batch.
    """
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    sharding = batch_sharding(mesh)
    if jax.process_count() > 1:
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def local_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a global host batch (every process draws the same global batch
    from the same seed; with one process this is the whole batch)."""
    n, pid = jax.process_count(), jax.process_index()
    if n == 1:
        return batch
    return {k: np.array_split(v, n)[pid] for k, v in batch.items()}


def put_replicated(tree: Any, mesh: Mesh | None) -> Any:
    return tree if mesh is None else jax.device_put(tree, replicated(mesh))
