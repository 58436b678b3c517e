"""The index's user-facing errors (all :class:`cbir.errors.CbirError`: one line on the command line)."""

from cbir.errors import CbirError


class IndexFilesError(CbirError):
    """An index folder is missing files or its files disagree."""


class DimensionMismatchError(CbirError):
    """Query embeddings do not have the index's dimension (another model built the index)."""


class ReadOnlyIndexError(CbirError):
    """An on-disk index cannot be changed in place."""


class ExtractionMismatchError(CbirError):
    """A work folder holds shards of another model or collection."""


class DistributedExtractionError(CbirError):
    """A rank of a multi-process extraction failed (the shards other ranks finished are kept)."""


class VectorsUnavailableError(CbirError):
    """An index kind that cannot give back its stored vectors (query expansion needs them)."""
