"""ONNX export and the onnxruntime backend of predict.py."""

import csv

import numpy as np
import onnx
import pytest
import torch

import export
import inference
import predict
from network import UNetModel, build_model
from utils import UsageError


def test_export_writes_a_model_that_matches_torch(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    difference = export.main(["--model-path", str(trained_checkpoint), "--output", str(out)])
    assert 0 <= difference <= export.TOLERANCE
    assert f"{difference:.3g}" in capsys.readouterr().out
    proto = onnx.load(out)
    onnx.checker.check_model(proto)
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["image_size"] == "32"
    assert (
        metadata["input"] == "images: (batch, 3, H, W) float32 slices preprocessed by preprocessing.preprocess_volume"
    )
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # dynamic batch, H, W

    # Independent check: a batch size and a shape the export never saw, against UNetModel itself.
    state = torch.load(trained_checkpoint, weights_only=True)
    model = build_model(state["model_config"])
    assert type(model) is UNetModel
    model.load_state_dict(state["model"])
    images = torch.randn(5, 3, 48, 80, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model.eval()(images)
    got = export.OnnxRuntimeModel(out)(images)
    assert got.shape == (5, 1, 48, 80)
    assert float((got - expected).abs().max()) <= export.TOLERANCE
    assert 0 <= float(got.min()) and float(got.max()) <= 1  # probabilities, not logits


def test_export_refuses_when_above_the_bound(trained_checkpoint, tmp_path, monkeypatch):
    # the gate alone: a stand-in export whose check reports a large difference
    monkeypatch.setattr(export, "export_onnx", lambda *args: b"not used")
    monkeypatch.setattr(export, "OnnxRuntimeModel", lambda data: None)
    monkeypatch.setattr(export, "max_abs_difference", lambda *args: 0.5)
    out = tmp_path / "model.onnx"
    with pytest.raises(
        SystemExit, match=r"differs from PyTorch by 0.5 > --tolerance 0.0001; .*model.onnx was not written"
    ):
        export.main(["--model-path", str(trained_checkpoint), "--output", str(out)])
    assert not out.exists()


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="error: checkpoint not found"):
        export.main(["--model-path", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "m.onnx")])


def read_rows(out):
    with (out / "metrics.csv").open() as handle:
        return {row["patient"]: row for row in csv.DictReader(handle)}


def test_onnxruntime_backend_gives_the_torch_masks(trained_checkpoint, phantom_dir, tmp_path):
    common = ["--model-path", str(trained_checkpoint), "--data-dir", str(phantom_dir), "--patients", "all"]
    common += ["--no-cache", "--no-overlays", "--threshold", "0.3", "--save-probabilities", "--device", "cpu"]
    runs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        summary = predict.main(
            [*common, "--output-dir", str(out), "--figure-path", str(out / "d.png"), "--backend", backend]
        )
        assert summary["protocol"]["backend"] == backend
        runs[backend] = read_rows(out)
    assert runs["torch"].keys() == runs["onnxruntime"].keys()
    for patient in runs["torch"]:
        torch_probs = np.load(tmp_path / "torch" / "probabilities" / f"{patient}.npy").astype(np.float32)
        ort_probs = np.load(tmp_path / "onnxruntime" / "probabilities" / f"{patient}.npy").astype(np.float32)
        np.testing.assert_allclose(ort_probs, torch_probs, atol=2e-3)  # float16 files
        ort, ref = runs["onnxruntime"][patient], runs["torch"][patient]
        assert ort["gt_pixels"] == ref["gt_pixels"]
        # a pixel within ~1e-7 of the threshold may flip between engines; nothing more
        assert abs(int(ort["pred_pixels"]) - int(ref["pred_pixels"])) <= 2
        assert float(ort["dice"]) == pytest.approx(float(ref["dice"]), abs=1e-3)


def test_backend_default_and_onnxruntime_off_the_cpu():
    assert inference.resolve_backend(None, torch.device("cpu")) == "onnxruntime"  # fp32
    assert inference.resolve_backend(None, torch.device("cpu"), torch.bfloat16) == "openvino"
    assert inference.resolve_backend(None, torch.device("cuda")) == "torch"
    with pytest.raises(UsageError, match="--backend onnxruntime runs on the CPU only"):
        inference.resolve_backend("onnxruntime", torch.device("cuda"))
