"""The report's overlay thumbnails: per patient, small overlays of the slices with the most
truth or prediction, drawn by `pictures.thumbnail` from the arrays predict.py already holds
(no second pass over the input files) and saved as palette PNGs under
`<output-dir>/thumbnails/`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pictures import thumbnail, view_box

THUMBNAIL_DIR = "thumbnails"
THUMBNAILS_PER_PATIENT = 5
THUMBNAIL_PX = 96


def strip_slices(prediction: np.ndarray, truth: np.ndarray | None, count: int = THUMBNAILS_PER_PATIENT) -> list[int]:
    """Indices (in slice order) of the up to `count` slices with the most truth-or-prediction
    pixels; slices with neither are never chosen, ties go to the lower index.
    prediction, truth: (S, H, W) bool/0-1 (truth None for an unlabelled patient)."""
    lesion = prediction.astype(bool) if truth is None else prediction.astype(bool) | truth.astype(bool)
    area = lesion.reshape(len(lesion), -1).sum(axis=1)  # (S,) pixels per slice
    order = np.argsort(-area, kind="stable")[:count]
    return sorted(int(s) for s in order if area[s] > 0)


def save_thumbnail(rgb: np.ndarray, path: Path) -> None:
    """RGB uint8 (h, w, 3) -> a palette PNG (256 colours, Pillow's fast octree, no dithering): at most
    one byte per pixel whatever the slice looks like, so a 96-px thumbnail stays under about
    10 kB and 110 patients' strips under 6 MB."""
    from PIL import Image

    Image.fromarray(rgb).quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path)


def write_thumbnails(
    patient_id: str,
    images: np.ndarray,
    prediction: np.ndarray,
    truth: np.ndarray | None,
    slice_numbers: Sequence[int],
    out_dir: Path,
    overlay_path: Callable[[int], str] | None = None,
) -> list[dict]:
    """Write `thumbnails/<patient>_<k>.png` (k zero-padded to 3 digits) for the slices
    `strip_slices` picks; return one dict per thumbnail for `write_report`: `slice` (k),
    `thumbnail` and `overlay` (paths relative to `out_dir`; overlay None when there is no
    full-size overlay), `truth_pixels` (None without truth), `pred_pixels`.

    images: (S, H, W, 3) native slices (pre-contrast, FLAIR, post-contrast; FLAIR shown),
    prediction: (S, H, W) bool, truth: (S, H, W) or None, slice_numbers: the S slice numbers
    k; overlay_path: k -> the full-size overlay's path relative to `out_dir`, or None. Every
    thumbnail of a patient shows the same part of the frame (`pictures.view_box`: the head).
    """
    chosen = strip_slices(prediction, truth)
    if not chosen:
        return []
    folder = out_dir / THUMBNAIL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    box = view_box(images, prediction, truth)
    pictures = []
    for s in chosen:
        number = int(slice_numbers[s])
        name = f"{THUMBNAIL_DIR}/{patient_id}_{number:03d}.png"
        rgb = thumbnail(images[s, ..., 1], prediction[s], None if truth is None else truth[s], box, THUMBNAIL_PX)
        save_thumbnail(rgb, out_dir / name)
        pictures.append(
            {
                "slice": number,
                "thumbnail": name,
                "overlay": overlay_path(number) if overlay_path else None,
                "truth_pixels": None if truth is None else int(truth[s].sum()),
                "pred_pixels": int(prediction[s].sum()),
            }
        )
    return pictures
