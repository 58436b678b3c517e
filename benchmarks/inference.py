"""Inference speed and quality of every runtime × precision, and a search's cold start.

For each model it exports a bundle the way users do (``export.py``, untrained trunk + GeM head, INT8 copy
calibrated on ``--calibration`` images and checked on others), then times one batch of real images
through each way of embedding it, in interleaved rounds (the order rotates every round, so background
load hits all alike; the median round counts):

- ``torch best``: the bare torchvision trunk alone, the fastest of fp32 / channels-last / bf16 + channels-last
  (each timed; the best raw-torch figure on this machine);
- ``eager fp32``: cbir's Embedder in plain fp32 (the reference for INT8's speed-up);
- ``eager default``: the eager model as extraction runs it (channels-last, ``precision=auto``);
- ``default``: what ``cbir index build`` runs with no option set (``runtime=auto``: the faster of that and
  ``onnx`` as the export measured them);
- ``compiled`` (``--compiled``): ``runtime=compiled``, torch.compile of the default path;
- ``onnx``, ``onnx-int8``: ONNX Runtime on the bundle's copies.

Quality: P@1 and R@10 on ``--quality`` (all-vs-all, self excluded, the first ``--quality-images`` images) for
each runtime, beside fp32. Cold start: ``search.py`` on ``--bundle`` (default: make demo's), wall time of the
whole process to its printed result, per runtime, interleaved; warm single-query latency in one process.

    python benchmarks/inference.py --out benchmarks/results/inference_cpu.json
    python benchmarks/inference.py --models mobilenet_v2@64 --rounds 3 --no-cold-start      # quick look
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from cbir.evaluation.report import write_json

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = "emoji:train"
MODELS = {  # name@size -> export.py model overrides
    "mobilenet_v2": ["model=mobilenet_v2", "model.pretrained=imagenet"],
    "resnet34": ["model=resnet34", "model.pretrained=none"],  # no offline ImageNet weights: speed only
    "resnet50": ["model=resnet50", "model.pretrained=imgsim"],
    "efficientnet_lite0": ["model=efficientnet_lite0", "model.pretrained=imagenet"],
    "dinov2_vits14": ["model=dinov2_vits14", "model.pretrained=dinov2", "model.pooling=cls"],
}
DEFAULT_MODELS = "mobilenet_v2@64,resnet34@224,resnet50@224"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"name@size list from {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median counts)")
    parser.add_argument("--calibration", default="emoji:train", help="collection the INT8 copy is calibrated on")
    parser.add_argument("--quality", default="emoji:test", help="collection P@1 / R@10 are measured on")
    parser.add_argument("--quality-images", type=int, default=1000)
    parser.add_argument("--compiled", action="store_true", help="also time runtime=compiled (slow warm-up)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "outputs/demo/bundle", help="bundle for the cold start")
    parser.add_argument("--query", default="fashion_mnist:test/0")
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="where bundles are exported (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def export_bundle_for(name: str, size: int, out: Path, calibration: str) -> Path:
    if (out / "manifest.json").is_file():
        return out
    cmd = [sys.executable, "export.py", *MODELS[name], f"data.image_size={size}", f"out={out}",
           f"int8_calibration={calibration}", "hydra.run.dir=" + str(out.parent / f"{out.name}-hydra")]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def load_images(spec: str, count: int) -> tuple[list[np.ndarray], list[str]]:
    from cbir.data.images import load_record
    from cbir.index.collection import read_collection

    collection = read_collection(spec)
    indices = collection.indices[:count]
    return ([load_record(collection.catalog, int(i)) for i in indices], [collection.label(int(i)) for i in indices])


def runners(bundle, name: str, inputs: np.ndarray, compiled: bool) -> dict:
    """name → zero-argument callable embedding ``inputs`` once."""
    from cbir.export.runtimes import OnnxEncoder
    from cbir.models.inference import embed, prepare_for_inference

    tensor = torch.from_numpy(inputs)
    channels_last = tensor.contiguous(memory_format=torch.channels_last)
    out = {}
    if hasattr(torchvision.models, name):  # the bare trunk, three ways
        bare = getattr(torchvision.models, name)(weights=None).eval()
        bare_cl = getattr(torchvision.models, name)(weights=None).eval().to(memory_format=torch.channels_last)

        def torch_run(model, images, bf16):
            def run():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return model(images)
            return run

        out["torch fp32"] = torch_run(bare, tensor, False)
        out["torch channels-last"] = torch_run(bare_cl, channels_last, False)
        out["torch bf16+channels-last"] = torch_run(bare_cl, channels_last, True)
    import copy

    fp32_model = prepare_for_inference(copy.deepcopy(bundle.embedder))
    out["eager fp32"] = lambda: embed(fp32_model, tensor)
    default_model = prepare_for_inference(copy.deepcopy(bundle.embedder), channels_last=True)
    default_bf16 = bundle.use_bf16("auto", "cpu")
    out["eager default"] = lambda: embed(default_model, tensor, channels_last=True, bf16=default_bf16)
    if bundle.resolve_runtime("auto", "cpu") == "onnx":  # what `cbir index build` runs with no option set
        out["default"] = lambda encoder=OnnxEncoder(bundle.path / "model.onnx"): encoder(inputs)
    else:
        out["default"] = out["eager default"]
    if compiled:
        compiled_model = prepare_for_inference(copy.deepcopy(bundle.embedder), channels_last=True, compile=True)
        out["compiled"] = lambda: embed(compiled_model, tensor, channels_last=True, bf16=default_bf16)
    out["onnx"] = lambda encoder=OnnxEncoder(bundle.path / "model.onnx"): encoder(inputs)
    out[int8_name(bundle)] = lambda encoder=OnnxEncoder(int8_file(bundle)): encoder(inputs)
    return out


def int8_name(bundle) -> str:
    return "onnx-int8" if (bundle.path / "model.int8.onnx").is_file() else "onnx-int8 (failed its check)"


def int8_file(bundle) -> Path:
    """The bundle's INT8 copy; for a bundle whose copy failed its retrieval check, the same quantisation redone
    beside it (calibrated on the same kind of images), so its speed and quality are still on the table."""
    kept = bundle.path / "model.int8.onnx"
    if kept.is_file():
        return kept
    redone = bundle.path.parent / f"{bundle.path.name}-int8-unchecked.onnx"
    if not redone.is_file():
        from cbir.export.int8 import quantize_int8

        images, _ = load_images(CALIBRATION, 256)
        quantize_int8(bundle.path / "model.onnx", redone, bundle.preprocessing.to_array(images))
    return redone


def time_interleaved(calls: dict, rounds: int, batch: int) -> dict:
    names = list(calls)
    for call in calls.values():  # warm-up: kernels chosen, graphs compiled
        call()
        call()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: round(batch / statistics.median(t), 1) for name, t in times.items()}


def quality(bundle, images, labels, compiled: bool) -> dict:
    """P@1 and R@10, all-vs-all among ``images``, for each runtime's embeddings."""
    from cbir.export.int8 import retrieval_parity

    results = {}
    fp32 = bundle.encoder("eager", device="cpu", precision="fp32")
    reference = np.concatenate([fp32(images[i:i + 64]) for i in range(0, len(images), 64)])
    from cbir.export.runtimes import OnnxEncoder

    int8 = OnnxEncoder(int8_file(bundle))
    ways = {"eager fp32": None, "default": bundle.encoder("auto", device="cpu"),
            "onnx": bundle.encoder("onnx", device="cpu"),
            int8_name(bundle): lambda batch: int8(bundle.preprocessing.to_array(batch))}
    if compiled:
        ways["compiled"] = bundle.encoder("compiled", device="cpu")
    for name, encode in ways.items():
        if encode is None:
            embeddings = reference
        else:
            embeddings = np.concatenate([encode(images[i:i + 64]) for i in range(0, len(images), 64)])
        check = retrieval_parity(reference, embeddings, labels)
        results[name] = {"p_at_1": round(100 * check["int8"]["p_at_1"], 2),
                         "r_at_10": round(100 * check["int8"][f"r_at_{check['k']}"], 2),
                         "fp32_p_at_1": round(100 * check["fp32"]["p_at_1"], 2), "cosine_min": round(check["cosine_min"], 5)}
    return results


def cold_start(bundle: Path, query: str, rounds: int) -> dict:
    """Seconds from starting ``search.py`` to its exit with the result printed, per runtime (interleaved)."""
    times: dict[str, list[float]] = {"auto": [], "eager": []}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for r in range(rounds):
        for runtime in (("auto", "eager") if r % 2 == 0 else ("eager", "auto")):
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "search.py", f"bundle={bundle}", f"query={query}", "k=10",
                                     f"runtime={runtime}"], cwd=ROOT, capture_output=True, text=True, env=env)
            times[runtime].append(time.perf_counter() - start)
            if result.returncode != 0 or "| rank |" not in result.stdout:
                raise RuntimeError(f"search.py runtime={runtime} failed: {result.stderr[-500:]}")
    return {runtime: {"median_s": round(statistics.median(t), 2), "runs_s": [round(x, 2) for x in t]}
            for runtime, t in times.items()}


def warm_latency(bundle: Path, query: str, repeats: int = 30) -> dict:
    from cbir.search import Searcher

    out = {}
    for runtime in ("onnx", "eager", "onnx-int8"):
        try:
            searcher = Searcher.open(bundle, runtime=runtime, one_shot=True)
        except Exception as exc:  # noqa: BLE001
            out[runtime] = {"error": str(exc).splitlines()[0][:120]}
            continue
        image = searcher.load_source(query)
        searcher.search_images([image], 10)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            searcher.search_images([image], 10)
            times.append(time.perf_counter() - start)
        out[runtime] = {"median_ms": round(1000 * statistics.median(times), 2), "precision": "bf16" if searcher.bf16 else "fp32"}
    return out


def main(argv=None) -> int:
    global CALIBRATION
    args = parse_args(argv)
    CALIBRATION = args.calibration
    from cbir.export.bundle import load_bundle
    from cbir.models.precision import cpu_has_native_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}, "
          f"batch {args.batch}, {args.rounds} interleaved rounds", flush=True)
    work = args.work
    if work is None:  # exported bundles, deleted at exit; --work keeps them
        work = Path(tempfile.mkdtemp(prefix="cbir-inference-"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    q_images, q_labels = load_images(args.quality, args.quality_images)
    report = {"batch": args.batch, "rounds": args.rounds, "torch": torch.__version__, "models": {}}
    for spec in args.models.split(","):
        name, _, size = spec.partition("@")
        size = int(size or 224)
        bundle = load_bundle(export_bundle_for(name, size, work / f"{name}-{size}", args.calibration))
        inputs = bundle.preprocessing.to_array(q_images[:args.batch])
        speed = time_interleaved(runners(bundle, name, inputs, args.compiled), args.rounds, args.batch)
        best_torch = max((v for k, v in speed.items() if k.startswith("torch ")), default=None)
        entry = {"size": size, "default_runtime": bundle.resolve_runtime("auto", "cpu"), "img_per_s": speed,
                 "best_raw_torch": best_torch,
                 "default_vs_best_raw_torch": round(speed["default"] / best_torch, 3) if best_torch else None,
                 "int8_vs_eager_fp32": round(speed[int8_name(bundle)] / speed["eager fp32"], 2),
                 "int8_check": bundle.manifest["parity"].get("onnx-int8"),
                 "bf16_check_passed": (bundle.bf16_parity or {}).get("passed")}
        print(f"{spec}: " + ", ".join(f"{k} {v}" for k, v in speed.items()) + " img/s", flush=True)
        entry["quality"] = quality(bundle, q_images, q_labels, args.compiled)
        print(f"{spec} quality on {len(q_images)} {args.quality} images: {json.dumps(entry['quality'])}", flush=True)
        report["models"][spec] = entry
        if args.out:
            write_json(args.out, report)
    if not args.no_cold_start and args.bundle.is_dir():
        report["cold_start"] = {"bundle": str(args.bundle), "query": args.query, **cold_start(args.bundle, args.query, 3)}
        report["warm_single_query"] = warm_latency(args.bundle, args.query)
        print(f"cold start: {json.dumps(report['cold_start'])}\nwarm: {json.dumps(report['warm_single_query'])}")
    print(format_table(report))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def format_table(report: dict) -> str:
    lines = ["| model | runtime | img/s | P@1 | R@10 |", "|---|---|---:|---:|---:|"]
    for spec, entry in report["models"].items():
        for name, ips in entry["img_per_s"].items():
            q = entry["quality"].get(name, {})
            lines.append(f"| {spec} | {name} | {ips:.1f} | {q.get('p_at_1', '')} | {q.get('r_at_10', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
