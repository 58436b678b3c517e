"""Which number format inference runs in: ``precision=auto|fp32|bf16`` for extraction, search and serving.

bfloat16 autocast roughly doubles CPU inference where the CPU computes in bf16 natively (AMX or
AVX512-BF16; measured 2x on MobileNetV2 and ResNet-34 here) and on CUDA, and costs little accuracy on
L2-normalised embeddings — but "little" is checked, not assumed: export runs both formats on sample
images (:func:`bf16_parity`) and writes the result into the bundle's manifest. ``auto`` then means bf16
only where the hardware has it *and* the bundle's check passed; otherwise fp32, said once in the log.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cbir.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
MIN_COSINE = 0.999  # every sample's bf16 embedding within this cosine of its fp32 one
MIN_RECALL = 0.99  # the bf16 top-k neighbours of the samples among themselves recover the fp32 ones


def check_precision(precision: str) -> str:
    value = str(precision).lower()
    if value not in PRECISIONS:
        raise ConfigError(f"precision={precision}: choose from {', '.join(PRECISIONS)}")
    return value


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 units (torch's own probe; ``/proc/cpuinfo`` flags where torch lacks it).
    ``CBIR_NATIVE_BF16=0`` or ``1`` overrides the probe (the test suite sets 0, so scores stay fp32-exact)."""
    forced = os.environ.get("CBIR_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        function = getattr(torch.cpu, probe, None)
        try:
            if function is not None and function():
                return True
        except Exception:  # noqa: BLE001 - a private probe: absent or failing means unknown
            continue
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def native_bf16(device: str | torch.device | None) -> bool:
    """Whether ``device`` (None = CPU) computes in bf16 natively, where autocast speeds inference up."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and cpu_has_native_bf16()


def use_bf16(precision: str, device: str | torch.device | None, parity: dict | None) -> bool:
    """Resolve ``precision`` for ``device``: ``bf16``/``fp32`` as asked; ``auto`` → bf16 iff the device has
    native bf16 and ``parity`` (a bundle's :func:`bf16_parity` result) passed."""
    precision = check_precision(precision)
    if precision != "auto":
        return precision == "bf16"
    if not native_bf16(device):
        return False
    if not parity:
        _say_once("precision=auto: fp32 (this model has no bf16 check on record: re-export the bundle to run it, "
                  "or set precision=bf16)")
        return False
    if not parity.get("passed"):
        _say_once(f"precision=auto: fp32 (bf16 changed this model's embeddings too much at export: min cosine "
                  f"{parity.get('cosine_min', float('nan')):.4f}, recall@{parity.get('k')} "
                  f"{parity.get('recall', float('nan')):.3f})")
        return False
    return True


@functools.cache
def _say_once(message: str) -> None:
    log.info(message)


def bf16_parity(model: nn.Module, images: torch.Tensor, *, k: int = 10, batch_size: int = 32,
                source: str = "") -> dict:
    """Embed ``images`` (model inputs) in fp32 and under bf16 autocast and compare: the smallest cosine
    between the two embeddings of one image, and how many of each image's ``k`` nearest neighbours among
    the samples (self excluded) bf16 recovers. Passed when they reach :data:`MIN_COSINE` and
    :data:`MIN_RECALL`; the img/s of each format on this machine are recorded beside them."""
    return bf16_parity_and_fp32(model, images, k=k, batch_size=batch_size, source=source)[0]


def bf16_parity_and_fp32(model: nn.Module, images: torch.Tensor, *, k: int = 10, batch_size: int = 32,
                         source: str = "") -> tuple[dict, np.ndarray]:
    """:func:`bf16_parity` and the fp32 embeddings it computed, for other checks on the same images (the
    export's INT8 gate) to compare against without embedding them again."""
    from cbir.models.inference import embed, prepare_for_inference

    # a copy in the layout extraction uses (channels-last), so the speeds are the ones extraction will see
    model = prepare_for_inference(copy.deepcopy(model), channels_last=True)
    outputs, seconds = {}, {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        embed(model, images[:2], channels_last=True, bf16=bf16)  # warm-up: first calls choose their kernels
        start = time.perf_counter()
        outputs[name] = torch.cat([embed(model, images[i:i + batch_size], channels_last=True, bf16=bf16)
                                   for i in range(0, len(images), batch_size)]).numpy()
        seconds[name] = time.perf_counter() - start
    exact, low = (unit_rows(outputs[name]) for name in ("fp32", "bf16"))
    cosine = (exact * low).sum(axis=1)
    k = max(1, min(k, len(images) - 1))
    recall = neighbour_overlap(nearest_others(exact, k), nearest_others(low, k)) if len(images) > 1 else 1.0
    result = {
        "images": len(images), "source": source, "k": k,
        "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()), "recall": float(recall),
        "min_cosine": MIN_COSINE, "min_recall": MIN_RECALL,
        "native_bf16_here": native_bf16("cpu"),
        "images_per_second": {name: round(len(images) / max(s, 1e-9), 1) for name, s in seconds.items()},
    }
    result["passed"] = bool(result["cosine_min"] >= MIN_COSINE and recall >= MIN_RECALL)
    return result, outputs["fp32"]


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit length (cosine = dot product)."""
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def nearest_others(vectors: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest other rows by dot product (itself excluded), best first; ties by position."""
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def neighbour_overlap(reference_top: np.ndarray, candidate_top: np.ndarray) -> float:
    """Mean fraction of each row's reference neighbours (:func:`nearest_others`) found among its candidate ones."""
    k = reference_top.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(reference_top, candidate_top)]))
