"""cbir: metric-learning framework for content-based image retrieval.

``cbir.Searcher`` (bundle + index → ranked hits) and ``cbir.load_bundle`` are the Python entry points;
they are imported on first use so ``import cbir`` stays light."""

from cbir.errors import CbirError

__version__ = "0.1.0"
__all__ = ["CbirError", "Searcher", "load_bundle", "__version__"]


def __getattr__(name: str):
    if name == "Searcher":
        from cbir.search import Searcher

        return Searcher
    if name == "load_bundle":
        from cbir.export.bundle import load_bundle

        return load_bundle
    raise AttributeError(f"module 'cbir' has no attribute {name!r}")
