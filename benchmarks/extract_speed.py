"""Feature-extraction speed: our Embedder on the inference path vs a bare torchvision loop.

For each variant (fp32, channels-last, bf16 autocast + channels-last, torch.compile on top of that) it
times the same torchvision trunk twice, interleaved so background load hits both alike:

- bare: ``torchvision.models.<model>()`` called under ``torch.inference_mode()`` (+ autocast), the
  fastest plain-PyTorch loop;
- ours: ``build_embedder`` (FX stage extractor → GeM head → L2 norm) through
  ``cbir.models.inference`` (``prepare_for_inference`` + ``embed``), float32 embeddings out.

and prints images/second for each, and our overhead, as a table and (``--out``) a JSON file. Weights
are random (speed does not depend on them), so nothing is downloaded.

    python benchmarks/extract_speed.py                               # resnet34, 224 px, batch 32
    python benchmarks/extract_speed.py --iters 3 --batch 16          # quick look
    python benchmarks/extract_speed.py --variants fp32,channels_last --out speed.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from cbir.evaluation.report import write_json
from cbir.models.embedder import build_embedder
from cbir.models.inference import embed, prepare_for_inference


@dataclass(frozen=True)
class Variant:
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False


VARIANTS = {
    "fp32": Variant(),
    "channels_last": Variant(channels_last=True),
    "bf16+channels_last": Variant(channels_last=True, bf16=True),
    "compile+bf16+channels_last": Variant(channels_last=True, bf16=True, compile=True),
    "compile_fp32": Variant(compile=True),
}
DEFAULT_VARIANTS = "fp32,channels_last,bf16+channels_last,compile+bf16+channels_last"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet34", help="backbone name (default resnet34)")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--iters", type=int, default=10, help="timed batches per model and variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (compilation happens here)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: {DEFAULT_VARIANTS})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--max-overhead", type=float, default=None,
                        help="exit 1 if our overhead exceeds this many percent in any variant")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def describe_device(device: str) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (platform.processor() is often empty)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_runners(model_name: str, size: int, device: str, variant: Variant):
    """Two zero-argument callables that each run one batch: the bare torchvision loop, and ours."""
    bare = getattr(torchvision.models, model_name)(weights=None).eval().to(device)
    if variant.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    bare_call = torch.compile(bare) if variant.compile else bare
    embedder = build_embedder(model_name, pretrained="none", image_size=size)
    ours = prepare_for_inference(embedder, device=device, channels_last=variant.channels_last,
                                 compile=variant.compile)
    device_type = torch.device(device).type

    def run_bare(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=variant.bf16):
            return bare_call(images)

    def run_ours(images: torch.Tensor) -> torch.Tensor:
        return embed(ours, images, device=device, channels_last=variant.channels_last, bf16=variant.bf16)

    return run_bare, run_ours


def measure(args: argparse.Namespace, name: str, variant: Variant) -> dict:
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    if variant.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    run_bare, run_ours = build_runners(args.model, args.size, args.device, variant)
    warm_start = time.perf_counter()
    for _ in range(args.warmup):
        run_bare(images)
        run_ours(images)
    _sync(args.device)
    warmup_s = time.perf_counter() - warm_start
    times = {"bare": [], "ours": []}
    for i in range(args.iters):  # interleaved, alternating who goes first
        order = (("bare", run_bare), ("ours", run_ours)) if i % 2 == 0 else (("ours", run_ours), ("bare", run_bare))
        for who, run in order:
            _sync(args.device)
            start = time.perf_counter()
            run(images)
            _sync(args.device)
            times[who].append(time.perf_counter() - start)
    bare_ips = args.batch / statistics.median(times["bare"])
    ours_ips = args.batch / statistics.median(times["ours"])
    return {
        "variant": name, **variant.__dict__,
        "bare_img_per_s": round(bare_ips, 2), "ours_img_per_s": round(ours_ips, 2),
        "overhead_pct": round(100.0 * (bare_ips - ours_ips) / bare_ips, 1),
        "warmup_s": round(warmup_s, 1),
        "bare_batch_s": [round(t, 4) for t in times["bare"]], "ours_batch_s": [round(t, 4) for t in times["ours"]],
    }


def format_table(rows: list[dict]) -> str:
    header = f"| {'variant':<28} | {'bare img/s':>10} | {'ours img/s':>10} | {'overhead':>8} | {'warm-up s':>9} |"
    lines = [header, "|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(f"| {r['variant']:<28} | {r['bare_img_per_s']:>10.1f} | {r['ours_img_per_s']:>10.1f} "
                     f"| {r['overhead_pct']:>7.1f}% | {r['warmup_s']:>9.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = describe_device(args.device)
    print(f"{args.model} at {args.size} px, batch {args.batch}, {args.iters} timed batches (median), "
          f"device {args.device} ({device_name}), {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
          flush=True)
    rows = []
    for name in args.variants.split(","):
        rows.append(measure(args, name, VARIANTS[name]))
        print(f"  {name}: bare {rows[-1]['bare_img_per_s']:.1f} img/s, ours {rows[-1]['ours_img_per_s']:.1f} img/s",
              flush=True)
    print(format_table(rows))
    if args.out:
        write_json(args.out, {
            "model": args.model, "size": args.size, "batch": args.batch, "iters": args.iters,
            "warmup": args.warmup, "device": args.device, "device_name": device_name,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "results": rows,
        })
        print(f"wrote {args.out}")
    if args.max_overhead is not None and any(r["overhead_pct"] > args.max_overhead for r in rows):
        print(f"overhead above {args.max_overhead}% in some variant", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
