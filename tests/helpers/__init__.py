"""Shared test code that is not a pytest fixture: tiny on-disk datasets, config composition, paths, and the
callbacks and builders several test modules use. Importable as ``helpers`` (``tests/`` is on ``pythonpath``
in pyproject.toml); fixtures stay in ``tests/conftest.py``."""
