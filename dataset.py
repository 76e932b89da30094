"""Data pipeline: find patients in a kaggle_3m-style folder, read TIFF slices, cache the
preprocessed volumes, split patients, serve slices to PyTorch, and write phantom data.

CLI:
    python dataset.py synthesize OUT --patients N --seed S
    python dataset.py preprocess --data-dir D [--cache-dir C] [--image-size S] [--num-workers W]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile
import torch
from torch.utils.data import Dataset

from utils import (
    BRAIN_THRESHOLD,
    CLIP_PERCENTILES,
    SPECK_FRACTION,
    Geometry,
    UsageError,
    ensure_writable_dir,
    largest_connected_component,
    preprocess_volume,
)

CACHE_FORMAT_VERSION = 2  # 2: key holds st_ctime_ns; entries checked on read
IMAGE_RE = re.compile(r"^(?P<prefix>.+)_(?P<k>\d+)\.tiff?$", re.IGNORECASE)
MASK_RE = re.compile(r"^(?P<prefix>.+)_(?P<k>\d+)_mask\.tiff?$", re.IGNORECASE)


class DataError(Exception):
    """A problem with the input data that the user can fix; the message names the file."""


class CacheWarning(UserWarning):
    """A damaged preprocessing-cache entry was found and is being rebuilt."""


# ---------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class SliceFiles:
    number: int  # k in <prefix>_<k>.tif
    image: Path
    mask: Path | None

    @property
    def mask_name(self) -> str:
        """The mask file name that mirrors the image's: `P_001.tif` -> `P_001_mask.tif`
        (prefix, zero padding and extension spelling kept)."""
        return f"{self.image.stem}_mask{self.image.suffix}"


@dataclass(frozen=True)
class Patient:
    """One patient folder: all slices sorted by k, and which of them are kept."""

    patient_id: str
    directory: Path
    slices: tuple[SliceFiles, ...]

    @property
    def kept(self) -> tuple[SliceFiles, ...]:
        """All slices except the first and the last (coverage artefacts)."""
        return self.slices[1:-1]

    @property
    def labelled(self) -> bool:
        return self.slices[0].mask is not None


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def _scan_patient(directory: Path) -> Patient:
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and _is_tiff(p)):
        if path.name.startswith("."):
            continue
        mask_match, image_match = MASK_RE.match(path.name), IMAGE_RE.match(path.name)
        target, match = (masks, mask_match) if mask_match else (images, image_match)
        if match is None:
            raise DataError(f"{path}: unexpected file name; expected <prefix>_<k>.tif or <prefix>_<k>_mask.tif")
        k = int(match["k"])
        if k in target:
            raise DataError(f"{path}: slice number {k} appears twice (also {target[k]})")
        target[k] = path
    for k, path in masks.items():
        if k not in images:
            raise DataError(f"{path}: mask without a matching image slice")
    if masks and len(masks) != len(images):
        missing = sorted(set(images) - set(masks))
        item = SliceFiles(missing[0], images[missing[0]], None)
        expected = item.image.with_name(item.mask_name)
        raise DataError(
            f"patient {directory.name}: {len(missing)} slice(s) have no mask, e.g. {expected} is "
            "missing (a patient must have masks for every slice or for none)"
        )
    if len(images) < 3:
        raise DataError(
            f"patient {directory.name} ({directory}): {len(images)} slice(s); at least 3 are "
            "needed because the first and last slices are dropped"
        )
    slices = tuple(SliceFiles(k, images[k], masks.get(k)) for k in sorted(images))
    return Patient(directory.name, directory, slices)


def discover_patients(data_dir: str | Path) -> list[Patient]:
    """Every sub-folder of `data_dir` that holds TIFF slices is a patient (sorted by id).
    Files at the root and hidden folders are ignored."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root} (pass --data-dir)")
    patients = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(_is_tiff(p) for p in directory.iterdir()):
            patients.append(_scan_patient(directory))
    if not patients:
        nested = [d for d in sorted(root.iterdir()) if d.is_dir() and _holds_patients(d)]
        hint = f"; did you mean --data-dir {nested[0]}?" if nested else ""
        raise DataError(
            f"no patients in {root}: expected sub-folders holding <patient>_<k>.tif slices (the kaggle_3m layout){hint}"
        )
    return patients


def _holds_patients(directory: Path) -> bool:
    return any(d.is_dir() and any(_is_tiff(p) for p in d.iterdir()) for d in directory.iterdir())


def select_patients(patients: Sequence[Patient], ids: Iterable[str]) -> list[Patient]:
    """The patients with the given ids, in that order; names any that are missing."""
    by_id = {p.patient_id: p for p in patients}
    ids = list(ids)
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(f"{len(missing)} patient(s) not found in the data directory: {', '.join(missing)}")
    return [by_id[i] for i in ids]


# ------------------------------------------------------------------------------ reading


def _read_tiff(path: Path, channel_pages: bool = False) -> np.ndarray:
    """The one full-size image of a TIFF file (any compression imagecodecs decodes).

    Reduced-resolution pages and thumbnails (flagged reduced, or smaller than the largest
    page) are ignored; a second full-size page or series is refused, because one file is one
    slice. With `channel_pages`, three single-channel full-size pages of one series are
    accepted as the (3, H, W) planes of a colour slice. Raises DataError naming the file.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [page for page in tif.pages if not page.is_reduced] or list(tif.pages)
            largest = max(page.imagelength * page.imagewidth for page in pages)
            full = [page for page in pages if page.imagelength * page.imagewidth == largest]
            if len(full) == 1:
                return full[0].asarray()
            if channel_pages and len(full) == 3 == len(tif.series[0].pages) and full[0].samplesperpixel == 1:
                return tif.series[0].asarray()
    except Exception as error:  # tifffile and imagecodecs raise many types for corrupt files
        raise DataError(f"{path}: cannot read TIFF ({type(error).__name__}: {error})") from error
    raise DataError(
        f"{path}: holds {len(full)} full-size images (pages or series); expected one slice per file "
        "(reduced-resolution pages and thumbnails are ignored)"
    )


def _check_finite(array: np.ndarray, path: Path) -> None:
    """Refuse NaN and infinite pixels: they would silently zero the whole patient's normalisation."""
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DataError(
                f"{path}: {bad} non-finite pixel value(s) (NaN or infinity); replace them with a "
                "finite value (e.g. 0 for background) and rerun"
            )


def read_image(path: Path) -> np.ndarray:
    """An (H, W, 3) slice; (3, H, W) planar files are transposed. 8- or 16-bit, or float.

    Raises DataError naming the file for an unreadable file, a second full-size image in
    the file, a shape other than 3 channels, or any NaN/infinite pixel (refused, not replaced).
    """
    image = _read_tiff(path, channel_pages=True)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.moveaxis(image, 0, -1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(
            f"{path}: expected a 3-channel image (H x W x 3: pre-contrast, FLAIR, "
            f"post-contrast), got shape {image.shape}"
        )
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise DataError(f"{path}: unsupported pixel type {image.dtype}")
    _check_finite(image, path)
    return image


def read_mask(path: Path) -> np.ndarray:
    """An (H, W) bool mask; any non-zero value is foreground; H x W x C masks are merged.
    Raises DataError naming the file like `read_image` (NaN/infinite values are refused)."""
    mask = _read_tiff(path)
    _check_finite(mask, path)
    if mask.ndim == 3:
        mask = mask.any(axis=-1)
    if mask.ndim != 2:
        raise DataError(f"{path}: expected an H x W mask, got shape {mask.shape}")
    return mask != 0


def read_volume(patient: Patient) -> tuple[np.ndarray, np.ndarray | None]:
    """The kept slices of a patient: images (S, H, W, 3) and masks (S, H, W) or None."""
    images, masks = [], []
    for item in patient.kept:
        image = read_image(item.image)
        if images and (image.shape != images[0].shape or image.dtype != images[0].dtype):
            raise DataError(
                f"{item.image}: shape {image.shape} {image.dtype} differs from the patient's other "
                f"slices ({images[0].shape} {images[0].dtype})"
            )
        images.append(image)
        if item.mask is not None:
            mask = read_mask(item.mask)
            if mask.shape != image.shape[:2]:
                raise DataError(
                    f"{item.mask}: mask size {mask.shape} does not match its image {item.image.name} {image.shape[:2]}"
                )
            masks.append(mask)
    return np.stack(images), (np.stack(masks) if masks else None)


# -------------------------------------------------------------------------------- cache


def preprocessing_config(image_size: int) -> dict:
    """Every parameter that changes preprocessing: saved in checkpoints, part of cache keys."""
    return {
        "image_size": int(image_size),
        "brain_threshold": BRAIN_THRESHOLD,
        "crop_box": f"bright components holding >= {SPECK_FRACTION:g} of the bright pixels (specks ignored)",
        "clip_percentiles": list(CLIP_PERCENTILES),
        "image_resize": "bicubic, anti-aliased when shrinking",
        "mask_resize": "nearest-exact",
        "drop_first_last": True,
    }


@dataclass
class Volume:
    """A preprocessed patient: images float16 (S, 3, H, W), masks uint8 (S, H, W) or None."""

    patient_id: str
    images: np.ndarray
    masks: np.ndarray | None
    geometry: Geometry


def cache_key(patient: Patient, config: dict) -> str:
    """Hash of the source files (path, size, mtime, inode change time) and the preprocessing
    parameters. The change time (st_ctime_ns) catches a file rewritten with the same size
    and a restored mtime: no tool can set it back."""
    files = []
    for item in patient.slices:
        for path in (item.image, item.mask):
            if path is not None:
                stat = path.stat()
                files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns])
    payload = json.dumps({"v": CACHE_FORMAT_VERSION, "files": files, "config": config}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _preprocess_patient(patient: Patient, config: dict) -> Volume:
    images, masks = read_volume(patient)
    numbers = [item.number for item in patient.kept]
    images, masks, geometry = preprocess_volume(images, masks, config["image_size"], numbers)
    return Volume(patient.patient_id, images.astype(np.float16), masks, geometry)


def _write_synced(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create `path`, fill it with `write(handle)` and fsync it before returning."""
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_cache_entry(volume: Volume, entry: Path) -> None:
    """Write to a temp folder beside `entry`, fsync the files, then rename: readers never see
    half an entry, and a crash never leaves an entry whose arrays are not on disk. The folder
    and files get the umask's permissions, like any other new file."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{entry.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()  # mode 0o777 & ~umask (tempfile.mkdtemp would make it 0o700)
    try:
        _write_synced(tmp / "images.npy", lambda handle: np.save(handle, volume.images))
        if volume.masks is not None:
            _write_synced(tmp / "masks.npy", lambda handle: np.save(handle, volume.masks))
        geometry = json.dumps(volume.geometry.to_dict()).encode()
        _write_synced(tmp / "geometry.json", lambda handle: handle.write(geometry))
        _fsync_dir(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process wrote the same entry first
            if not (entry / "geometry.json").exists():
                raise
        _fsync_dir(entry.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache_entry(patient: Patient, entry: Path) -> Volume:
    """The cached volume, memory-mapped. Raises OSError, ValueError, KeyError or TypeError
    when a file is missing, truncated, not JSON, or its arrays do not fit the patient."""
    geometry = Geometry.from_dict(json.loads((entry / "geometry.json").read_text()))
    images = np.load(entry / "images.npy", mmap_mode="r")
    masks = np.load(entry / "masks.npy", mmap_mode="r") if patient.labelled else None
    slices = len(patient.kept)
    if images.dtype != np.float16 or images.shape[:2] != (slices, 3) or len(geometry.slice_numbers) != slices:
        raise ValueError(f"images.npy is {images.dtype} {images.shape}, expected float16 ({slices}, 3, H, W)")
    if masks is not None and (masks.dtype != np.uint8 or masks.shape != (slices, *images.shape[2:])):
        raise ValueError(f"masks.npy is {masks.dtype} {masks.shape}, expected uint8 ({slices}, H, W)")
    return Volume(patient.patient_id, images, masks, geometry)


def _discard_entry(entry: Path) -> None:
    """Move a damaged entry out of the way (atomically), then delete it."""
    trash = entry.parent / f".{entry.name}.{uuid.uuid4().hex[:12]}.broken"
    try:
        os.rename(entry, trash)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def load_volume(patient: Patient, image_size: int, cache_dir: str | Path | None) -> Volume:
    """Preprocessed volume from the cache (memory-mapped) or computed and cached.

    A cache entry that cannot be read (missing or truncated file, bad JSON, arrays of the
    wrong shape) is rebuilt with a CacheWarning naming the patient. Raises DataError for
    unusable input files (see `read_image`).
    """
    config = preprocessing_config(image_size)
    if cache_dir is None:
        return _preprocess_patient(patient, config)
    entry = Path(cache_dir) / f"{patient.patient_id}-{cache_key(patient, config)}"
    if entry.exists():
        try:
            return _read_cache_entry(patient, entry)
        except (OSError, ValueError, KeyError, TypeError) as error:
            warnings.warn(
                f"patient {patient.patient_id}: cache entry {entry} cannot be read "
                f"({type(error).__name__}: {error}); rebuilding it",
                CacheWarning,
                stacklevel=2,
            )
            _discard_entry(entry)
    _write_cache_entry(_preprocess_patient(patient, config), entry)
    return _read_cache_entry(patient, entry)


def load_volumes(
    patients: Sequence[Patient],
    image_size: int,
    cache_dir: str | Path | None = "./cache",
    num_workers: int = 4,
    progress: bool = False,
) -> list[Volume]:
    """Load (or preprocess in parallel threads) every patient's volume, in input order."""

    def load(patient: Patient) -> Volume:
        return load_volume(patient, image_size, cache_dir)

    workers = max(1, min(num_workers, len(patients)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results: Iterable[Volume] = pool.map(load, patients)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(patients), desc="preprocess", unit="patient")
        return list(results)


# ------------------------------------------------------------------------------- splits


def make_split(
    patient_ids: Sequence[str],
    val_patients: int = 10,
    seed: int = 42,
    folds: int | None = None,
    fold: int | None = None,
    strata: dict[str, bool] | None = None,
) -> dict:
    """Deterministic patient-level split: hold out `val_patients`, or fold `fold` of `folds`.

    With `strata` (e.g. patient -> has a lesion) each group is spread evenly over the
    validation set and the folds, so a lucky draw cannot put every lesion-free patient in
    validation. Returns a plain dict {train, val, seed, folds, fold, val_patients, stratified}.
    """
    ids = sorted(patient_ids)
    if len(set(ids)) != len(ids):
        raise DataError("duplicate patient ids in the data directory")
    order = _stratified_order(ids, strata or {}, np.random.default_rng(seed))
    if folds is not None:
        if not 2 <= folds <= len(ids):
            raise DataError(f"--folds {folds}: need 2 <= folds <= number of patients ({len(ids)})")
        if fold is None or not 0 <= fold < folds:
            raise DataError(f"--fold {fold}: must be in 0..{folds - 1}")
        val = [str(i) for i in np.array_split(np.array(order, dtype=object), folds)[fold]]
    else:
        if not 0 < val_patients < len(ids):
            raise DataError(
                f"--val-patients {val_patients}: must be between 1 and {len(ids) - 1} ({len(ids)} patients found)"
            )
        val = order[:val_patients]
    val_set = set(val)
    return {
        "train": [i for i in ids if i not in val_set],
        "val": sorted(val),
        "seed": seed,
        "folds": folds,
        "fold": fold,
        "val_patients": len(val),
        "stratified": bool(strata),
    }


def _stratified_order(ids: list[str], strata: dict[str, bool], rng: np.random.Generator) -> list[str]:
    """A random order in which every stratum is spread evenly: shuffle each group, give
    its members positions (rank + 0.5) / group size, and sort by position (ties at random)."""
    groups: dict[bool, list[str]] = {}
    for i in ids:
        groups.setdefault(strata.get(i, False), []).append(i)
    keyed = []
    for key in sorted(groups):
        members = [groups[key][j] for j in rng.permutation(len(groups[key]))]
        keyed += [((rank + 0.5) / len(members), rng.random(), pid) for rank, pid in enumerate(members)]
    return [pid for _, _, pid in sorted(keyed)]


# ------------------------------------------------------------------------------ dataset


class MRISegmentationDataset(Dataset):
    """Slices of preprocessed volumes: (image float32 [3, H, W], mask float32 [1, H, W])."""

    def __init__(self, volumes: Sequence[Volume]):
        unlabelled = [v.patient_id for v in volumes if v.masks is None]
        if unlabelled:
            raise DataError(f"patients without mask files cannot be used here: {', '.join(unlabelled)}")
        self.volumes = list(volumes)
        self.index = [(v, s) for v, vol in enumerate(self.volumes) for s in range(len(vol.images))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        v, s = self.index[i]
        volume = self.volumes[v]
        image = torch.from_numpy(np.asarray(volume.images[s], dtype=np.float32))
        mask = torch.from_numpy(np.asarray(volume.masks[s], dtype=np.float32))[None]
        return image, mask

    def volume(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        """All slices of volume `v` in slice order: images (S, 3, H, W), masks (S, H, W)."""
        return self.volumes[v].images, self.volumes[v].masks

    def slice_areas(self) -> np.ndarray:
        return np.concatenate([np.asarray(v.masks).reshape(len(v.masks), -1).sum(axis=1) for v in self.volumes]).astype(
            np.float64
        )

    def slice_weights(self, floor_fraction: float = 0.1) -> np.ndarray:
        """Sampling weight per slice: lesion area + `floor_fraction` x mean area over all
        slices, so empty slices are still drawn; uniform if no slice has a lesion."""
        areas = self.slice_areas()
        floor = floor_fraction * areas.mean()
        return areas + floor if floor > 0 else np.ones_like(areas)

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """All slices as two arrays: images float16 (N, 3, H, W), masks uint8 (N, H, W)."""
        return (
            np.concatenate([np.asarray(v.images) for v in self.volumes]),
            np.concatenate([np.asarray(v.masks) for v in self.volumes]),
        )


# ------------------------------------------------------------------------------ phantom


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return noise / (noise.std() + 1e-8)


def _phantom_patient(rng: np.random.Generator, n_slices: int, size: int, lesion: bool):
    """One phantom volume: images uint8 (S, H, W, 3), masks bool (S, H, W)."""
    z = np.linspace(-1.0, 1.0, n_slices, dtype=np.float32)[:, None, None]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 + rng.normal(0, 0.03 * size, 2)
    axes = size * np.array([rng.uniform(0.32, 0.42), rng.uniform(0.27, 0.35)])
    tilt = rng.uniform(-0.3, 0.3)
    dy, dx = y - centre[0], x - centre[1]
    u, v = dy * np.cos(tilt) - dx * np.sin(tilt), dy * np.sin(tilt) + dx * np.cos(tilt)
    radius = np.sqrt(np.clip(1.0 - (0.92 * z) ** 2, 0.05, None))  # head narrows at the ends
    rho = np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2) / radius  # (S, H, W); 1 = scalp

    head, brain = rho <= 1.0, rho <= 0.86
    skull = head & ~brain
    texture = 0.6 * _smooth_noise(rng, (n_slices, size, size), 2.0) + 0.4 * _smooth_noise(
        rng, (n_slices, size, size), 6.0
    )
    gain = rng.uniform(0.7, 1.3, 3)  # scanner gain per channel
    base = np.array([95.0, 85.0, 100.0]) * gain
    images = np.zeros((n_slices, size, size, 3), dtype=np.float32)
    for c in range(3):
        images[..., c] = np.where(brain, base[c] * (1 + 0.12 * texture), 0)
        images[..., c] += np.where(skull, base[c] * (1.6 if c != 1 else 0.7), 0)

    # ventricles: dark in FLAIR and T1, in the middle of the volume
    ventricles = np.zeros((n_slices, size, size), dtype=bool)
    for side in (-1, 1):
        vy, vx = dy - 0.05 * size, dx - side * 0.07 * size
        ventricles |= ((vy / (0.12 * size)) ** 2 + (vx / (0.035 * size)) ** 2 + (z / 0.45) ** 2) <= 1
    images[ventricles] *= np.array([0.45, 0.3, 0.5], dtype=np.float32)

    # vessels: bright spots in the post-contrast channel only (distractors)
    for _ in range(rng.integers(2, 6)):
        py, px = centre + rng.normal(0, 0.15 * size, 2)
        pz = rng.uniform(-0.8, 0.8)
        spot = ((y - py) ** 2 + (x - px) ** 2 < (0.015 * size) ** 2) & (np.abs(z - pz) < 0.2) & brain
        images[..., 2][spot] *= 1.8

    masks = np.zeros((n_slices, size, size), dtype=bool)
    if lesion:  # one connected abnormality, as in most LGG cases
        masks = largest_connected_component(_phantom_lesion(rng, z, dy, dx, axes, n_slices, size) & brain & ~ventricles)
        contrast = rng.uniform(1.3, 1.9)
        halo = _soft_edge(masks)
        images[..., 1] *= 1 + (contrast - 1) * halo
        images[..., 0] *= 1 - 0.12 * halo
        images[..., 2] *= 1 + rng.uniform(0.0, 0.3) * halo

    images += rng.normal(0, 3.0, images.shape).astype(np.float32) * head[..., None]
    return np.clip(images, 0, 255).astype(np.uint8), masks


def _phantom_lesion(rng, z, dy, dx, axes, n_slices, size) -> np.ndarray:
    """An irregular blob inside the brain with a random size and position."""
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.5)
    cy, cx = dist * axes[0] * np.sin(angle), dist * axes[1] * np.cos(angle)
    cz = rng.uniform(-0.4, 0.4)
    ry, rx = size * rng.uniform(0.04, 0.14, 2)
    rz = rng.uniform(0.15, 0.45)
    distance = np.sqrt(((dy - cy) / ry) ** 2 + ((dx - cx) / rx) ** 2 + ((z - cz) / rz) ** 2)
    wobble = 0.25 * _smooth_noise(rng, (n_slices, size, size), 3.0)
    return distance + wobble < 1.0


def _soft_edge(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.clip(gaussian_filter(mask.astype(np.float32), (0.5, 1.2, 1.2)) * 1.6, 0, 1)


def make_synthetic_dataset(
    root: str | Path,
    patients: int = 8,
    seed: int = 0,
    image_size: int = 256,
    slices: tuple[int, int] = (20, 40),
    lesion_free_fraction: float = 0.15,
) -> list[str]:
    """Write a phantom data set in the kaggle_3m layout; returns the patient ids.

    Each patient is a head (scalp, brain texture, ventricles, bright vessels in channel 2)
    with one irregular, connected lesion that is bright in channel 1 (FLAIR) at a
    per-patient contrast and size; about `lesion_free_fraction` of the patients have no lesion at all.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_free = int(round(lesion_free_fraction * patients))
    lesion_free = set(rng.permutation(patients)[:n_free].tolist())
    ids, rows = [], ["patient,slices,lesion_slices"]
    for p in range(patients):
        patient_rng = np.random.default_rng([seed, p])
        n_slices = int(patient_rng.integers(slices[0], slices[1] + 1))
        images, masks = _phantom_patient(patient_rng, n_slices, image_size, p not in lesion_free)
        pid = f"TCGA_PH_{p:04d}_{20000101 + int(patient_rng.integers(0, 1200))}"
        folder = root / pid
        folder.mkdir(exist_ok=True)
        for k in range(1, n_slices + 1):
            tifffile.imwrite(folder / f"{pid}_{k}.tif", images[k - 1], photometric="rgb")
            tifffile.imwrite(folder / f"{pid}_{k}_mask.tif", masks[k - 1].astype(np.uint8) * 255)
        ids.append(pid)
        rows.append(f"{pid},{n_slices},{int(masks.any(axis=(1, 2)).sum())}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    (root / "README.md").write_text("Synthetic phantom in the kaggle_3m layout (dataset.py).\n")
    return ids


# ---------------------------------------------------------------------------------- CLI


def _cmd_synthesize(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    ids = make_synthetic_dataset(
        args.out, args.patients, args.seed, args.image_size, (args.min_slices, args.max_slices)
    )
    print(f"wrote {len(ids)} phantom patients to {args.out} in {time.perf_counter() - start:.1f} s")


def _cmd_preprocess(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    cache_dir = None if args.no_cache else ensure_writable_dir(args.cache_dir, "--cache-dir")
    patients = discover_patients(args.data_dir)
    volumes = load_volumes(patients, args.image_size, cache_dir, args.num_workers, progress=True)
    kept = sum(len(v.images) for v in volumes)
    labelled = [v for v in volumes if v.masks is not None]
    lesion = sum(int(np.asarray(v.masks).reshape(len(v.masks), -1).any(axis=1).sum()) for v in labelled)
    print(
        f"{len(volumes)} patients ({len(labelled)} labelled), {kept} slices kept "
        f"(first/last dropped), {lesion} with lesion, {time.perf_counter() - start:.2f} s"
        + (f", cache: {cache_dir}" if cache_dir else "")
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synthesize", help="write a phantom data set in the kaggle_3m layout")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--patients", type=int, default=8, help="number of patients (default 8)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--image-size", type=int, default=256, help="slice size in pixels (default 256)")
    synth.add_argument("--min-slices", type=int, default=20, help="fewest slices per patient (default 20)")
    synth.add_argument("--max-slices", type=int, default=40, help="most slices per patient (default 40)")
    synth.set_defaults(func=_cmd_synthesize)
    prep = commands.add_parser("preprocess", help="fill the preprocessing cache")
    prep.add_argument("--data-dir", default="./kaggle_3m", help="kaggle_3m-style folder (default ./kaggle_3m)")
    prep.add_argument("--cache-dir", default="./cache", help="cache folder (default ./cache)")
    prep.add_argument("--no-cache", action="store_true", help="preprocess without writing the cache")
    prep.add_argument("--image-size", type=int, default=256, help="preprocessed size (default 256)")
    prep.add_argument("--num-workers", type=int, default=4, help="parallel patients (default 4)")
    prep.set_defaults(func=_cmd_preprocess)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if getattr(args, "patients", 1) < 1 or getattr(args, "image_size", 16) < 16:
        sys.exit("error: --patients must be >= 1 and --image-size >= 16")
    if args.command == "synthesize" and not 3 <= args.min_slices <= args.max_slices:
        sys.exit("error: need 3 <= --min-slices <= --max-slices")
    try:
        args.func(args)
    except (DataError, UsageError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
