"""Where INT8 time and INT8 error go: the evidence behind the speed and agreement figures.

Five parts (``--part``), each writing ``benchmarks/results/analyze_int8_<part>[_<name>].json``:

* ``time`` — torchvision resnet50 at 224x224 (random init, BN statistics re-estimated, as in
  ``bench_quantize.py --part resnet50``): our ORT INT8 file and the FP32 file run under ONNX Runtime's
  profiler (2 threads, spinning off). Reports the op types of the graph ORT actually runs (after its
  optimizations), the kernel time per op type and the slowest nodes, so one can see whether anything but
  integer kernels is left and how much of the INT8 time the convolutions themselves take.
* ``error`` — a Fashion-MNIST checkpoint (``--model``, e.g. the resnet18 of ``train_reference.py``)
  quantized by ``quantize_model`` with the CLI's defaults, then on the full test split: the logit error
  split into its weight part (activation Q/DQ pairs bypassed) and its activation part (FP32 weights
  restored), the FP32 top-1/top-2 margins of the images whose top-1 changes, and, on ``--noise-images``
  images, each activation Q/DQ pair's share of the logit noise when it alone is active, and, on the near ties
  (FP32 top-1 minus top-2 logit below ``LOW_MARGIN``), its share of the error of that margin; then the grid with
  the largest near-tie share, its scale swept (finer grids clip).
* ``seeds`` — the same checkpoint over several calibration samples (``--seeds``): the tool's defaults and ONNX
  Runtime's quantizer (MinMax, Percentile, MinMax with the classifier in float) on the same images per seed; the
  test images whose top-1 changes, the logit SQNR and the near ties' margin error, per seed and summarized.
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
    python benchmarks/analyze_int8.py --part seeds --model benchmarks/cache/resnet18_fashion_mnist_64_cpu.safetensors
    python benchmarks/analyze_int8.py --part seeds --model rescompress/assets/resnet20_fashion_mnist.safetensors \
        --name resnet20
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

LOW_MARGIN = 0.2  # FP32 top-1 minus top-2 logit below which an image is counted as a near tie


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
            fp_ms, q_ms = row["fp32"]["kernel_ms_per_op_type"], row["int8_ort"]["kernel_ms_per_op_type"]
            row["conv_kernel_speedup"] = fp_ms.get("Conv", 0.0) / q_ms.get("QLinearConv", np.inf)
            # What the INT8 file could reach if every other op took no time: its convolutions alone, and with
            # the residual additions (ONNX Runtime has no int8 convolution that adds a tensor to its output)
            row["speedup_ceiling"] = {
                "convolutions_only": sum(fp_ms.values()) / q_ms.get("QLinearConv", np.inf),
                "convolutions_and_residual_adds": sum(fp_ms.values()) / (q_ms.get("QLinearConv", np.inf)
                                                                         + q_ms.get("QLinearAdd", 0.0)),
            }
            out[str(b)] = row
            print(b, json.dumps({k: row[k]["kernel_ms_per_op_type"] for k in ("fp32", "int8_ort")}), file=sys.stderr)
    return {
        "model": "torchvision resnet50 (random init, BN re-estimated), 224x224; INT8 = our ORT file, max calibration "
                 "on 32 images (the ranges do not change the kernels)",
        "runtime": "onnxruntime CPU, 2 intra-op threads, spinning off, ORT_ENABLE_ALL, profiler on (the profiler "
                   "adds per-node overhead: use bench_quantize.py for latency ratios)",
        "runs_per_batch": args.runs, "batches": out,
        "notes": "speedup_ceiling: the FP32 file's total kernel time over the INT8 file's QLinearConv time (and "
                 "QLinearConv + QLinearAdd time): the INT8/FP32 ratio no rewrite of the rest of the graph can pass "
                 "with these kernels on this machine, as profiled. The profiler's per-node overhead weighs more on "
                 "the INT8 file's shorter kernels, most at batch 1: compare the wall_ms_profiled ratio with "
                 "bench_quantize.py --part resnet50's unprofiled one.",
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


def _scaled_grid(m, tensor: str, factor: float):
    """Copy of a Q/DQ model with the scale of ``tensor``'s quantization multiplied by ``factor`` (zero points
    unchanged), and of the tensors a MaxPool of it holds (quantized again on the same grid, they hold the same
    values)."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(m)
    nodes = out.graph.node
    tensors, scales = {tensor}, set()
    while True:
        qs = [n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] in tensors]
        dqs = {d.output[0] for q in qs for d in nodes if d.op_type == "DequantizeLinear" and d.input[0] == q.output[0]}
        pooled = {n.output[0] for n in nodes if n.op_type == "MaxPool" and n.input[0] in dqs}
        scales |= {q.input[1] for q in qs}
        if pooled <= tensors:
            break
        tensors |= pooled
    for i in out.graph.initializer:
        if i.name in scales:
            i.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(i) * factor).astype(np.float32), i.name))
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
        near = np.flatnonzero(margin < LOW_MARGIN)  # the near ties, whose top-1 a small error can change
        noise, near_noise = {}, {}
        for dq, src in pairs.items():
            m = session(_only(qm, dq, pairs))
            q = logits_of(m, xs)
            noise[f"{src} -> {dq}"] = float(((q - ref_s) ** 2).sum())
            err = _margin_error(ref[near], logits_of(m, x[near]))
            near_noise[f"{src} -> {dq}"] = float((err**2).sum())
        total, near_total = sum(noise.values()), sum(near_noise.values())
        signal = float((ref_s**2).sum())
        row["noise_by_pair"] = [{"pair": k, "share": v / total, "alone_sqnr_db": float(10 * np.log10(signal / v)),
                                 "near_tie_margin_share": near_noise[k] / near_total}
                                for k, v in sorted(noise.items(), key=lambda kv: -kv[1])[: args.top]]
        row["noise_images"] = len(xs)
        row["near_tie_images"] = len(near)
        row["near_tie_margin_by_pair"] = [{"pair": k, "share": v / near_total} for k, v in
                                          sorted(near_noise.items(), key=lambda kv: -kv[1])[: args.top]]
        # The largest near-tie share: its grid made finer by clipping (a smaller scale), or coarser
        top_src = pairs[max(near_noise, key=near_noise.get).split(" -> ")[1]]
        sweep = {str(f): stats(logits_of(session(_scaled_grid(qm, top_src, f)), x))
                 for f in (0.6, 0.8, 0.9, 1.0, 1.1, 1.25)}
        row["scale_sweep"] = {"tensor": top_src, "rows": sweep}
        for v in row["scale_sweep"]["rows"].values():
            v.pop("fp32_margin_of_flips")
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
                 "after a MaxPool, count twice). near_tie_margin_share: the same, for the error of FP32's top-1 minus "
                 f"top-2 logit on the test images whose FP32 margin is below {LOW_MARGIN} (near_tie_images). "
                 "scale_sweep: the pair with the largest near-tie share, its scale multiplied by each factor "
                 "(below 1: a finer grid that clips the largest values).",
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


def _margin_error(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per image: ``got``'s FP32-top-1 minus FP32-top-2 logit, less FP32's (the error of FP32's margin)."""
    order = np.argsort(-ref, axis=1)[:, :2]
    rows = np.arange(len(ref))
    return (got[rows, order[:, 0]] - got[rows, order[:, 1]]) - (ref[rows, order[:, 0]] - ref[rows, order[:, 1]])


def _margin_stats(ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Agreement figures of ``got`` against FP32's ``ref``, and the error of FP32's top-1 minus top-2 logit on the
    near ties (the only images whose top-1 a small error can change)."""
    from rescompress.quantization.fidelity import compare

    top = np.sort(ref, axis=1)
    near = top[:, -1] - top[:, -2] < LOW_MARGIN
    err = _margin_error(ref, got)
    f = compare(ref, got, labels)
    return {"flips": int((got.argmax(1) != ref.argmax(1)).sum()), "top1_agreement": f.top1_agreement,
            "sqnr_db": f.sqnr_db, "top1_drop": f.top1_drop, "near_ties": int(near.sum()),
            "margin_error_rms_near_ties": float(np.sqrt(np.mean(err[near] ** 2))),
            "margin_error_mean_near_ties": float(np.mean(err[near])),
            "margin_error_rms_all": float(np.sqrt(np.mean(err ** 2)))}


def part_seeds(args) -> dict:
    """The tool's defaults and ONNX Runtime's quantizer over several calibration samples (seeds)."""
    import onnx
    from bench_quantize import fp32_onnx_from_checkpoint, logits_of, ort_quantize, session

    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model

    runs: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "fp32.onnx"
        pre = fp32_onnx_from_checkpoint(args.model, fp32)
        train = open_dataset(DEBIAN_FASHION_MNIST, pre, split="train")
        test = open_dataset(DEBIAN_FASHION_MNIST, pre, split="test")
        items = [test[i] for i in range(len(test))]  # each image decoded once, with its label
        x = np.stack([img.numpy() for img, _ in items]).astype(np.float32)
        y = np.asarray([int(label) for _, label in items])
        del items
        ref = logits_of(session(fp32), x)
        gemm = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Gemm"]
        for seed in args.seeds:
            # the images quantize_model draws with --seed (the same seeded permutation, its first --num-images)
            calib = sample(train, args.num_images, seed)
            for label, method, exclude in (("ort-minmax", "minmax", ()), ("ort-percentile", "percentile", ()),
                                           ("ort-minmax-fc-float", "minmax", tuple(gemm))):
                q = ort_quantize(fp32, tmp / f"{label}-{seed}.onnx", calib, method, exclude=exclude)
                runs.setdefault(label, {})[str(seed)] = _margin_stats(ref, logits_of(session(q), x), y)
            r = quantize_model(args.model, f"{DEBIAN_FASHION_MNIST}@train", tmp / f"tool-{seed}",
                               config=QuantizeConfig(latency=False, seed=seed, num_images=args.num_images))
            for target, path in r.artifacts.items():
                if target in ("onnxruntime", "tensorrt"):
                    row = _margin_stats(ref, logits_of(session(path), x), y)
                    runs.setdefault(f"tool-default-{'ort' if target == 'onnxruntime' else 'trt'}", {})[str(seed)] = {
                        **row, "method": r.method, "ranges": r.ranges}
            print(seed, json.dumps({k: v[str(seed)]["flips"] for k, v in runs.items()}), file=sys.stderr)
    summary = {}
    for label, per_seed in runs.items():
        flips = [v["flips"] for v in per_seed.values()]
        summary[label] = {
            "flips_mean": float(np.mean(flips)), "flips_min": min(flips), "flips_max": max(flips),
            "top1_agreement_mean": float(np.mean([v["top1_agreement"] for v in per_seed.values()])),
            "seeds_at_or_above_99_9": sum(v["top1_agreement"] >= 99.9 for v in per_seed.values()),
            "sqnr_db_mean": float(np.mean([v["sqnr_db"] for v in per_seed.values()])),
            "margin_error_rms_near_ties_mean": float(np.mean([v["margin_error_rms_near_ties"]
                                                              for v in per_seed.values()])),
        }
    return {
        "model": str(args.model), "seeds": args.seeds, "calibration_images": args.num_images,
        "test_images": len(x), "near_tie_margin": LOW_MARGIN, "summary": summary, "runs": runs,
        "notes": "Per seed, every quantizer calibrates on the same seeded sample of the train split (the tool holds a "
                 "quarter of it out to choose its method and refine scales, as the CLI does); all files run in "
                 "ONNX Runtime CPU on the full test split. flips: test images whose top-1 differs from FP32's "
                 "(99.9% agreement allows 10). margin_error: the quantized model's FP32-top-1 minus FP32-top-2 "
                 f"logit minus FP32's, on the near ties (FP32 margin below {LOW_MARGIN}) and on all images.",
    }


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
    ap.add_argument("--part", choices=("time", "error", "head", "window", "seeds"), required=True)
    ap.add_argument("--model", type=Path, default=None, help="error part: a Fashion-MNIST checkpoint")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="time part: batch sizes")
    ap.add_argument("--runs", type=int, default=10, help="time part: profiled runs per batch size")
    ap.add_argument("--noise-images", type=int, default=1000, help="error part: images for the per-pair split")
    ap.add_argument("--top", type=int, default=12, help="error part: pairs listed")
    ap.add_argument("--window-images", type=int, default=128, help="window part: calibration images")
    ap.add_argument("--window-test-images", type=int, default=256, help="window part: images for the SQNR")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds part: calibration seeds")
    ap.add_argument("--num-images", type=int, default=512, help="seeds part: calibration images per seed")
    ap.add_argument("--name", default=None, help="suffix of the result file (analyze_int8_<part>_<name>.json)")
    args = ap.parse_args()
    if args.part in ("error", "head", "seeds") and args.model is None:
        ap.error(f"--part {args.part} needs --model")
    res = {"time": part_time, "error": part_error, "head": part_head, "window": part_window,
           "seeds": part_seeds}[args.part](args)
    name = f"analyze_int8_{args.part}" + (f"_{args.name}" if args.name else "")
    print(write_result(name, {"command": "python " + " ".join(sys.argv), **res}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
