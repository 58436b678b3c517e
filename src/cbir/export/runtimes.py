"""Which engine turns images into embeddings: ``runtime=auto|eager|compiled|onnx|onnx-int8`` for extraction,
search and serving.

- ``eager``: the PyTorch Embedder (``precision=auto``: bf16 where the CPU/GPU has it natively), the reference.
- ``compiled``: ``torch.compile`` (inductor, weights frozen as constants) of the eager model: the fastest torch
  path for long extractions; compiling costs tens of seconds first.
- ``onnx``: ONNX Runtime on the bundle's ``model.onnx`` (checked against eager at export). Needs no torch:
  a search process that uses it starts in a fraction of the time.
- ``onnx-int8``: ONNX Runtime on ``model.int8.onnx``, statically quantised at export (:mod:`cbir.export.int8`)
  and kept only when its retrieval results stayed within :data:`cbir.export.int8.MAX_DROP` of fp32's.
- ``auto``: on a CPU with a checked ONNX copy, the faster of ``eager`` (at its ``precision``) and ``onnx`` as
  the export measured them on this CPU model — and always ``onnx`` for a one-shot search process, which
  then never imports torch; ``eager`` otherwise. INT8 is never chosen for you: its embeddings differ.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cbir.devices import cpu_name, cuda_available
from cbir.errors import ConfigError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "compiled", "onnx", "onnx-int8")
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}


def check_runtime(runtime: str) -> str:
    value = str(runtime).lower()
    if value not in RUNTIMES:
        raise ConfigError(f"runtime={runtime}: choose from {', '.join(RUNTIMES)}")
    return value


def runtime_copy_ok(manifest: dict, runtime: str) -> bool:
    """Whether the bundle's export wrote ``runtime``'s file and it passed its check."""
    entry = (manifest.get("parity") or {}).get(runtime) or {}
    return bool(entry.get("file")) and not entry.get("skipped") and entry.get("passed", True) is not False


def resolve_runtime(runtime: str, manifest: dict, device: str | None = None, bundle_path: str | os.PathLike = "", *,
                    eager_bf16: Callable[[], bool] | None = None, one_shot: bool = False) -> str:
    """``runtime`` made concrete for a bundle (its ``manifest``) on ``device``; a runtime whose copy the
    bundle lacks is a ConfigError that says why and what to do.

    ``auto``: on a GPU, or without a checked ONNX copy, ``eager``. On a CPU, ``onnx`` for a ``one_shot``
    process (a CLI search: importing torch would cost more than the queries); otherwise the faster of
    ``eager`` (at the precision ``eager_bf16()`` says it would run) and ``onnx`` as the export measured them
    on this CPU model, or — measured elsewhere — ``eager`` when it runs bf16, else ``onnx``."""
    runtime = check_runtime(runtime)
    on_cpu = str(device).startswith("cpu") if device else not cuda_available()  # None: CUDA when there is one
    if runtime == "auto":
        if not on_cpu or not runtime_copy_ok(manifest, "onnx"):
            return "eager"
        if one_shot:
            return "onnx"
        bf16 = bool(eager_bf16()) if eager_bf16 is not None else False
        speeds = measured_speeds(manifest)
        eager_speed, onnx_speed = speeds.get("eager bf16" if bf16 else "eager fp32"), speeds.get("onnx")
        if eager_speed and onnx_speed:
            return "eager" if eager_speed > onnx_speed else "onnx"
        return "eager" if bf16 else "onnx"
    if runtime in ONNX_FILES:
        if not on_cpu:
            raise ConfigError(f"runtime={runtime} runs on the CPU (ONNX Runtime's CPU provider); device={device}: "
                              "use runtime=eager or compiled on a GPU")
        if not runtime_copy_ok(manifest, runtime):
            entry = (manifest.get("parity") or {}).get(runtime) or {}
            why = entry.get("skipped") or entry.get("reason") or "the bundle was exported without it"
            raise ConfigError(f"runtime={runtime}: bundle {bundle_path} has no usable {ONNX_FILES[runtime]} ({why}); "
                              f"choose runtime=eager, or export again with runtimes including {runtime}")
    return runtime


def measured_speeds(manifest: dict) -> dict[str, float]:
    """img/s of each runtime as the export measured them, if it ran on this CPU model (else empty)."""
    speed = manifest.get("speed") or {}
    return dict(speed.get("img_per_s") or {}) if speed.get("cpu") == cpu_name() else {}


def measure_speed(encode: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch_size: int = 32,
                  passes: int = 2) -> float:
    """img/s of ``encode`` over ``inputs`` in batches (best of ``passes``, after one warm-up batch)."""
    import time

    encode(inputs[:batch_size])
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for i in range(0, len(inputs), batch_size):
            encode(inputs[i:i + batch_size])
        best = min(best, time.perf_counter() - start)
    return round(len(inputs) / max(best, 1e-9), 1)


def session_threads() -> int:
    """Intra-op threads for an ONNX Runtime session: ``$OMP_NUM_THREADS`` when set (as torch honours it),
    else the cores this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session over ``path`` with full graph optimisation."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or session_threads()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's business
    # idle workers sleep instead of spinning: they share the cores with torch, decoding and the service's threads
    # (spinning measured 2-5 % faster alone, and slowed whatever ran next to it by up to 2x)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """Model inputs (float32 N x 3 x H x W, normalised) → float32 (N, D) embeddings through one ONNX file.
    The session opens on first use and is shared by threads (ONNX Runtime's ``run`` is thread-safe); the
    object pickles as its path, so spawned extraction ranks open their own."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path, self.threads = Path(path), threads
        self._session = None
        self._lock = threading.Lock()

    @property
    def session(self):
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = onnx_session(self.path, self.threads)
        return self._session

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        session = self.session
        return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(batch, np.float32)})[0]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def __getstate__(self) -> dict:
        return {"path": self.path, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["threads"])
