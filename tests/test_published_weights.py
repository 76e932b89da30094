"""The published model (weights/lgg_unet.pt, docs/model_card.md): its checksum is the card's,
it loads with weights_only=True and matches its recorded configuration, its test split is the
locked list and no locked patient trained or chose it, and the hub gives it without a network."""

from __future__ import annotations

import hashlib
import re
import socket

import numpy as np
import pytest
import torch
from conftest import ROOT

import hubconf
from checkpoint import TRAINING_ONLY_KEYS, load_checkpoint
from dataset import discover_patients, read_volume
from phantom import make_synthetic_dataset
from splits import read_patient_list

WEIGHTS = ROOT / "weights" / "lgg_unet.pt"
CARD = ROOT / "docs" / "model_card.md"


@pytest.fixture(scope="module")
def published() -> dict:
    return load_checkpoint(WEIGHTS)  # weights_only=True


def test_the_file_is_the_one_the_model_card_describes():
    (digest,) = set(re.findall(r"sha256 `([0-9a-f]{64})`", CARD.read_text()))
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == digest
    assert WEIGHTS.stat().st_size <= 25 * 10**6
    assert hubconf.PUBLISHED_WEIGHTS == WEIGHTS


def test_it_matches_its_recorded_configuration(published):
    config = published["args"]
    assert published["model_config"]["base_filters"] == config["base_filters"]
    assert published["model_config"]["in_channels"] == 3 * (2 * config["context_slices"] + 1)
    assert published["preprocessing"]["image_size"] == config["image_size"]
    assert published["model"]["head.weight"].shape[1] == config["base_filters"]
    assert all(t.dtype == torch.float32 for t in published["model"].values() if t.is_floating_point())
    assert not set(TRAINING_ONLY_KEYS) & set(published) and "postprocessing" in published


def test_the_locked_test_patients_took_no_part(published):
    locked = set(read_patient_list(ROOT / "lgg" / "locked_test.txt"))
    split = published["split"]
    assert len(locked) == 22 and set(split["test"]) == locked
    assert not locked & set(split["train"]) and not locked & set(split["val"])
    assert len(set(split["train"]) | set(split["val"])) == 88


def test_the_hub_returns_it_without_a_network(published, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the published model must not download anything")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    model = torch.hub.load(str(ROOT), "unet_segmentation", source="local", trust_repo=True, pretrained=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, published["model"][name]), name
    size = published["preprocessing"]["image_size"]
    with torch.inference_mode():
        probabilities = model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
    assert probabilities.shape == (2, 1, size, size) and probabilities.dtype == torch.float32
    assert 0 <= probabilities.min() and probabilities.max() <= 1


def test_the_pipeline_uses_it_by_default_on_a_phantom_patient(tmp_path):
    root = tmp_path / "kaggle_3m"
    make_synthetic_dataset(root, patients=1, seed=0, image_size=64, slices=(8, 8))
    images, _ = read_volume(discover_patients(root)[0], all_slices=True)
    segment = torch.hub.load(str(ROOT), "segmentation_pipeline", source="local", trust_repo=True)
    masks, probabilities = segment(images)
    assert masks.shape == probabilities.shape == images.shape[:3]
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert probabilities.dtype == np.float32 and 0 <= probabilities.min() <= probabilities.max() <= 1
    assert np.array_equal(masks > 0, (probabilities >= 0.5) & (masks > 0))  # the component filter only removes
