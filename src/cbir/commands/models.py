"""``cbir models list | info NAME | add NAME bundle=DIR ...``: the model zoo (:mod:`cbir.zoo`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cbir.commands.args import guarded
from cbir.errors import ConfigError

USAGE = ("usage: cbir models list | info NAME | add NAME bundle=DIR trained_on=TEXT description=TEXT "
         "command=TEXT [results=results.json]")


def _main(argv: Sequence[str]) -> int:
    from cbir.export.zoo import add_to_zoo
    from cbir.zoo import zoo_dir, zoo_entry, zoo_models

    if not argv or argv[0] not in ("list", "info", "add"):
        raise ConfigError(f"cbir models: {USAGE.removeprefix('usage: ')}")
    if argv[0] == "list":
        models = zoo_models()
        if not models:
            print(f"no zoo models in {zoo_dir()} (set $CBIR_ZOO, or run from a clone of the repository)")
        for name, entry in models.items():
            p1 = (entry.get("metrics") or {}).get("precision_at_1")
            score = f"P@1 {100 * p1:.1f}" if p1 is not None else ""
            print(f"zoo:{name:<16} {entry.get('backbone', ''):<14} {entry.get('input_size', '')} px  "
                  f"{entry.get('size_mb', '?')} MB  {score:<10} {entry.get('description', '')}")
        return 0
    if len(argv) < 2:
        raise ConfigError(f"cbir models {argv[0]}: name the model ({USAGE})")
    name = argv[1].removeprefix("zoo:")
    if argv[0] == "info":
        print(json.dumps({"name": f"zoo:{name}", **zoo_entry(name)}, indent=2))
        return 0
    options = dict(arg.split("=", 1) for arg in argv[2:] if "=" in arg)
    missing = [k for k in ("bundle", "trained_on", "description", "command") if not options.get(k)]
    if missing:
        raise ConfigError(f"cbir models add: {missing[0]}=... is required ({USAGE})")
    metrics = {}
    if options.get("results"):  # a train.py/eval.py results file: the last table row
        report = json.loads(Path(options["results"]).read_text())
        metrics = {k: round(float(v), 4) for k, v in list(report["results"].values())[-1].items()
                   if not k.startswith("num_")}
        metrics["protocol"] = report.get("protocol")
    entry = add_to_zoo(options["bundle"], name, description=options["description"], command=options["command"],
                       metrics=metrics, trained_on=options["trained_on"])
    print(f"zoo:{name}: {entry['size_mb']} MB ({entry['weights_dtype']} weights; float16 would change the embeddings by "
          f"up to {entry['fp16_max_abs_difference']:.1e}) → {zoo_dir() / name}")
    return 0


main = guarded(_main, USAGE)
