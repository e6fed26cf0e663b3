"""``rescompress build-engine``: preflight an ONNX file and build a TensorRT engine with a sidecar.

Without TensorRT the command exits 1 with one line saying how to install it; ``--check-only`` runs the
TensorRT-free preflight (Q/DQ form, opset, dynamic batch, profiles, calibration cache) and exits 0 when
the file is ready, 1 when it is not — useful in CI on machines without a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rescompress.cli.common import JsonOpt, Output, handle_errors, info, key_value_table, warn


def register(app: typer.Typer) -> None:
    app.command("build-engine")(build_engine_command)


@handle_errors
def build_engine_command(
    model: Annotated[Path, typer.Argument(help="ONNX file: a *.int8.trt.onnx Q/DQ file for int8, else FP32/FP16.")],
    batch: Annotated[
        list[str] | None,
        typer.Option(
            "--batch", "-b",
            help="Batch profile MIN:OPT:MAX or N (static); repeat for several profiles. "
                 "Default: N:N:N for a static-batch file, else 1:8:32.",
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (int8 for a Q/DQ file, fp16 for a float16 file, else fp32), int8 (strongly typed from "
                 "Q/DQ), fp16, fp32, int8-implicit (TensorRT 10 only, needs a calibration cache).",
        ),
    ] = "auto",
    calib_cache: Annotated[
        Path | None, typer.Option("--calib-cache", help="TensorRT calibration cache for int8-implicit.")
    ] = None,
    workspace: Annotated[
        int | None, typer.Option("--workspace", help="Builder workspace limit in MiB (default: TensorRT's).", min=1)
    ] = None,
    timing_cache: Annotated[
        Path | None, typer.Option("--timing-cache", help="Timing cache file: read if present, written after.")
    ] = None,
    opt_level: Annotated[
        int, typer.Option("--opt-level", help="TensorRT builder optimization level 0..5.", min=0, max=5)
    ] = 3,
    dla_core: Annotated[
        int | None, typer.Option("--dla-core", help="Build for this DLA core (Jetson), GPU fallback on.", min=0)
    ] = None,
    check_only: Annotated[
        bool, typer.Option("--check-only", help="Only run the preflight checks (no TensorRT needed).")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Engine path (default: <stem>.engine beside the ONNX).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a TensorRT engine (plus a <engine>.json sidecar) from an ONNX file."""
    from rescompress.engine.preflight import EngineBuildConfig, EnginePreflightError, preflight, require_ready
    from rescompress.engine.profiles import parse_profiles
    from rescompress.engine.tensorrt import build_engine, import_tensorrt, installed_tensorrt_version

    config = EngineBuildConfig(
        onnx_path=model,
        profiles=parse_profiles(batch) if batch else None,
        precision=precision,
        output=output,
        workspace_mib=workspace,
        timing_cache=timing_cache,
        optimization_level=opt_level,
        dla_core=dla_core,
        calib_cache=calib_cache,
    )
    out = Output(as_json)
    if check_only:
        report = preflight(config, tensorrt_version=installed_tensorrt_version())
        for w in report.warnings:
            warn(w)
        out.result(report.to_dict(), render=lambda console: _render_report(console, report))
        if not report.ok:
            raise EnginePreflightError(
                f"{model} is not ready for an {report.precision} engine ({len(report.errors)} problem"
                f"{'s' if len(report.errors) != 1 else ''}: {report.errors[0]})"
            )
        return

    # Check the file before asking for TensorRT: a bad file is worth knowing about on any machine.
    report = preflight(config, tensorrt_version=installed_tensorrt_version())
    require_ready(report)  # the preflight also refuses an engine path that is an input or cannot be written
    import_tensorrt()
    info(f"building {report.precision} engine from {model} (profiles "
         f"{', '.join(p.text for p in report.profiles)}); this can take minutes")
    result = build_engine(config)
    out.result(result.to_dict(), render=lambda console: _render_result(console, result))


def _render_report(console: Console, report) -> None:
    console.print(key_value_table({
        "file": str(report.onnx_path),
        "precision": report.precision,
        "profiles": ", ".join(p.text for p in report.profiles) or "-",
        "input": f"{report.input_name} {list(report.input_dims)}",
        "opset": report.opset,
        "Q/DQ nodes": f"{report.qdq.quantize} QuantizeLinear, {report.qdq.dequantize} DequantizeLinear",
        "Q/DQ placement check": report.qdq_checker,
        "calibration cache": str(report.calib_cache) if report.calib_cache else "-",
        "TensorRT": report.tensorrt_version or "not installed (version checks skipped)",
    }))
    for e in report.errors:
        console.print(f"[red]✗[/red] {e}", highlight=False)
    console.print("[green]PASSED[/green]" if report.ok else "[red]FAILED[/red]")


def _render_result(console: Console, result) -> None:
    meta = result.metadata
    console.print(key_value_table({
        "engine": str(result.engine_path),
        "sidecar": str(result.sidecar_path),
        "size": f"{result.engine_bytes / 2**20:.2f} MiB",
        "precision": meta.precision,
        "profiles": ", ".join(p.text for p in meta.profiles),
        "built with": meta.environment.describe(),
        "build time": f"{meta.build_seconds:.1f} s",
        "timing cache": str(result.timing_cache_written) if result.timing_cache_written else "-",
    }))
    console.print("[green]PASSED[/green]")
