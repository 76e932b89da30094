"""augmentations.py owns training's augmentation: its flags (--aug-scale, --aug-angle,
--aug-flip), their checks, and `build_augmentation`, whose callable train.py applies to every
training batch without knowing what it does."""

import argparse

import pytest
import torch
from conftest import tiny_train_args
from torch import nn

import augmentations
import losses
import train
from augmentations import affine_matrices, apply_affine, build_augmentation, random_affine_parameters
from checkpoint import load_checkpoint
from utils import RunFlags


def flags(scale=0.05, angle=15.0, flip=0.5) -> argparse.Namespace:
    return argparse.Namespace(aug_scale=scale, aug_angle=angle, aug_flip=flip)


def test_flags_are_declared_in_augmentations_and_define_the_run():
    parser = train.get_args_parser()
    defaults = {name: parser.get_default(name) for name in ("aug_scale", "aug_angle", "aug_flip")}
    assert defaults == {"aug_scale": 0.05, "aug_angle": 15.0, "aug_flip": 0.5}
    declared = argparse.ArgumentParser()
    flags = RunFlags(declared)
    augmentations.add_augmentation_flags(flags.add)
    assert vars(declared.parse_args([])) == defaults == flags.defaults  # all three define the run
    assert {"aug_scale", "aug_angle", "aug_flip"} <= set(train.run_defining_flags())
    assert train.run_defining_flags()["aug_flip"] == 0.5  # what the code before the flag drew
    (run_defining,) = [g for g in parser._action_groups if g.title.startswith("flags that define the run")]
    assert {"aug_scale", "aug_angle", "aug_flip"} <= {a.dest for a in run_defining._group_actions}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--aug-scale", "1"], "--aug-scale must be in [0, 1) and --aug-angle >= 0"),
        (["--aug-angle", "-1"], "--aug-scale must be in [0, 1) and --aug-angle >= 0"),
        (["--aug-angle", "inf"], "--aug-scale must be in [0, 1) and --aug-angle >= 0"),
        (["--aug-flip", "1.5"], "--aug-flip 1.5: must be in [0, 1]"),
        (["--aug-flip", "nan"], "--aug-flip nan: must be in [0, 1]"),
    ],
)
def test_invalid_augmentation_flags_are_one_error_line(argv, message, phantom_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_train_args(phantom_dir, tmp_path, *argv))
    assert str(exit_info.value.code) == f"error: {message}"
    assert not (tmp_path / "ckpt").exists()


def test_built_augmentation_draws_what_training_drew_before():
    """Training applied matrix `step` of BatchAugmentation(scale, angle, 0.5, seed).epoch_matrices:
    the same seed must give the same transforms, batch after batch, and then go on drawing."""
    steps, batch, seed = 3, 4, 1234
    augment = build_augmentation(flags(), seed, steps, batch, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)

    def old_epoch_matrices() -> torch.Tensor:  # the formula train.py applied, matrix `step` per batch
        params = random_affine_parameters(steps * batch, 0.05, 15.0, 0.5, generator)
        return affine_matrices(params).view(steps, batch, 2, 3)

    old = [old_epoch_matrices(), old_epoch_matrices()]
    images = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    masks = (torch.rand(batch, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    for step in range(2 * steps):  # one more epoch's worth than planned: drawn next from the same generator
        out_images, out_masks = augment(images, masks)
        want_images, want_masks = apply_affine(images, masks, old[step // steps][step % steps])
        assert torch.equal(out_images, want_images) and torch.equal(out_masks, want_masks), step
    # --aug-flip is the flip probability; 0 everywhere is the identity, inputs returned as they are
    always = build_augmentation(flags(0.0, 0.0, 1.0), seed, 1, batch, torch.device("cpu"))
    assert torch.equal(always(images, masks)[1], masks.flip(-1))
    identity = build_augmentation(flags(0.0, 0.0, 0.0), seed, steps, batch, torch.device("cpu"))
    assert all(a is b for a, b in zip(identity(images, masks), (images, masks)))


def test_training_calls_the_built_augmentation_on_every_batch(phantom_dir, tmp_path, monkeypatch):
    """A toy augmentation installed in augmentations.py alone: train.py calls it once per
    training batch, with this epoch's seed, and trains on what it returns."""
    built, calls, trained_masks = [], [], []

    class MarkAll:
        """Every mask pixel becomes lesion: what the loss then sees shows where batches came from."""

        def __call__(self, images, masks):
            calls.append(images.shape)
            return images, torch.ones_like(masks)

    def build(args, seed, steps, batch_size, device, first_step):
        built.append(
            {"seed": seed, "steps": steps, "batch_size": batch_size, "flip": args.aug_flip, "first_step": first_step}
        )
        return MarkAll()

    class Recording(nn.Module):
        def forward(self, logits, target):
            if torch.is_grad_enabled():  # training; validation calls it without gradients
                trained_masks.append(target.detach().clone())
            return losses.SoftDiceLoss()(logits, target)

    monkeypatch.setattr(augmentations, "build_augmentation", build)
    monkeypatch.setitem(losses.LOSSES, "recording", losses.LossEntry(Recording, "records training targets"))
    argv = ["--epochs", "2", "--steps-per-epoch", "3", "--aug-flip", "0.25", "--loss", "recording"]
    result = train.main(tiny_train_args(phantom_dir, tmp_path, *argv))
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert len(calls) == 2 * 3 and all(shape == (8, 3, 32, 32) for shape in calls)
    assert built == [
        {"seed": train.stream_seed(42, epoch, 0, 1), "steps": 3, "batch_size": 8, "flip": 0.25, "first_step": 0}
        for epoch in (1, 2)
    ]
    assert len(trained_masks) == 6 and all(bool((m == 1).all()) for m in trained_masks)
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["args"]["aug_flip"] == 0.25


def test_checkpoint_from_before_aug_flip_resumes_as_flip_one_half(phantom_dir, tmp_path):
    first = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1")
    train.main([*first, "--stop-after-epoch", "1"])
    checkpoint = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    del checkpoint["args"]["aug_flip"]  # as saved before the flag
    torch.save(checkpoint, tmp_path / "ckpt" / "last.pt")
    with pytest.raises(SystemExit, match="trained with --aug-flip 0.5, this run asks for --aug-flip 0.3;"):
        train.main([*first, "--aug-flip", "0.3", "--resume", "auto"])
    result = train.main([*first, "--resume", "auto"])
    assert [h["epoch"] for h in result["history"]] == [2]


def test_a_new_flag_declares_what_older_checkpoints_were_trained_with(phantom_dir, tmp_path, monkeypatch):
    """A run-defining flag added in augmentations.py alone, whose default (0.1) is not what
    earlier runs did (0): `absent=0` there makes an older last.pt resume only without it."""
    declare = augmentations.add_augmentation_flags

    def with_noise(add):
        declare(add)
        add("--aug-noise", defines_run=True, absent=0.0, type=float, default=0.1, help="toy noise strength")

    argv = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1")
    train.main([*argv, "--stop-after-epoch", "1"])  # written before the flag existed
    monkeypatch.setattr(augmentations, "add_augmentation_flags", with_noise)
    assert train.run_defining_flags()["aug_noise"] == 0.0 and train.parse_args([]).aug_noise == 0.1
    with pytest.raises(SystemExit, match="trained with --aug-noise 0.0, this run asks for --aug-noise 0.1"):
        train.main([*argv, "--resume", "auto"])
    assert [h["epoch"] for h in train.main([*argv, "--resume", "auto", "--aug-noise", "0"])["history"]] == [2]
