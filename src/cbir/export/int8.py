"""The bundle's INT8 copy: ONNX Runtime static quantisation of ``model.onnx``, calibrated on real images,
kept only if retrieval does not suffer.

Static (not dynamic) quantisation: activations get fixed scales from a calibration pass over images like
the collection's, so convolutions run as integer kernels (VNNI/AMX on recent x86 CPUs) with no per-batch
range search; the ranges are percentiles of the calibration activations, not their extremes. Weights are
per-channel symmetric int8, activations uint8 (ONNX Runtime's fast U8S8 path on x86), in the QDQ format; only convolutions and matrix products are quantised — GeM's powers, the
normalisations and the L2 norm at the end are where 8 bits would cost accuracy and buy no speed.

The gate (:func:`retrieval_parity`) embeds held-out images — never the calibration ones — with both the
fp32 model and the INT8 copy and compares what a user would see: with labels, Precision@1 and Recall@10
among those images; without, whether each image's fp32 nearest neighbour is still the INT8 nearest
(P@1) and within its top 10 (R@10). Each may fall at most :data:`MAX_DROP` (0.5 points) below fp32's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cbir.models.precision import nearest_others, neighbour_overlap, unit_rows

log = logging.getLogger(__name__)

MAX_DROP = 0.005  # P@1 and R@10 of the INT8 copy may be at most this much (0.5 points) below fp32's
K = 10
CALIBRATION_PERCENTILE = 99.99  # activation ranges clip the rarest 0.01 %: one outlier must not coarsen every step
QUANTISED_OPS = ("Conv", "MatMul", "Gemm")  # the heavy kernels; pooling (GeM's powers), norms and the head stay fp32
MIN_LABELLED_QUERIES = 32  # label-based P@1/R@10 need this many check images with a same-class partner


def quantize_int8(onnx_path: str | Path, out_path: str | Path, calibration: np.ndarray, batch_size: int = 16) -> None:
    """Write the statically quantised copy of ``onnx_path`` to ``out_path``, calibrated on ``calibration``
    (model inputs, float32 N x 3 x H x W): activation ranges from the 99.99th percentile of what they saw
    (ResNet-50 on 600 emoji: P@1 51.5 / R@10 89.7 against fp32's 51.0 / 88.5; min-max ranges lost 0.7 R@10)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [np.ascontiguousarray(calibration[i:i + batch_size], np.float32)
               for i in range(0, len(calibration), batch_size)]

    class Reader(CalibrationDataReader):
        """The calibration batches, handed over one range at a time (``set_range``): ONNX Runtime then folds
        each batch's activations into its histograms before running the next, so memory holds one batch's
        activations (all 256 images of ResNet-50 at 224 px at once: > 12 GB)."""

        def __init__(self) -> None:
            self.remaining = iter(batches)
            self.input_name = _input_name(onnx_path)

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.remaining = iter(batches[start_index:end_index])

        def get_next(self):
            batch = next(self.remaining, None)
            return None if batch is None else {self.input_name: batch}

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:  # shape inference + folding helps the quantiser see every Conv/MatMul; optional
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - quantise the graph as it is
            log.info("int8: pre-processing the ONNX graph failed (%s); quantising it as exported", exc)
            prepared = Path(onnx_path)
        with contextlib.redirect_stdout(io.StringIO()):  # its calibrator prints progress lines for every batch
            quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(QUANTISED_OPS), calibrate_method=CalibrationMethod.Percentile,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           "CalibPercentile": CALIBRATION_PERCENTILE,
                                           "CalibStridedMinMax": 1})  # (any calibrator): one batch per collection


def _input_name(onnx_path: str | Path) -> str:
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name


def embed_in_batches(encode: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([np.asarray(encode(images[i:i + batch_size]), np.float32)
                           for i in range(0, len(images), batch_size)])


def retrieval_parity(reference: np.ndarray, candidate: np.ndarray, labels: Sequence | None = None,
                     k: int = K, max_drop: float = MAX_DROP) -> dict:
    """How the ``candidate`` embeddings (INT8) retrieve among themselves against ``reference`` (fp32), both
    (N, D) of the same held-out images, each image a query against the others. See the module docstring."""
    reference, candidate = unit_rows(reference), unit_rows(candidate)
    k = max(1, min(k, len(reference) - 1))
    ref_top, cand_top = nearest_others(reference, k), nearest_others(candidate, k)
    cosine = (reference * candidate).sum(axis=1)
    label_of = np.asarray([str(label) for label in labels]) if labels is not None else None
    # labels decide only where enough images have a same-class partner among the samples (else one flip
    # would swing P@1 by whole points): fp32's own neighbours are the answer otherwise
    known = (label_of is not None and not any(label is None for label in labels)
             and int(sum((label_of == label).sum() > 1 for label in label_of)) >= MIN_LABELLED_QUERIES)
    if known:
        scores = {name: _label_metrics(top, label_of, k) for name, top in (("fp32", ref_top), ("int8", cand_top))}
        basis = "labels"
    else:  # fp32's own nearest neighbour is the answer to find
        truth = ref_top[:, :1]
        scores = {"fp32": {"p_at_1": 1.0, f"r_at_{k}": 1.0},
                  "int8": {"p_at_1": float(np.mean(cand_top[:, 0] == truth[:, 0])),
                           f"r_at_{k}": float(np.mean((cand_top == truth).any(axis=1)))}}
        basis = "fp32 nearest neighbours"
    drops = {name: round(scores["fp32"][name] - scores["int8"][name], 6) for name in scores["fp32"]}
    return {
        "images": int(len(reference)), "basis": basis, "k": k, "fp32": scores["fp32"], "int8": scores["int8"],
        "drop": drops, "max_drop": float(max_drop),
        "neighbour_recall": neighbour_overlap(ref_top, cand_top),
        "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
        "passed": bool(all(drop <= max_drop + 1e-9 for drop in drops.values())),
    }


def _label_metrics(top: np.ndarray, labels: np.ndarray, k: int) -> dict:
    same = labels[top] == labels[:, None]
    has_positive = np.array([(labels == label).sum() > 1 for label in labels])
    if not has_positive.any():
        return {"p_at_1": 0.0, f"r_at_{k}": 0.0}
    same = same[has_positive]
    return {"p_at_1": float(same[:, 0].mean()), f"r_at_{k}": float(same.any(axis=1).mean())}

