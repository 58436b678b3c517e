"""The query path: Searcher (Python), search.py (CLI), export.py with an index, and each bad input."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers.configs import compose_config
from helpers.paths import ROOT
from PIL import Image

from cbir import Searcher, load_bundle
from cbir.errors import BadImageError
from cbir.export.bundle import export_bundle
from cbir.index.pipeline import build_bundle_index
from cbir.index.store import load_index
from cbir.search import SearchError, expand_query_paths, format_hits, read_query_image
from cbir.training.factory import build_embedder_from_config, model_config
from cbir.visual.grid import save_grid


def _export(folder: Path, dim: int = 16, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    cfg = compose_config("train", ["model=resnet18", "model.pretrained=none", "model.image_size=32",
                                   f"head.dim={dim}"])
    return export_bundle(build_embedder_from_config(cfg), folder, model_config=model_config(cfg), runtimes=[])


@pytest.fixture(scope="module")
def searcher_parts(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    bundle = load_bundle(_export(root / "bundle"))
    index = build_bundle_index(bundle, str(tiny_folder), root / "bundle" / "index", kind="flat", num_workers=0,
                               progress=False)
    return bundle, index, root


@pytest.fixture()
def searcher(searcher_parts):
    bundle, index, _ = searcher_parts
    return Searcher(bundle, index)


def test_each_indexed_image_finds_itself_first(searcher, tiny_folder):
    files = sorted(tiny_folder.rglob("*.png"))
    results = searcher.search_paths(files, k=5, exclude_self=False)
    assert len(results) == len(files)
    for path, hits in zip(files, results):
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert hits[0].path == str(path) and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].label == path.parent.name
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_folder_query_and_batches_agree_with_single_queries(searcher, tiny_folder):
    searcher.batch_size = 5  # several batches
    folder_results = searcher.search_paths([tiny_folder / "class_02"], k=3)
    single = [searcher.search_paths([p], k=3)[0] for p in sorted((tiny_folder / "class_02").glob("*.png"))]
    assert [[h.id for h in hits] for hits in folder_results] == [[h.id for h in hits] for hits in single]


def test_k_larger_than_the_index_returns_everything(searcher, searcher_parts):
    hits = searcher.search_images([np.zeros((20, 20, 3), np.uint8)], k=100)[0]
    assert len(hits) == len(searcher_parts[1]) == 24


@pytest.mark.parametrize("k", [0, -1, 1001, "x"])
def test_bad_k(searcher, k):
    with pytest.raises(SearchError, match="k="):
        searcher.search_images([np.zeros((8, 8, 3), np.uint8)], k=k)


def test_query_preprocessing_from_the_bundle_or_per_call(searcher_parts, tiny_folder):
    bundle, index, _ = searcher_parts
    image = read_query_image(next(tiny_folder.rglob("*.png")))
    plain = Searcher(bundle, index).embed_images([image])
    clahe = Searcher(bundle, index, preprocess={"steps": [{"name": "clahe", "clip_limit": 4.0}]})
    assert clahe.info()["preprocess"] == {"steps": [{"name": "clahe", "clip_limit": 4.0}]}
    assert not np.allclose(clahe.embed_images([image]), plain)
    assert np.allclose(Searcher(bundle, index).embed_images([image], preprocess={"steps": [{"name": "clahe",
                       "clip_limit": 4.0}]}), clahe.embed_images([image]))


def test_dimension_mismatch_is_a_clear_error(searcher_parts, tmp_path):
    _, index, _ = searcher_parts
    other = load_bundle(_export(tmp_path / "b32", dim=32))
    with pytest.raises(SearchError, match="32 dimensions .* 16-d"):
        Searcher(other, index)


def test_other_model_same_dimension_is_flagged(searcher_parts, tmp_path, caplog):
    _, index, _ = searcher_parts
    other = load_bundle(_export(tmp_path / "b16", seed=1))
    Searcher(other, index)
    assert "different model" in caplog.text


def test_empty_index_is_a_clear_error(searcher_parts, tiny_folder):
    bundle, _, root = searcher_parts
    from cbir.index.store import load_index

    index = load_index(root / "bundle" / "index")
    index.remove(index.store.ids())
    with pytest.raises(SearchError, match="empty"):
        Searcher(bundle, index).search_images([np.zeros((8, 8, 3), np.uint8)], k=3)


def _png_bytes(size=(10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is not an image", "not an image"),
    (_png_bytes()[:40], "cannot decode|not an image"),
    (_huge_png_header(100_000, 100_000), "pixels"),
])
def test_bad_query_bytes(data, message):
    with pytest.raises(BadImageError, match=message):
        read_query_image(data, name="upload.png")


def test_bad_query_files(tmp_path):
    with pytest.raises(BadImageError, match="does not exist"):
        read_query_image(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty"):
        read_query_image(tmp_path / "empty.jpg")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(BadImageError, match="text.png"):
        read_query_image(tmp_path / "text.png")
    (tmp_path / "folder").mkdir()
    with pytest.raises(BadImageError, match="holds no images"):
        expand_query_paths([tmp_path / "folder"])


def test_content_decides_not_the_extension(tmp_path):
    path = tmp_path / "photo.txt"
    path.write_bytes(_png_bytes((7, 5)))
    assert read_query_image(path).shape == (5, 7, 3)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert (read_query_image(buffer.getvalue()) == 255).all()  # transparency composited onto white


def test_grid_png(searcher, tiny_folder, tmp_path):
    path = next(tiny_folder.rglob("*.png"))
    hits = searcher.search_paths([path], k=6)[0]
    out = save_grid(read_query_image(path), hits, tmp_path / "grid.png", query_label=path.parent.name)
    with Image.open(out) as grid:
        assert grid.size[0] > 5 * 100 and grid.size[1] >= 160
        pixels = np.asarray(grid.convert("RGB"))
    assert ((pixels == [0x22, 0xAA, 0x44]).all(axis=2)).any()  # a correct hit's green border


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd)


def test_search_cli_table_json_grid_and_errors(searcher_parts, tiny_folder, tmp_path):
    _, _, root = searcher_parts
    bundle = root / "bundle"
    query = next(tiny_folder.rglob("*.png"))
    table = _run("search.py", f"bundle={bundle}", f"query={query}", "k=3", cwd=tmp_path)
    assert table.returncode == 0, table.stderr[-1500:]
    assert "| 1 |" in table.stdout and str(query) in table.stdout
    assert "| rank | cosine |" in table.stdout  # the header says what the score is

    js = _run("search.py", f"bundle={bundle}", f"query={tiny_folder / 'class_00'}", "k=2", "--json",
              f"grid={tmp_path / 'grids'}", cwd=tmp_path)
    assert js.returncode == 0, js.stderr[-1500:]
    payload = json.loads(js.stdout)
    assert len(payload) == 4 and all(len(entry["hits"]) == 2 for entry in payload)
    # the queries are in the index: by default none comes back as its own hit
    assert all(hit["path"] != entry["query"] for entry in payload for hit in entry["hits"])
    assert all(hit["score"] < 1.0 - 1e-4 for entry in payload for hit in entry["hits"])
    itself = _run("search.py", f"bundle={bundle}", f"query={query}", "k=2", "--json", "exclude_self=false", cwd=tmp_path)
    assert json.loads(itself.stdout)[0]["hits"][0]["path"] == str(query)
    expanded = _run("search.py", f"bundle={bundle}", f"query={query}", "k=2", "--json", "rerank.method=aqe", cwd=tmp_path)
    assert expanded.returncode == 0, expanded.stderr[-1500:]
    assert [h["path"] != str(query) for h in json.loads(expanded.stdout)[0]["hits"]] == [True, True]
    assert len(list((tmp_path / "grids").glob("*.png"))) == 4

    for args, message in ([f"bundle={bundle}"], "query=... is required"), \
            ([f"bundle={bundle}", f"query={query}", "kk=3"], "unknown search option 'kk'"), \
            ([f"bundle={tmp_path}", f"query={query}"], "not a complete cbir bundle"), \
            ([f"bundle={bundle}", f"query={tmp_path / 'no.jpg'}"], "no such file"):
        bad = _run("search.py", *args, cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.slow
def test_export_with_index_then_cbir_search(tiny_folder, tmp_path):
    """The demo's path: export.py (pretrained model here) with index.collection, then `cbir search`."""
    out = tmp_path / "bundle"
    run = _run("export.py", "model=resnet18", "model.pretrained=none", "model.image_size=32", "head.dim=8",
               f"out={out}", f"index.collection={tiny_folder}", "index.num_workers=0", "runtimes=[]",
               f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "index").is_dir() and "24 images" in run.stdout
    search = subprocess.run([sys.executable, "-m", "cbir.cli", "search", f"bundle={out}",
                             f"query={next(tiny_folder.rglob('*.png'))}", "k=1", "--json"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert search.returncode == 0, search.stderr[-1500:]
    assert json.loads(search.stdout)[0]["hits"][0]["score"] < 1.0 - 1e-4  # the query itself is excluded


def test_array_backed_hits_load_their_pixels(searcher, tiny_fashion_mnist, monkeypatch, tmp_path):
    """Fashion-MNIST images live in arrays, not files: grids and thumbnails read them through the dataset."""
    import cbir.data.readers as readers
    from cbir.data.readers.fashion_mnist import read_fashion_mnist
    from cbir.search import Hit

    catalog = read_fashion_mnist(str(tiny_fashion_mnist))
    monkeypatch.setattr(readers, "read_data_config", lambda name, spec=None, config_dir=None: catalog)
    pixels = searcher.load_source("fashion_mnist:train/3")
    assert pixels.shape == (28, 28, 3) and (pixels[..., 0] == catalog.arrays["train"][3]).all()
    hits = [Hit(rank=1, score=0.5, id=0, path="fashion_mnist:train/3", label="3")]
    out = save_grid(pixels, hits, tmp_path / "g.png", load=searcher.load_source)
    with Image.open(out) as grid:
        tile = np.asarray(grid.convert("RGB"))[20:140, 190:310]
    assert tile.std() > 0  # the image was drawn, not the grey placeholder
    with pytest.raises(SearchError, match="no indexed image"):
        searcher.image_source(10**9)


# -- k-NN classification -----------------------------------------------------------------------------

def test_vote_weights_by_similarity_and_breaks_ties_by_rank():
    from cbir.search import Hit, vote

    hits = [Hit(1, 0.9, 1, "a", "cat"), Hit(2, 0.5, 2, "b", "dog"), Hit(3, 0.45, 3, "c", "dog"),
            Hit(4, 0.3, 4, "d", None), Hit(5, -0.2, 5, "e", "bird")]
    prediction = vote(hits)
    assert prediction.label == "dog" and prediction.votes == {"dog": 0.95, "cat": 0.9, "bird": 0.0}
    assert prediction.confidence == pytest.approx(0.95 / 1.85, abs=1e-6)
    tie = vote([Hit(1, 0.5, 1, "a", "x"), Hit(2, 0.5, 2, "b", "y")])
    assert tie.label == "x" and tie.confidence == pytest.approx(0.5)
    assert vote([Hit(1, 0.5, 1, "a", None)]).label is None


def test_classify_labels_each_indexed_image_by_its_class(searcher, tiny_folder):
    from cbir.search import read_query_image

    files = sorted(tiny_folder.rglob("*.png"))
    predictions = searcher.classify([read_query_image(f) for f in files], k=1)  # itself: the nearest hit
    assert [p.label for p in predictions] == [f.parent.name for f in files]
    assert all(p.confidence == 1.0 and len(p.hits) == 1 for p in predictions)
    wider = searcher.classify([read_query_image(files[0])], k=6)[0]
    assert sum(wider.votes.values()) == pytest.approx(sum(max(h.score, 0) for h in wider.hits if h.label), abs=1e-5)


def test_search_paths_leaves_the_query_itself_out(searcher, tiny_folder):
    files = sorted(tiny_folder.rglob("*.png"))[:4]
    for file, hits in zip(files, searcher.search_paths(files, k=3)):
        assert len(hits) == 3 and str(file) not in [h.path for h in hits]
        assert [h.rank for h in hits] == [1, 2, 3]
    kept = searcher.search_paths(files, k=3, exclude_self=False)
    assert [hits[0].path for hits in kept] == [str(f) for f in files]


def test_classify_cli_and_an_unlabelled_index(searcher_parts, tiny_folder, tmp_path, capsys):
    import json

    from cbir.commands import classify

    bundle, _, root = searcher_parts
    query = sorted(tiny_folder.rglob("*.png"))[0]
    assert classify.main([f"bundle={root / 'bundle'}", f"query={query}", "k=1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result[0]["hits"][0]["path"] != str(query)  # it does not vote for itself
    assert len(result) == 1 and len(result[0]["hits"]) == 1
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(tiny_folder.rglob("*.png"))[:3]:
        (flat / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    index = build_bundle_index(bundle, str(flat), tmp_path / "unlabelled", kind="flat", num_workers=0, progress=False)
    with pytest.raises(SearchError, match="holds no labels"):
        Searcher(bundle, index).classify([read_query_image(query)], k=2)
    assert "score_calibration" not in index.info  # no labels: nothing to calibrate scores on
    hits = Searcher(bundle, index).search_images([read_query_image(query)], k=2)[0]
    assert [h.match for h in hits] == [None, None] and "match" not in format_hits("q", hits)


def test_a_labelled_index_turns_scores_into_match_probabilities(searcher, searcher_parts, tiny_folder):
    """Built over class folders, the index fits P(same class | cosine) on its own top-k hits; every hit
    carries that probability (the table, JSON and page show it)."""
    from cbir.index.calibration import match_probability

    _, index, _ = searcher_parts
    curve = index.info["score_calibration"]
    files = sorted(tiny_folder.rglob("*.png"))
    assert curve["queries"] == len(files) and curve["pairs"] == len(files) * 10
    hits = searcher.search_paths(files[:1], k=5)[0]
    assert [h.match for h in hits] == [round(match_probability(h.score, curve), 4) for h in hits]
    assert all(0.0 <= h.match <= 1.0 for h in hits)
    assert "| match |" in format_hits(str(files[0]), hits) and hits[0].to_json()["match"] == hits[0].match
    reloaded = Searcher(searcher_parts[0], load_index(index.path))  # the curve is saved in index.json
    assert reloaded.search_paths(files[:1], k=5)[0] == hits


def planted_expansion_case(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A query q, its one close neighbour a1 of class A, two more A images a2, a3 near a1 but only 0.6 from q,
    and a distractor b of class B at 0.7 from q, far from a1: plain search ranks b second; expanding q with a1
    pulls a2 and a3 above b."""
    def unit(*values):
        v = np.zeros(dim, np.float32)
        v[:len(values)] = values
        return v / np.linalg.norm(v)

    query = unit(1.0)[None]
    gallery = np.stack([unit(0.9, 0.436), unit(0.6, 0.8), unit(0.58, 0.81, 0.0, 0.08), unit(0.7, 0.0, 0.714)])
    return query, gallery


def test_alpha_query_expansion_lifts_the_neighbours_of_the_best_hit(searcher_parts):
    from cbir.index.builder import IndexOptions
    from cbir.index.store import CbirIndex

    bundle, _, _ = searcher_parts
    query, gallery = planted_expansion_case(int(bundle.embedding_dim))
    index = CbirIndex.build(gallery, ["a1", "a2", "a3", "b"], ["A", "A", "A", "B"], options=IndexOptions(kind="flat"))
    plain = Searcher(bundle, index).search_embeddings(query, k=4)[0]
    assert [h.path for h in plain] == ["a1", "b", "a2", "a3"]
    expanded = Searcher(bundle, index, rerank="aqe", rerank_n=1).search_embeddings(query, k=4)[0]
    assert [h.path for h in expanded][:3] in (["a1", "a2", "a3"], ["a1", "a3", "a2"]) and expanded[3].path == "b"
    assert all(h.match is None for h in expanded)  # the score curve was fitted on plain scores
    with pytest.raises(SearchError, match="rerank='kmeans'"):
        Searcher(bundle, index, rerank="kmeans")


def test_eval_of_a_bundle_scores_through_its_index_next_to_exact_search(searcher_parts, tiny_folder, tmp_path):
    """eval.py bundle=<dir>: the bundle's model on the data, exact, and through an index of its own index's kind
    (flat here, so both rows agree); index.kind=ivf adds that kind instead."""
    from cbir.commands.eval import evaluate

    _, _, root = searcher_parts
    common = [f"bundle={root / 'bundle'}", "data=folder", f"data.root={tiny_folder}", "data.num_workers=0",
              "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "data.val_classes=null",
              "data.val.queries=test"]
    evaluate(compose_config("eval", [*common, f"paths.output_dir={tmp_path / 'flat'}"]))
    rows = json.loads((tmp_path / "flat" / "eval.json").read_text())["results"]
    exact, through = rows[f"bundle {root / 'bundle'}"], rows[next(name for name in rows if " through " in name)]
    assert "IDMap2,Flat" in next(name for name in rows if " through " in name)
    for key in ("precision_at_1", "recall_at_4", "map_at_r"):
        assert through[key] == pytest.approx(exact[key], abs=1e-6)
    evaluate(compose_config("eval", [*common, "index.kind=hnsw", f"paths.output_dir={tmp_path / 'hnsw'}"]))
    assert any("HNSW" in name for name in json.loads((tmp_path / "hnsw" / "eval.json").read_text())["results"])
    with pytest.raises(Exception, match="not both"):
        evaluate(compose_config("eval", [*common, "ckpt_path=x.ckpt", f"paths.output_dir={tmp_path / 'x'}"]))


def test_kreciprocal_puts_the_hit_with_the_querys_neighbourhood_above_a_lone_look_alike(searcher_parts):
    """c1 looks most like the query (0.80) but its neighbours (l1-l3) are nothing like the query's; c2 (0.75)
    and its cluster mates m1, m2 are the query's own neighbourhood. Re-ranked, the cluster leads and c1 drops."""
    from cbir.index.builder import IndexOptions
    from cbir.index.store import CbirIndex

    bundle, _, _ = searcher_parts
    dim = int(bundle.embedding_dim)

    def unit(**parts):
        v = np.zeros(dim, np.float32)
        for axis, value in parts.items():
            v[int(axis[1:])] = value
        return v / np.linalg.norm(v)

    named = {"c1": unit(e1=0.8, e3=0.6), "c2": unit(e1=0.75, e2=0.66),
             "m1": unit(e1=0.72, e2=0.69, e4=0.05), "m2": unit(e1=0.72, e2=0.69, e4=-0.05),
             **{f"l{i}": unit(e1=0.2, e3=0.98, **{f"e{4 + i}": 0.1}) for i in (1, 2, 3)}}
    index = CbirIndex.build(np.stack(list(named.values())), list(named), options=IndexOptions(kind="flat"))
    query = unit(e1=1.0)[None]
    plain = Searcher(bundle, index).search_embeddings(query, k=4)[0]
    assert plain[0].path == "c1"
    reranked = Searcher(bundle, index, rerank="kreciprocal", rerank_n=3).search_embeddings(query, k=4)[0]
    assert reranked[0].path in ("c2", "m1", "m2") and [h.path for h in reranked].index("c1") == 3  # below the cluster
    assert all(a.score >= b.score for a, b in zip(reranked, reranked[1:]))  # the combined score, best first


def test_pairwise_reranking_reorders_the_first_candidates_by_the_rerankers_score(searcher_parts, tiny_folder,
                                                                                 tmp_path, caplog):
    """A re-ranker that scores by minus the cosine turns the first candidates upside down: the known answer."""
    import torch

    from cbir.models.pairwise import PairwiseReranker, default_stages, save_reranker

    bundle, index, _ = searcher_parts
    channels = bundle.embedder.backbone.channels
    reranker = PairwiseReranker({s: channels[s] for s in default_stages(channels)}, grid=2)
    with torch.no_grad():
        reranker.cosine_scale.fill_(-10.0)
    path = save_reranker(reranker, tmp_path / "reranker.pt", embedder=bundle.embedder, candidates=6)
    with_reranker = load_bundle(export_bundle(bundle.embedder, tmp_path / "bundle", model_config=bundle.model_config,
                                              runtimes=[], reranker=path))
    files = sorted(tiny_folder.rglob("*.png"))[::7]
    plain = Searcher(with_reranker, index).search_paths(files, k=9)
    reranked = Searcher(with_reranker, index, rerank="pairwise").search_paths(files, k=9)
    for before, after in zip(plain, reranked):
        assert [h.id for h in after[:6]] == [h.id for h in before[:6]][::-1]
        assert [h.id for h in after[6:]] == [h.id for h in before[6:]]  # past the candidates: the index's order
        assert [h.score for h in after[:6]] == pytest.approx([-h.score for h in before[:6]][::-1], abs=1e-5)
    # a candidate whose file is gone since indexing: that query keeps the index's order, and the log says why
    import shutil

    copy = tmp_path / "collection"
    shutil.copytree(tiny_folder, copy)
    index_copy = build_bundle_index(with_reranker, str(copy), tmp_path / "index_copy", kind="flat", num_workers=0,
                                    progress=False)
    query = sorted(copy.rglob("*.png"))[0]
    plain_hits = Searcher(with_reranker, index_copy).search_paths([query], k=9)[0]
    Path(plain_hits[0].path).unlink()
    with caplog.at_level("WARNING", logger="cbir.search"):
        kept = Searcher(with_reranker, index_copy, rerank="pairwise").search_paths([query], k=9)[0]
    assert [h.id for h in kept] == [h.id for h in plain_hits] and "could not be read" in caplog.text


def test_pairwise_queries_take_one_trunk_pass_for_embedding_and_tokens(searcher_parts, tiny_folder, tmp_path):
    """embed_queries gives the embeddings the plain path gives and the tokens a separate pass gives, from one
    pass of the trunk (counted), so re-ranking costs no second forward pass over the query."""
    import torch

    from cbir.models.pairwise import PairwiseReranker, default_stages, save_reranker
    from cbir.search import read_query_image

    bundle, index, _ = searcher_parts
    channels = bundle.embedder.backbone.channels
    reranker = PairwiseReranker({s: channels[s] for s in default_stages(channels)}, grid=2)
    path = save_reranker(reranker, tmp_path / "reranker.pt", embedder=bundle.embedder, candidates=4)
    with_reranker = load_bundle(export_bundle(bundle.embedder, tmp_path / "bundle", model_config=bundle.model_config,
                                              runtimes=[], reranker=path))
    searcher = Searcher(with_reranker, index, rerank="pairwise", precision="fp32")
    images = [read_query_image(f) for f in sorted(tiny_folder.rglob("*.png"))[:5]]
    passes = []
    hook = with_reranker.embedder.backbone.register_forward_hook(lambda *_: passes.append(1))
    embeddings, tokens = searcher.embed_queries(images)
    hook.remove()
    assert len(passes) == 1
    np.testing.assert_allclose(embeddings, searcher.embed_clean(images), atol=1e-5)
    torch.testing.assert_close(tokens, searcher._tokens(images), atol=1e-5, rtol=0)
    with_tokens = searcher.search_embeddings(embeddings, k=6, images=images, tokens=tokens)
    recomputed = searcher.search_embeddings(embeddings, k=6, images=images)
    assert [[h.id for h in row] for row in with_tokens] == [[h.id for h in row] for row in recomputed]
    with pytest.raises(SearchError, match="re-ranker tokens for"):
        searcher.search_embeddings(embeddings, k=6, images=images, tokens=tokens[:2])
    plain_embeddings, no_tokens = Searcher(with_reranker, index, precision="fp32").embed_queries(images)
    assert no_tokens is None and np.allclose(plain_embeddings, embeddings, atol=1e-5)


def test_pairwise_candidates_tokens_are_kept_in_half_precision_within_the_memory_budget(searcher_parts, tiny_folder,
                                                                                         tmp_path, monkeypatch):
    """With the local term the tokens carry the raw cells (wide): the cache holds what fits in its budget."""
    import torch

    import cbir.search
    from cbir.models.pairwise import PairwiseReranker, default_stages, save_reranker

    bundle, index, _ = searcher_parts
    channels = bundle.embedder.backbone.channels
    reranker = PairwiseReranker({s: channels[s] for s in default_stages(channels)}, grid=2, local_weight=0.5)
    path = save_reranker(reranker, tmp_path / "reranker.pt", embedder=bundle.embedder, candidates=6)
    with_reranker = load_bundle(export_bundle(bundle.embedder, tmp_path / "bundle", model_config=bundle.model_config,
                                              runtimes=[], reranker=path))
    per_image = reranker.num_tokens * (64 + reranker.local_width) * 2  # bytes in float16
    monkeypatch.setattr(cbir.search, "PAIRWISE_TOKEN_CACHE_MB", 4 * per_image / 2**20)  # room for 4 images
    searcher = Searcher(with_reranker, index, rerank="pairwise", precision="fp32")
    files = sorted(tiny_folder.rglob("*.png"))[::5]
    hits = searcher.search_paths(files, k=6)
    assert len(searcher._token_cache) == 4
    assert all(t.dtype == torch.float16 and t.shape == (reranker.num_tokens, 64 + reranker.local_width)
               for t in searcher._token_cache.values())
    roomy = Searcher(with_reranker, index, rerank="pairwise", precision="fp32")
    monkeypatch.setattr(cbir.search, "PAIRWISE_TOKEN_CACHE_MB", 1024)
    assert [[h.id for h in row] for row in roomy.search_paths(files, k=6)] == [[h.id for h in row] for row in hits]
