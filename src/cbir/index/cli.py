"""``cbir index build|add|remove|info``: the index verbs of the ``cbir`` console script.

    cbir index build  --bundle DIR | --ckpt FILE  --collection SPEC --out DIR [--kind auto] [--target-recall 0.95]
                      [--processes N]          (or: torchrun --nproc_per_node N -m cbir.cli index build ...)
    cbir index add    --index DIR  --bundle DIR | --ckpt FILE  --collection SPEC
    cbir index remove --index DIR  [--id N ...] [--path P ...]
    cbir index info   --index DIR [--json]

SPEC is a folder of images, a CSV (path[,label]) or a data config's split such as ``emoji:test``.
"""

from __future__ import annotations

import argparse
import json
import logging

from cbir.errors import ConfigError

log = logging.getLogger(__name__)


def add_index_parser(verbs: argparse._SubParsersAction) -> None:
    index = verbs.add_parser("index", help="build, grow, shrink or describe a search index",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = index.add_subparsers(dest="action", required=True)

    build = actions.add_parser("build", help="embed a collection and build its FAISS index")
    _model_arguments(build)
    build.add_argument("--collection", required=True, help="image folder, CSV (path[,label]) or data:split")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq", "ondisk"],
                       help="ondisk: IVF lists in a file beside the index, for collections beyond RAM")
    build.add_argument("--target-recall", type=float, default=0.95, help="recall@10 vs exact search to reach")
    _extraction_arguments(build)
    build.add_argument("--no-resume", action="store_true", help="discard shards of an earlier, killed run")

    add = actions.add_parser("add", help="embed and add the images of a collection not indexed yet")
    add.add_argument("--index", required=True, help="index folder")
    _model_arguments(add)
    add.add_argument("--collection", required=True, help="image folder, CSV (path[,label]) or data:split")
    _extraction_arguments(add)

    remove = actions.add_parser("remove", help="remove images by id or path")
    remove.add_argument("--index", required=True, help="index folder")
    remove.add_argument("--id", type=int, nargs="+", default=[], dest="ids")
    remove.add_argument("--path", nargs="+", default=[], dest="paths")

    info = actions.add_parser("info", help="describe an index")
    info.add_argument("--index", required=True, help="index folder")
    info.add_argument("--json", action="store_true", help="print index.json")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--bundle", help="model bundle folder (from `cbir export`)")
    group.add_argument("--ckpt", help="training checkpoint (.ckpt)")


def _extraction_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster, not bit-identical)")
    parser.add_argument("--processes", type=int, default=1,
                        help="extraction ranks to spawn (one per GPU on CUDA; CPU threads are split between them)")


def load_model(args: argparse.Namespace):
    """(Embedder, bundle or None) from ``--bundle`` or ``--ckpt``."""
    if args.bundle:
        from cbir.export.bundle import load_bundle

        bundle = load_bundle(args.bundle)
        return bundle.embedder, bundle
    from cbir.factory import load_embedder_checkpoint

    return load_embedder_checkpoint(args.ckpt), None


def run_index_command(args: argparse.Namespace) -> None:
    from cbir.index import add_to_index, build_bundle_index, build_collection_index, load_index

    if args.action == "build":
        embedder, bundle = load_model(args)
        options = dict(kind=args.kind, target_recall=args.target_recall, batch_size=args.batch_size,
                       num_workers=args.num_workers, device=args.device, bf16=args.bf16, resume=not args.no_resume,
                       processes=args.processes)
        if bundle is not None:
            index = build_bundle_index(bundle, args.collection, args.out, **options)
        else:
            index = build_collection_index(embedder, args.collection, args.out, **options)
        if index is not None:  # None on the torchrun ranks other than 0 (they only extract)
            print(f"index {args.out}: {index.describe()}")
    elif args.action == "add":
        index = load_index(args.index)
        embedder, _ = load_model(args)
        ids, extraction = add_to_index(index, embedder, args.collection, index.path / "embeddings",
                                       batch_size=args.batch_size, num_workers=args.num_workers,
                                       device=args.device, bf16=args.bf16, processes=args.processes)
        index.save(index.path)
        print(f"index {args.index}: added {len(ids)} images ({len(extraction.skipped)} unreadable, skipped); "
              f"{len(index)} in all")
    elif args.action == "remove":
        if not args.ids and not args.paths:
            raise ConfigError("cbir index remove: name the images to remove with --id and/or --path")
        index = load_index(args.index)
        removed = index.remove(args.ids) + index.remove_paths(args.paths)
        index.save(index.path)
        print(f"index {args.index}: removed {removed} images; {len(index)} left")
    elif args.action == "info":
        index = load_index(args.index)
        print(json.dumps(index.info, indent=1) if args.json else f"index {args.index}: {index.describe()}")
