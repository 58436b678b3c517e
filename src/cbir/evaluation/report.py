"""Print and save retrieval results as a small table."""

from __future__ import annotations

import os
from pathlib import Path

from cbir.io import atomic_write_json

COLUMNS = [("precision_at_1", "P@1"), ("recall_at_1", "R@1"), ("recall_at_2", "R@2"), ("recall_at_4", "R@4"),
           ("recall_at_8", "R@8"), ("r_precision", "R-prec"), ("map_at_r", "MAP@R"), ("knn_accuracy", "kNN")]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table, one row per model, metrics in %."""
    present = [(key, title) for key, title in COLUMNS if any(key in m for m in rows.values())]
    name_width = max(len("model"), *(len(n) for n in rows))
    header = "| " + "model".ljust(name_width) + " | " + " | ".join(t.rjust(6) for _, t in present) + " |"
    rule = "|" + "-" * (name_width + 2) + "|" + "|".join("-" * 8 for _ in present) + "|"
    lines = [header, rule]
    for name, metrics in rows.items():
        cells = [f"{100 * metrics[k]:6.2f}" if k in metrics else "     –" for k, _ in present]
        lines.append("| " + name.ljust(name_width) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_payload(protocol: str, results: dict[str, dict[str, float]], **extra) -> dict:
    """The one shape of a results JSON (training's ``results.json``, ``eval.json``, benchmarks):
    ``{"protocol": ..., "results": {row name: {metric: value}}, ...extra}``."""
    return {"protocol": protocol, "results": results, **extra}


def write_results(path: str | os.PathLike, protocol: str, results: dict[str, dict[str, float]], **extra) -> Path:
    """Write :func:`results_payload` atomically."""
    return atomic_write_json(path, results_payload(protocol, results, **extra), indent=2)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Any other JSON report, atomically (a crash never leaves half a file)."""
    return atomic_write_json(path, payload, indent=2)
