"""cbir: metric-learning framework for content-based image retrieval."""

from cbir.errors import CbirError

__version__ = "0.1.0"
__all__ = ["CbirError", "__version__"]
