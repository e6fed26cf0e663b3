"""``rescompress demo``: every stage on the bundled ResNet-20 and Fashion-MNIST slices, one summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rescompress.cli.common import JsonOpt, Output, handle_errors, info, progress, rows_table


def register(app: typer.Typer) -> None:
    app.command("demo", help="Run the whole pipeline (fold, export, quantize, prune, benchmark) on the bundled "
                             "ResNet-20 and Fashion-MNIST slices and print one summary table.")(demo)


@handle_errors
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Folder for every artifact.")] = Path(
        "rescompress-demo"
    ),
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="Threads per runtime (default: ONNX Runtime's own; torch 1).", min=1),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    from rescompress.demo import DemoConfig, run_demo

    cfg = DemoConfig(outdir=output_dir, threads=threads)
    result = run_demo(cfg, notify=info, progress=progress)

    def render(console) -> None:
        console.print(rows_table(result.rows, title="rescompress demo: FP32 vs INT8 vs pruned+INT8"))
        for note in result.notes:
            console.print(f"- {note}", highlight=False)
        for label, path in result.files.items():
            console.print(f"  {label:14s} {path}", highlight=False)
        console.print(f"done in {result.wall_s:.0f} s", highlight=False)

    Output(as_json).result(result.to_dict(), render)
