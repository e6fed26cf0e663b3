"""``rescompress evaluate``: top-1/top-5 of a model file (.pt, .safetensors or .onnx) on labeled data."""

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
    key_value_table,
    progress,
    resolve_preprocess,
)

# Shared with the benchmark and gate commands.
RuntimeOpt = Annotated[
    str,
    typer.Option(
        "--runtime",
        help="auto (ONNX files in onnxruntime, .engine/.plan in tensorrt, .pt/.safetensors in torch), torch, "
        "onnxruntime, openvino, tensorrt. benchmark and gate apply it to the ONNX files only (PyTorch files run "
        "in torch); FILE@RUNTIME picks per file.",
    ),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="Intra-op threads for every runtime (default: the runtime's).", min=1)
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="cpu, or cuda (torch on a CUDA GPU; onnxruntime-gpu's CUDA provider).")
]
DataOpt = Annotated[
    Path,
    typer.Option(
        "--data",
        help="ImageFolder tree, IDX folder (test split by default; DIR@train for the other), or .npz with x/y.",
    ),
]


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    @handle_errors
    def evaluate(
        model: Annotated[Path, typer.Argument(help="Model file: .pt/.pth/.safetensors (torch) or .onnx.")],
        data: DataOpt,
        limit: LimitOpt = None,
        batch_size: BatchSizeOpt = 64,
        runtime: RuntimeOpt = "auto",
        threads: ThreadsOpt = None,
        device: DeviceOpt = "cpu",
        preset: PresetOpt = None,
        input_size: InputSizeOpt = None,
        channels: ChannelsOpt = None,
        mean: MeanOpt = None,
        std: StdOpt = None,
        arch: ArchOpt = None,
        trust_pickle: TrustPickleOpt = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Top-1/top-5 accuracy (percent) of MODEL on labeled data, with a progress bar on stderr."""
        from rescompress.data import check_compatible, make_loader, open_dataset
        from rescompress.errors import UsageError
        from rescompress.measure.accuracy import evaluate_accuracy
        from rescompress.measure.benchmark import check_compatible_runners, split_model_spec
        from rescompress.runtimes import make_runner

        model, per_file = split_model_spec(model)  # FILE@RUNTIME, as benchmark and gate take it
        if per_file != "auto":
            if runtime not in ("auto", per_file):
                raise UsageError(f"--runtime {runtime} and {model}@{per_file} disagree; give one")
            runtime = per_file
        runner = make_runner(model, runtime, threads, arch=arch, trust_pickle=trust_pickle, device=device)
        pre = resolve_preprocess(runner.info.preprocess, preset, input_size, channels, mean, std)
        check_compatible_runners({model.name: runner}, pre)
        dataset = open_dataset(data, pre, split="test")
        check_compatible(
            dataset.info, runner.info.num_classes or (dataset.info.num_classes or 1), require_labels=True,
            purpose="evaluate",
        )
        loader = make_loader(dataset, batch_size=batch_size, limit=limit)
        n = min(len(dataset), limit or len(dataset))
        info(f"evaluating {model.name} ({runner.info.runtime}) on {n} images from {data}")
        acc = evaluate_accuracy(runner, loader, progress=progress)
        result = {
            "model": str(model),
            "runtime": runner.info.runtime,
            "arch": runner.info.arch,
            "num_classes": runner.info.num_classes,
            "data": str(data),
            "images": acc.n,
            "top1": acc.top1,
            "top5": acc.top5,
            "correct1": acc.correct1,
            "correct5": acc.correct5,
            "preprocess": pre.to_dict(),
            "threads": threads,
        }

        def render(console) -> None:
            shown = {k: v for k, v in result.items() if k not in ("preprocess", "correct1", "correct5")}
            shown["top1"] = f"{acc.top1:.2f}%  ({acc.correct1}/{acc.n})"
            shown["top5"] = "-" if acc.top5 is None else f"{acc.top5:.2f}%  ({acc.correct5}/{acc.n})"
            shown["preprocess"] = f"{pre.preset} {pre.size[0]}x{pre.size[1]}x{pre.channels}"
            console.print(key_value_table(shown))

        Output(as_json).result(result, render)
