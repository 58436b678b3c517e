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
"""

from __future__ import annotations

import json
import logging
import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cbir.errors import CbirError
from cbir.io import atomic_folder, atomic_write_json, sha256_file
from cbir.models.precision import bf16_parity

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RUNTIMES = ("torchscript", "onnx")
PARITY_TOLERANCE = 1e-3  # max |eager - copy| on L2-normalised embeddings
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

    def to_json(self) -> dict:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "query": self.query}

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        return cls(input_size=int(data["input_size"]), mean=tuple(data["mean"]), std=tuple(data["std"]),
                   resize=data.get("resize", cls.resize), query=data.get("query"))

    def transform(self):
        from cbir.data.transforms import eval_transform

        return eval_transform(self.input_size, self.mean, self.std)


@dataclass
class Bundle:
    """A loaded bundle: the eager Embedder (eval mode) plus what it needs to embed raw images."""

    path: Path
    embedder: nn.Module
    preprocessing: Preprocessing
    model_config: dict
    manifest: dict
    config: dict | None = None
    _transform: object = field(default=None, repr=False)

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
        return torch.stack([self.transform(image=image)["image"] for image in images])

    def embed(self, images: Sequence[np.ndarray], *, device: str | torch.device | None = None,
              bf16: bool = False, channels_last: bool = False) -> np.ndarray:
        """Float32 (N, D) embeddings of RGB uint8 images (no query preprocessing here: see Searcher)."""
        from cbir.models.inference import embed

        if not len(images):
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return embed(self.embedder, self.to_tensor(images), device=device, channels_last=channels_last,
                     bf16=bf16).cpu().numpy()

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
            return torch.jit.load(str(self._file("model.torchscript.pt")), map_location="cpu")
        if runtime == "onnx":
            import onnxruntime

            return onnxruntime.InferenceSession(str(self._file("model.onnx")), providers=["CPUExecutionProvider"])
        raise BundleError(f"unknown runtime {runtime!r}; choose from: {', '.join(RUNTIMES)}")

    def _file(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise BundleError(f"bundle {self.path} has no {name} (exported without it?)")
        return path


# -- export ----------------------------------------------------------------------------------------

def export_bundle(embedder: nn.Module, out_dir: str | Path, *, model_config: dict, config: dict | None = None,
                  query_preprocess: dict | list | str | None = None, runtimes: Sequence[str] = RUNTIMES,
                  tolerance: float = PARITY_TOLERANCE, sample_images: torch.Tensor | None = None,
                  source: str | None = None, overwrite: bool = False,
                  check_images: torch.Tensor | None = None, check_source: str = "") -> Path:
    """Write ``embedder`` as a bundle into ``out_dir`` (built in a temporary sibling folder and renamed,
    so a crash never leaves half a bundle). Each runtime copy is compared with the eager model on
    ``sample_images`` (default: random inputs of the model's size) and the export fails if the largest
    difference exceeds ``tolerance``. bf16 inference is compared with fp32 on ``check_images`` (model
    inputs, ideally real pictures named by ``check_source``; default: synthetic smooth colour fields) and
    the result goes into the manifest, where ``precision=auto`` reads it."""
    out_dir = Path(out_dir)
    check_bundle_target(out_dir, overwrite)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise BundleError(f"runtimes: unknown {unknown}; choose from: {', '.join(RUNTIMES)}")
    embedder = embedder.cpu().eval()
    preprocessing = Preprocessing(input_size=int(embedder.input_size), mean=tuple(embedder.mean),
                                  std=tuple(embedder.std), query=query_preprocess)
    if sample_images is None:
        generator = torch.Generator().manual_seed(0)
        size = preprocessing.input_size
        sample_images = torch.randn(4, 3, size, size, generator=generator)
    if check_images is None:
        check_images = synthetic_check_images(preprocessing)
        check_source = "synthetic smooth colour fields"

    with atomic_folder(out_dir) as staging:
        torch.save(embedder.state_dict(), staging / "weights.pt")
        _write_json(staging / "model.json", model_config)
        _write_json(staging / "preprocessing.json", preprocessing.to_json())
        if config is not None:
            from omegaconf import OmegaConf

            OmegaConf.save(OmegaConf.create(config), staging / "config.yaml")
        with torch.inference_mode():
            reference = embedder(sample_images).float()
        parity = {}
        for runtime in runtimes:
            parity[runtime] = _write_runtime_copy(runtime, embedder, staging, sample_images, reference, tolerance)
        bf16_check = bf16_parity(embedder, check_images, source=check_source)
        log.info("bf16 check on %d images (%s): min cosine %.5f, recall@%d %.3f → %s", bf16_check["images"],
                 check_source, bf16_check["cosine_min"], bf16_check["k"], bf16_check["recall"],
                 "precision=auto may use bf16" if bf16_check["passed"] else "precision=auto stays fp32")
        manifest = {
            "format_version": FORMAT_VERSION,
            "embedding_dim": int(reference.shape[1]),
            "backbone": model_config.get("backbone"),
            "source": source,
            "versions": _versions(),
            "parity": parity,
            "precision": {"bf16": bf16_check},
            "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()},
        }
        _write_json(staging / "manifest.json", manifest)
    return out_dir


def synthetic_check_images(preprocessing: Preprocessing, count: int = 64, seed: int = 0) -> torch.Tensor:
    """Model inputs for the bf16 check when no real pictures are at hand: smooth random colour fields
    (a few coarse colour cells blown up bilinearly, plus fine noise), normalised as real inputs are —
    unlike white noise they spread out in embedding space, so neighbour recall means something."""
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
    kwargs = dict(input_names=["images"], output_names=["embeddings"], opset_version=17)
    try:  # the TorchScript-based exporter: fast, quiet, and enough for these graphs
        torch.onnx.export(embedder, (example,), str(path), dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, **kwargs)
    except Exception as legacy_error:  # noqa: BLE001 - fall back to the torch.export-based exporter
        log.info("legacy ONNX export failed (%s); trying torch.export", legacy_error)
        torch.onnx.export(embedder, (example,), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), **kwargs)


# -- load ------------------------------------------------------------------------------------------

def load_bundle(path: str | Path) -> Bundle:
    """Restore a bundle written by :func:`export_bundle` (or ``zoo:<name>``, a model of the zoo): the eager
    Embedder in eval mode on CPU."""
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
    model_config = _read_json(path / "model.json")
    preprocessing = Preprocessing.from_json(_read_json(path / "preprocessing.json"))

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
    config = None
    if (path / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    return Bundle(path=path, embedder=embedder.eval(), preprocessing=preprocessing, model_config=model_config,
                  manifest=manifest, config=config)


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
