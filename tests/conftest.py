"""Shared fixtures: small phantom data sets written once per test session."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset import make_synthetic_dataset  # noqa: E402


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Eight 64x64 phantom patients (12-18 slices), one of them lesion-free. Read-only."""
    root = tmp_path_factory.mktemp("phantom") / "kaggle_3m"
    make_synthetic_dataset(root, patients=8, seed=7, image_size=64, slices=(12, 18))
    return root


@pytest.fixture
def small_phantom(tmp_path) -> Path:
    """A fresh three-patient phantom that a test may modify."""
    root = tmp_path / "kaggle_3m"
    make_synthetic_dataset(root, patients=3, seed=3, image_size=64, slices=(5, 12))
    return root
