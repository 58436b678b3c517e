"""notebooks/quickstart.ipynb runs top to bottom as CI runs it (the tiny stand-in, no `make demo`), in the
venv's own kernel, and is committed with its outputs cleared."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from helpers.paths import ROOT
from nbclient import NotebookClient
from PIL import Image

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
sys.path.insert(0, str(ROOT / "notebooks"))
from quickstart_support import SYNTHETIC_CLASSES, fashion_mnist_available  # noqa: E402

K = 5
# rank | cosine | [match, on a labelled index] | id | label | path
HIT_ROW = re.compile(r"^\| (\d+) \| (-?[0-9.]+) \|(?: (?:\d+% )?\|)? (\d+) \| ([^|]*) \| ([^|]+) \|$", re.MULTILINE)


def cell_tagged(notebook, tag: str):
    [cell] = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    return cell


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def images_of(cell) -> list[bytes]:
    import base64

    return [base64.b64decode(o.data["image/png"]) for o in cell.outputs
            if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


def run_notebook(tmp_path: Path, monkeypatch, env: dict[str, str]):
    """Execute a copy of the notebook in ``tmp_path`` with ``env``; the kernel inherits our environment."""
    for name in ("CBIR_BUNDLE", "CBIR_INDEX", "CBIR_QUERIES", "CBIR_QUERY_IMAGE", "CBIR_MAP_METHOD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"CBIR_REPO": str(ROOT), "CBIR_QUICKSTART_TINY": "1", "CBIR_K": str(K),
                        "CBIR_QUICKSTART_OUT": str(tmp_path / "out"), **env}.items():
        monkeypatch.setenv(name, value)
    copy = tmp_path / "quickstart.ipynb"
    copy.write_bytes(NOTEBOOK.read_bytes())
    notebook = nbformat.read(copy, as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(notebook, copy)  # executed copy, for a look when a test fails
    return notebook


@pytest.mark.slow
@pytest.mark.parametrize("data", ["synthetic", "fashion_mnist"])
def test_quickstart_runs_top_to_bottom_on_the_stand_in(tmp_path, monkeypatch, data):
    env = {"CBIR_QUICKSTART_DATA": data}
    if data == "fashion_mnist":
        if not fashion_mnist_available():
            pytest.skip("Fashion-MNIST is not on this machine (cbir data fetch fashion_mnist)")
        classes = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"}
    else:  # and a photo of the user's own, outside the collection, of another size
        classes = {f"{colour} {shape}" for shape, colour in SYNTHETIC_CLASSES}
        photo = tmp_path / "my own photo.jpg"
        Image.fromarray(np.full((50, 40, 3), (200, 30, 30), np.uint8)).save(photo)
        env["CBIR_QUERY_IMAGE"] = str(photo)

    notebook = run_notebook(tmp_path, monkeypatch, env)

    parameters = text_of(cell_tagged(notebook, "parameters"))
    assert f"python: {sys.executable}\n" in parameters  # the venv's interpreter runs the kernel
    assert "USING A STAND-IN" in text_of(cell_tagged(notebook, "standin"))
    assert "make demo" in text_of(cell_tagged(notebook, "standin"))

    search = text_of(cell_tagged(notebook, "search"))
    rows = HIT_ROW.findall(search)
    assert [int(r[0]) for r in rows] == list(range(1, K + 1))
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    assert len({r[2] for r in rows}) == K  # K different indexed images
    assert {r[3].strip() for r in rows} <= classes
    if data == "synthetic":
        assert f"query: {photo}\n" in search
        assert all("/gallery/" in r[4] for r in rows)  # hits come from the index, not from the queries
    else:
        assert all(r[4].strip().startswith("fashion_mnist:train/") for r in rows)

    batch = text_of(cell_tagged(notebook, "batch"))
    precision = {int(k): float(v) for k, v in re.findall(r"precision@(\d+) = ([0-9.]+)", batch)}
    assert set(precision) == {1, K} and all(0.0 <= v <= 1.0 for v in precision.values())
    assert f"{K} hits each" in batch

    for tag, count in (("grid", 1), ("batch-grids", 2), ("map", 1)):
        pictures = images_of(cell_tagged(notebook, tag))
        assert len(pictures) == count, tag
        assert all(p.startswith(b"\x89PNG") and len(p) > 1000 for p in pictures), tag
    assert f"in {len(classes)} classes" in text_of(cell_tagged(notebook, "map"))
    for name in ("grid_photo.png", "grid_batch_0.png", "embedding_map.png"):
        with Image.open(tmp_path / "out" / name) as picture:
            assert picture.width > 200 and picture.height > 100


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert [cell.outputs for cell in code] == [[]] * len(code), "clear the outputs before committing"
    assert [cell.execution_count for cell in code] == [None] * len(code), "clear the execution counts"
    assert notebook.metadata["kernelspec"]["name"] == "python3"
