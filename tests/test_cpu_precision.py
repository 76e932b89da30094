"""Prediction precision on the CPU: OpenVINO in bf16 by default where the CPU has native bf16
(read from the CPU flags), fp32 elsewhere and with --amp off, torch's bf16 autocast on
request; what ran recorded; the fast paths checked against torch fp32 on phantom patients."""

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
def test_the_cpu_default_is_bf16_only_where_the_cpu_has_it(native, monkeypatch):
    """A CPU with native bf16 predicts in bf16 by default, any other in fp32 (a CPU without
    the instructions, simulated, never gets the emulated bf16); --amp off forces fp32."""
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    fallback = ("onnxruntime", None)  # fp32: the faster CPU runtime (docs/cpu-inference.md)
    assert inference.resolve_inference(None, "auto", cpu) == (("openvino", torch.bfloat16) if native else fallback)
    assert inference.resolve_inference(None, "off", cpu) == ("onnxruntime", None)
    assert inference.resolve_inference(None, "bf16", cpu) == ("openvino", torch.bfloat16)
    assert inference.resolve_inference(None, "fp16", cpu) == ("torch", torch.float16)
    assert inference.resolve_inference("torch", "auto", cpu) == ("torch", torch.bfloat16 if native else None)
    assert inference.resolve_inference("onnxruntime", "auto", cpu) == ("onnxruntime", None)
    with pytest.raises(UsageError, match="--backend onnxruntime runs the fp32 ONNX graph; pass --amp off"):
        inference.resolve_inference("onnxruntime", "bf16", cpu)
    with pytest.raises(UsageError, match="--backend openvino runs fp32 or bf16 on the CPU"):
        inference.resolve_inference("openvino", "fp16", cpu)
    with pytest.raises(UsageError, match="--backend openvino runs on the CPU only"):
        inference.resolve_backend("openvino", torch.device("cuda"))
    assert inference.autocast_dtype(cpu, "auto") is None  # training on the CPU stays fp32
    with pytest.raises(UsageError, match="amp='bogus': choose one of auto, fp16, bf16, off"):
        inference.inference_dtype(cpu, "bogus")  # the hub pipeline's amp= reaches it unchecked


def test_openvino_matches_torch_fp32(trained_checkpoint, phantom_dir):
    """OpenVINO in f32 is torch's arithmetic (within 1e-4, masks equal but for pixels on the
    threshold); in bf16 within the bf16 tolerance, and bf16 really ran (it moved something)."""
    from openvino_backend import OpenVinoModel

    loaded = inference.load_model(trained_checkpoint, torch.device("cpu"))
    networks = {p: OpenVinoModel(loaded.model, loaded.image_size, p) for p in ("f32", "bf16")}
    for patient in dataset.discover_inputs(phantom_dir)[:3]:
        images = dataset.load_volume(patient, loaded.image_size, None).images
        fp32 = inference.predict_volume(loaded.model, images, "cpu", 16, False, None)
        for precision, bound in (("f32", 1e-4), ("bf16", PROBABILITY_TOLERANCE)):
            fast = inference.predict_volume(networks[precision], images, "cpu", 16, False, None)
            assert fast.dtype == np.float32 and fast.shape == fp32.shape
            moved = np.abs(fast - fp32).max()
            assert moved <= bound, (patient.patient_id, precision)
            assert precision == "f32" or moved > 1e-6  # bf16 that moves nothing did not run in bf16
            flipped = (fp32 >= 0.5) != (fast >= 0.5)
            assert (np.abs(fp32[flipped] - 0.5) <= moved).all()  # only pixels on the threshold flip


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


@pytest.mark.parametrize("native", [True, False])
def test_predict_records_backend_and_precision(native, trained_checkpoint, phantom_dir, tmp_path, monkeypatch):
    """The default run (OpenVINO bf16 or, without the instructions, onnxruntime fp32), --amp off
    (onnxruntime fp32) and torch in bf16: each says what ran in summary.json, and their Dice agree."""
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native)
    common = ["--model-path", str(trained_checkpoint), "--data-dir", str(phantom_dir), "--no-report"]
    common += ["--patients", "val", "--cache-dir", str(tmp_path / "cache"), "--no-overlays"]
    runs = {"default": [], "off": ["--amp", "off"], "torch_bf16": ["--backend", "torch", "--amp", "bf16"]}
    for name, flags in runs.items():
        predict.main([*common, "--output-dir", str(tmp_path / name), *flags])
    protocol = {n: json.loads((tmp_path / n / "summary.json").read_text())["protocol"] for n in runs}
    assert protocol["default"]["backend"] == ("openvino" if native else "onnxruntime")
    assert protocol["off"]["backend"] == "onnxruntime"
    assert protocol["off"]["precision"] == "fp32"
    expected = "bf16 inference precision (float32 inputs and probabilities)" if native else "fp32"
    assert protocol["default"]["precision"] == expected
    assert protocol["torch_bf16"]["backend"] == "torch"
    assert protocol["torch_bf16"]["precision"].startswith("bf16 autocast")
    dice = {n: json.loads((tmp_path / n / "summary.json").read_text())["metrics"]["dice"]["mean"] for n in runs}
    assert max(dice.values()) - min(dice.values()) <= 0.02


@pytest.mark.parametrize("native", [True, False])
def test_the_hub_pipeline_says_what_ran_and_keeps_fp32_outputs(native, trained_checkpoint, phantom_dir, monkeypatch):
    monkeypatch.setattr(hubconf.repo_modules()["inference"], "cpu_has_native_bf16", lambda: native)
    patient = dataset.discover_inputs(phantom_dir)[0]
    volume, _ = dataset.read_volume(patient)
    forced = hubconf.segmentation_pipeline(trained_checkpoint, device="cpu", amp="off")
    default = hubconf.segmentation_pipeline(trained_checkpoint, device="cpu")
    torch_fp32 = hubconf.segmentation_pipeline(trained_checkpoint, device="cpu", amp="off", backend="torch")
    assert (forced.backend, forced.precision) == ("openvino", "fp32")
    assert default.backend == "openvino"
    assert default.precision == ("bf16 inference precision (float32 inputs and probabilities)" if native else "fp32")
    (m_ref, p_ref), (m_fast, p_fast) = torch_fp32(volume), default(volume)
    assert p_ref.dtype == p_fast.dtype == np.float32 and m_ref.shape == m_fast.shape == volume.shape[:3]
    assert np.abs(p_ref - p_fast).max() <= (PROBABILITY_TOLERANCE if native else 1e-4)
    model = hubconf.unet_segmentation(weights_path=trained_checkpoint)
    x = torch.rand(2, 3, 32, 32)
    assert model(x).dtype == torch.float32  # the model itself never changes the caller's precision
