"""Pruning benchmark: real ORT CPU speed-up per width rounding, and accuracy recovery on Fashion-MNIST.

Parts (``--part``, default all, in this order so the cheap, decisive tables land first):

* ``round_to``: torchvision resnet50 at 224x224 (random init: latency does not depend on the values),
  pruned to 50% of MACs with round-to 1/8/16/32; FP32 and the four pruned models exported to ONNX and
  timed interleaved in one ORT CPU run (spinning off) at batch 8. Reports latency ratio vs MACs ratio.
* ``resnet20``: the bundled ResNet-20 (Fashion-MNIST) at 30/50/70% of MACs removed: top-1 on the full
  10k test split right after pruning, after BN re-estimation (2048 train images), after one epoch of
  fine-tuning with distillation on the full 60k train split; ORT CPU latency ratio (interleaved).
* ``criteria``: the same at 50% for taylor / random, and l1 with global ranking (l1 uniform: ``resnet20``).
* ``pruned_int8`` (not in ``all``): the issue-4 target "pruned + INT8 >= 6x faster than FP32" on torchvision
  resnet50 at 224x224 (random init, BN statistics re-estimated on 64 images of the bundled Fashion-MNIST
  train slice): FP32, INT8 (``quantize_model``, max calibration on 32 slice images), and for each
  ``--r50-configs`` entry (MACs kept[:round-to], default ``0.5`` with the CPU's round-to) pruned FP32 and
  pruned + INT8, all timed interleaved in one ORT CPU run (spinning off), batch 1 and 8
  (``--r50-no-stem-s2d``: also each INT8 file without its space-to-depth stem). No fine-tuning: only speed
  is measured. Writes ``prune_int8_resnet50.json``.

Writes ``benchmarks/results/prune_<part>.json``.

    python benchmarks/bench_prune.py --part pruned_int8 --rounds 5 --iters 5 --r50-configs 0.5 0.5:32 0.4
    python benchmarks/bench_prune.py --part pruned_int8 --rounds 7 --iters 5 --r50-configs 0.5 0.5:64 0.4 \
        --r50-no-stem-s2d --keep-rows
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from rescompress.data import DEBIAN_FASHION_MNIST, make_loader, open_dataset  # noqa: E402
from rescompress.models import build_model  # noqa: E402
from rescompress.pruning import FinetuneConfig, PruneConfig, finetune, prune_model, recalibrate_bn  # noqa: E402
from rescompress.pruning.pruner import top1_accuracy  # noqa: E402
from rescompress.pruning.speed import ort_latency  # noqa: E402
from rescompress.spec import PRESETS  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "rescompress" / "assets" / "resnet20_fashion_mnist.safetensors"


def bench_round_to(args) -> dict:
    pre = PRESETS["imagenet"]
    torch.manual_seed(0)
    base = build_model("resnet50", 1000, 3).eval()
    models = {"fp32": base}
    rows = []
    for rt in args.round_to:
        t0 = time.time()
        res = prune_model(base, pre, PruneConfig(target_macs=0.5, round_to=rt, criterion="l1"))
        models[f"round_to_{rt}"] = res.model
        rows.append({"round_to": rt, "macs_kept": res.macs_kept, "params_kept": res.after.params / res.before.params,
                     "prune_s": time.time() - t0})
        print(f"round-to {rt}: MACs kept {res.macs_kept:.3f}", file=sys.stderr)
    lat = ort_latency(models, pre.input_shape(1), batch_sizes=(args.batch,), rounds=args.rounds, iters=args.iters)
    for row in rows:
        name = f"round_to_{row['round_to']}"
        ratio = lat.ratio(name, "fp32", args.batch)
        row.update({"latency_ratio": ratio, "speedup": 1 / ratio, "latency_ratio_over_macs_ratio":
                    ratio / row["macs_kept"], "median_ms": lat.median_ms[name][args.batch],
                    "spread": lat.spread[name][args.batch]})
    return {"model": "torchvision resnet50 (random init)", "input": [3, 224, 224], "target_macs": 0.5,
            "criterion": "l1", "ranking": "uniform", "batch": args.batch, "runtime": "onnxruntime CPU, spinning off",
            "fp32_median_ms": lat.median_ms["fp32"][args.batch], "fp32_spread": lat.spread["fp32"][args.batch],
            "rows": rows, "rounds": args.rounds, "iters": args.iters}


SLICE = REFERENCE.parent / "fashion_mnist_train_slice.npz"


def bench_pruned_int8(args) -> dict:
    """FP32 vs pruned vs INT8 vs pruned + INT8 resnet50, ORT CPU, one interleaved run."""
    import tempfile

    from bench_quantize import batches, sample

    from rescompress.data import open_dataset
    from rescompress.export import export_onnx
    from rescompress.folding import fold_batchnorm
    from rescompress.measure.latency import measure_latency
    from rescompress.quantization import QuantizeConfig, quantize_model
    from rescompress.runtimes import make_runner

    pre = PRESETS["imagenet"]
    ds = open_dataset(SLICE, pre, split="train")
    torch.manual_seed(0)
    base = build_model("resnet50", 10, 3)
    for m in base.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the re-estimation batches
    x = sample(ds, args.bn_images_r50, seed=1)
    base.train()
    with torch.no_grad():
        for xb in batches(x, 16):
            base(torch.from_numpy(xb))
    base.eval()
    configs = [_int8_config(c) for c in args.r50_configs]
    pruned, prune_rows = {}, {}
    for tm, rt in configs:
        key = _config_key(tm, rt)
        t0 = time.time()
        res = prune_model(base, pre, PruneConfig(target_macs=tm, round_to=rt))
        pruned[key] = res.model
        prune_rows[key] = {"target_macs": tm, "round_to": res.report.round_to, "macs_kept": res.macs_kept,
                           "params_kept": res.after.params / res.before.params, "seconds": time.time() - t0}
        print(f"pruned {key}: MACs kept {res.macs_kept:.3f} (round-to {res.report.round_to})", file=sys.stderr)
    qcfg = QuantizeConfig(num_images=args.calib_images, method="max", latency=False, targets=("onnxruntime",))
    plain_cfg = replace(qcfg, stem_s2d=False)
    probe = torch.from_numpy(x[:2])
    files, quant = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-prune-int8-") as tmp:
        tmp = Path(tmp)
        for name, model in (("fp32", base), *((f"pruned{k}", m) for k, m in pruned.items())):
            folded = fold_batchnorm(model, input_shape=pre.input_shape(2)).model
            files[name] = tmp / f"{name}.onnx"
            export_onnx(folded, pre, files[name], arch="resnet50", num_classes=10, probe=probe,
                        check_parity=False)  # random deep net: chaotic logits, the parity bound is for trained ones
            for suffix, cfg in (("", qcfg), *((("_no_stem_s2d", plain_cfg),) if args.r50_no_stem_s2d else ())):
                t0 = time.time()
                q = quantize_model(files[name], SLICE, tmp / f"q-{name}{suffix}", config=cfg)
                qname = ("int8" if name == "fp32" else f"{name}_int8") + suffix
                files[qname] = q.artifacts["onnxruntime"]
                quant[qname] = {
                    "seconds": time.time() - t0, "calibration_images": q.calibration.get("num_images"),
                    "agreement_with_own_fp32": {t: f.to_dict() for t, f in q.fidelity.items()},
                    "eval_source": q.eval_source,
                    "stem_rewrite": q.stem_rewrite.to_dict() if q.stem_rewrite else None}
                print(f"quantized {name}{suffix} in {time.time() - t0:.0f} s", file=sys.stderr)
        variants = ("", "_int8", *(("_int8_no_stem_s2d",) if args.r50_no_stem_s2d else ()))
        order = ("fp32", *(v.lstrip("_") for v in variants[1:]), *(f"pruned{k}{s}" for k in pruned for s in variants))
        runners = {k: make_runner(str(files[k]), runtime="onnxruntime", spinning=False) for k in order}
        bs = tuple(args.r50_batches)
        rep = measure_latency(runners, pre.input_shape, batch_sizes=bs, warmup_s=1.0, iters=args.iters,
                              rounds=args.rounds)
    med = {k: {str(b): rep.get(k, b).median_ms for b in bs} for k in order}
    spread = {k: {str(b): rep.get(k, b).spread for b in bs} for k in order}
    speedup = {k: {str(b): rep.get("fp32", b).median_ms / rep.get(k, b).median_ms for b in bs} for k in order[1:]}
    return {
        "model": "torchvision resnet50 (random init, 10 classes), BN statistics re-estimated on "
                 f"{len(x)} images of {SLICE.name} (resized to 224, 3 channels, ImageNet preprocessing)",
        "input": [3, 224, 224],
        "pruning": {"criterion": "l1", "ranking": "uniform", "configs": prune_rows, "finetuned": False,
                    "note": "keys: pruned<MACs kept>_rt<round-to> ('auto' = the CPU's default); no fine-tuning "
                            "and no BN re-estimation after pruning: only speed is measured here"},
        "quantization": {"config": qcfg.to_dict(), "calib_data": SLICE.name, "runs": quant},
        "runtime": "onnxruntime CPU, intra-op spinning off, default threads, all models interleaved in one "
                   "measure_latency run",
        "median_ms": med, "spread": spread, "speedup_vs_fp32": speedup,
        "target_pruned_int8_speedup": 6.0,
        "meets_target": {k: {b: v[b] >= 6.0 for b in v} for k, v in speedup.items() if "_int8" in k},
        "iters": args.iters, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
    }


def _int8_config(text: str) -> tuple[float, int | None]:
    """``"0.5"`` or ``"0.5:32"`` -> (MACs kept, round-to or None for the CPU's default)."""
    tm, _, rt = text.partition(":")
    return float(tm), (int(rt) if rt else None)


def _config_key(tm: float, rt: int | None) -> str:
    return f"{tm:g}_rt{rt if rt is not None else 'auto'}"


def _fmnist(args):
    pre = PRESETS["fashion-mnist"]
    train = open_dataset(f"{DEBIAN_FASHION_MNIST}@train", pre, split="train")
    test = open_dataset(f"{DEBIAN_FASHION_MNIST}@test", pre, split="test")
    return pre, train, test


def _recover(model, teacher, train, test, args) -> dict:
    """Top-1 right after pruning, after BN re-estimation, after one epoch of distillation fine-tuning."""
    out = {"top1_pruned": top1_accuracy(model, test)}
    bn = copy.deepcopy(model)
    recalibrate_bn(bn, make_loader(train, batch_size=128, shuffle=True, seed=1), args.bn_images)
    out["top1_bn_recalib"] = top1_accuracy(bn, test)
    if args.epochs > 0:
        t0 = time.time()
        loader = make_loader(train, batch_size=128, shuffle=True, seed=2, drop_last=True, limit=args.train_limit)
        rep = finetune(bn, loader, FinetuneConfig(epochs=args.epochs, lr=args.lr, distill=True), teacher=teacher)
        out["top1_finetuned"] = top1_accuracy(bn, test)
        out["finetune"] = {**rep.to_dict(), "seconds": time.time() - t0}
    return out, bn


def _with_earlier_rows(name: str, rows: list[dict]) -> list[dict]:
    """Rows of an earlier run of this part that this run did not redo (``--keep-rows``), marked as such.

    Their latency ratios were measured against FP32 in that earlier run (its FP32 milliseconds are copied).
    """
    import json

    prev = Path(__file__).resolve().parent / "results" / f"{name}.json"
    if not prev.exists():
        return rows
    old = json.loads(prev.read_text())
    done = {(r["criterion"], r["macs_removed_target"]) for r in rows}
    earlier = {"date": old.get("machine", {}).get("date"), "fp32_latency_ms": old.get("fp32_latency_ms")}
    kept = [{**r, "earlier_run": r.get("earlier_run", earlier)} for r in old.get("rows", [])
            if (r["criterion"], r["macs_removed_target"]) not in done]
    return kept + rows


def _earlier_runs(name: str) -> list[dict]:
    """pruned_int8 with ``--keep-rows``: the summary of the earlier JSON's run(s), so noisy runs sit side by side."""
    import json

    prev = Path(__file__).resolve().parent / "results" / f"{name}.json"
    if not prev.exists():
        return []
    old = json.loads(prev.read_text())
    keys = ("median_ms", "spread", "speedup_vs_fp32", "iters", "rounds")
    return [*old.get("earlier_runs", []), {"date": old["machine"]["date"], **{k: old.get(k) for k in keys}}]


def bench_resnet20(args, name: str, criteria: tuple[str, ...], removed: tuple[float, ...]) -> dict:
    from rescompress.checkpoint import load_checkpoint

    if not args.model.exists():
        raise SystemExit(f"{args.model} is missing (the reference model is trained by benchmarks/train_reference.py)")
    teacher, header = load_checkpoint(args.model)
    pre, train, test = _fmnist(args)
    base_top1 = top1_accuracy(teacher, test)
    print(f"reference top-1 {base_top1:.4f}", file=sys.stderr)
    rows, models = [], {"fp32": teacher}
    head = {"model": f"{header.arch} from {args.model.name} (Fashion-MNIST, 28x28x1)", "reference_top1": base_top1,
            "test_images": len(test), "train_images": args.train_limit or len(train), "bn_images": args.bn_images,
            "epochs": args.epochs, "lr": args.lr, "distill": True,
            "torch_threads": torch.get_num_threads()}
    for entry in criteria:
        crit, _, ranking = entry.partition(":")  # "l1" or "l1:global"
        ranking = ranking or "uniform"
        for r in removed:
            data = train if crit == "taylor" else None
            cfg = PruneConfig(target_macs=1 - r, criterion=crit, ranking=ranking, bn_recalib=0,
                              round_to=args.r20_round_to)
            res = prune_model(teacher, pre, cfg, data=data)
            row = {"criterion": entry, "macs_removed_target": r, "macs_kept": res.macs_kept,
                   "params_kept": res.after.params / res.before.params, "round_to": res.report.round_to,
                   "widths": {g.root: g.width_after for g in res.report.groups}}
            rec, final = _recover(res.model, teacher, train, test, args)
            row.update(rec)
            row["top1_drop_points"] = 100 * (base_top1 - row.get("top1_finetuned", row["top1_bn_recalib"]))
            rows.append(row)
            models[f"{entry}_{r}"] = final
            print({k: v for k, v in row.items() if k != "widths"}, file=sys.stderr)
            shown = _with_earlier_rows(name, rows) if args.keep_rows else rows
            write_result(name, {**head, "rows": shown, "partial": True})  # fine-tuning is slow: keep what is done
    lat = ort_latency(models, pre.input_shape(1), batch_sizes=(1, 8), rounds=args.rounds, iters=args.iters * 5)
    for row in rows:
        key = f"{row['criterion']}_{row['macs_removed_target']}"
        row["latency_ratio"] = {str(b): lat.ratio(key, "fp32", b) for b in (1, 8)}
    if args.keep_rows:
        rows = _with_earlier_rows(name, rows)
    return {**head, "rows": rows, "fp32_latency_ms": {str(b): lat.median_ms["fp32"][b] for b in (1, 8)},
            "latency_spread_fp32": {str(b): lat.spread["fp32"][b] for b in (1, 8)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "round_to", "resnet20", "criteria", "pruned_int8"), default="all")
    p.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--removed", type=float, nargs="+", default=[0.5, 0.3, 0.7])
    p.add_argument("--criteria", nargs="+", default=["taylor", "random", "l1:global"],
                   help="criterion[:global|uniform] entries for the criteria part")
    p.add_argument("--r20-round-to", type=int, default=None, help="round-to for ResNet-20 (default: CPU's)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--bn-images", type=int, default=2048)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--model", type=Path, default=REFERENCE, help="ResNet checkpoint for the Fashion-MNIST parts")
    p.add_argument("--threads", type=int, default=None, help="torch threads for pruning and fine-tuning")
    p.add_argument("--keep-rows", action="store_true",
                   help="resnet20/criteria: keep the earlier JSON's rows that this run does not redo; "
                   "pruned_int8: keep the earlier runs' medians and speed-ups under earlier_runs")
    p.add_argument("--bn-images-r50", type=int, default=64, help="pruned_int8: BN re-estimation images")
    p.add_argument("--calib-images", type=int, default=32, help="pruned_int8: INT8 calibration images")
    p.add_argument("--r50-batches", type=int, nargs="+", default=[1, 8], help="pruned_int8: batch sizes")
    p.add_argument("--r50-no-stem-s2d", action="store_true",
                   help="pruned_int8: also time each INT8 file written with --no-stem-s2d")
    p.add_argument("--r50-configs", nargs="+", default=["0.5"],
                   help="pruned_int8: MACs kept[:round-to] per pruned model, e.g. 0.5 0.5:32 0.4")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("all", "round_to"):
        print(write_result("prune_round_to", bench_round_to(args)), file=sys.stderr)
    if args.part in ("all", "resnet20"):
        res = bench_resnet20(args, "prune_resnet20", ("l1",), tuple(args.removed))
        print(write_result("prune_resnet20", res), file=sys.stderr)
    if args.part in ("all", "criteria"):
        res = bench_resnet20(args, "prune_criteria", tuple(args.criteria), (0.5,))
        print(write_result("prune_criteria", res), file=sys.stderr)
    if args.part == "pruned_int8":
        res = bench_pruned_int8(args)
        if args.keep_rows:
            res["earlier_runs"] = _earlier_runs("prune_int8_resnet50")
        print(write_result("prune_int8_resnet50", res), file=sys.stderr)


if __name__ == "__main__":
    main()
