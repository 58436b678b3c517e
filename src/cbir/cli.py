"""``cbir <verb>``: one dispatcher over :mod:`cbir.commands`; every verb takes ``key=value`` overrides.

    cbir train  [overrides...]           same as python train.py   (Hydra: groups, multirun, sweeps)
    cbir eval   [overrides...]           same as python eval.py
    cbir export [overrides...]           same as python export.py (bundle, optionally an index)
    cbir search bundle=B query=Q [k=10] [index=I] [--json] [grid=out.png]   same as python search.py
    cbir classify bundle=B query=Q [k=10] [index=I] [--json]   k-NN label of each query from the index's labels
    cbir serve  bundle=B [index=I] [host=127.0.0.1] [port=8000] [api_key=K]  same as python -m cbir.serve
    cbir index  build|add|remove|info ...  embed a collection into a FAISS index (cbir index --help)
    cbir weights fetch NAME [NAME...]    seed torch hub's cache with offline weights (mobilenet_v2, imgsim, dinov2, ...)
    cbir weights list                    which weights load offline, and which are fetched here
    cbir models list | info NAME         the model zoo: trained models shipped in checkpoints/zoo (bundle=zoo:NAME)
    cbir data fetch fashion_mnist|emoji|icons  check for / download a benchmark dataset
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

VERBS = {"train": "train", "eval": "eval", "export": "export", "search": "search", "classify": "classify",
         "serve": "serve",
         "index": "index", "weights": "weights", "data": "data", "models": "models"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown command '{verb}'; choose from: {', '.join(VERBS)} (cbir --help)", file=sys.stderr)
        return 2
    command = importlib.import_module(f"cbir.commands.{VERBS[verb]}")
    return command.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
