"""Index writes are transactions (issue 15 D9, D10, D20): a save killed at any step leaves the old or the
new index, never a broken one; two writers at once both land; a changed file is caught on load."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers.paths import ROOT
from helpers.vectors import clustered

from cbir.index.builder import IndexOptions
from cbir.index.errors import IndexFilesError
from cbir.index.store import CRASH_ENV, CbirIndex, index_writer, load_index

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

CHANGE = """
import sys
import numpy as np
from cbir.index.store import load_index
folder, action = sys.argv[1], sys.argv[2]
index = load_index(folder)
if action == "build":  # a new build saved over the folder (cbir index build out=<existing index>)
    from cbir.index.builder import IndexOptions
    from cbir.index.store import CbirIndex
    vectors = np.random.default_rng(2).standard_normal((150, index.embedding_dim)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = CbirIndex.build(vectors, [f"rebuilt/{i}.png" for i in range(150)], [None] * 150,
                            options=IndexOptions(kind="flat"))
elif action == "add":
    vectors = np.random.default_rng(1).standard_normal((25, index.embedding_dim)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index.add(vectors, [f"new/{i}.png" for i in range(25)], [None] * 25)
else:
    index.remove(list(range(10)))
index.save(folder)
"""


def fresh_index(folder, kind="flat") -> CbirIndex:
    vectors = clustered(200)
    index = CbirIndex.build(vectors, [f"img/{i}.png" for i in range(200)], [None] * 200,
                            options=IndexOptions(kind=kind, query_sample=50))
    index.save(folder)
    return index


@pytest.mark.parametrize("action", ["build", "add", "remove"])
@pytest.mark.parametrize("step", ["index", "ids", "info", "cleanup"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_index(tmp_path, action, step):
    folder = tmp_path / "ix"
    old = fresh_index(folder)
    old_paths = old.store.paths()
    script = tmp_path / "change.py"
    script.write_text(CHANGE)
    env = {**os.environ, CRASH_ENV: step, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, str(script), str(folder), action], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 70, run.stderr[-2000:]  # it did die at that step
    loaded = load_index(folder)
    new_size = {"build": 150, "add": 225, "remove": 190}[action]
    switched = step == "cleanup"  # index.json was written before this step: the new generation is current
    assert len(loaded) == (new_size if switched else 200)
    assert (loaded.store.paths() == old_paths) != switched
    loaded.save(folder)  # the next save clears what the crash left behind
    names = sorted(p.name for p in folder.iterdir())
    assert len([n for n in names if n.endswith(".faiss")]) == 1 and not [n for n in names if n.endswith(".tmp")]
    assert len(load_index(folder)) == len(loaded)


def test_two_writers_at_once_both_land(tmp_path):
    folder = tmp_path / "ix"
    fresh_index(folder)
    errors = []

    def writer(tag: str) -> None:
        try:
            with index_writer(folder) as index:
                vectors = clustered(30, seed=len(tag))
                index.add(vectors, [f"{tag}/{i}.png" for i in range(30)], [None] * 30)
                time.sleep(0.3)  # the other writer is waiting on the lock meanwhile
                index.save(folder)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    index = load_index(folder)
    assert len(index) == 260
    assert {p.split("/")[0] for p in index.store.paths()} == {"img", "first", "second"}


def test_a_flipped_bit_in_the_index_file_is_caught(tmp_path):
    folder = tmp_path / "ix"
    fresh_index(folder)
    target = folder / "index-000001.faiss"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IndexFilesError, match="index-000001.faiss fails its integrity check"):
        load_index(folder)


def test_an_index_saved_before_generations_loads_and_converts(tmp_path):
    import json

    import faiss

    folder = tmp_path / "ix"
    index = fresh_index(folder)
    # the pre-generation layout: index.faiss, ids.jsonl (JSON lines), index.json without files/sha256
    os.replace(folder / "index-000001.faiss", folder / "index.faiss")
    (folder / "ids-000001.sqlite").unlink()
    (folder / "ids.jsonl").write_text("".join(json.dumps(row) + "\n" for row in index.store.rows.values()))
    info = json.loads((folder / "index.json").read_text())
    for key in ("files", "sha256", "generation"):
        info.pop(key)
    (folder / "index.json").write_text(json.dumps(info))
    legacy = load_index(folder)
    assert len(legacy) == 200 and legacy.store.paths() == index.store.paths()
    legacy.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["ids-000001.sqlite", "index-000001.faiss", "index.json"]
    assert faiss.read_index(str(folder / "index-000001.faiss")).ntotal == 200
    assert np.array_equal(load_index(folder).store.ids(), index.store.ids())
