"""train.py's recipe flags: --sampling, --sampling-floor, --lesion-fraction, --norm-region,
--context-slices; each changes what training draws or what every prediction path feeds the
model, and each is part of the resume contract."""

import numpy as np
import onnx
import pytest
import tifffile
import torch
from conftest import tiny_train_args

import export
import inference
import predict
import run_setup
import train
from checkpoint import CheckpointError, load_checkpoint
from dataset import discover_patients, load_volumes, read_volume, select_patients
from losses import build_loss
from preprocessing import preprocess_volume

NO_AUGMENTATION = ("--aug-scale", "0", "--aug-angle", "0")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sampling-floor", "-1"], "--sampling-floor -1.0: must be >= 0"),
        (["--sampling", "foreground", "--lesion-fraction", "1.5"], "--lesion-fraction 1.5: must be in [0, 1]"),
        (["--lesion-fraction", "0.5"], "--lesion-fraction 0.5: only used with --sampling foreground"),
        (["--sampling", "foreground", "--sampling-floor", "1"], "--sampling-floor 1.0: used with --sampling area"),
        (["--context-slices", "-1"], "--context-slices -1: must be >= 0"),
    ],
)
def test_invalid_recipe_flags_rejected_with_one_line(flags, message, phantom_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_train_args(phantom_dir, tmp_path, *flags))
    assert str(exit_info.value.code).startswith(f"error: {message}")
    assert "\n" not in str(exit_info.value.code)
    assert not (tmp_path / "ckpt").exists()


def recorded_training_masks(monkeypatch) -> list[torch.Tensor]:
    """Patch run_setup.build_loss so that the run's criterion records each training batch's masks
    (validation calls the same criterion, without gradients: those calls are not recorded)."""
    batches: list[torch.Tensor] = []
    real = build_loss

    def recording(name):
        criterion = real(name)

        def record(logits, masks):
            if torch.is_grad_enabled():
                batches.append(masks.detach().clone())
            return criterion(logits, masks)

        return record

    monkeypatch.setattr(run_setup, "build_loss", recording)
    return batches


def training_areas(phantom_dir, checkpoint_dir) -> list[np.ndarray]:
    """Lesion pixels per slice, per training patient of the run (read back from the checkpoint's split)."""
    split = load_checkpoint(checkpoint_dir / "last.pt")["split"]
    volumes = load_volumes(select_patients(discover_patients(phantom_dir), split["train"]), 32, None, 1)
    return [np.asarray(v.masks).reshape(len(v.masks), -1).sum(axis=1).astype(float) for v in volumes]


@pytest.mark.parametrize(
    "flags, placement",
    [
        (("--sampling", "foreground", "--lesion-fraction", "0.25"), "device"),
        (("--sampling", "foreground", "--lesion-fraction", "0.25"), "stream"),
        (("--sampling-floor", "3.0"), "device"),
    ],
)
def test_sampling_flags_set_the_share_of_lesion_slices_in_training_batches(
    flags, placement, phantom_dir, tmp_path, monkeypatch
):
    batches = recorded_training_masks(monkeypatch)
    steps = 40
    train.main(
        tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", str(steps), *NO_AUGMENTATION)
        + ["--data-placement", placement, *flags]
    )
    assert len(batches) == steps and all(b.shape[0] == 8 for b in batches)
    lesion = torch.stack([b.flatten(1).any(dim=1) for b in batches]).float()  # (steps, 8) lesion slice?
    areas = np.concatenate(training_areas(phantom_dir, tmp_path / "ckpt"))
    if "foreground" in flags:
        # nnU-Net: 8 - round(8 * 0.75) = 2 slices of every batch from lesion slices, the other 6 uniform
        assert bool((lesion.sum(dim=1) >= 2).all())
        expected = 0.25 + 0.75 * (areas > 0).mean()
    else:  # pooled area weights with a floor of 3 x the mean area
        weights = areas + 3.0 * areas.mean()
        expected = weights[areas > 0].sum() / weights.sum()
    # 320 draws: the binomial SD is under 0.03; the default floor 0.1 would draw ~0.9
    assert abs(lesion.mean().item() - expected) < 0.1, (lesion.mean().item(), expected)


def segment_with_predict_cli(checkpoint, data_dir, patient, out, *extra) -> np.ndarray:
    predict.main(
        ["--model-path", str(checkpoint), "--data-dir", str(data_dir), "--output-dir", str(out)]
        + ["--patients", patient.patient_id, "--no-cache", "--no-overlays", "--figure-path", str(out / "d.png")]
        + list(extra)
    )
    return np.stack([tifffile.imread(out / "masks" / patient.patient_id / s.mask.name) for s in patient.kept]) > 0


def test_context_slices_builds_a_9_channel_model_that_predict_and_hub_feed_alike(phantom_dir, tmp_path):
    train.main(
        tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "2", "--context-slices", "1")
    )
    checkpoint = load_checkpoint(tmp_path / "ckpt" / "best_model.pt")
    assert checkpoint["model_config"]["in_channels"] == 9 and checkpoint["model"]["inc.0.weight"].shape[1] == 9

    # predict_volume stacks (s-1, s, s+1), the border slice repeated, as training does
    model = inference.model_from_checkpoint(checkpoint)
    images = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    rows = [[max(s - 1, 0), s, min(s + 1, 4)] for s in range(5)]
    by_hand = np.stack([np.concatenate([images[r] for r in row]) for row in rows])  # (5, 9, 32, 32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(by_hand))[:, 0].numpy()
    np.testing.assert_allclose(inference.predict_volume(model, images, context_slices=1), expected, atol=1e-6)

    hub = torch.hub.load(
        str(train.Path(train.__file__).parent),
        "segmentation_pipeline",
        source="local",
        trust_repo=True,
        weights_path=str(tmp_path / "ckpt" / "best_model.pt"),
        threshold=0.3,
    )
    patient = discover_patients(phantom_dir)[1]
    hub_masks, _ = hub(read_volume(patient)[0])
    cli_masks = segment_with_predict_cli(
        tmp_path / "ckpt" / "best_model.pt", phantom_dir, patient, tmp_path / "torch", "--threshold", "0.3",
        "--backend", "torch",
    )  # fmt: skip
    np.testing.assert_array_equal(cli_masks, hub_masks > 0)
    summary = predict.main(  # the CPU default backend (ONNX export of a 9-channel model) works too
        ["--model-path", str(tmp_path / "ckpt" / "best_model.pt"), "--data-dir", str(phantom_dir)]
        + ["--output-dir", str(tmp_path / "onnx"), "--patients", patient.patient_id, "--no-cache", "--no-overlays"]
        + ["--figure-path", str(tmp_path / "onnx" / "d.png"), "--backend", "onnxruntime"]
    )
    assert not summary["failed_patients"]
    export.main(["--model-path", str(tmp_path / "ckpt" / "best_model.pt"), "--output", str(tmp_path / "m.onnx")])
    metadata = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert (
        metadata["input"].startswith("images: (batch, 9, H, W) float32") and "stacked as channels" in metadata["input"]
    )


def test_head_normalised_checkpoint_is_preprocessed_with_head_statistics(phantom_dir, tmp_path, monkeypatch):
    train.main(
        tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "1", "--norm-region", "head")
    )
    checkpoint = tmp_path / "ckpt" / "best_model.pt"
    assert load_checkpoint(checkpoint)["preprocessing"]["norm_region"] == "head"
    fed = []
    real = predict.predict_volume
    monkeypatch.setattr(
        predict, "predict_volume", lambda model, images, *a: fed.append(np.array(images)) or real(model, images, *a)
    )
    patient = discover_patients(phantom_dir)[2]
    segment_with_predict_cli(checkpoint, phantom_dir, patient, tmp_path / "pred", "--backend", "torch")
    raw = read_volume(patient)[0]
    numbers = [s.number for s in patient.kept]
    head, _, _ = preprocess_volume(raw, None, 32, numbers, "head")
    crop, _, _ = preprocess_volume(raw, None, 32, numbers, "crop")
    assert len(fed) == 1
    np.testing.assert_allclose(fed[0], head.astype(np.float16), atol=1e-3)
    assert np.abs(fed[0] - crop.astype(np.float16)).max() > 0.1  # the two regions give other values here


def test_resume_refuses_a_changed_recipe_flag(phantom_dir, tmp_path):
    first = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1")
    train.main([*first, "--stop-after-epoch", "1"])
    saved = (tmp_path / "ckpt" / "last.pt").read_bytes()
    changes = [
        (["--sampling", "patient"], "--sampling area", "--sampling patient"),
        (["--sampling-floor", "1"], "--sampling-floor 0.1", "--sampling-floor 1.0"),
        (["--sampling", "foreground", "--lesion-fraction", "0.5"], "--sampling area", "--sampling foreground"),
        (["--norm-region", "head"], "--norm-region crop", "--norm-region head"),
        (["--context-slices", "1"], "--context-slices 0", "--context-slices 1"),
    ]
    for change, was, asked in changes:
        with pytest.raises(SystemExit) as exit_info:
            train.main([*first, *change, "--resume", "auto"])
        assert f"trained with {was}, this run asks for {asked};" in str(exit_info.value.code)
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == saved


def test_checkpoint_from_before_the_flags_resumes_only_with_their_old_behaviour(phantom_dir, tmp_path):
    first = tiny_train_args(phantom_dir, tmp_path, "--epochs", "2", "--steps-per-epoch", "1")
    train.main([*first, "--stop-after-epoch", "1"])
    checkpoint = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    for name in ("sampling", "sampling_floor", "lesion_fraction", "norm_region", "context_slices"):
        del checkpoint["args"][name]  # a checkpoint whose args lack the recipe flags
    torch.save(checkpoint, tmp_path / "ckpt" / "last.pt")
    with pytest.raises(SystemExit, match="trained with --sampling area, this run asks for --sampling foreground"):
        train.main([*first, "--sampling", "foreground", "--resume", "auto"])
    with pytest.raises(SystemExit, match="trained with --norm-region crop, this run asks for --norm-region head"):
        train.main([*first, "--norm-region", "head", "--resume", "auto"])
    old = ["--sampling", "area", "--sampling-floor", "0.1", "--norm-region", "crop", "--context-slices", "0"]
    result = train.main([*first, *old, "--resume", "auto"])
    assert [h["epoch"] for h in result["history"]] == [2]


def test_checkpoint_without_norm_region_predicts_as_crop(trained_checkpoint, tmp_path):
    checkpoint = load_checkpoint(trained_checkpoint)
    del checkpoint["preprocessing"]["norm_region"]  # a checkpoint from before the flag
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded = inference.load_model(tmp_path / "old.pt", torch.device("cpu"))
    assert (loaded.norm_region, loaded.context_slices) == ("crop", 0)
    checkpoint["preprocessing"]["norm_region"] = "brain"
    torch.save(checkpoint, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="norm_region: checkpoint 'brain', this code 'crop'"):
        inference.load_model(tmp_path / "odd.pt", torch.device("cpu"))
