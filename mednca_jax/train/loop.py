"""The training loop behind ``train.py``: data, split, steps, validation, logs, checkpoints.

Resuming is exact: the checkpoint holds params, optimiser state, the step, the base PRNG
key, the data-iterator position and the learning-rate factor, and the key of step ``s`` is
``fold_in(key, s)``, so a run stopped at step ``k`` and resumed computes the same steps as one
that never stopped.

A library of small functions (:func:`check_run_folder`, :func:`run_lock`, :func:`setup_run`,
:func:`open_run` with :func:`restore_progress` / :func:`fresh_progress`,
:func:`log_train_metrics`, :func:`validate`, :func:`save`, :func:`roll_back`, :func:`finish`)
and a thin loop, :func:`train`.

Faults: a non-finite loss rolls back to the last good checkpoint at half the learning rate
(``train.max_rollbacks`` times, :func:`roll_back`); non-finite params are never saved; the
lock, the clean-up of a failed start, the disk-full error and the processes' agreement are
:mod:`mednca_jax.train.faults`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mednca_jax.train import checkpoint as ckpt
from mednca_jax.config import Config, with_classes
from mednca_jax.errors import MedNCAError
from mednca_jax.data import BatchIterator, Case, DataError, largest_label, load_slices, make_synthetic_task, read_split, write_split
from mednca_jax.data.formats import initial_split, is_images, list_task_cases, resolve_data_config
from mednca_jax.data.synthetic_images import write_image_task
from mednca_jax.evaluate.evaluation import eval_batch_size, evaluate_cases, make_predict_fn, predict_slices
from mednca_jax.nca.backends import Backend
from mednca_jax.networks import init_network_params
from mednca_jax.train.progress import TrainProgress
from mednca_jax.train.faults import (
    RunError, agree, disk_full_error, divergence, interrupt_flag, is_primary, primary_first, process0_value, run_lock,
    set_aside_newer_steps, undo_on_failure, unless_failed,
)
from mednca_jax.train.step import (
    TrainState, eval_params, init_train_state, local_part, make_mesh, make_optimizer, make_train_step, put_batch,
    put_replicated, with_budget_used,
)

SPLIT_FILE = "split.json"
LOG_FILE = "log.jsonl"


@dataclass
class RunData:
    cases: list[Case]
    split: Any
    train: Any  # SliceSet
    val: Any | None
    cfg: Config  # the run's config: with data.labels = "classes", its number of classes is known


def default_data_dir(cfg: Config, workdir: Path) -> Path:
    """The embedded synthetic task for runs without ``--data``, generated once per run folder
    (an image folder, grey or RGB by ``model.n_in``, for ``data.format = "images"``)."""
    root = workdir / "synthetic_data"
    if is_images(cfg.data):
        if not (root / "images").is_dir():
            write_image_task(root, n=cfg.data.synthetic_cases, rgb=cfg.model.n_in == 3, seed=cfg.data.split_seed)
    elif not (root / "dataset.json").is_file():
        make_synthetic_task(root, n_cases=cfg.data.synthetic_cases, seed=cfg.data.split_seed)
    return root


def prepare_data(cfg: Config, data_dir: Path, workdir: Path, cache_dir: Path | None) -> RunData:
    """List labelled cases, make (or re-read) the patient split, load train/val slices. With
    ``data.labels = "classes"`` and no ``data.classes``, the classes are those of the training
    cases: K = their largest label value, in ``RunData.cfg``."""
    cases = [c for c in list_task_cases(data_dir, cfg.data) if c.label is not None]
    if len(cases) < 2:
        raise DataError(f"{data_dir} has {len(cases)} labelled case(s); training needs at least 2")
    split_path = workdir / SPLIT_FILE
    if split_path.is_file():
        split = read_split(split_path)
        unknown = sorted(set(split.train + split.val + split.test) - {c.name for c in cases})
        if unknown:
            raise DataError(f"{split_path} names cases not in {data_dir}: {unknown[:5]}; use the same --data as the first run")
        check_split_matches(split, cfg.data, split_path)
    else:
        split = initial_split([c.name for c in cases], data_dir, cfg.data)  # an image folder's own split.json first
    by_name = {c.name: c for c in cases}
    if cfg.data.classes_from_data:
        if is_images(cfg.data):
            raise DataError(f"config key 'data.classes': {data_dir} is an image folder; with data.labels = 'classes' "
                            "set data.classes to the number of classes (the largest mask value)")
        cfg = with_classes(cfg, max(largest_label([by_name[n] for n in split.train], cfg.data), 1))
    n_out = cfg.model.n_out
    train = load_slices([by_name[n] for n in split.train], cfg.data, cache_dir, n_out)
    if not train.has_foreground.any():
        check = "masks/ (are these the masks?)" if is_images(cfg.data) else \
            "labelsTr/ (are these the label files?) and data.channel / data.slice_axis"
        raise DataError(
            f"the labels of all {len(split.train)} training cases in {data_dir} are background only (no voxel > 0 "
            f"after resizing to {list(cfg.data.image_size)}): the model would never be updated. Check {check}"
        )
    if n_out > 1 and not train.labels[..., -1].any():  # a channel that would never learn anything
        raise DataError(
            f"config key 'data.classes' (model.n_out): {n_out} classes, but no training label in {data_dir} has class "
            f"{n_out} after resizing to {list(cfg.data.image_size)}; set data.classes to the largest class or leave "
            "both keys out (then the training labels decide)"
        )
    val = load_slices([by_name[n] for n in split.val], cfg.data, cache_dir, n_out) if split.val else None
    if not split_path.is_file():
        write_split(split_path, split)  # only once the data is known to be usable
    return RunData(cases, split, train, val, cfg)


def check_split_matches(saved: Any, data_cfg: Any, path: Path) -> None:
    """Raise :class:`RunError` if the split in ``path`` was made with another
    ``data.split_seed`` or ``data.split`` than ``data_cfg`` asks for.

    Reusing an old split silently would train and test on other patients than the config
    says (and could leak test patients into training). The case lists themselves are not
    compared: a split file may have been edited on purpose."""
    if saved.fractions == (0.0, 0.0, 0.0):  # a file from before the seed and fractions were recorded
        return
    diff = []
    if saved.seed != data_cfg.split_seed:
        diff.append(f"data.split_seed {saved.seed} vs {data_cfg.split_seed}")
    if not np.allclose(saved.fractions, data_cfg.split, atol=1e-6):
        diff.append(f"data.split {list(saved.fractions)} vs {list(data_cfg.split)}")
    if diff:
        raise RunError(
            f"{path} was made with another split ({'; '.join(diff)} in this config); keep the run's settings, "
            "choose another --workdir, or delete that split.json to make a new split"
        )


def _image_grid(images: np.ndarray, probs: np.ndarray, labels: np.ndarray, n: int = 4) -> np.ndarray:
    """Rows input / prediction / label for ``n`` slices -> ``(3, 3H, nW)`` CHW image in [0, 1]
    (volumes ``(n, X, Y, Z, c)``: each one's axial slice with the most foreground)."""
    if images.ndim == 5:
        z = labels.reshape(labels.shape[:4] + (-1,)).sum(axis=(1, 2, 4)).argmax(axis=1)  # (n,)
        images, probs, labels = (a[np.arange(a.shape[0]), :, :, z] for a in (images, probs, labels))
    idx = np.linspace(0, images.shape[0] - 1, min(n, images.shape[0])).astype(int)
    row = lambda a: np.concatenate(list(a[idx, ..., 0]), axis=1)  # noqa: E731
    grid = np.concatenate([row(images), row(probs), row(labels)], axis=0).clip(0, 1)
    return np.repeat(grid[None], 3, axis=0)


def _pick_val_images(val: Any, n: int = 4) -> np.ndarray:
    fg = np.flatnonzero(val.has_foreground)
    rows = fg if fg.size else np.arange(len(val))
    return rows[np.linspace(0, rows.size - 1, min(n, rows.size)).astype(int)]


def _write_curve(cfg: Config, workdir: Path) -> None:
    """``curve.png``: validation Dice against minutes (skipped, with a note, without matplotlib)."""
    try:
        from mednca_jax.evaluate.plots import plot_training_curves

        records = [json.loads(l) for l in (workdir / LOG_FILE).read_text().splitlines() if l.strip()]
        if any("val_dice" in r for r in records):
            plot_training_curves({cfg.name: records}, workdir / "curve.png")
    except (ImportError, OSError) as e:  # no matplotlib, or a full disk: the run itself is saved
        print(f"note: no curve.png ({e})")


# --------------------------------------------------------------------------- run folder
def check_run_folder(cfg: Config, workdir: Path, resume: bool) -> None:
    """Refuse a folder holding another run without ``resume``, or a resume without a run or
    with another model / data config (:class:`RunError`, :class:`~.checkpoint.CheckpointError`)."""
    has_ckpt = (workdir / ckpt.LATEST_DIR).is_dir() and any((workdir / ckpt.LATEST_DIR).iterdir())
    if has_ckpt and not resume:
        raise RunError(f"{workdir} already holds a run; pass --resume to continue it or choose another --workdir")
    if resume and not has_ckpt:
        raise RunError(f"--resume: {workdir} holds no checkpoint to resume from")
    if resume:
        saved = ckpt.load_run_config(workdir)
        if cfg.data.classes_from_data and saved.data.labels == "classes":
            cfg = with_classes(cfg, saved.data.classes)  # the count the run read from its training labels
        ckpt.check_same_model(saved, cfg, workdir)
        if saved.data != cfg.data:
            raise RunError(f"--resume: the [data] section differs from the run's {workdir / ckpt.CONFIG_FILE}; resume with the same config")


def setup_run(cfg: Config, workdir: Path, data_dir: str | Path | None, cache_dir: str | Path | None) -> tuple[Path, RunData]:
    """Write the run's config, read (or make) the data and its split. Multi-host: process 0
    first, then the others read what it wrote."""
    primary = is_primary()

    def setup() -> tuple[Path, RunData]:
        root = Path(data_dir) if data_dir is not None else default_data_dir(cfg, workdir)
        data = prepare_data(cfg, root, workdir, Path(cache_dir) if cache_dir else None)
        if primary:
            ckpt.save_run_config(workdir, data.cfg)
            if data_dir is not None:
                ckpt.save_data_dir(workdir, data_dir)
        return root, data

    return primary_first(setup, "setup")


# --------------------------------------------------------------------------- state
@dataclass
class Progress:
    """What a checkpoint restores besides params and optimiser state."""

    state: TrainState
    base_key: jax.Array
    best: float = -1.0
    elapsed_before: float = 0.0
    rollbacks: int = 0  # learning rate is cfg.train.lr * 0.5**rollbacks

    @property
    def lr_factor(self) -> float:
        return 0.5**self.rollbacks


def scaled_config(cfg: Config, rollbacks: int) -> Config:
    """``cfg`` with ``train.lr`` halved ``rollbacks`` times (the optimiser after a divergence)."""
    if rollbacks == 0:
        return cfg
    return cfg.replace(train=dataclasses.replace(cfg.train, lr=cfg.train.lr * 0.5**rollbacks))


def build_step(cfg: Config, rollbacks: int, mesh: Any, backend: Backend) -> tuple[Any, Any]:
    """``(tx, train_step)`` for ``cfg`` at the learning rate of ``rollbacks``."""
    run_cfg = scaled_config(cfg, rollbacks)
    tx = make_optimizer(run_cfg.train)
    return tx, make_train_step(run_cfg, tx, mesh, backend=backend)


def fresh_progress(cfg: Config, tx: Any) -> Progress:
    """Step 0: params from ``fold_in(PRNGKey(seed), 0)``."""
    base_key = jax.random.PRNGKey(cfg.train.seed)
    params = init_network_params(cfg, jax.random.fold_in(base_key, 0))
    return Progress(init_train_state(params, tx, ema=cfg.train.ema_decay > 0), base_key)


def restore_progress(workdir: Path, cfg: Config, tx: Any, batches: BatchIterator) -> tuple[Progress, int]:
    """The newest intact checkpoint of ``workdir/checkpoints`` as :class:`Progress`; also sets
    ``batches`` to its position. Returns ``(progress, step)``."""
    template = fresh_progress(cfg, tx)
    abstract = {"params": template.state.params, "train": {"opt_state": template.state.opt_state, "key": template.base_key}}
    if template.state.ema is not None:
        abstract["train"]["ema"] = template.state.ema
    items, step = ckpt.restore(workdir, abstract, which="latest")
    meta = items["meta"]
    # Committed jax arrays on one device, as the jitted step returns them: a NumPy scalar step
    # (or arrays placed otherwise) would make the step compile a second time.
    state = init_train_state(items["params"], tx)._replace(
        opt_state=items["train"]["opt_state"], step=jnp.asarray(meta["step"], jnp.int32), ema=items["train"].get("ema")
    )
    state = jax.device_put(state, jax.local_devices()[0])
    batches.load_state_dict(meta["data"])
    progress = Progress(
        state, items["train"]["key"], float(meta.get("best_val_dice", -1.0)), float(meta.get("elapsed_s", 0.0)),
        int(meta.get("rollbacks", 0)),
    )
    return progress, step


# --------------------------------------------------------------------------- the loop's parts
@dataclass
class Run:
    """Everything the loop's parts share: config, data, managers, writers and the progress."""

    cfg: Config
    workdir: Path
    data: RunData
    mesh: Any
    batches: BatchIterator
    progress: Progress
    train_step: Any
    latest: Any
    best_mngr: Any
    predict: Any
    eval_key: jax.Array
    writer: Any
    primary: bool
    backend: Backend
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.progress.elapsed_before + time.perf_counter() - self.t0


def log(run: Run, record: dict[str, Any]) -> None:
    """Append one JSON line to ``log.jsonl`` (process 0 only)."""
    if run.primary:
        with open(run.workdir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def tb(run: Run, kind: str, *args: Any) -> None:
    """One TensorBoard call (``add_scalar``, ``add_image``, ...) on process 0."""
    if run.writer is not None:
        getattr(run.writer, kind)(*args)


def log_train_metrics(run: Run, step: int, metrics: dict[str, Any], rate: float) -> dict[str, float]:
    """Fetch the step's metrics, write them to TensorBoard and ``log.jsonl``; return them."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for k in ("loss", "lr", "grad_norm"):
        if np.isfinite(m[k]):  # a non-finite loss is reported by the rollback; tensorboardX would warn per value
            tb(run, "add_scalar", f"train/{k}", m[k], step)
    tb(run, "add_scalar", "train/slices_per_s", rate, step)
    log(run, {"step": step, "minutes": run.elapsed() / 60, "loss": m["loss"], "lr": m["lr"]})
    return m


def validate(run: Run, step: int) -> float | None:
    """Mean hard Dice on the validation cases (the mean over classes; ``None`` without any);
    logs it (and each class's) and an image grid."""
    data, cfg = run.data, run.cfg
    if data.val is None:
        return None
    # Every process validates on its own devices (the same numbers: same params and key),
    # so all agree on the best checkpoint; params spanning several processes come to host.
    params = eval_params(run.progress.state)  # the EMA when kept
    params = jax.device_get(params) if jax.process_count() > 1 else params
    m = evaluate_cases(params, cfg, data.val, data.cases, run.eval_key, native=False, predict=run.predict)
    # Process 0's figure for all: the processes must take the same best-checkpoint decision
    # (the saves are collective), and float rounding may differ between their validations.
    dice = process0_value(m["summary"]["dice"]["mean"])
    tb(run, "add_scalar", "val/dice", dice, step)
    tb(run, "add_scalar", "val/dice_soft", m["summary"]["dice_soft"]["mean"], step)
    rows = _pick_val_images(data.val)
    probs = predict_slices(run.predict, params, data.val.images[rows], run.eval_key, cfg.model.fire_rate, eval_batch_size(cfg, len(rows)))
    fg = lambda a: a.max(axis=-1, keepdims=True)  # noqa: E731  (several classes: any foreground class)
    tb(run, "add_image", "val/input_prediction_label", _image_grid(data.val.images[rows], fg(probs), fg(data.val.labels[rows])), step)
    record = {"step": step, "minutes": run.elapsed() / 60, "val_dice": dice, "val_dice_soft": m["summary"]["dice_soft"]["mean"]}
    if cfg.model.n_out > 1:  # val_dice is the mean over classes; each class too
        record["val_dice_per_class"] = {c: s["mean"] for c, s in m["summary"]["dice_per_class"].items()}
        for c, v in record["val_dice_per_class"].items():
            tb(run, "add_scalar", f"val/dice_class{c}", v, step)
    log(run, record)
    run.progress.best = max(run.progress.best, dice)
    return dice


def state_is_finite(run: Run) -> bool:
    """Whether params and optimiser state hold only finite values."""
    s = run.progress.state
    return not ckpt.non_finite_leaves({"params": s.params, "opt_state": s.opt_state})


def save(run: Run, step: int, val_dice: float | None = None) -> None:
    """Checkpoint ``step`` to ``checkpoints/`` (and to ``best/`` when ``val_dice`` is the best)."""
    p = run.progress
    meta = {
        "step": step,
        "data": run.batches.state_dict(),
        "best_val_dice": p.best,
        "elapsed_s": run.elapsed(),
        "config_name": run.cfg.name,
        "rollbacks": p.rollbacks,
        "lr_factor": p.lr_factor,
    }
    # Host copies: orbax cannot save the single-device key (or any process-local array)
    # in a multi-host run; params and optimiser state are replicated, so any copy will do.
    params = jax.device_get(p.state.params)
    train_items = {"opt_state": jax.device_get(p.state.opt_state), "key": np.asarray(p.base_key)}
    if p.state.ema is not None:
        train_items["ema"] = jax.device_get(p.state.ema)
    ckpt.save_checkpoint(run.latest, step, params, meta, train_items)
    if val_dice is not None and val_dice >= p.best:  # the validated params: the EMA when kept
        ckpt.save_checkpoint(run.best_mngr, step, jax.device_get(eval_params(p.state)), dict(meta, val_dice=val_dice))
    elif run.data.val is None:  # nothing to choose by: best/ holds the latest EMA, what evaluate and export load
        ckpt.save_checkpoint(run.best_mngr, step, jax.device_get(eval_params(p.state)), dict(meta, val_dice=None))


def roll_back(run: Run, step: int, why: str = "non-finite loss") -> int:
    """After a divergence at ``step`` (``why``: see :func:`divergence`): restart from the last
    good checkpoint (or step 0) with the learning rate halved once more. Returns the step
    training continues from.

    Raises:
        RunError: ``train.max_rollbacks`` rollbacks are used up.
    """
    cfg, p = run.cfg, run.progress
    if p.rollbacks >= cfg.train.max_rollbacks:
        best = run.best_mngr.latest_step()
        kept = f"the best checkpoint (step {best}) in {run.workdir / ckpt.BEST_DIR} is intact" if best is not None else "no checkpoint was written"
        raise RunError(
            f"training diverged ({why}) at step {step} after {p.rollbacks} rollback(s) with the learning rate halved each time "
            f"(train.lr {cfg.train.lr:g} -> {cfg.train.lr * p.lr_factor:g}); lower train.lr or check the data; {kept}"
        )
    rollbacks = p.rollbacks + 1
    tx, run.train_step = build_step(cfg, rollbacks, run.mesh, run.backend)
    if run.latest.latest_step() is None:
        new, back_to = fresh_progress(cfg, tx), 0
        new.best = p.best
        run.batches.load_state_dict({"epoch": 0, "offset": 0, "seed": cfg.train.seed})
    else:
        new, back_to = restore_progress(run.workdir, cfg, tx, run.batches)
    new.rollbacks, new.elapsed_before = rollbacks, run.elapsed()
    new.state = put_replicated(new.state, run.mesh)
    run.progress, run.t0 = new, time.perf_counter()
    lr = cfg.train.lr * new.lr_factor
    log(run, {"step": step, "minutes": run.elapsed() / 60, "rollback": rollbacks, "to_step": back_to, "lr_factor": new.lr_factor})
    print(f"warning: {why} at step {step}; rollback {rollbacks}/{cfg.train.max_rollbacks} to step {back_to} with train.lr {lr:g}")
    return back_to


def close_managers(run: Run, after_failure: bool) -> None:
    """Close the checkpoint managers. After a failed save (e.g. a full disk) their writer
    threads fail too: that error is not raised again, and what they left is removed."""
    for mngr in (run.latest, run.best_mngr):
        unless_failed(mngr.close, after_failure)
    if after_failure and run.primary:
        for sub in (ckpt.LATEST_DIR, ckpt.BEST_DIR):
            ckpt.remove_unfinished(run.workdir / sub)


def _due(step: int, every: int) -> bool:
    return step % every == 0


def train(
    cfg: Config,
    workdir: str | Path,
    data_dir: str | Path | None = None,
    *,
    backend: Backend,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into the run folder ``workdir``; return the final summary
    ``{"step", "best_val_dice", "reason", "minutes", "rollbacks"}`` (reason: done,
    interrupted or time_limit).

    Args:
        data_dir: an MSD task folder (an image folder with ``data.format = "images"``); ``None``
            generates the embedded synthetic task.
        backend: the resolved backend of the model (:func:`mednca_jax.machine.backend_for`).
        resume: continue from the latest checkpoint in ``workdir`` (its config must match), on
            the run's recorded ``--data`` folder when ``data_dir`` is None.
        stop_after: stop (with a checkpoint) after this many steps in this call; for tests
            of interruption and resumption.

    Raises:
        RunError: the folder is in use, holds another run, or the loss stayed non-finite.
        DataError, CheckpointError: unusable data or checkpoints.
    """
    workdir = Path(workdir)
    if resume and data_dir is None:  # the folder the run was started on (data.json), if any
        data_dir = ckpt.load_data_dir(workdir)
    resolved = resolve_data_config(cfg, data_dir)  # an image folder: every file checked, model.n_in from them
    if resolved.model.n_in != cfg.model.n_in:
        print(f"note: the images of {data_dir} have {resolved.model.n_in} channels: model.n_in = {resolved.model.n_in}")
    cfg = resolved
    check_run_folder(cfg, workdir, resume)
    primary = is_primary()  # multi-host: process 0 writes the run files
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with run_lock(workdir, primary):
            with undo_on_failure(workdir, created and not resume, (ckpt.CONFIG_FILE, ckpt.DATA_FILE, SPLIT_FILE, "synthetic_data"), primary):
                _, data = setup_run(cfg, workdir, data_dir, cache_dir)
            return _train_loop(data.cfg, workdir, data, resume, progress, stop_after, primary, backend)
    except OSError as e:
        full = disk_full_error(e, workdir)
        if full is None:
            raise
        raise full from None


def open_run(cfg: Config, workdir: Path, data: RunData, resume: bool, primary: bool, backend: Backend) -> Run:
    """Restore (``resume``) or initialise the progress; open the managers and writers."""
    from tensorboardX import SummaryWriter

    tcfg = cfg.train
    mesh = make_mesh() if tcfg.data_parallel else None
    batches = BatchIterator.from_config(data.train, cfg.data, tcfg.batch_size, tcfg.seed)
    tx = make_optimizer(tcfg)  # the optimiser state's structure does not depend on the lr
    if primary:  # under the run lock: no other save can be in progress
        for sub in (ckpt.LATEST_DIR, ckpt.BEST_DIR):
            for p in ckpt.remove_unfinished(workdir / sub):
                print(f"note: removed the unfinished checkpoint {p} (a save that was interrupted)")
    if resume:
        prog, step = restore_progress(workdir, cfg, tx, batches)
        if primary:
            set_aside_newer_steps(workdir, step)
    else:
        prog = fresh_progress(cfg, tx)
    _, train_step = build_step(cfg, prog.rollbacks, mesh, backend)
    prog.state = put_replicated(prog.state, mesh)
    return Run(
        cfg, workdir, data, mesh, batches, prog, train_step,
        latest=ckpt.manager(workdir, ckpt.LATEST_DIR, tcfg.keep_checkpoints), best_mngr=ckpt.manager(workdir, ckpt.BEST_DIR, 1),
        predict=make_predict_fn(cfg, backend), eval_key=jax.random.fold_in(prog.base_key, 2**31 - 1),
        writer=SummaryWriter(str(workdir / "tb")) if primary else None, primary=primary, backend=backend,
    )


def finish(run: Run, step: int, reason: str) -> None:
    """On the way out: a last checkpoint unless ``step`` has one (after a time limit with a
    validation), then close everything. ``reason == "failed"``: no save (it would fail again
    or save a diverged state), and cleanup errors do not hide the failure."""
    failed = reason == "failed"
    try:
        if not failed and (run.latest.latest_step() or -1) < step and state_is_finite(run):
            if reason == "time_limit" and run.data.val is not None:
                save(run, step, validate(run, step))
            else:
                save(run, step)
    finally:
        run.batches.close()
        unless_failed(lambda: tb(run, "close"), failed)  # on a full disk TensorBoard's flush fails too
        close_managers(run, after_failure=failed)
        if run.primary:
            _write_curve(run.cfg, run.workdir)


def _train_loop(cfg: Config, workdir: Path, data: RunData, resume: bool, show_progress: bool, stop_after: int | None,
                primary: bool, backend: Backend) -> dict[str, Any]:
    tcfg = cfg.train
    run = open_run(cfg, workdir, data, resume, primary, backend)
    batches, mesh, prog = run.batches, run.mesh, run.progress
    step = int(prog.state.step)
    end = tcfg.num_steps if stop_after is None else min(tcfg.num_steps, step + stop_after)
    bar = TrainProgress(tcfg, cfg.name, step, run.elapsed(), enabled=show_progress and primary)
    last_val: float | None = None
    reason = "done"
    window_t, window_n = time.perf_counter(), 0
    # Process 0's clock, for a budget schedule: each process has its own, and differing
    # learning rates would let the replicated params drift apart. Refreshed after each step
    # with the stop flags (one collective), so a step's learning rate lags its clock by a step.
    clock = process0_value(run.elapsed())
    with interrupt_flag() as flag:
        try:
            while step < end:
                batch = put_batch(local_part(next(batches)) if mesh is not None else next(batches), mesh)
                state = with_budget_used(run.progress.state, tcfg, clock)  # budget schedules only
                run.progress.state, metrics = run.train_step(state, batch, jax.random.fold_in(run.progress.base_key, step + 1))
                step += 1
                window_n += 1
                if _due(step, tcfg.log_every) or step == end:
                    steps_s = window_n / max(time.perf_counter() - window_t, 1e-9)
                    window_t, window_n = time.perf_counter(), 0
                    m = log_train_metrics(run, step, metrics, steps_s * tcfg.batch_size)
                    bar.show(m, steps_s)
                    why = divergence(m["loss"], tcfg.max_loss)
                    if why:
                        step = roll_back(run, step, why)
                        bar.restart_from(step, run.elapsed())
                        continue
                bar.advance(step, run.elapsed())
                eval_due = _due(step, tcfg.eval_every) or step == tcfg.num_steps
                if eval_due or _due(step, tcfg.checkpoint_every) or step == end:
                    if not state_is_finite(run):  # diverged between two loss checks: never save it
                        step = roll_back(run, step, "non-finite params")
                        continue
                    if eval_due:
                        last_val = validate(run, step)
                        bar.validated(last_val)
                    save(run, step, last_val if eval_due else None)
                over_time = bool(tcfg.time_limit_min) and run.elapsed() >= tcfg.time_limit_min * 60
                (interrupted, over_time), clock = agree((flag["stop"], over_time), run.elapsed())
                if interrupted or over_time:
                    reason = "interrupted" if interrupted else "time_limit"
                    break
        except MedNCAError:
            reason = "failed"  # diverged for good, or a checkpoint could not be written: no save on the way out
            raise
        except OSError as e:
            if disk_full_error(e, workdir) is not None:
                reason = "failed"  # saving again on the way out would fail too
            raise
        finally:
            bar.close()
            finish(run, step, reason)
    return {"step": step, "best_val_dice": run.progress.best, "reason": reason, "minutes": run.elapsed() / 60,
            "rollbacks": run.progress.rollbacks}
