"""The one query path: image → query preprocessing → bundle's resize/normalise → Embedder → index → hits.

The CLI (``search.py``, ``cbir search``), the Python API and the HTTP service all go through
:class:`Searcher`, so they cannot disagree about what a query returns.

    from cbir import Searcher
    searcher = Searcher.open("bundle/", "bundle/index")
    for hit in searcher.search_paths(["query.jpg"], k=10)[0]:
        print(hit.rank, hit.score, hit.path, hit.label)
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from cbir.data.catalog import ArrayRef, parse_array_source
from cbir.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageTooLargeError,
    decode_image_and_size,
    list_images,
    load_image,
)
from cbir.errors import BadImageError, CbirError, ConfigError
from cbir.index.calibration import match_probability

log = logging.getLogger(__name__)

MAX_K = 1000
RERANK_METHODS = ("none", "aqe", "kreciprocal", "pairwise")  # query-time re-ranking the Searcher offers
PAIRWISE_TOKEN_CACHE_MB = 1024  # rerank=pairwise: candidates' tokens kept in memory (a service meets them again)
KRECIPROCAL_CANDIDATES = 50  # rerank=kreciprocal re-orders this many first hits (or k, when larger)
__all__ = ["DEFAULT_MAX_PIXELS", "MAX_K", "Hit", "ImageTooLargeError", "Prediction", "SearchError", "Searcher",
           "check_k", "expand_query_paths", "format_hits", "parse_array_source", "read_query_image",
           "read_query_image_and_size", "vote"]


class SearchError(CbirError):
    """A search cannot run: bundle and index disagree, or the request is malformed."""


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is the cosine similarity; ``match`` the probability that the hit has the
    query's class, as measured on the index's own labelled collection when it was built
    (:mod:`cbir.index.calibration`), or None for an index without labels."""

    rank: int
    score: float
    id: int
    path: str | None
    label: str | None
    match: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Prediction:
    """k-NN classification of one query: the label with the most similarity-weighted votes among its top-k
    labelled hits, its share of the votes (``confidence``), every label's weight, and the hits behind it."""

    label: str | None
    confidence: float
    votes: dict[str, float]
    hits: list[Hit]

    def to_json(self) -> dict:
        return {"label": self.label, "confidence": self.confidence, "votes": self.votes,
                "hits": [hit.to_json() for hit in self.hits]}


def vote(hits: Sequence[Hit]) -> Prediction:
    """Weighted vote over ``hits``: each labelled hit adds ``max(score, 0)`` (cosine similarity) to its label,
    so near neighbours count more than far ones; ties go to the label of the better-ranked hit. No labelled
    hit: label None, confidence 0."""
    votes: dict[str, float] = {}
    first_rank: dict[str, int] = {}
    for hit in hits:
        if hit.label is None:
            continue
        votes[hit.label] = votes.get(hit.label, 0.0) + max(float(hit.score), 0.0)
        first_rank.setdefault(hit.label, hit.rank)
    if not votes:
        return Prediction(None, 0.0, {}, list(hits))
    label = max(votes, key=lambda name: (votes[name], -first_rank[name]))
    total = sum(votes.values())
    confidence = votes[label] / total if total > 0 else 1.0 / len(votes)
    ordered = dict(sorted(votes.items(), key=lambda item: -item[1]))
    return Prediction(label, round(confidence, 6), {k: round(v, 6) for k, v in ordered.items()}, list(hits))


QUERY_DECODE_PIXELS = 1 << 22  # 2048 x 2048: queries are decoded at most this large (the model sees far less)


def read_query_image(source: str | Path | bytes, *, name: str | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a query (a file path or the raw bytes of an upload) into HxWx3 uint8 RGB
    (:func:`cbir.data.images.decode_image`, with the pixel limit that stops decompression bombs), reduced to
    at most :data:`QUERY_DECODE_PIXELS` pixels."""
    return read_query_image_and_size(source, name=name, max_pixels=max_pixels)[0]


def read_query_image_and_size(source: str | Path | bytes, *, name: str | None = None,
                              max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`read_query_image` and the (width, height) of the image as sent, upright."""
    return decode_image_and_size(source, name=name, max_pixels=max_pixels, what="query",
                                 reduce_to=QUERY_DECODE_PIXELS)


class Searcher:
    """Bundle + index + query preprocessing. Thread-safe for concurrent searches (read-only state;
    torch inference runs under ``inference_mode``)."""

    def __init__(self, bundle, index, *, preprocess=None, device: str | None = None, precision: str = "auto",
                 runtime: str = "auto", one_shot: bool = False, batch_size: int = 32, rerank: str = "none",
                 rerank_n: int = 3, rerank_alpha: float = 3.0) -> None:
        if rerank not in RERANK_METHODS:
            raise SearchError(f"rerank={rerank!r}: choose from {', '.join(RERANK_METHODS)}")
        if int(rerank_n) < 1 or float(rerank_alpha) < 0:
            raise SearchError(f"rerank_n={rerank_n} / rerank_alpha={rerank_alpha}: need n >= 1 and alpha >= 0")
        self.rerank, self.rerank_n, self.rerank_alpha = rerank, int(rerank_n), float(rerank_alpha)

        bundle_dim, index_dim = int(bundle.embedding_dim), int(index.embedding_dim)
        if bundle_dim != index_dim:
            raise SearchError(f"bundle {bundle.path} embeds into {bundle_dim} dimensions but index "
                              f"{getattr(index, 'path', '')} holds {index_dim}-d vectors: build the index with "
                              "this bundle (`cbir index build --bundle ...`)")
        self._check_same_model(bundle, index)
        self.bundle, self.index = bundle, index
        self._pairwise = self._load_pairwise(bundle) if rerank == "pairwise" else None
        self._token_cache: OrderedDict[int, object] = OrderedDict()
        self._token_lock = threading.Lock()
        self.device, self.batch_size = device, int(batch_size)
        # runtime (cbir.export.runtimes): auto = the faster of eager and ONNX Runtime as the export measured them
        # (one_shot: a CLI process searching a few queries: ONNX Runtime, which needs no torch); precision=auto:
        # bf16 where the device has it natively and the bundle's export check passed (cbir.models.precision)
        self.encode = bundle.encoder(runtime, device=device, precision=precision, one_shot=one_shot)
        self.runtime, self.bf16 = self.encode.runtime, self.encode.bf16
        spec = bundle.preprocessing.query if preprocess is None else preprocess
        self.preprocess_spec = spec
        self.preprocessor = bundle.preprocessing.query_preprocessor(spec)  # `auto`: the bundle's fitted thresholds
        self._datasets: dict = {}  # array-backed datasets opened for their pixels, by name
        self._datasets_lock = threading.Lock()

    @staticmethod
    def _load_pairwise(bundle):
        """The bundle's re-ranker, checked against its model (SearchError when it has none)."""
        from cbir.models.pairwise import check_embedder

        try:
            reranker, info = bundle.reranker()
            check_embedder(info, bundle.embedder)
        except CbirError as exc:
            raise SearchError(f"rerank=pairwise: {exc}") from None
        return reranker, int(info["candidates"])

    @classmethod
    def open(cls, bundle_path: str | Path, index_path: str | Path | None = None, **kwargs) -> Searcher:
        """Load a bundle and an index folder (default: ``<bundle>/index``)."""
        from cbir.export.bundle import load_bundle
        from cbir.index.store import load_index

        bundle = load_bundle(bundle_path, lazy=True)  # the eager model is built only if the runtime needs it
        index_path = Path(index_path) if index_path else Path(bundle_path) / "index"
        return cls(bundle, load_index(index_path), **kwargs)

    @staticmethod
    def _check_same_model(bundle, index) -> None:
        built_with = (getattr(index, "metadata", None) or {}).get("bundle_weights_sha256")
        weights = (bundle.manifest.get("files") or {}).get("weights.pt")
        if built_with and weights and built_with != weights:
            log.warning("index %s was built with a different model than bundle %s (weights differ): "
                        "scores will be meaningless unless you rebuild the index", getattr(index, "path", ""),
                        bundle.path)

    # -- queries -----------------------------------------------------------------------------------
    def embed_images(self, images: Sequence[np.ndarray], preprocess=None) -> np.ndarray:
        """(N, D) float32 query embeddings of RGB uint8 images, after query preprocessing."""
        return self.embed_clean(self.clean_images(images, preprocess))

    def clean_images(self, images: Sequence[np.ndarray], preprocess=None,
                     deadline: float | None = None) -> list[np.ndarray]:
        """The query preprocessing alone (``preprocess``: a spec, None = the bundle's own), so a service can
        run it outside the inference worker. ``deadline`` (``time.monotonic()``): past it, the next step is
        not started (:class:`cbir.preprocess.query.CleanUpTimeout`)."""
        preprocessor = self.preprocessor if preprocess is None else self.bundle.preprocessing.query_preprocessor(
            preprocess)
        return [preprocessor.apply(image, deadline=deadline)[0] for image in images]

    def embed_clean(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float32 embeddings of images that were preprocessed already."""
        chunks = [self.encode(images[start:start + self.batch_size]) for start in range(0, len(images), self.batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.bundle.embedding_dim), np.float32)

    def embed_queries(self, images: Sequence[np.ndarray]):
        """Embeddings of preprocessed query images, and (``rerank=pairwise``) their re-ranker tokens, else None —
        for :meth:`search_embeddings`. With a single-scale model both come from one pass of the eager trunk
        (the head on its feature maps gives the embedding, the re-ranker pools the same maps), not two."""
        if self._pairwise is None:
            return self.embed_clean(images), None
        if tuple(self.bundle.embedder.scales) != (1.0,):  # multi-scale embeddings: the trunk runs per scale
            return self.embed_clean(images), self._tokens(images)
        import torch
        import torch.nn.functional as F

        from cbir.models.inference import inference_autocast

        embedder = self.bundle.embedder
        device = next(embedder.parameters()).device
        embeddings, tokens = [], []
        for start in range(0, len(images), self.batch_size):
            features = self._trunk(images[start:start + self.batch_size])
            with inference_autocast(device, bf16=self.bf16):
                embeddings.append(F.normalize(embedder.head(features).float(), dim=1).cpu())
            tokens.append(self._tokens_of(features))
        if not embeddings:
            return np.zeros((0, self.bundle.embedding_dim), np.float32), None
        return torch.cat(embeddings).numpy(), torch.cat(tokens)

    def search_images(self, images: Sequence[np.ndarray], k: int = 10, preprocess=None,
                      exclude: Sequence[str | None] | None = None, filter: str | None = None) -> list[list[Hit]]:
        """Top-``k`` hits of each image, best first. ``exclude``: per image, the source (file path or dataset
        reference) it was read from: a hit of that same source is the query finding itself and is left out
        (the next hit takes its place). ``filter``: only images whose label passes it (``label == 'cat'``,
        ``label in ['cat', 'dog']``; a Milvus-backed index takes any Milvus expression)."""
        k = check_k(k)
        self.check_filter(filter)
        if not len(images):
            return []
        cleaned = self.clean_images(images, preprocess)
        embeddings, tokens = self.embed_queries(cleaned)
        return self.search_embeddings(embeddings, k, exclude, filter, images=cleaned, tokens=tokens)

    def check_filter(self, filter: str | None) -> None:
        """A FAISS index's label filter is parsed before any image is embedded, so a typo costs nothing."""
        if filter is not None and str(filter).strip() and self.index.metadata.get("backend", "faiss") == "faiss":
            from cbir.index.filters import FilterError, parse_filter

            try:
                parse_filter(filter)
            except FilterError as exc:
                raise SearchError(str(exc)) from None

    def classify(self, images: Sequence[np.ndarray], k: int = 10, preprocess=None,
                 exclude: Sequence[str | None] | None = None, filter: str | None = None) -> list[Prediction]:
        """k-NN classification: each image's label by a similarity-weighted vote of its top-``k`` hits
        (:func:`vote`). The index must hold labels (a folder of class folders, a labelled CSV, a dataset).
        ``exclude`` as in :meth:`search_images` (an image must not vote for itself)."""
        if len(self.index) and not self.labelled:  # an empty index: search_images says so
            raise SearchError(self.no_labels_message())
        return [vote(hits) for hits in self.search_images(images, k, preprocess, exclude, filter)]

    @cached_property
    def labelled(self) -> bool:
        """Whether any indexed image has a label (k-NN classification needs them); read once, the
        Searcher's index does not change."""
        return bool(self.index.labelled)

    def no_labels_message(self) -> str:
        return (f"index {getattr(self.index, 'path', '')} holds no labels: k-NN classification needs a labelled "
                "collection (class sub-folders, a CSV with a label column, or a dataset)")

    def search_embeddings(self, embeddings: np.ndarray, k: int = 10, exclude: Sequence[str | None] | None = None,
                          filter: str | None = None, images: Sequence[np.ndarray] | None = None,
                          tokens=None) -> list[list[Hit]]:
        """Top-``k`` hits of each embedding (see :meth:`search_images`); ``rerank=pairwise`` also needs the query
        ``images`` (preprocessed already), since it compares them with each candidate image, and takes their
        re-ranker ``tokens`` when :meth:`embed_queries` gave them with the embeddings."""
        k = check_k(k)
        if self._pairwise is not None and (images is None or len(images) != len(embeddings)):
            raise SearchError("rerank=pairwise compares each query image with its candidates' images: search images "
                              "(search_images / search_paths, or search_embeddings(..., images=...))")
        if tokens is not None and len(tokens) != len(embeddings):
            raise SearchError(f"search_embeddings: {len(tokens)} re-ranker tokens for {len(embeddings)} embeddings "
                              "(pass embed_queries' tokens for the same images, or none)")
        self.check_filter(filter)
        size = len(self.index)
        if size == 0:
            raise SearchError(f"index {getattr(self.index, 'path', '')} is empty: add images to it first")
        excluded = [_same_source_key(source) for source in exclude] if exclude is not None else [None] * len(embeddings)
        wanted = k + 1 if any(excluded) else k  # one spare for the query itself
        queries = np.ascontiguousarray(embeddings, dtype=np.float32)
        if self.rerank == "aqe":
            queries = self._expanded(queries, excluded, filter, size)
        if self.rerank == "kreciprocal":
            scores, ids = self._kreciprocal(queries, excluded, filter, size, wanted)
        elif self._pairwise is not None:
            scores, ids = self._pairwise_reranked(queries, images, excluded, filter, size, wanted, tokens)
        else:
            scores, ids = self.index.search(queries, min(wanted, size), filter=filter)
        return [[Hit(rank=rank, score=score, id=i, path=_field(rec, "path"), label=_field(rec, "label"),
                     match=self._match(score))
                 for rank, (score, i, rec) in enumerate(row[:k], start=1)]
                for row in self._without_own(scores, ids, excluded, records=True)]

    def _without_own(self, scores: np.ndarray, ids: np.ndarray, excluded: Sequence[str | None],
                     records: bool = False) -> list[list[tuple]]:
        """Each row's hits, padding (-1) and the query's own image (same source) left out: ``(score, id, record)``
        with ``records`` (the store records, which the hits are built from), else ``(score, id)`` — the store is
        read only where a row has its own image to leave out."""
        rows = []
        for row_scores, row_ids, own in zip(scores, ids, excluded):
            valid = [(float(s), int(i)) for s, i in zip(row_scores, row_ids) if int(i) >= 0]
            found = self.index.lookup([i for _, i in valid]) if records or own is not None else [None] * len(valid)
            kept = [(s, i, rec) for (s, i), rec in zip(valid, found)
                    if own is None or _same_source_key(_field(rec, "path")) != own]
            rows.append(kept if records else [(s, i) for s, i, _ in kept])
        return rows

    def _expanded(self, queries: np.ndarray, excluded: Sequence[str | None], filter: str | None,
                  size: int) -> np.ndarray:
        """Alpha query expansion (αQE; Radenović et al. 2018, as ``eval.py rerank.methods=[aqe]`` measures it):
        each query becomes ``normalise(q + sum_i max(s_i, 0)^alpha * x_i)`` over its ``rerank_n`` best hits
        ``x_i`` (the query's own image left out), and that vector searches again. The hits' vectors come from
        the index (:meth:`CbirIndex.vectors`)."""
        from cbir.index.dba import expand_with_stored  # imports torch: only when expansion is asked for

        n = self.rerank_n
        scores, ids = self.index.search(queries, min(n + (1 if any(excluded) else 0), size), filter=filter)
        neighbours = [row[:n] for row in self._without_own(scores, ids, excluded)]
        return expand_with_stored(self.index, queries, neighbours, self.rerank_alpha)

    def _kreciprocal(self, queries: np.ndarray, excluded: Sequence[str | None], filter: str | None, size: int,
                     wanted: int) -> tuple[np.ndarray, np.ndarray]:
        """k-reciprocal re-ranking (as ``eval.py rerank.methods=[kreciprocal]`` measures it): the first
        ``max(k, 50)`` hits are re-ordered by ``0.7 * cosine + 0.3 * Jaccard`` of the query's ``rerank_n``
        nearest images and each hit's own (:func:`cbir.evaluation.rerank.kreciprocal_scores`); the score
        returned is that combination. Each hit's neighbours are one more search of its stored vector."""
        import torch

        from cbir.evaluation.rerank import kreciprocal_scores

        n = self.rerank_n
        spare = 1 if any(excluded) else 0
        scores, ids = self.index.search(queries, min(max(wanted, KRECIPROCAL_CANDIDATES) + spare, size),
                                        filter=filter)
        rows = self._without_own(scores, ids, excluded)
        candidates = sorted({i for row in rows for _, i in row})
        if not candidates:
            return scores[:, :0], ids[:, :0]
        _, found = self.index.search(self.index.vectors(candidates), min(n + 1, size), filter=filter)
        neighbours_of = {c: [int(i) for i in row if int(i) >= 0 and int(i) != c][:n] for c, row in zip(candidates, found)}
        width = max(len(row) for row in rows)
        out_scores = np.full((len(rows), width), -np.inf, np.float32)
        out_ids = np.full((len(rows), width), -1, np.int64)
        for r, row in enumerate(rows):
            if not row:
                continue
            pad = lambda ids_: ids_ + [-1] * (n - len(ids_))  # noqa: E731 - fixed-width neighbour lists
            rescored = kreciprocal_scores(torch.tensor([[s for s, _ in row]]),
                                          torch.tensor([pad([i for _, i in row[:n]])]),
                                          torch.tensor([[pad(neighbours_of[i]) for _, i in row]]))[0]
            order = torch.argsort(rescored, descending=True, stable=True).tolist()
            out_scores[r, :len(row)] = rescored[order].numpy()
            out_ids[r, :len(row)] = [row[j][1] for j in order]
        return out_scores, out_ids

    def _pairwise_reranked(self, queries: np.ndarray, images: Sequence[np.ndarray], excluded: Sequence[str | None],
                           filter: str | None, size: int, wanted: int, query_tokens=None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """The learned pairwise re-ranker (:mod:`cbir.models.pairwise`, as ``eval.py rerank.methods=[pairwise]``
        measures it) re-orders the first ``candidates`` hits by comparing each query image's feature maps with each
        candidate's (the hits after them keep the index's order); candidates' images are read from the collection
        and their tokens kept (half precision, the most recently used up to :data:`PAIRWISE_TOKEN_CACHE_MB`). The
        score returned is the re-ranker's, on the cosine's scale. A query whose candidates cannot all be read (a
        file deleted since it was indexed) keeps the index's order, with a warning naming the file."""
        import torch

        reranker, candidates = self._pairwise
        spare = 1 if any(excluded) else 0
        scores, ids = self.index.search(queries, min(max(wanted, candidates) + spare, size), filter=filter)
        rows = self._without_own(scores, ids, excluded)
        width = max((len(row) for row in rows), default=0)
        out_scores = np.full((len(rows), width), -np.inf, np.float32)
        out_ids = np.full((len(rows), width), -1, np.int64)
        with torch.inference_mode():
            if query_tokens is None:
                query_tokens = self._tokens(images)
            for r, row in enumerate(rows):
                if not row:
                    continue
                head = row[:max(candidates, 1)]
                cosine = torch.tensor([[s for s, _ in head]])
                try:
                    candidate_tokens = self._candidate_tokens([i for _, i in head])
                except (CbirError, OSError) as exc:
                    log.warning("rerank=pairwise: a candidate image could not be read (%s); this query keeps the "
                                "index's order", exc)
                    candidate_tokens = None
                if candidate_tokens is None:
                    rescored = cosine[0]
                else:
                    rescored = reranker.score(query_tokens[r:r + 1], candidate_tokens[None], cosine)[0] / (
                        reranker.cosine_scale.abs().clamp(min=1e-6))
                order = torch.argsort(rescored, descending=True, stable=True).tolist()
                out_scores[r, :len(head)] = rescored[order].float().numpy()
                out_ids[r, :len(head)] = [head[j][1] for j in order]
                out_scores[r, len(head):len(row)] = [s for s, _ in row[len(head):]]
                out_ids[r, len(head):len(row)] = [i for _, i in row[len(head):]]
        return out_scores, out_ids

    def _trunk(self, images: Sequence[np.ndarray]) -> dict:
        """The bundle's eager trunk's feature maps of preprocessed images, on its device, at the precision the
        queries are embedded in."""
        from cbir.models.inference import inference_autocast

        embedder = self.bundle.embedder  # eval mode, as the bundle loads it
        device = next(embedder.parameters()).device
        with inference_autocast(device, bf16=self.bf16):
            return embedder.backbone(self.bundle.to_tensor(images).to(device))

    def _tokens_of(self, features: dict):
        """Re-ranker tokens of trunk feature maps (float32, on the CPU, where the re-ranker runs)."""
        import torch

        with torch.inference_mode():
            return self._pairwise[0].tokens({name: value.float().cpu() for name, value in features.items()})

    def _tokens(self, images: Sequence[np.ndarray]):
        """Re-ranker tokens of preprocessed images (the bundle's eager trunk)."""
        return self._tokens_of(self._trunk(images))

    def _candidate_tokens(self, ids: Sequence[int]):
        import torch

        with self._token_lock:
            known = {i: self._token_cache[i] for i in ids if i in self._token_cache}
            for i in known:
                self._token_cache.move_to_end(i)  # least recently used leave first
        missing = [i for i in dict.fromkeys(ids) if i not in known]
        if missing:
            fresh = self._tokens([self.load_source(self.image_source(i)) for i in missing]).half()
            known.update(zip(missing, [t.clone() for t in fresh]))  # own storage, not views of the batch
            budget = PAIRWISE_TOKEN_CACHE_MB * 2**20 // max(fresh[0].numel() * fresh.element_size(), 1)
            with self._token_lock:
                for i in missing:
                    self._token_cache[i] = known[i]
                while len(self._token_cache) > budget:
                    self._token_cache.popitem(last=False)
        return torch.stack([known[i] for i in ids])  # half: the re-ranker's score reads each slice as float

    def _match(self, score: float) -> float | None:
        if self.rerank != "none":  # the curve was fitted on plain scores; an expanded query's scores run higher
            return None
        probability = match_probability(score, self.index.info.get("score_calibration"))
        return None if probability is None else round(probability, 4)

    def search_paths(self, paths: Iterable[str | Path], k: int = 10, preprocess=None,
                     exclude_self: bool = True, filter: str | None = None) -> list[list[Hit]]:
        """Search each image file; a folder expands to the images inside it (sorted). With ``exclude_self``, a
        query file that the index holds does not come back as its own first hit."""
        files = expand_query_paths(paths)
        results: list[list[Hit]] = []
        for start in range(0, len(files), self.batch_size):
            batch = files[start:start + self.batch_size]
            images = [read_query_image(p) for p in batch]
            results += self.search_images(images, k, preprocess, [str(p) for p in batch] if exclude_self else None,
                                          filter)
        return results

    def image_source(self, image_id: int) -> str:
        """Where an indexed image comes from: a file path, or ``<dataset>:<array>/<row>`` for array-backed
        datasets (Fashion-MNIST); SearchError for an unknown id."""
        try:
            records = self.index.lookup([int(image_id)])
        except (KeyError, IndexError, ValueError, TypeError):
            records = [None]
        source = _field(records[0], "path") if records and records[0] is not None else None
        if not source:
            raise SearchError(f"no indexed image with id {image_id}")
        return source

    def image_path(self, image_id: int) -> Path:
        """The file of an indexed image; SearchError for an unknown id or an array-backed image."""
        source = self.image_source(image_id)
        if parse_array_source(source) is not None:
            raise SearchError(f"indexed image {image_id} is row {source} of a dataset array, not a file")
        return Path(source)

    def load_source(self, source: str) -> np.ndarray:
        """HxWx3 uint8 RGB pixels of an indexed image's source (for thumbnails and result grids): a file, or
        a row of a dataset array; a row the dataset does not have is a SearchError."""
        array_ref = parse_array_source(source)
        if array_ref is None:
            return load_image(None, source)
        dataset, array, row = array_ref
        catalog = self.dataset_catalog(dataset)
        if array not in catalog.arrays or row >= len(catalog.arrays[array]):
            raise SearchError(f"{source} is not in collection {dataset}")
        return load_image(catalog, ArrayRef(array, row))

    def dataset_catalog(self, name: str):
        """The catalog of data config ``name``, read once even when many threads ask at the same moment
        (50 cold thumbnail requests used to read the whole dataset 50 times), for array-backed sources."""
        if name not in self._datasets:
            with self._datasets_lock:
                if name not in self._datasets:
                    from cbir.data.readers import read_data_config

                    self._datasets[name] = read_data_config(name)
        return self._datasets[name]

    def info(self) -> dict:
        return {"bundle": str(self.bundle.path), "backbone": self.bundle.manifest.get("backbone"),
                "embedding_dim": self.bundle.embedding_dim, "index": str(getattr(self.index, "path", "")),
                "index_size": len(self.index), "index_type": (getattr(self.index, "metadata", None) or {}).get("factory"), "preprocess": self.preprocess_spec,
                "runtime": self.runtime, "precision": "bf16" if self.bf16 else "fp32"}


def _same_source_key(source: str | Path | None) -> str | None:
    """What makes two sources the same image: the absolute, normalised file path (the index stores absolute
    paths), or a dataset reference as it is."""
    if source is None:
        return None
    text = str(source)
    if parse_array_source(text) is not None and not Path(text).exists():
        return text
    return os.path.normcase(os.path.abspath(text))


def _field(record, name: str):
    if record is None:
        return None
    value = record.get(name) if isinstance(record, dict) else getattr(record, name, None)
    return None if value is None else str(value)


def check_k(k) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise SearchError(f"k={k!r}: must be a whole number") from None
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k={k}: must be between 1 and {MAX_K}")
    return k


def expand_query_paths(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for entry in paths:
        entry = Path(entry)
        if entry.is_dir():
            found = list_images(entry)
            if not found:
                raise BadImageError(f"query folder {entry} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
        elif entry.is_file():
            files.append(entry)
        else:
            raise BadImageError(f"query {entry}: no such file or folder")
    if not files:
        raise ConfigError("query: give at least one image file or folder")
    return files


def format_hits(query: str, hits: Sequence[Hit]) -> str:
    """A ranked Markdown table of one query's hits; the score is the cosine similarity of the two embeddings
    (1 = the same direction), which the header says, and, where the index was calibrated on its labels, the
    probability that the hit has the query's class (``match``)."""
    calibrated = any(h.match is not None for h in hits)
    header = "| rank | cosine | match | id | label | path |" if calibrated else "| rank | cosine | id | label | path |"
    lines = [f"query: {query}", header, "|---:|---:|---:|---:|---|---|" if calibrated else "|---:|---:|---:|---|---|"]
    for h in hits:
        match = (f" {100 * h.match:.0f}% |" if h.match is not None else " |") if calibrated else ""
        lines.append(f"| {h.rank} | {h.score:.4f} |{match} {h.id} | {h.label if h.label is not None else ''} | {h.path} |")
    return "\n".join(lines)
