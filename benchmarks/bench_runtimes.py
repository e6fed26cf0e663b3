"""Runtimes side by side, and what ONNX Runtime's thread spinning does to interleaved timing.

Model: torchvision resnet18 (random weights, 3x64x64 input, 10 classes) exported to FP32 ONNX, plus the
bundled reference ResNet-20 (1x28x28) when present. Every number comes from
``rescompress.measure.measure_latency``: warm-up, then the runners timed in rotating blocks in one run;
latency = median of block medians, spread = (max - min block median) / median.

Thread counts: ``--threads`` (default 2) for ONNX Runtime and OpenVINO, ``--torch-threads`` (default 1)
for torch: on this project's 2 shared, oversubscribed cores torch with 2 OpenMP threads ran ~100x slower
(each parallel region waits for a descheduled thread), which would swamp every other effect.

* ``spinning``: a torch runner interleaved with an ORT session whose intra-/inter-op threads spin
  (ORT's default) and, in alternating repetitions, with one whose spinning is off (this project's default).
  Reported: the torch runner's median and spread next to each kind of ORT neighbour, and the ORT spreads.
* ``runtimes``: the same ONNX file in ONNX Runtime (baseline), OpenVINO (if installed; f32 precision) and
  the eager torch module, at batch 1 and 8; speed-ups are baseline median / runtime median.

Run: ``.venv/bin/python benchmarks/bench_runtimes.py`` (about 2 minutes on 2 shared cores); ``--quick``
for a smoke run. Writes ``benchmarks/results/runtimes.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from rescompress.data import ASSETS  # noqa: E402
from rescompress.export import export_onnx  # noqa: E402
from rescompress.measure.latency import measure_latency  # noqa: E402
from rescompress.models import build_model  # noqa: E402
from rescompress.runtimes import make_runner  # noqa: E402
from rescompress.spec import Preprocess  # noqa: E402


def spinning_experiment(module, onnx_path, shape, threads, torch_threads, reps, iters, rounds, warmup):
    torch_runner = make_runner(module, threads=torch_threads)
    neighbours = {
        "spin_on": make_runner(onnx_path, threads=threads, spinning=True),
        "spin_off": make_runner(onnx_path, threads=threads, spinning=False),
    }
    out: dict[str, list] = {k: [] for k in neighbours}
    for _ in range(reps):
        for key, ort_runner in neighbours.items():  # alternate, so drift in machine load hits both alike
            rep = measure_latency(
                {"torch": torch_runner, "ort": ort_runner}, lambda b: (b, *shape), (1,),
                warmup_s=warmup, iters=iters, rounds=rounds,
            )
            t, o = rep.get("torch", 1), rep.get("ort", 1)
            out[key].append({
                "torch_median_ms": t.median_ms, "torch_spread": t.spread,
                "ort_median_ms": o.median_ms, "ort_spread": o.spread,
            })
    summary = {}
    for key, runs in out.items():
        summary[key] = {
            field: sorted(r[field] for r in runs)[len(runs) // 2]
            for field in ("torch_median_ms", "torch_spread", "ort_median_ms", "ort_spread")
        }
    summary["torch_slowdown_next_to_spinning_ort"] = (
        summary["spin_on"]["torch_median_ms"] / summary["spin_off"]["torch_median_ms"]
    )
    return {"runs": out, "summary": summary}


def runtimes_experiment(module, onnx_path, shape, threads, torch_threads, batches, iters, rounds, warmup):
    runners = {"onnxruntime": make_runner(onnx_path, threads=threads)}
    if importlib.util.find_spec("openvino") is not None:
        runners["openvino"] = make_runner(onnx_path, runtime="openvino", threads=threads)
    runners["torch"] = make_runner(module, threads=torch_threads)
    rep = measure_latency(runners, lambda b: (b, *shape), batches, warmup_s=warmup, iters=iters, rounds=rounds)
    speedups = {f"{r.runner}@{r.batch}": r.speedup for r in rep.ratios}
    return {"report": rep.to_dict(), "speedup_vs_onnxruntime": speedups}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime / OpenVINO threads")
    ap.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch threads (1: on 2 oversubscribed cores torch's OpenMP barriers made 2 threads ~100x slower)",
    )
    args = ap.parse_args()
    iters, rounds, reps, warmup = (3, 2, 1, 0.1) if args.quick else (10, 5, 3, 1.0)
    torch.manual_seed(0)
    pre64 = Preprocess("custom", (64, 64), 3, (0.5,), (0.25,))
    models = [("resnet18_64", build_model("resnet18", 10, 3).eval(), pre64)]
    ref = ASSETS / "resnet20_fashion_mnist.safetensors"
    if ref.exists():
        from rescompress.checkpoint import load_checkpoint

        module, header = load_checkpoint(ref)
        models.append(("resnet20_reference", module.eval(), header.preprocess))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module, pre in models:
            path = Path(tmp) / f"{name}.onnx"
            arch = "resnet18" if name.startswith("resnet18") else "resnet20"
            export_onnx(module, pre, path, arch=arch, num_classes=10)
            shape = pre.input_shape(1)[1:]
            print(f"{name}: spinning experiment", file=sys.stderr)
            spin = spinning_experiment(
                module, path, shape, args.threads, args.torch_threads, reps, iters, rounds, warmup
            )
            print(f"{name}: runtimes experiment", file=sys.stderr)
            rts = runtimes_experiment(
                module, path, shape, args.threads, args.torch_threads, (1, 8), iters, rounds, warmup
            )
            results[name] = {"input_shape": list(shape), "spinning": spin, "runtimes": rts}
            print(name, spin["summary"], rts["speedup_vs_onnxruntime"], file=sys.stderr)
    settings = {
        "threads": args.threads, "torch_threads": args.torch_threads, "iters_per_block": iters, "rounds": rounds,
        "reps": reps, "warmup_s": warmup, "quick": args.quick,
    }
    out = write_result("runtimes", {"settings": settings, "results": results})
    print(out)


if __name__ == "__main__":
    main()
