"""torch.hub entry points.

model = torch.hub.load(repo, "unet_segmentation", weights_path="best_model.pt")
segment = torch.hub.load(repo, "segmentation_pipeline", weights_path="best_model.pt")
masks, probabilities = segment(volume)  # volume: uint8 (S, H, W, 3)
"""

dependencies = ["torch", "numpy", "scipy", "skimage", "tifffile"]

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from network import UNetModel  # noqa: E402
from predict import autocast_dtype, build_model, predict_volume, to_native  # noqa: E402
from utils import is_training_checkpoint, load_checkpoint, preprocess_volume  # noqa: E402

NO_PRETRAINED = (
    "no pretrained weights are published for this model: train your own with "
    "`python train.py --data-dir kaggle_3m` and pass weights_path='checkpoints/best_model.pt'"
)


def _load(weights_path: str | Path, map_location: str | torch.device) -> tuple[UNetModel, dict]:
    checkpoint = load_checkpoint(weights_path, map_location)
    return build_model(checkpoint, weights_path), checkpoint


def unet_segmentation(
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    map_location: str | torch.device = "cpu",
    **kwargs,
) -> UNetModel:
    """UNetModel in eval mode. `weights_path`: a training checkpoint (its `model_config` is
    used) or a bare state_dict (DDP/compiled prefixes are stripped), loaded with
    weights_only=True. Without weights, `kwargs` go to `UNetModel` (random init)."""
    if weights_path is None:
        if pretrained:
            raise RuntimeError(NO_PRETRAINED)
        return UNetModel(**kwargs).eval()
    model, _ = _load(weights_path, map_location)
    return model.to(map_location)


class SegmentationPipeline:
    """Raw volume in, native-size masks out: the preprocessing, batched inference,
    threshold and 3-D largest component that predict.py uses."""

    def __init__(
        self,
        model: UNetModel,
        image_size: int,
        device: str | torch.device = "cpu",
        threshold: float = 0.5,
        lcc: bool = True,
        tta: bool = False,
        batch_size: int = 32,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.image_size, self.threshold, self.lcc, self.tta, self.batch_size = (
            image_size,
            threshold,
            lcc,
            tta,
            batch_size,
        )

    def __call__(self, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """volume (S, H, W, 3) of one patient, all slices in order -> masks uint8 0/1
        (S, H, W) and probabilities float32 (S, H, W), both on the input grid."""
        volume = np.asarray(volume)
        if volume.ndim != 4 or volume.shape[-1] != 3:
            raise ValueError(f"expected a volume of shape (slices, H, W, 3), got {volume.shape}")
        images, _, geometry = preprocess_volume(volume, None, self.image_size, range(len(volume)))
        probs = predict_volume(self.model, images, self.device, self.batch_size, self.tta, autocast_dtype(self.device))
        return to_native(probs, geometry, self.threshold, self.lcc)


def segmentation_pipeline(
    weights_path: str | Path,
    device: str | torch.device = "cpu",
    threshold: float = 0.5,
    lcc: bool = True,
    tta: bool = False,
    image_size: int | None = None,
) -> SegmentationPipeline:
    """A callable that segments a raw uint8 volume (S, H, W, 3). The image size comes from
    a training checkpoint; pass `image_size` for a bare state_dict (default 256)."""
    model, checkpoint = _load(weights_path, "cpu")
    if image_size is None:
        image_size = (
            checkpoint["preprocessing"]["image_size"]
            if is_training_checkpoint(checkpoint) and "preprocessing" in checkpoint
            else 256
        )
    return SegmentationPipeline(model, int(image_size), device, threshold, lcc, tta)
