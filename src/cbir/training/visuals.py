"""Pictures of what a model retrieves, drawn while it trains: a few fixed validation queries with their
top-k hits each validation epoch (:class:`RetrievalExamples`), and a 2-D map of the validation
embeddings coloured by class at the end (:class:`EmbeddingMap`).

Both read the validation outputs the module has already gathered (``last_eval_outputs``: no second
pass over the data) and the pixels from the datamodule's catalog. Every picture is written as a PNG
under the run folder's ``images/`` whatever the logger, and also sent to TensorBoard and W&B when those
loggers are active. Drawing runs on rank zero only, never in ``fast_dev_run`` or the sanity check, and a
failure to draw warns instead of stopping training.
"""

from __future__ import annotations

import colorsys
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw

from cbir.data.datasets import ROLE_GALLERY, ROLE_QUERY
from cbir.data.images import cached_loader
from cbir.evaluation.metrics import unique_by_id
from cbir.io import atomic_path, atomic_write_json
from cbir.visual.grid import Tile, render_grid

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
MAP_METHODS = ("auto", "umap", "tsne", "pca")
TSNE_MAX_POINTS = 3000  # method=auto without UMAP: t-SNE up to this many points (~15 s here), PCA beyond


# -- the validation set as drawn -------------------------------------------------------------------

@dataclass(frozen=True)
class EvalSet:
    """One evaluation's outputs, one row per dataset item (sorted by dataset index), on the CPU."""

    indices: np.ndarray  # catalog record index of each row
    embeddings: torch.Tensor  # (N, D) L2-normalised
    labels: np.ndarray
    roles: np.ndarray  # bit mask of ROLE_QUERY / ROLE_GALLERY

    @classmethod
    def from_outputs(cls, outputs: dict[str, torch.Tensor]) -> EvalSet | None:
        """From a module's ``last_eval_outputs``; None when they are not retrieval outputs (data=pairs)."""
        if not outputs or not {"index", "embedding", "label", "role"} <= outputs.keys():
            return None
        ids, embeddings, labels, roles = unique_by_id(outputs["index"], outputs["embedding"], outputs["label"],
                                                      outputs["role"])
        return cls(ids.cpu().numpy(), embeddings.detach().float().cpu(), labels.cpu().numpy(), roles.cpu().numpy())

    @property
    def is_query(self) -> np.ndarray:
        return (self.roles & ROLE_QUERY) > 0

    @property
    def is_gallery(self) -> np.ndarray:
        return (self.roles & ROLE_GALLERY) > 0

    @property
    def all_vs_all(self) -> bool:
        return bool(self.is_query.all() and self.is_gallery.all())


def choose_queries(eval_set: EvalSet, num_queries: int) -> np.ndarray:
    """Dataset indices of ``num_queries`` queries spread evenly over the classes (the first item of
    each chosen class), preferring queries whose class has another gallery item to find. The same
    validation set always gives the same choice."""
    gallery_counts: dict[int, int] = {}
    for label in eval_set.labels[eval_set.is_gallery]:
        gallery_counts[int(label)] = gallery_counts.get(int(label), 0) + 1
    rows = np.flatnonzero(eval_set.is_query)
    own = eval_set.is_gallery[rows].astype(int)  # a query that is also in the gallery does not count itself
    answerable = rows[np.array([gallery_counts.get(int(eval_set.labels[r]), 0) for r in rows], int) > own]
    rows = answerable if len(answerable) else rows
    by_class: dict[int, list[int]] = {}
    for row in rows:
        by_class.setdefault(int(eval_set.labels[row]), []).append(int(row))
    classes = sorted(by_class)
    if not classes:
        return np.zeros(0, dtype=np.int64)
    spread = np.unique(np.linspace(0, len(classes) - 1, min(num_queries, len(classes))).round().astype(int))
    picked = set(spread.tolist())
    order = [classes[i] for i in spread] + [c for i, c in enumerate(classes) if i not in picked]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < num_queries and depth < max(len(v) for v in by_class.values()):
        chosen += [by_class[c][depth] for c in order if depth < len(by_class[c])][: num_queries - len(chosen)]
        depth += 1
    return eval_set.indices[np.asarray(chosen, dtype=np.int64)]


def top_k(eval_set: EvalSet, query_indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar gallery items of each query (dataset indices and cosine similarities,
    best first); a query never finds itself. Rows of -1 / NaN where the gallery has fewer items."""
    position = {int(i): row for row, i in enumerate(eval_set.indices)}
    rows = [position[int(i)] for i in query_indices]
    gallery = np.flatnonzero(eval_set.is_gallery)
    similarity = eval_set.embeddings[rows] @ eval_set.embeddings[gallery].T
    similarity[torch.as_tensor(eval_set.indices[gallery])[None, :] == torch.as_tensor(query_indices)[:, None]] = -np.inf
    count = min(k, len(gallery))
    scores, columns = similarity.topk(count, dim=1) if count else (similarity[:, :0], similarity[:, :0].long())
    hits = eval_set.indices[gallery][columns.numpy()]
    scores = scores.numpy().astype(np.float64)
    hits[~np.isfinite(scores)] = -1
    scores[~np.isfinite(scores)] = np.nan
    return hits, scores


# -- pictures --------------------------------------------------------------------------------------

def render_retrieval_examples(query_indices: np.ndarray, hits: np.ndarray, scores: np.ndarray,
                              label_of: Callable[[int], str], pixels_of: Callable[[int], np.ndarray],
                              thumb: int = 96) -> Image.Image:
    """One row per query: the query, then its hits with rank and score, green bordered when the hit has
    the query's class and red when not (:func:`cbir.visual.grid.render_grid`'s drawing, one grid per row)."""
    columns = max(1, hits.shape[1])
    rows = []
    for query, row_hits, row_scores in zip(query_indices, hits, scores):
        found = [Tile(rank=rank, score=float(score), path=str(int(hit)), label=label_of(int(hit)))
                 for rank, (hit, score) in enumerate(zip(row_hits, row_scores), start=1) if hit >= 0]
        rows.append(render_grid(pixels_of(int(query)), found, query_label=label_of(int(query)), thumb=thumb,
                                columns=columns, load=lambda path: pixels_of(int(path))))
    canvas = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for n, row in enumerate(rows):
        canvas.paste(row, (0, n * rows[0].height))
    return canvas


def project_2d(embeddings: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of ``embeddings`` and the method that made them: ``umap`` (umap-learn), ``tsne``
    (scikit-learn) or ``pca``. ``auto`` takes UMAP when it is installed, else t-SNE up to
    TSNE_MAX_POINTS points and PCA beyond; a method that is missing or fails falls back to PCA."""
    if method not in MAP_METHODS:
        raise ValueError(f"embedding map method must be one of {', '.join(MAP_METHODS)}, got {method!r}")
    x = np.asarray(embeddings, dtype=np.float32)
    if len(x) < 5:
        return _pca(x), "pca"  # neighbour graphs need a few points
    if method == "auto":
        method = "umap" if _importable("umap") else ("tsne" if len(x) <= TSNE_MAX_POINTS and
                                                     _importable("sklearn.manifold") else "pca")
    threads = torch.get_num_threads()  # UMAP's numba start-up changes torch's thread count in this process
    try:
        if method == "umap":
            import umap

            with warnings.catch_warnings():  # "n_jobs overridden by setting random_state" and the like
                warnings.simplefilter("ignore")
                reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), random_state=seed)
                return np.asarray(reducer.fit_transform(x), dtype=np.float64), "umap"
        if method == "tsne":
            from sklearn.manifold import TSNE

            perplexity = float(min(30.0, (len(x) - 1) / 3))
            return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x), "tsne"
    except Exception as exc:  # noqa: BLE001 - an optional library: fall back rather than lose the map
        warnings.warn(f"embedding map: {method} failed ({type(exc).__name__}: {exc}); using PCA", stacklevel=2)
    finally:
        torch.set_num_threads(threads)
    return _pca(x), "pca"


def _pca(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=0, keepdims=True)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    coords = centred @ vt[:2].T
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def same_class_neighbour_rate(coords: np.ndarray, labels: np.ndarray, chunk: int = 1024) -> float:
    """How often a point's nearest other point on the map has its class: how well the 2-D picture keeps
    the classes together (compare it with P@1 in the full embedding space)."""
    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) < 2:
        return float("nan")
    same = 0
    for start in range(0, len(coords), chunk):
        block = coords[start:start + chunk]
        distance = ((block[:, None, :] - coords[None, :, :]) ** 2).sum(axis=2)
        distance[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
        same += int((labels[distance.argmin(axis=1)] == labels[start:start + chunk]).sum())
    return same / len(coords)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - ImportError, or a broken install (numba for UMAP)
        return False
    return True


def class_colour(position: int) -> tuple[int, int, int]:
    """A distinct colour for the ``position``-th class (golden-ratio hues, three brightness levels)."""
    hue = (position * 0.618033988749895) % 1.0
    value = (0.85, 0.6, 0.98)[(position // 7) % 3]
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.85, value))


@dataclass(frozen=True)
class MapLayout:
    size: int = 720  # the plot square, pixels
    margin: int = 16
    header: int = 24  # title strip above the plot
    dot: int = 3  # dot radius
    legend_width: int = 220  # legend column, drawn when there are at most MAX_LEGEND classes
    max_legend: int = 20


def render_embedding_map(coords: np.ndarray, labels: np.ndarray, class_names: list[str], title: str,
                         is_query: np.ndarray | None = None, layout: MapLayout = MapLayout()
                         ) -> tuple[Image.Image, np.ndarray]:
    """A scatter plot of ``coords`` coloured by class (circles; squares for gallery-only items when
    queries and gallery differ), and each point's pixel position in it."""
    classes = sorted(set(int(c) for c in labels))
    colour = {c: class_colour(n) for n, c in enumerate(classes)}
    legend = len(classes) <= layout.max_legend
    width = layout.size + (layout.legend_width if legend else 0)
    canvas = Image.new("RGB", (width, layout.size + layout.header), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((layout.margin, 6), title, fill="black")
    span = layout.size - 2 * layout.margin
    low, high = coords.min(axis=0), coords.max(axis=0)
    scale = span / np.maximum(high - low, 1e-12)
    pixels = np.round(layout.margin + (coords - low) * scale).astype(int)
    pixels[:, 1] = layout.header + layout.size - 1 - pixels[:, 1]  # y up
    draw.rectangle([0, layout.header, layout.size - 1, layout.header + layout.size - 1], outline="#999999")
    r = layout.dot
    for (x, y), label, query in zip(pixels, labels,
                                    is_query if is_query is not None else np.ones(len(labels), bool)):
        box = [x - r, y - r, x + r, y + r]
        (draw.ellipse if query else draw.rectangle)(box, fill=colour[int(label)])
    if legend:
        for n, c in enumerate(classes):
            y = layout.header + layout.margin + n * 16
            draw.rectangle([layout.size + 8, y, layout.size + 18, y + 10], fill=colour[c])
            draw.text((layout.size + 24, y - 1), str(class_names[c] if c < len(class_names) else c)[:30], fill="black")
    return canvas, pixels


# -- publishing ------------------------------------------------------------------------------------

def publish_image(trainer: pl.Trainer, key: str, image: Image.Image, path: Path) -> None:
    """Write ``image`` to ``path`` (PNG, atomically) and send it to every TensorBoard and W&B logger."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, np.asarray(image), global_step=trainer.global_step, dataformats="HWC")
            logger.experiment.flush()
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=trainer.global_step)


class _Visual(pl.Callback):
    """What both pictures share: where they go, when to skip, and never failing training."""

    name = "picture"

    def __init__(self, output_dir: str | os.PathLike | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir else None

    def image_dir(self, trainer: pl.Trainer) -> Path:
        return self.output_dir or Path(trainer.default_root_dir) / IMAGES_DIR

    @staticmethod
    def should_draw(trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and not trainer.sanity_checking and not trainer.fast_dev_run

    def sources(self, trainer: pl.Trainer, outputs: dict[str, torch.Tensor] | None):
        """The validation set as drawn, record index → pixels, and record index → class name; None
        when there is nothing to draw (no retrieval outputs, or no catalog to read pixels from)."""
        eval_set = EvalSet.from_outputs(outputs or {})
        catalog = getattr(trainer.datamodule, "catalog", None) if trainer.datamodule is not None else None
        if eval_set is None or catalog is None or not len(eval_set.indices):
            return None
        pixels_of = cached_loader(catalog, getattr(trainer.datamodule, "cache", None))

        def label_of(index: int) -> str:
            label = catalog.records[index].label
            return catalog.class_names[label] if label < len(catalog.class_names) else str(label)

        return eval_set, pixels_of, label_of, catalog

    def draw_safely(self, draw: Callable[[], None]) -> None:
        try:
            draw()
        except Exception as exc:  # noqa: BLE001 - a picture is never worth a crashed training run
            log.warning("%s not drawn: %s: %s", self.name, type(exc).__name__, exc)
            warnings.warn(f"{self.name} not drawn: {type(exc).__name__}: {exc}", stacklevel=2)


class RetrievalExamples(_Visual):
    """Every ``every_n_epochs`` validation epochs, ``images/retrieval_epoch{NNN}.png``: ``num_queries``
    fixed validation queries (chosen once, spread over the classes), each followed by its top ``k``
    gallery hits with green/red borders for the right/wrong class and the cosine similarity. A JSON of
    the same name lists the queries, hits, labels and scores."""

    name = "retrieval examples"

    def __init__(self, num_queries: int = 8, k: int = 8, every_n_epochs: int = 1, thumb_size: int = 96,
                 output_dir: str | os.PathLike | None = None) -> None:
        super().__init__(output_dir)
        if num_queries < 1 or k < 1 or every_n_epochs < 1 or thumb_size < 16:
            raise ValueError("retrieval examples: num_queries, k and every_n_epochs must be >= 1 and "
                             f"thumb_size >= 16 (got {num_queries}, {k}, {every_n_epochs}, {thumb_size})")
        self.num_queries, self.k, self.every_n_epochs, self.thumb_size = num_queries, k, every_n_epochs, thumb_size
        self.queries: np.ndarray | None = None  # dataset indices, fixed at the first drawing

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_draw(trainer) and trainer.current_epoch % self.every_n_epochs == 0:
            self.draw_safely(lambda: self.draw(trainer, pl_module))

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        found = self.sources(trainer, getattr(pl_module, "last_eval_outputs", None))
        if found is None:
            return None
        eval_set, pixels_of, label_of, _ = found
        if self.queries is None or not np.isin(self.queries, eval_set.indices[eval_set.is_query]).all():
            self.queries = choose_queries(eval_set, self.num_queries)
        if not len(self.queries):
            return None
        hits, scores = top_k(eval_set, self.queries, self.k)
        image = render_retrieval_examples(self.queries, hits, scores, label_of, pixels_of, self.thumb_size)
        path = self.image_dir(trainer) / f"retrieval_epoch{trainer.current_epoch:03d}.png"
        label = {int(i): int(l) for i, l in zip(eval_set.indices, eval_set.labels)}
        atomic_write_json(path.with_suffix(".json"), {
            "epoch": trainer.current_epoch, "k": self.k, "thumb_size": self.thumb_size,
            "protocol": "all-vs-all" if eval_set.all_vs_all else "query-vs-gallery",
            "rows": [{"query": int(q), "label": label[int(q)],
                      "hits": [int(h) for h in row if h >= 0],
                      "hit_labels": [label[int(h)] for h in row if h >= 0],
                      "scores": [round(float(s), 6) for s in row_scores if np.isfinite(s)]}
                     for q, row, row_scores in zip(self.queries, hits, scores)]})
        publish_image(trainer, "val/retrieval_examples", image, path)
        return path


class EmbeddingMap(_Visual):
    """At the end of training, ``images/embedding_map.png``: the last validation embeddings in 2-D
    (``method``: auto | umap | tsne | pca; see :func:`project_2d`), at most ``max_points`` of them
    (a fixed random subset), coloured by class. ``embedding_map.json`` records the method and each
    point's record index, label and pixel position."""

    name = "embedding map"

    def __init__(self, method: str = "auto", max_points: int = 2000, seed: int = 0,
                 output_dir: str | os.PathLike | None = None) -> None:
        super().__init__(output_dir)
        if method not in MAP_METHODS:
            raise ValueError(f"embedding_map.method must be one of {', '.join(MAP_METHODS)}, got {method!r}")
        if max_points < 2:
            raise ValueError(f"embedding_map.max_points must be >= 2, got {max_points}")
        self.method, self.max_points, self.seed = method, max_points, seed
        self.outputs: dict[str, torch.Tensor] | None = None  # the last validation epoch's, kept for the end
        self.epoch = -1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_draw(trainer):
            self.outputs, self.epoch = getattr(pl_module, "last_eval_outputs", None), trainer.current_epoch

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_draw(trainer) and self.outputs:
            self.draw_safely(lambda: self.draw(trainer))
        self.outputs = None

    def draw(self, trainer: pl.Trainer) -> Path | None:
        found = self.sources(trainer, self.outputs)
        if found is None:
            return None
        eval_set, _, _, catalog = found
        rows = np.arange(len(eval_set.indices))
        if len(rows) > self.max_points:
            rows = np.sort(np.random.default_rng(self.seed).choice(rows, self.max_points, replace=False))
        coords, method = project_2d(eval_set.embeddings[rows].numpy(), self.method, self.seed)
        labels = eval_set.labels[rows]
        mixed_roles = not eval_set.all_vs_all
        neighbours = same_class_neighbour_rate(coords, labels)
        title = (f"{method.upper()} of {len(rows)}/{len(eval_set.indices)} validation embeddings, "
                 f"{len(set(labels.tolist()))} classes, epoch {self.epoch}; nearest dot same class: "
                 f"{100 * neighbours:.0f}%"
                 + (" (circles: queries, squares: gallery only)" if mixed_roles else ""))
        image, pixels = render_embedding_map(coords, labels, catalog.class_names, title,
                                             eval_set.is_query[rows] if mixed_roles else None)
        path = self.image_dir(trainer) / "embedding_map.png"
        atomic_write_json(path.with_suffix(".json"), {
            "method": method, "requested": self.method, "epoch": self.epoch,
            "num_points": int(len(rows)), "num_items": int(len(eval_set.indices)),
            "num_classes": len(set(labels.tolist())), "same_class_neighbour_rate": neighbours,
            "points": [{"index": int(eval_set.indices[r]), "label": int(eval_set.labels[r]),
                        "x": float(xy[0]), "y": float(xy[1]), "px": int(p[0]), "py": int(p[1])}
                       for r, xy, p in zip(rows, coords, pixels)]})
        publish_image(trainer, "val/embedding_map", image, path)
        log.info("embedding map (%s, %d points): %s", method, len(rows), path)
        return path
