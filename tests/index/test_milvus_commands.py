"""A Milvus-backed bundle through the user's doors: `cbir index build|info|add|remove backend=milvus`,
search.py / cbir classify with a label filter, cbir.Searcher, and the HTTP service (issue 19)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers.configs import compose_config
from helpers.data import write_class_images
from helpers.paths import ROOT
from PIL import Image

from cbir import Searcher
from cbir.export.bundle import export_bundle
from cbir.index.milvus import MilvusIndex
from cbir.serve import create_app
from cbir.training.factory import build_embedder_from_config, model_config

pytest.importorskip("milvus_lite", reason="the milvus-lite wheel is not installed (pip install 'cbir[milvus]')")


def _cbir(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cbir.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)


def _search(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "search.py"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def milvus_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(bundle folder with a Milvus-backed index/, its collection) built through `cbir index build`."""
    import torch

    root = tmp_path_factory.mktemp("milvus_bundle")
    collection = root / "collection"
    write_class_images(collection, num_classes=3, per_class=4, size=24)
    torch.manual_seed(0)
    cfg = compose_config("train", ["model=resnet18", "model.pretrained=none", "model.image_size=32", "head.dim=16"])
    bundle = export_bundle(build_embedder_from_config(cfg), root / "bundle", model_config=model_config(cfg),
                           runtimes=[], query_preprocess={"steps": []})
    built = _cbir("index", "build", f"bundle={bundle}", f"collection={collection}", f"out={bundle / 'index'}",
                  "backend=milvus", "num_workers=0", "query_sample=20", cwd=root)
    assert built.returncode == 0, built.stderr[-2000:]
    assert "Milvus FLAT" in built.stdout and "12 images" in built.stdout
    return bundle, collection


def test_index_info_add_and_remove_on_the_command_line(milvus_bundle, tmp_path):
    bundle, _ = milvus_bundle
    index = bundle / "index"
    info = _cbir("index", "info", f"index={index}", "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr[-1500:]
    assert json.loads(info.stdout)["backend"] == "milvus"
    more = tmp_path / "more"
    write_class_images(more, num_classes=1, per_class=2, size=24)
    added = _cbir("index", "add", f"index={index}", f"bundle={bundle}", f"collection={more}", "num_workers=0",
                  cwd=tmp_path)
    assert added.returncode == 0 and "added 2 images" in added.stdout and "14 in all" in added.stdout, added.stderr
    assert not (index / "embeddings").exists()  # the add's shards are dropped once the rows are in Milvus
    unknown = _cbir("index", "remove", f"index={index}", "id=[12,999]", cwd=tmp_path)
    assert unknown.returncode != 0 and "999" in unknown.stderr and "Traceback" not in unknown.stderr
    removed = _cbir("index", "remove", f"index={index}", "id=[12,13]", cwd=tmp_path)
    assert removed.returncode == 0 and "removed 2 images; 12 left" in removed.stdout, removed.stderr


def test_search_and_classify_with_a_label_filter(milvus_bundle, tmp_path):
    bundle, collection = milvus_bundle
    query = sorted((collection / "class_00").glob("*.png"))[0]
    found = _search(f"bundle={bundle}", f"query={query}", "k=5", "--json", "filter=label == 'class_02'", cwd=tmp_path)
    assert found.returncode == 0, found.stderr[-1500:]
    hits = json.loads(found.stdout)[0]["hits"]
    assert len(hits) == 4 and {hit["label"] for hit in hits} == {"class_02"}
    plain = _search(f"bundle={bundle}", f"query={query}", "k=3", "--json", cwd=tmp_path)
    assert all(hit["path"] != str(query) for hit in json.loads(plain.stdout)[0]["hits"])  # exclude_self
    voted = _cbir("classify", f"bundle={bundle}", f"query={query}", "--json", "filter=label != 'class_00'",
                  cwd=tmp_path)
    assert voted.returncode == 0, voted.stderr[-1500:]
    assert json.loads(voted.stdout)[0]["label"] in {"class_01", "class_02"}


def test_searcher_and_service_on_a_milvus_bundle(milvus_bundle):
    bundle, collection = milvus_bundle
    searcher = Searcher.open(bundle, precision="fp32")
    assert isinstance(searcher.index, MilvusIndex) and searcher.labelled
    files = sorted(collection.rglob("*.png"))
    first = searcher.search_paths(files[:2], k=3, exclude_self=False)
    assert [hits[0].path for hits in first] == [str(f) for f in files[:2]]
    buffer = io.BytesIO()
    Image.open(files[0]).save(buffer, format="PNG")
    try:
        with TestClient(create_app(searcher)) as client:
            response = client.post("/search", files={"image": ("q.png", buffer.getvalue(), "image/png")},
                                   data={"k": "4", "filter": "label in ['class_01']"})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["filter"] == "label in ['class_01']"
            assert {hit["label"] for hit in body["results"]} == {"class_01"} and len(body["results"]) == 4
            thumb = client.get(body["results"][0]["thumbnail_url"])
            assert thumb.status_code == 200 and thumb.headers["content-type"].startswith("image/")
            bad = client.post("/search", files={"image": ("q.png", buffer.getvalue(), "image/png")},
                              data={"filter": "label ==="})
            assert bad.status_code == 422 and "filter" in bad.json()["error"]
    finally:
        searcher.index.close()
