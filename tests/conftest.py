"""Shared fixtures: tiny on-disk datasets in the official layouts, and one FAISS thread for index tests.
Shared code that is not a fixture lives in ``tests/helpers/``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers.data import write_class_images, write_idx

# precision=auto would pick bf16 on a CPU with AMX whenever a tiny random model happens to pass its export check:
# tests compare scores to 1e-4, so inference stays fp32 unless a test asks for bf16 (tests/models/test_precision.py
# patches the probe itself). Set here, it reaches the entry points the tests start as subprocesses too.
os.environ.setdefault("CBIR_NATIVE_BF16", "0")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_folder")
    write_class_images(root)
    return root


@pytest.fixture(scope="session")
def tiny_fashion_mnist(tmp_path_factory) -> Path:
    """The four Fashion-MNIST files in the official IDX format, with 40 train / 20 test images."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 25 + rng.integers(0, 20, size=(n, 28, 28))).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="module")
def one_faiss_thread():
    """Tiny indexes: OpenMP threads only spin-wait on a shared machine (6x slower wall time measured).
    Index test modules use it with ``pytestmark = pytest.mark.usefixtures("one_faiss_thread")``."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
