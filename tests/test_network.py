"""network.py is the one place that declares a network: a class registered in
`network.ARCHITECTURES` trains, saves, reloads and predicts with no other file edited, and a
`model_config` record written before the architecture name was saved still loads as the U-Net."""

import numpy as np
import pytest
import tifffile
import torch
from conftest import tiny_train_args
from torch import nn

import inference
import network
import predict
import train
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dataset import discover_patients

CPU = torch.device("cpu")


class ToyNet(nn.Module):
    """Two convolutions, no pooling: a stand-in for a new network."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_filters: int = 8):
        super().__init__()
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "base_filters": base_filters}
        self.body = nn.Sequential(nn.Conv2d(in_channels, base_filters, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(base_filters, out_channels, 1)

    def forward(self, x: torch.Tensor, return_logits: bool = False) -> torch.Tensor:
        logits = self.out(self.body(x))
        return logits if return_logits else torch.sigmoid(logits.float())


@pytest.fixture
def toy_registered(monkeypatch):
    """ToyNet registered as "toy" in network.py's registry, and nowhere else."""
    monkeypatch.setitem(network.ARCHITECTURES, "toy", ToyNet)
    return monkeypatch


def test_a_registered_network_trains_saves_and_predicts(toy_registered, phantom_dir, tmp_path, capsys):
    parser = train.get_args_parser()
    action = next(a for a in parser._actions if a.dest == "architecture")
    assert "toy" in action.choices and "toy: Two convolutions, no pooling" in action.help  # help from the registry

    flags = tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "2")
    train.main([*flags, "--architecture", "toy"])
    path = tmp_path / "ckpt" / "best_model.pt"
    checkpoint = load_checkpoint(path)
    assert checkpoint["model_config"] == {"architecture": "toy", "in_channels": 3, "out_channels": 1, "base_filters": 4}
    assert checkpoint["args"]["architecture"] == "toy"
    assert set(checkpoint["model"]) == set(ToyNet(base_filters=4).state_dict())

    loaded = inference.load_model(path, CPU)
    assert type(loaded.model) is ToyNet and not loaded.model.training
    assert loaded.model.config == checkpoint["model_config"]
    assert all(torch.equal(v, checkpoint["model"][k]) for k, v in loaded.model.state_dict().items())

    patient = discover_patients(phantom_dir)[0]
    out = tmp_path / "pred"
    predict.main(
        ["--model-path", str(path), "--data-dir", str(phantom_dir), "--output-dir", str(out)]
        + ["--patients", patient.patient_id, "--no-cache", "--no-overlays", "--backend", "torch"]
        + ["--figure-path", str(out / "d.png")]
    )
    masks = [tifffile.imread(out / "masks" / patient.patient_id / s.mask.name) for s in patient.kept]
    assert len(masks) == len(patient.kept) and masks[0].shape == (64, 64)

    # the architecture defines the run: resuming it as another network is refused
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main([*flags, "--resume", "auto"])  # no --architecture: the default, unet
    assert "trained with --architecture toy, this run asks for --architecture unet" in str(exit_info.value.code)

    # without the registry entry the checkpoint is refused by name, never built as a U-Net
    toy_registered.delitem(network.ARCHITECTURES, "toy")
    with pytest.raises(CheckpointError, match=f"{path}: unknown architecture 'toy'"):
        inference.load_model(path, CPU)


def test_a_record_without_architecture_loads_predicts_and_resumes_as_the_unet(phantom_dir, tmp_path):
    """A checkpoint of the code before the architecture name was saved: neither its
    `model_config` nor its `args` has "architecture"."""
    first = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1")
    train.main([*first, "--stop-after-epoch", "1"])
    for name in ("last.pt", "best_model.pt"):
        checkpoint = load_checkpoint(tmp_path / "ckpt" / name)
        assert checkpoint["model_config"].pop("architecture") == "unet"
        assert checkpoint["args"].pop("architecture") == "unet"
        save_checkpoint(checkpoint, tmp_path / "ckpt" / name)

    old = load_checkpoint(tmp_path / "ckpt" / "best_model.pt")
    assert old["model_config"] == {"in_channels": 3, "out_channels": 1, "base_filters": 4}
    loaded = inference.load_model(tmp_path / "ckpt" / "best_model.pt", CPU)
    assert type(loaded.model) is network.UNetModel
    assert loaded.model.config == {"architecture": "unet", **old["model_config"]}
    assert all(torch.equal(v, old["model"][k]) for k, v in loaded.model.state_dict().items())
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    probabilities = inference.predict_volume(loaded.model, images)
    assert probabilities.shape == (2, 32, 32) and 0 <= probabilities.min() and probabilities.max() <= 1

    result = train.main([*first, "--resume", "auto"])  # no --architecture: the U-Net it was trained as
    assert [h["epoch"] for h in result["history"]] == [2]
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["model_config"]["architecture"] == "unet"


def test_build_model_fills_in_the_record_and_names_the_source_of_a_bad_one():
    model = network.build_model({"base_filters": 4}, "here")
    assert type(model) is network.UNetModel
    assert model.config == {"architecture": "unet", "in_channels": 3, "out_channels": 1, "base_filters": 4}
    assert network.model_record(network.UNetModel(base_filters=4)) == model.config  # built directly: by its class
    bad = {
        "unknown architecture 'resnet' in 'model_config'; this code knows unet": {"architecture": "resnet"},
        "unknown entries in 'model_config': depth": {"depth": 5},
        "'model_config' must hold positive integers": {"base_filters": 0},
        "'model_config' must be a dict": [("base_filters", 4)],
    }
    for message, record in bad.items():
        with pytest.raises(ValueError, match=f"^here: {message}"):
            network.build_model(record, "here")


def test_checkpoint_errors_keep_their_messages(tmp_path):
    state = network.build_model({"base_filters": 4}).state_dict()
    with pytest.raises(CheckpointError, match=r"^x\.pt: unknown entries in 'model_config': depth$"):
        inference.model_from_checkpoint({"model": state, "model_config": {"depth": 5}}, "x.pt")
    with pytest.raises(
        CheckpointError, match=r"^x\.pt: weights do not fit UNetModel\{'in_channels': 3, 'out_channels'"
    ):
        inference.model_from_checkpoint({"model": state, "model_config": {"base_filters": 8}}, "x.pt")
    with pytest.raises(CheckpointError, match=r"^x\.pt: not a UNetModel state_dict \(no 'inc\.0\.weight'\)$"):
        inference.model_from_checkpoint({"body.weight": torch.zeros(1)}, "x.pt")
    bare = inference.model_from_checkpoint({f"module.{k}": v for k, v in state.items()}, "x.pt")  # of_state_dict
    assert bare.config == {"architecture": "unet", "in_channels": 3, "out_channels": 1, "base_filters": 4}
