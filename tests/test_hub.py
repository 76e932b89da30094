"""torch.hub entry points, loaded the way a notebook user would."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import predict
from dataset import discover_patients, read_volume

ROOT = Path(__file__).resolve().parents[1]


def hub_load(entry, **kwargs):
    return torch.hub.load(str(ROOT), entry, source="local", trust_repo=True, **kwargs)


def test_unet_segmentation_from_training_checkpoint(trained_checkpoint):
    model = hub_load("unet_segmentation", weights_path=str(trained_checkpoint))
    assert not model.training
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1, 32, 32) and 0 <= out.min() and out.max() <= 1
    reference = torch.load(trained_checkpoint, weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key])


def test_unet_segmentation_from_prefixed_state_dict(trained_checkpoint, tmp_path):
    state = torch.load(trained_checkpoint, weights_only=True)["model"]
    path = tmp_path / "ddp_compiled.pt"
    torch.save({f"_orig_mod.module.{k}": v for k, v in state.items()}, path)
    model = hub_load("unet_segmentation", weights_path=str(path))
    assert model.config["base_filters"] == 4
    assert torch.equal(model.state_dict()["head.weight"], state["head.weight"])


def test_pretrained_without_weights_says_what_to_do():
    with pytest.raises(RuntimeError, match="train.py"):
        hub_load("unet_segmentation", pretrained=True)
    assert hub_load("unet_segmentation", base_filters=8).config["base_filters"] == 8


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("touch pwned_marker",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    from utils import CheckpointError

    with pytest.raises(CheckpointError, match="refused"):
        hub_load("unet_segmentation", weights_path=str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned_marker").exists()


def test_pipeline_matches_predict_cli(trained_checkpoint, phantom_dir, tmp_path):
    segment = hub_load("segmentation_pipeline", weights_path=str(trained_checkpoint), threshold=0.3)
    patient = discover_patients(phantom_dir)[1]
    volume, _ = read_volume(patient)  # the kept slices, uint8 (S, 64, 64, 3)
    masks, probabilities = segment(volume)
    assert masks.shape == probabilities.shape == volume.shape[:3]
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert probabilities.dtype == np.float32 and 0 <= probabilities.min() and probabilities.max() <= 1

    predict.main(
        [
            "--model-path",
            str(trained_checkpoint),
            "--data-dir",
            str(phantom_dir),
            "--output-dir",
            str(tmp_path),
            "--patients",
            patient.patient_id,
            "--threshold",
            "0.3",
            "--no-cache",
            "--no-overlays",
            "--figure-path",
            str(tmp_path / "d.png"),
        ]
    )
    written = np.stack([tifffile.imread(tmp_path / "masks" / patient.patient_id / s.mask.name) for s in patient.kept])
    np.testing.assert_array_equal(written > 0, masks > 0)
    with pytest.raises(ValueError, match="slices, H, W, 3"):
        segment(volume[..., 0])
