"""The whole pipeline on the bundled model and data, as one function the ``demo`` command renders.

load the bundled ResNet-20 → evaluate FP32 → fold BN → export FP32 ONNX → calibrate and quantize to INT8
(ONNX Runtime and TensorRT files) → prune to half the MACs, fine-tune one epoch with distillation on the
calibration slice → quantize the pruned model → benchmark every artifact against the FP32 baseline on the
held-out evaluation slice (accuracy, agreement, interleaved ORT CPU latency). Nothing is downloaded; every
file lands in ``outdir``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rescompress.data import ASSETS, bundled_data

BUNDLED_MODEL = ASSETS / "resnet20_fashion_mnist.safetensors"

Notify = Callable[[str], None]
ProgressFn = Callable[[Iterable, int | None, str], Iterable]


@dataclass(frozen=True)
class DemoConfig:
    outdir: Path = Path("rescompress-demo")
    model: Path = BUNDLED_MODEL
    calib_images: int = 512
    prune_macs: float = 0.5
    finetune_epochs: float = 1.0
    batch_sizes: tuple[int, ...] = (1, 8)
    iters: int = 20
    rounds: int = 3
    threads: int | None = None

    def __post_init__(self) -> None:
        from rescompress.runtimes import check_threads

        check_threads(self.threads)  # before any work, not when the first runner is made


@dataclass(frozen=True)
class DemoResult:
    rows: tuple[dict, ...]
    stages: tuple[dict, ...]
    files: dict[str, str]
    eval_images: int
    wall_s: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "rows": list(self.rows), "stages": list(self.stages), "files": dict(self.files),
            "eval_images": self.eval_images, "wall_s": self.wall_s, "notes": list(self.notes),
        }


def run_demo(config: DemoConfig, notify: Notify | None = None, progress: ProgressFn | None = None) -> DemoResult:
    """Run every stage into a staging folder inside ``config.outdir`` and move the files in at the end: an
    interrupted or failed demo leaves the folder as it was (see :class:`~rescompress.fileio.StagedOutputs`)."""
    from dataclasses import replace

    from rescompress.fileio import StagedOutputs, write_text_atomic

    out = Path(config.outdir)
    with StagedOutputs(out) as staged:
        work = staged.folder
        result = _run(replace(config, outdir=work), notify, progress)
        for report in work.glob("*.quantize.json"):  # the quantize reports name their files where they land
            doc = _moved(json.loads(report.read_text(encoding="utf-8")), work, out)
            write_text_atomic(report, json.dumps(doc, indent=2) + "\n")
        staged.commit()
    return replace(result, files=_moved(result.files, work, out))


def _moved(value, work: Path, out: Path):
    """``value`` (JSON-like) with every path string of a file directly in ``work`` made a path in ``out``."""
    if isinstance(value, dict):
        return {k: _moved(v, work, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, work, out) for v in value]
    if isinstance(value, str) and Path(value).parent == work:
        return str(out / Path(value).name)
    return value


def _run(config: DemoConfig, notify: Notify | None, progress: ProgressFn | None) -> DemoResult:
    from rescompress.export import export_onnx
    from rescompress.folding import fold_batchnorm
    from rescompress.loading import load_model
    from rescompress.measure.benchmark import run_benchmark
    from rescompress.pruning import FinetuneConfig, PruneConfig, prune_model, save_pruned
    from rescompress.quantization import QuantizeConfig, quantize_model
    from rescompress.runtimes import make_runner

    say = notify or (lambda _msg: None)
    t0 = time.perf_counter()
    out = Path(config.outdir)
    out.mkdir(parents=True, exist_ok=True)
    calib, evald = bundled_data("calib"), bundled_data("eval")
    stages: list[dict] = []

    def stage(name: str, start: float, **details) -> None:
        stages.append({"stage": name, "seconds": round(time.perf_counter() - start, 1), **details})

    t = time.perf_counter()
    loaded = load_model(config.model)
    pre = loaded.preprocess
    stage("load", t, arch=loaded.arch, params=loaded.params, macs=loaded.macs)
    say(f"loaded {config.model.name}: {loaded.arch}, {loaded.params:,} params, {loaded.macs / 1e6:.1f} M MACs")

    t = time.perf_counter()
    fold = fold_batchnorm(loaded.module, input_shape=pre.input_shape(8))
    stage("fold", t, folded_pairs=len(fold.report.folded), max_rel_diff=fold.report.max_rel_diff)
    fp32_onnx = out / f"{config.model.stem}.fp32.onnx"
    t = time.perf_counter()
    exported = export_onnx(fold.model, pre, fp32_onnx, arch=loaded.arch, num_classes=loaded.num_classes,
                           source=config.model, folded=True)
    stage("export", t, parity_max_rel=exported.parity.max_rel_diff if exported.parity else None)
    say(f"folded {len(fold.report.folded)} Conv→BN pairs, exported {fp32_onnx.name}")

    qcfg = QuantizeConfig(num_images=config.calib_images, latency=False, threads=config.threads)
    t = time.perf_counter()
    say("calibrating and quantizing the FP32 model")
    q = quantize_model(fp32_onnx, calib, out, config=qcfg, eval_data=evald, progress=progress, notify=say)
    stage("quantize", t, method=q.method, **{f"{k}_sqnr_db": round(v.sqnr_db, 2) for k, v in q.fidelity.items()})

    t = time.perf_counter()
    from rescompress.data import open_dataset

    say(f"pruning to {config.prune_macs:.0%} of the MACs and fine-tuning {config.finetune_epochs:g} epoch"
        + (" (learning rate chosen by four short trial runs first)" if config.finetune_epochs else ""))
    pcfg = PruneConfig(target_macs=config.prune_macs,
                       finetune=FinetuneConfig(epochs=config.finetune_epochs) if config.finetune_epochs else None)
    prune_progress = {"progress": progress} if progress else {}
    pruned = prune_model(loaded.module, pre, pcfg, data=open_dataset(calib, pre, split="train"), **prune_progress)
    pruned_path = out / f"{config.model.stem}.pruned.safetensors"
    save_pruned(pruned.model, pruned_path, arch=loaded.arch, num_classes=loaded.num_classes,
                in_channels=loaded.in_channels, preprocess=pre, summary=pruned.report.to_dict(),
                source=config.model)
    ft = pruned.report.steps[-1].finetune
    stage("prune", t, macs_kept=round(pruned.macs_kept, 3), round_to=pruned.report.round_to,
          **({"finetune_lr": ft.lr} if ft is not None else {}))

    t = time.perf_counter()
    say("quantizing the pruned model")
    qp = quantize_model(pruned_path, calib, out, config=qcfg, eval_data=evald, progress=progress, notify=say)
    stage("quantize pruned", t, method=qp.method)

    runners = {
        "FP32 ORT": make_runner(fp32_onnx, "onnxruntime", threads=config.threads),
        # One torch thread unless told otherwise: torch's OpenMP workers interleaved with ORT sessions in one
        # process on a small, busy machine measured up to 100x slower than a single thread.
        "FP32 torch": make_runner(config.model, "torch", threads=config.threads or 1),
        "INT8 ORT": make_runner(q.artifacts["onnxruntime"], "onnxruntime", threads=config.threads),
        "INT8 TRT-QDQ*": make_runner(q.artifacts["tensorrt"], "onnxruntime", threads=config.threads),
        "pruned FP32": make_runner(qp.fp32_path, "onnxruntime", threads=config.threads),
        "pruned INT8": make_runner(qp.artifacts["onnxruntime"], "onnxruntime", threads=config.threads),
    }
    files = {
        "FP32 ORT": fp32_onnx, "FP32 torch": config.model, "INT8 ORT": q.artifacts["onnxruntime"],
        "INT8 TRT-QDQ*": q.artifacts["tensorrt"], "pruned FP32": qp.fp32_path,
        "pruned INT8": qp.artifacts["onnxruntime"],
    }
    t = time.perf_counter()
    say("benchmarking every artifact against FP32 (accuracy, agreement, interleaved latency)")
    bench = run_benchmark(runners, pre, evald, batch_sizes=config.batch_sizes, iters=config.iters,
                          rounds=config.rounds, warmup_s=0.5, progress=progress)
    stage("benchmark", t)
    macs = {"FP32 torch": loaded.macs, "FP32 ORT": loaded.macs, "INT8 ORT": loaded.macs,
            "INT8 TRT-QDQ*": loaded.macs, "pruned FP32": pruned.after.macs,
            "pruned INT8": pruned.after.macs}
    rows = []
    lat = bench.latency
    for entry in bench.models:
        row = {
            "model": entry.label,
            "MB": round(Path(files[entry.label]).stat().st_size / 1e6, 2),
            "MMACs": round(macs[entry.label] / 1e6, 1),
            "top-1": round(entry.accuracy.top1, 2) if entry.accuracy else None,
            "agree": round(entry.agreement.top1_agreement, 2) if entry.agreement else 100.0,
            "SQNR": round(entry.agreement.sqnr_db, 1) if entry.agreement else None,
        }
        for b in config.batch_sizes:
            row[f"ms b{b}"] = round(lat.get(entry.label, b).median_ms, 2) if lat else None
            row[f"x b{b}"] = (
                1.0 if lat is None or entry.label == lat.baseline else round(lat.ratio(entry.label, b).speedup, 2)
            )
        rows.append(row)
    notes = (
        f"evaluated on {bench.data['evaluated'] if bench.data else 0} held-out Fashion-MNIST test images; "
        "calibration and fine-tuning used the separate training slice",
        "top-1 and agreement with FP32 ORT in percent, SQNR of the logits vs FP32 in dB, MB = file size",
        "ms bN = median latency at batch N (interleaved rounds, ORT intra-op spinning off, torch 1 thread "
        "unless --threads); "
        "x bN = speed-up vs FP32 ORT",
        "* the TensorRT Q/DQ file, run in ONNX Runtime here for accuracy (TensorRT needs an NVIDIA GPU; ORT does not "
        "fuse its placement, so its ORT latency says nothing about TensorRT speed)",
    )
    return DemoResult(tuple(rows), tuple(stages), {k: str(v) for k, v in files.items()},
                      bench.data["evaluated"] if bench.data else 0, round(time.perf_counter() - t0, 1), notes)
