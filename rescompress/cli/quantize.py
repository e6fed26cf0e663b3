"""``rescompress quantize``: INT8 post-training quantization with calibration, for ONNX Runtime and TensorRT.

Parses options, calls :func:`rescompress.quantization.pipeline.quantize_model` and renders its result:
the FP32-vs-INT8 table (top-1/top-5, drop, agreement, logit SQNR), the worst tensors, the latency ratio
and the files written. Exit 3 when ``--max-drop`` cannot be met.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rescompress.cli.common import (
    ArchOpt,
    ChannelsOpt,
    InputSizeOpt,
    JsonOpt,
    MeanOpt,
    Output,
    PresetOpt,
    StdOpt,
    TrustPickleOpt,
    handle_errors,
    info,
    key_value_table,
    progress,
    resolve_preprocess,
    rows_table,
    warn,
)
from rescompress.errors import CheckFailed, UsageError

TARGET_CHOICES = {"both": ("onnxruntime", "tensorrt"), "onnxruntime": ("onnxruntime",), "tensorrt": ("tensorrt",)}


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)


CALIBRATION_OPTIONS = ("method", "percentile", "num_images", "seed", "refine_tensors", "ort_range", "equalize")


@handle_errors
def quantize_command(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="PyTorch model file (.pt/.pth/.safetensors) or FP32 .onnx.")],
    calib_data: Annotated[
        str | None,
        typer.Option("--calib-data", help="Calibration images: ImageFolder, image folder, IDX folder or .npz."),
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option("--eval-data", help="Labeled evaluation data for accuracy (else agreement only).")
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help="Calibration: max, percentile, entropy, mse or auto (on held-out images, "
                          "the highest logit SQNR among the methods whose top-1 is within noise of the best; "
                          "percentile at 99.99, 99.999 and --percentile).")
    ] = "auto",
    percentile: Annotated[float, typer.Option("--percentile", help="Percentile for --method percentile (auto also "
                                                                   "tries it).")] = 99.99,
    num_images: Annotated[int, typer.Option(
        "--num-images", min=1,
        help="Images sampled (seeded) for calibration; with --method auto a quarter of them are held out to pick "
             "the method.",
    )] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.", min=1)] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the calibration sample.", min=0, max=2**32 - 1)] = 0,
    weight_rounding: Annotated[
        str, typer.Option("--weight-rounding", help="hessian: round int8 weights to minimize each layer's output "
                          "error on calibration images (no speed cost); nearest: plain rounding; auto: hessian "
                          "when --calib-data is given.")
    ] = "auto",
    equalize: Annotated[
        bool, typer.Option("--equalize/--no-equalize", help="Rescale channels between convolutions (the FP32 "
                           "function unchanged) so each activation's one int8 grid serves all its channels; factors "
                           "from the calibration images. The FP32 file and the TensorRT cache stay unscaled.")
    ] = True,
    refine_tensors: Annotated[
        int, typer.Option("--refine-tensors", min=0, help="With --method auto: rescale the K worst tensors' ranges "
                          "on held-out images (0: off; large models get fewer, within a compute budget).")
    ] = 12,
    target: Annotated[str, typer.Option("--target", help="onnxruntime, tensorrt or both.")] = "both",
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Glob over node/tensor names to keep in float (repeatable)."),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option("--max-drop", help="Max top-1 drop (points) vs FP32, for each file; sensitive layers fall "
                     "back to float. Without labeled --eval-data: max top-1 disagreement with FP32 (percent)."),
    ] = None,
    max_fallback: Annotated[
        int | None, typer.Option("--max-fallback", help="At most this many layers back to float.", min=0)
    ] = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="Reuse a plan.json (skips calibration).")] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Folder for the outputs.")] = Path("out"),
    eval_limit: Annotated[int | None, typer.Option("--eval-limit", help="Evaluate on at most N images.", min=1)] = None,
    latency: Annotated[
        bool, typer.Option("--latency/--no-latency", help="Time FP32 vs INT8 on ONNX Runtime CPU.")
    ] = True,
    ort_range: Annotated[
        str,
        typer.Option(
            "--ort-range",
            help="ORT file's uint8 grid: asymmetric ([0,amax] for non-negative tensors, else the observed range "
            "clipped at amax), unsigned ([0,amax] for non-negative tensors, else zero point 128) or symmetric "
            "(zero point 128, TensorRT's grid).",
        ),
    ] = "asymmetric",
    stem_s2d: Annotated[
        bool, typer.Option("--stem-s2d/--no-stem-s2d", help="ONNX Runtime file: run the stride-2 stem on the image "
                           "as a stride-1 convolution over 2x2 blocks (SpaceToDepth), which ORT's int8 kernel runs "
                           "faster; it sums the same integer products.")
    ] = True,
    trt_version: Annotated[
        str | None,
        typer.Option("--trt-version", help="TensorRT version in the calibration cache's header (TensorRT skips a "
                     "cache made for another version): default the installed TensorRT, else 10.0.0. build-engine "
                     "re-tags the cache for the TensorRT it runs."),
    ] = None,
    arch: ArchOpt = None,
    trust_pickle: TrustPickleOpt = False,
    preset: PresetOpt = None,
    input_size: InputSizeOpt = None,
    channels: ChannelsOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Quantize a model to INT8 (ONNX Runtime and TensorRT Q/DQ files, TensorRT cache, plan, report)."""
    from rescompress.quantization.pipeline import QuantizeConfig, quantize_model
    from rescompress.quantization.trt_cache import DEFAULT_TRT_VERSION, default_trt_version

    if target not in TARGET_CHOICES:
        raise UsageError(f"--target must be onnxruntime, tensorrt or both, got {target!r}")
    if calib_data is None and plan is None:
        raise UsageError("--calib-data is required (or --plan to reuse an earlier calibration)")
    if plan is not None:
        given = [f"--{n.replace('_', '-')}" for n in CALIBRATION_OPTIONS
                 if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to calibration, which --plan skips (the plan's ranges "
                             "are used as they are); drop them, or recalibrate without --plan")
    cfg = QuantizeConfig(
        method=method, percentile=percentile, num_images=num_images, batch_size=batch_size, seed=seed,
        targets=TARGET_CHOICES[target], exclude=tuple(exclude or ()), max_drop=max_drop,
        max_float_layers=max_fallback, ort_range=ort_range, eval_limit=eval_limit,
        latency=latency, refine_tensors=refine_tensors, weight_rounding=weight_rounding, stem_s2d=stem_s2d,
        equalize=equalize,
        # TensorRT is imported for its version only when a cache is written
        trt_version=trt_version or (default_trt_version() if "tensorrt" in TARGET_CHOICES[target] else
                                    DEFAULT_TRT_VERSION),
    )
    custom = any(v is not None for v in (preset, input_size, channels, mean, std))

    def preprocess(default):
        return resolve_preprocess(default, preset, input_size, channels, mean, std)

    try:
        result = quantize_model(
            model, calib_data, output_dir, config=cfg, eval_data=eval_data, plan=plan, arch=arch,
            trust_pickle=trust_pickle, preprocess=preprocess if custom else None,
            progress=lambda it, total, desc: progress(it, total, desc), notify=info,
        )
    except CheckFailed as exc:  # --max-drop not met: a CI job reading --json still gets one document
        if as_json:
            Output(True).result({"passed": False, "error": str(exc), "fallback": exc.details})
        raise
    for w in result.warnings:
        warn(w)
    data = {"passed": True, **result.to_dict()}

    def render(console: Console) -> None:
        rows = [
            {
                "file": t, "top-1": f.top1, "top-5": f.top5, "FP32 top-1": f.fp32_top1, "drop": f.top1_drop,
                "agreement %": f.top1_agreement, "logit SQNR dB": f.sqnr_db,
            }
            for t, f in result.fidelity.items()
        ]
        if rows:
            console.print(rows_table(rows, title=f"FP32 vs INT8 on {result.eval_source}"))
        summary = {
            "method": result.ranges,
            "calibration images": result.plan.provenance.num_images,
            "quantized layers": {t: len(p.quantized_nodes) for t, p in result.placements.items()},
        }
        for t, layers in result.worst_layers.items():
            summary[f"worst tensors ({t})"] = ", ".join(f"{x.tensor} {x.sqnr_db:.1f} dB" for x in layers[:3])
        if result.latency:
            speedup = result.latency["speedup"]
            summary["INT8 speed-up (ORT CPU)"] = {f"batch {b}": round(s, 2) for b, s in speedup.items()}
        if result.equalization:
            e = result.equalization
            summary["channel equalization"] = (
                f"{e['channels']} channels in {e['groups_scaled']} of {e['groups']} groups rescaled "
                f"(median factor {e['median_scale']:.2f}, largest {e['max_scale']:.2f})")
        if result.stem_rewrite:
            r = result.stem_rewrite
            summary["ORT stem as 2x2 blocks"] = (
                f"{r.node}: {r.kernel[0]}x{r.kernel[1]} stride 2 -> {r.block_kernel[0]}x{r.block_kernel[1]} over "
                f"{r.channels[1]} channels")
        for t, fb in (result.fallback or {}).items():
            summary[f"float fallback ({t})"] = ", ".join(fb.float_nodes) or "none needed"
        summary.update({k: str(v) for k, v in result.artifacts.items()})
        console.print(key_value_table(summary))
        console.print("PASSED")

    Output(as_json).result(data, render)
