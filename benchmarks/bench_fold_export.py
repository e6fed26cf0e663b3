"""BN folding equivalence and FP32 latency: eager torch vs folded torch vs folded ONNX in ONNX Runtime.

For torchvision resnet18 and resnet50 at 224x224 (random weights; BatchNorm statistics re-estimated on 64
real Fashion-MNIST images from the bundled calibration slice, resized to 224 and replicated to 3 channels,
so the folded scales are realistic rather than the identity of a fresh init) and for the bundled reference
ResNet-20 (28x28, 1 channel) when it is present:

* fold equivalence on real images of the bundled *evaluation* slice: max relative logit difference and
  top-1 agreement of the folded model vs the original, and of the exported ONNX (ORT) vs the original;
* each float32 result's relative distance from a float64 run of the original model (the rounding floor
  the equivalence numbers should be read against);
* latency of three FP32 runners, interleaved in rotating blocks (``rescompress.measure.measure_latency``):
  ``torch`` (eager, BN unfolded; the baseline), ``torch-folded`` and ``ort-folded`` (ONNX Runtime CPU,
  intra-op spinning off), at batch 1 and 8, all with the same thread count. Ratios are of medians of
  block medians, from the same run.

One thread by default: on this shared, oversubscribed 2-core machine torch with 2 OpenMP threads ran
resnet18 at batch 1 in ~920 ms against ~47 ms with 1 thread (its threads wait at barriers for peers the
OS has descheduled), which would turn the torch-vs-ORT ratio into a measurement of the machine's load.

Run: ``.venv/bin/python benchmarks/bench_fold_export.py`` (about 4 minutes on 2 shared cores);
``--quick`` for a smoke run. Writes ``benchmarks/results/fold_export.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from rescompress.data import ASSETS, bundled_data, make_loader, open_dataset  # noqa: E402
from rescompress.export import export_onnx, float64_logits  # noqa: E402
from rescompress.folding import fold_batchnorm  # noqa: E402
from rescompress.measure.agreement import compare_logits  # noqa: E402
from rescompress.measure.latency import measure_latency  # noqa: E402
from rescompress.models import build_model  # noqa: E402
from rescompress.runtimes import make_runner  # noqa: E402
from rescompress.spec import Preprocess, get_preset  # noqa: E402

REFERENCE = ASSETS / "resnet20_fashion_mnist.safetensors"


def real_images(split: str, pre: Preprocess, n: int) -> torch.Tensor:
    loader = make_loader(open_dataset(bundled_data(split), pre), batch_size=n, limit=n, num_workers=0)
    images, _ = next(iter(loader))
    return images


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: torch.Tensor, batch: int = 16) -> nn.Module:
    """Replace running stats with the cumulative average over ``images`` (momentum=None), then eval."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(0, len(images), batch):
        model(images[i : i + batch])
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    return model.eval()


def rel_diff(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def bench_model(
    name: str, model: nn.Module, pre: Preprocess, arch: str, num_classes: int, workdir: Path, args
) -> dict:
    print(f"[{name}] fold + export", file=sys.stderr, flush=True)
    probe = real_images("eval", pre, 8)
    t0 = time.perf_counter()
    folded = fold_batchnorm(model, probe=probe)
    fold_s = time.perf_counter() - t0
    onnx_path = workdir / f"{name}.onnx"
    t0 = time.perf_counter()
    exported = export_onnx(folded.model, pre, onnx_path, arch=arch, num_classes=num_classes, probe=probe, folded=True)
    export_s = time.perf_counter() - t0

    runners = {
        "torch": make_runner(model, "torch", threads=args.threads),
        "torch-folded": make_runner(folded.model, "torch", threads=args.threads),
        "ort-folded": make_runner(onnx_path, "onnxruntime", threads=args.threads),
    }
    # Equivalence on more real images than the probe (evaluation slice, never used for BN statistics).
    images = real_images("eval", pre, args.equiv_images).numpy()
    base = runners["torch"].run(images)
    equivalence = {}
    for k in ("torch-folded", "ort-folded"):
        out = runners[k].run(images)
        agreement = compare_logits(base, out)
        equivalence[k] = {
            "max_rel_diff": rel_diff(base, out),
            "max_abs_diff": agreement.max_abs_diff,
            "top1_agreement": agreement.top1_agreement,
            "n": agreement.n,
        }

    # Context for the numbers above: each float32 result's distance from a float64 run on the probe batch.
    exact = float64_logits(model, probe)
    noise_floor = {k: rel_diff(exact, r.run(probe.numpy())) for k, r in runners.items()}

    print(f"[{name}] latency", file=sys.stderr, flush=True)
    report = measure_latency(
        runners, pre.input_shape, batch_sizes=args.batch, warmup_s=args.warmup, iters=args.iters,
        rounds=args.rounds,
    )
    latency = {}
    for b in report.batch_sizes:
        row = {k: {"median_ms": report.get(k, b).median_ms, "spread": report.get(k, b).spread} for k in runners}
        row["ratio_torch_folded_vs_torch"] = report.ratio("torch-folded", b).latency_ratio
        row["ratio_ort_vs_torch"] = report.ratio("ort-folded", b).latency_ratio
        row["ratio_ort_vs_torch_folded"] = (
            report.get("ort-folded", b).median_ms / report.get("torch-folded", b).median_ms
        )
        latency[str(b)] = row
    return {
        "arch": arch,
        "input_shape": list(pre.input_shape(1)[1:]),
        "fold": {**folded.report.to_dict(), "seconds": round(fold_s, 2)},
        "export": {**exported.to_dict(), "seconds": round(export_s, 2), "path": onnx_path.name},
        "equivalence_on_real_images": equivalence,
        "rel_error_vs_float64_on_probe": noise_floor,
        "latency": latency,
        "latency_report": report.to_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,resnet50,reference")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for both runtimes (see the notes)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds per runner and batch size")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per block")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--equiv-images", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 1, 1 round of 2 calls")
    args = ap.parse_args()
    args.batch = tuple(int(b) for b in args.batch.split(","))
    if args.quick:
        args.batch, args.iters, args.rounds, args.warmup = (1,), 2, 1, 0.0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            if name == "reference":
                if not REFERENCE.exists():
                    results[name] = {"skipped": f"{REFERENCE.name} not present"}
                    continue
                from rescompress.checkpoint import load_checkpoint

                model, header = load_checkpoint(REFERENCE)
                pre = header.preprocess or get_preset("fashion-mnist")
                results[name] = bench_model(name, model, pre, header.arch, header.num_classes, workdir, args)
                continue
            pre = get_preset("fashion-mnist").with_overrides(size=224, channels=3)
            model = build_model(name, num_classes=10)
            reestimate_bn(model, real_images("calib", pre, 64))
            results[name] = bench_model(name, model, pre, name, 10, workdir, args)
    payload = {
        "settings": {
            "threads": args.threads, "batch_sizes": list(args.batch), "warmup_s": args.warmup,
            "iters": args.iters, "rounds": args.rounds, "ort_intra_op_spinning": False,
            "bn_statistics": "re-estimated on 64 bundled calibration images (momentum=None)",
            "threads_note": (
                "1 thread: with 2 OpenMP threads on the oversubscribed shared 2-core machine torch resnet18 "
                "batch 1 took ~920 ms vs ~47 ms with 1 thread (barrier waits on descheduled threads)"
            ),
            "equivalence_images": args.equiv_images,
        },
        "results": results,
        "run_seconds": round(time.perf_counter() - started, 1),
    }
    out = write_result("fold_export" if not args.quick else "fold_export_quick", payload)
    for name, r in results.items():
        if "latency" not in r:
            print(f"{name}: {r}")
            continue
        eq = r["equivalence_on_real_images"]
        print(
            f"{name}: folded {r['fold']['num_folded']} BN, fold rel {eq['torch-folded']['max_rel_diff']:.2e}, "
            f"ORT rel {eq['ort-folded']['max_rel_diff']:.2e}, agreement {eq['ort-folded']['top1_agreement']:.1f}%; "
            f"vs float64: " + ", ".join(f"{k} {v:.2e}" for k, v in r["rel_error_vs_float64_on_probe"].items())
        )
        for b, row in r["latency"].items():
            print(
                f"  batch {b}: torch {row['torch']['median_ms']:.1f} ms, torch-folded "
                f"{row['torch-folded']['median_ms']:.1f} ms, ORT {row['ort-folded']['median_ms']:.1f} ms; "
                f"ORT/torch {row['ratio_ort_vs_torch']:.2f}, folded/torch {row['ratio_torch_folded_vs_torch']:.2f}"
            )
    print(f"wrote {out} in {payload['run_seconds']} s")


if __name__ == "__main__":
    main()
