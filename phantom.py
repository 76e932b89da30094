"""Synthetic phantom data sets in the kaggle_3m layout (3-channel TIFF slices + masks), or
as NIfTI volumes with a realistic voxel size and a non-trivial affine.

Two difficulties:
- easy: a smooth head with one connected, clearly brighter lesion; lesion-free slices hold
  nothing lesion-like. Fast to learn; the demo and most tests use it.
- hard: what makes real FLAIR hard: a bright cortical ribbon and scalp, small
  bright spots outside lesions, 0-3 faint lesions (10-50 % above grey matter) of very
  different sizes with diffuse edges, partial coverage of the head, smooth bias fields,
  per-patient and per-channel gains, and a missing sequence replaced by FLAIR.

The CLI is `python dataset.py synthesize OUT [--difficulty easy|hard] [--format tiff|nifti]`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from postprocessing import largest_connected_component

DIFFICULTIES = ("easy", "hard")
DEFAULT_SLICES = {"easy": (20, 40), "hard": (12, 60)}
FORMATS = ("tiff", "nifti")
# The NIfTI phantom's voxels: 0.9 mm pixels (a 230 mm field of view at 256 x 256) and 5 mm
# axial slices, a typical clinical 2-D FLAIR protocol; kept at any --image-size.
NIFTI_PIXEL_MM = 0.9
NIFTI_SLICE_MM = 5.0


# --------------------------------------------------------------------------------- easy


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return noise / (noise.std() + 1e-8)


def _head_frame(rng: np.random.Generator, z: np.ndarray, size: int, axis_ranges: tuple[tuple[float, float], ...]):
    """A randomly placed, tilted elliptical head for slice positions z (S, 1, 1) in [-1, 1],
    narrowing towards the ends. Semi-axes are drawn from `axis_ranges` (fractions of `size`).
    Returns centre (2,) and semi-axes (2,) in pixels, dy and dx (H, W) offsets from the
    centre, and rho (S, H, W): 0 at the centre, 1 on the scalp."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 + rng.normal(0, 0.03 * size, 2)
    axes = size * np.array([rng.uniform(*axis_ranges[0]), rng.uniform(*axis_ranges[1])])
    tilt = rng.uniform(-0.3, 0.3)
    dy, dx = y - centre[0], x - centre[1]
    u, v = dy * np.cos(tilt) - dx * np.sin(tilt), dy * np.sin(tilt) + dx * np.cos(tilt)
    radius = np.sqrt(np.clip(1.0 - (0.92 * z) ** 2, 0.05, None))  # head narrows at the ends
    rho = np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2) / radius  # (S, H, W); 1 = scalp
    return centre, axes, dy, dx, rho


def _phantom_patient(rng: np.random.Generator, n_slices: int, size: int, lesion: bool):
    """One phantom volume: images uint8 (S, H, W, 3), masks bool (S, H, W)."""
    z = np.linspace(-1.0, 1.0, n_slices, dtype=np.float32)[:, None, None]
    centre, axes, dy, dx, rho = _head_frame(rng, z, size, ((0.32, 0.42), (0.27, 0.35)))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)  # for the vessel spots

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


# --------------------------------------------------------------------------------- hard

# Relative tissue intensities per channel (pre-contrast T1, FLAIR, post-contrast T1), white
# matter = 1. FLAIR: grey matter brighter than white matter, CSF dark, scalp fat bright.
TISSUE = {
    "wm": (1.00, 1.00, 1.00),
    "gm": (0.80, 1.30, 0.85),
    "csf": (0.30, 0.25, 0.35),
    "skull": (0.10, 0.10, 0.10),
    "scalp": (1.50, 1.70, 1.60),
}
HARD_BASE = np.array([80.0, 70.0, 85.0], dtype=np.float32)  # white matter grey level per channel
LESION_CONTRAST = (1.10, 1.50)  # lesion FLAIR / grey-matter FLAIR
LESION_COUNT_P = (0.5, 0.3, 0.2)  # 1, 2 or 3 lesions in a patient with lesions
MISSING_SEQUENCE_P = 0.15  # a patient whose pre- or post-contrast channel is a FLAIR copy


def _coarse_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Like `_smooth_noise` (unit std, in-plane scale `sigma` pixels, about one slice
    through-plane) but drawn on a grid `sigma / 1.5` times coarser in-plane and upsampled
    linearly: the same look at a fraction of the cost. (S, H, W) float32."""
    factor = max(1, int(sigma / 1.5))
    coarse_shape = (shape[0], -(-shape[1] // factor), -(-shape[2] // factor))
    noise = gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), (1.0, sigma / factor, sigma / factor))
    with torch.no_grad():  # (S, h, w) -> (S, H, W)
        fine = F.interpolate(torch.from_numpy(noise)[:, None], size=shape[1:], mode="bilinear", align_corners=False)
    fine = fine[:, 0].numpy()
    return fine / (fine.std() + 1e-8)


@dataclass(frozen=True)
class HardAnatomy:
    """Label maps of one hard phantom on its slice grid, all (S, H, W) bool."""

    head: np.ndarray
    brain: np.ndarray  # grey + white matter (lesions may lie here)
    labels: dict[str, np.ndarray]  # tissue name -> where it is


def _head_coordinates(rng: np.random.Generator, n_slices: int, size: int):
    """Slice positions z (S, 1, 1) on a head spanning [-1, 1], and rho (S, H, W): 0 at the
    head's centre, 1 on the scalp. Coverage may start and end inside the brain."""
    z0, z1 = rng.uniform(-0.95, -0.35), rng.uniform(0.35, 0.95)
    z = np.linspace(z0, z1, n_slices, dtype=np.float32)[:, None, None]
    _, _, dy, dx, rho = _head_frame(rng, z, size, ((0.36, 0.44), (0.29, 0.35)))
    return z, dy, dx, rho


def _hard_anatomy(rng: np.random.Generator, z: np.ndarray, dy: np.ndarray, dx: np.ndarray, rho: np.ndarray):
    """Scalp, skull, CSF rim, a folded cortical ribbon with sulci, white matter, ventricles."""
    size = rho.shape[-1]
    folding = rho + 0.035 * _coarse_noise(rng, rho.shape, 0.02 * size + 0.5)  # wavy grey/white border
    sulcus = np.abs(_coarse_noise(rng, rho.shape, 0.015 * size + 0.5)) < 0.12
    head = rho <= 1.0
    scalp, skull = head & (rho > 0.93), (rho > 0.86) & (rho <= 0.93)
    inner = rho <= 0.86
    rim = inner & (folding > 0.83)
    grey = inner & ~rim & (folding > 0.70)
    csf = rim | (grey & sulcus)
    grey &= ~sulcus
    ventricles = np.zeros_like(head)
    for side in (-1, 1):
        vy, vx = dy - 0.05 * size, dx - side * 0.07 * size
        ventricles |= ((vy / (0.12 * size)) ** 2 + (vx / (0.035 * size)) ** 2 + (z / 0.45) ** 2) <= 1
    ventricles &= inner & ~csf
    white = inner & ~csf & ~grey & ~ventricles
    grey &= ~ventricles
    labels = {"scalp": scalp, "skull": skull, "csf": csf | ventricles, "gm": grey, "wm": white}
    return HardAnatomy(head, grey | white, labels)


def _bias_field(rng: np.random.Generator, z: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """A smooth multiplicative field (S, H, W): exp of a random quadratic in (z, y, x)."""
    size = dy.shape[-1]
    y, x = dy / size, dx / size
    c = rng.normal(0, 0.25, 7).astype(np.float32)
    plane = c[1] * y + c[2] * x + c[3] * y * x + c[4] * y**2 + c[5] * x**2  # (H, W)
    return np.exp(plane + z * (c[0] + c[6] * y)).astype(np.float32)  # (S, H, W)


def _hard_lesions(
    rng: np.random.Generator, count: int, anatomy: HardAnatomy, z: np.ndarray, dy: np.ndarray, dx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`count` irregular lesions centred on brain voxels of covered slices, in-plane radius
    log-uniform in [2 %, 14 %] of the image (the smallest under 1 % of the brain).
    Returns the mask (S, H, W) bool and a diffuse-edged intensity profile in [0, 1]."""
    size = dy.shape[-1]
    mask = np.zeros(anatomy.brain.shape, dtype=bool)
    candidates = np.flatnonzero(anatomy.brain)
    wobble = 0.2 * np.clip(_coarse_noise(rng, mask.shape, 0.02 * size + 0.5), -2, 2)  # a centre stays inside
    for _ in range(count):
        s, py, px = np.unravel_index(rng.choice(candidates), anatomy.brain.shape)
        radius = size * np.exp(rng.uniform(np.log(0.02), np.log(0.14)))
        ry, rx = radius * rng.uniform(0.7, 1.3, 2)
        rz = radius / size * 2.0 / 0.7 * rng.uniform(0.7, 1.3)  # z spans 2 units over ~0.7 of the image
        slab = np.flatnonzero(np.abs(z[:, 0, 0] - z[s, 0, 0]) < rz)  # slices the lesion can reach
        in_plane = ((dy - dy[py, px]) / ry) ** 2 + ((dx - dx[py, px]) / rx) ** 2  # (H, W)
        distance = np.sqrt(in_plane + ((z[slab] - z[s]) / rz) ** 2)  # (slab, H, W)
        mask[slab] |= (distance + wobble[slab] < 1.0) & anatomy.brain[slab]
    edge = 0.012 * size + 0.6  # pixels of blur: a diffuse border, partial volume for tiny lesions
    profile = np.zeros(mask.shape, dtype=np.float32)
    box = _padded_box(mask, (2, int(4 * edge) + 1, int(4 * edge) + 1))
    profile[box] = np.clip(gaussian_filter(mask[box].astype(np.float32), (0.6, edge, edge)) * 1.4, 0, 1)
    return mask, profile


def _padded_box(mask: np.ndarray, margin: tuple[int, int, int]) -> tuple[slice, ...]:
    """Slices of the bounding box of `mask` widened by `margin` per axis (clipped)."""
    box = []
    for axis, pad in enumerate(margin):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, hits[0] - pad), hits[-1] + pad + 1) if hits.size else slice(0, 0))
    return tuple(box)


def _bright_spots(rng: np.random.Generator, anatomy: HardAnatomy, z: np.ndarray, dy, dx) -> np.ndarray:
    """A few small FLAIR-bright spots anywhere in the brain, not lesions: (S, H, W) float in [0, 1]."""
    size = dy.shape[-1]
    spots = np.zeros(anatomy.brain.shape, dtype=np.float32)
    candidates = np.flatnonzero(anatomy.brain)
    for _ in range(int(rng.integers(4, 11))):
        s, py, px = np.unravel_index(rng.choice(candidates), anatomy.brain.shape)
        r = max(1.0, size * rng.uniform(0.006, 0.015))
        in_plane = ((dy - dy[py, px]) ** 2 + (dx - dx[py, px]) ** 2) / r**2  # (H, W)
        rz = rng.uniform(0.02, 0.06)
        slab = np.flatnonzero(np.abs(z[:, 0, 0] - z[s, 0, 0]) < 3 * rz)  # exp(-9) beyond
        peak = rng.uniform(0.6, 1.0)
        spots[slab] = np.maximum(spots[slab], np.exp(-(in_plane + ((z[slab] - z[s]) / rz) ** 2)) * peak)
    return spots * anatomy.brain


def _hard_patient(
    rng: np.random.Generator, n_slices: int, size: int, lesion: bool
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One hard phantom: images uint8 (S, H, W, 3), masks bool (S, H, W), and facts for data.csv."""
    z, dy, dx, rho = _head_coordinates(rng, n_slices, size)
    anatomy = _hard_anatomy(rng, z, dy, dx, rho)
    level = np.zeros((*rho.shape, 3), dtype=np.float32)
    for tissue, where in anatomy.labels.items():
        level[where] = TISSUE[tissue]
    texture = 0.05 * _coarse_noise(rng, rho.shape, 0.01 * size + 0.5)
    level *= (1 + texture * anatomy.head)[..., None]
    count = int(rng.choice(3, p=LESION_COUNT_P)) + 1 if lesion else 0
    masks, profile = _hard_lesions(rng, count, anatomy, z, dy, dx) if count else (np.zeros_like(rho, bool), 0.0)
    grey_flair = TISSUE["gm"][1]
    contrast = rng.uniform(*LESION_CONTRAST)  # lesion FLAIR relative to grey matter
    level[..., 1] += profile * np.clip(contrast * grey_flair - level[..., 1], 0, None)
    level[..., 0] *= 1 - 0.15 * profile
    level[..., 2] *= 1 + rng.uniform(0.0, 0.2) * profile
    spots = _bright_spots(rng, anatomy, z, dy, dx)
    level[..., 1] += spots * np.clip(rng.uniform(*LESION_CONTRAST) * grey_flair - level[..., 1], 0, None)
    gains = HARD_BASE * rng.uniform(0.6, 1.4) * rng.uniform(0.75, 1.25, 3)  # per patient, per channel
    images = level  # (S, H, W, 3), scaled in place
    for c in range(3):
        images[..., c] *= gains[c] * _bias_field(rng, z, dy, dx)
    images += rng.normal(0, 3.0, images.shape).astype(np.float32) * anatomy.head[..., None]
    images = np.clip(images, 0, 255).astype(np.uint8)
    missing = rng.random() < MISSING_SEQUENCE_P
    if missing:  # as in the LGG collection: a missing sequence is replaced by FLAIR
        images[..., int(rng.choice([0, 2]))] = images[..., 1]
    facts = {
        "lesions": count,
        "lesion_share_of_brain": float(masks.sum() / max(1, anatomy.brain.sum())),
        "missing_sequence": int(missing),
    }
    return images, masks, facts


# -------------------------------------------------------------------------------- write


def make_synthetic_dataset(
    root: str | Path,
    patients: int = 8,
    seed: int = 0,
    image_size: int = 256,
    slices: tuple[int, int] | None = None,
    lesion_free_fraction: float = 0.15,
    difficulty: str = "easy",
    file_format: str = "tiff",
) -> list[str]:
    """Write a phantom data set in the kaggle_3m layout (`file_format` "tiff") or as NIfTI
    files (`file_format` "nifti", see `nifti_phantom_affine`; the same arrays for the same
    seed); returns the patient ids.

    easy: each patient is a head (scalp, brain texture, ventricles, bright vessels in
    channel 2) with one irregular, connected lesion that is bright in channel 1 (FLAIR) at
    a per-patient contrast and size. hard: see the module docstring. About
    `lesion_free_fraction` of the patients have no lesion at all. `slices` (min, max) per
    patient defaults to (20, 40) for easy and (12, 60) for hard. Writes data.csv (one row
    per patient; hard adds lesions, lesion_share_of_brain, missing_sequence).
    Raises ValueError for an unknown difficulty or format.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty!r}: expected one of {', '.join(DIFFICULTIES)}")
    if file_format not in FORMATS:
        raise ValueError(f"format {file_format!r}: expected one of {', '.join(FORMATS)}")
    slices = slices or DEFAULT_SLICES[difficulty]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_free = int(round(lesion_free_fraction * patients))
    lesion_free = set(rng.permutation(patients)[:n_free].tolist())
    hard = difficulty == "hard"
    ids, rows = (
        [],
        ["patient,slices,lesion_slices" + (",lesions,lesion_share_of_brain,missing_sequence" if hard else "")],
    )
    for p in range(patients):
        patient_rng = np.random.default_rng([seed, p])
        n_slices = int(patient_rng.integers(slices[0], slices[1] + 1))
        if hard:
            images, masks, facts = _hard_patient(patient_rng, n_slices, image_size, p not in lesion_free)
        else:
            images, masks = _phantom_patient(patient_rng, n_slices, image_size, p not in lesion_free)
        pid = f"TCGA_{'HD' if hard else 'PH'}_{p:04d}_{20000101 + int(patient_rng.integers(0, 1200))}"
        if file_format == "nifti":
            _write_nifti_patient(root, pid, images, masks)
        else:
            _write_patient(root / pid, pid, images, masks)
        ids.append(pid)
        row = f"{pid},{n_slices},{int(masks.any(axis=(1, 2)).sum())}"
        if hard:
            row += f",{facts['lesions']},{facts['lesion_share_of_brain']:.5f},{facts['missing_sequence']}"
        rows.append(row)
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    if file_format == "nifti":
        (root / "README.md").write_text(
            "Synthetic phantom as NIfTI (dataset.py synthesize --format nifti): <patient>.nii.gz (X x Y x Z x 3) "
            "and <patient>_mask.nii.gz.\n"
        )
    else:
        (root / "README.md").write_text("Synthetic phantom in the kaggle_3m layout (dataset.py).\n")
    return ids


def _write_patient(folder: Path, pid: str, images: np.ndarray, masks: np.ndarray) -> None:
    folder.mkdir(exist_ok=True)
    for k in range(1, len(images) + 1):
        tifffile.imwrite(folder / f"{pid}_{k}.tif", images[k - 1], photometric="rgb")
        tifffile.imwrite(folder / f"{pid}_{k}_mask.tif", masks[k - 1].astype(np.uint8) * 255)


def nifti_phantom_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """The NIfTI phantom's voxel-to-world (RAS+, mm) affine for a volume of `shape` (S, H, W)
    in the reading convention (slices inferior -> superior, rows anterior -> posterior,
    columns right -> left of the patient, as nifti.SLICE_AXES). The voxels are stored as
    (i, j, k) = (W-1-w, s, h): a permuted axis order (slices on the middle axis) with the
    columns flipped, NIFTI_PIXEL_MM in-plane, slices NIFTI_SLICE_MM apart; the volume is
    centred on the world origin."""
    n_slices, height, width = shape
    pixel = NIFTI_PIXEL_MM
    affine = np.zeros((4, 4))
    affine[:3, 0] = (pixel, 0.0, 0.0)  # i: towards the patient's right (+x)
    affine[:3, 1] = (0.0, 0.0, NIFTI_SLICE_MM)  # j: superior (+z)
    affine[:3, 2] = (0.0, -pixel, 0.0)  # k: posterior (-y)
    affine[:3, 3] = -affine[:3, :3] @ (np.array([width, n_slices, height]) - 1) / 2
    affine[3, 3] = 1.0
    return affine


def _write_nifti_patient(root: Path, pid: str, images: np.ndarray, masks: np.ndarray) -> None:
    """`<pid>.nii.gz` (uint8, X x Y x Z x 3) and `<pid>_mask.nii.gz` (uint8 0/1) on the grid
    of `nifti_phantom_affine`, units mm, qform and sform both the scanner affine."""
    import nibabel

    affine = nifti_phantom_affine(masks.shape)
    for name, data in ((f"{pid}.nii.gz", images), (f"{pid}_mask.nii.gz", masks.astype(np.uint8))):
        voxels = np.ascontiguousarray(np.moveaxis(data, 2, 0)[::-1])  # (S, H, W, ...) -> (W, S, H, ...), i = W-1-w
        image = nibabel.Nifti1Image(voxels, affine)
        image.header.set_xyzt_units("mm")
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nibabel.save(image, root / name)


DEMO_PATIENTS = 20  # `train.py --demo`'s phantom


def ensure_demo_data(data_dir: str | Path, seed: int) -> None:
    """Write the demo's phantom (DEMO_PATIENTS patients, 20-32 slices each) to `data_dir`
    unless that path exists already."""
    if not Path(data_dir).exists():
        print(f"demo: writing a {DEMO_PATIENTS}-patient phantom to {data_dir}")
        make_synthetic_dataset(data_dir, patients=DEMO_PATIENTS, seed=seed, slices=(20, 32))


PHANTOM_PREFIXES = ("TCGA_PH_", "TCGA_HD_")  # the ids make_synthetic_dataset gives (easy, hard)


def is_phantom(patient_id: str) -> bool:
    """Whether a patient id is one this module's phantoms carry (no real TCGA site has these codes)."""
    return patient_id.startswith(PHANTOM_PREFIXES)


def warn_if_phantom_trained(
    model: str | Path, split: dict | None, patient_ids: Sequence[str] | None = None, stacklevel: int = 2
) -> str | None:
    """One warning line when the checkpoint `model`, whose saved `split` trained on phantom
    patients only (the demo's), segments other data: its masks there say nothing about real
    FLAIR. `patient_ids`: the patients it is given (predict.py; no warning when all are
    phantoms), or None for volumes without ids (the hub pipeline), which may be anything.
    No warning without a split (a bare state_dict). `stacklevel` as for `warnings.warn`,
    counted from the caller. Returns the message, or None when there was nothing to say."""
    trained = (split or {}).get("train") or []
    if not trained or not all(is_phantom(i) for i in trained):
        return None
    if patient_ids is None:
        what = "any volume other than a phantom"
    else:
        others = [i for i in patient_ids if not is_phantom(i)]
        if not others:
            return None
        what = f"{len(others)} other patient(s) ({others[0]}{', ...' if len(others) > 1 else ''})"
    message = f"{model} was trained on phantom data only; its masks for {what} say nothing about real FLAIR: "
    message += "train on your data"
    warnings.warn(message, stacklevel=stacklevel + 1)
    return message
