"""The HTTP service and web page over :class:`cbir.Searcher` (``python -m cbir.serve``, ``cbir serve``)."""

from cbir.serve.app import create_app

__all__ = ["create_app"]
