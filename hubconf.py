"""torch.hub entry points.

model = torch.hub.load(repo, "unet_segmentation", pretrained=True)       # the published model
model = torch.hub.load(repo, "unet_segmentation", weights_path="best_model.pt")  # your own
segment = torch.hub.load(repo, "segmentation_pipeline")  # the published model; weights_path= for yours
masks, probabilities = segment(volume)  # volume: uint8 (S, H, W, 3)

The repo's files have generic names (`utils`, `network`, `dataset`, `predict`, ...) that a
caller may use for modules of their own. So this file imports only the standard library,
numpy and torch at the top, and loads the repo's files under private names
(`_brain_unet_hub_<key>_utils`, ...); while they load, their own `from utils import ...`
resolves to the repo's copy, and afterwards the caller's `sys.modules` entries for the
generic names are exactly as they were.
"""

dependencies = ["torch", "numpy", "scipy", "tifffile"]

import hashlib  # noqa: E402
import importlib  # noqa: E402
import importlib.abc  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent
ENTRY_MODULES = (
    "network",
    "utils",
    "preprocessing",
    "checkpoint",
    "postprocessing",
    "inference",
    "openvino_backend",
    "phantom",
)

# The published model (docs/model_card.md): in the repository, so nothing downloads at run time.
PUBLISHED_WEIGHTS = REPO / "weights" / "lgg_unet.pt"


def published_weights() -> Path:
    """The published weights file; RuntimeError with what to do when this clone lacks it."""
    if not PUBLISHED_WEIGHTS.is_file():
        raise RuntimeError(
            f"the published weights {PUBLISHED_WEIGHTS} are missing from this clone (restore them with "
            "`git checkout -- weights/`), or train your own with `python train.py --data-dir kaggle_3m` and "
            "pass weights_path='checkpoints/best_model.pt'"
        )
    return PUBLISHED_WEIGHTS


# --------------------------------------------------------------------------- isolation


class _PrivateNameLoader(importlib.machinery.SourceFileLoader):
    """Runs a repo file as the module `self.name` (private), whatever name it was imported by."""

    def exec_module(self, module: ModuleType) -> None:
        module.__name__ = self.name  # classes and functions get the private __module__
        module.__spec__ = importlib.util.spec_from_loader(self.name, self, origin=self.path)
        sys.modules[self.name] = module
        super().exec_module(module)


class _RepoFinder(importlib.abc.MetaPathFinder):
    """Finds the repo's top-level files by their plain names, to be loaded under private names."""

    def __init__(self, files: dict[str, Path], prefix: str):
        self.files, self.prefix = files, prefix

    def find_spec(self, name, path=None, target=None):
        file = self.files.get(name)
        if file is None:
            return None
        loader = _PrivateNameLoader(self.prefix + name, str(file))
        return importlib.util.spec_from_file_location(name, file, loader=loader)


def _repo_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(REPO.glob("*.py")) if p.stem != "hubconf"}


def _private_prefix(files: dict[str, Path]) -> str:
    """`_brain_unet_hub_<hash of the repo path and its files' contents>_`: two clones or an
    edited file get new modules, a second load of the same files reuses the first."""
    digest = hashlib.sha256(str(REPO).encode())
    for name, file in files.items():
        digest.update(name.encode() + file.read_bytes())
    return f"_brain_unet_hub_{digest.hexdigest()[:12]}_"


def repo_modules() -> dict[str, ModuleType]:
    """The repo's modules that the entry points need, by plain name, loaded under private
    names. The caller's `sys.modules` entries for every repo file name (`utils`, ...) are
    hidden while the repo's files load and put back afterwards, untouched."""
    files = _repo_files()
    prefix = _private_prefix(files)
    if all(prefix + name in sys.modules for name in ENTRY_MODULES):
        return {name: sys.modules[prefix + name] for name in ENTRY_MODULES}
    callers = {name: sys.modules.pop(name) for name in files if name in sys.modules}
    finder = _RepoFinder(files, prefix)
    sys.meta_path.insert(0, finder)
    try:
        return {name: importlib.import_module(name) for name in ENTRY_MODULES}
    except BaseException:
        for name in files:  # a failed load must not leave half-initialised modules behind
            sys.modules.pop(prefix + name, None)
        raise
    finally:
        sys.meta_path.remove(finder)
        for name in files:
            sys.modules.pop(name, None)
        sys.modules.update(callers)


# ------------------------------------------------------------------------- entry points


def unet_segmentation(
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    map_location: str | torch.device = "cpu",
    **model_kwargs,
) -> torch.nn.Module:
    """UNetModel in eval mode: (B, in_channels, H, W) float32 -> probabilities (B, 1, H, W) in
    [0, 1]; in_channels is 3, or 3 (2C + 1) for a 2.5-D checkpoint with C context slices.
    `model(x, return_logits=True)` gives the logits.

    `pretrained=True`: the published model (`PUBLISHED_WEIGHTS`, docs/model_card.md: trained
    on 88 patients of the Kaggle LGG set, 128 x 128 input); `weights_path` wins when given.
    `weights_path`: a training checkpoint (its `model_config` is used) or a bare state_dict
    (DDP/compiled prefixes are stripped), loaded with weights_only=True. Without weights,
    `model_kwargs` (`in_channels`, `out_channels`, `base_filters`) are the model record from
    which `network.build_model` builds the default architecture, the U-Net (random init).
    Raises TypeError for model_kwargs together with weights_path (the checkpoint fixes the
    architecture) and for model_kwargs the network does not take, RuntimeError for
    `pretrained=True` in a clone without the published file.
    """
    modules = repo_modules()
    if weights_path is None and pretrained:
        weights_path = published_weights()
    if weights_path is None:
        network = modules["network"]
        try:
            model = network.build_model(
                {"architecture": network.DEFAULT_ARCHITECTURE, **model_kwargs}, "unet_segmentation"
            )
        except ValueError as error:  # bad keyword arguments: a TypeError, as for any function call
            raise TypeError(str(error)) from error
        return model.eval()
    if model_kwargs:
        raise TypeError(
            f"unet_segmentation: {', '.join(sorted(model_kwargs))} cannot be combined with weights_path: "
            "the checkpoint fixes the architecture (pass model arguments only to build an untrained model)"
        )
    checkpoint = modules["checkpoint"].load_checkpoint(weights_path, map_location)
    return modules["inference"].model_from_checkpoint(checkpoint, weights_path).to(map_location)


class SegmentationPipeline:
    """Raw volume in, native-size masks out: the preprocessing, batched inference,
    threshold and 3-D component filter that predict.py uses (`postprocessing`, a record of
    `postprocessing.POSTPROCESSING_CANDIDATES`; None: the largest component, or all with `lcc=False`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        image_size: int,
        device: torch.device,
        threshold: float = 0.5,
        lcc: bool = True,
        tta: bool = False,
        batch_size: int = 32,
        norm_region: str = "crop",
        postprocessing: dict | None = None,
        amp: str = "auto",
        backend: str | None = None,
    ):
        self._modules = repo_modules()
        inference = self._modules["inference"]
        if backend not in (None, "torch", "openvino"):
            raise ValueError(f"backend={backend!r}: the pipeline runs 'torch' or 'openvino' (None: the fastest)")
        self.amp_dtype = inference.inference_dtype(device, amp)
        resolved = inference.resolve_backend(backend, device, self.amp_dtype)
        # no onnxruntime session here: OpenVINO is the pipeline's faster fp32 runtime than torch
        self.backend = "openvino" if resolved == "onnxruntime" else resolved
        self.precision = inference.precision_text(self.amp_dtype, self.backend)
        post = self._modules["postprocessing"]
        if postprocessing is None:
            postprocessing = dict(post.LCC if lcc else post.NO_FILTER)
        self.postprocessing = post.check_postprocessing(postprocessing, "postprocessing")
        lcc = self.postprocessing == post.LCC
        self.norm_region = norm_region  # where training took the normalisation statistics
        self.context_slices = self._modules["inference"].context_slices_of(
            getattr(model, "config", {}).get("in_channels", 3), "model"
        )
        self.device = device
        self.model = model.to(device).to(memory_format=torch.channels_last).eval()
        self._compiled: tuple[torch.nn.Module, object] | None = None  # (model, its OpenVINO network)
        self.image_size, self.threshold, self.lcc, self.tta, self.batch_size = (
            image_size,
            threshold,
            lcc,
            tta,
            batch_size,
        )

    def _network(self) -> torch.nn.Module:
        """What runs the forward pass: `model` itself, or with the OpenVINO backend its compiled
        copy (converted on the first call and again whenever `model` is replaced)."""
        if self.backend != "openvino":
            return self.model
        if self._compiled is None or self._compiled[0] is not self.model:
            openvino = self._modules["openvino_backend"]
            precision = openvino.precision_of(self.amp_dtype)
            self._compiled = self.model, openvino.checked_openvino(self.model, self.image_size, precision, "model")
        return self._compiled[1]

    def __call__(self, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """volume (S, H, W, 3) of one patient, all slices in order -> masks uint8 0/1
        (S, H, W) and probabilities float32 (S, H, W), both on the input grid.
        Raises ValueError for any other shape and for NaN or infinite values."""
        preprocessing, inference = self._modules["preprocessing"], self._modules["inference"]
        volume = np.asarray(volume)
        if volume.ndim != 4 or volume.shape[-1] != 3:
            raise ValueError(f"expected a volume of shape (slices, H, W, 3), got {volume.shape}")
        slices = range(len(volume))
        images, _, geometry = preprocessing.preprocess_volume(volume, None, self.image_size, slices, self.norm_region)
        images = preprocessing.as_stored(images)  # float16, as predict.py and training feed the network
        amp = inference.autocast_for(self.backend, self.amp_dtype)
        probs = inference.predict_volume(
            self._network(), images, self.device, self.batch_size, self.tta, amp, self.context_slices
        )
        return inference.to_native(probs, geometry, self.threshold, postprocessing=self.postprocessing)


def segmentation_pipeline(
    weights_path: str | Path | None = None,
    device: str | torch.device | None = None,
    threshold: float = 0.5,
    lcc: bool | None = None,
    tta: bool = False,
    image_size: int | None = None,
    batch_size: int = 32,
    amp: str = "auto",
    backend: str | None = None,
) -> SegmentationPipeline:
    """A callable that segments one patient's raw volume: (S, H, W, 3) -> masks uint8 0/1
    (S, H, W) and probabilities float32 (S, H, W) on the input grid, with the preprocessing,
    batched inference, threshold and 3-D component filter that predict.py uses. It segments
    every slice it is given; predict.py leaves out each patient's first and last slice (pass
    `volume[1:-1]` for its masks).

    `weights_path`: None (default) is the published model (`PUBLISHED_WEIGHTS`,
    docs/model_card.md); or a training checkpoint or bare state_dict of your own.

    `lcc`: None (default) uses the post-processing saved in the checkpoint (chosen on its
    validation patients by train.py; the largest component for a checkpoint without the
    record and for a bare state_dict), as `predict.py --postprocess checkpoint` does; True
    keeps the largest component only, False every component. The pipeline's
    `postprocessing` attribute says which it applies.

    `device`: None picks cuda:0 when available, else cpu; an unavailable CUDA device raises
    `utils.UsageError` (a ValueError). The image size and normalisation region come from a
    training checkpoint (pass `image_size` for a bare state_dict, default 256, normalised over
    the crop; an `image_size` other than a checkpoint's own warns); the context slices of a
    2.5-D model come from its input channels. A checkpoint trained on phantom patients only
    (the demo's) warns in one line, as predict.py does: its masks say nothing about real FLAIR.

    `amp`: "auto" (default) is predict.py's: on the CPU OpenVINO in bf16 where the CPU has
    native bf16 instructions (AVX512-BF16 or AMX; masks checked against fp32 in
    docs/precision.md), else in fp32; on a GPU bf16 (or fp16) autocast. "off" forces fp32,
    "bf16" asks for bf16 anywhere. The weights and the returned probabilities are float32
    either way, and so is `unet_segmentation`'s model; the pipeline's `backend` and
    `precision` attributes say what ran. `backend`: None (default) is OpenVINO on the CPU
    (predict.py's bf16 path; for fp32 predict.py uses onnxruntime, which the pipeline does
    not run) and torch on a GPU; "torch" runs the model itself (e.g. to hook it). OpenVINO
    converts the network on the first call (a few seconds at 256 px). A bad `amp` or
    `amp` / `backend` combination raises `utils.UsageError` (a ValueError).
    """
    modules = repo_modules()
    weights_path = published_weights() if weights_path is None else weights_path
    utils, inference, saved = modules["utils"], modules["inference"], modules["checkpoint"]
    post = modules["postprocessing"]
    device = utils.resolve_device(None if device is None else str(device), flag="device")
    checkpoint = saved.load_checkpoint(weights_path, "cpu")
    model = inference.model_from_checkpoint(checkpoint, weights_path)
    trained = saved.is_training_checkpoint(checkpoint)
    preprocessing = saved.require_training_checkpoint(checkpoint, weights_path)["preprocessing"] if trained else {}
    if trained:
        saved.check_preprocessing(preprocessing, weights_path)
    saved_size = preprocessing.get("image_size")
    if image_size is not None and (int(image_size) < 16 or int(image_size) % 16):
        raise ValueError(
            f"segmentation_pipeline: image_size={image_size} must be a multiple of 16 (the U-Net pools 4 times)"
        )
    if image_size is None:
        image_size = saved_size or 256
    elif saved_size is not None and int(image_size) != int(saved_size):
        warnings.warn(
            f"segmentation_pipeline: image_size={image_size}, but {weights_path} was trained at {saved_size} x "
            f"{saved_size}; its masks will differ from predict.py's (omit image_size to use the trained size)",
            stacklevel=2,
        )
    region = preprocessing.get("norm_region", "crop")
    if lcc is None:
        record = post.postprocessing_of(checkpoint, weights_path) if trained else dict(post.LCC)
    else:
        record = dict(post.LCC if lcc else post.NO_FILTER)
    pipeline = SegmentationPipeline(
        model, int(image_size), device, threshold, record == post.LCC, tta, batch_size, region, record, amp, backend
    )
    split = checkpoint.get("split") if trained else None  # a bare state_dict says nothing of its data
    modules["phantom"].warn_if_phantom_trained(weights_path, split, stacklevel=2)  # its volumes carry no ids
    return pipeline
