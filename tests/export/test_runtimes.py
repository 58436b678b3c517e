"""Runtimes (eager / compiled / ONNX / INT8): choosing one, the INT8 copy and its retrieval gate, and each
runtime's embeddings against the eager model's; a search through ONNX Runtime never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import compose_config
from helpers.data import write_class_images
from helpers.paths import ROOT

from cbir.devices import cpu_name
from cbir.errors import ConfigError
from cbir.export import int8 as int8_module
from cbir.export.bundle import Preprocessing, export_bundle, load_bundle
from cbir.export.int8 import retrieval_parity
from cbir.export.runtimes import resolve_runtime
from cbir.training.factory import build_embedder_from_config, model_config

SIZE = 32


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[list[np.ndarray], list[str]]:
    """96 small RGB pictures in 12 classes (8 each) and their labels."""
    from PIL import Image

    root = tmp_path_factory.mktemp("runtime_pictures")
    paths = write_class_images(root, num_classes=12, per_class=8, size=40, seed=3)
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths], [p.parent.name for p in paths]


def _model(backbone: str = "resnet18", pretrained: str = "none"):
    cfg = compose_config("train", [f"model={backbone}", f"model.pretrained={pretrained}", f"model.image_size={SIZE}",
                                   "head=gem", "head.dim=16"])
    torch.manual_seed(0)
    return build_embedder_from_config(cfg).eval(), model_config(cfg)


def _inputs(embedder, images) -> torch.Tensor:
    pre = Preprocessing(int(embedder.input_size), tuple(embedder.mean), tuple(embedder.std))
    return torch.from_numpy(pre.to_array(images))


@pytest.fixture(scope="module")
def int8_bundle(pictures, tmp_path_factory) -> Path:
    """A bundle with every runtime copy: a small ResNet-18, calibrated on 48 pictures, checked on the other 48
    (so few that one flipped neighbour is 2 points: the copy is kept within 5, a setting of its own)."""
    images, labels = pictures
    embedder, cfg = _model()
    inputs = _inputs(embedder, images)
    return export_bundle(embedder, tmp_path_factory.mktemp("int8") / "bundle", model_config=cfg,
                         runtimes=["torchscript", "onnx", "onnx-int8"], calibration_images=inputs[::2],
                         check_images=inputs[1::2], check_labels=labels[1::2], check_source="test pictures",
                         int8_max_drop=0.05)


def test_numpy_preprocessing_is_the_evaluation_transform(pictures):
    """The torch-free path (OpenCV resize + numpy normalise) gives the model the same input as albumentations."""
    from cbir.data.transforms import eval_transform

    images = pictures[0][:5] + [np.random.default_rng(0).integers(0, 256, (17, 53, 3), dtype=np.uint8)]
    pre = Preprocessing(SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    reference = torch.stack([eval_transform(SIZE, pre.mean, pre.std)(image=i)["image"] for i in images]).numpy()
    assert np.abs(pre.to_array(images) - reference).max() < 1e-5


def test_runtime_resolution():
    checked = {"parity": {"onnx": {"file": "model.onnx", "max_abs_difference": 1e-6}}}
    assert resolve_runtime("auto", checked, "cpu") == "onnx"
    assert resolve_runtime("auto", {"parity": {"onnx": {"skipped": "eager only"}}}, "cpu") == "eager"
    assert resolve_runtime("auto", checked, "cuda") == "eager"
    # no speeds measured on this CPU: eager where it would run bf16, ONNX Runtime where it would run fp32
    assert resolve_runtime("auto", checked, "cpu", eager_bf16=lambda: True) == "eager"
    assert resolve_runtime("auto", checked, "cpu", eager_bf16=lambda: True, one_shot=True) == "onnx"
    # measured here at export: the faster one
    here = {**checked, "speed": {"cpu": cpu_name(), "img_per_s": {"eager fp32": 900, "eager bf16": 1400, "onnx": 2200}}}
    assert resolve_runtime("auto", here, "cpu", eager_bf16=lambda: True) == "onnx"
    here["speed"]["img_per_s"]["onnx"] = 1000
    assert resolve_runtime("auto", here, "cpu", eager_bf16=lambda: True) == "eager"
    assert resolve_runtime("auto", here, "cpu", eager_bf16=lambda: False) == "onnx"
    elsewhere = {**here, "speed": {**here["speed"], "cpu": "another CPU x64"}}
    assert resolve_runtime("auto", elsewhere, "cpu", eager_bf16=lambda: False) == "onnx"
    assert resolve_runtime("compiled", checked, "cpu") == "compiled"
    with pytest.raises(ConfigError, match="onnx-int8.*no usable model.int8.onnx"):
        resolve_runtime("onnx-int8", checked, "cpu")
    dropped = {"parity": {**checked["parity"], "onnx-int8": {"passed": False, "reason": "P@1 fell"}}}
    with pytest.raises(ConfigError, match="P@1 fell"):
        resolve_runtime("onnx-int8", dropped, "cpu")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_runtime("onnx", checked, "cuda")
    with pytest.raises(ConfigError, match="choose from"):
        resolve_runtime("tensorrt", checked, "cpu")


def test_the_gate_passes_a_faithful_copy_and_rejects_a_broken_one():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 32))
    labels = np.repeat(np.arange(10), 8)
    reference = centres[labels] + 0.3 * rng.normal(size=(80, 32))
    close = reference + 1e-3 * rng.normal(size=reference.shape)
    assert retrieval_parity(reference, close, labels)["passed"]
    assert retrieval_parity(reference, close)["passed"]  # no labels: fp32's own neighbours are the truth
    broken = rng.normal(size=reference.shape)
    result = retrieval_parity(reference, broken, labels)
    assert not result["passed"] and result["basis"] == "labels" and result["drop"]["p_at_1"] > 0.5
    unlabelled = retrieval_parity(reference, broken)
    assert not unlabelled["passed"] and unlabelled["basis"] == "fp32 nearest neighbours"


def test_int8_copy_is_made_checked_and_recorded(int8_bundle, pictures):
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    entry = manifest["parity"]["onnx-int8"]
    assert entry["images"] == 48 and entry["calibration_images"] == 48 and entry["basis"] == "labels"
    speed = manifest["speed"]
    assert speed["cpu"] == cpu_name() and {"eager fp32", "eager bf16", "onnx", "onnx-int8"} <= set(speed["img_per_s"])
    assert all(ips > 0 for ips in speed["img_per_s"].values())
    assert set(entry["drop"]) == {"p_at_1", "r_at_10"}
    # only convolutions and matrix products are quantised: this model keeps its neighbours (min cosine ~0.997)
    assert entry["passed"] and entry["cosine_min"] > 0.99 and entry["max_drop"] == 0.05
    assert all(d <= entry["max_drop"] + 1e-9 for d in entry["drop"].values())
    assert (int8_bundle / "model.int8.onnx").is_file() and "model.int8.onnx" in manifest["files"]
    bundle = load_bundle(int8_bundle)
    images = pictures[0][:6]
    eager = bundle.encoder("eager", device="cpu", precision="fp32")(images)
    encode = bundle.encoder("onnx-int8", device="cpu")
    int8 = encode(images)
    assert encode.runtime == "onnx-int8" and int8.shape == eager.shape
    cosine = (eager * int8).sum(1) / np.linalg.norm(eager, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() > 0.99 and np.abs(int8 - eager).max() > 1e-5  # close, and really another model


def test_a_copy_that_fails_the_gate_is_not_kept(pictures, tmp_path, monkeypatch):
    """A deliberately broken INT8 copy (another model's graph) is measured, dropped, and the reason recorded."""
    images, labels = pictures
    embedder, cfg = _model()
    other, _ = _model("mobilenet_v2")

    def broken_quantiser(onnx_path, out_path, calibration, batch_size=16):
        torch.onnx.export(other, (torch.randn(2, 3, SIZE, SIZE),), str(out_path), input_names=["images"],
                          output_names=["embeddings"], dynamic_axes={"images": {0: "batch"}}, dynamo=False)

    monkeypatch.setattr(int8_module, "quantize_int8", broken_quantiser)
    inputs = _inputs(embedder, images)
    out = export_bundle(embedder, tmp_path / "bundle", model_config=cfg, runtimes=["onnx", "onnx-int8"],
                        calibration_images=inputs[::2], check_images=inputs[1::2], check_labels=labels[1::2])
    entry = json.loads((out / "manifest.json").read_text())["parity"]["onnx-int8"]
    assert entry["passed"] is False and "dropped more than 0.5 points" in entry["reason"]
    assert not (out / "model.int8.onnx").exists()
    with pytest.raises(ConfigError, match="dropped more than"):
        load_bundle(out).encoder("onnx-int8", device="cpu")


def test_without_calibration_images_there_is_no_int8_copy(tmp_path):
    embedder, cfg = _model()
    out = export_bundle(embedder, tmp_path / "bundle", model_config=cfg, runtimes=["onnx", "onnx-int8"])
    entry = json.loads((out / "manifest.json").read_text())["parity"]["onnx-int8"]
    assert "no calibration images" in entry["skipped"] and not (out / "model.int8.onnx").exists()


@pytest.mark.parametrize("runtime, tolerance", [("onnx", 1e-4), ("compiled", 1e-4)])
def test_each_runtime_embeds_as_eager(int8_bundle, pictures, runtime, tolerance):
    bundle = load_bundle(int8_bundle)
    images = pictures[0][:5]
    eager = bundle.encoder("eager", device="cpu", precision="fp32")(images)
    if runtime == "compiled":
        import torch._dynamo

        torch._dynamo.reset()
    encode = bundle.encoder(runtime, device="cpu", precision="fp32")
    assert encode.runtime == runtime
    assert np.abs(encode(images) - eager).max() < tolerance
    assert encode([]).shape == (0, bundle.embedding_dim)


def test_index_extraction_through_the_onnx_copy(int8_bundle, tiny_folder, tmp_path):
    from cbir.index import build_bundle_index

    bundle = load_bundle(int8_bundle)
    eager = build_bundle_index(bundle, tiny_folder, tmp_path / "eager", kind="flat", num_workers=0, precision="fp32",
                               runtime="eager", progress=False)
    onnx = build_bundle_index(bundle, tiny_folder, tmp_path / "onnx", kind="flat", num_workers=0, runtime="onnx",
                              progress=False)
    queries = bundle.encoder("eager", device="cpu", precision="fp32")([np.full((24, 24, 3), 90, np.uint8)])
    assert np.array_equal(eager.search(queries, 5)[1], onnx.search(queries, 5)[1])
    assert eager.info["model"] != onnx.info["model"]  # the index records which model (copy) made its vectors


def test_an_onnx_search_never_imports_torch(int8_bundle, tiny_folder, tmp_path):
    from cbir.index import build_bundle_index

    build_bundle_index(load_bundle(int8_bundle), tiny_folder, tmp_path / "index", kind="flat", num_workers=0,
                       progress=False)
    query = next(Path(tiny_folder).rglob("*.png"))
    script = (f"import sys; from cbir.commands.search import run_search, search_config; "
              f"r = run_search(search_config(['bundle={int8_bundle}', 'index={tmp_path / 'index'}', "
              f"'query={query}', 'json=true', 'k=3'])); "
              f"assert len(r[0]['hits']) == 3, r; assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_check_images_come_in_class_groups_and_calibration_images_apart():
    from cbir.commands.export import sample_positions

    labels = [f"c{i % 40}" for i in range(400)]  # 40 classes of 10
    check, calibration = sample_positions(labels, 64, 100)
    assert len(check) == 64 and len(calibration) == 100 and not set(check) & set(calibration)
    picked = [labels[p] for p in check]
    assert all(picked.count(label) >= 2 for label in picked)  # every check image has a same-class partner
    assert len(set(picked)) >= 20  # spread over many classes
    unlabelled_check, unlabelled_calibration = sample_positions([None] * 400, 64, 100)
    assert len(unlabelled_check) == 64 and len(unlabelled_calibration) == 100
    assert not set(unlabelled_check) & set(unlabelled_calibration)


def test_a_checkpoint_export_checks_and_calibrates_on_its_own_training_data(tiny_folder):
    """Without index.collection the export takes the run's training images (a user's folder here) as they ran."""
    from omegaconf import OmegaConf

    from cbir.commands.export import training_collection
    from cbir.configs import load_option

    data = OmegaConf.to_container(OmegaConf.merge(load_option("data", "folder"), {"root": str(tiny_folder)}))
    collection = training_collection({"data": data})
    assert collection is not None and collection.spec == "folder:train" and len(collection) > 0
    assert all(collection.source(int(i)).startswith(str(tiny_folder)) for i in collection.indices)
    missing = training_collection({"data": {**data, "root": str(tiny_folder / "gone")}})
    assert missing is None  # not readable here: the export falls back to synthetic check images, no INT8 copy
    assert training_collection(None) is None and training_collection({"data": {"name": "x"}}) is None
