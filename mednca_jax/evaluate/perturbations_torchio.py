"""The artefact protocol of the NCA literature, with torchio's own transforms.

OctreeNCA's out-of-distribution study perturbs test images with five torchio transforms at
levels ``s = 1 … 5``::

    RandomGhosting(num_ghosts=s, intensity=0.5·s)   RandomAnisotropy(downsampling=s)
    RandomBiasField(coefficients=0.1·s)             RandomNoise(std=0.1·s)
    RandomBlur(std=0.5·s)

:func:`apply_torchio` applies them here with those parameters and torchio's own meaning of a
single number (a range from its lower bound to the number: ``num_ghosts`` drawn in ``0…s``,
``intensity`` in ``[0, 0.5·s]``, ``downsampling`` in ``[1, s]``, bias coefficients in
``±0.1·s``, noise std in ``[0, 0.1·s]``, blur std in ``[0, 0.5·s]`` pixels per axis). Each
slice of the model grid (values in ``[0, 1]``) is one 2D torchio image of unit spacing, so
torchio keeps every transform in-plane; a 3D model's volume ``(X, Y, Z)`` is one 3D torchio
image of unit (voxel) spacing, perturbed as torchio does volumes: ghosts and bias field in 3D,
blur along all three axes, anisotropy along one random axis of the three. The result is
clipped back to ``[0, 1]``, the range the models were trained on, as in
:func:`mednca_jax.evaluate.perturbations.apply_perturbation`.

torchio is an optional extra (``pip install 'mednca-jax[torchio]'``); nothing here imports it
before a transform is asked for.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mednca_jax.errors import UsageError

TORCHIO_LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)

# name -> (factory of the torchio transform at level s for images of spatial rank ndim, what level s means)
TORCHIO_PROTOCOL: dict[str, tuple[Callable[[Any, int, int], Any], str]] = {
    "RandomGhosting": (lambda tio, s, ndim: tio.RandomGhosting(num_ghosts=s, intensity=0.5 * s), "0…s ghosts, intensity up to 0.5·s"),
    # 2D: axes (0, 1), what torchio falls back to for a 2D image anyway, without its warning;
    # 3D: torchio's default (0, 1, 2)
    "RandomAnisotropy": (lambda tio, s, ndim: tio.RandomAnisotropy(axes=tuple(range(ndim)), downsampling=s),
                         "one axis (2D: in-plane) downsampled by up to s"),
    "RandomBiasField": (lambda tio, s, ndim: tio.RandomBiasField(coefficients=0.1 * s), "cubic bias field, coefficients ±0.1·s"),
    "RandomNoise": (lambda tio, s, ndim: tio.RandomNoise(std=0.1 * s), "Gaussian noise, std up to 0.1·s"),
    "RandomBlur": (lambda tio, s, ndim: tio.RandomBlur(std=0.5 * s), "Gaussian blur, std up to 0.5·s px"),
}

INSTALL_HINT = "pip install 'mednca-jax[torchio]'"


def import_torchio() -> Any:
    """The ``torchio`` module, or a :class:`UsageError` that says how to install it."""
    try:
        import torchio
    except ImportError as e:
        raise UsageError(f"--protocol torchio needs the optional torchio extra ({e}); install it with: {INSTALL_HINT}") from None
    return torchio


def check_torchio_names(names: list[str] | None) -> list[str]:
    """Validate names of the torchio protocol; ``UsageError`` listing the valid ones."""
    names = list(TORCHIO_PROTOCOL) if not names else list(names)
    bad = [n for n in names if n not in TORCHIO_PROTOCOL]
    if bad:
        raise UsageError(f"unknown torchio perturbation(s) {bad}; valid choices: {', '.join(TORCHIO_PROTOCOL)}")
    return names


def torchio_transform(name: str, level: int, ndim: int = 2) -> Any:
    """The torchio transform ``name`` at ``level`` (an integer in 1…5) for images of spatial
    rank ``ndim`` (2: slices, 3: volumes)."""
    check_torchio_names([name])
    if int(level) != level or not 1 <= level <= max(TORCHIO_LEVELS):
        raise UsageError(f"torchio levels are the integers 1…{max(TORCHIO_LEVELS)}, got {level}")
    if ndim not in (2, 3):
        raise ValueError(f"torchio perturbs 2D slices or 3D volumes, got spatial rank {ndim}")
    return TORCHIO_PROTOCOL[name][0](import_torchio(), int(level), int(ndim))


def apply_torchio(name: str, images: np.ndarray, level: int, seed: int, *, ndim: int = 2) -> np.ndarray:
    """Perturb each image of ``images`` in ``[0, 1]`` with ``name`` at ``level``: slices
    ``(B, H, W)`` (``ndim = 2``) or volumes ``(B, X, Y, Z)`` (``ndim = 3``).

    torch's generator is seeded with ``seed`` once, then the images are drawn in order: the
    same seed gives the same images, and every image gets its own random parameters.
    Returns the shape of ``images``, float32 clipped to ``[0, 1]``; the global torch seed is
    restored.
    """
    import torch

    tio = import_torchio()
    transform = torchio_transform(name, level, ndim)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != ndim + 1:
        want = "(B, H, W) slices" if ndim == 2 else "(B, X, Y, Z) volumes"
        raise ValueError(f"apply_torchio expects {want}, got shape {images.shape}")
    out = np.empty_like(images)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for i, img in enumerate(images):
            # torchio's images are (C, X, Y, Z); a 2D slice is Z = 1 (its transforms stay
            # in-plane), a volume is itself
            vol = img[..., None] if ndim == 2 else img
            t = tio.ScalarImage(tensor=torch.from_numpy(vol[None].copy()), affine=np.eye(4))
            res = transform(t).data[0].numpy()
            out[i] = res[..., 0] if ndim == 2 else res
    finally:
        torch.random.set_rng_state(state)
    return np.clip(out, 0.0, 1.0)


__all__ = ["INSTALL_HINT", "TORCHIO_LEVELS", "TORCHIO_PROTOCOL", "apply_torchio", "check_torchio_names", "import_torchio", "torchio_transform"]
