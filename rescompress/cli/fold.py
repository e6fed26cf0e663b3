"""``rescompress fold``: fold every foldable BatchNorm into its convolution and save a checkpoint.

The result is a rescompress checkpoint (safetensors, no pickle) flagged ``folded`` so it reloads with the
same structure; the fold report (pairs folded, BNs left and why, logit difference on a probe batch) goes
to stdout.
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
    rows_table,
    warn,
)
from rescompress.errors import RescompressError, UsageError


def register(app: typer.Typer) -> None:
    app.command("fold")(fold_command)


@handle_errors
def fold_command(
    model: Annotated[Path, typer.Argument(help="PyTorch model file (.pt/.pth state_dict or module, checkpoint).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folded checkpoint to write (.safetensors).")],
    arch: ArchOpt = None,
    trust_pickle: TrustPickleOpt = False,
    preset: PresetOpt = None,
    input_size: InputSizeOpt = None,
    channels: ChannelsOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fold BatchNorm into the preceding convolutions; report the pairs and the logit difference."""
    from rescompress.checkpoint import CheckpointHeader, read_header, save_checkpoint
    from rescompress.fileio import ensure_not_input, require_suffix
    from rescompress.folding import fold_batchnorm
    from rescompress.loading import load_model

    if output.suffix.lower() == ".onnx":
        raise UsageError("fold writes a rescompress checkpoint (.safetensors); for ONNX use `rescompress export`")
    require_suffix(output, ".safetensors", "a rescompress checkpoint in safetensors format")
    ensure_not_input(output, [model])
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, input_size=parse_size(input_size))
    pre = resolve_preprocess(loaded.preprocess, preset, input_size, channels, mean, std)
    if pre.channels != loaded.in_channels:
        raise RescompressError(
            f"the model takes {loaded.in_channels}-channel input but the preprocessing gives {pre.channels}; "
            f"pass --channels {loaded.in_channels}"
        )
    info(f"folding {loaded.arch} from {model} (probe {pre.input_shape(8)})")
    result = fold_batchnorm(loaded.module, input_shape=pre.input_shape(8))
    source = read_header(model)  # a rescompress checkpoint's own record (training notes, pruning) carries over
    header = CheckpointHeader(
        arch=loaded.arch,
        num_classes=loaded.num_classes,
        in_channels=loaded.in_channels,
        preprocess=pre,
        pruned=loaded.pruned,
        extra=source.extra if source is not None else None,
        folded=True,
    )
    save_checkpoint(result.model, output, header)
    report = result.report
    if not report.within_tolerance:
        warn(
            f"folded logits differ by {report.max_rel_diff:.3g} (relative), top-1 agreement "
            f"{report.top1_agreement:.2f}% on the probe batch; check the BN layers listed"
        )

    data = {"input": str(model), "output": str(output), "arch": loaded.arch, **report.to_dict()}

    def render(console: Console) -> None:
        console.print(
            key_value_table(
                {
                    "model": f"{model} ({loaded.arch})",
                    "output": str(output),
                    "folded pairs": report.to_dict()["num_folded"],
                    "BN left": report.to_dict()["num_left"],
                    "max |Δlogit|": report.max_abs_diff,
                    "max rel Δlogit": report.max_rel_diff,
                    "top-1 agreement %": report.top1_agreement,
                    "probe": "x".join(map(str, report.probe_shape)),
                    **(
                        {"float64 distance folded / original": f"{report.folded_fp64_rel_error:.3g} / "
                         f"{report.original_fp64_rel_error:.3g} (float32 rounding floor)"}
                        if report.folded_fp64_rel_error is not None and report.original_fp64_rel_error is not None
                        else {}
                    ),
                },
                title="BatchNorm folding",
            )
        )
        if report.left:
            console.print(rows_table([{"bn": b, "reason": r} for b, r in report.left], title="BatchNorm left"))

    Output(as_json).result(data, render)
