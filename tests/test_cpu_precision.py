"""Prediction precision on the CPU: fp32 by default, bf16 autocast on request (--amp bf16),
what ran recorded, the capability check read from the CPU flags, and the bf16 masks checked
against fp32 on phantom patients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dataset
import hubconf
import inference
import predict
from metrics import dice_score
from utils import UsageError

# bf16 keeps 8 significant bits: each rounding moves a value by at most 2^-9 of it. Through the
# U-Net's ~20 rounded layers the logits of these phantoms move by a few 1e-3 at most, and the
# sigmoid's slope is at most 1/4, so the probabilities move by less than that. 0.01 leaves a
# margin of about 4 over what the trained tiny model shows (0.0025 on a 6-epoch phantom model).
PROBABILITY_TOLERANCE = 0.01


def write_cpuinfo(path, flags):
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {' '.join(flags)}\n\nprocessor\t: 1\n")
    return str(path)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    assert inference.cpu_has_native_bf16(write_cpuinfo(tmp_path / "amx", ["avx512f", "amx_bf16", "amx_tile"]))
    assert inference.cpu_has_native_bf16(write_cpuinfo(tmp_path / "zen4", ["avx512f", "avx512_bf16"]))
    assert not inference.cpu_has_native_bf16(write_cpuinfo(tmp_path / "old", ["avx512f", "avx512bw"]))
    assert not inference.cpu_has_native_bf16(str(tmp_path / "no-such-file"))  # another OS: fp32


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_default_stays_fp32_and_bf16_is_asked_for(native, monkeypatch):
    """bf16 failed the accuracy check on real validation patients (docs/precision.md), so the
    CPU default is fp32 (onnxruntime) whatever the CPU; --amp bf16 runs torch in bf16."""
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert inference.resolve_inference(None, "auto", cpu) == ("onnxruntime", None)
    assert inference.resolve_inference(None, "off", cpu) == ("onnxruntime", None)
    assert inference.resolve_inference(None, "bf16", cpu) == ("torch", torch.bfloat16)
    assert inference.resolve_inference("torch", "auto", cpu) == ("torch", None)
    assert inference.resolve_inference("onnxruntime", "auto", cpu) == ("onnxruntime", None)
    with pytest.raises(UsageError, match="--backend onnxruntime runs the fp32 ONNX graph; pass --amp off"):
        inference.resolve_inference("onnxruntime", "bf16", cpu)
    assert inference.autocast_dtype(cpu, "auto") is None  # training on the CPU: fp32 as well


def test_bf16_probabilities_and_masks_agree_with_fp32(trained_checkpoint, phantom_dir):
    loaded = inference.load_model(trained_checkpoint, torch.device("cpu"))
    for patient in dataset.discover_inputs(phantom_dir)[:4]:
        images = dataset.load_volume(patient, loaded.image_size, None).images
        fp32 = inference.predict_volume(loaded.model, images, "cpu", 16, False, None)
        bf16 = inference.predict_volume(loaded.model, images, "cpu", 16, False, torch.bfloat16)
        assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
        moved = np.abs(bf16 - fp32).max()
        assert 0 < moved <= PROBABILITY_TOLERANCE, patient.patient_id  # 0 would mean bf16 never ran
        flipped = (fp32 >= 0.5) != (bf16 >= 0.5)
        assert (np.abs(fp32[flipped] - 0.5) <= moved).all()  # only pixels that sat on the threshold flip
        if (fp32 >= 0.5).sum() >= 100:
            assert dice_score(fp32 >= 0.5, bf16 >= 0.5) >= 0.98, patient.patient_id


def test_predict_records_backend_and_precision(trained_checkpoint, phantom_dir, tmp_path):
    common = ["--model-path", str(trained_checkpoint), "--data-dir", str(phantom_dir), "--no-report"]
    common += ["--patients", "val", "--cache-dir", str(tmp_path / "cache")]
    for amp in ("off", "bf16"):
        predict.main([*common, "--output-dir", str(tmp_path / amp), "--backend", "torch", "--amp", amp])
    off, bf16 = (json.loads((tmp_path / a / "summary.json").read_text()) for a in ("off", "bf16"))
    assert off["protocol"]["precision"] == "fp32" and off["protocol"]["backend"] == "torch"
    assert bf16["protocol"]["precision"].startswith("bf16 autocast")
    assert abs(off["metrics"]["dice"]["mean"] - bf16["metrics"]["dice"]["mean"]) <= 0.02


def test_the_hub_pipeline_says_what_ran_and_keeps_fp32_outputs(trained_checkpoint, phantom_dir):
    patient = dataset.discover_inputs(phantom_dir)[0]
    volume, _ = dataset.read_volume(patient)
    forced = hubconf.segmentation_pipeline(trained_checkpoint, device="cpu", amp="off")
    fast = hubconf.segmentation_pipeline(trained_checkpoint, device="cpu", amp="bf16")
    default = hubconf.segmentation_pipeline(trained_checkpoint, device="cpu")
    assert (forced.backend, forced.precision) == (default.backend, default.precision) == ("torch", "fp32")
    assert fast.precision.startswith("bf16 autocast")
    (m32, p32), (m16, p16) = forced(volume), fast(volume)
    assert p32.dtype == p16.dtype == np.float32 and m32.shape == m16.shape == volume.shape[:3]
    assert np.abs(p32 - p16).max() <= PROBABILITY_TOLERANCE
    model = hubconf.unet_segmentation(weights_path=trained_checkpoint)
    x = torch.rand(2, 3, 32, 32)
    assert model(x).dtype == torch.float32  # the model itself never changes the caller's precision
