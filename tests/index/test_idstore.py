"""The SQLite id store (issue 15): the same answers as before, read-only and memory-flat when loaded,
transactional changes on a copy, and stores of older indexes (JSON lines) migrated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from helpers.paths import ROOT

from cbir.index.errors import IndexFilesError
from cbir.index.idstore import IdStore


def filled(n: int = 30) -> IdStore:
    store = IdStore()
    store.add([f"/photos/{i}.jpg" for i in range(n)], [f"c{i % 3}" if i % 5 else None for i in range(n)],
              [{"i": i} for i in range(n)])
    return store


def test_rows_lookups_and_changes():
    store = filled()
    assert len(store) == 30 and store.next_id == 30
    assert store.lookup([3, -1, 99, 0]) == [{"id": 3, "path": "/photos/3.jpg", "label": "c0", "meta": {"i": 3}}, None,
                                           None, {"id": 0, "path": "/photos/0.jpg", "label": None, "meta": {"i": 0}}]
    assert store.ids_of_paths(["/photos/4.jpg", "/photos/2.jpg", "/nope.jpg"]).tolist() == [2, 4]
    assert store.unknown_ids([1, 30, 2, -4]) == [30, -4]
    assert store.labelled() and store.first_id() == 0
    store.remove([0, 1, 1000])
    assert len(store) == 28 and store.first_id() == 2 and store.unknown_ids([0]) == [0]
    assert store.add(["/photos/new.jpg"]).tolist() == [30]  # ids are never reused
    assert dict(store.id_labels())[30] is None and len(store.paths()) == 29


def test_many_ids_at_once_go_past_sqlites_variable_limit():
    store = IdStore()
    store.add([f"/p/{i}.png" for i in range(5000)])
    wanted = list(range(0, 5000, 2))
    assert [row["id"] for row in store.lookup(wanted)] == wanted
    assert store.ids_of_paths([f"/p/{i}.png" for i in wanted]).tolist() == wanted
    store.remove(wanted)
    assert len(store) == 2500 and store.unknown_ids(range(4)) == [0, 2]


def test_saved_store_loads_read_only_and_a_change_works_on_a_copy(tmp_path):
    store = filled()
    store.save(tmp_path / "ids.sqlite")
    loaded = IdStore.load(tmp_path / "ids.sqlite", next_id=30)
    assert loaded.rows == store.rows and loaded.next_id == 30
    before = (tmp_path / "ids.sqlite").read_bytes()
    loaded.remove([3])
    loaded.add(["/photos/x.jpg"], ["c9"])
    assert (tmp_path / "ids.sqlite").read_bytes() == before  # the generation's file is never written
    assert loaded.unknown_ids([3]) == [3] and loaded.lookup([30])[0]["label"] == "c9"
    loaded.save(tmp_path / "next.sqlite")
    assert IdStore.load(tmp_path / "next.sqlite").rows == loaded.rows


def test_next_id_comes_from_the_rows_when_the_record_is_behind(tmp_path):
    filled().save(tmp_path / "ids.sqlite")
    assert IdStore.load(tmp_path / "ids.sqlite", next_id=5).next_id == 30
    assert IdStore.load(tmp_path / "ids.sqlite", next_id=40).next_id == 40


def test_json_lines_of_older_indexes_are_migrated(tmp_path):
    rows = [{"id": 4, "path": "/a.png", "label": "x", "meta": {}}, {"id": 9, "path": "/b.png", "label": None}]
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    store = IdStore.load(tmp_path / "ids.jsonl", next_id=3)
    assert store.next_id == 10 and store.rows == {4: {**rows[0]}, 9: {**rows[1], "meta": {}}}
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "path": "/a.png"}\nnot json\n')
    with pytest.raises(IndexFilesError, match="bad.jsonl: line 2"):
        IdStore.load(tmp_path / "bad.jsonl")


def test_concurrent_lookups_from_threads(tmp_path):
    filled(500).save(tmp_path / "ids.sqlite")
    store = IdStore.load(tmp_path / "ids.sqlite")
    errors = []

    def lookups(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(200):
            ids = rng.integers(0, 500, 10).tolist()
            if [row["id"] for row in store.lookup(ids)] != ids:
                errors.append(ids)

    threads = [threading.Thread(target=lookups, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_a_loaded_store_does_not_grow_memory_with_its_size(tmp_path):
    """200k rows: opening the store and looking up hits costs a few MB, where the dict store took ≈ 100 MB."""
    store = IdStore()
    store.add([f"/data/photos/2024/{i // 1000:04d}/IMG_{i:08d}.jpg" for i in range(200_000)],
              [f"class_{i % 100}" for i in range(200_000)])
    store.save(tmp_path / "ids.sqlite")
    script = textwrap.dedent(f"""
        def anon():
            return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1])
        from cbir.index.idstore import IdStore
        before = anon()
        store = IdStore.load({str(tmp_path / 'ids.sqlite')!r})
        for start in range(0, 200_000, 997):
            assert store.lookup(range(start, start + 10))[0]["id"] == start
        print(anon() - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    grown_kb = int(done.stdout.split()[-1])
    assert grown_kb < 20_000, f"RssAnon grew by {grown_kb} kB"
