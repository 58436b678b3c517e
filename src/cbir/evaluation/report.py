"""Print and save retrieval results as a small table."""

from __future__ import annotations

import json
import os
from pathlib import Path

COLUMNS = [("precision_at_1", "P@1"), ("recall_at_1", "R@1"), ("recall_at_2", "R@2"), ("recall_at_4", "R@4"),
           ("recall_at_8", "R@8"), ("r_precision", "R-prec"), ("map_at_r", "MAP@R")]


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


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write atomically: a crash never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
