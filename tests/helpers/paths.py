"""Where things are: the repository root (scripts, notebooks, benchmarks), the tests folder, and the
git-ignored folder for test artifacts (screenshots, the fuzzer's summary)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
ARTIFACTS = TESTS / "artifacts"
