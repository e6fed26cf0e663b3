"""``rescompress benchmark``: a baseline against candidates — latency (interleaved), accuracy, agreement, size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rescompress.cli.common import (
    ArchOpt,
    BatchSizeOpt,
    ChannelsOpt,
    InputSizeOpt,
    JsonOpt,
    LimitOpt,
    MeanOpt,
    Output,
    PresetOpt,
    StdOpt,
    TrustPickleOpt,
    handle_errors,
    info,
    parse_ints,
    progress,
    resolve_preprocess,
    rows_table,
    warn,
)
from rescompress.cli.evaluate import DeviceOpt, RuntimeOpt, ThreadsOpt


def register(app: typer.Typer) -> None:
    @app.command("benchmark")
    @handle_errors
    def benchmark(
        models: Annotated[
            list[str],
            typer.Argument(
                help="BASELINE [CANDIDATE ...]: .pt/.safetensors/.onnx files, any mix; FILE@RUNTIME picks a "
                "runtime for one file (e.g. model.onnx@openvino).",
            ),
        ],
        data: Annotated[
            Path | None,
            typer.Option("--data", help="Labeled data for top-1/top-5 and agreement (omit: latency only)."),
        ] = None,
        batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes to time.")] = "1,8,32",
        threads: ThreadsOpt = None,
        device: DeviceOpt = "cpu",
        warmup: Annotated[
            float, typer.Option("--warmup", help="Warm-up seconds per model and batch.", min=0, max=600)
        ] = 1.0,
        iters: Annotated[int, typer.Option("--iters", help="Timed calls per block.", min=1)] = 20,
        rounds: Annotated[int, typer.Option("--rounds", help="Rounds of interleaved blocks.", min=1)] = 5,
        limit: LimitOpt = None,
        batch_size: BatchSizeOpt = 64,
        runtime: RuntimeOpt = "auto",
        report: Annotated[
            Path | None, typer.Option("--report", help="Also write the tables as Markdown to this file.")
        ] = None,
        preset: PresetOpt = None,
        input_size: InputSizeOpt = None,
        channels: ChannelsOpt = None,
        mean: MeanOpt = None,
        std: StdOpt = None,
        arch: ArchOpt = None,
        trust_pickle: TrustPickleOpt = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Compare BASELINE with each CANDIDATE: interleaved latency, accuracy, agreement, size, MACs.

        Latency p50/p90/p99 and throughput per batch size, all models timed interleaved in rotating blocks in
        one run (speed-up = baseline median / model median); top-1/top-5; agreement with the baseline (top-1 %,
        max/mean |Δlogit|, KL, SQNR); file size, params and MACs. ONNX Runtime sessions run with thread
        spinning off, so that one model's idle threads do not steal the cores from the next.
        """
        from rescompress.fileio import check_writable, ensure_not_input, write_text_atomic
        from rescompress.measure.benchmark import (
            check_same_normalization,
            default_preprocess,
            open_runners,
            run_benchmark,
            split_model_spec,
        )
        from rescompress.measure.report import (
            AGREEMENT_COLUMNS,
            LATENCY_COLUMNS,
            MODEL_COLUMNS,
            latency_rows,
            model_rows,
            settings_line,
            to_markdown,
        )

        batch_sizes = parse_ints(batch, "--batch")
        if report is not None:
            ensure_not_input(report, [split_model_spec(m)[0] for m in models] + [data])
            check_writable(report)
        runners = open_runners(models, runtime, threads, spinning=False, arch=arch, trust_pickle=trust_pickle,
                               device=device)
        pre = resolve_preprocess(default_preprocess(runners), preset, input_size, channels, mean, std)
        for note in check_same_normalization(runners, pre, chosen=any(v is not None for v in (preset, mean, std))):
            warn(note)

        def on_block(b: int, r: int, name: str) -> None:
            if r == 0 and name == next(iter(runners)):
                info(f"timing batch {b} ...")

        result = run_benchmark(
            runners, pre, data, batch_sizes=batch_sizes, warmup_s=warmup, iters=iters, rounds=rounds,
            limit=limit, eval_batch_size=batch_size, spinning=False, progress=progress, on_block=on_block,
            log=info,
        )
        if report is not None:
            write_text_atomic(report, to_markdown(result))
            info(f"wrote {report}")

        def render(console) -> None:
            rows = model_rows(result)
            console.print(rows_table(rows, MODEL_COLUMNS, title="Models"))
            if len(rows) > 1 and result.data is not None:
                console.print(rows_table(rows[1:], AGREEMENT_COLUMNS, title=f"Agreement with {rows[0]['model']}"))
            if result.latency is not None:
                console.print(rows_table(latency_rows(result), LATENCY_COLUMNS, title="Latency (interleaved)"))
            console.print(settings_line(result), highlight=False)

        Output(as_json).result(result.to_dict(), render)
