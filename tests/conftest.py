"""Shared fixtures; hardware/package marks are skipped automatically where the thing is missing."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rescompress.data import DEBIAN_FASHION_MNIST

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on the
    shared, oversubscribed 2-core machine two OpenMP threads wait at barriers for descheduled peers and small
    convs / deep models ran ~10x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


_SKIPS = {
    "needs_tensorrt": (lambda: _has("tensorrt") and torch.cuda.is_available(), "TensorRT and a CUDA GPU needed"),
    "needs_cuda": (lambda: torch.cuda.is_available(), "CUDA device needed"),
    "needs_openvino": (lambda: _has("openvino"), "openvino not installed"),
    "needs_full_fashion_mnist": (
        lambda: (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
        "Debian package dataset-fashion-mnist not installed",
    ),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark, (available, reason) in _SKIPS.items():
            if mark in item.keywords and not available():
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _restore_rng():
    """Each test starts from the same seeds and leaves the global RNG state as it found it."""
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)


@pytest.fixture(scope="session")
def calib_npz() -> Path:
    from rescompress.data import bundled_data

    return bundled_data("calib")


@pytest.fixture(scope="session")
def eval_npz() -> Path:
    from rescompress.data import bundled_data

    return bundled_data("eval")


@pytest.fixture(scope="session")
def reference_checkpoint() -> Path:
    from rescompress.data import ASSETS

    return ASSETS / "resnet20_fashion_mnist.safetensors"
