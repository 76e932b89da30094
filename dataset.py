"""The data: find patients in a folder (kaggle_3m-style TIFF folders and NIfTI files), read
them, cache their preprocessed volumes, and serve slices to PyTorch (`MRISegmentationDataset`).

CLI:
    python dataset.py synthesize OUT --patients N --seed S [--difficulty easy|hard] [--format tiff|nifti]
    python dataset.py preprocess --data-dir D [--cache-dir C] [--image-size S] [--num-workers W]
    python dataset.py check --data-dir D    (per patient: slices, lesion slices, copied channels, ranges)
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
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile
import torch
from torch.utils.data import Dataset

from nifti import _nifti_stem, discover_nifti_patients, read_nifti_volume
from patients import DataError, Patient, SliceFiles

# make_synthetic_dataset is re-exported: the phantom writers live in phantom.py
from phantom import DEFAULT_SLICES, DIFFICULTIES, FORMATS, make_synthetic_dataset
from preprocessing import IMAGE_DTYPE, Geometry, as_stored, preprocess_volume, preprocessing_config
from utils import (
    CLIParser,
    HelpFormatter,
    UsageError,
    add_shared_flag,
    check_writable_dir,
    ensure_writable_dir,
    one_line_warnings,
    shared_flags,
)

CACHE_FORMAT_VERSION = 2  # 2: key holds st_ctime_ns; entries checked on read
IMAGE_RE = re.compile(r"^(?P<prefix>.+)_(?P<k>\d+)\.tiff?$", re.IGNORECASE)
MASK_RE = re.compile(r"^(?P<prefix>.+)_(?P<k>\d+)_mask\.tiff?$", re.IGNORECASE)


class CacheWarning(UserWarning):
    """A damaged preprocessing-cache entry was found and is being rebuilt."""


# ---------------------------------------------------------------------------- discovery


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
    if root.is_file() and zipfile.is_zipfile(root):
        raise DataError(
            f"--data-dir {root}: is a zip file; unzip it first (`unzip -q {root}`) and pass the folder it "
            "creates (for the Kaggle LGG download: --data-dir kaggle_3m)"
        )
    if root.is_file():
        raise DataError(f"--data-dir {root}: is a file, not a folder; pass the folder that holds the patients")
    if not root.is_dir():
        raise DataError(
            f"data directory not found: {root}; to try the project on phantom data run `python train.py --demo`; "
            "for the Kaggle LGG data run `kaggle datasets download -d mateuszbuda/lgg-mri-segmentation`, unzip "
            "lgg-mri-segmentation.zip and pass --data-dir <path of its kaggle_3m folder>"
        )
    patients = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(_is_tiff(p) for p in directory.iterdir()):
            patients.append(_scan_patient(directory))
    if not patients:
        nested = [d for d in sorted(root.iterdir()) if d.is_dir() and _holds_patients(d)]
        hint = f"; did you mean --data-dir {nested[0]}?" if nested else ""
        if any(_is_tiff(p) for p in root.iterdir()):
            hint = (
                f"; {root} holds slices itself, so it looks like one patient's folder: pass its parent "
                f"(--data-dir {root.parent}), with predict.py --patients {root.name} for this patient alone"
            )
        raise DataError(
            f"no patients in {root}: expected sub-folders holding <patient>_<k>.tif slices (the kaggle_3m layout){hint}"
        )
    return patients


def _holds_patients(directory: Path) -> bool:
    return any(d.is_dir() and any(_is_tiff(p) for p in d.iterdir()) for d in directory.iterdir())


def select_patients(patients: Sequence[Patient], ids: Iterable[str]) -> list[Patient]:
    """The patients with the given ids, in that order. Raises DataError naming any id that
    is missing or listed twice (a patient scored twice would count twice in the mean)."""
    by_id = {p.patient_id: p for p in patients}
    ids = list(ids)
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DataError(f"patient(s) listed more than once: {', '.join(repeated)}")
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


def read_volume(patient: Patient, all_slices: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The kept slices of a patient (every slice with `all_slices`): images (S, H, W, 3) in
    the files' dtype and masks (S, H, W) bool, or None for a patient without masks."""
    if patient.nifti is not None:
        return read_nifti_volume(patient, all_slices)
    images, masks = [], []
    for item in patient.slices if all_slices else patient.kept:
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


@dataclass
class Volume:
    """A preprocessed patient: images float16 (S, 3, H, W), masks uint8 (S, H, W) or None."""

    patient_id: str
    images: np.ndarray
    masks: np.ndarray | None
    geometry: Geometry


def source_files(patient: Patient) -> list[Path]:
    """Every file a patient's volume is read from, in a fixed order: each slice's image and
    mask for a TIFF patient; the channel files (each once) and the mask for a NIfTI patient."""
    if patient.nifti is not None:
        return list(dict.fromkeys([*patient.nifti.channels, *([patient.nifti.mask] if patient.nifti.mask else [])]))
    return [path for item in patient.slices for path in (item.image, item.mask) if path is not None]


def cache_key(patient: Patient, config: dict) -> str:
    """Hash of the source files (`source_files`: path, size, mtime, inode change time) and
    the preprocessing parameters. The change time (st_ctime_ns) catches a file rewritten with
    the same size and a restored mtime: no tool can set it back."""
    files = []
    for path in source_files(patient):
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns])
    payload = json.dumps({"v": CACHE_FORMAT_VERSION, "files": files, "config": config}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _preprocess_patient(patient: Patient, config: dict) -> Volume:
    images, masks = read_volume(patient)
    numbers = [item.number for item in patient.kept]
    images, masks, geometry = preprocess_volume(images, masks, config["image_size"], numbers, config["norm_region"])
    return Volume(patient.patient_id, as_stored(images), masks, geometry)


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
    if images.dtype != IMAGE_DTYPE or images.shape[:2] != (slices, 3) or len(geometry.slice_numbers) != slices:
        expected = f"{np.dtype(IMAGE_DTYPE)} ({slices}, 3, H, W)"
        raise ValueError(f"images.npy is {images.dtype} {images.shape}, expected {expected}")
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


def load_volume(patient: Patient, image_size: int, cache_dir: str | Path | None, norm_region: str = "crop") -> Volume:
    """Preprocessed volume from the cache (memory-mapped) or computed and cached.
    `norm_region` ("crop" or "head", see `preprocessing.preprocess_volume`) is part of the cache key.

    A cache entry that cannot be read (missing or truncated file, bad JSON, arrays of the
    wrong shape) is rebuilt with a CacheWarning naming the patient. Raises DataError for
    unusable input files (see `read_image`).
    """
    config = preprocessing_config(image_size, norm_region)
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
    norm_region: str = "crop",
) -> list[Volume]:
    """Load (or preprocess in parallel threads) every patient's volume, in input order."""

    def load(patient: Patient) -> Volume:
        return load_volume(patient, image_size, cache_dir, norm_region)

    workers = max(1, min(num_workers, len(patients)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results: Iterable[Volume] = pool.map(load, patients)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(patients), desc="preprocess", unit="patient", disable=None)
        return list(results)


# ---------------------------------------------------------------------- all inputs


def discover_inputs(data_dir: str | Path) -> list[Patient]:
    """Every patient of `data_dir`: TIFF patient folders (`discover_patients`) and NIfTI
    files at its top level (`discover_nifti_patients`), both read when a folder has both,
    sorted by id. Raises DataError when a patient id appears in both forms."""
    root = Path(data_dir)
    nifti = discover_nifti_patients(root) if root.is_dir() else []
    if not nifti:
        return discover_patients(root)
    tiff = discover_patients(root) if _holds_patients(root) else []
    both = sorted({p.patient_id for p in tiff} & {p.patient_id for p in nifti})
    if both:
        raise DataError(f"patient {both[0]} is in {root} both as a TIFF folder and as NIfTI files; keep one")
    return sorted(tiff + nifti, key=lambda p: p.patient_id)


# ------------------------------------------------------------------------------ dataset


def neighbour_indices(n_slices: int, context: int) -> np.ndarray:
    """(S, 2C+1) int64: row s lists slices s-C .. s+C of a volume of `n_slices`, clamped to
    the volume, so edge slices repeat the border slice (2.5-D input)."""
    if context < 0:
        raise ValueError(f"context slices {context}: must be >= 0")
    offsets = np.arange(-context, context + 1)
    return np.clip(np.arange(n_slices)[:, None] + offsets, 0, n_slices - 1)


def stack_context(images: np.ndarray | torch.Tensor, context: int) -> np.ndarray | torch.Tensor:
    """A volume's slices with their C neighbours on each side as channels:
    (S, K, H, W) -> (S, K * (2C+1), H, W), channel blocks ordered s-C, ..., s, ..., s+C
    (K channels each); the same for training and prediction. C = 0 returns `images`."""
    if context == 0:
        return images
    rows = neighbour_indices(len(images), context)  # (S, 2C+1)
    if isinstance(images, torch.Tensor):
        rows = torch.as_tensor(rows, device=images.device)
    stacked = images[rows]  # (S, 2C+1, K, H, W)
    return stacked.reshape(len(images), -1, *images.shape[2:])


class MRISegmentationDataset(Dataset):
    """Slices of preprocessed volumes: (image float32 [3 (2C+1), H, W], mask float32 [1, H, W])
    with C = `context_slices` neighbours on each side stacked as channels (see `stack_context`)."""

    def __init__(self, volumes: Sequence[Volume], context_slices: int = 0):
        unlabelled = [v.patient_id for v in volumes if v.masks is None]
        if unlabelled:
            raise DataError(f"patients without mask files cannot be used here: {', '.join(unlabelled)}")
        if context_slices < 0:
            raise ValueError(f"context slices {context_slices}: must be >= 0")
        self.volumes = list(volumes)
        self.context_slices = context_slices
        self.index = [(v, s) for v, vol in enumerate(self.volumes) for s in range(len(vol.images))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        v, s = self.index[i]
        volume = self.volumes[v]
        rows = neighbour_indices(len(volume.images), self.context_slices)[s]  # (2C+1,)
        image = torch.from_numpy(np.asarray(volume.images[rows], dtype=np.float32)).flatten(0, 1)  # (3(2C+1), H, W)
        mask = torch.from_numpy(np.asarray(volume.masks[s], dtype=np.float32))[None]
        return image, mask

    def slice_areas(self) -> np.ndarray:
        return np.concatenate([np.asarray(v.masks).reshape(len(v.masks), -1).sum(axis=1) for v in self.volumes]).astype(
            np.float64
        )

    def context_table(self) -> np.ndarray:
        """(N, 2C+1) int64 indices into `stacked()` of each slice's neighbours (clamped within
        its volume): `images[table[batch]].flatten(1, 2)` gives the 2.5-D input of a batch."""
        tables, offset = [], 0
        for volume in self.volumes:
            tables.append(neighbour_indices(len(volume.images), self.context_slices) + offset)
            offset += len(volume.images)
        return np.concatenate(tables)

    def slice_patients(self) -> np.ndarray:
        """(N,) int64: the volume number of each slice, in `index` order."""
        return np.array([v for v, _ in self.index], dtype=np.int64)

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """All slices as two arrays: images float16 (N, 3, H, W), masks uint8 (N, H, W)."""
        return (
            np.concatenate([np.asarray(v.images) for v in self.volumes]),
            np.concatenate([np.asarray(v.masks) for v in self.volumes]),
        )


def add_dataset_flags(add: Callable[..., Any]) -> None:
    """Declare the training set's flags through `add` (`utils.RunFlags.add`)."""
    add(
        "--context-slices",
        defines_run=True,
        type=int,
        default=0,
        help="2.5-D: C neighbouring slices on each side as channels",
    )
    add("--no-cache")


# --------------------------------------------------------------------------- data check

CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")


def copied_channels(images: np.ndarray) -> list[tuple[int, int]]:
    """(copy, original) channel pairs of a volume (S, H, W, 3) where channel `copy` equals
    channel `original` on every slice: (0, 1) and (2, 1) for a pre- or post-contrast channel
    that copies FLAIR (the Kaggle LGG release fills a missing sequence with FLAIR), (2, 0) for
    a post-contrast channel that copies the pre-contrast one while neither copies FLAIR."""
    pairs = [(c, 1) for c in (0, 2) if np.array_equal(images[..., c], images[..., 1])]
    if not pairs and np.array_equal(images[..., 2], images[..., 0]):
        pairs.append((2, 0))
    return pairs


def check_patient(patient: Patient) -> dict:
    """What one patient holds, read from every slice (first and last included): slice and
    lesion-slice counts, copied channels, the intensity range per channel, the slice size,
    and a list of anything unusual. Raises DataError for an unreadable patient."""
    images, masks = read_volume(patient, all_slices=True)
    lesion_slices = int(masks.reshape(len(masks), -1).any(axis=1).sum()) if masks is not None else None
    copies = copied_channels(images)
    unusual = [f"{CHANNELS[c]} = {CHANNELS[o]}" for c, o in copies]
    unusual += [f"{CHANNELS[c]} is empty" for c in range(3) if not images[..., c].any()]
    if masks is None:
        unusual.append("no masks")
    elif lesion_slices == 0:
        unusual.append("no lesion")
    if len(images) < 3:
        unusual.append("fewer than 3 slices (none kept)")
    return {
        "patient": patient.patient_id,
        "slices": len(images),
        "lesion_slices": lesion_slices,
        "size": images.shape[1:3],
        "dtype": str(images.dtype),
        "range": [(images[..., c].min().item(), images[..., c].max().item()) for c in range(3)],
        "copies": copies,
        "unusual": unusual,
    }


def check_summary(rows: list[dict]) -> str:
    """One line over `check_patient` rows: patients, slices (range per patient), lesion
    slices, and how many patients have each copied channel."""
    slices = [r["slices"] for r in rows]
    lesion = sum(r["lesion_slices"] or 0 for r in rows)
    copies = {}
    for r in rows:
        for c, o in r["copies"]:
            copies[f"{CHANNELS[c]} = {CHANNELS[o]}"] = copies.get(f"{CHANNELS[c]} = {CHANNELS[o]}", 0) + 1
    copied = "; ".join(f"{name} in {n} patient(s)" for name, n in copies.items()) or "no copied channel"
    sizes = sorted({f"{r['size'][0]} x {r['size'][1]}" for r in rows})
    return (
        f"{len(rows)} patients, {sum(slices)} slices ({min(slices)}-{max(slices)} per patient, "
        f"{', '.join(sizes)}), {lesion} with lesion; {copied}; "
        f"{sum(1 for r in rows if r['unusual'])} patient(s) with a note"
    )


# ---------------------------------------------------------------------------------- CLI


def _cmd_synthesize(args: argparse.Namespace) -> None:
    out = ensure_writable_dir(args.out, "synthesize OUT")
    if any(child.is_dir() and not child.name.startswith(".") for child in out.iterdir()):
        raise UsageError(f"synthesize OUT {out}: already holds patient folders; give an empty or new folder")
    if any(_nifti_stem(child) is not None for child in out.iterdir()):
        raise UsageError(f"synthesize OUT {out}: already holds NIfTI files; give an empty or new folder")
    start = time.perf_counter()
    ids = make_synthetic_dataset(
        args.out,
        args.patients,
        args.seed,
        args.image_size,
        _slice_range(args),
        difficulty=args.difficulty,
        file_format=args.format,
    )
    print(
        f"wrote {len(ids)} {args.difficulty} phantom patients ({args.format}) to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )


def _slice_range(args: argparse.Namespace) -> tuple[int, int]:
    low, high = DEFAULT_SLICES[args.difficulty]
    return (low if args.min_slices is None else args.min_slices, high if args.max_slices is None else args.max_slices)


def _cmd_check(args: argparse.Namespace) -> None:
    patients = discover_inputs(args.data_dir)
    print(f"{'patient':<28}{'slices':>7}{'lesion':>7}  {'size':<10}{'range per channel (pre, FLAIR, post)':<40}notes")
    rows = []
    for patient in patients:
        row = check_patient(patient)
        rows.append(row)
        ranges = ", ".join(f"{lo:g}-{hi:g}" for lo, hi in row["range"])
        lesion = "-" if row["lesion_slices"] is None else row["lesion_slices"]
        size = f"{row['size'][0]}x{row['size'][1]}"
        notes = "; ".join(row["unusual"])
        print(f"{row['patient']:<28}{row['slices']:>7}{lesion:>7}  {size:<10}{ranges:<40}{notes}", flush=True)
    print(check_summary(rows))


def _cmd_preprocess(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    cache_dir = None if args.no_cache else check_writable_dir(args.cache_dir, "--cache-dir")
    patients = discover_inputs(args.data_dir)
    if cache_dir is not None:
        ensure_writable_dir(cache_dir, "--cache-dir")
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
    parser = CLIParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    about = "write a phantom data set (synthetic FLAIR-like slices and lesion masks) as kaggle_3m TIFFs or NIfTI"
    synth = commands.add_parser("synthesize", help=about, description=about, formatter_class=HelpFormatter)
    synth.add_argument("out", help="output folder")
    synth.add_argument("--patients", type=int, default=8, help="number of patients")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    add_shared_flag(synth, "--image-size", help="slice size of the written phantom in pixels (square, >= 16)")
    synth.add_argument(
        "--difficulty",
        choices=DIFFICULTIES,
        default="easy",
        help="easy: the demo phantom; hard: realistic FLAIR distractors and faint lesions",
    )
    synth.add_argument(
        "--format",
        choices=FORMATS,
        default="tiff",
        help="tiff: kaggle_3m folders; nifti: <patient>.nii.gz + _mask.nii.gz, 0.9 x 0.9 mm pixels, 5 mm slices, "
        "a permuted and flipped voxel order (phantom.nifti_phantom_affine)",
    )
    synth.add_argument("--min-slices", type=int, default=None, help="fewest slices per patient (default: 20; hard 12)")
    synth.add_argument("--max-slices", type=int, default=None, help="most slices per patient (default: 40; hard 60)")
    synth.set_defaults(func=_cmd_synthesize)
    about = "preprocess every patient of --data-dir into the cache that train.py and predict.py read"
    shared = shared_flags("--data-dir", "--cache-dir", "--no-cache", "--num-workers", num_workers="parallel patients")
    prep = commands.add_parser(
        "preprocess", help=about, description=about, formatter_class=HelpFormatter, parents=[shared]
    )
    add_shared_flag(prep, "--image-size")
    prep.set_defaults(func=_cmd_preprocess)
    about = "read every patient of --data-dir and report what it holds: slices, lesion slices, copied channels"
    check = commands.add_parser(
        "check", help=about, description=about, formatter_class=HelpFormatter, parents=[shared_flags("--data-dir")]
    )
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    one_line_warnings()
    if getattr(args, "patients", 1) < 1:
        sys.exit(f"error: --patients {args.patients}: must be >= 1")
    if getattr(args, "image_size", 16) < 16:
        sys.exit(f"error: --image-size {args.image_size}: must be >= 16")
    if args.command == "preprocess" and args.image_size % 16:
        sys.exit(f"error: --image-size {args.image_size}: must be divisible by 16 (the size train.py trains at)")
    if args.command == "synthesize" and not 3 <= _slice_range(args)[0] <= _slice_range(args)[1]:
        sys.exit("error: need 3 <= --min-slices <= --max-slices")
    try:
        args.func(args)
    except (DataError, UsageError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
