"""train.py under torchrun with test probes (not a test module): records, per rank, the
size of every volume it validates (PROBE_DIR/rank<r>.txt) and the model buffers it
validated with at the last validation (PROBE_DIR/buffers<r>.pt); with PROBE_NAN_RANK=r
the training loss of rank r is NaN from its second step on."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import epoch_end
import run_setup
import train
import validation

RANK = int(os.environ.get("RANK", "0"))
predict_logits, build_loss, validation_masks = (
    validation.predict_logits,
    run_setup.build_loss,
    epoch_end.validation_masks,
)


def recording_predict_logits(model, images, *args, **kwargs):
    with open(Path(os.environ["PROBE_DIR"]) / f"rank{RANK}.txt", "a") as log:
        log.write(f"{len(images)}\n")
    return predict_logits(model, images, *args, **kwargs)


def recording_validation_masks(model, *args, **kwargs):
    torch.save(dict(model.named_buffers()), Path(os.environ["PROBE_DIR"]) / f"buffers{RANK}.pt")
    return validation_masks(model, *args, **kwargs)


class NaNAfterFirstStep(torch.nn.Module):
    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss, self.calls = loss, 0

    def forward(self, logits, target):
        self.calls += 1
        value = self.loss(logits, target)
        return value * float("nan") if self.calls >= 2 else value


def probed_build_loss(name):
    """The run's one loss (training and validation call it): its second call is the second
    training step, so validation never comes before the NaN stops the run."""
    loss = build_loss(name)
    if os.environ.get("PROBE_NAN_RANK") == str(RANK):
        return NaNAfterFirstStep(loss)
    return loss


validation.predict_logits, run_setup.build_loss = recording_predict_logits, probed_build_loss
epoch_end.validation_masks = recording_validation_masks

if __name__ == "__main__":
    train.main()
