"""Regenerate ``parity_small.npz``: random two-level Med-NCA weights, input slices and the
logits of the project's PyTorch reference (``benchmarks/torch_reference.py``, the
original's computation in the original's ``(B, C, W, H)`` layout) at fire rate 0, and at
fire rate 0.5 with fixed fire masks (drawn here, so no PRNG has to agree). The committed file
was written when that reference had a step of its own; it now runs the PyTorch runtime's
step, so a regenerated file is no longer independent of that runtime (``--check``: 1.2e-6 to
1.4e-6 on the machines tried; the bound is 1e-5, float32 rounding of logits of magnitude ~10
differing between CPU kernels).

    python tests/golden/make_golden.py            # rewrite the file
    python tests/golden/make_golden.py --check    # exit 1 unless the committed file is reproduced

Weights and images come from NumPy alone, so the file does not depend on JAX's init. The
shapes are chosen to catch layout mistakes: a non-square image (H != W) catches swapped
spatial axes, different step counts per level catch a swapped level, and a non-zero fc1
bias-free update with conv biases catches a dropped term. Keys of the file:

    level{i}.{p0,p1}.{kernel (3, 3, C, C), bias (C,)}, level{i}.fc0.{kernel (3C, hidden), bias}
    level{i}.fc1.kernel (hidden, C)      our channels-last layout (docs/design.md, "Parameters")
    images (B, H, W, 1) float32 in [0, 1];  logits (B, H, W, 1) float32, fire rate 0
    masks0 (steps0, B, H/4, W/4), masks1 (steps1, B, H, W) bool, about half True (True fires)
    logits_masked (B, H, W, 1) float32: the same images with those fire masks
    channels, hidden, steps (2,), scales (2,): the model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "parity_small.npz"
CHANNELS, HIDDEN, STEPS, SCALES = 6, 12, (5, 7), (4, 1)
BATCH, HEIGHT, WIDTH = 2, 16, 24
SEED = 20230203  # any fixed seed
TOLERANCE = 1e-5  # --check: largest absolute difference accepted (float32 kernels differ by machine)


def make_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Flat arrays under the export module's keys, scaled like the original init (uniform
    ±1/sqrt(fan_in)); fc1 is non-zero, or the NCA would be the identity."""
    c, h = CHANNELS, HIDDEN
    u = lambda shape, fan_in: (rng.uniform(-1, 1, shape) / np.sqrt(fan_in)).astype(np.float32)  # noqa: E731
    out = {}
    for i in range(2):
        out.update({
            f"level{i}.p0.kernel": u((3, 3, c, c), 9 * c), f"level{i}.p0.bias": u((c,), 9 * c),
            f"level{i}.p1.kernel": u((3, 3, c, c), 9 * c), f"level{i}.p1.bias": u((c,), 9 * c),
            f"level{i}.fc0.kernel": u((3 * c, h), 3 * c), f"level{i}.fc0.bias": u((h,), 3 * c),
            f"level{i}.fc1.kernel": 2.0 * u((h, c), h),
        })
    return out


def nested(flat: dict[str, np.ndarray]) -> dict:
    """``{"level0.p0.kernel": a}`` -> ``{"level0": {"p0": {"kernel": a}}}``."""
    tree: dict = {}
    for key, value in flat.items():
        level, layer, leaf = key.split(".")
        tree.setdefault(level, {}).setdefault(layer, {})[leaf] = value
    return tree


def make_golden() -> dict[str, np.ndarray]:
    import torch

    sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
    from torch_reference import TorchMedNCA

    rng = np.random.default_rng(SEED)
    flat = make_params(rng)
    images = rng.random((BATCH, HEIGHT, WIDTH, 1), dtype=np.float32)
    model = TorchMedNCA(CHANNELS, HIDDEN, STEPS, scale=SCALES[0], layout="original").load_jax(nested(flat))
    sizes = [(HEIGHT // s, WIDTH // s) for s in SCALES]
    masks = [rng.random((n, BATCH, h, w)) < 0.5 for n, (h, w) in zip(STEPS, sizes)]
    with torch.inference_mode():
        x = torch.from_numpy(images)
        logits = model(x, 0.0).numpy()
        logits_masked = model(x, 0.5, masks=tuple(torch.from_numpy(m) for m in masks)).numpy()
    return {**flat, "images": images, "logits": logits.astype(np.float32), "masks0": masks[0], "masks1": masks[1],
            "logits_masked": logits_masked.astype(np.float32), "channels": np.int64(CHANNELS),
            "hidden": np.int64(HIDDEN), "steps": np.array(STEPS), "scales": np.array(SCALES)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the committed file instead of writing it")
    p.add_argument("--out", type=Path, default=GOLDEN, help=f"file to write (default {GOLDEN.name} next to this script)")
    args = p.parse_args(argv)
    fresh = make_golden()
    if args.check:
        with np.load(GOLDEN) as old:
            diff = max(float(np.abs(np.asarray(old[k], np.float64) - fresh[k]).max()) for k in fresh)
            same_keys = set(old.files) == set(fresh)
        print(f"{GOLDEN.name}: max difference {diff:.3g} from a fresh run; keys {'match' if same_keys else 'differ'}")
        return 0 if same_keys and diff <= TOLERANCE else 1
    np.savez_compressed(args.out, **fresh)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB); |logits| max {np.abs(fresh['logits']).max():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
