"""``rescompress inspect``: what a model file holds, without running anything from it.

For PyTorch files (state_dict, pickled ResNet, TorchScript, safetensors, rescompress checkpoint) it shows
the inferred architecture, source format, class count, input channels, default preprocessing, params and
MACs; for an ONNX file the graph's input/output shapes, opset, Q/DQ node count, params, MACs and the
metadata the exporter recorded. ``--input-size`` counts MACs at another input size (224 or HxW).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from rescompress.cli.common import (
    ArchOpt,
    InputSizeOpt,
    JsonOpt,
    Output,
    TrustPickleOpt,
    handle_errors,
    key_value_table,
    parse_size,
)
from rescompress.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)


@handle_errors
def inspect_command(
    model: Annotated[
        Path,
        typer.Argument(help="Model file: .pt/.pth (state_dict, pickled ResNet, TorchScript), .safetensors, .onnx."),
    ],
    arch: ArchOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_size: InputSizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a model's architecture, input spec, params and MACs (ONNX: shapes, opset, Q/DQ nodes)."""
    from rescompress.loading import is_onnx_path, load_model, onnx_summary

    out = Output(as_json)
    if model.is_file() and is_onnx_path(model):
        if arch is not None:
            raise UsageError("--arch applies to PyTorch files; an ONNX file records its own architecture")
        summary = onnx_summary(model, input_size=parse_size(input_size))
        data = summary.to_dict()
        data["params_human"] = human_count(summary.params)
        data["macs_human"] = human_count(summary.macs) if summary.macs is not None else None
        out.result(data, lambda console: _render_onnx(console, data))
        return
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, input_size=parse_size(input_size))
    data = loaded.to_dict()
    data["input_shape"] = list(loaded.preprocess.input_shape(1))
    data["params_human"] = human_count(loaded.params)
    data["macs_human"] = human_count(loaded.macs)
    out.result(data, lambda console: _render_torch(console, data))


def human_count(n: int | None) -> str:
    """3 significant digits with a K/M/G unit: 25557032 -> '25.6 M', 4089184256 -> '4.09 G'."""
    if n is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            x = n / scale
            return f"{x:.0f} {unit}" if x >= 100 else f"{x:.1f} {unit}" if x >= 10 else f"{x:.2f} {unit}"
    return str(n)


def _preprocess_line(pre: dict[str, Any] | None) -> str:
    if not pre:
        return "-"
    mean = ", ".join(f"{v:.4g}" for v in pre["mean"])
    std = ", ".join(f"{v:.4g}" for v in pre["std"])
    resize = f"resize {pre['resize']}, " if pre.get("resize") else ""
    h, w = pre["size"]
    return f"{pre['preset']}: {resize}{h}×{w}, {pre['channels']} ch, mean ({mean}), std ({std})"


def _render_torch(console: Console, d: dict[str, Any]) -> None:
    n, c, h, w = d["input_shape"]
    rows = {
        "file": d["path"],
        "arch": d["arch"] + (" (pruned widths)" if d["pruned"] else ""),
        "source format": d["source_format"],
        "classes": d["num_classes"],
        "input channels": d["in_channels"],
        "preprocessing": _preprocess_line(d["preprocess"]),
        "params": d["params_human"],
        "MACs": f"{d['macs_human']} at {h}×{w}",
    }
    spec = d.get("spec")
    if spec:
        rows["structure"] = (
            f"{spec['family']}, {spec['block']} blocks {tuple(spec['layers'])}, groups {spec['groups']}, "
            f"width/group {spec['width_per_group']}"
        )
        stem = spec.get("stem")
        from rescompress.models import Stem  # torch loads with it: not at import, so --help stays fast

        if spec["family"] == "torchvision" and stem and not Stem.from_dict(stem).standard:
            rows["structure"] += f"; {Stem.from_dict(stem).describe()}"
    for i, note in enumerate(d.get("notes") or []):
        rows[f"note {i + 1}" if len(d["notes"]) > 1 else "note"] = note
    console.print(key_value_table(rows))


def _render_onnx(console: Console, d: dict[str, Any]) -> None:
    size = d["input_size"]
    ops = ", ".join(f"{k} {v}" for k, v in sorted(d["op_counts"].items(), key=lambda kv: -kv[1]))
    rows = {
        "file": d["path"],
        "format": f"ONNX (opset {d['opset']}, IR {d['ir_version']}, producer {d['producer'] or '-'})",
        "arch": d["arch"] or "-",
        "input": f"{d['input_name']} {_dims(d['input_shape'])}",
        "output": f"{d['output_name']} {_dims(d['output_shape'])}",
        "classes": d["num_classes"],
        "input channels": d["in_channels"],
        "preprocessing": _preprocess_line(d["preprocess"]),
        "params": d["params_human"],
        "MACs": f"{d['macs_human']} at {size[0]}×{size[1]}" if size and d["macs"] is not None else "-",
        "Q/DQ nodes": d["qdq_nodes"],
        "nodes": f"{d['nodes']} ({ops})",
    }
    for key, value in sorted(d["metadata"].items()):
        if key != "rescompress.preprocess":  # already shown as the preprocessing line
            rows[f"meta {key}"] = value
    console.print(key_value_table(rows))


def _dims(shape: list) -> str:
    # Parentheses, not brackets: rich would read "[batch, 3, 224, 224]" as markup.
    return "(" + ", ".join("?" if v is None else str(v) for v in shape) + ")"
