"""Collections and resumable extraction: specs, shards, resume after a crash, unreadable images, the
pipeline and the ``cbir index`` verbs on a tiny folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import write_class_images

from cbir.cli import main as cbir_main
from cbir.data.catalog import NO_LABEL
from cbir.errors import DataError
from cbir.index import add_to_index, build_collection_index, load_index, read_collection, shards
from cbir.index.errors import ExtractionMismatchError
from cbir.index.extract import extract_collection
from cbir.models.embedder import build_embedder
from cbir.models.inference import embed as real_embed


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_embedder("resnet18", pretrained="none", image_size=16)


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    write_class_images(root, num_classes=4, per_class=4, size=24)
    return root


class SimulatedKill(Exception):
    """Stands for the process being killed mid-run."""


def counting_embed(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Count batches through the model; raise (a simulated kill) after ``fail_after`` of them."""
    calls, real = [], real_embed

    def embed(*args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise SimulatedKill("killed")
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "embed", embed)
    return calls


# -- collections ------------------------------------------------------------------------------------
def test_folder_collection_labels_by_relative_parent(tmp_path):
    write_class_images(tmp_path / "animals" / "cats", num_classes=1, per_class=2)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    collection = read_collection(tmp_path)
    labels = {Path(collection.source(int(i))).relative_to(tmp_path).as_posix(): collection.label(int(i))
              for i in collection.indices}
    assert labels == {"animals/cats/class_00/img_0.png": "animals/cats/class_00",
                      "animals/cats/class_00/img_1.png": "animals/cats/class_00", "loose.png": None}


def test_csv_collections(tmp_path, images):
    (tmp_path / "plain.csv").write_text("path\nimages/class_00/img_0.png\nimages/class_01/img_1.png\n")
    plain = read_collection(tmp_path / "plain.csv")
    assert len(plain) == 2 and plain.catalog.records[0].label == NO_LABEL
    assert plain.source(1) == str(tmp_path / "images/class_01/img_1.png")
    (tmp_path / "labelled.csv").write_text("images/class_00/img_0.png,cat\nimages/class_01/img_1.png,dog\n")
    labelled = read_collection(tmp_path / "labelled.csv")
    assert [labelled.label(int(i)) for i in labelled.indices] == ["cat", "dog"]
    (tmp_path / "empty.csv").write_text("path\n")
    with pytest.raises(DataError, match="no rows"):
        read_collection(tmp_path / "empty.csv")


def test_data_config_collection(tiny_fashion_mnist, tmp_path):
    config = tmp_path / "conf"
    (config / "data").mkdir(parents=True)
    (config / "data" / "fmnist.yaml").write_text(
        f"root: {tiny_fashion_mnist}\nreader:\n  _target_: cbir.data.readers.fashion_mnist.read_fashion_mnist\n"
        "  root: ${data.root}\n  download: false\n")
    from cbir.index.collection import read_collection as read

    test = read("fmnist:test", config_dir=config)
    assert len(test) == 20 and test.source(int(test.indices[0])) == "fashion_mnist:test/0"
    assert len(read("fmnist", config_dir=config)) == 60
    with pytest.raises(DataError, match="no records match"):
        read("fmnist:val", config_dir=config)


def test_empty_and_unknown_collections_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        read_collection(tmp_path / "empty")
    with pytest.raises(DataError, match="not a folder, a .csv file or a data config"):
        read_collection(tmp_path / "missing")


# -- extraction -------------------------------------------------------------------------------------
def test_resume_after_a_crash_gives_identical_embeddings(model, images, tmp_path, monkeypatch):
    collection = read_collection(images)
    options = dict(batch_size=2, num_workers=0, shard_size=5, progress=False)
    reference = extract_collection(model, collection, tmp_path / "straight", **options)
    assert reference.embeddings.shape == (16, 512) and reference.indices.tolist() == list(range(16))

    counting_embed(monkeypatch, fail_after=7)  # shards of 5 images = 3 batches: dies inside shard 2
    with pytest.raises(SimulatedKill):
        extract_collection(model, collection, tmp_path / "crashed", **options)
    done = sorted(p.name for p in (tmp_path / "crashed").glob("shard_*.json"))
    assert done == ["shard_00000.json", "shard_00001.json"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "crashed").glob("shard_*")}

    calls = counting_embed(monkeypatch)
    resumed = extract_collection(model, collection, tmp_path / "crashed", **options)
    assert sum(calls) == 16 - 10  # only shards 2 and 3 were embedded again
    assert {p: (tmp_path / "crashed" / p).stat().st_mtime_ns for p in stamps} == stamps
    np.testing.assert_array_equal(resumed.embeddings, reference.embeddings)
    np.testing.assert_array_equal(resumed.indices, reference.indices)

    calls = counting_embed(monkeypatch)
    extract_collection(model, collection, tmp_path / "crashed", **options)
    assert calls == []  # everything done: nothing recomputed


def test_resume_refuses_another_model_or_collection(model, images, tmp_path):
    options = dict(batch_size=4, num_workers=0, shard_size=8, progress=False)
    extract_collection(model, read_collection(images), tmp_path / "work", **options)
    other = build_embedder("resnet18", pretrained="none", image_size=16)
    with pytest.raises(ExtractionMismatchError, match="model"):
        extract_collection(other, read_collection(images), tmp_path / "work", **options)
    (images / "class_00" / "img_0.png").unlink()
    with pytest.raises(ExtractionMismatchError, match="collection"):
        extract_collection(model, read_collection(images), tmp_path / "work", **options)
    fresh = extract_collection(model, read_collection(images), tmp_path / "work", resume=False, **options)
    assert len(fresh.embeddings) == 15


def test_unreadable_images_are_skipped_and_listed(model, images, tmp_path):
    (images / "class_00" / "broken.png").write_bytes(b"not an image")
    good = (images / "class_01" / "img_0.png").read_bytes()
    (images / "class_01" / "truncated.png").write_bytes(good[: len(good) // 3])
    collection = read_collection(images)
    result = extract_collection(model, collection, tmp_path / "work", batch_size=4, num_workers=0,
                                shard_size=6, progress=False)
    listed = json.loads((tmp_path / "work" / "skipped.json").read_text())
    assert sorted(Path(s["path"]).name for s in listed) == ["broken.png", "truncated.png"]
    assert all(s["reason"] for s in listed) and result.skipped == listed
    assert len(result.embeddings) == len(result.indices) == len(collection) - 2
    kept = {collection.source(int(i)) for i in result.indices}
    assert not any(s["path"] in kept for s in listed)


def test_collection_of_only_bad_images_is_an_error(model, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of its 1 images"):
        build_collection_index(model, tmp_path / "bad", tmp_path / "out", num_workers=0, progress=False)


# -- pipeline and CLI -------------------------------------------------------------------------------
def test_build_and_add_only_new_images(model, images, tmp_path, monkeypatch):
    index = build_collection_index(model, images, tmp_path / "ix", num_workers=0, batch_size=8, progress=False)
    assert len(index) == 16 and index.info["kind"] == "flat" and index.info["embedding_dim"] == 512
    write_class_images(tmp_path / "more", num_classes=5, per_class=4, size=24, seed=3)
    new_class = tmp_path / "more" / "class_04"
    (images / "class_04").mkdir()
    for path in new_class.iterdir():
        (images / "class_04" / path.name).write_bytes(path.read_bytes())
    calls = counting_embed(monkeypatch)
    ids, _ = add_to_index(index, model, images, tmp_path / "ix" / "embeddings", num_workers=0, batch_size=8,
                          progress=False)
    assert sum(calls) == 4 and ids.tolist() == [16, 17, 18, 19]
    record = index.lookup([16])[0]
    assert record["label"] == "class_04" and record["path"].startswith(str(images / "class_04"))


def test_cli_index_verbs(model, images, tmp_path, capsys):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"hyper_parameters": {"model_config": {"backbone": "resnet18", "image_size": 16, "head": None}},
                "state_dict": {f"embedder.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    out = tmp_path / "ix"
    assert cbir_main(["index", "build", f"ckpt={ckpt}", f"collection={images}", f"out={out}", "num_workers=0",
                      "kind=flat"]) == 0
    assert "16 images, 512-d, IDMap2,Flat" in capsys.readouterr().out
    index = load_index(out)
    first = images / "class_00" / "img_0.png"
    assert index.lookup([0])[0]["path"] == str(first)

    assert cbir_main(["index", "remove", f"index={out}", "id=[1]", f"path={first}"]) == 0
    assert "removed 2 images; 14 left" in capsys.readouterr().out
    assert cbir_main(["index", "add", f"index={out}", f"ckpt={ckpt}", f"collection={images}", "num_workers=0"]) == 0
    assert "added 2 images" in capsys.readouterr().out
    assert cbir_main(["index", "info", f"index={out}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ntotal"] == 16

    with pytest.raises(SystemExit) as exit_info:
        cbir_main(["index", "info", f"index={tmp_path / 'none'}"])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the model twice, an unknown key: one line each
        cbir_main(["index", "build", f"ckpt={ckpt}", f"bundle={out}", f"collection={images}", f"out={out}"])
    assert exit_info.value.code == 2 and "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cbir_main(["index", "build", "--kindd=flat"])
    assert exit_info.value.code == 2 and "unknown index option 'kindd'" in capsys.readouterr().err
