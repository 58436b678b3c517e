"""Generalisation benchmark: does fine-tuning on emoji cost other domains, and what does each
keep-option cost in-domain?

Every recipe trains a trunk (``--trunk``: ImageNet MobileNetV2 or EfficientNet-Lite0 at 64 px, or DINOv2
ViT-S/14 at 70 px) on
the emoji training classes with the same budget (epochs, batch, seed), its best checkpoint chosen on the
held-out *training* classes (``data.val_classes``, never the test classes), and is scored through
``eval.py`` exactly as users run it on:

- emoji all-vs-all on the unseen test classes (P@1, MAP@R);
- emoji ``cross_vendor_strict`` (base drawings of both vendors, leave-one-out: P@1 = MAP@R);
- Fashion-MNIST zero-shot (test queries vs the 60k train gallery, at the model's input size), a domain it
  never saw;
- icons zero-shot (``data=icons``: the test half of the icon names, all-vs-all across themes), drawings
  of another kind.

Each number sits next to the same trunk untrained (ImageNet features + a random head). WiSE-FT rows
(``--wise 0.5``) average a trained trunk with the pretrained one (``cbir.models.wise``) and score that.

    python benchmarks/generalisation.py --epochs 8 --out benchmarks/results/generalisation_emoji.json
    python benchmarks/generalisation.py --trunk dinov2_vits14 --recipes last:1 head full+lld --wise-recipes last:1
    python benchmarks/generalisation.py --epochs 1 --recipes full --no-fmnist     # smoke run
    python benchmarks/generalisation.py --trunk dinov2_vits14 --image-size 98 --recipes full+lld+robust --seed 1

Results are written after every evaluation; a rerun skips what is already there and scores only the probes a
row lacks, from the checkpoints kept under ``--work`` (``--fresh`` to redo everything).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from cbir.evaluation.report import write_json

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
BASE = ["experiment=emoji_fast", "data.num_workers=2"]
TRUNKS = {  # name -> (model overrides for training and the untrained row, its pretrained weights)
    "mobilenet_v2": (["model=mobilenet_v2", "model.image_size=64"], "imagenet"),
    "efficientnet_lite0": (["model=efficientnet_lite0", "model.image_size=64"], "imagenet"),
    # DINOv2 ViT-S/14 at 70 px (a 5 x 5 patch grid), CLS token, same fusion head and loss
    "dinov2_vits14": (["model=dinov2_vits14", "model.image_size=70", "model.pooling=cls"], "dinov2"),
}
RECIPES = {  # name -> train.py overrides on top of experiment=emoji_fast (whose own default is last:2)
    "full": ["train.tune=full"],
    "distill": ["train.tune=full", "train.distill_weight=1.0"],
    "last:1": ["train.tune=last:1"],
    "last:2": ["train.tune=last:2"],
    "head": ["train.tune=head"],
    "full+lld": ["train.tune=full", "train.layer_decay=0.75"],  # layer-wise lr decay
    # the same with camera-grade degradations as augmentation (conf/augment/robust.yaml)
    "full+lld+robust": ["train.tune=full", "train.layer_decay=0.75", "augment=robust"],
    "lora": ["train.tune=lora"],  # ViT trunks: low-rank adapters, merged at export
    "auto": ["train.tune=auto"],  # the default: a pretrained CNN's stem and first stage frozen
}
PROBES = {  # name -> eval.py overrides (the checkpoint or untrained model is added)
    "emoji": ["data=emoji"],
    "emoji_strict": ["data=emoji", "protocol=cross_vendor_strict"],
    "fmnist_zero_shot": ["data=fashion_mnist", "data.num_workers=2", "data.eval_batch_size=512"],
    "icons_zero_shot": ["data=icons"],
}


def python(script: str, overrides: list[str], out: Path) -> float:
    command = [sys.executable, str(ROOT / script), *overrides, *QUIET, f"hydra.run.dir={out}"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def evaluate(model: list[str], probe: str, out: Path, extra: list[str] = ()) -> dict:
    python("eval.py", [*model, *PROBES[probe], *extra], out)
    metrics = next(iter(json.loads((out / "eval.json").read_text())["results"].values()))
    return {key: metrics[key] for key in ("precision_at_1", "map_at_r", "num_queries") if key in metrics}


def wise_checkpoint(ckpt: Path, alpha: float, out: Path, pretrained: str) -> Path:
    """A copy of ``ckpt`` whose trunk is WiSE-FT averaged with the pretrained weights it started from."""
    from cbir.models.checkpoint import load_checkpoint_model
    from cbir.models.from_config import embedder_from_model_config
    from cbir.models.wise import interpolate_trunk

    embedder, model_config = load_checkpoint_model(ckpt)
    interpolate_trunk(embedder, embedder_from_model_config(model_config, pretrained), alpha)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["state_dict"].update({f"embedder.{k}": v for k, v in embedder.state_dict().items()})
    out.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out / "wise.ckpt")
    return out / "wise.ckpt"


def train_speed(run: Path) -> float | None:
    """Mean of the run's per-epoch ``train/images_per_second`` (csv logger)."""
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as handle:
        speeds = [float(r["train/images_per_second"]) for r in csv.DictReader(handle) if r.get("train/images_per_second")]
    return sum(speeds) / len(speeds) if speeds else None


def table(rows: dict) -> str:
    lines = ["| model | emoji P@1 | emoji MAP@R | strict P@1 | F-MNIST zero-shot P@1 | MAP@R "
             "| icons zero-shot P@1 | MAP@R | train img/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        cells = [row.get(probe, {}).get(key) for probe, key in [
            ("emoji", "precision_at_1"), ("emoji", "map_at_r"), ("emoji_strict", "precision_at_1"),
            ("fmnist_zero_shot", "precision_at_1"), ("fmnist_zero_shot", "map_at_r"),
            ("icons_zero_shot", "precision_at_1"), ("icons_zero_shot", "map_at_r")]]
        speed = row.get("train_images_per_second")
        text = [f"{100 * value:.2f}" if value is not None else "–" for value in cells]
        lines.append(f"| {name} | {' | '.join(text)} | {f'{speed:.0f}' if speed else '–'} |")
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None,
                        help="train and score at this size instead of the trunk's default (a multiple of 14 for "
                             "DINOv2: 98 px = a 7 x 7 patch grid); rows and runs are named with it")
    parser.add_argument("--trunk", default="mobilenet_v2", choices=list(TRUNKS))
    parser.add_argument("--eval-precision", default=None,
                        help="trainer.precision for the evaluations only, e.g. bf16-mixed (a ViT on 70k F-MNIST "
                             "images: 2x faster where the CPU has AMX); training keeps the trainer's default")
    parser.add_argument("--recipes", nargs="+", default=["full", "distill", "last:2"], choices=list(RECIPES))
    parser.add_argument("--wise", type=float, nargs="*", default=[0.5], help="WiSE-FT alphas")
    parser.add_argument("--wise-recipes", nargs="*", default=["full"], help="recipes whose checkpoints get WiSE-FT rows")
    parser.add_argument("--no-fmnist", action="store_true", help="skip the Fashion-MNIST zero-shot probe")
    parser.add_argument("--fmnist-subset", type=float, default=None,
                        help="score Fashion-MNIST zero-shot on this fixed random fraction of its 70k images "
                             "(queries and gallery alike; the same subset for every row): a ViT at 98 px takes "
                             "~20 min a row on 2 cores for all of them")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generalisation_emoji.json")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "benchmarks" / "generalisation",
                        help="training runs and checkpoints (kept, so a probe added later scores them)")
    parser.add_argument("--fresh", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    probes = [p for p in PROBES if not (args.no_fmnist and p == "fmnist_zero_shot")]
    saved = {} if args.fresh or not args.out.is_file() else json.loads(args.out.read_text()).get("rows", {})
    rows = dict(saved)
    command = " ".join(sys.argv)

    def save() -> None:
        write_json(args.out, {"benchmark": "generalisation", "epochs": args.epochs, "seed": args.seed,
                              "selection": "best checkpoint on held-out training classes", "rows": rows})

    def score(name: str, model_args: list[str], tag: str) -> None:
        """Evaluate the probes ``rows[name]`` lacks (all of them for a new row)."""
        row = rows.setdefault(name, {})
        for probe in probes:
            if probe not in row:
                extra = [f"trainer.precision={args.eval_precision}"] if args.eval_precision else []
                subset = args.fmnist_subset if probe == "fmnist_zero_shot" else None
                extra += [f"subset.test={subset}"] if subset else []
                row[probe] = evaluate(model_args, probe, work / f"eval-{tag}-{probe}", extra)
                if args.eval_precision:
                    row[probe]["precision"] = args.eval_precision
                if subset:
                    row[probe]["subset"] = subset
                save()

    work = args.work / args.trunk  # kept: checkpoints stay for later probes and WiSE-FT rows
    model, pretrained = TRUNKS[args.trunk]
    model = [*model, f"model.pretrained={pretrained}"]
    prefix = "" if args.trunk == "mobilenet_v2" else f"{args.trunk} "  # the first table's rows keep their names
    if args.image_size:  # data.image_size sizes the augmentation's crop, model.image_size the network's input
        model = [o for o in model if not o.startswith("model.image_size=")]
        model += [f"model.image_size={args.image_size}", f"data.image_size={args.image_size}"]
        prefix += f"{args.image_size}px "
        work = work.with_name(f"{work.name}-{args.image_size}px")
    score(f"{prefix}untrained", [*model, "head=fusion"], "untrained")
    seed_tag, seed_dir = (f" seed {args.seed}", f"-seed{args.seed}") if args.seed else ("", "")  # seed 0 keeps its names
    for recipe in args.recipes:
        name = f"{prefix}{recipe} ({args.epochs} epochs){seed_tag}"
        out = work / f"train-{recipe.replace(':', '_')}-{args.epochs}{seed_dir}"
        ckpts = sorted((out / "checkpoints").glob("best-*.ckpt"))
        if name not in rows or not ckpts:
            if name in rows and not all(p in rows[name] for p in probes):
                print(f"{name}: its checkpoint is gone; retraining for the missing probes", flush=True)
            wall = python("train.py", [*BASE, *model, *RECIPES[recipe], f"trainer.max_epochs={args.epochs}",
                                       f"seed={args.seed}", "logger=csv", "test_after_fit=false"], out)
            ckpts = sorted((out / "checkpoints").glob("best-*.ckpt"))
            rows[name] = {"train_wall_seconds": round(wall, 1), "checkpoint": ckpts[-1].name, "command": command,
                          "train_images_per_second": train_speed(out)}
        score(name, [f"ckpt_path={ckpts[-1]}"], f"{recipe.replace(':', '_')}{seed_dir}")
        if recipe in args.wise_recipes:
            for alpha in args.wise:
                wise = wise_checkpoint(ckpts[-1], alpha, work / f"wise-{recipe.replace(':', '_')}-{alpha}{seed_dir}",
                                       pretrained)
                score(f"{prefix}{recipe} + WiSE-FT alpha={alpha:g}{seed_tag}", [f"ckpt_path={wise}"],
                      f"wise-{alpha}{seed_dir}")
        print(table(rows), flush=True)
    print(table(rows))
    save()


if __name__ == "__main__":
    main()
