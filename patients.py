"""What a patient is on disk: its slice files (a kaggle_3m TIFF folder) or NIfTI files, and
`DataError`, the error for input data a user must fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(Exception):
    """A problem with the input data that the user can fix; the message names the file."""


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
    """One patient folder: all slices sorted by k, and which of them are kept. `spacing` is
    the voxel size in mm along the (slice, row, col) axes of `read_volume`'s arrays: from the
    header for a NIfTI patient, None for a TIFF patient (TIFFs carry none; `predict.py
    --spacing` sets it)."""

    patient_id: str
    directory: Path
    slices: tuple[SliceFiles, ...]
    nifti: NiftiFiles | None = None  # set for a NIfTI patient (its slices then all name the same file)
    spacing: tuple[float, float, float] | None = None

    @property
    def kept(self) -> tuple[SliceFiles, ...]:
        """All slices except the first and the last (coverage artefacts)."""
        return self.slices[1:-1]

    @property
    def labelled(self) -> bool:
        return self.slices[0].mask is not None


@dataclass(frozen=True)
class NiftiFiles:
    """One NIfTI patient's files. `channels`: one 4-D file, or the (pre-contrast, FLAIR,
    post-contrast) files with a missing sequence replaced by the FLAIR file. Predicted masks
    are written on the voxel grid and affine of `channels[0]`."""

    channels: tuple[Path, ...]
    mask: Path | None
