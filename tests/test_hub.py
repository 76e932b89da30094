"""torch.hub entry points, loaded the way a notebook user would."""

import ast
import json
import subprocess
import sys
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


def test_pretrained_without_the_published_file_says_what_to_do(monkeypatch, tmp_path):
    import hubconf

    monkeypatch.setattr(hubconf, "PUBLISHED_WEIGHTS", tmp_path / "weights" / "lgg_unet.pt")
    for call in (lambda: hubconf.unet_segmentation(pretrained=True), lambda: hubconf.segmentation_pipeline()):
        with pytest.raises(RuntimeError, match=r"are missing from this clone .*git checkout -- weights/.*train\.py"):
            call()
    assert hub_load("unet_segmentation", base_filters=8).config["base_filters"] == 8


def test_untrained_model_returns_probabilities_or_logits():
    model = hub_load("unet_segmentation", in_channels=9, base_filters=4)
    assert type(model).__name__ == "UNetModel" and not model.training
    assert model.config == {"architecture": "unet", "in_channels": 9, "out_channels": 1, "base_filters": 4}
    x = torch.randn(2, 9, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probabilities, logits = model(x), model(x, return_logits=True)
    assert probabilities.shape == logits.shape == (2, 1, 32, 32)
    assert probabilities.dtype == torch.float32 and 0 <= probabilities.min() and probabilities.max() <= 1
    torch.testing.assert_close(torch.sigmoid(logits), probabilities)  # the logits, not the probabilities again
    assert not torch.allclose(logits, probabilities)
    with pytest.raises(TypeError, match="unet_segmentation: unknown entries in 'model_config': depth"):
        hub_load("unet_segmentation", depth=5)


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("touch pwned_marker",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="refused") as info:  # the hub's private copy of CheckpointError
        hub_load("unet_segmentation", weights_path=str(tmp_path / "evil.pt"))
    assert type(info.value).__name__ == "CheckpointError"
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
            "--backend",
            "torch",  # the pipeline's engine: the same code path, so the same masks bit for bit
            "--figure-path",
            str(tmp_path / "d.png"),
        ]
    )
    written = np.stack([tifffile.imread(tmp_path / "masks" / patient.patient_id / s.mask.name) for s in patient.kept])
    np.testing.assert_array_equal(written > 0, masks > 0)
    with pytest.raises(ValueError, match="slices, H, W, 3"):
        segment(volume[..., 0])


def test_pipeline_gives_the_network_predict_clis_inputs(trained_checkpoint, phantom_dir):
    """predict.py feeds the network the preprocessed images as the cache keeps them (float16,
    `preprocessing.IMAGE_DTYPE`); the pipeline fed float32 ones, so its probabilities differed
    in the last bits, and on 8 of the 10 validation patients of weights/lgg_unet.pt 1 to 5
    mask pixels flipped (found by docs/deployment.md, Real patients through every path).
    The inputs and probabilities must be equal bit for bit."""
    import dataset
    import inference

    segment = hub_load("segmentation_pipeline", weights_path=str(trained_checkpoint), backend="torch", amp="off")
    patient = discover_patients(phantom_dir)[1]
    volume, _ = read_volume(patient)
    seen = []
    segment.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    masks, probabilities = segment(volume)

    loaded = inference.load_model(trained_checkpoint, torch.device("cpu"))
    stored = dataset.load_volume(patient, loaded.image_size, None, loaded.norm_region)  # what predict.py predicts on
    torch.testing.assert_close(torch.cat(seen), torch.from_numpy(stored.images).float(), rtol=0, atol=0)
    expected = inference.predict_volume(loaded.model, stored.images, batch_size=segment.batch_size)
    expected_masks, expected_probabilities = inference.to_native(
        expected, stored.geometry, postprocessing=loaded.postprocessing
    )
    np.testing.assert_array_equal(probabilities, expected_probabilities)
    np.testing.assert_array_equal(masks, expected_masks)


# ------------------------------------------------------------------------ isolation
# Each check runs in a fresh interpreter, as a notebook would, with a module of the
# caller's own named `utils` on sys.path (and imported) that lacks every name of ours.

CALLER = """
import json, sys
import numpy as np
import torch
import utils  # the caller's own module
callers_utils = utils

def load(entry, repo=REPO, **kwargs):
    return torch.hub.load(repo, entry, source="local", trust_repo=True, **kwargs)

GENERIC = ["utils", "network", "dataset", "predict", "phantom", "train", "augmentations", "losses", "export"]
before = {name: sys.modules.get(name) for name in GENERIC}
report = {}
"""

AFTER = """
report["unchanged"] = all(sys.modules.get(name) is module for name, module in before.items())
report["generic_after"] = sorted(name for name in GENERIC if name in sys.modules)
import utils
report["callers_utils"] = utils is callers_utils and utils.MINE == "caller"
print(json.dumps(report))
"""


def run_as_caller(tmp_path: Path, body: str) -> dict:
    """Run CALLER + body + AFTER in a fresh python whose working folder holds the caller's utils.py."""
    (tmp_path / "utils.py").write_text('MINE = "caller"\n')
    script = tmp_path / "notebook.py"
    script.write_text(f"REPO = {str(ROOT)!r}\n" + CALLER + body + AFTER)
    done = subprocess.run([sys.executable, script.name], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hub_leaves_the_callers_modules_alone(trained_checkpoint, phantom_dir, tmp_path):
    volume, _ = read_volume(discover_patients(phantom_dir)[0])
    np.save(tmp_path / "volume.npy", volume)
    report = run_as_caller(
        tmp_path,
        f"""
model = load("unet_segmentation", weights_path={str(trained_checkpoint)!r})
segment = load("segmentation_pipeline", weights_path={str(trained_checkpoint)!r}, device="cpu")
masks, probabilities = segment(np.load("volume.npy"))
again = load("unet_segmentation", weights_path={str(trained_checkpoint)!r})
report["shape"] = list(masks.shape)
report["same_class_twice"] = type(again) is type(model)
report["module"] = type(model).__module__
report["skimage"] = "skimage" in sys.modules
""",
    )
    assert report["unchanged"] and report["generic_after"] == ["utils"] and report["callers_utils"]
    assert report["shape"] == list(volume.shape[:3])
    assert report["same_class_twice"] and report["module"].startswith("_brain_unet_hub_")
    assert not report["skimage"]  # not a dependency: nothing the entry points run imports it


def test_hub_loads_after_another_hub_repo(tmp_path):
    other = tmp_path / "other_repo"
    other.mkdir()
    (other / "utils.py").write_text("def helper():\n    return 'other'\n")
    (other / "hubconf.py").write_text(
        "dependencies = []\nfrom utils import helper\n\ndef entry():\n    return helper()\n"
    )
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    report = run_as_caller(
        notebook,
        f"""
import utils as before_other
del sys.modules["utils"]  # let the other repo import its own utils, as torch.hub allows
report["other"] = load("entry", repo={str(other)!r})
others_utils = sys.modules["utils"]
model = load("unet_segmentation", base_filters=4)
report["ours_ok"] = model(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)
report["others_kept"] = sys.modules["utils"] is others_utils
sys.modules["utils"] = before_other
""",
    )
    assert report["other"] == "other" and report["ours_ok"] and report["others_kept"]
    assert report["unchanged"] and report["callers_utils"]


def test_model_kwargs_with_weights_are_refused(trained_checkpoint):
    with pytest.raises(TypeError, match="base_filters cannot be combined with weights_path"):
        hub_load("unet_segmentation", weights_path=str(trained_checkpoint), base_filters=8)


def test_pipeline_on_missing_cuda_says_so(trained_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available on this machine") as info:
        hub_load("segmentation_pipeline", weights_path=str(trained_checkpoint), device="cuda")
    assert type(info.value).__name__ == "UsageError"
    segment = hub_load("segmentation_pipeline", weights_path=str(trained_checkpoint))  # device=None: the CPU here
    assert segment.device == torch.device("cpu")


def module_level_imports(path: Path) -> set[str]:
    """Top-level names of the modules that `path` imports outside any function."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_dependencies_are_exactly_what_the_entry_points_import(trained_checkpoint):
    hub_load("segmentation_pipeline", weights_path=str(trained_checkpoint))
    loaded = [Path(m.__file__) for name, m in sys.modules.items() if name.startswith("_brain_unet_hub_")]
    assert {p.stem for p in loaded} >= {"network", "utils", "dataset", "inference"}
    repo_names = {p.stem for p in ROOT.glob("*.py")}
    imported = set().union(*(module_level_imports(p) for p in [ROOT / "hubconf.py", *loaded]))
    third_party = imported - set(sys.stdlib_module_names) - repo_names - {"__future__"}
    hubconf = ast.parse((ROOT / "hubconf.py").read_text())
    listed = next(n.value for n in hubconf.body if isinstance(n, ast.Assign) and n.targets[0].id == "dependencies")
    assert set(ast.literal_eval(listed)) == third_party
