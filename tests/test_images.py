"""``data.format = "images"``: folders of 2D images and masks, from reading every file kind to
train -> evaluate -> predict, and one clear error line for every bad folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from conftest import TINY_RUN_TOML, random_params

from mednca_jax.cli import main as cli_main
from mednca_jax.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, from_dict, validate
from mednca_jax.data import Case, DataError, cache_key, normalize_slices
from mednca_jax.data import images as img
from mednca_jax.data.formats import initial_split, resolve_data_config
from mednca_jax.data.synthetic_images import write_image_task
from mednca_jax.train import checkpoint as ckpt

GRID = (16, 16)
# the trainer tests' tiny run, reading an image folder
TINY_IMAGES_TOML = TINY_RUN_TOML.replace("[data]\n", '[data]\nformat = "images"\n')


def images_cfg(n_in: int = 1, **data) -> Config:
    return validate(Config(
        name="tiny", model=ModelConfig(channels=8, hidden=16, steps=(3, 3), scales=(2, 1), patch_size=8, n_in=n_in),
        data=DataConfig(image_size=GRID, format="images", **data), train=TrainConfig(batch_size=4, num_steps=4),
    ))


def save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def blob_pair(root, stem, shape=(12, 20), rgb=False, seed=0, mask_value=1, suffix=".png"):
    """An image with a bright rectangle and its mask (values 0 / ``mask_value``)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    mask = np.zeros(shape, np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : w // 2] = 1
    grey = (40 + 150 * mask + rng.integers(0, 30, shape)).astype(np.uint8)
    save(root / "images" / f"{stem}{suffix}", np.stack([grey, 255 - grey, grey // 2], -1) if rgb else grey)
    save(root / "masks" / f"{stem}.png", mask * mask_value)
    return mask


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDNCA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "task"
    for i in range(4):
        blob_pair(root, f"im{i}", shape=(10 + 3 * i, 20 - 2 * i), seed=i, mask_value=255 if i % 2 else 1)
    return root


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("suffix, array", [
    (".png", np.arange(60, dtype=np.uint8).reshape(6, 10) * 4),
    (".png", np.arange(60, dtype=np.uint16).reshape(6, 10) * 1000),  # 16-bit
    (".tif", np.arange(60, dtype=np.uint16).reshape(6, 10) * 1000),
    (".bmp", np.arange(60, dtype=np.uint8).reshape(6, 10)),
    (".tif", np.arange(60, dtype=np.float32).reshape(6, 10) / 7),  # 32-bit float
])
def test_grey_files_of_every_bit_depth_are_read_exactly(tmp_path, suffix, array):
    a = img.read_image(save(tmp_path / f"x{suffix}", array))
    assert a.shape == (6, 10, 1) and a.dtype == np.float32
    np.testing.assert_allclose(a[..., 0], array.astype(np.float32))


def test_colour_files_are_rgb_and_alpha_is_dropped(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    for suffix in (".png", ".tif", ".bmp"):
        np.testing.assert_array_equal(img.read_image(save(tmp_path / f"c{suffix}", rgb)), rgb)
    rgba = np.concatenate([rgb, np.full((7, 9, 1), 17, np.uint8)], -1)
    np.testing.assert_array_equal(img.read_image(save(tmp_path / "a.png", rgba)), rgb)
    smooth = np.stack([*np.meshgrid(np.linspace(0, 250, 9), np.linspace(0, 250, 7)), np.full((7, 9), 90.0)], -1)
    jpg = img.read_image(save(tmp_path / "j.jpg", smooth.astype(np.uint8), quality=95))
    assert jpg.shape == (7, 9, 3) and np.abs(jpg - smooth).mean() < 8  # lossy, but the same picture
    grey_alpha = Image.fromarray(rgba[..., :2].copy())  # (h, w, 2) uint8: grey + alpha, read as grey
    grey_alpha.save(tmp_path / "la.png")
    np.testing.assert_array_equal(img.read_image(tmp_path / "la.png")[..., 0], rgb[..., 0])


def test_masks_hold_class_values_and_0_255_is_one_class(tmp_path):
    m = np.array([[0, 1], [1, 0]], np.uint8)
    assert np.array_equal(img.mask_classes(img.read_mask(save(tmp_path / "a.png", m)), tmp_path / "a.png", 1), m)
    assert np.array_equal(img.mask_classes(img.read_mask(save(tmp_path / "b.png", m * 255)), tmp_path / "b.png", 1), m)
    three = np.array([[0, 1], [2, 0]], np.uint8)
    assert np.array_equal(img.mask_classes(three, tmp_path / "c.png", 2), three)  # two classes
    pal = Image.frombytes("P", (2, 2), three.tobytes())
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    pal.save(tmp_path / "p.png")
    assert np.array_equal(img.read_mask(tmp_path / "p.png"), three)  # a palette mask gives its indices
    same = np.repeat(m[..., None] * 255, 3, -1)
    assert np.array_equal(img.read_mask(save(tmp_path / "rgb.png", same)), m * 255)
    msg = error_of(img.mask_classes, np.array([[0, 7]]), tmp_path / "seven.png", 1)
    assert "seven.png" in msg and "[7]" in msg and "0/255" in msg
    colour = same.copy()
    colour[0, 0] = (255, 0, 0)
    assert "colour" in error_of(img.read_mask, save(tmp_path / "col.png", colour))


# --------------------------------------------------------------------------- geometry
def test_pad_keeps_the_aspect_ratio_centred_and_stretch_fills_the_grid():
    assert img.placement((10, 20), (16, 16), "pad") == img.Placement(4, 0, 8, 16)
    assert img.placement((30, 10), (16, 16), "pad") == img.Placement(0, 5, 16, 5)
    assert img.placement((10, 20), (16, 16), "stretch") == img.Placement(0, 0, 16, 16)


@pytest.mark.parametrize("resize", ["pad", "stretch"])
@pytest.mark.parametrize("shape", [(7, 13), (16, 5), (3, 3)])
def test_a_mask_comes_back_pixel_for_pixel(resize, shape):
    """Grid >= image: :func:`grid_to_native` undoes :func:`mask_to_grid` exactly."""
    cfg = DataConfig(image_size=(16, 16), format="images", resize=resize)
    mask = np.random.default_rng(1).integers(0, 3, shape).astype(np.uint8)
    grid = img.mask_to_grid(mask, cfg)
    assert grid.shape == (16, 16)
    assert np.array_equal(img.grid_to_native(grid, shape, cfg), mask)
    batch = img.to_native(grid[None, ..., None], (*shape, 1), cfg)  # as evaluate calls it
    assert batch.shape == (*shape, 1, 1) and np.array_equal(batch[..., 0, 0], mask)


def test_shrunk_predictions_come_back_in_the_native_size():
    cfg = DataConfig(image_size=(16, 16), format="images")
    mask = np.zeros((40, 90), np.uint8)
    mask[10:30, 20:60] = 1
    back = img.grid_to_native(img.mask_to_grid(mask, cfg), (40, 90), cfg)
    assert back.shape == (40, 90) and (back == mask).mean() > 0.95


def test_images_are_normalised_per_channel_inside_the_padding():
    cfg = DataConfig(image_size=(16, 16), format="images")
    rgb = np.random.default_rng(2).random((8, 16, 3)) * np.array([1.0, 100.0, 5000.0])  # channel scales differ
    grid = img.image_to_grid(rgb, cfg)
    at = img.placement((8, 16), (16, 16), "pad")
    assert grid.shape == (16, 16, 3) and grid.dtype == np.float32
    inside = grid[at.top : at.top + at.height]
    np.testing.assert_allclose(inside, np.moveaxis(normalize_slices(np.moveaxis(rgb, -1, 0)), 0, -1), atol=1e-6)  # same size: no resize
    assert not grid[: at.top].any() and not grid[at.top + at.height :].any()  # zeros around
    assert np.allclose(inside.max(axis=(0, 1)), 1.0)  # each channel on its own scale


# --------------------------------------------------------------------------- config, n_in
def test_config_validates_format_and_resize():
    with pytest.raises(ConfigError, match="data.format"):
        from_dict({"data": {"format": "png"}})
    with pytest.raises(ConfigError, match="data.resize"):
        from_dict({"data": {"resize": "crop"}})
    with pytest.raises(ConfigError, match="data.image_size"):
        from_dict({"data": {"format": "images", "image_size": [16, 16, 16]}, "model": {"patch_size": 8}})
    assert from_dict({}).data.format == "msd" and from_dict({}).data.resize == "pad"


def test_n_in_is_taken_from_the_files(tmp_path, folder):
    assert resolve_data_config(images_cfg(), folder).model.n_in == 1
    rgb = tmp_path / "rgb"
    for i in range(3):
        blob_pair(rgb, f"c{i}", rgb=True, seed=i)
    assert resolve_data_config(images_cfg(), rgb).model.n_in == 3
    msg = error_of(resolve_data_config, images_cfg(n_in=2), rgb)
    assert "model.n_in = 2" in msg and "c0" in msg

    def with_channels(c: int) -> Config:
        return images_cfg().replace(model=ModelConfig(channels=c, hidden=16, steps=(3, 3), scales=(2, 1), patch_size=8))

    assert resolve_data_config(with_channels(4), rgb).model.n_in == 3  # 3 image channels + 1 output fit
    with pytest.raises(ConfigError, match="model.channels"):
        resolve_data_config(with_channels(3), rgb)


def test_cache_keys_of_msd_are_unchanged_and_images_key_the_resize(tmp_path, folder):
    case = Case("im0", folder / "images" / "im0.png", folder / "masks" / "im0.png")
    assert cache_key(case, DataConfig()) == cache_key(case, DataConfig(resize="stretch"))  # msd ignores them
    pad, stretch = DataConfig(format="images"), DataConfig(format="images", resize="stretch")
    assert len({cache_key(case, DataConfig()), cache_key(case, pad), cache_key(case, stretch)}) == 3


# --------------------------------------------------------------------------- bad folders
def break_folder(root, kind):
    """One bad file of ``kind`` in a good folder; returns the file the error must name."""
    if kind == "corrupt":
        p = root / "images" / "im1.png"
        p.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    elif kind == "truncated":
        p = root / "images" / "im2.png"
        p.write_bytes(p.read_bytes()[:60])
    elif kind == "mask_size":
        p = save(root / "masks" / "im0.png", np.zeros((3, 3), np.uint8))
    elif kind == "mask_values":
        p = save(root / "masks" / "im3.png", np.full((19, 14), 7, np.uint8))
    elif kind == "no_mask":
        p = root / "images" / "extra.png"
        save(p, np.zeros((5, 5), np.uint8))
    elif kind == "no_image":
        p = save(root / "masks" / "orphan.png", np.zeros((5, 5), np.uint8))
    elif kind == "mixed":
        p = root / "images" / "im2.png"
        blob_pair(root, "im2", shape=(16, 16), rgb=True)
    return p


BAD = ["corrupt", "truncated", "mask_size", "mask_values", "no_mask", "no_image", "mixed"]


@pytest.mark.parametrize("kind", BAD)
def test_each_bad_file_is_one_error_line_naming_it_and_nothing_is_written(folder, tmp_path, kind, capsys):
    bad = break_folder(folder, kind)
    assert bad.name in error_of(resolve_data_config, images_cfg(), folder)
    (tmp_path / "tiny.toml").write_text(TINY_IMAGES_TOML)
    work = tmp_path / "W"
    assert cli_main(["train", "--config", str(tmp_path / "tiny.toml"), "--data", str(folder), "--workdir", str(work)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and bad.name in err
    if kind == "mixed":
        assert "im0.png" in err  # a file of each kind
    assert not work.exists() and not (tmp_path / "cache").exists()


def test_up_to_five_offenders_are_named(folder):
    for i in range(7):
        save(folder / "masks" / f"lone{i}.png", np.zeros((4, 4), np.uint8))
    msg = error_of(resolve_data_config, images_cfg(), folder)
    assert msg.count("a mask without an image") == 5 and "and 2 more" in msg


def test_an_empty_folder_and_a_missing_images_folder_are_clear(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    assert "holds no image file" in error_of(img.list_image_cases, tmp_path / "empty")
    (tmp_path / "msd" / "imagesTr").mkdir(parents=True)
    assert "data.format = 'msd'" in error_of(img.list_image_cases, tmp_path / "msd")
    assert "does not exist" in error_of(img.list_image_cases, tmp_path / "nothing")


# --------------------------------------------------------------------------- split
def test_a_folders_split_json_overrides_the_seeded_split(folder):
    names = [f"im{i}" for i in range(4)]
    cfg = images_cfg()
    seeded = initial_split(names, folder, cfg.data)
    assert sorted(seeded.train + seeded.val + seeded.test) == names
    (folder / "split.json").write_text(json.dumps({"train": ["im3", "im1"], "val": ["im0"], "test": ["im2"]}))
    own = initial_split(names, folder, cfg.data)
    assert (own.train, own.val, own.test) == (("im1", "im3"), ("im0",), ("im2",))
    assert initial_split(names, folder, DataConfig()) == seeded  # msd: no split.json of the data folder
    (folder / "split.json").write_text(json.dumps({"train": ["im1", "nope"], "val": [], "test": []}))
    assert "nope" in error_of(initial_split, names, folder, cfg.data)


def test_generated_task_covers_the_file_kinds_and_is_deterministic(tmp_path):
    a = write_image_task(tmp_path / "a", n=10, seed=3)
    b = write_image_task(tmp_path / "b", n=10, seed=3)
    suffixes = {p.suffix for p in img.image_files(a / "images")}
    assert suffixes == {".png", ".jpg", ".tif", ".bmp"}
    modes = {Image.open(p).mode for p in img.image_files(a / "images")}
    assert {"L", "I;16"} <= modes
    for p in img.image_files(a / "images"):
        assert (b / "images" / p.name).read_bytes() == p.read_bytes()
    cases, channels, _ = img.scan_image_folder(a, DataConfig(format="images"), 1)
    assert len(cases) == 10 and channels == 1
    shapes = {img.read_image(c.image).shape[:2] for c in cases}
    assert len(shapes) == 10 and len({round(h / w, 1) for h, w in shapes}) > 3  # sizes and aspect ratios vary
    masks = [img.read_case(c, DataConfig(format="images"), 1)[1] for c in cases]
    assert all(set(np.unique(m)) == {0, 1} for m in masks)  # 0/255 masks read as one class
    rgb = write_image_task(tmp_path / "rgb", n=5, rgb=True)
    assert img.scan_image_folder(rgb, DataConfig(format="images"), 1)[1] == 3


def test_demo_data_command_writes_a_task_and_refuses_a_used_folder(tmp_path, capsys):
    assert cli_main(["demo-data", "--format", "images", "--rgb", "--cases", "3", str(tmp_path / "d")]) == 0
    assert len(img.list_image_cases(tmp_path / "d")) == 3
    assert cli_main(["demo-data", "--format", "images", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not an empty folder" in err
    assert cli_main(["demo-data", "--rgb", str(tmp_path / "e")]) == 2 and not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- predict, evaluate
@pytest.fixture
def image_run(tmp_path, folder):
    """A run folder of random weights for grey images (no training needed to test the plumbing)."""
    cfg = images_cfg()
    ckpt.save_params(tmp_path / "run", random_params(cfg.model, seed=1, scale=1.0), cfg)
    return tmp_path / "run"


def test_predict_writes_one_png_per_image_in_its_own_size(image_run, folder, tmp_path):
    out = tmp_path / "P"
    assert cli_main(["predict", "--checkpoint", str(image_run), "--input", str(folder / "images"), "--output", str(out),
                     "--runs", "2", "--batch-size", "4"]) == 0
    q = json.loads((out / "quality.json").read_text())
    for src in img.image_files(folder / "images"):
        pred = Image.open(out / f"{src.stem}.png")
        assert pred.mode == "L" and pred.size == Image.open(src).size
        assert set(np.unique(np.asarray(pred))) <= {0, 1}
        assert Image.open(out / f"{src.stem}_variance.tif").size == pred.size
        assert q["scans"][src.stem]["nqm"] >= 0


def test_predict_one_image_file_to_a_png_file(image_run, folder, tmp_path):
    single = tmp_path / "one.png"
    assert cli_main(["predict", "--checkpoint", str(image_run), "--input", str(folder / "images" / "im1.png"),
                     "--output", str(single)]) == 0
    assert Image.open(single).size == Image.open(folder / "images" / "im1.png").size


def test_predict_refuses_bad_inputs_before_writing(image_run, folder, tmp_path, capsys):
    out = tmp_path / "P"
    colour = tmp_path / "colour"
    blob_pair(colour, "c", rgb=True)
    assert cli_main(["predict", "--checkpoint", str(image_run), "--input", str(colour / "images"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "c.png is RGB" in err and "model.n_in = 1" in err and not out.exists()
    (folder / "images" / "im2.png").write_bytes(b"not a png")
    assert cli_main(["predict", "--checkpoint", str(image_run), "--input", str(folder / "images"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "im2.png" in err and "cannot be read" in err and not out.exists()
    assert cli_main(["predict", "--checkpoint", str(image_run), "--input", str(folder), "--output", str(out)]) == 2
    assert "pass " + str(folder / "images") in capsys.readouterr().err
    assert cli_main(["predict", "--checkpoint", str(image_run), "--input", str(folder / "images" / "im0.png"),
                     "--output", str(folder / "images")]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_evaluate_scores_and_writes_the_same_masks_as_predict(image_run, folder, tmp_path, capsys):
    """Deterministic (fire rate 0): evaluate's PNG predictions are predict's, in each image's size."""
    assert cli_main(["evaluate", "--checkpoint", str(image_run), "--data", str(folder), "--out", str(tmp_path / "E"),
                     "--fire-rate", "0", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "E" / "metrics.json").read_text())
    assert set(metrics["cases"]) == {f"im{i}" for i in range(4)}
    assert all(0 <= r["dice_native"] <= 1 for r in metrics["cases"].values())
    assert cli_main(["predict", "--checkpoint", str(image_run), "--input", str(folder / "images"), "--output",
                     str(tmp_path / "P"), "--fire-rate", "0"]) == 0
    for i in range(4):
        ev = np.asarray(Image.open(tmp_path / "E" / "predictions" / f"im{i}.png"))
        pr = np.asarray(Image.open(tmp_path / "P" / f"im{i}.png"))
        assert ev.shape == pr.shape == np.asarray(Image.open(folder / "images" / f"im{i}.png")).shape
        np.testing.assert_array_equal(ev, pr)


def test_native_dice_of_a_perfect_prediction_is_one(folder):
    """The native-grid Dice path: the mask taken to the grid and back scores 1 against the file."""
    from mednca_jax.data.formats import native_label, to_native
    from mednca_jax.losses import dice_hard

    cfg = DataConfig(image_size=(32, 32), format="images")
    for i in range(4):
        case = Case(f"im{i}", folder / "images" / f"im{i}.png", folder / "masks" / f"im{i}.png")
        _, labels, meta = img.load_image_case(case, cfg)
        back = to_native(labels.astype(np.uint8)[..., 0], meta.shape, 2, cfg)
        truth = native_label(case, cfg, 1)
        assert back.shape == truth.shape == (*Image.open(case.image).size[::-1], 1)
        assert dice_hard(back[..., None].astype(np.float32), truth[..., None].astype(np.float32)) == pytest.approx(1.0)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("rgb", [False, True])
def test_train_evaluate_predict_on_a_generated_folder(tmp_path, capsys, rgb):
    data = write_image_task(tmp_path / "data", n=8, rgb=rgb, sides=(20, 40))
    (tmp_path / "tiny.toml").write_text(TINY_IMAGES_TOML)
    run = tmp_path / "W"
    assert cli_main(["train", "--config", str(tmp_path / "tiny.toml"), "--data", str(data), "--workdir", str(run),
                     "--no-progress"]) == 0
    saved = ckpt.load_run_config(run)
    assert saved.data.format == "images" and saved.model.n_in == (3 if rgb else 1)
    assert ckpt.load_data_dir(run) == data.resolve()
    assert cli_main(["evaluate", "--checkpoint", str(run), "--split", "test", "--no-progress"]) == 0  # no --data: the run's
    test = json.loads((run / "split.json").read_text())["test"]
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert sorted(metrics["cases"]) == sorted(test) and "dice_native" in metrics["summary"]
    assert cli_main(["predict", "--checkpoint", str(run), "--input", str(data / "images"), "--output", str(tmp_path / "P")]) == 0
    for src in img.image_files(data / "images"):
        assert Image.open(tmp_path / "P" / f"{src.stem}.png").size == Image.open(src).size
    # resumed without --config and --data: the run's own config.toml and data folder
    assert cli_main(["train", "--workdir", str(run), "--resume", "--set", "train.num_steps=8", "--no-progress"]) == 0
    assert "step 8" in capsys.readouterr().out


def test_robustness_refuses_an_rgb_model(tmp_path, capsys):
    rgb = tmp_path / "rgb"
    for i in range(3):
        blob_pair(rgb, f"c{i}", rgb=True, seed=i)
    cfg = images_cfg(n_in=3)
    ckpt.save_params(tmp_path / "run", random_params(cfg.model, seed=1), cfg)
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", str(rgb), "--robustness"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --robustness") and "3 channels" in err and not (tmp_path / "run" / "eval-all").exists()
