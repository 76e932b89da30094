"""The loss registry (losses.LOSSES): `--loss` offers what is registered, and the one loss
object a run builds is what training and validation both call, on the model's logits."""

import numpy as np
import pytest
import torch
from conftest import tiny_train_args
from torch import nn

import losses
import train
from checkpoint import load_checkpoint
from dataset import discover_patients, load_volumes, select_patients
from inference import model_from_checkpoint, predict_logits


def test_loss_flag_lists_the_registry_in_order_with_descriptions(capsys):
    action = next(a for a in train.get_args_parser()._actions if a.dest == "loss")
    assert list(action.choices) == list(losses.LOSSES) == ["dice", "dice+bce"]
    assert action.default == losses.DEFAULT_LOSS == "dice"
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, entry in losses.LOSSES.items():
        assert f"{name}: {entry.description}" in text
    assert isinstance(losses.build_loss("dice"), losses.SoftDiceLoss)
    assert isinstance(losses.build_loss("dice+bce"), losses.DiceBCELoss)
    assert losses.build_loss("dice") is not losses.build_loss("dice")  # a new instance each time
    with pytest.raises(ValueError, match="unknown loss 'focal'; expected one of dice, dice\\+bce"):
        losses.build_loss("focal")


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(losses, "LOSSES", dict(losses.LOSSES))  # restored after the test
    losses.register_loss("toy", "a test's loss")(losses.SoftDiceLoss)
    assert losses.LOSSES["toy"].build is losses.SoftDiceLoss
    with pytest.raises(ValueError, match="'dice' is registered twice"):
        losses.register_loss("dice", "again")(losses.SoftDiceLoss)


def test_a_registered_loss_trains_and_validates_on_logits(phantom_dir, tmp_path, monkeypatch, capsys):
    calls = []  # every call of every ToyLoss: gradients on?, its input, its value

    class ToyLoss(nn.Module):
        """Soft Dice, recording what it is given."""

        def __init__(self):
            super().__init__()
            self.dice = losses.SoftDiceLoss()

        def forward(self, logits, target):
            value = self.dice(logits, target)
            calls.append({"grad": torch.is_grad_enabled(), "input": logits.detach().float().clone(), "value": value})
            return value

    argv = tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "3", "--loss", "toy")
    with pytest.raises(SystemExit):  # not registered (yet): argparse refuses the choice
        train.main(argv)
    monkeypatch.setitem(losses.LOSSES, "toy", losses.LossEntry(ToyLoss, "soft Dice that records its calls"))
    result = train.main(argv)
    assert "loss toy" in capsys.readouterr().out
    assert [h["epoch"] for h in result["history"]] == [1] and (tmp_path / "ckpt" / "best_model.pt").is_file()

    training = [c for c in calls if c["grad"]]
    validation = [c for c in calls if not c["grad"]]
    assert len(training) == 3 and all(c["input"].shape == (8, 1, 32, 32) for c in training)
    checkpoint = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert checkpoint["args"]["loss"] == "toy"
    val_ids = checkpoint["split"]["val"]
    assert len(validation) == len(val_ids) == 3
    # logits, not probabilities: values outside [0, 1] in training and in validation
    for part in (training, validation):
        values = torch.cat([c["input"].flatten() for c in part])
        assert values.min() < 0 or values.max() > 1
    # validation's input is exactly the saved model's logits of each validation patient ...
    model = model_from_checkpoint(checkpoint)
    volumes = load_volumes(select_patients(discover_patients(phantom_dir), val_ids), 32, None, 1)
    by_id = {v.patient_id: v for v in volumes}
    for call, patient in zip(validation, val_ids):
        expected = predict_logits(model, by_id[patient].images, "cpu", 16)
        torch.testing.assert_close(call["input"][:, 0], expected, atol=1e-5, rtol=1e-5)
    # ... and the logged validation loss is its value, averaged over slices
    slices = np.array([len(c["input"]) for c in validation])
    expected_loss = float((np.array([c["value"].item() for c in validation]) * slices).sum() / slices.sum())
    assert result["history"][0]["val_loss"] == pytest.approx(expected_loss, rel=1e-6)
