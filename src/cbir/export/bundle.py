"""A trained model as a self-contained folder: weights, the exact preprocessing, the config, a manifest,
and TorchScript/ONNX copies checked against the eager model. ``load_bundle`` restores it without the
training config or Hydra composition.

Layout::

    bundle/
      manifest.json        format version, versions of cbir/torch/..., embedding dim, files + sha256,
                           parity of each runtime copy against the eager model, and of bf16 against
                           fp32 (what ``precision=auto`` reads)
      model.json           what rebuilds the Embedder (backbone, head, input size, scales)
      preprocessing.json   input size, mean/std, resize policy, query preprocessing
      weights.pt           Embedder state dict (no loss/proxy parameters)
      config.yaml          the training run's resolved config, when known
      model.torchscript.pt traced Embedder (eval mode)
      model.onnx           ONNX graph, dynamic batch
      model.int8.onnx      its INT8 copy (statically quantised, calibrated on collection images), when it
                           passed the retrieval check (:mod:`cbir.export.int8`)

Loading a bundle reads its JSON files and checks its checksums; the PyTorch model is built the first time
``bundle.embedder`` is asked for, so ``runtime=onnx`` searches never import torch.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cbir.devices import cpu_name
from cbir.errors import CbirError
from cbir.export.runtimes import ONNX_FILES, OnnxEncoder, measure_speed, resolve_runtime
from cbir.io import atomic_folder, atomic_write_json, sha256_file

if TYPE_CHECKING:  # torch is imported where a function needs it: loading a bundle for ONNX Runtime does not
    import torch
    from torch import nn

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RUNTIMES = ("torchscript", "onnx", "onnx-int8")  # runtime copies an export can write
DEFAULT_RUNTIMES = ("torchscript", "onnx")  # export_bundle's default (export.py adds onnx-int8 where it has images)
PARITY_TOLERANCE = 1e-3  # max |eager - copy| on L2-normalised embeddings
SPEED_IMAGES = 128  # the ONNX copies' img/s (what runtime=auto compares) is measured on this many check images
RERANKER_FILE = "reranker.pt"  # optional: the learned pairwise re-ranker
_REQUIRED = ("manifest.json", "model.json", "preprocessing.json", "weights.pt")


class BundleError(CbirError):
    """A bundle folder is missing, incomplete, or was written by an incompatible version."""


@dataclass
class Preprocessing:
    """Everything between an RGB uint8 image and the model's input tensor."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "stretch to input_size x input_size, bilinear (albumentations Resize)"
    query: dict | list | str | None = None  # query clean-up (cbir.preprocess), applied to queries only
    auto: dict | None = None  # `auto`'s thresholds fitted to the model's domain (cbir.preprocess.calibrate)

    def to_json(self) -> dict:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "query": self.query, "auto": self.auto}

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        return cls(input_size=int(data["input_size"]), mean=tuple(data["mean"]), std=tuple(data["std"]),
                   resize=data.get("resize", cls.resize), query=data.get("query"), auto=data.get("auto"))

    @property
    def auto_params(self) -> dict | None:
        """The fitted ``auto`` thresholds, which fill in every ``auto`` step that a query spec leaves unset."""
        return (self.auto or {}).get("params")

    def query_preprocessor(self, spec=None):
        """The query clean-up of ``spec`` (None: the bundle's own), ``auto`` steps with this domain's thresholds."""
        from cbir.preprocess import build_preprocessor

        return build_preprocessor(self.query if spec is None else spec, auto=self.auto_params)

    def transform(self):
        from cbir.data.transforms import eval_transform

        return eval_transform(self.input_size, self.mean, self.std)

    def to_array(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Float32 (N, 3, S, S) model inputs of RGB uint8 images: the same bilinear resize and normalisation
        as :meth:`transform` (albumentations ``Resize`` + ``Normalize``) in OpenCV and numpy, without torch."""
        import cv2

        size = self.input_size
        mean = np.asarray(self.mean, np.float32) * 255.0
        scale = 1.0 / (np.asarray(self.std, np.float32) * 255.0)
        out = np.empty((len(images), 3, size, size), np.float32)
        for row, image in enumerate(images):
            if image.shape[:2] != (size, size):
                image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
            out[row] = ((image.astype(np.float32) - mean) * scale).transpose(2, 0, 1)
        return out


@dataclass
class Bundle:
    """A loaded bundle: what it needs to embed raw images, and the eager Embedder (eval mode), built from
    ``weights.pt`` the first time :attr:`embedder` is used."""

    path: Path
    preprocessing: Preprocessing
    model_config: dict
    manifest: dict
    config: dict | None = None
    _embedder: object = field(default=None, repr=False)
    _transform: object = field(default=None, repr=False)
    _lock: object = field(default_factory=threading.Lock, repr=False)

    @property
    def embedder(self) -> nn.Module:
        if self._embedder is None:
            with self._lock:
                if self._embedder is None:
                    self._embedder = _load_embedder(self.path, self.model_config)
        return self._embedder

    @property
    def has_reranker(self) -> bool:
        return (self.path / RERANKER_FILE).is_file()

    def reranker(self):
        """The bundle's pairwise re-ranker (:mod:`cbir.models.pairwise`) and its file's fields; BundleError
        when the bundle has none."""
        if not self.has_reranker:
            raise BundleError(f"bundle {self.path} has no pairwise re-ranker: train one (`python train.py "
                              "stage=reranker reranker.embedder=<run>`) and export with reranker=<its folder>")
        from cbir.models.pairwise import load_reranker

        return load_reranker(self.path / RERANKER_FILE)

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    @property
    def transform(self):
        """image (H, W, 3 uint8 RGB) → normalised CHW float tensor, exactly as in evaluation."""
        if self._transform is None:
            self._transform = self.preprocessing.transform()
        return self._transform

    def to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        import torch

        return torch.stack([self.transform(image=image)["image"] for image in images])

    def embed(self, images: Sequence[np.ndarray], *, device: str | torch.device | None = None,
              bf16: bool = False, channels_last: bool = False) -> np.ndarray:
        """Float32 (N, D) embeddings of RGB uint8 images by the eager model (no query preprocessing here:
        see Searcher)."""
        from cbir.models.inference import embed

        if not len(images):
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return embed(self.embedder, self.to_tensor(images), device=device, channels_last=channels_last,
                     bf16=bf16).cpu().numpy()

    def encoder(self, runtime: str = "eager", *, device: str | None = None, precision: str = "auto",
                one_shot: bool = False):
        """``images → (N, D) float32`` for ``runtime`` (:mod:`cbir.export.runtimes`; ``auto`` resolved here,
        ``one_shot``: for a process that embeds a few queries and exits). The callable carries ``runtime``
        (the one chosen) and ``bf16`` (eager/compiled under bf16)."""
        chosen = self.resolve_runtime(runtime, device, precision, one_shot=one_shot)
        bf16 = False
        if chosen in ONNX_FILES:
            session = OnnxEncoder(self.path / ONNX_FILES[chosen])

            def run(images: Sequence[np.ndarray]) -> np.ndarray:
                return session(self.preprocessing.to_array(images))
        else:
            from cbir.models.inference import embed, prepare_for_inference

            bf16 = self.use_bf16(precision, device)
            model = prepare_for_inference(self.embedder, device=device, compile=chosen == "compiled")

            def run(images: Sequence[np.ndarray]) -> np.ndarray:
                return embed(model, self.to_tensor(images), device=device, bf16=bf16).cpu().numpy()

        def encode(images: Sequence[np.ndarray]) -> np.ndarray:
            return run(images) if len(images) else np.zeros((0, self.embedding_dim), dtype=np.float32)

        encode.runtime, encode.bf16 = chosen, bf16
        return encode

    def module_for(self, runtime: str = "eager", device: str | None = None, precision: str = "auto") -> nn.Module:
        """The model index extraction and evaluation run: the eager Embedder (also for ``compiled``, which the
        extraction compiles itself), or an ONNX copy behind the same interface."""
        chosen = self.resolve_runtime(runtime, device, precision)
        if chosen not in ONNX_FILES:
            return self.embedder
        from cbir.export.onnx_module import OnnxEmbedder

        return OnnxEmbedder(OnnxEncoder(self.path / ONNX_FILES[chosen]), input_size=self.input_size,
                            mean=self.preprocessing.mean, std=self.preprocessing.std,
                            embedding_dim=self.embedding_dim, runtime=chosen)

    def resolve_runtime(self, runtime: str, device: str | None = None, precision: str = "auto", *,
                        one_shot: bool = False) -> str:
        """``runtime`` made concrete for this bundle (:func:`cbir.export.runtimes.resolve_runtime`)."""
        return resolve_runtime(runtime, self.manifest, device, self.path, one_shot=one_shot,
                               eager_bf16=lambda: self.use_bf16(precision, device))

    @property
    def bf16_parity(self) -> dict | None:
        """The export's bf16-vs-fp32 check (:func:`cbir.models.precision.bf16_parity`); None for bundles
        exported before it existed."""
        return (self.manifest.get("precision") or {}).get("bf16")

    def use_bf16(self, precision: str = "auto", device: str | torch.device | None = None) -> bool:
        """``precision`` (auto | fp32 | bf16) resolved for this bundle on ``device``."""
        from cbir.models.precision import use_bf16

        return use_bf16(precision, device, self.bf16_parity)

    def runtime_copy(self, runtime: str):
        """The TorchScript module, or an ONNX Runtime session, as saved in the bundle."""
        if runtime == "torchscript":
            import torch

            return torch.jit.load(str(self._file("model.torchscript.pt")), map_location="cpu")
        if runtime in ONNX_FILES:
            import onnxruntime

            return onnxruntime.InferenceSession(str(self._file(ONNX_FILES[runtime])), providers=["CPUExecutionProvider"])
        raise BundleError(f"unknown runtime {runtime!r}; choose from: {', '.join(RUNTIMES)}")

    def _file(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise BundleError(f"bundle {self.path} has no {name} (exported without it?)")
        return path


# -- export ----------------------------------------------------------------------------------------

def export_bundle(embedder: nn.Module, out_dir: str | Path, *, model_config: dict, config: dict | None = None,
                  query_preprocess: dict | list | str | None = None, runtimes: Sequence[str] = DEFAULT_RUNTIMES,
                  tolerance: float = PARITY_TOLERANCE, sample_images: torch.Tensor | None = None,
                  source: str | None = None, overwrite: bool = False,
                  check_images: torch.Tensor | None = None, check_source: str = "",
                  check_labels: Sequence | None = None, calibration_images: torch.Tensor | None = None,
                  int8_max_drop: float | None = None, reranker: str | Path | None = None,
                  auto_calibration: dict | None = None) -> Path:
    """Write ``embedder`` as a bundle into ``out_dir`` (built in a temporary sibling folder and renamed,
    so a crash never leaves half a bundle). Each runtime copy is compared with the eager model on
    ``sample_images`` (default: random inputs of the model's size) and the export fails if the largest
    difference exceeds ``tolerance``. bf16 inference is compared with fp32 on ``check_images`` (model
    inputs, ideally real pictures named by ``check_source``; default: synthetic smooth colour fields) and
    the result goes into the manifest, where ``precision=auto`` reads it.

    ``onnx-int8`` in ``runtimes`` quantises the ONNX copy, calibrated on ``calibration_images`` (model inputs,
    not the check images), and keeps it only if its retrieval on the check images (``check_labels`` when
    known) stays within ``int8_max_drop`` (default :data:`cbir.export.int8.MAX_DROP`, 0.5 points) of fp32's;
    without calibration images it is skipped.
    Either way the manifest says what happened.

    ``reranker``: a pairwise re-ranker file (``train.py stage=reranker``) trained on this very model, copied in as
    ``reranker.pt`` (``Searcher(..., rerank="pairwise")`` uses it).

    ``auto_calibration``: :func:`cbir.preprocess.calibrate.fit_auto` of the model's training images, stored with
    the preprocessing so that ``auto`` query clean-up uses thresholds fitted to this domain."""
    import torch

    from cbir.models.precision import bf16_parity_and_fp32

    out_dir = Path(out_dir)
    check_bundle_target(out_dir, overwrite)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise BundleError(f"runtimes: unknown {unknown}; choose from: {', '.join(RUNTIMES)}")
    if "onnx-int8" in runtimes and "onnx" not in runtimes:
        raise BundleError("runtimes: onnx-int8 is made from the ONNX copy; list onnx too")
    embedder = embedder.cpu().eval()
    reranker_file = _checked_reranker(reranker, embedder) if reranker else None
    preprocessing = Preprocessing(input_size=int(embedder.input_size), mean=tuple(embedder.mean),
                                  std=tuple(embedder.std), query=query_preprocess, auto=auto_calibration)
    if auto_calibration is not None:
        preprocessing.query_preprocessor("auto")  # fitted values that Auto refuses fail here, not at query time
    if sample_images is None:
        generator = torch.Generator().manual_seed(0)
        size = preprocessing.input_size
        sample_images = torch.randn(4, 3, size, size, generator=generator)
    if check_images is None:
        check_images = synthetic_check_images(preprocessing)
        check_source, check_labels = "synthetic smooth colour fields", None

    with atomic_folder(out_dir) as staging:
        torch.save(embedder.state_dict(), staging / "weights.pt")
        if reranker_file is not None:
            shutil.copyfile(reranker_file, staging / RERANKER_FILE)
        _write_json(staging / "model.json", model_config)
        _write_json(staging / "preprocessing.json", preprocessing.to_json())
        if config is not None:
            from omegaconf import OmegaConf

            OmegaConf.save(OmegaConf.create(config), staging / "config.yaml")
        with torch.inference_mode():
            reference = embedder(sample_images).float()
        # one fp32 pass over the check images serves the bf16 check and the INT8 gate
        bf16_check, check_reference = bf16_parity_and_fp32(embedder, check_images, source=check_source)
        parity = {}
        for runtime in runtimes:
            if runtime == "onnx-int8":
                parity[runtime] = _write_int8_copy(staging, parity.get("onnx") or {}, calibration_images, check_images,
                                                   check_reference, check_labels, check_source, int8_max_drop)
            else:
                parity[runtime] = _write_runtime_copy(runtime, embedder, staging, sample_images, reference, tolerance)
        log.info("bf16 check on %d images (%s): min cosine %.5f, recall@%d %.3f → %s", bf16_check["images"],
                 check_source, bf16_check["cosine_min"], bf16_check["k"], bf16_check["recall"],
                 "precision=auto may use bf16" if bf16_check["passed"] else "precision=auto stays fp32")
        speeds = {f"eager {name}": ips for name, ips in (bf16_check.get("images_per_second") or {}).items()}
        for runtime in ("onnx", "onnx-int8"):
            if (parity.get(runtime) or {}).get("file"):
                speeds[runtime] = measure_speed(OnnxEncoder(staging / parity[runtime]["file"]),
                                                check_images[:SPEED_IMAGES].numpy())
        log.info("speed here (%s; eager on %d check images, ONNX on %d): %s", cpu_name(), len(check_images),
                 min(len(check_images), SPEED_IMAGES), ", ".join(f"{name} {ips:g} img/s" for name, ips in speeds.items()))
        manifest = {
            "format_version": FORMAT_VERSION,
            "embedding_dim": int(reference.shape[1]),
            "backbone": model_config.get("backbone"),
            "source": source,
            "versions": _versions(),
            "parity": parity,
            "precision": {"bf16": bf16_check},
            # what runtime=auto compares (on a machine with the same CPU model): batch 32, the check images
            "speed": {"cpu": cpu_name(), "batch": 32, "images": int(len(check_images)), "img_per_s": speeds},
            "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()},
        }
        _write_json(staging / "manifest.json", manifest)
    return out_dir


def _checked_reranker(path: str | Path, embedder: nn.Module) -> Path:
    """The re-ranker file behind ``path``, refused unless it was trained on ``embedder`` (a WiSE-FT trunk, or
    another run's, gives it feature maps it never saw)."""
    from cbir.models.pairwise import check_embedder, load_reranker

    try:
        _, info = load_reranker(path)
        check_embedder(info, embedder)
    except CbirError as exc:
        raise BundleError(f"reranker: {exc}") from None
    return Path(info["path"])


def _write_int8_copy(folder: Path, onnx_entry: dict, calibration: torch.Tensor | None, check_images: torch.Tensor,
                     reference: np.ndarray, check_labels: Sequence | None, check_source: str,
                     max_drop: float | None = None) -> dict:
    """Quantise ``model.onnx`` into ``model.int8.onnx`` and keep it only if it passes the retrieval check
    (:func:`cbir.export.int8.retrieval_parity`) against ``reference``, the fp32 embeddings of ``check_images``;
    the manifest entry says what was measured, or why not."""
    from cbir.export.int8 import MAX_DROP, embed_in_batches, quantize_int8, retrieval_parity

    if not onnx_entry.get("file"):
        return {"skipped": "no ONNX copy to quantise (" + str(onnx_entry.get("skipped", "not exported")) + ")"}
    if calibration is None or len(calibration) < 8:
        return {"skipped": "no calibration images (export with index.collection=... or int8_calibration=...)"}
    path = folder / ONNX_FILES["onnx-int8"]
    try:
        quantize_int8(folder / onnx_entry["file"], path, calibration.numpy())
    except Exception as exc:  # noqa: BLE001 - the fp32 bundle is still good; say why there is no INT8 copy
        path.unlink(missing_ok=True)
        log.warning("int8: quantisation failed (%s); the bundle has no INT8 copy", exc)
        return {"skipped": f"quantisation failed: {str(exc).splitlines()[0][:200]}"}
    int8 = embed_in_batches(OnnxEncoder(path), check_images.numpy())
    check = retrieval_parity(reference, int8, check_labels, max_drop=MAX_DROP if max_drop is None else float(max_drop))
    check.update(source=check_source, calibration_images=int(len(calibration)))
    verdict = "kept" if check["passed"] else "dropped"
    log.info("int8 copy on %d held-out images (%s, %s): P@1 %.4f vs fp32 %.4f, R@%d %.4f vs %.4f, min cosine %.4f → %s",
             check["images"], check_source, check["basis"], check["int8"]["p_at_1"], check["fp32"]["p_at_1"],
             check["k"], check["int8"][f"r_at_{check['k']}"], check["fp32"][f"r_at_{check['k']}"],
             check["cosine_min"], verdict)
    if check["passed"]:
        check["file"] = path.name
    else:
        path.unlink()
        check["reason"] = (f"retrieval dropped more than {100 * check['max_drop']:.1f} points against fp32 "
                           f"({check['drop']})")
    return check


def synthetic_check_images(preprocessing: Preprocessing, count: int = 64, seed: int = 0) -> torch.Tensor:
    """Model inputs for the bf16 check when no real pictures are at hand: smooth random colour fields
    (a few coarse colour cells blown up bilinearly, plus fine noise), normalised as real inputs are —
    unlike white noise they spread out in embedding space, so neighbour recall means something."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    size = preprocessing.input_size
    cells = torch.randint(2, 9, (count,), generator=generator)
    images = [torch.nn.functional.interpolate(torch.rand(1, 3, int(c), int(c), generator=generator), size=(size, size),
                                              mode="bilinear", align_corners=False)[0] for c in cells]
    pixels = (torch.stack(images) + 0.05 * torch.randn(count, 3, size, size, generator=generator)).clamp(0, 1)
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def check_bundle_target(out_dir: Path, overwrite: bool) -> None:
    """``out`` must be a new or empty folder; with ``overwrite``, also a folder that holds a bundle (its
    ``manifest.json``) — never a file or a folder of someone else's files, which overwriting would delete."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"out={out_dir}: is a file, not a folder; choose a folder path for the bundle")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise BundleError(f"out={out_dir}: folder exists and is not empty (choose another, or overwrite=true to "
                          "replace the bundle in it)")
    if not (out_dir / "manifest.json").is_file():
        raise BundleError(f"out={out_dir}: overwrite=true replaces only a bundle folder, and this one holds no "
                          "manifest.json: its files are not a bundle and are left alone; choose another folder")


def _write_runtime_copy(runtime: str, embedder: nn.Module, folder: Path, sample: torch.Tensor,
                        reference: torch.Tensor, tolerance: float) -> dict:
    """Save one runtime copy, run it on ``sample`` (and on a different batch size, to prove the batch
    axis is dynamic), and return the largest difference from the eager model."""
    import torch

    if getattr(embedder, "scriptable", True) is False:
        return {"skipped": f"{type(embedder).__name__} has no graph to export (eager only)"}
    example = sample[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if runtime == "torchscript":
            with torch.inference_mode(False), torch.no_grad():
                traced = torch.jit.trace(embedder, example, check_trace=False)
            path = folder / "model.torchscript.pt"
            traced.save(str(path))
            with torch.no_grad():
                output = torch.jit.load(str(path))(sample).float()
        else:
            path = folder / "model.onnx"
            _export_onnx(embedder, example, path)
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            output = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: sample.numpy()})[0])
    difference = float((output - reference).abs().max())
    if not difference <= tolerance:
        raise BundleError(f"{runtime} copy differs from the eager model by {difference:.2e} "
                          f"(> tolerance {tolerance:g}); export with runtimes excluding {runtime}")
    log.info("%s copy: max |difference| to eager = %.2e on %d samples", runtime, difference, len(sample))
    return {"file": path.name, "max_abs_difference": difference, "samples": len(sample), "tolerance": tolerance}


def _export_onnx(embedder: nn.Module, example: torch.Tensor, path: Path) -> None:
    import torch

    kwargs = dict(input_names=["images"], output_names=["embeddings"], opset_version=17)
    try:  # the TorchScript-based exporter: fast, quiet, and enough for these graphs
        torch.onnx.export(embedder, (example,), str(path), dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, **kwargs)
    except Exception as legacy_error:  # noqa: BLE001 - fall back to the torch.export-based exporter
        log.info("legacy ONNX export failed (%s); trying torch.export", legacy_error)
        torch.onnx.export(embedder, (example,), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), **kwargs)


# -- load ------------------------------------------------------------------------------------------

def load_bundle(path: str | Path, *, lazy: bool = False) -> Bundle:
    """Restore a bundle written by :func:`export_bundle` (or ``zoo:<name>``, a model of the zoo): its files
    checked against the manifest, and the eager Embedder in eval mode on CPU — built now, or with ``lazy``
    the first time ``bundle.embedder`` is used (an ONNX Runtime search never needs it, nor torch)."""
    from cbir.zoo import is_zoo_name, zoo_bundle_path

    path = zoo_bundle_path(str(path)) if is_zoo_name(path) else Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle: {path} is not a folder (export one with `python export.py ckpt_path=... out=...`)")
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise BundleError(f"bundle: {path} is not a complete cbir bundle (missing {', '.join(missing)})")
    manifest = _read_json(path / "manifest.json")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle: {path} has format version {version}; this cbir reads version {FORMAT_VERSION}")
    for name, expected in (manifest.get("files") or {}).items():
        if name.endswith((".pt", ".onnx")) and (path / name).is_file() and sha256_file(path / name) != expected:
            raise BundleError(f"bundle: {path / name} does not match the checksum in manifest.json "
                              "(modified or damaged after export; export the bundle again)")
    config = None
    if (path / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    bundle = Bundle(path=path, preprocessing=Preprocessing.from_json(_read_json(path / "preprocessing.json")),
                    model_config=_read_json(path / "model.json"), manifest=manifest, config=config)
    if not lazy:
        bundle.embedder  # noqa: B018 - build it now, so a bad weights file is reported by load_bundle
    return bundle


def _load_embedder(path: Path, model_config: dict) -> nn.Module:
    """The eager Embedder of the bundle at ``path`` (eval mode, CPU)."""
    import torch

    from cbir.models.from_config import embedder_from_model_config

    embedder = embedder_from_model_config(model_config, pretrained="none")
    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged user file
        raise BundleError(f"bundle: cannot read {path / 'weights.pt'}: {exc}") from None
    result = embedder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BundleError(f"bundle: {path / 'weights.pt'} does not fit model.json "
                          f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return embedder.eval()


# -- helpers ---------------------------------------------------------------------------------------

def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("cbir", "torch", "torchvision", "pytorch-metric-learning", "faiss-cpu", "onnx", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _write_json(path: Path, data) -> None:
    atomic_write_json(path, data, indent=2)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle: cannot read {path}: {exc}") from None
