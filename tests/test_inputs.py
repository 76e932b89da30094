"""Every input gets a clear answer (accepted, or refused naming the file).

Non-finite pixels, compressed TIFFs, extra images in one file, zero-padded slice numbers,
checkpoints that are not ours, unusable output folders. Damaged cache entries are tested in
test_dataset.py, stray bright pixels in test_preprocessing.py.
"""

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import dataset
import predict
from checkpoint import CheckpointError, load_checkpoint
from dataset import discover_patients, load_volumes, read_image, read_mask, read_volume
from patients import DataError

ROOT = Path(__file__).resolve().parents[1]


def head_slice(size=32, dtype=np.uint8):
    """A smooth bright disc on a dark background, (size, size, 3)."""
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    image = np.zeros((size, size, 3), np.float32)
    image[disc] = 100 + 50 * np.sin(yy[disc] / 5.0)[:, None] + np.array([0, 20, 40])
    return image.astype(dtype)


def write_patient(root, pid="P1", count=5, dtype=np.uint8, name="{pid}_{k}.tif", mask="{pid}_{k}_mask.tif"):
    folder = root / pid
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(1, count + 1):
        tifffile.imwrite(folder / name.format(pid=pid, k=k), head_slice(dtype=dtype), photometric="rgb")
        tifffile.imwrite(folder / mask.format(pid=pid, k=k), np.zeros((32, 32), np.uint8))
    return folder


# ------------------------------------------------------------- case 1: non-finite pixels


def add_nan(folder, value=np.nan, name="P1_3.tif"):
    image = tifffile.imread(folder / name)
    image[:4, :4, 1] = value  # 16 background pixels of one channel
    tifffile.imwrite(folder / name, image, photometric="rgb")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused_naming_file_and_count(value, tmp_path):
    add_nan(write_patient(tmp_path, dtype=np.float32), value)
    with pytest.raises(DataError, match=r"P1_3\.tif: 16 non-finite pixel value\(s\)"):
        read_volume(discover_patients(tmp_path)[0])


def test_non_finite_mask_is_refused(tmp_path):
    folder = write_patient(tmp_path)
    mask = np.zeros((32, 32), np.float32)
    mask[0, 0] = np.nan  # NaN != 0 would silently become foreground
    tifffile.imwrite(folder / "P1_2_mask.tif", mask)
    with pytest.raises(DataError, match=r"P1_2_mask\.tif: 1 non-finite"):
        read_mask(folder / "P1_2_mask.tif")


def test_non_finite_pixels_stop_preprocess_cli(tmp_path):
    add_nan(write_patient(tmp_path / "data", dtype=np.float32))
    result = subprocess.run(
        [sys.executable, "dataset.py", "preprocess", "--data-dir", str(tmp_path / "data"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "P1_3.tif: 16 non-finite" in result.stderr and "Traceback" not in result.stderr


def test_non_finite_pixels_stop_training_load(tmp_path):
    add_nan(write_patient(tmp_path, dtype=np.float32))
    with pytest.raises(DataError, match="P1_3.tif: 16 non-finite"):
        load_volumes(discover_patients(tmp_path), 32, tmp_path / "cache", num_workers=1)
    assert not list((tmp_path / "cache").glob("P1-*")), "no cache entry for a refused patient"


def test_non_finite_pixels_stop_predict(trained_checkpoint, tmp_path):
    add_nan(write_patient(tmp_path / "data", dtype=np.float32))
    argv = ["--model-path", str(trained_checkpoint), "--data-dir", str(tmp_path / "data"), "--patients", "all"]
    argv += ["--output-dir", str(tmp_path / "out"), "--no-cache", "--figure-path", str(tmp_path / "d.png")]
    with pytest.raises(SystemExit, match=r"(?s)^error: 1 patient\(s\) failed.*P1_3\.tif: 16 non-finite"):
        predict.main(argv)


# ------------------------------------------------------------ case 2: compressed TIFFs


def test_requirements_pin_the_installed_imagecodecs():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().split() if "==" in line)
    assert pins.get("imagecodecs") == importlib.metadata.version("imagecodecs")


@pytest.mark.parametrize("compression", ["lzw", "zlib", "adobe_deflate", "zstd", "packbits", "jpeg"])
def test_compressed_tiffs_read(compression, tmp_path):
    image = head_slice()
    path = tmp_path / "P1_2.tif"
    tifffile.imwrite(path, image, photometric="rgb", compression=compression)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression != 1, "the file must really be compressed"
    read = read_image(path)
    assert read.shape == image.shape and read.dtype == np.uint8
    error = np.abs(read.astype(int) - image)
    if compression == "jpeg":  # lossy: small mean error, some ringing at the disc's edge
        assert error.mean() < 4 and error.max() < 40
    else:
        assert error.max() == 0


# --------------------------------------------------------- case 3: extra images in a file


def write_pages(path, pages, **kwargs):
    with tifffile.TiffWriter(path) as tif:
        for page, extra in pages:
            tif.write(page, **kwargs, **extra)


def test_second_full_size_page_is_refused(tmp_path):
    path = tmp_path / "P1_2.tif"
    tifffile.imwrite(path, np.stack([head_slice(), head_slice()]), photometric="rgb")  # one series, two pages
    with pytest.raises(DataError, match=r"P1_2\.tif: holds 2 full-size images"):
        read_image(path)


def test_second_series_is_refused(tmp_path):
    path = tmp_path / "P1_2.tif"
    write_pages(path, [(head_slice(), {}), (head_slice()[::-1], {})], photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == 2
    with pytest.raises(DataError, match=r"P1_2\.tif: holds 2 full-size images"):
        read_image(path)


def test_second_mask_page_is_refused(tmp_path):
    path = tmp_path / "P1_2_mask.tif"
    tifffile.imwrite(path, np.zeros((2, 32, 32), np.uint8), photometric="minisblack")
    with pytest.raises(DataError, match=r"P1_2_mask\.tif: holds 2 full-size images"):
        read_mask(path)


def test_thumbnail_and_reduced_pages_are_ignored(tmp_path):
    image = head_slice()
    reduced = tmp_path / "reduced.tif"  # a flagged reduced-resolution page after the image
    write_pages(reduced, [(image, {}), (image[::4, ::4], {"subfiletype": 1})], photometric="rgb")
    thumbnail = tmp_path / "thumbnail.tif"  # an unflagged small page before the image
    write_pages(thumbnail, [(image[::8, ::8], {}), (image, {})], photometric="rgb")
    np.testing.assert_array_equal(read_image(reduced), image)
    np.testing.assert_array_equal(read_image(thumbnail), image)


def test_three_single_channel_pages_are_the_colour_planes(tmp_path):
    image = head_slice()
    path = tmp_path / "P1_2.tif"
    tifffile.imwrite(path, np.moveaxis(image, -1, 0), photometric="minisblack")  # 3 pages of (H, W)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3
    np.testing.assert_array_equal(read_image(path), image)


# ----------------------------------------------------- case 4: zero-padded slice numbers


@pytest.mark.parametrize(
    "image_name, mask_name",
    [("{pid}_{k:03d}.tif", "{pid}_{k:03d}_mask.TIF"), ("{pid}_{k:02d}.TIFF", "{pid}_{k}_mask.tiff")],
)
def test_predicted_mask_names_mirror_the_input_names(image_name, mask_name, tmp_path):
    write_patient(tmp_path / "data", count=4, name=image_name, mask=mask_name)
    (patient,) = discover_patients(tmp_path / "data")
    native = np.zeros((len(patient.kept), 32, 32), bool)
    native[0, 5:9, 5:9] = True
    predict.write_masks(patient, native, tmp_path / "out")
    written = sorted(p.name for p in (tmp_path / "out" / "masks" / "P1").iterdir())
    image_names = [item.image.name for item in patient.slices]
    expected = sorted(name.rsplit(".", 1)[0] + "_mask." + name.rsplit(".", 1)[1] for name in image_names)
    assert written == expected  # e.g. P1_001.tif -> P1_001_mask.tif, P1_01.TIFF -> P1_01_mask.TIFF
    second = tifffile.imread(tmp_path / "out" / "masks" / "P1" / expected[1])
    assert second.dtype == np.uint8 and (second > 0).sum() == 16  # kept slice 0 is the second file


# ----------------------------------------------------- case 6: checkpoints that are not ours


class NotAllowed:
    """A class that weights_only=True refuses to unpickle."""


def make_checkpoint(kind: str, path: Path) -> None:
    if kind == "text":
        path.write_text("epoch: 3\nlr: 0.01\n")
    elif kind == "random bytes":
        path.write_bytes(b"\xff\xd8" + np.random.default_rng(0).bytes(510))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes/readme.txt", "not a checkpoint")
    elif kind == "unsupported global":
        torch.save({"model": {"w": torch.ones(2)}, "extra": NotAllowed()}, path)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("text", r"not a PyTorch checkpoint: it is a text file \(it starts with 'epoch: 3'\)"),
        ("random bytes", r"not a PyTorch checkpoint: it is neither a zip archive nor a pickle"),
        ("zip", r"not a PyTorch checkpoint: it is a zip archive, but not one written by torch\.save"),
        ("unsupported global", r"refused to load: .*\(Unsupported global: GLOBAL test_inputs\.NotAllowed"),
    ],
)
def test_foreign_checkpoints_say_what_the_file_is_not(kind, message, tmp_path):
    path = tmp_path / "model.pt"
    make_checkpoint(kind, path)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/model\.pt: {message}"):
        load_checkpoint(path)


def test_text_checkpoint_in_predict_is_one_error_line(phantom_dir, tmp_path):
    path = tmp_path / "model.pt"
    make_checkpoint("text", path)
    argv = ["--model-path", str(path), "--data-dir", str(phantom_dir), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"^error: .*model\.pt: not a PyTorch checkpoint: it is a text file"):
        predict.main([*argv, "--no-cache"])


def test_cuda_map_location_without_cuda_says_so(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CheckpointError, match=r"model\.pt: map_location='cuda', but CUDA is not available"):
        load_checkpoint(path, map_location="cuda")


# ----------------------------------------------- case 7: unusable folders (predict, dataset)


@pytest.mark.parametrize("flag", ["--output-dir", "--cache-dir"])
@pytest.mark.parametrize("below", [False, True])
def test_predict_refuses_unusable_folder_before_any_work(flag, below, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    target = blocker / "sub" if below else blocker
    folders = {"--output-dir": str(tmp_path / "out"), "--cache-dir": str(tmp_path / "cache"), flag: str(target)}
    argv = ["--model-path", str(tmp_path / "missing.pt"), "--data-dir", str(tmp_path / "no-data")]
    with pytest.raises(SystemExit, match=rf"^error: {flag} {target}: "):  # checked before the model is loaded
        predict.main([*argv, *[x for pair in folders.items() for x in pair]])


def test_preprocess_refuses_unusable_cache_dir_before_preprocessing(tmp_path, monkeypatch):
    write_patient(tmp_path / "data")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    monkeypatch.setattr(dataset, "load_volumes", lambda *a, **k: pytest.fail("preprocessed before the check"))
    with pytest.raises(SystemExit, match=rf"^error: --cache-dir {blocker}/cache: "):
        dataset.main(["preprocess", "--data-dir", str(tmp_path / "data"), "--cache-dir", str(blocker / "cache")])
