"""One volume's preprocessing and its exact inverse: crop to the head, pad to a square,
resize, normalise each channel; `Geometry` records enough to map masks and probabilities
back to the native grid (`restore_geometry`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from metrics import label_components

BRAIN_THRESHOLD = 0.10  # a pixel is "head" where any channel exceeds 10 % of its volume max
CLIP_PERCENTILES = (10.0, 99.0)
SPECK_FRACTION = 0.01  # bright regions with < 1 % of the bright pixels are ignored by the crop box
# The dtype preprocessed images are kept in (the cache, dataset.Volume) and so the values the
# network sees in training, validation and predict.py. Every other caller of
# `preprocess_volume` that feeds a network (the hub pipeline) rounds to it too
# (`as_stored`): float32 inputs flip a few near-threshold pixels on real patients.
IMAGE_DTYPE = np.float16


@dataclass(frozen=True)
class Geometry:
    """Where a preprocessed volume came from: enough to map a mask back exactly."""

    original_shape: tuple[int, int]  # native (H, W) of the input slices
    crop_box: tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open, in native pixels
    padding: tuple[int, int, int, int]  # (top, bottom, left, right) zero padding to square
    image_size: int  # side of the preprocessed square
    scale: float  # image_size / padded side
    slice_numbers: tuple[int, ...]  # the kept slice numbers k, in order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(
            original_shape=tuple(data["original_shape"]),
            crop_box=tuple(data["crop_box"]),
            padding=tuple(data["padding"]),
            image_size=int(data["image_size"]),
            scale=float(data["scale"]),
            slice_numbers=tuple(int(k) for k in data["slice_numbers"]),
        )

    @property
    def padded_side(self) -> int:
        top, bottom = self.padding[:2]
        y0, y1 = self.crop_box[:2]
        return y1 - y0 + top + bottom


def brain_bounding_box(volume: np.ndarray) -> tuple[int, int, int, int]:
    """In-plane box (y0, y1, x0, x1), half-open, of the head in a volume (S, H, W, C).

    A pixel is bright where any channel of the maximum projection over the slices exceeds
    10 % of that channel's maximum. The box spans the bright connected regions (8-connected)
    that hold at least `SPECK_FRACTION` of all bright pixels, so an isolated speck (a hot
    pixel, a burnt-in marker) does not stretch it, while a scalp ring separated from the
    brain by dark CSF still counts. The full frame for an all-dark volume.
    """
    projection = volume.max(axis=0)  # (S, H, W, C) -> (H, W, C): a pixel's brightest slice
    channel_max = projection.reshape(-1, projection.shape[-1]).max(axis=0)
    plane = ((projection > BRAIN_THRESHOLD * channel_max) & (channel_max > 0)).any(axis=-1)  # (H, W)
    labels, sizes = label_components(plane)  # 8-connected
    keep = sizes >= SPECK_FRACTION * plane.sum()  # pixels per region 0..count
    keep[0] = False  # the dark background
    head = keep[labels]
    rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    if rows.size == 0:
        return 0, volume.shape[1], 0, volume.shape[2]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _square_padding(height: int, width: int) -> tuple[int, int, int, int]:
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return top, side - height - top, left, side - width - left


def _resize(tensor: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize (N, C, h, w) to (N, C, size, size); half-pixel centres for every mode, and
    an anti-aliasing filter when an interpolating mode shrinks the image."""
    if tensor.shape[-2:] == (size, size):
        return tensor
    if mode == "nearest":
        return F.interpolate(tensor, size=(size, size), mode="nearest-exact")
    return F.interpolate(tensor, size=(size, size), mode=mode, align_corners=False, antialias=tensor.shape[-1] > size)


NORM_REGIONS = ("crop", "head")


def head_mask(images: np.ndarray) -> np.ndarray:
    """(S, C, H, W) -> (S, H, W) bool: pixels where any channel exceeds `BRAIN_THRESHOLD`
    of that channel's maximum over the volume (the rule `brain_bounding_box` crops with)."""
    channel_max = images.max(axis=(0, 2, 3))[None, :, None, None]  # (1, C, 1, 1)
    return ((images > BRAIN_THRESHOLD * channel_max) & (channel_max > 0)).any(axis=1)


def normalize_channels(images: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Per channel over the whole volume (never per slice): clip to the [10th, 99th]
    percentile, then z-score. The statistics come from the pixels of `region`
    ((S, H, W) bool, e.g. `head_mask`), or from every pixel when it is None or empty;
    they are applied to every pixel. A constant channel becomes zeros.
    (S, C, H, W) float32 in, same shape out."""
    out = np.empty_like(images, dtype=np.float32)
    use_region = region is not None and bool(region.any())
    for c in range(images.shape[1]):
        channel = images[:, c]
        sample = channel[region] if use_region else channel
        low, high = np.percentile(sample, CLIP_PERCENTILES)
        clipped_sample = np.clip(sample, low, high)
        mean, std = float(clipped_sample.mean()), float(clipped_sample.std())
        out[:, c] = (np.clip(channel, low, high) - mean) / std if std > 1e-6 else 0.0
    return out


def preprocess_volume(
    images: np.ndarray,
    masks: np.ndarray | None,
    image_size: int,
    slice_numbers: list[int] | tuple[int, ...],
    norm_region: str = "crop",
) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Crop to the brain, pad to a centred square, resize, normalise per channel.

    images: (S, H, W, 3) any real dtype; masks: (S, H, W) bool/0-1 or None.
    norm_region: where the normalisation statistics come from: "crop" (every pixel of the
    padded, resized crop) or "head" (its `head_mask` pixels only, so the share of background
    in the crop, which changes with the slice coverage, does not shift tissue values).
    Raises ValueError for another norm_region, and for NaN or infinite pixels (they would turn
    the percentiles, and so the whole normalised volume, into NaN or zeros; the readers name
    the file before this, callers with arrays get this message).
    Returns images float32 (S, 3, size, size), masks uint8 0/1 (S, size, size) or None,
    and the Geometry that `restore_geometry` inverts.
    """
    if norm_region not in NORM_REGIONS:
        raise ValueError(f"normalisation region {norm_region!r}: expected one of {', '.join(NORM_REGIONS)}")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        count = int(images.size - np.count_nonzero(np.isfinite(images)))
        raise ValueError(
            f"the volume holds {count} non-finite value(s) (NaN or infinity); "
            "replace them with a finite value (e.g. 0 for background) first"
        )
    height, width = images.shape[1:3]
    y0, y1, x0, x1 = brain_bounding_box(images)
    padding = _square_padding(y1 - y0, x1 - x0)
    top, bottom, left, right = padding
    side = y1 - y0 + top + bottom
    geometry = Geometry(
        original_shape=(height, width),
        crop_box=(y0, y1, x0, x1),
        padding=padding,
        image_size=image_size,
        scale=image_size / side,
        slice_numbers=tuple(int(k) for k in slice_numbers),
    )
    with torch.no_grad():
        crop = torch.from_numpy(np.ascontiguousarray(images[:, y0:y1, x0:x1])).float()
        crop = crop.permute(0, 3, 1, 2)  # (S, H, W, 3) -> (S, 3, h, w)
        square = F.pad(crop, (left, right, top, bottom))
        resized = _resize(square, image_size, "bicubic").numpy()
        out_masks = None
        if masks is not None:
            mask_crop = torch.from_numpy(np.ascontiguousarray(masks[:, y0:y1, x0:x1] > 0))
            mask_square = F.pad(mask_crop[:, None].to(torch.uint8), (left, right, top, bottom))
            out_masks = _resize(mask_square, image_size, "nearest")[:, 0].numpy()
    region = head_mask(resized) if norm_region == "head" else None
    return normalize_channels(resized, region), out_masks, geometry


def as_stored(images: np.ndarray) -> np.ndarray:
    """Preprocessed images rounded to `IMAGE_DTYPE`: the values training, validation and
    predict.py give the network. Images already in that dtype are returned as they are."""
    return images if images.dtype == IMAGE_DTYPE else images.astype(IMAGE_DTYPE)


def preprocessing_config(image_size: int, norm_region: str = "crop") -> dict:
    """Every parameter that changes `preprocess_volume`'s output: saved in checkpoints (a
    checkpoint predicts only with the preprocessing it was trained with) and part of the
    preprocessing cache's keys."""
    return {
        "image_size": int(image_size),
        "norm_region": norm_region,
        "brain_threshold": BRAIN_THRESHOLD,
        "crop_box": f"bright components holding >= {SPECK_FRACTION:g} of the bright pixels (specks ignored)",
        "clip_percentiles": list(CLIP_PERCENTILES),
        "image_resize": "bicubic, anti-aliased when shrinking",
        "mask_resize": "nearest-exact",
        "drop_first_last": True,
    }


def restore_geometry(array: np.ndarray, geometry: Geometry, mode: str = "nearest") -> np.ndarray:
    """Map (S, size, size) from preprocessed space back onto the native (S, H, W) grid.

    `mode="nearest"` for masks (exact inverse whenever preprocessing upsampled),
    `"bilinear"` for probability maps. Pixels outside the brain box become 0.
    """
    top, bottom, left, right = geometry.padding
    y0, y1, x0, x1 = geometry.crop_box
    side = geometry.padded_side
    with torch.no_grad():
        tensor = torch.from_numpy(np.ascontiguousarray(array))[:, None]
        if mode == "nearest":
            square = _resize(tensor.to(torch.uint8), side, "nearest")
        else:
            square = _resize(tensor.float(), side, mode)
        crop = square[:, 0, top : side - bottom, left : side - right].numpy()
    out = np.zeros((array.shape[0], *geometry.original_shape), dtype=crop.dtype)
    out[:, y0:y1, x0:x1] = crop
    return out


def add_preprocessing_flags(add: Callable[..., Any]) -> None:
    """Declare the preprocessing flags through `add` (`utils.RunFlags.add`; they define the run)."""
    add("--image-size", defines_run=True)
    add(
        "--norm-region",
        defines_run=True,
        choices=NORM_REGIONS,
        default="crop",
        help="normalisation statistics per channel and volume from the whole padded crop or the head only",
    )
