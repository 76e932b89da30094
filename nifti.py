"""NIfTI volumes: a folder of NIfTI files read into the same (S, H, W, 3) images and (S, H, W)
masks as a TIFF patient folder, and masks or probabilities written back on the input grid.

Naming, in the data folder itself:
  <patient>.nii.gz                 one 4-D volume X x Y x Z x 3, channels last
                                   (pre-contrast, FLAIR, post-contrast), or instead
  <patient>_pre.nii.gz, <patient>_flair.nii.gz, <patient>_post.nii.gz   one 3-D file per
                                   sequence; FLAIR is required, a missing one is replaced by FLAIR
  <patient>_mask.nii.gz            optional ground truth (non-zero = abnormality)
(.nii works as well as .nii.gz). Slices are taken along the voxel axis closest to the
world's superior-inferior axis (from the affine, nibabel's io_orientation).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from patients import DataError, NiftiFiles, Patient, SliceFiles

NIFTI_SEQUENCE_SUFFIXES = ("_pre", "_flair", "_post")  # in channel order
NIFTI_MASK_SUFFIX = "_mask"
SLICE_AXES = ("S", "P", "L")  # index directions of (slice, row, column): axial slices from the
# feet up, each seen in the radiological convention (anterior at the top, patient's left on the right)
GRID_TOLERANCE = 1e-3  # mm: largest affine difference between the files of one patient


def _nifti_stem(path: Path) -> str | None:
    """`name` of name.nii / name.nii.gz (any case); None for other files."""
    for extension in (".nii.gz", ".nii"):
        if path.name.lower().endswith(extension):
            return path.name[: -len(extension)]
    return None


def _load_nifti(path: Path):
    """The nibabel image (header read, data not yet); DataError naming the file if unreadable."""
    import nibabel

    try:
        return nibabel.load(path)
    except Exception as error:  # nibabel raises many types for damaged or foreign files
        raise DataError(f"{path}: cannot read NIfTI ({type(error).__name__}: {error})") from error


def _to_slices(affine: np.ndarray, path: Path) -> np.ndarray:
    """nibabel orientation transform from the file's voxel axes to SLICE_AXES."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    orientation = io_orientation(affine)
    if np.isnan(orientation).any():
        raise DataError(f"{path}: the affine has no clear axis directions (degenerate): {affine.tolist()}")
    return ornt_transform(orientation, axcodes2ornt(SLICE_AXES))


def _spatial_shape(image, path: Path, channels: int | None) -> tuple[int, int, int]:
    """(X, Y, Z) of a 3-D file (`channels` None; a trailing axis of 1 is allowed) or of a
    4-D file with `channels` channels last."""
    shape = tuple(image.shape)
    if channels is None and (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        return shape[:3]
    if channels is not None and len(shape) == 4 and shape[3] == channels:
        return shape[:3]
    expected = "a 3-D volume" if channels is None else f"a 4-D volume X x Y x Z x {channels} (channels last)"
    hint = "" if channels is None else f"; or separate files <patient>{'/'.join(NIFTI_SEQUENCE_SUFFIXES)}.nii.gz"
    raise DataError(f"{path}: expected {expected}, got shape {shape}{hint}")


def _group_nifti_files(root: Path) -> dict[str, dict[str, Path]]:
    """patient id -> {"volume" or a suffix: path} for the NIfTI files directly in `root`."""
    groups: dict[str, dict[str, Path]] = {}
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        stem = _nifti_stem(path)
        if stem is None:
            continue
        role, patient_id = "volume", stem
        for suffix in (*NIFTI_SEQUENCE_SUFFIXES, NIFTI_MASK_SUFFIX):
            if stem.lower().endswith(suffix) and len(stem) > len(suffix):
                role, patient_id = suffix, stem[: -len(suffix)]
                break
        files = groups.setdefault(patient_id, {})
        if role in files:
            raise DataError(f"{path}: patient {patient_id} already has this file as {files[role].name}")
        files[role] = path
    return groups


def _nifti_channels(patient_id: str, files: dict[str, Path]) -> tuple[Path, ...]:
    """The channel files of one patient; a missing pre- or post-contrast file is replaced by
    FLAIR with a warning."""
    volume, sequences = files.get("volume"), [files.get(s) for s in NIFTI_SEQUENCE_SUFFIXES]
    separate = [p.name for p in sequences if p is not None]
    if volume is not None and separate:
        raise DataError(
            f"patient {patient_id}: both a 4-D volume {volume.name} and sequence files {', '.join(separate)}; keep one"
        )
    if volume is not None:
        return (volume,)
    flair = sequences[1]
    if flair is None:
        found = ", ".join(p.name for p in files.values())
        raise DataError(
            f"patient {patient_id}: no image volume {patient_id}.nii.gz or FLAIR file {patient_id}_flair.nii.gz "
            f"(found {found})"
        )
    for suffix, path in zip(NIFTI_SEQUENCE_SUFFIXES, sequences, strict=True):
        if path is None:
            warnings.warn(
                f"patient {patient_id}: no {patient_id}{suffix}.nii.gz; FLAIR is used in its place (as in the Kaggle "
                "LGG data)",
                stacklevel=3,
            )
    return tuple(p or flair for p in sequences)


def _nifti_patient(patient_id: str, files: dict[str, Path], root: Path) -> Patient:
    """Check that every file of the patient shares one voxel grid; one SliceFiles per axial slice."""
    channels, mask = _nifti_channels(patient_id, files), files.get(NIFTI_MASK_SUFFIX)
    reference = _load_nifti(channels[0])
    shape = _spatial_shape(reference, channels[0], 3 if len(channels) == 1 else None)
    for path in [*dict.fromkeys(channels[1:]), *([mask] if mask else [])]:
        image = _load_nifti(path)
        if _spatial_shape(image, path, None) != shape:
            raise DataError(
                f"{path}: voxel grid {tuple(image.shape[:3])} differs from {channels[0].name}'s {shape}; "
                "the files of one patient must share a grid"
            )
        if not np.allclose(image.affine, reference.affine, atol=GRID_TOLERANCE):
            raise DataError(
                f"{path}: affine differs from {channels[0].name}'s by up to "
                f"{np.abs(image.affine - reference.affine).max():.3g} mm; the files of one patient must share a grid"
            )
    transform = _to_slices(reference.affine, channels[0])
    n_slices = shape[int(np.flatnonzero(transform[:, 0] == 0)[0])]
    if n_slices < 3:
        raise DataError(
            f"{channels[0]}: {n_slices} axial slice(s); at least 3 are needed because the first and last are dropped"
        )
    slices = tuple(SliceFiles(k, channels[0], mask) for k in range(1, n_slices + 1))
    spacing = nifti_spacing(reference, transform, channels[0])
    return Patient(patient_id, root, slices, nifti=NiftiFiles(channels, mask), spacing=spacing)


SPATIAL_UNITS_IN_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}  # NIfTI-1 xyz units


def nifti_spacing(image, transform: np.ndarray, path: Path) -> tuple[float, float, float]:
    """The voxel size in mm along the (slice, row, col) axes that `read_nifti_volume` gives:
    the lengths of the affine's first three columns (nibabel's `affines.voxel_sizes`, the
    geometry a viewer uses), permuted by the orientation `transform` (`_to_slices`), in the
    header's spatial unit converted to mm ("unknown" read as mm, the NIfTI-1 default), each
    the shortest decimal at the header's float32 precision (a stored 0.9 reads 0.9, not
    0.8999999762). Raises DataError naming the file for a zero voxel size."""
    from nibabel.affines import voxel_sizes

    sizes = voxel_sizes(image.affine)  # (X, Y, Z) mm per voxel step
    unit = SPATIAL_UNITS_IN_MM.get(image.header.get_xyzt_units()[0], 1.0)
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(transform):
        spacing[int(target)] = float(str(np.float32(sizes[axis] * unit)))
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise DataError(f"{path}: voxel size {tuple(sizes)} from the affine is not positive")
    return (spacing[0], spacing[1], spacing[2])


def discover_nifti_patients(data_dir: str | Path) -> list[Patient]:
    """Patients from the NIfTI files directly in `data_dir` (naming above), sorted by id;
    [] if there are none. Only headers are read here. Raises DataError naming the file for
    an unreadable file, a wrong shape, files of one patient on different grids, a mask
    without an image, or fewer than 3 axial slices."""
    root = Path(data_dir)
    return [_nifti_patient(pid, files, root) for pid, files in sorted(_group_nifti_files(root).items())]


def _read_nifti_array(path: Path) -> np.ndarray:
    """The voxel data as stored (scaled if the header says so); non-finite values refused."""
    data = np.asanyarray(_load_nifti(path).dataobj)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DataError(
            f"{path}: {int((~np.isfinite(data)).sum())} non-finite voxel(s) (NaN or inf); "
            "replace them before training or predicting"
        )
    return data


def read_nifti_volume(patient: Patient, all_slices: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The kept axial slices of a NIfTI patient (every slice with `all_slices`), as
    read_volume gives them for TIFF folders: images (S, H, W, 3) in the files' dtype and masks
    (S, H, W) bool or None, with S along the world's inferior -> superior axis and (H, W) in
    SLICE_AXES order."""
    kept = slice(None) if all_slices else slice(1, -1)
    from nibabel.orientations import apply_orientation

    files = patient.nifti
    arrays = {path: _read_nifti_array(path) for path in dict.fromkeys(files.channels)}
    if len(files.channels) == 1:
        data = arrays[files.channels[0]]  # (X, Y, Z, 3)
    else:
        data = np.stack([arrays[p].reshape(arrays[p].shape[:3]) for p in files.channels], axis=-1)
    transform = _to_slices(_load_nifti(files.channels[0]).affine, files.channels[0])
    images = np.ascontiguousarray(apply_orientation(data, transform)[kept])  # (X, Y, Z, 3) -> (S, H, W, 3)
    if files.mask is None:
        return images, None
    mask = _read_nifti_array(files.mask)
    mask = apply_orientation(mask.reshape(mask.shape[:3]) != 0, transform)[kept]
    return images, np.ascontiguousarray(mask)


def write_nifti_mask(patient: Patient, masks: np.ndarray, path: str | Path) -> None:
    """Write masks (all slices S, H, W; SLICE_AXES order as read_nifti_volume gives them) as a
    uint8 0/1 NIfTI file on the voxel grid of the patient's image file, with its affine."""
    write_nifti_array(patient, np.asarray(masks, dtype=bool).astype(np.uint8), path)


def write_nifti_array(patient: Patient, array: np.ndarray, path: str | Path) -> None:
    """Write an array of all slices (S, H, W; SLICE_AXES order as read_nifti_volume gives
    them) in its own dtype (uint8 masks, float32 probabilities) as a NIfTI file on the voxel
    grid of the patient's image file, with its affine, qform/sform codes and units, so a
    viewer shows it over the scan. Raises DataError for a degenerate affine."""
    import nibabel
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    reference = _load_nifti(patient.nifti.channels[0])
    _to_slices(reference.affine, patient.nifti.channels[0])  # refuses a degenerate affine
    back = ornt_transform(axcodes2ornt(SLICE_AXES), io_orientation(reference.affine))
    data = apply_orientation(np.asarray(array), back)  # (S, H, W) -> (X, Y, Z)
    image = nibabel.Nifti1Image(np.ascontiguousarray(data), reference.affine)
    header = reference.header
    image.set_qform(reference.affine, code=int(header["qform_code"]))
    image.set_sform(reference.affine, code=int(header["sform_code"]))
    image.header.set_xyzt_units(*header.get_xyzt_units())
    nibabel.save(image, path)
