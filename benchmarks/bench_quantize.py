"""INT8 quantization against ONNX Runtime's own quantizer: fidelity, speed and calibration cost, one run each.

Three parts (``--part``), each writing ``benchmarks/results/bench_quantize_<part>.json``:

* ``resnet20`` / ``fmnist`` — the bundled ResNet-20, or any Fashion-MNIST checkpoint given by ``--model``
  (e.g. the torchvision resnet18 of ``train_reference.py``; result ``bench_quantize_<arch>_<size>.json``):
  512 calibration images from the Fashion-MNIST *train* split
  (seeded sample, the same images for every quantizer), evaluated on the full 10k test set. Ours with each
  calibration method (ORT and TensorRT artifacts, the TensorRT file run in ORT) against
  ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, u8 activations / s8 weights, MinMax and
  Entropy, Percentile, and MinMax with the classifier left in float) and torch.ao FX (x86 defaults): top-1
  drop, top-1 agreement, logit SQNR vs FP32; INT8/FP32 latency at batch 1 and 8; the default files also
  run in OpenVINO where it is installed.
* ``resnet50`` — torchvision resnet50 at 224x224, random init with BatchNorm statistics re-estimated on
  Fashion-MNIST images (3-channel, ImageNet preprocessing): INT8/FP32 latency at batch 1 and 8 on ORT CPU
  (spinning off, runners interleaved), ours (with and without the space-to-depth stem) vs ORT's quantizer.
* ``calibration`` — calibration wall time and peak RSS, each run in a fresh subprocess (``ru_maxrss``):
  ours on resnet50 at 128 and 1024 images (streaming, memory flat) against ORT's MinMax / Entropy
  calibration at small image counts (their memory grows with the number of images, so the count is kept
  small on this shared 23 GB machine), and both on ResNet-20 at 128 and 1024 images.

    python benchmarks/bench_quantize.py --part resnet20
    python benchmarks/bench_quantize.py --part fmnist --model benchmarks/cache/resnet18_fashion_mnist_64.safetensors
    python benchmarks/bench_quantize.py --part resnet50
    python benchmarks/bench_quantize.py --part resnet50_tool   # the CLI's defaults on resnet50, stage times
    python benchmarks/bench_quantize.py --part calibration
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from rescompress.data import ASSETS, DEBIAN_FASHION_MNIST, open_dataset  # noqa: E402
from rescompress.spec import get_preset  # noqa: E402

REFERENCE = ASSETS / "resnet20_fashion_mnist.safetensors"
SEED = 0


# ------------------------------------------------------------------------------------------ helpers
def sample(ds, n: int, seed: int = SEED) -> np.ndarray:
    import torch

    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
    return np.stack([ds[i][0].numpy() for i in idx]).astype(np.float32)


def batches(x, b: int):
    if isinstance(x, LazyImages):
        return x.batches(b)
    return [x[i : i + b] for i in range(0, len(x), b)]


class LazyImages:
    """A seeded sample decoded batch by batch, so the calibration images themselves are never all in memory."""

    def __init__(self, ds, n: int, seed: int = SEED) -> None:
        import torch

        self.ds = ds
        self.idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
        self.shape = (len(self.idx), *ds[0][0].shape)
        self.nbytes = int(np.prod(self.shape)) * 4

    def __len__(self) -> int:
        return len(self.idx)

    def batches(self, b: int):
        for i in range(0, len(self.idx), b):
            yield np.stack([self.ds[j][0].numpy() for j in self.idx[i : i + b]]).astype(np.float32)


def ort_quantize(fp32: Path, out: Path, calib: np.ndarray, method: str, batch: int = 32,
                 exclude: tuple[str, ...] = ()) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches(calib, batch))

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"input": b}

    quantize_static(
        str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[method],
        nodes_to_exclude=list(exclude),
    )
    return out


def session(path_or_model):
    import onnx

    from rescompress.calibration.collect import make_session

    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    return make_session(m)


class Runner:
    def __init__(self, s) -> None:
        self.s = s
        self.inp = s.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.s.run(None, {self.inp: x})[0]


def logits_of(s, x: np.ndarray, b: int = 250) -> np.ndarray:
    r = Runner(s)
    return np.concatenate([r.run(xb) for xb in batches(x, b)])


def latency(runners: dict, shape_fn, batch_sizes=(1, 8), iters=10, rounds=5) -> dict:
    from rescompress.measure.latency import measure_latency

    rep = measure_latency(runners, shape_fn, batch_sizes, warmup_s=1.0, iters=iters, rounds=rounds)
    base = next(iter(runners))
    return {
        "baseline": base,
        "speedup_vs_fp32": {
            name: {str(b): rep.ratio(name, b).speedup for b in batch_sizes} for name in runners if name != base
        },
        "median_ms": {name: {str(b): rep.get(name, b).median_ms for b in batch_sizes} for name in runners},
        "spread": {name: {str(b): rep.get(name, b).spread for b in batch_sizes} for name in runners},
        "settings": {"iters_per_block": iters, "rounds": rounds, "interleaved": True, "spinning": False},
    }


def fp32_onnx_from_checkpoint(path: Path, out: Path):
    from rescompress.export import export_onnx
    from rescompress.folding import fold_batchnorm
    from rescompress.loading import load_model

    loaded = load_model(path)
    folded = fold_batchnorm(loaded.module, input_shape=loaded.preprocess.input_shape(8)).model
    export_onnx(folded, loaded.preprocess, out, arch=loaded.arch, num_classes=loaded.num_classes)
    return loaded.preprocess


def our_artifacts(fp32: Path, calib: np.ndarray, method: str, batch: int = 32,
                  stem_s2d: bool = True, equalize: bool = False) -> tuple[dict, float]:
    """Our ORT and TensorRT files (in memory) for one method; returns them and the calibration seconds.

    ``stem_s2d``: the ORT file's stride-2 stem as the tool writes it, over 2x2 blocks (stem.py), where it applies.
    ``equalize``: channel equalization, as ``quantize`` does by default (the factors decided on the first
    ``EQUALIZE_IMAGES`` images of the calibration pass, which histograms the tensors as the rescaled model holds
    them), and the TensorRT cache's FP32 ranges histogrammed in the same pass.
    """
    import onnx

    from rescompress.calibration.collect import (
        calibration_batch_size,
        collect_histograms,
        per_image_sizes,
        tensor_shapes,
    )
    from rescompress.quantization.calibrate import activation_entries, weight_entries
    from rescompress.quantization.emit import emit_qdq
    from rescompress.quantization.pipeline import calibration_tensors
    from rescompress.quantization.placement import place, prepare_model
    from rescompress.quantization.plan import Provenance, QuantPlan, model_fingerprint
    from rescompress.quantization.stem import rewrite_stem

    base = prepare_model(onnx.load(str(fp32)))
    pls = {t: place(base, t) for t in ("onnxruntime", "tensorrt")}
    tensors = calibration_tensors(base, pls.values())
    t0 = time.perf_counter()
    shapes = tensor_shapes(base)
    b = calibration_batch_size(per_image_sizes(base, tensors.observed, shapes), batch)
    equalizing = None
    if equalize:
        from rescompress.quantization.equalize import EQUALIZE_IMAGES, channel_groups
        from rescompress.quantization.pipeline import EqualizingPass

        # (the factors come from the first images of the sample; the tool spreads them over its sample)
        equalizing = EqualizingPass(channel_groups(base, shapes, tensors.shared), tensors,
                                    min(EQUALIZE_IMAGES, len(calib)))
    hists = collect_histograms(base, tensors.observed, batches(calib, b), shapes=shapes,
                               rescale=equalizing.rescale if equalizing else None)[0]
    base = equalizing.equalization.apply(base) if equalizing else base
    hists = tensors.complete({k: v for k, v in hists.items() if k in tensors.observed})
    entries = activation_entries(hists, method, 99.99)
    secs = time.perf_counter() - t0
    plan = QuantPlan(entries, weight_entries(base, [w for p in pls.values() for w in p.weights]),
                     Provenance(model_fingerprint(base), None, len(calib), method, 99.99, {}))
    files = {t: emit_qdq(base, plan, p) for t, p in pls.items()}
    if stem_s2d:
        files["onnxruntime"] = rewrite_stem(files["onnxruntime"])[0]
    return files, secs


def our_default_artifacts(fp32: Path, calib: np.ndarray, refine: bool, batch: int = 32) -> tuple[dict, float, str]:
    """What ``rescompress quantize`` does by default (``--method auto``, then scale refinement): a quarter
    of the images held out to choose the method and refine the scales. Returns files, seconds, method."""
    from dataclasses import replace

    import onnx

    from rescompress.calibration.collect import collect_histograms
    from rescompress.quantization.calibrate import activation_entries, weight_entries
    from rescompress.quantization.emit import emit_qdq
    from rescompress.quantization.fidelity import compare
    from rescompress.quantization.pipeline import _emit_checked, calibration_tensors, choose_method, range_candidates
    from rescompress.quantization.placement import place, prepare_model
    from rescompress.quantization.plan import Provenance, QuantPlan, model_fingerprint
    from rescompress.quantization.refine import refine_plan

    base = prepare_model(onnx.load(str(fp32)))
    pls = {t: place(base, t) for t in ("onnxruntime", "tensorrt")}
    tensors = calibration_tensors(base, pls.values())
    hold, rest = calib[: len(calib) // 4], calib[len(calib) // 4 :]
    t0 = time.perf_counter()
    hists = tensors.complete(collect_histograms(base, tensors.observed, batches(rest, batch))[0])
    weights = weight_entries(base, [w for p in pls.values() for w in p.weights])
    prov = Provenance(model_fingerprint(base), None, len(rest), "auto", 99.99, {})
    plans = {label: QuantPlan(activation_entries(hists, m, pct), weights, replace(prov, method=m, percentile=pct))
             for label, (m, pct) in range_candidates("auto", 99.99).items()}
    ref = logits_of(session(base), hold)
    fids = {m: compare(ref, logits_of(session(emit_qdq(base, p, pls["onnxruntime"])), hold))
            for m, p in plans.items()}
    method = choose_method(fids)
    plan = plans[method]
    if refine:
        for p in pls.values():
            plan = refine_plan(base, plan, p, hold, _emit_checked).plan
    secs = time.perf_counter() - t0
    return {t: emit_qdq(base, plan, p) for t, p in pls.items()}, secs, method


def fidelity(ref: np.ndarray, got: np.ndarray, labels: np.ndarray) -> dict:
    from rescompress.quantization.fidelity import compare

    f = compare(ref, got, labels)
    return {"top1": f.top1, "fp32_top1": f.fp32_top1, "top1_drop": f.top1_drop, "top5": f.top5,
            "top1_agreement": f.top1_agreement, "sqnr_db": f.sqnr_db, "max_abs_diff": f.max_abs_diff, "n": f.n}


# ------------------------------------------------------------------------------------------ parts
def torch_ao_fx(checkpoint: Path, calib: np.ndarray, x_test: np.ndarray, b: int = 250) -> tuple[np.ndarray, float]:
    """torch.ao FX post-training INT8 with the x86 backend defaults, calibrated on the same images."""
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from rescompress.loading import load_model

    torch.backends.quantized.engine = "x86"
    model = load_model(checkpoint).module.eval()
    example = (torch.from_numpy(calib[:2]),)
    t0 = time.perf_counter()
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example)
    with torch.no_grad():
        for xb in batches(calib, 32):
            prepared(torch.from_numpy(xb))
    q = convert_fx(prepared)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        out = np.concatenate([q(torch.from_numpy(xb)).numpy() for xb in batches(x_test, b)])
    return out, secs


def openvino_logits(model_path_or_proto, x: np.ndarray, b: int = 250) -> np.ndarray:
    import onnx

    from rescompress.runtimes import make_runner

    with tempfile.TemporaryDirectory() as tmp:
        path = model_path_or_proto
        if isinstance(model_path_or_proto, onnx.ModelProto):
            path = Path(tmp) / "m.onnx"
            onnx.save(model_path_or_proto, str(path))
        r = make_runner(str(path), runtime="openvino")
        return np.concatenate([r.run(xb) for xb in batches(x, b)])


def _tool_rows(args, ckpt: Path, name: str, y_test: np.ndarray) -> None:
    """``rescompress quantize`` itself (``quantize_model``) with default settings, then without channel
    equalization and with nearest weight rounding, on the full test split; merged into the part's existing JSON
    (other rows kept)."""
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model

    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"results": {}}
    head = {k: v for k, v in doc.items() if k not in ("benchmark", "machine")}
    rows = dict(head.get("results", {}))
    for label, cfg in (("tool-default", QuantizeConfig(latency=False)),
                       ("tool-no-equalize", QuantizeConfig(latency=False, equalize=False)),
                       ("tool-nearest-rounding", QuantizeConfig(latency=False, weight_rounding="nearest"))):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            r = quantize_model(ckpt, f"{DEBIAN_FASHION_MNIST}@train", Path(tmp) / "o", config=cfg,
                               eval_data=f"{DEBIAN_FASHION_MNIST}@test")
            secs = time.perf_counter() - t0
        for t, f in r.fidelity.items():
            rows[f"{label}-{'ort' if t == 'onnxruntime' else 'trt'}"] = {
                "top1": f.top1, "fp32_top1": f.fp32_top1, "top1_drop": f.top1_drop, "top5": f.top5,
                "top1_agreement": f.top1_agreement, "sqnr_db": f.sqnr_db, "max_abs_diff": f.max_abs_diff, "n": f.n,
                "method": r.method, "ranges": r.ranges, "quantize_model_s": secs,
                "weight_rounding": r.calibration.get("weight_rounding"),
                "equalization": r.equalization,
                "refine": r.calibration.get("refine")}
            print(label, t, round(f.sqnr_db, 2), round(f.top1_agreement, 2), round(f.top1_drop, 2), file=sys.stderr)
    head["results"] = rows
    head["tool_rows"] = ("tool-* rows: quantize_model (what `rescompress quantize MODEL --calib-data "
                         "fashion-mnist@train --eval-data fashion-mnist@test` runs: 512 seeded calibration images of "
                         "which a quarter held out for --method auto and refinement), evaluated on the full test "
                         f"split ({len(y_test)} images); measured {time.strftime('%Y-%m-%d')}")
    write_result(name, head)


def part_fmnist(args) -> None:
    """ResNet checkpoints trained on Fashion-MNIST (the bundled ResNet-20 or ``--model``): fidelity vs peers."""
    import importlib.util

    import onnx

    from rescompress.loading import load_model

    ckpt = args.model or REFERENCE
    if not ckpt.exists():
        sys.exit(f"{ckpt} is not there (benchmarks/train_reference.py makes it)")
    loaded = load_model(ckpt)
    pre, arch = loaded.preprocess, loaded.arch
    calib = sample(open_dataset(DEBIAN_FASHION_MNIST, pre, split="train"), args.num_images)
    test_ds = open_dataset(DEBIAN_FASHION_MNIST, pre, split="test")
    x_test = np.stack([test_ds[i][0].numpy() for i in range(len(test_ds))]).astype(np.float32)
    y_test = np.array([test_ds._reader(i)[1] for i in range(len(test_ds))])
    with_ov = importlib.util.find_spec("openvino") is not None
    rows, ov_rows = {}, {}
    t_start = time.time()
    # (not ``name``: the loops below name their rows with it)
    default_name = "bench_quantize_resnet20" if ckpt == REFERENCE else f"bench_quantize_{arch}_{pre.size[0]}"
    result_name = args.name or default_name
    if args.rows == "tool":
        return _tool_rows(args, ckpt, result_name, y_test)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = tmp / f"{arch}.fp32.onnx"
        fp32_onnx_from_checkpoint(ckpt, fp32)
        ref = logits_of(session(fp32), x_test)
        sessions = {"fp32": session(fp32)}

        def add(name: str, logits: np.ndarray, **extra) -> None:
            rows[name] = {**fidelity(ref, logits, y_test), **extra}
            print(f"{name}: {json.dumps({k: rows[name][k] for k in ('top1_drop', 'top1_agreement', 'sqnr_db')})} "
                  f"({time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)

        for method in args.methods:
            files, secs = our_artifacts(fp32, calib, method)
            for t, m in files.items():
                name = f"ours-{method}-{'ort' if t == 'onnxruntime' else 'trt'}"
                s = session(m)
                add(name, logits_of(s, x_test), calibration_s=secs)
                if method == args.latency_method and t == "onnxruntime":
                    sessions[name] = s
        for refine in (False, True):
            files, secs, chosen = our_default_artifacts(fp32, calib, refine)
            for t, m in files.items():
                name = f"ours-auto{'-refined' if refine else ''}-{'ort' if t == 'onnxruntime' else 'trt'}"
                s = session(m)
                add(name, logits_of(s, x_test), calibration_s=secs, method=chosen)
                if refine and t == "onnxruntime":
                    sessions["ours-default-ort"] = s
                if refine and with_ov:
                    ov_rows[name] = fidelity(ref, openvino_logits(m, x_test), y_test)
        gemm = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Gemm"]
        for method, exclude in (("minmax", ()), ("entropy", ()), ("percentile", ()), ("minmax", tuple(gemm))):
            t0 = time.perf_counter()
            name = f"ort-{method}" + ("-fc-float" if exclude else "")
            path = ort_quantize(fp32, tmp / f"{name}.onnx", calib, method, exclude=exclude)
            secs = time.perf_counter() - t0
            s = session(path)
            add(name, logits_of(s, x_test), calibration_s=secs)
            if name in ("ort-minmax", "ort-minmax-fc-float"):
                sessions[name] = s
        try:
            logits, secs = torch_ao_fx(ckpt, calib, x_test)
            add("torch-ao-fx-x86", logits, calibration_s=secs)
        except Exception as exc:  # the x86 quantized engine needs FBGEMM/oneDNN in this torch build
            rows["torch-ao-fx-x86"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        lat = latency({k: Runner(v) for k, v in sessions.items()}, pre.input_shape, iters=args.fm_iters, rounds=5)
    write_result(result_name, {
        "command": "python " + " ".join(sys.argv),
        "model": f"{arch} from {ckpt.name} (Fashion-MNIST, {pre.channels}x{pre.size[0]}x{pre.size[1]})",
        "calibration": f"{args.num_images} images, seeded sample (seed {SEED}) of the Fashion-MNIST train split",
        "evaluation": f"full Fashion-MNIST test set ({len(x_test)} images)",
        "notes": "ours-*-trt is the TensorRT Q/DQ file executed by ONNX Runtime CPU (no TensorRT here); "
                 "ort-* is onnxruntime.quantization.quantize_static(QDQ, per_channel, QUInt8 act, QInt8 weight) "
                 "with its defaults (it also quantizes the Gemm output); ort-minmax-fc-float excludes the Gemm "
                 "node (the classifier runs in float); torch-ao-fx-x86 is prepare_fx/convert_fx with "
                 "get_default_qconfig_mapping('x86'), run in torch. ours-auto-refined is the tool's default.",
        "results": rows,
        "openvino": ov_rows or "openvino not installed",
        "latency_onnxruntime_cpu": lat,
    })


def resnet50_fp32(tmp: Path, n_bn: int = 64) -> tuple[Path, object, np.ndarray]:
    import torch

    from rescompress.export import export_onnx
    from rescompress.folding import fold_batchnorm
    from rescompress.models import build_model

    pre = get_preset("imagenet")
    ds = open_dataset(DEBIAN_FASHION_MNIST, pre, split="train")
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the re-estimation batches
    x = sample(ds, n_bn, seed=1)
    model.train()
    with torch.no_grad():
        for xb in batches(x, 16):
            model(torch.from_numpy(xb))
    model.eval()
    folded = fold_batchnorm(model, input_shape=pre.input_shape(2)).model
    fp32 = tmp / "r50.fp32.onnx"
    export_onnx(folded, pre, fp32, arch="resnet50", num_classes=10, probe=torch.from_numpy(x[:2]),
                check_parity=False)  # random deep net: chaotic logits, the 1e-5 parity bound is for trained ones
    return fp32, pre, ds


def part_resnet50_tool(args) -> None:
    """``quantize_model`` with default settings on resnet50 at 224x224: where its time goes, stage by stage."""
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model

    slice_npz = ASSETS / "fashion_mnist_train_slice.npz"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32, pre, _ = resnet50_fp32(tmp)
        t0 = time.perf_counter()
        r = quantize_model(fp32, slice_npz, tmp / "out", config=QuantizeConfig(latency=False),
                           preprocess=pre)
        total = time.perf_counter() - t0
    cal = r.calibration
    write_result("bench_quantize_resnet50_tool", {
        "command": "python " + " ".join(sys.argv),
        "model": "torchvision resnet50 (random init, BN re-estimated), 224x224, FP32 ONNX",
        "calib_data": f"{slice_npz.name} (resized to 224, 3 channels, ImageNet preprocessing)",
        "config": "QuantizeConfig(latency=False): the CLI defaults (512 images, --method auto with a quarter "
                  "held out, refinement, --weight-rounding auto), no --eval-data (agreement on held-out images)",
        "total_s": total,
        "calibration_s": cal.get("seconds"), "ranges_s": cal.get("ranges_seconds"),
        "equalization_s": cal.get("equalization_seconds"), "equalization": r.equalization,
        "weight_rounding": cal.get("weight_rounding"), "refine": cal.get("refine"),
        "method": r.method, "fidelity_vs_fp32": {t: f.to_dict() for t, f in r.fidelity.items()},
        "note": "random-init network: its logits are chaotic, so SQNR here says nothing about trained models",
    })
    print(json.dumps({"total_s": total, "calibration_s": cal.get("seconds"),
                      "equalization_s": cal.get("equalization_seconds"),
                      "rounding_s": (cal.get("weight_rounding") or {}).get("seconds"),
                      "refine_s": (cal.get("refine") or {}).get("seconds")}), file=sys.stderr)


def part_resnet50(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32, pre, ds = resnet50_fp32(tmp)
        calib = sample(ds, args.r50_images)
        from rescompress.quantization.stem import rewrite_stem

        files, secs = our_artifacts(fp32, calib, "max", batch=8, stem_s2d=False)
        plain = files["onnxruntime"]
        files["onnxruntime"], stem = rewrite_stem(plain)  # the tool's file: the same calibration, one rewrite
        ort_path = ort_quantize(fp32, tmp / "ort-minmax.onnx", calib, "minmax", batch=8)
        x = sample(ds, 32, seed=2)
        ref = logits_of(session(fp32), x, 8)
        ours = logits_of(session(files["onnxruntime"]), x, 8)
        agree = {
            "ours-ort": fidelity(ref, ours, np.zeros(0, int)),
            "ort-minmax": fidelity(ref, logits_of(session(ort_path), x, 8), np.zeros(0, int)),
            "ours-ort-vs-no-stem-s2d-max-abs-diff": float(np.abs(ours - logits_of(session(plain), x, 8)).max()),
        }
        runners = {
            "fp32": Runner(session(fp32)),
            "ours-int8-ort": Runner(session(files["onnxruntime"])),
            "ours-int8-ort-no-stem-s2d": Runner(session(plain)),
            "ort-minmax-int8": Runner(session(ort_path)),
        }
        lat = latency(runners, pre.input_shape, iters=args.r50_iters, rounds=args.r50_rounds)
    write_result("bench_quantize_resnet50", {
        "model": "torchvision resnet50, random init, BN statistics re-estimated on 64 Fashion-MNIST images "
                 "(3x224x224, ImageNet preprocessing)",
        "calibration": f"{args.r50_images} images, method max (ours) / MinMax (ORT)",
        "ours_ort_file": {"stem_rewrite": stem.to_dict() if stem else None,
                          "note": "ours-int8-ort is the tool's ORT file, its stem over 2x2 blocks; "
                                  "ours-int8-ort-no-stem-s2d is the same file without that rewrite (--no-stem-s2d)"},
        "agreement_on_32_images": agree,
        "latency_onnxruntime_cpu": lat,
    })


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def calib_child(spec: dict) -> dict:
    """Runs in a fresh process: one calibration, its wall time and the process's peak RSS."""
    import onnx  # noqa: F401  (import cost outside the timed region)
    import onnxruntime  # noqa: F401

    fp32 = Path(spec["fp32"])
    pre = get_preset(spec["preset"])
    ds = open_dataset(DEBIAN_FASHION_MNIST, pre, split="train")
    calib = LazyImages(ds, spec["n"])
    rss_before = _rss_now_mb()
    t0 = time.perf_counter()
    if spec["tool"] in ("ours", "ours-eq"):
        our_artifacts(fp32, calib, spec["method"], batch=spec["batch"], equalize=spec["tool"] == "ours-eq")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ort_quantize(fp32, Path(tmp) / "q.onnx", calib, spec["method"], batch=spec["batch"])
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**spec, "wall_s": wall, "peak_rss_mb": peak, "rss_before_mb": rss_before,
            "images_mb_if_held": calib.nbytes / 2**20}


def run_child(spec: dict, mem_limit_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--mem-limit-gb", str(mem_limit_gb)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {**spec, "failed": (p.stderr.strip().splitlines() or ["killed"])[-1][:300], "rc": p.returncode}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _calibration_summary(rows: list[dict]) -> dict:
    """Median wall time and peak RSS per (model, tool, method, images), and ours vs ORT at equal images."""
    import statistics

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "wall_s" in r:
            groups.setdefault(f"{r['model']}/{r['tool']}-{r['method']}/{r['n']}", []).append(r)
    out = {k: {"median_wall_s": statistics.median(r["wall_s"] for r in v), "runs": len(v),
               "max_peak_rss_mb": max(r["peak_rss_mb"] for r in v)} for k, v in groups.items()}
    for k, v in list(out.items()):
        model, tool, n = k.split("/")
        if tool.startswith("ours-"):
            for other in ("ort-entropy", "ort-minmax"):
                ref = out.get(f"{model}/{other}/{n}")
                if ref:
                    v[f"speedup_vs_{other.replace('-', '_')}"] = ref["median_wall_s"] / v["median_wall_s"]
    return out


def part_calibration(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        specs = []
        if "resnet20" in args.models and REFERENCE.exists():
            r20 = tmp / "r20.fp32.onnx"
            fp32_onnx_from_checkpoint(REFERENCE, r20)
            for n in (128, 1024):
                specs += [
                    {"model": "resnet20", "fp32": str(r20), "preset": "fashion-mnist", "tool": "ours",
                     "method": "entropy", "n": n, "batch": 32},
                    {"model": "resnet20", "fp32": str(r20), "preset": "fashion-mnist", "tool": "ort",
                     "method": "entropy", "n": n, "batch": 32},
                ]
        r50 = resnet50_fp32(tmp)[0] if "resnet50" in args.models else None
        for n in args.r50_calib_sizes if r50 else ():
            for tool in ("ours", "ours-eq"):  # ours-eq: with the channel equalization quantize does by default
                specs.append({"model": "resnet50", "fp32": str(r50), "preset": "imagenet", "tool": tool,
                              "method": "entropy", "n": n, "batch": 32})
        for n in args.ort_r50_sizes if r50 else ():
            for method in ("minmax", "entropy"):
                specs.append({"model": "resnet50", "fp32": str(r50), "preset": "imagenet", "tool": "ort",
                              "method": method, "n": n, "batch": 8})
        for repeat in range(args.repeats):  # interleaved: every spec once per round
            for spec in specs:
                row = {**run_child(spec, args.mem_limit_gb), "repeat": repeat}
                row.pop("fp32", None)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    # Keep the rows of models not re-run this time (parts of this benchmark run at different times).
    previous = Path(__file__).resolve().parent / "results" / "bench_quantize_calibration.json"
    if previous.exists():
        done = {r["model"] for r in rows}
        rows = [r for r in json.loads(previous.read_text())["runs"] if r["model"] not in done] + rows
    summary = _calibration_summary(rows)
    write_result("bench_quantize_calibration", {
        "command": "python " + " ".join(sys.argv),
        "summary": summary,
        "notes": "each row is one fresh subprocess; peak_rss_mb is ru_maxrss of that process (includes "
                 "library imports; images are decoded batch by batch for both tools); "
                 f"address-space limit {args.mem_limit_gb} GB per child to protect the shared machine "
                 "(a failed row means the calibrator needed more).",
        "runs": rows,
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["resnet20", "fmnist", "resnet50", "resnet50_tool", "calibration"])
    ap.add_argument("--model", type=Path, default=None, help="fmnist part: a Fashion-MNIST checkpoint "
                    "(default: the bundled ResNet-20)")
    ap.add_argument("--methods", nargs="*", default=["max", "percentile", "entropy", "mse"])
    ap.add_argument("--fm-iters", type=int, default=20, help="fmnist part: latency iterations per block")
    ap.add_argument("--rows", choices=("all", "tool"), default="all",
                    help="fmnist part: tool = only the rescompress-quantize rows, merged into the existing JSON")
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--name", default=None, help="fmnist part: result name (default bench_quantize_<arch>_<size>, or "
                    "bench_quantize_resnet20 for the bundled model)")
    ap.add_argument("--latency-method", default="entropy")
    ap.add_argument("--r50-images", type=int, default=32)
    ap.add_argument("--r50-iters", type=int, default=5)
    ap.add_argument("--r50-rounds", type=int, default=7)
    ap.add_argument("--r50-calib-sizes", type=int, nargs="*", default=[128, 1024])
    ap.add_argument("--ort-r50-sizes", type=int, nargs="*", default=[16, 32])
    ap.add_argument("--mem-limit-gb", type=float, default=12.0)
    ap.add_argument("--repeats", type=int, default=1, help="calibration part: interleaved rounds (medians)")
    ap.add_argument("--models", nargs="*", default=["resnet20", "resnet50"], help="calibration part: which models")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        lim = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        print(json.dumps(calib_child(json.loads(args.child))))
        return
    parts = {"resnet20": part_fmnist, "fmnist": part_fmnist, "resnet50": part_resnet50,
             "resnet50_tool": part_resnet50_tool,
             "calibration": part_calibration}
    parts[args.part](args)


if __name__ == "__main__":
    main()
