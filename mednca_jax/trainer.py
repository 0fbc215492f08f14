"""The training loop behind ``train.py``: data, split, steps, validation, logs, checkpoints.

Resuming is exact: the checkpoint holds params, optimiser state, the step, the base PRNG
key and the data-iterator position, and the key of step ``s`` is ``fold_in(key, s)``, so a
run stopped at step ``k`` and resumed computes the same steps as one that never stopped.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from . import checkpoint as ckpt
from .config import Config
from .data import BatchIterator, Case, DataError, list_cases, load_slices, make_synthetic_task, read_split, split_from_config, write_split
from .evaluation import evaluate_cases, make_predict_fn, predict_slices
from .networks import init_network_params
from .training import (
    any_process, eval_params, init_train_state, is_primary, local_part, make_mesh, make_optimizer, make_train_step, primary_first,
    put_batch, put_replicated, with_budget_used,
)

SPLIT_FILE = "split.json"
LOG_FILE = "log.jsonl"


class RunError(RuntimeError):
    """The run folder cannot be used as asked (e.g. it holds another run and no --resume)."""


@dataclass
class RunData:
    cases: list[Case]
    split: Any
    train: Any  # SliceSet
    val: Any | None


def default_data_dir(cfg: Config, workdir: Path) -> Path:
    """The embedded synthetic task for runs without ``--data``, generated once per run folder."""
    root = workdir / "synthetic_data"
    if not (root / "dataset.json").is_file():
        make_synthetic_task(root, n_cases=cfg.data.synthetic_cases, seed=cfg.data.split_seed)
    return root


def prepare_data(cfg: Config, data_dir: Path, workdir: Path, cache_dir: Path | None) -> RunData:
    """List labelled cases, make (or re-read) the patient split, load train/val slices."""
    cases = [c for c in list_cases(data_dir) if c.label is not None]
    if len(cases) < 2:
        raise DataError(f"{data_dir} has {len(cases)} labelled case(s); training needs at least 2")
    split_path = workdir / SPLIT_FILE
    if split_path.is_file():
        split = read_split(split_path)
        unknown = sorted(set(split.train + split.val + split.test) - {c.name for c in cases})
        if unknown:
            raise DataError(f"{split_path} names cases not in {data_dir}: {unknown[:5]}; use the same --data as the first run")
    else:
        split = split_from_config([c.name for c in cases], cfg.data)
        write_split(split_path, split)
    by_name = {c.name: c for c in cases}
    n_out = cfg.model.n_out
    train = load_slices([by_name[n] for n in split.train], cfg.data, cache_dir, n_out)
    val = load_slices([by_name[n] for n in split.val], cfg.data, cache_dir, n_out) if split.val else None
    return RunData(cases, split, train, val)


@contextmanager
def interrupt_flag() -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C / SIGTERM into a flag the loop checks, so it can save first."""
    flag = {"stop": False}
    previous = {}

    def handler(signum, frame):
        if flag["stop"]:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        flag["stop"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _image_grid(images: np.ndarray, probs: np.ndarray, labels: np.ndarray, n: int = 4) -> np.ndarray:
    """Rows input / prediction / label for ``n`` slices -> ``(3, 3H, nW)`` CHW image in [0, 1]."""
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
        from .plots import plot_training_curves

        records = [json.loads(l) for l in (workdir / LOG_FILE).read_text().splitlines() if l.strip()]
        if any("val_dice" in r for r in records):
            plot_training_curves({cfg.name: records}, workdir / "curve.png")
    except ImportError as e:
        print(f"note: no curve.png ({e})")


def train(
    cfg: Config,
    workdir: str | Path,
    data_dir: str | Path | None = None,
    *,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into the run folder ``workdir``; return the final summary.

    Args:
        data_dir: an MSD task folder; ``None`` generates the embedded synthetic task.
        resume: continue from the latest checkpoint in ``workdir`` (its config must match).
        stop_after: stop (with a checkpoint) after this many steps in this call; for tests
            of interruption and resumption.
    """
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    workdir = Path(workdir)
    has_ckpt = (workdir / ckpt.LATEST_DIR).is_dir() and any((workdir / ckpt.LATEST_DIR).iterdir())
    if has_ckpt and not resume:
        raise RunError(f"{workdir} already holds a run; pass --resume to continue it or choose another --workdir")
    if resume and not has_ckpt:
        raise RunError(f"--resume: {workdir} holds no checkpoint to resume from")
    if resume:
        saved = ckpt.load_run_config(workdir)
        ckpt.check_same_model(saved, cfg, workdir)
        if saved.data != cfg.data:
            raise RunError(f"--resume: the [data] section differs from the run's {workdir / ckpt.CONFIG_FILE}; resume with the same config")
    # Multi-host: process 0 writes the run files; the others read them (primary_first).
    primary = is_primary()

    def setup() -> tuple[Path, RunData]:
        workdir.mkdir(parents=True, exist_ok=True)
        if primary:
            ckpt.save_run_config(workdir, cfg)
        root = Path(data_dir) if data_dir is not None else default_data_dir(cfg, workdir)
        return root, prepare_data(cfg, root, workdir, Path(cache_dir) if cache_dir else None)

    data_dir, data = primary_first(setup, "setup")

    tcfg = cfg.train
    mesh = None
    if tcfg.data_parallel:
        mesh = make_mesh()
    tx = make_optimizer(tcfg)
    train_step = make_train_step(cfg, tx, mesh)
    base_key = jax.random.PRNGKey(tcfg.seed)
    state = init_train_state(init_network_params(cfg, jax.random.fold_in(base_key, 0)), tx, ema=tcfg.ema_decay > 0)
    batches = BatchIterator.from_config(data.train, cfg.data, tcfg.batch_size, tcfg.seed)
    best = -1.0
    elapsed_before = 0.0
    if resume:
        abstract = {"params": state.params, "train": {"opt_state": state.opt_state, "key": base_key}}
        if state.ema is not None:
            abstract["train"]["ema"] = state.ema
        items, step = ckpt.restore(workdir, abstract, which="latest")
        meta = items["meta"]
        state = init_train_state(items["params"], tx)._replace(
            opt_state=items["train"]["opt_state"], step=np.int32(meta["step"]), ema=items["train"].get("ema")
        )
        base_key = items["train"]["key"]
        batches.load_state_dict(meta["data"])
        best = float(meta.get("best_val_dice", -1.0))
        elapsed_before = float(meta.get("elapsed_s", 0.0))
    state = put_replicated(state, mesh)

    predict = make_predict_fn(cfg)
    eval_key = jax.random.fold_in(base_key, 2**31 - 1)
    writer = SummaryWriter(str(workdir / "tb")) if primary else None
    log_path = workdir / LOG_FILE
    latest = ckpt.manager(workdir, ckpt.LATEST_DIR, tcfg.keep_checkpoints)
    best_mngr = ckpt.manager(workdir, ckpt.BEST_DIR, 1)
    start_step = int(state.step)
    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def save(step: int, val_dice: float | None = None) -> None:
        meta = {
            "step": step,
            "data": batches.state_dict(),
            "best_val_dice": best,
            "elapsed_s": elapsed(),
            "config_name": cfg.name,
        }
        # Host copies: orbax cannot save the single-device key (or any process-local array)
        # in a multi-host run; params and optimiser state are replicated, so any copy will do.
        params = jax.device_get(state.params)
        train_items = {"opt_state": jax.device_get(state.opt_state), "key": np.asarray(base_key)}
        if state.ema is not None:
            train_items["ema"] = jax.device_get(state.ema)
        ckpt.save_checkpoint(latest, step, params, meta, train_items)
        if val_dice is not None and val_dice >= best:  # the validated params: the EMA when kept
            ckpt.save_checkpoint(best_mngr, step, jax.device_get(eval_params(state)), dict(meta, val_dice=val_dice))

    def log(record: dict[str, Any]) -> None:
        if primary:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def tb(kind: str, *args: Any) -> None:
        if writer is not None:
            getattr(writer, kind)(*args)

    def validate(step: int) -> float | None:
        nonlocal best
        if data.val is None:
            return None
        # Every process validates on its own devices (the same numbers: same params and key),
        # so all agree on the best checkpoint; params spanning several processes come to host.
        params = jax.device_get(eval_params(state)) if jax.process_count() > 1 else eval_params(state)
        m = evaluate_cases(params, cfg, data.val, data.cases, eval_key, native=False, predict=predict)
        dice = m["summary"]["dice"]["mean"]
        tb("add_scalar", "val/dice", dice, step)
        tb("add_scalar", "val/dice_soft", m["summary"]["dice_soft"]["mean"], step)
        rows = _pick_val_images(data.val)
        probs = predict_slices(predict, params, data.val.images[rows], eval_key, cfg.model.fire_rate, len(rows))
        tb("add_image", "val/input_prediction_label", _image_grid(data.val.images[rows], probs, data.val.labels[rows]), step)
        log({"step": step, "minutes": elapsed() / 60, "val_dice": dice, "val_dice_soft": m["summary"]["dice_soft"]["mean"]})
        if dice >= best:
            best = dice
        return dice

    end = tcfg.num_steps if stop_after is None else min(tcfg.num_steps, start_step + stop_after)
    bar = tqdm(total=tcfg.num_steps, initial=start_step, disable=not (progress and primary), desc=cfg.name, unit="step", dynamic_ncols=True)
    step = start_step
    last_val: float | None = None
    reason = "done"
    window_t, window_n = time.perf_counter(), 0
    with interrupt_flag() as flag:
        try:
            while step < end:
                batch = put_batch(local_part(next(batches)) if mesh is not None else next(batches), mesh)
                state = with_budget_used(state, tcfg, elapsed())  # budget schedules only
                state, metrics = train_step(state, batch, jax.random.fold_in(base_key, step + 1))
                step += 1
                window_n += 1
                if step % tcfg.log_every == 0 or step == end:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    rate = window_n * tcfg.batch_size / max(time.perf_counter() - window_t, 1e-9)
                    window_t, window_n = time.perf_counter(), 0
                    for k in ("loss", "lr", "grad_norm"):
                        tb("add_scalar", f"train/{k}", m[k], step)
                    tb("add_scalar", "train/slices_per_s", rate, step)
                    log({"step": step, "minutes": elapsed() / 60, "loss": m["loss"], "lr": m["lr"]})
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", slices_s=f"{rate:.0f}", val=f"{best:.3f}")
                    if not np.isfinite(m["loss"]):
                        reason = "nan"
                        break
                bar.update(1)
                if step % tcfg.eval_every == 0 or step == tcfg.num_steps:
                    last_val = validate(step)
                if step % tcfg.checkpoint_every == 0 or step % tcfg.eval_every == 0 or step == end:
                    save(step, last_val if step % tcfg.eval_every == 0 or step == tcfg.num_steps else None)
                over_time = bool(tcfg.time_limit_min) and elapsed() >= tcfg.time_limit_min * 60
                interrupted, over_time = any_process(flag["stop"], over_time)
                if interrupted or over_time:
                    reason = "interrupted" if interrupted else "time_limit"
                    break
        finally:
            bar.close()
            if reason != "nan" and (latest.latest_step() or -1) < step:
                if reason == "time_limit" and data.val is not None:
                    last_val = validate(step)
                    save(step, last_val)
                else:
                    save(step)
            batches.close()
            tb("close")
            latest.close()
            best_mngr.close()
    if primary:
        _write_curve(cfg, workdir)
    if reason == "nan":
        raise FloatingPointError(
            f"the loss became non-finite at step {step}; lower train.lr or check the data. "
            f"The last good checkpoint in {workdir / ckpt.LATEST_DIR} is kept."
        )
    return {"step": step, "best_val_dice": best, "reason": reason, "minutes": elapsed() / 60}
