"""``rescompress doctor``: what this machine offers the pipeline.

Library versions (torch, torchvision, onnx, onnxruntime, openvino, TensorRT; "not installed" where
absent, and why where installed but failing to import), CUDA availability and device, the CPU model and
the instruction sets that decide INT8 speed (AVX2, AVX-512, AVX-512 VNNI, AVX-VNNI, AMX), torch's thread
count and ONNX Runtime's providers.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from rescompress.cli.common import JsonOpt, Output, handle_errors, key_value_table

NOT_INSTALLED = "not installed"


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)


@handle_errors
def doctor_command(as_json: JsonOpt = False) -> None:
    """Show library versions, CUDA, CPU INT8 features, threads and ONNX Runtime providers."""
    from rescompress.system import machine_report

    report = machine_report()
    Output(as_json).result(report, lambda console: _render(console, report))


def _yes(flag: object) -> str:
    return "yes" if flag else "no"


def _render(console: Console, r: dict[str, Any]) -> None:
    broken = r.get("library_import_errors", {})
    libs = {
        name: version or (f"installed, does not import: {broken[name]}" if name in broken else NOT_INSTALLED)
        for name, version in r["libraries"].items()
    }
    cpu, tr = r["cpu"], r["torch"]
    rows: dict[str, Any] = {"python": r["python"], "platform": r["platform"]}
    rows.update(libs)
    rows["CUDA"] = (
        f"yes: {tr['cuda_device']} (CUDA {tr['cuda_version']})" if tr["cuda_available"] else "no"
    )
    rows["CPU"] = f"{cpu['model']} ({cpu['logical_cores']} logical cores)"
    rows["AVX2"] = _yes(cpu["avx2"])
    rows["AVX-512"] = _yes(cpu["avx512f"])
    rows["AVX-512 VNNI"] = _yes(cpu["avx512_vnni"])
    rows["AVX-VNNI"] = _yes(cpu["avx_vnni"])
    rows["AMX (int8)"] = _yes(cpu["amx_int8"])
    rows["INT8 paths"] = ", ".join(r["int8_cpu_paths"]) or "none (INT8 will not be faster than FP32 on this CPU)"
    rows["torch threads"] = f"{tr['threads']} intra-op, {tr['interop_threads']} inter-op"
    providers = r["onnxruntime_providers"]
    rows["ORT providers"] = ", ".join(providers) if providers is not None else NOT_INSTALLED
    devices = r["openvino_devices"]
    rows["OpenVINO devices"] = ", ".join(devices) if devices else (NOT_INSTALLED if devices is None else "-")
    console.print(key_value_table(rows))
