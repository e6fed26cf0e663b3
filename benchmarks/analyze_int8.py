"""Where INT8 time and INT8 error go: the evidence behind the speed and agreement figures.

Three parts (``--part``), each writing ``benchmarks/results/analyze_int8_<part>.json``:

* ``time`` — torchvision resnet50 at 224x224 (random init, BN statistics re-estimated, as in
  ``bench_quantize.py --part resnet50``): our ORT INT8 file and the FP32 file run under ONNX Runtime's
  profiler (2 threads, spinning off). Reports the op types of the graph ORT actually runs (after its
  optimizations), the kernel time per op type and the slowest nodes, so one can see whether anything but
  integer kernels is left and how much of the INT8 time the convolutions themselves take.
* ``error`` — a Fashion-MNIST checkpoint (``--model``, e.g. the resnet18 of ``train_reference.py``)
  quantized by ``quantize_model`` with the CLI's defaults, then on the full test split: the logit error
  split into its weight part (activation Q/DQ pairs bypassed) and its activation part (FP32 weights
  restored), the FP32 top-1/top-2 margins of the images whose top-1 changes, and, on ``--noise-images``
  images, each activation Q/DQ pair's share of the logit noise when it alone is active.
* ``window`` — resnet50 at 224x224 as in ``time``: channel equalization decided inside the calibration pass
  (what ``quantize`` does: the first images' samples are kept, thinned to a memory budget, until the factors
  are known) against a separate measuring pass followed by a calibration with full samples: the per-tensor
  ranges of each method and the ORT file's logit SQNR vs FP32.
* ``head`` — the same checkpoint quantized by ``quantize_model`` with the CLI's defaults, then with the
  classifier (``--exclude '/fc/*'``) and then the pooling too (``'/avgpool/*'``) kept in float, which costs
  no measurable time (a few thousand MACs of millions): logit SQNR, agreement and drop on the full test split.

    python benchmarks/analyze_int8.py --part time
    python benchmarks/analyze_int8.py --part error --model benchmarks/cache/resnet18_fashion_mnist_64.safetensors
    python benchmarks/analyze_int8.py --part window
    python benchmarks/analyze_int8.py --part head --model benchmarks/cache/resnet18_fashion_mnist_64.safetensors
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from bench_quantize import our_artifacts, resnet50_fp32, sample  # noqa: E402

from rescompress.data import DEBIAN_FASHION_MNIST, open_dataset  # noqa: E402


def _profiled(model_path: Path, x: np.ndarray, runs: int, optimized: Path) -> tuple[dict, dict, float]:
    """(kernel ms per op type per run, op-type counts of the optimized graph, wall ms per run)."""
    import time

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(optimized)
    so.enable_profiling = True
    so.profile_file_prefix = str(optimized.with_suffix(""))
    s = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    s.run(None, {name: x})  # warm-up, not counted below
    t0 = time.perf_counter()
    for _ in range(runs):
        s.run(None, {name: x})
    wall = (time.perf_counter() - t0) / runs * 1e3
    events = json.loads(Path(s.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    per_node: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            row = per_node.setdefault(e["name"][: -len("_kernel_time")],
                                      [e["args"]["op_name"], e["args"].get("output_type_shape"), 0.0])
            row[2] += e["dur"]
    total_runs = runs + 1
    ms = {op: us / total_runs / 1e3 for op, us in per_op.most_common()}
    slowest = [{"node": k, "op": op, "output": shape, "ms": us / total_runs / 1e3}
               for k, (op, shape, us) in sorted(per_node.items(), key=lambda kv: -kv[1][2])[:8]]
    graph = onnx.load(str(optimized), load_external_data=False)
    counts = dict(collections.Counter(n.op_type for n in graph.graph.node).most_common())
    return ms, counts, wall, slowest


def part_time(args) -> dict:
    import onnx

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32, _, ds = resnet50_fp32(tmp)
        files, _ = our_artifacts(fp32, sample(ds, 32), "max", batch=8)
        int8 = tmp / "r50.int8.ort.onnx"
        onnx.save(files["onnxruntime"], str(int8))
        x8 = sample(ds, 8, seed=2)
        for b in args.batches:
            row = {}
            for label, path in (("fp32", fp32), ("int8_ort", int8)):
                ms, counts, wall, slowest = _profiled(path, x8[:b], args.runs, tmp / f"{label}_b{b}.opt.onnx")
                total = sum(ms.values())
                row[label] = {"kernel_ms_per_op_type": ms, "kernel_share": {k: v / total for k, v in ms.items()},
                              "optimized_graph_op_types": counts, "wall_ms_profiled": wall, "slowest_nodes": slowest}
            row["conv_kernel_speedup"] = (row["fp32"]["kernel_ms_per_op_type"].get("Conv", 0.0)
                                          / row["int8_ort"]["kernel_ms_per_op_type"].get("QLinearConv", np.inf))
            out[str(b)] = row
            print(b, json.dumps({k: row[k]["kernel_ms_per_op_type"] for k in ("fp32", "int8_ort")}), file=sys.stderr)
    return {
        "model": "torchvision resnet50 (random init, BN re-estimated), 224x224; INT8 = our ORT file, max calibration "
                 "on 32 images (the ranges do not change the kernels)",
        "runtime": "onnxruntime CPU, 2 intra-op threads, spinning off, ORT_ENABLE_ALL, profiler on (the profiler "
                   "adds per-node overhead: use bench_quantize.py for latency ratios)",
        "runs_per_batch": args.runs, "batches": out,
    }


def _bypass_activations(m):
    """Copy of a Q/DQ model in which every activation Q->DQ pair is skipped (weights stay int8)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(m)
    producer = {o: n for n in out.graph.node for o in n.output}
    skip = {}
    for n in out.graph.node:
        p = producer.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if p is not None and p.op_type == "QuantizeLinear":
            skip[n.output[0]] = p.input[0]
    for n in out.graph.node:
        for i, t in enumerate(n.input):
            if t in skip:
                n.input[i] = skip[t]
    return out, skip


def _float_weights(m, fp32):
    """Copy of a Q/DQ model whose weight and bias inputs are the FP32 model's (activations stay quantized).

    A weight the file stores in another shape (the ORT file's space-to-depth stem) keeps its int8 levels."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(m)
    fp_nodes = {n.name: n for n in fp32.graph.node}
    fp_inits = {i.name: i for i in fp32.graph.initializer}
    q_inits = {i.name: i for i in out.graph.initializer}
    dq_source = {n.output[0]: n.input[0] for n in out.graph.node if n.op_type == "DequantizeLinear"}
    added = set()
    for n in out.graph.node:
        ref = fp_nodes.get(n.name)
        if ref is None or n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        for i in (1, 2):
            src = q_inits.get(dq_source.get(n.input[i], "")) if i < len(n.input) else None
            if src is not None and ref.input[i] in fp_inits and list(src.dims) != list(fp_inits[ref.input[i]].dims):
                continue  # rearranged in the file (the space-to-depth stem): its int8 weights stay
            if i < len(n.input) and i < len(ref.input) and n.input[i] != ref.input[i] and ref.input[i] in fp_inits:
                name = ref.input[i] + "__fp32"
                if name not in added:
                    t = onnx.TensorProto()
                    t.CopyFrom(fp_inits[ref.input[i]])
                    t.name = name
                    out.graph.initializer.append(t)
                    added.add(name)
                n.input[i] = name
    return out, len(added)


def _only(m, keep: str, pairs: dict):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(m)
    for n in out.graph.node:
        for i, t in enumerate(n.input):
            if t in pairs and t != keep:
                n.input[i] = pairs[t]
    return out


def part_error(args) -> dict:
    import onnx
    from bench_quantize import logits_of, session

    from rescompress.quantization.fidelity import sqnr_db
    from rescompress.quantization.pipeline import QuantizeConfig, load_fp32, quantize_model

    with tempfile.TemporaryDirectory() as tmp:
        r = quantize_model(args.model, f"{DEBIAN_FASHION_MNIST}@train", Path(tmp) / "o",
                           config=QuantizeConfig(latency=False), eval_data=f"{DEBIAN_FASHION_MNIST}@test")
        fp32_path = next((Path(tmp) / "o").glob("*.fp32.onnx"))
        fp32 = onnx.load(str(fp32_path))
        preprocess = load_fp32(fp32_path, Path(tmp) / "x").preprocess
        # the INT8 files quantize the channel-equalized network: its float weights are what "activations only"
        # restores (the same FP32 function as the file's, with the INT8 files' channel scaling)
        float_weights = fp32
        if r.plan.equalization:
            from rescompress.calibration.collect import tensor_shapes
            from rescompress.quantization.equalize import from_plan
            from rescompress.quantization.placement import prepare_model

            prepared = prepare_model(fp32)
            float_weights = from_plan(prepared, tensor_shapes(prepared), r.plan.equalization).apply(prepared)
        qmodels = {t: onnx.load(str(r.artifacts[t])) for t in ("onnxruntime", "tensorrt") if t in r.artifacts}
    test = open_dataset(f"{DEBIAN_FASHION_MNIST}@test", preprocess, split="test")
    x = np.stack([test[i][0].numpy() for i in range(len(test))]).astype(np.float32)
    ref = logits_of(session(fp32), x)
    top = np.sort(ref, axis=1)
    margin = top[:, -1] - top[:, -2]

    def stats(q):
        flips = np.flatnonzero(q.argmax(1) != ref.argmax(1))
        return {"sqnr_db": float(sqnr_db(ref, q)), "top1_agreement": float(100 * (1 - len(flips) / len(ref))),
                "flips": int(len(flips)), "fp32_margin_of_flips": sorted(round(float(m), 4) for m in margin[flips])}

    out = {}
    for target, qm in qmodels.items():
        wonly, pairs = _bypass_activations(qm)
        aonly, restored = _float_weights(qm, float_weights)
        row = {"full": stats(logits_of(session(qm), x)), "weights_only": stats(logits_of(session(wonly), x)),
               "activations_only": stats(logits_of(session(aonly), x)), "activation_pairs": len(pairs),
               "fp32_initializers_restored": restored}
        xs = x[: args.noise_images]
        ref_s = ref[: args.noise_images]
        noise = {}
        for dq, src in pairs.items():
            q = logits_of(session(_only(qm, dq, pairs)), xs)
            noise[f"{src} -> {dq}"] = float(((q - ref_s) ** 2).sum())
        total = sum(noise.values())
        signal = float((ref_s**2).sum())
        row["noise_by_pair"] = [{"pair": k, "share": v / total, "alone_sqnr_db": float(10 * np.log10(signal / v))}
                                for k, v in sorted(noise.items(), key=lambda kv: -kv[1])[: args.top]]
        row["noise_images"] = len(xs)
        out[target] = row
        print(target, json.dumps({k: row[k]["sqnr_db"] for k in ("full", "weights_only", "activations_only")}),
              file=sys.stderr)
    return {
        "model": str(args.model), "quantize": "quantize_model with the CLI defaults (512 calibration images of the "
        "train split, --method auto, channel equalization, refinement, Hessian rounding)", "method": r.method,
        "equalization": r.equalization,
        "test_images": len(x), "fp32_margin_quantiles": {str(q): float(np.quantile(margin, q))
                                                         for q in (0.001, 0.002, 0.005, 0.01)},
        "targets": out,
        "notes": "weights_only: activation Q/DQ pairs bypassed (int8 weights kept); activations_only: FP32 weights "
                 "and biases restored (activation Q/DQ kept). noise_by_pair: logit noise power with that pair alone "
                 "active, as a share of the sum over pairs (pairs that quantize the same values, e.g. before and "
                 "after a MaxPool, count twice).",
    }


def part_head(args) -> dict:
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model

    rows = {}
    configs = (("default", ()), ("fc float", ("/fc/*",)), ("fc and avgpool float", ("/fc/*", "/avgpool/*")))
    for label, exclude in configs:
        with tempfile.TemporaryDirectory() as tmp:
            r = quantize_model(args.model, f"{DEBIAN_FASHION_MNIST}@train", Path(tmp) / "o",
                               config=QuantizeConfig(latency=False, exclude=exclude),
                               eval_data=f"{DEBIAN_FASHION_MNIST}@test")
        for target, f in r.fidelity.items():
            rows[f"{label} / {target}"] = {"exclude": list(exclude), "sqnr_db": f.sqnr_db,
                                           "top1_agreement": f.top1_agreement, "top1_drop": f.top1_drop, "n": f.n}
            print(label, target, round(f.sqnr_db, 2), f.top1_agreement, file=sys.stderr)
    return {"model": str(args.model), "quantize": "quantize_model, CLI defaults plus --exclude", "results": rows}


def part_window(args) -> dict:
    """The one-pass equalization's kept window against a separate measuring pass (the earlier design)."""
    import itertools
    import time

    import onnx
    from bench_quantize import batches, logits_of, session

    from rescompress.calibration import METHODS
    from rescompress.calibration.collect import (
        calibration_batch_size,
        collect_histograms,
        per_image_sizes,
        tensor_shapes,
    )
    from rescompress.quantization.calibrate import activation_amax, activation_entries, weight_entries
    from rescompress.quantization.emit import emit_qdq
    from rescompress.quantization.equalize import EQUALIZE_IMAGES, channel_groups, measure
    from rescompress.quantization.fidelity import sqnr_db
    from rescompress.quantization.pipeline import EqualizingPass, calibration_tensors
    from rescompress.quantization.placement import place, prepare_model
    from rescompress.quantization.plan import Provenance, QuantPlan, model_fingerprint

    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, _ = resnet50_fp32(Path(tmp))
        base = prepare_model(onnx.load(str(fp32)))
    calib = sample(open_dataset(DEBIAN_FASHION_MNIST, pre, split="train"), args.window_images)
    test = sample(open_dataset(DEBIAN_FASHION_MNIST, pre, split="test"), args.window_test_images)
    placement = place(base, "onnxruntime")
    tensors = calibration_tensors(base, [placement, place(base, "tensorrt")])
    shapes = tensor_shapes(base)
    b = calibration_batch_size(per_image_sizes(base, tensors.observed, shapes), 32)
    equalizing = EqualizingPass(channel_groups(base, shapes, tensors.shared), tensors, EQUALIZE_IMAGES)
    t0 = time.perf_counter()
    one, _ = collect_histograms(base, tensors.observed, batches(calib, b), shapes=shapes, rescale=equalizing.rescale)
    t1 = time.perf_counter()
    eq = measure(base, shapes, itertools.islice(batches(calib, b), -(-EQUALIZE_IMAGES // b)),
                 unquantized=tensors.shared)
    scaled = eq.apply(base)
    two, _ = collect_histograms(scaled, tensors.observed, batches(calib, b), shapes=shapes,
                                divided=tensors.divided(eq.factors()))
    t2 = time.perf_counter()
    one_eq = equalizing.equalization
    factor_diff = max(float(np.max(np.abs(a / c - 1))) for a, c in zip(one_eq.scales, eq.scales, strict=True))
    one_model = one_eq.apply(base)
    thinned = [n for n in tensors.observed if one[n].counts.dtype == np.float64]
    ref = logits_of(session(base), test, b=32)
    weights = weight_entries(scaled, placement.weights)
    prov = Provenance(model_fingerprint(scaled), None, len(calib), "max", 99.99, {})
    rows = {}
    for method in METHODS:
        diffs = np.array([activation_amax(one[n], method, 128, 99.99) / activation_amax(two[n], method, 128, 99.99)
                          - 1 for n in tensors.observed if activation_amax(two[n], method, 128, 99.99) > 0])
        size = np.abs(diffs)
        row = {"amax_rel_diff": {"median": float(np.median(size)), "p90": float(np.quantile(size, 0.9)),
                                 "max": float(size.max()), "mean_signed": float(diffs.mean())}}
        for label, hists, model in (("one_pass", one, one_model), ("two_passes", two, scaled)):
            entries = activation_entries(tensors.complete({n: hists[n] for n in tensors.observed}), method, 99.99)
            q = emit_qdq(model, QuantPlan(entries, weights, prov), placement)
            row[f"ort_file_sqnr_db_{label}"] = float(sqnr_db(ref, logits_of(session(q), test, b=32)))
        rows[method] = row
        print(method, json.dumps(row), file=sys.stderr)
    return {
        "model": "torchvision resnet50 at 224x224 (random init, BN statistics re-estimated, as bench_quantize.py "
                 "--part resnet50), Fashion-MNIST upscaled", "calibration_images": len(calib), "batch": b,
        "equalize_images": EQUALIZE_IMAGES, "test_images": len(test), "tensors_observed": len(tensors.observed),
        "tensors_thinned_in_window": len(thinned), "factor_max_rel_diff": factor_diff,
        "seconds": {"one_pass": t1 - t0, "measure_then_calibrate": t2 - t1}, "methods": rows,
        "notes": "one_pass: what quantize does (factors decided on the first images of the calibration pass, whose "
                 "samples are kept thinned to 64 MB and weighted); two_passes: a separate pass measures the factors "
                 "on the same images, then the rescaled model is calibrated with full samples. amax_rel_diff: per "
                 "observed tensor, |one/two - 1|. SQNR: ONNX Runtime file (nearest weight rounding, no refinement) vs "
                 "FP32 logits.",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("time", "error", "head", "window"), required=True)
    ap.add_argument("--model", type=Path, default=None, help="error part: a Fashion-MNIST checkpoint")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="time part: batch sizes")
    ap.add_argument("--runs", type=int, default=10, help="time part: profiled runs per batch size")
    ap.add_argument("--noise-images", type=int, default=1000, help="error part: images for the per-pair split")
    ap.add_argument("--top", type=int, default=12, help="error part: pairs listed")
    ap.add_argument("--window-images", type=int, default=128, help="window part: calibration images")
    ap.add_argument("--window-test-images", type=int, default=256, help="window part: images for the SQNR")
    args = ap.parse_args()
    if args.part in ("error", "head") and args.model is None:
        ap.error(f"--part {args.part} needs --model")
    res = {"time": part_time, "error": part_error, "head": part_head, "window": part_window}[args.part](args)
    print(write_result(f"analyze_int8_{args.part}", {"command": "python " + " ".join(sys.argv), **res}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
