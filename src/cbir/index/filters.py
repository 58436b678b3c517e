"""Label filters for searches: ``label == 'cat'``, ``label != 'cat'``, ``label in ['cat', 'dog']``,
``label not in [...]``.

The same text is a Milvus boolean expression (the Milvus backend hands it to the engine, which also accepts
its whole expression language); the FAISS backend understands this subset, turns it into the set of ids
whose label matches and searches with a FAISS id selector. Anything else is one clear line, not a silent
unfiltered search.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from cbir.errors import ConfigError

FILTER_FIELDS = ("label",)
_CLAUSE = re.compile(r"^\s*(?P<field>[A-Za-z_]\w*)\s*(?P<op>==|!=|not\s+in|in)\s*(?P<value>.+?)\s*$", re.S)


class FilterError(ConfigError):
    """A search filter that cannot be understood."""


@dataclass(frozen=True)
class LabelFilter:
    """One clause over the label: ``op`` is ``in`` or ``not in`` over ``values``."""

    field: str
    negated: bool
    values: frozenset[str]
    text: str

    def matches(self, label: str | None) -> bool:
        inside = label is not None and str(label) in self.values
        return inside != self.negated


def parse_filter(text: str | None) -> LabelFilter | None:
    """``None`` / blank → no filter; otherwise the clause, or FilterError naming what is supported."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    match = _CLAUSE.match(text)
    if not match:
        raise FilterError(_unsupported(text))
    field, op, raw = match["field"], " ".join(match["op"].split()), match["value"]
    if field not in FILTER_FIELDS:
        raise FilterError(f"filter {text!r}: cannot filter on {field!r}; filters name the label "
                          f"(label == 'cat', label in ['cat', 'dog'])")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise FilterError(f"filter {text!r}: {raw} is not a quoted string or a list of them "
                          "(label == 'cat', label in ['cat', 'dog'])") from None
    if op in ("==", "!="):
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise FilterError(f"filter {text!r}: compare the label with one quoted string (label {op} 'cat')")
        values = frozenset({str(value)})
    else:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int)) for v in value):
            raise FilterError(f"filter {text!r}: 'in' takes a list of quoted strings (label in ['cat', 'dog'])")
        values = frozenset(str(v) for v in value)
    return LabelFilter(field, op in ("!=", "not in"), values, text)


def _unsupported(text: str) -> str:
    return (f"filter {text!r}: not understood; a FAISS index filters on the label with one clause: label == 'cat', "
            "label != 'cat', label in ['cat', 'dog'] or label not in [...] (an index built with backend=milvus "
            "takes any Milvus expression)")
