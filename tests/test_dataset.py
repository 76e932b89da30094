"""Discovery, reading, caching, splits, slice weights and the phantom writer."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

import dataset
from dataset import MRISegmentationDataset, discover_patients, load_volume, load_volumes, read_volume
from patients import DataError
from sampling import AreaSampler

ROOT = Path(__file__).resolve().parents[1]


def write_patient(root: Path, pid: str, numbers, size=32, masks=True, value=80):
    folder = root / pid
    folder.mkdir(parents=True, exist_ok=True)
    for k in numbers:
        image = np.full((size, size, 3), value, np.uint8)
        image[0, 0] = k  # tag each slice with its number
        tifffile.imwrite(folder / f"{pid}_{k}.tif", image, photometric="rgb")
        if masks:
            tifffile.imwrite(folder / f"{pid}_{k}_mask.tif", np.zeros((size, size), np.uint8))
    return folder


# ---------------------------------------------------------------------------- discovery


def test_slices_sorted_numerically_and_first_last_dropped(tmp_path):
    folder = write_patient(tmp_path, "P1", [1, 2, 3, 10, 11, 20])
    (folder / "._P1_4.tif").write_bytes(b"macOS resource fork, not a TIFF")
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "README.md").write_text("stray\n")
    (tmp_path / ".hidden").mkdir()
    tifffile.imwrite(tmp_path / ".hidden" / "x_1.tif", np.zeros((4, 4, 3), np.uint8))
    (patient,) = discover_patients(tmp_path)
    assert [s.number for s in patient.slices] == [1, 2, 3, 10, 11, 20]
    assert [s.number for s in patient.kept] == [2, 3, 10, 11]
    images, masks = read_volume(patient)
    assert images[:, 0, 0, 0].tolist() == [2, 3, 10, 11]
    assert masks.shape == (4, 32, 32)


def test_missing_and_empty_data_dir(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover_patients(tmp_path / "nope")
    with pytest.raises(DataError, match="no patients"):
        discover_patients(tmp_path)
    write_patient(tmp_path / "kaggle_3m", "P1", range(1, 5))  # the zip's parent folder given by mistake
    with pytest.raises(DataError, match="did you mean --data-dir .*kaggle_3m"):
        discover_patients(tmp_path)


def test_partial_masks_name_the_missing_file(tmp_path):
    folder = write_patient(tmp_path, "P1", range(1, 6))
    (folder / "P1_4_mask.tif").unlink()
    with pytest.raises(DataError, match="P1_4_mask.tif"):
        discover_patients(tmp_path)


def test_too_few_slices_names_patient(tmp_path):
    write_patient(tmp_path, "TINY", [1, 2])
    with pytest.raises(DataError, match="TINY"):
        discover_patients(tmp_path)


def test_unlabelled_patient_is_not_an_error(tmp_path):
    write_patient(tmp_path, "U1", range(1, 6), masks=False)
    (patient,) = discover_patients(tmp_path)
    assert not patient.labelled
    volume = load_volume(patient, 32, None)
    assert volume.masks is None
    with pytest.raises(DataError, match="U1"):
        MRISegmentationDataset([volume])


# ------------------------------------------------------------------------------ reading


def shrink_mask(folder):
    tifffile.imwrite(folder / "P1_3_mask.tif", np.zeros((16, 16), np.uint8))


def truncate_image(folder):
    path = folder / "P1_2.tif"
    path.write_bytes(path.read_bytes()[:100])


def make_grayscale(folder):
    tifffile.imwrite(folder / "P1_3.tif", np.zeros((32, 32), np.uint8))


@pytest.mark.parametrize(
    "damage, message",
    [(shrink_mask, "P1_3_mask.tif"), (truncate_image, "P1_2.tif"), (make_grayscale, "P1_3.tif.*3-channel")],
)
def test_bad_slice_file_is_named(damage, message, tmp_path):
    damage(write_patient(tmp_path, "P1", range(1, 6)))
    with pytest.raises(DataError, match=message):
        read_volume(discover_patients(tmp_path)[0])


def test_multichannel_and_nonbinary_masks_accepted(tmp_path):
    folder = write_patient(tmp_path, "P1", range(1, 6))
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[4:8, 4:8, 1] = 1  # foreground only in one channel, value 1 not 255
    tifffile.imwrite(folder / "P1_3_mask.tif", mask)
    _, masks = read_volume(discover_patients(tmp_path)[0])
    assert masks[1].sum() == 16 and masks.dtype == bool


def test_16bit_images_preprocess_like_8bit(small_phantom, tmp_path):
    patient = discover_patients(small_phantom)[0]
    copy = tmp_path / "copy"
    shutil.copytree(patient.directory, copy / patient.patient_id)
    for item in discover_patients(copy)[0].slices:
        image = tifffile.imread(item.image).astype(np.uint16) * 257  # 0..255 -> 0..65535
        tifffile.imwrite(item.image, image, photometric="rgb")
    v8 = load_volume(patient, 64, None)
    v16 = load_volume(discover_patients(copy)[0], 64, None)
    assert v16.geometry == v8.geometry
    np.testing.assert_allclose(v16.images.astype(np.float32), v8.images.astype(np.float32), atol=0.02)
    np.testing.assert_array_equal(v16.masks, v8.masks)


def test_cli_errors_exit_nonzero_without_traceback(tmp_path):
    folder = write_patient(tmp_path, "P1", range(1, 6))
    (folder / "P1_4_mask.tif").unlink()
    result = subprocess.run(
        [sys.executable, "dataset.py", "preprocess", "--data-dir", str(tmp_path), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "P1_4_mask.tif" in result.stderr and "Traceback" not in result.stderr


# -------------------------------------------------------------------------------- cache


def test_cache_hit_and_memory_mapped(small_phantom, tmp_path, monkeypatch):
    patient = discover_patients(small_phantom)[0]
    first = load_volume(patient, 32, tmp_path)
    calls = []
    real = dataset._preprocess_patient
    monkeypatch.setattr(dataset, "_preprocess_patient", lambda *a: calls.append(1) or real(*a))
    second = load_volume(patient, 32, tmp_path)
    assert calls == []
    assert isinstance(second.images, np.memmap)
    assert second.images.dtype == np.float16 and second.masks.dtype == np.uint8
    np.testing.assert_array_equal(first.images, second.images)
    assert first.geometry == second.geometry


def test_cache_miss_after_touch_or_new_image_size(small_phantom, tmp_path, monkeypatch):
    patient = discover_patients(small_phantom)[0]
    load_volume(patient, 32, tmp_path)
    calls = []
    real = dataset._preprocess_patient
    monkeypatch.setattr(dataset, "_preprocess_patient", lambda *a: calls.append(1) or real(*a))
    assert load_volume(patient, 48, tmp_path).images.shape[-1] == 48
    assert len(calls) == 1
    path = patient.kept[0].image
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_volume(patient, 32, tmp_path)
    assert len(calls) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_parallel_load_matches_serial(small_phantom):
    patients = discover_patients(small_phantom)
    parallel = load_volumes(patients, 32, None, num_workers=3)
    serial = [load_volume(p, 32, None) for p in patients]
    assert [v.patient_id for v in parallel] == [p.patient_id for p in patients]
    for a, b in zip(parallel, serial):
        np.testing.assert_array_equal(a.images, b.images)


# ------------------------------------------------------------------ dataset and weights


def test_dataset_items_and_weights(phantom_dir):
    volumes = load_volumes(discover_patients(phantom_dir), 32, None)
    ds = MRISegmentationDataset(volumes)
    assert len(ds) == sum(len(v.images) for v in volumes)
    image, mask = ds[3]
    assert image.shape == (3, 32, 32) and image.dtype.__str__() == "torch.float32"
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    areas = ds.slice_areas()
    weights = AreaSampler(areas, ds.slice_patients()).weights.numpy()  # the default sampler's weights
    assert (weights > 0).all()
    assert (areas == 0).any(), "phantom should have empty slices"
    np.testing.assert_allclose(weights, areas + 0.1 * areas.mean())
    big, small = np.argmax(areas), np.argmin(np.where(areas > 0, areas, np.inf))
    assert weights[big] > weights[small] > weights[np.argmin(areas)]


# ------------------------------------------------------------------------------ phantom


def test_phantom_layout(phantom_dir):
    root_files = sorted(p.name for p in phantom_dir.iterdir() if p.is_file())
    assert root_files == ["README.md", "data.csv"]
    patients = discover_patients(phantom_dir)
    assert len(patients) == 8
    lesion_patients = 0
    for patient in patients:
        assert 12 <= len(patient.slices) <= 18
        assert [s.number for s in patient.slices] == list(range(1, len(patient.slices) + 1))
        image = tifffile.imread(patient.slices[5].image)
        mask = tifffile.imread(patient.slices[5].mask)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        masks = np.stack([tifffile.imread(s.mask) for s in patient.slices])
        lesion_patients += bool(masks.any())
        if masks.any():
            images = np.stack([tifffile.imread(s.image) for s in patient.slices])
            inside, outside = images[..., 1][masks > 0], images[..., 1][(masks == 0) & (images[..., 1] > 40)]
            assert inside.mean() > 1.15 * outside.mean(), "lesions are bright in FLAIR"
    assert 0 < lesion_patients < 8


# ------------------------------------------------------------------- damaged cache entries


def truncate_images(entry):
    path = entry / "images.npy"
    path.write_bytes(path.read_bytes()[:200])


def corrupt_geometry(entry):
    (entry / "geometry.json").write_text('{"original_shape": [64, 6')


def remove_masks(entry):
    (entry / "masks.npy").unlink()


def remove_geometry(entry):
    (entry / "geometry.json").unlink()


@pytest.mark.parametrize("damage", [truncate_images, corrupt_geometry, remove_masks, remove_geometry])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(damage, small_phantom, tmp_path):
    patient = discover_patients(small_phantom)[0]
    fresh = load_volume(patient, 32, None)
    load_volume(patient, 32, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    damage(entry)
    with pytest.warns(dataset.CacheWarning, match=rf"patient {patient.patient_id}: cache entry .* cannot be read"):
        rebuilt = load_volume(patient, 32, tmp_path / "cache")
    np.testing.assert_array_equal(rebuilt.images, fresh.images)
    np.testing.assert_array_equal(rebuilt.masks, fresh.masks)
    assert rebuilt.geometry == fresh.geometry
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name], "broken or temp folders left behind"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry reads without a warning
        load_volume(patient, 32, tmp_path / "cache")


def test_rewrite_with_same_size_and_mtime_is_not_served_stale(small_phantom, tmp_path):
    patient = discover_patients(small_phantom)[0]
    before = load_volume(patient, 32, tmp_path / "cache")
    path = patient.kept[0].image
    stat = path.stat()
    image = tifffile.imread(path)
    tifffile.imwrite(path, 255 - image, photometric="rgb")  # same size on disk, new pixels
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    after = load_volume(patient, 32, tmp_path / "cache")
    np.testing.assert_array_equal(after.images, load_volume(patient, 32, None).images)
    assert not np.array_equal(after.images, before.images)


def test_cache_entry_is_fsynced_before_rename_with_umask_permissions(small_phantom, tmp_path, monkeypatch):
    patient = discover_patients(small_phantom)[0]
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append("rename") or real_rename(a, b))
    old_umask = os.umask(0o022)
    try:
        load_volume(patient, 32, tmp_path / "cache")
    finally:
        os.umask(old_umask)
    synced_first = {Path(e).name for e in events[: events.index("rename")]}
    assert {"images.npy", "masks.npy", "geometry.json"} <= synced_first
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.stat().st_mode & 0o777 == 0o755  # 0o777 & ~umask, not mkdtemp's 0o700
    assert (entry / "images.npy").stat().st_mode & 0o777 == 0o644
