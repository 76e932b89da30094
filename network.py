"""The network, in one place: `UNetModel` and its building blocks, the registry of
architectures train.py can train (`ARCHITECTURES`), the record saved beside the weights
(`ModelConfig`), and the one function that builds a model from that record (`build_model`).

A checkpoint's `model_config` is the record: `{"architecture": "unet", "in_channels": 3,
"out_channels": 1, "base_filters": 32}`, the registry name and the constructor arguments.
A record without "architecture" is a U-Net (UNNAMED_ARCHITECTURE).
This module imports nothing from the repository; its errors are ValueError, which the
checkpoint readers turn into their own CheckpointError.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    """[Conv3x3 -> BatchNorm -> ReLU] x 2; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then a double conv: halves the size, changes the width."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """2x2 transposed conv (stride 2), concatenate the skip, then a double conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, C, h, w) -> (B, C/2, 2h, 2w)
        return self.conv(torch.cat([skip, x], dim=1))  # (B, C, 2h, 2w) -> (B, C/2, 2h, 2w)


class UNetModel(nn.Module):
    """U-Net with four down/up levels; returns per-pixel probabilities (sigmoid), or logits."""

    DEPTH = 4  # input height and width must be divisible by 2**DEPTH

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_filters: int = 32):
        super().__init__()
        f = base_filters
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "base_filters": f}
        self.inc = DoubleConv(in_channels, f)
        self.down1, self.down2, self.down3 = Down(f, 2 * f), Down(2 * f, 4 * f), Down(4 * f, 8 * f)
        self.bottleneck = Down(8 * f, 16 * f)
        self.up4, self.up3 = Up(16 * f, 8 * f), Up(8 * f, 4 * f)
        self.up2, self.up1 = Up(4 * f, 2 * f), Up(2 * f, f)
        self.head = nn.Conv2d(f, out_channels, 1)

    def forward(self, x: torch.Tensor, return_logits: bool = False) -> torch.Tensor:
        """x: (B, in_channels, H, W), H and W divisible by 16.

        Returns float32 probabilities in [0, 1] of shape (B, out_channels, H, W): the sigmoid
        runs in float32 even under autocast. With `return_logits=True` it returns the logits
        (in the autocast dtype, if any) for a loss that applies the sigmoid itself in float32
        (every loss in `losses.py`): in bf16, sigmoid(x) rounds to exactly 1.0 above
        x ~ 6.2, which would make the gradient of a confident false positive exactly 0.
        """
        height, width = x.shape[-2:]
        multiple = 2**self.DEPTH
        if height % multiple or width % multiple:
            raise ValueError(
                f"UNetModel input height and width must be divisible by {multiple}, got "
                f"{height} x {width}; resize or pad the input (preprocessing does this)"
            )
        x1 = self.inc(x)  # (B, in_channels, H, W) -> (B, f, H, W)
        x2 = self.down1(x1)  # -> (B, 2f, H/2, W/2)
        x3 = self.down2(x2)  # -> (B, 4f, H/4, W/4)
        x4 = self.down3(x3)  # -> (B, 8f, H/8, W/8)
        x = self.bottleneck(x4)  # -> (B, 16f, H/16, W/16)
        x = self.up4(x, x4)  # -> (B, 8f, H/8, W/8)
        x = self.up3(x, x3)
        x = self.up2(x, x2)
        x = self.up1(x, x1)  # -> (B, f, H, W)
        logits = self.head(x)  # -> (B, out_channels, H, W)
        if return_logits:
            return logits
        return torch.sigmoid(logits.float())  # in [0, 1], float32


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- registry

# The networks train.py can train (`--architecture NAME`) and a checkpoint can name. A class
# registered here takes its size as keyword arguments (training passes `in_channels`, three
# per slice, and `base_filters`, the width: run_setup.build_training_model), keeps them as a
# dict in `self.config`, and its `forward(x, return_logits=False)` maps (B, in_channels, H, W)
# to float32 probabilities in [0, 1] of shape (B, out_channels, H, W), or to the logits with
# `return_logits=True`.
ARCHITECTURES: dict[str, type[nn.Module]] = {"unet": UNetModel}
DEFAULT_ARCHITECTURE = "unet"  # what train.py trains unless --architecture says otherwise
UNNAMED_ARCHITECTURE = "unet"  # what a record without "architecture" is (older checkpoints)


def architecture_names() -> list[str]:
    """The registered architecture names (train.py's --architecture choices)."""
    return list(ARCHITECTURES)


def add_network_flags(add: Callable[..., Any]) -> None:
    """Declare the network's flags through `add` (`utils.RunFlags.add`; they define the run)."""
    add(
        "--architecture",
        defines_run=True,
        choices=architecture_names(),
        default=DEFAULT_ARCHITECTURE,
        help=architecture_help(),
    )
    add("--base-filters", defines_run=True, type=int, default=32, help="U-Net width (32: 7.8 M parameters)")


def architecture_help() -> str:
    """The --architecture help: each registered name with the first line of its class's docstring."""
    described = []
    for name, cls in ARCHITECTURES.items():
        summary = (inspect.getdoc(cls) or cls.__name__).splitlines()[0].rstrip(".")
        described.append(f"{name}: {summary}")
    return "network to train; " + "; ".join(described)


def _architecture_of(model: nn.Module) -> str:
    """The registry name of a built model's class (ValueError when it is not registered)."""
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not in network.ARCHITECTURES ({', '.join(ARCHITECTURES)})")


def _parameters(cls: type[nn.Module]) -> set[str] | None:
    """The keyword arguments a network class takes; None when it takes any (**kwargs)."""
    parameters = list(inspect.signature(cls).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}


# ------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class ModelConfig:
    """What a network is: its registry name and its constructor arguments (positive
    integers), saved as `model_config` beside its weights (the nanoGPT `model_args`
    pattern), so a reader never guesses it from tensor shapes."""

    architecture: str = DEFAULT_ARCHITECTURE
    arguments: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: Any = "model_config") -> ModelConfig:
        """The config of a saved `model_config` dict. ValueError naming `source` for a
        record that is not a dict, an unknown architecture, entries its class does not
        take, or values that are not positive integers."""
        if not isinstance(record, Mapping):
            raise ValueError(f"{source}: 'model_config' must be a dict, got {type(record).__name__}")
        arguments = {k: v for k, v in record.items() if k != "architecture"}
        architecture = record.get("architecture", UNNAMED_ARCHITECTURE)
        if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
            raise ValueError(
                f"{source}: unknown architecture {architecture!r} in 'model_config'; this code knows "
                f"{', '.join(ARCHITECTURES)} (network.ARCHITECTURES)"
            )
        known = _parameters(ARCHITECTURES[architecture])
        unknown = sorted(set(arguments) - known) if known is not None else []
        if unknown:
            raise ValueError(f"{source}: unknown entries in 'model_config': {', '.join(unknown)}")
        if not all(isinstance(v, int) and v > 0 for v in arguments.values()):
            raise ValueError(f"{source}: 'model_config' must hold positive integers, got {dict(record)}")
        return cls(architecture, arguments)

    @classmethod
    def of_state_dict(cls, state: Mapping[str, torch.Tensor], source: Any = "state_dict") -> ModelConfig:
        """The config of a bare U-Net state_dict, which has no record: read off its first
        and last layers. Used only for bare state_dicts given to the torch.hub entry points."""
        first, head = state.get("inc.0.weight"), state.get("head.weight")
        if first is None or head is None:
            raise ValueError(f"{source}: not a UNetModel state_dict (no 'inc.0.weight')")
        sizes = {"in_channels": int(first.shape[1]), "out_channels": int(head.shape[0])}
        return cls("unet", {**sizes, "base_filters": int(first.shape[0])})

    @classmethod
    def of_model(cls, model: nn.Module) -> ModelConfig:
        """The config of a built model, from its `config` (a model that `build_model` built
        names its architecture there; any other is looked up by its class)."""
        record = dict(model.config)
        record.setdefault("architecture", _architecture_of(model))
        return cls.from_record(record, "model")

    def record(self) -> dict[str, Any]:
        """The plain dict saved in a checkpoint (loadable with weights_only=True)."""
        return {"architecture": self.architecture, **self.arguments}


def build_model(record: Mapping[str, Any], source: Any = "model_config") -> nn.Module:
    """A freshly initialised network (train mode, on the CPU) from a model record such as
    `{"architecture": "unet", "in_channels": 3, "base_filters": 32}` (no "architecture":
    a U-Net). Its `config` is its full record, the architecture's name included, defaults
    filled in. ValueError naming `source` for a record this code cannot build."""
    config = ModelConfig.from_record(record, source)
    cls = ARCHITECTURES[config.architecture]
    try:
        model = cls(**config.arguments)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: cannot build {cls.__name__} from {dict(record)}: {error}") from error
    arguments = {
        k: v for k, v in dict(getattr(model, "config", None) or config.arguments).items() if k != "architecture"
    }
    model.config = {"architecture": config.architecture, **arguments}
    return model


def model_record(model: nn.Module) -> dict[str, Any]:
    """The `model_config` record of a built model, as checkpoints save it."""
    return ModelConfig.of_model(model).record()
