"""``rescompress export``: FP32 ONNX export (BatchNorm folded first by default) with a parity check.

The file carries its preprocessing, architecture and class count in ONNX metadata; ONNX Runtime must
reproduce torch's logits on a probe batch (relative difference ≤ 1e-5, or no further from a float64 run
than float32 rounding puts torch itself; top-1 agreement 100%) or nothing is written.
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
    parse_size,
    resolve_preprocess,
)
from rescompress.errors import RescompressError


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


@handle_errors
def export_command(
    model: Annotated[Path, typer.Argument(help="PyTorch model file (.pt/.pth state_dict or module, checkpoint).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write.")],
    no_fold: Annotated[
        bool, typer.Option("--no-fold", help="Export as loaded, without folding BatchNorm in torch first (torch's "
                             "exporter may still fuse it; the file's metadata says whether BatchNorm is left).")
    ] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 17 to 20.", min=17, max=20)] = 17,
    arch: ArchOpt = None,
    trust_pickle: TrustPickleOpt = False,
    preset: PresetOpt = None,
    input_size: InputSizeOpt = None,
    channels: ChannelsOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a model to FP32 ONNX (input `input`, output `logits`, dynamic batch) and check parity."""
    from rescompress.export import export_onnx
    from rescompress.fileio import check_writable, ensure_not_input, require_suffix
    from rescompress.folding import fold_batchnorm
    from rescompress.loading import load_model

    ensure_not_input(output, [model])
    check_writable(output)
    require_suffix(output, ".onnx", "ONNX")
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, input_size=parse_size(input_size))
    pre = resolve_preprocess(loaded.preprocess, preset, input_size, channels, mean, std)
    if pre.channels != loaded.in_channels:
        raise RescompressError(
            f"the model takes {loaded.in_channels}-channel input but the preprocessing gives {pre.channels}; "
            f"pass --channels {loaded.in_channels}"
        )
    module = loaded.module
    fold_report = None
    if not no_fold:
        folded = fold_batchnorm(module, input_shape=pre.input_shape(8))
        module, fold_report = folded.model, folded.report
        info(f"folded {len(fold_report.folded)} BatchNorm layers ({len(fold_report.left)} left)")
    result = export_onnx(
        module, pre, output, arch=loaded.arch, num_classes=loaded.num_classes, opset=opset,
        source=model, folded=not no_fold,
    )
    parity = result.parity
    data = {
        "input": str(model),
        "arch": loaded.arch,
        "num_classes": loaded.num_classes,
        "preprocess": pre.to_dict(),
        "fold": fold_report.to_dict() if fold_report is not None else None,
        **result.to_dict(),
    }

    def render(console: Console) -> None:
        rows = {
            "model": f"{model} ({loaded.arch}, {loaded.num_classes} classes)",
            "output": f"{output} ({result.size_bytes / 1e6:.2f} MB, opset {result.opset})",
            "input": f"input: batch x {pre.channels} x {pre.size[0]} x {pre.size[1]} ({pre.preset} preprocessing)",
            "folded BN": "not by rescompress (--no-fold)" if fold_report is None else len(fold_report.folded),
            "ops": result.op_counts,
        }
        if parity is not None:
            rows.update(
                {
                    "parity max |Δlogit|": parity.max_abs_diff,
                    "parity max rel Δlogit": parity.max_rel_diff,
                    "parity top-1 agreement %": parity.top1_agreement,
                    **(
                        {"float64 distance ORT / torch": f"{parity.ort_fp64_rel_error:.3g} / "
                         f"{parity.torch_fp64_rel_error:.3g} (float32 rounding floor)"}
                        if parity.ort_fp64_rel_error is not None and parity.torch_fp64_rel_error is not None
                        else {}
                    ),
                    "parity": "PASSED" if parity.passed else "FAILED",
                }
            )
        console.print(key_value_table(rows, title="ONNX export (FP32)"))

    Output(as_json).result(data, render)
