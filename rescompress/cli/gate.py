"""``rescompress gate``: a CI accuracy-regression check with exit code 0 (PASSED) or 3 (FAILED)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rescompress.cli.common import (
    EXIT_CHECK_FAILED,
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
    first_line,
    handle_errors,
    info,
    progress,
    resolve_preprocess,
    rows_table,
    warn,
)
from rescompress.cli.evaluate import DataOpt, DeviceOpt, RuntimeOpt, ThreadsOpt

HELP = "\n\n".join((
    "Check a CANDIDATE model against a reference on labeled data: exit 0 when every check holds, 3 when one "
    "fails, 1 on an error, 2 on a usage error. The last stdout line is PASSED or FAILED: <failing checks> "
    "(RECORDED when no reference is given; with --json, stdout is one JSON document whose \"verdict\" holds "
    "that line).",
    "Checks (inclusive: a value exactly at its threshold passes):",
    "- accuracy_drop = baseline top-1 - candidate top-1, in percentage points; passes when <= --max-drop.",
    "- top1_agreement = percent of images where both predict the same class; passes when >= --min-agreement.",
    "- latency_ratio = candidate / baseline median latency at --batch, timed interleaved in this run; passes "
    "when <= --max-latency-ratio (checked only when that is given; needs --baseline).",
    "The reference is --baseline MODEL (run now), --against METRICS.json (written earlier by --save-metrics on "
    "the same --data and --limit), or both. --against alone pins a repository's accuracy without keeping the "
    "baseline model; its checks are accuracy_drop_vs_stored and top1_agreement_vs_stored (the file holds each "
    "image's predicted class). --save-metrics writes the candidate's metrics; --junit writes JUnit XML, one "
    "testcase per check (after a model or data error: one testcase holding the error).",
    "To pin a model's accuracy: rescompress gate --candidate model.pt --data val/ --save-metrics ci/metrics.json "
    "(no reference: records, checks nothing), commit the file, and in CI run rescompress gate --candidate NEW "
    "--against ci/metrics.json --data val/ --junit gate.xml.",
))


def register(app: typer.Typer) -> None:
    @app.command("gate", help=HELP, short_help="CI accuracy-regression check: exit 0 PASSED, 3 FAILED, 1 error.")
    @handle_errors
    def gate(
        candidate: Annotated[Path, typer.Option("--candidate", help="The model to check (.pt/.safetensors/.onnx).")],
        data: DataOpt,
        baseline: Annotated[
            Path | None, typer.Option("--baseline", help="Reference model, measured in this run.")
        ] = None,
        against: Annotated[
            Path | None, typer.Option("--against", help="Reference metrics JSON from an earlier --save-metrics.")
        ] = None,
        max_drop: Annotated[
            float, typer.Option("--max-drop", help="Largest allowed top-1 drop in percentage points (inclusive).")
        ] = 0.5,
        min_agreement: Annotated[
            float, typer.Option("--min-agreement", help="Smallest allowed top-1 agreement in percent (inclusive).")
        ] = 99.0,
        max_latency_ratio: Annotated[
            float | None,
            typer.Option("--max-latency-ratio", help="Largest allowed candidate/baseline median latency (inclusive)."),
        ] = None,
        batch: Annotated[int, typer.Option("--batch", help="Batch size of the latency check.", min=1)] = 1,
        limit: LimitOpt = None,
        batch_size: BatchSizeOpt = 64,
        runtime: RuntimeOpt = "auto",
        threads: ThreadsOpt = None,
        device: DeviceOpt = "cpu",
        warmup: Annotated[float, typer.Option("--warmup", help="Latency warm-up seconds.", min=0, max=600)] = 1.0,
        iters: Annotated[int, typer.Option("--iters", help="Timed calls per latency block.", min=1)] = 20,
        rounds: Annotated[int, typer.Option("--rounds", help="Interleaved latency rounds.", min=1)] = 5,
        junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here.")] = None,
        save_metrics: Annotated[
            Path | None, typer.Option("--save-metrics", help="Write the candidate's metrics JSON here.")
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
        from rescompress.errors import UsageError
        from rescompress.fileio import check_writable, ensure_not_input
        from rescompress.measure.benchmark import (
            check_same_normalization,
            default_preprocess,
            open_runners,
            split_model_spec,
        )
        from rescompress.measure.gate import GateMetrics, GateThresholds, run_gate, write_junit, write_junit_error

        # Option and output-path problems are found before any work and leave no file behind. A later error
        # (a model or data problem) replaces --junit's file with an error report, and writes nothing else.
        thresholds = GateThresholds(max_drop, min_agreement, max_latency_ratio, batch)
        record_only = baseline is None and against is None
        if record_only and save_metrics is None:
            raise UsageError(
                "the gate needs a reference: --baseline MODEL, --against METRICS.json, or both "
                "(or only --save-metrics to record the candidate's metrics)"
            )
        models = [split_model_spec(m)[0] for m in (candidate, baseline) if m is not None]  # FILE@RUNTIME
        inputs = [*models, against, data]
        outputs = [p for p in (junit, save_metrics) if p is not None]
        for out in outputs:
            ensure_not_input(out, inputs)
            check_writable(out)
        if len(outputs) == 2:
            ensure_not_input(junit, [save_metrics])
        try:  # from here on an error replaces --junit's file with an error report (no stale verdict)
            stored = GateMetrics.load(against) if against is not None else None
            models = [str(baseline), str(candidate)] if baseline is not None else [str(candidate)]
            runners = open_runners(models, runtime, threads, spinning=False, arch=arch, trust_pickle=trust_pickle,
                                   device=device)
            values = list(runners.values())
            cand_runner, base_runner = values[-1], (values[0] if baseline is not None else None)
            recorded = default_preprocess(runners)
            if recorded is None and stored is not None and stored.preprocess:
                from rescompress.spec import Preprocess

                recorded = Preprocess.from_dict(stored.preprocess)
            pre = resolve_preprocess(recorded, preset, input_size, channels, mean, std)
            for note in check_same_normalization(runners, pre, chosen=any(v is not None for v in (preset, mean, std))):
                warn(note)
            if stored is not None and stored.preprocess and stored.preprocess != pre.to_dict():
                warn(f"{against} was measured with other preprocessing ({stored.preprocess}); comparing anyway")

            result = run_gate(
                cand_runner, pre, data, baseline=base_runner, stored=stored, stored_source=str(against),
                thresholds=thresholds, limit=limit, eval_batch_size=batch_size, warmup_s=warmup, iters=iters,
                rounds=rounds, progress=progress, log=info, record_only=record_only,
            )
        except Exception as exc:  # re-raised as it is: handle_errors makes it one line and the exit code
            if junit is not None:
                write_junit_error(first_line(exc) or type(exc).__name__, junit)
            raise
        if record_only:
            info("no reference given: recorded the candidate's metrics, checked nothing")
        for note in result.notes:
            warn(note)
        if save_metrics is not None:
            result.candidate.save(save_metrics)
            info(f"wrote {save_metrics}")
        if junit is not None:
            write_junit(result, junit)
            info(f"wrote {junit}")

        def render(console) -> None:
            rows = [
                {"check": c.name, "value": c.shown, "rule": f"{c.op} {c.threshold:g}",
                 "result": "pass" if c.passed else "FAIL"}
                for c in result.checks
            ]
            if rows:
                console.print(rows_table(rows, ("check", "value", "rule", "result"), title="Gate"))
            for c in result.checks:
                console.print(f"{c.name}: {c.detail}", highlight=False, markup=False)
            typer.echo(result.verdict)

        Output(as_json).result(result.to_dict(), render)
        if not result.passed:  # the verdict line says which checks failed; it stays the last line
            raise typer.Exit(EXIT_CHECK_FAILED)
