"""Model bundles: export, parity of the TorchScript/ONNX copies, round trip, and damaged bundles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import compose_config, tiny_train_overrides
from helpers.paths import ROOT

from cbir import load_bundle
from cbir.commands.train import train
from cbir.export.bundle import BundleError, export_bundle
from cbir.models.checkpoint import load_checkpoint_model
from cbir.training.factory import build_embedder_from_config, model_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_folder, tmp_path_factory) -> Path:
    """A real training checkpoint (one short epoch, fusion head) of a tiny model."""
    out = tmp_path_factory.mktemp("bundle_run")
    cfg = compose_config("train", tiny_train_overrides(tiny_folder, out) + [
        "model=resnet18", "head=fusion", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "test_after_fit=false"])
    train(cfg)
    return next((out / "checkpoints").glob("best-*.ckpt"))


def _embedder(head: str = "gem", extra: list[str] | None = None):
    cfg = compose_config("train", ["model=resnet18", "model.pretrained=none", "model.image_size=32",
                                   f"head={head}", "head.dim=16", *(extra or [])])
    return build_embedder_from_config(cfg), model_config(cfg)


@pytest.mark.parametrize("head", ["gem", "dolg"])
def test_round_trip_and_runtime_parity(head, tmp_path):
    embedder, model_cfg = _embedder(head)
    out = export_bundle(embedder, tmp_path / "bundle", model_config=model_cfg, query_preprocess={"steps": []})
    bundle = load_bundle(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embedding_dim"] == bundle.embedding_dim == 16
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0] or manifest["versions"]["torch"]
    for runtime in ("torchscript", "onnx"):
        assert manifest["parity"][runtime]["max_abs_difference"] <= 1e-3

    images = torch.randn(3, 3, 32, 32)  # another batch size than the export's sample: dynamic batch axis
    with torch.inference_mode():
        eager = embedder.eval()(images)
        restored = bundle.embedder(images)
    assert torch.allclose(eager, restored, atol=1e-6)
    with torch.no_grad():
        scripted = bundle.runtime_copy("torchscript")(images)
    assert torch.allclose(eager, scripted, atol=1e-4)
    session = bundle.runtime_copy("onnx")
    onnx_out = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    assert np.abs(onnx_out - eager.numpy()).max() < 1e-4
    assert bundle.preprocessing.query == {"steps": []}


@pytest.mark.parametrize("pooling", ["cls", "gem"])
def test_a_vit_bundle_exports_and_its_runtime_copies_agree(pooling, tmp_path):
    cfg = compose_config("train", ["model=dinov2_vits14", "model.pretrained=none", "model.image_size=28",
                                   f"model.pooling={pooling}", "head=fusion", "head.dim=16"])
    embedder, model_cfg = build_embedder_from_config(cfg), model_config(cfg)
    out = export_bundle(embedder, tmp_path / "bundle", model_config=model_cfg, query_preprocess={"steps": []})
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"torchscript", "onnx"} <= set(manifest["parity"])
    assert all(manifest["parity"][r]["max_abs_difference"] <= 1e-3 for r in ("torchscript", "onnx"))
    bundle = load_bundle(out)
    assert model_cfg["pooling"] == pooling and bundle.embedder.backbone.pooling == pooling
    images = torch.randn(2, 3, 42, 42)  # another size: the position table is interpolated in every copy
    with torch.inference_mode():
        eager = embedder.eval()(images)
        restored = bundle.embedder(images)
    assert torch.allclose(eager, restored, atol=1e-6)


def test_embed_uses_the_exact_evaluation_preprocessing(tmp_path):
    from cbir.data.transforms import eval_transform

    embedder, model_cfg = _embedder()
    bundle = load_bundle(export_bundle(embedder, tmp_path / "b", model_config=model_cfg, runtimes=[]))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(3)]
    transform = eval_transform(32, embedder.mean, embedder.std)
    expected = embedder.eval()(torch.stack([transform(image=im)["image"] for im in images])).detach().numpy()
    got = bundle.embed(images)
    assert got.dtype == np.float32 and got.shape == (3, 16)
    assert np.allclose(got, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_checkpoint_bundle_excludes_training_state(tiny_checkpoint, tmp_path):
    embedder, model_cfg = load_checkpoint_model(tiny_checkpoint)
    out = export_bundle(embedder, tmp_path / "b", model_config=model_cfg, runtimes=["torchscript"])
    state = torch.load(out / "weights.pt", weights_only=True)
    assert state and all(not key.startswith(("loss_fn.", "embedder.")) for key in state)
    assert set(state) == set(embedder.state_dict())
    assert json.loads((out / "model.json").read_text())["head"]["_target_"].endswith("FusionHead")


def test_export_entry_point_writes_a_bundle(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    run = subprocess.run([sys.executable, str(ROOT / "export.py"), f"ckpt_path={tiny_checkpoint}", f"out={out}",
                          f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "torchscript" in run.stdout and "onnx" in run.stdout
    bundle = load_bundle(out)
    assert bundle.config is not None and bundle.config["data"]["name"] == "folder"  # the run's own config
    assert "checkpoint" in bundle.manifest["source"]


def test_bundle_records_its_bf16_check_and_auto_follows_it(tmp_path, monkeypatch):
    """precision=auto reads the export's bf16-vs-fp32 check from the manifest: bf16 only where the device has
    native bf16 and the check passed; a bundle from before the check (no record) stays fp32."""
    from cbir.models import precision

    embedder, model_cfg = _embedder()
    bundle = load_bundle(export_bundle(embedder, tmp_path / "bundle", model_config=model_cfg, runtimes=[]))
    check = bundle.bf16_parity
    assert check["source"] == "synthetic smooth colour fields" and check["images"] == 64
    assert {"cosine_min", "recall", "passed", "images_per_second"} <= set(check)
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert bundle.use_bf16("auto") is check["passed"]
    assert bundle.use_bf16("fp32") is False and bundle.use_bf16("bf16") is True
    bundle.manifest["precision"]["bf16"]["passed"] = True
    assert bundle.use_bf16("auto") is True
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert bundle.use_bf16("auto") is False
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    del bundle.manifest["precision"]
    assert bundle.bf16_parity is None and bundle.use_bf16("auto") is False


def test_export_checks_bf16_on_the_collection_it_indexes(tiny_checkpoint, tiny_folder, tmp_path):
    out = tmp_path / "bundle"
    run = subprocess.run([sys.executable, str(ROOT / "export.py"), f"ckpt_path={tiny_checkpoint}", f"out={out}",
                          f"index.collection={tiny_folder}", "runtimes=[]", "precision_check_images=6",
                          f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    check = load_bundle(out).bf16_parity
    assert check["images"] == 6 and check["source"] == f"6 images of {tiny_folder}"  # 3 classes, 2 images each
    assert "bf16 vs fp32 on 6 images of" in run.stdout


def test_export_refuses_to_run_under_a_launcher(tmp_path, monkeypatch):
    """Every torchrun rank would write the same bundle folder: a clear error naming the alternative."""
    from cbir.commands.export import export
    from cbir.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cfg = compose_config("export", ["model=resnet18", "model.pretrained=none", f"out={tmp_path / 'bundle'}"])
    with pytest.raises(ConfigError, match="index.processes=2"):
        export(cfg)
    assert not (tmp_path / "bundle").exists()


def test_export_refuses_a_nonempty_folder_and_leaves_no_staging(tmp_path):
    embedder, model_cfg = _embedder()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        export_bundle(embedder, tmp_path / "b", model_config=model_cfg, runtimes=[])
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_parity_failure_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    embedder, model_cfg = _embedder()
    real_trace = torch.jit.trace

    def broken_trace(module, example, **kwargs):  # a copy that drifts from the eager model
        traced = real_trace(module, example, **kwargs)
        with torch.no_grad():
            next(p for p in traced.parameters()).add_(0.5)
        return traced

    monkeypatch.setattr(torch.jit, "trace", broken_trace)  # bundle.py imports torch where it traces
    with pytest.raises(BundleError, match="torchscript copy differs"):
        export_bundle(embedder, tmp_path / "b", model_config=model_cfg, runtimes=["torchscript"])
    assert not any(tmp_path.iterdir())


def test_damaged_bundles_are_clear_errors(tmp_path):
    embedder, model_cfg = _embedder()
    out = export_bundle(embedder, tmp_path / "b", model_config=model_cfg, runtimes=[])
    with pytest.raises(BundleError, match="not a folder"):
        load_bundle(tmp_path / "nope")
    weights = out / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(out)
    weights.unlink()
    with pytest.raises(BundleError, match="missing weights.pt"):
        load_bundle(out)
    with pytest.raises(BundleError, match="no model.onnx"):
        bundle = export_bundle(embedder, tmp_path / "c", model_config=model_cfg, runtimes=[])
        load_bundle(bundle).runtime_copy("onnx")


def test_run_folder_resolves_to_its_best_checkpoint(tiny_checkpoint, tmp_path):
    from cbir.errors import CheckpointError
    from cbir.models.checkpoint import resolve_checkpoint

    run = tiny_checkpoint.parent.parent
    assert resolve_checkpoint(run) == tiny_checkpoint
    assert resolve_checkpoint(tiny_checkpoint) == tiny_checkpoint
    with pytest.raises(CheckpointError, match="holds no best"):
        resolve_checkpoint(tmp_path)
