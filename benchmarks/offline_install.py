"""The package as a user without a network gets it: wheel size, a non-editable install into a
fresh virtual environment, and the shipped model segmenting a scan from a folder outside the
clone.

    python benchmarks/offline_install.py [--scan IMAGE.nii.gz --label LABEL.nii.gz]

Steps, each a row of the table:
1. build the wheel (``pip wheel --no-deps --no-build-isolation``, no index): bound < 5 MB;
2. a fresh venv; ``pip install --no-index --no-deps`` of the wheel. The dependencies come from
   the running interpreter's environment through a ``.pth`` file (they are what any install
   fetches from an index or a local wheelhouse; this checks what *this* package ships);
3. from an empty temporary folder: ``mednca models`` lists every shipped model with its test
   Dice;
4. ``mednca predict --model NAME`` for each shipped model (``hippocampus``, ``hippocampus3d``)
   on ``--scan`` (default: the reference case ``hippocampus_374`` of the shared MSD folder next
   to the repository, skipped when absent): the label volume has the scan's shape and affine,
   and its hard Dice against ``--label`` in the native grid is >= 0.85.
Exit status 1 when a bound or a step fails.
"""

from __future__ import annotations

import argparse
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _harness import machine  # noqa: E402

WHEEL_BOUND_MB = 5.0
DICE_BOUND = 0.85
MODELS = ("hippocampus", "hippocampus3d")  # the shipped models, both for MSD hippocampus crops
SHARED_MSD = REPO.parent / "shared" / "data" / "Task04_Hippocampus"


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def default_case() -> tuple[Path, Path] | None:
    """The reference case ``hippocampus_374`` when the shared MSD folder is here (a training
    patient of the shipped model's split: this checks the install, not the model)."""
    image = SHARED_MSD / "imagesTr" / "hippocampus_374.nii.gz"
    return (image, SHARED_MSD / "labelsTr" / image.name) if image.is_file() else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scan", type=Path, help="a hippocampus MRI (NIfTI) to segment")
    p.add_argument("--label", type=Path, help="its label volume, for the Dice")
    args = p.parse_args()
    case = (args.scan, args.label) if args.scan else default_case()
    rows: list[tuple[str, str, str, bool]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        r = run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", str(tmp / "wheel")], cwd=tmp)
        wheels = list((tmp / "wheel").glob("*.whl"))
        if r.returncode or not wheels:
            print(r.stderr[-2000:])
            rows.append(("build the wheel", "failed", "", False))
            return report(rows)
        mb = wheels[0].stat().st_size / 1e6
        rows.append(("wheel size", f"{mb:.2f} MB ({time.perf_counter() - t:.0f} s to build)", f"< {WHEEL_BOUND_MB:g} MB", mb < WHEEL_BOUND_MB))

        venv = tmp / "venv"
        r = run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
        py = venv / "bin" / "python"
        deps = [d for d in site.getsitepackages() if Path(d).is_dir()]
        purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
        Path(purelib, "deps_of_the_test.pth").write_text("\n".join(deps) + "\n")
        r = run([str(py), "-m", "pip", "install", "--no-index", "--no-deps", "-q", str(wheels[0])], cwd=tmp)
        rows.append(("pip install --no-index (not editable)", "ok" if r.returncode == 0 else r.stderr[-300:], "installs", r.returncode == 0))
        if r.returncode:
            return report(rows)
        mednca = venv / "bin" / "mednca"
        away = tmp / "elsewhere"
        away.mkdir()
        r = run([str(mednca), "models"], cwd=away)
        listed = r.returncode == 0 and "hippocampus" in r.stdout
        rows.append(("mednca models (outside the clone)", r.stdout.splitlines()[1] if listed else (r.stderr or r.stdout)[-300:],
                     "lists hippocampus", listed))
        where = run([str(py), "-c", "import mednca_jax; print(mednca_jax.__file__)"], cwd=away).stdout.strip()
        rows.append(("package imported from", where.replace(str(tmp), "<tmp>"), "the venv", where.startswith(str(venv))))
        names = [m for m in MODELS if m in r.stdout]
        rows.append(("models listed", ", ".join(names), ", ".join(MODELS), names == list(MODELS)))
        if case is None:
            rows.append(("predict --model ...", "skipped: no --scan given and no shared MSD folder", "", True))
            return report(rows)
        for name in names:
            rows += predict_rows(mednca, name, case, away)
    return report(rows)


def predict_rows(mednca: Path, model: str, case: tuple[Path, Path | None], away: Path) -> list[tuple[str, str, str, bool]]:
    """``mednca predict --model MODEL`` on the case from the folder ``away``: the label
    volume's shape and affine, and its hard Dice in the native grid."""
    import nibabel as nib
    import numpy as np

    out = away / f"{model}.nii.gz"
    t = time.perf_counter()
    r = run([str(mednca), "predict", "--model", model, "--input", str(case[0]), "--output", str(out)], cwd=away)
    if r.returncode:
        return [(f"predict --model {model}", (r.stderr or r.stdout)[-300:], "runs", False)]
    pred, src = nib.load(out), nib.load(case[0])
    same = pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    rows = [(f"{model}: label shape and affine", f"{pred.shape} ({time.perf_counter() - t:.0f} s)", "the scan's", same)]
    if case[1] is not None:
        p_, t_ = np.asarray(pred.dataobj) > 0, np.asarray(nib.load(case[1]).dataobj) > 0
        dice = 2 * (p_ & t_).sum() / max(p_.sum() + t_.sum(), 1)
        rows.append((f"{model}: hard Dice, native grid ({case[0].name.split('.')[0]})", f"{dice:.4f}", f">= {DICE_BOUND}", dice >= DICE_BOUND))
    return rows


def report(rows: list[tuple[str, str, str, bool]]) -> int:
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d')}")
    w = max(len(r[0]) for r in rows)
    for name, value, bound, ok in rows:
        print(f"{name:<{w}}  {value:<48}  {bound:<18}  {'ok' if ok else 'MISSED'}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
