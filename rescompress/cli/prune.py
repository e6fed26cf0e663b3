"""``rescompress prune``: structured channel pruning to a ratio, MAC or latency target, with recovery.

Loads the model safely, prunes coupled channel groups (Torch-Pruning's dependency graph) with the chosen
criterion, re-estimates BatchNorm and fine-tunes with distillation when data is given, writes a
pickle-free checkpoint that every other command loads, and prints params, MACs, top-1 and ORT CPU
latency (batch 1 and 8) before and after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
    parse_size,
    progress,
    resolve_preprocess,
    rows_table,
    warn,
)
from rescompress.errors import RescompressError, UsageError


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_command)


@handle_errors
def prune_command(
    model: Annotated[Path, typer.Argument(help="PyTorch model file (.pt/.pth state_dict or module, checkpoint).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Pruned checkpoint to write (.safetensors).")],
    ratio: Annotated[float | None, typer.Option("--ratio", help="Fraction of channels to remove, e.g. 0.3.")] = None,
    target_macs: Annotated[
        float | None, typer.Option("--target-macs", help="Fraction of MACs to keep, e.g. 0.5.")
    ] = None,
    target_latency: Annotated[
        float | None,
        typer.Option("--target-latency", help="Fraction of the measured ORT CPU latency to keep, e.g. 0.6."),
    ] = None,
    criterion: Annotated[
        str, typer.Option("--criterion", help="Channel importance: l1, l2, bn, taylor (needs data), random.")
    ] = "l1",
    global_ranking: Annotated[
        bool,
        typer.Option("--global/--uniform", help="Rank channels across layers (capped) or prune each layer alike."),
    ] = False,
    max_layer_ratio: Annotated[
        float, typer.Option("--max-layer-ratio", help="Never remove more than this fraction of a layer.")
    ] = 0.8,
    round_to: Annotated[
        int | None,
        typer.Option("--round-to", help="Keep widths multiples of N (default: 16 with AVX-512, 8 with AVX2, else 4).",
                     min=1),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Prune in K steps, recovering after each.", min=1)] = 1,
    finetune_data: Annotated[
        Path | None,
        typer.Option("--finetune-data", help="Training images (labeled for fine-tuning; unlabeled: BN only)."),
    ] = None,
    epochs: Annotated[float, typer.Option("--epochs", help="Fine-tuning epochs (0: BN re-estimation only).",
                                          min=0, max=10000)] = 1.0,
    lr: Annotated[
        str, typer.Option("--lr", help="Fine-tuning learning rate (SGD, cosine decay), or auto: one of "
                          "0.003/0.01/0.03/0.06 after short trial runs (a tenth of the run's batches each, at least "
                          "20 and at most all of them) judged on held-out fine-tuning images: the lowest-loss "
                          "rate, or the next larger one when within one standard error of it.")
    ] = "auto",
    distill: Annotated[
        bool, typer.Option("--distill/--no-distill", help="Distill from the unpruned model while fine-tuning.")
    ] = True,
    augment: Annotated[
        bool, typer.Option("--augment/--no-augment", help="Random shifts and horizontal flips while fine-tuning "
                           "(for runs of several epochs; flips suit natural images, not text or digits).")
    ] = False,
    bn_recalib: Annotated[
        int, typer.Option("--bn-recalib", help="Images for BatchNorm re-estimation after pruning (0: off).", min=0)
    ] = 1024,
    reconstruct: Annotated[
        int | None,
        typer.Option("--reconstruct", help="Images for refitting each pruned layer to the unpruned layer's output "
                     "(least squares, before BN re-estimation; 0: off). Default: 512 (fewer for large inputs, to "
                     "keep its cache under 1 GiB) when no fine-tuning follows (unlabeled data, --epochs 0), else "
                     "off.", min=0, show_default=False)
    ] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="Labeled images for top-1.")] = None,
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = 64,
    latency: Annotated[
        bool, typer.Option("--latency/--no-latency", help="Measure ORT CPU latency before/after (batch 1, 8).")
    ] = True,
    device: Annotated[str, typer.Option("--device", help="Fine-tuning device: auto, cpu, cuda.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed for data order and the random criterion.", min=0,
                                      max=2**32 - 1)] = 0,
    arch: ArchOpt = None,
    trust_pickle: TrustPickleOpt = False,
    preset: PresetOpt = None,
    input_size: InputSizeOpt = None,
    channels: ChannelsOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Prune channels to a target and save a checkpoint; prints before/after params, MACs, top-1, latency."""
    from rescompress.checkpoint import CheckpointHeader, check_saveable
    from rescompress.data import check_compatible, open_dataset
    from rescompress.fileio import check_writable, ensure_not_input, require_suffix
    from rescompress.loading import load_model
    from rescompress.pruning import FinetuneConfig, PruneConfig, prune_model, save_pruned

    learning_rate = _parse_lr(lr)  # checked even where no fine-tuning runs
    ensure_not_input(output, [model, finetune_data, eval_data])
    check_writable(output)  # before pruning and fine-tuning, which can take hours
    require_suffix(output, ".safetensors", "a rescompress checkpoint in safetensors format")
    config = PruneConfig(
        ratio=ratio, target_macs=target_macs, target_latency=target_latency, criterion=criterion,
        ranking="global" if global_ranking else "uniform", max_layer_ratio=max_layer_ratio, round_to=round_to,
        steps=steps, bn_recalib=bn_recalib, reconstruct=reconstruct,
        finetune=FinetuneConfig(epochs=epochs, lr=learning_rate, distill=distill, augment=augment, seed=seed)
        if finetune_data and epochs > 0 else None,
        batch_size=batch_size, seed=seed, device=device,
    )
    config.validate()  # before the (slow) load, so a bad option fails at once
    if criterion == "taylor" and finetune_data is None:
        raise UsageError("the taylor criterion needs data: pass --finetune-data")
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, input_size=parse_size(input_size))
    pre = resolve_preprocess(loaded.preprocess, preset, input_size, channels, mean, std)
    if pre.channels != loaded.in_channels:
        raise RescompressError(
            f"the model takes {loaded.in_channels}-channel input but the preprocessing gives {pre.channels}; "
            f"pass --channels {loaded.in_channels}"
        )
    # A structure a checkpoint cannot describe fails here, not after pruning and fine-tuning.
    check_saveable(loaded.module, CheckpointHeader(loaded.arch, loaded.num_classes, loaded.in_channels, pre))
    data = evald = None
    if finetune_data is not None:
        data = open_dataset(finetune_data, pre, split="train")
        if config.active_finetune is not None:  # BatchNorm re-estimation needs no labels
            check_compatible(data.info, loaded.num_classes, purpose="fine-tuning")
        if config.finetune is not None and data.info.labeled and batch_size < 2:
            raise UsageError("fine-tuning needs --batch-size 2 or more (BatchNorm cannot train on batches of one)")
        data = _limited(data, limit, seed)
    if eval_data is not None:
        evald = open_dataset(eval_data, pre, split="test")
        check_compatible(evald.info, loaded.num_classes, require_labels=True, purpose="--eval-data")
    info(f"pruning {model} ({loaded.arch}, {loaded.macs / 1e6:.1f} M MACs at {pre.size[0]}x{pre.size[1]})")
    result = prune_model(
        loaded.module, pre, config, data=data, eval_data=evald, eval_limit=limit, measure_latency=latency,
        progress=progress,
    )
    rep = result.report
    info(f"widths rounded to multiples of {rep.round_to} ({rep.round_to_reason}); a layer narrower than "
         f"{4 * rep.round_to} channels uses a step of at most a quarter of its width")
    for s in rep.steps:
        done = f"step {s.step}/{len(rep.steps)}: {s.macs / 1e6:.2f} M MACs"
        if s.reconstruct is not None:
            r = s.reconstruct
            done += f", {r.layers} layers refit on {r.images} images, a quarter held out"
            if r.error_before:
                looked = len(r.error_before)
                done += (f" (relative output error on those {sum(r.error_before.values()) / looked:.2f} -> "
                         f"{sum(r.error_after.values()) / looked:.2f}, mean over layers)")
            if not r.used:
                done += " then dropped (see the note)"
        if s.bn_recalib_images:
            done += f", BatchNorm re-estimated on {s.bn_recalib_images} images"
        if s.finetune is not None:
            if s.finetune.lr_choice is not None:
                done += f", learning rate {s.finetune.lr:g} chosen by trials"
            done += (f", fine-tuned {s.finetune.batches} batches (loss {s.finetune.first_loss:.3f} -> "
                     f"{s.finetune.last_loss:.3f}{', distilled' if s.finetune.distill else ''})")
        info(done)
    for note in rep.notes:
        warn(note)
    summary = {"criterion": rep.criterion, "ranking": rep.ranking, "round_to": rep.round_to,
               "target": rep.target, "macs_before": result.before.macs, "macs_after": result.after.macs}
    save_pruned(result.model, output, arch=loaded.arch, num_classes=loaded.num_classes,
                in_channels=loaded.in_channels, preprocess=pre, summary=summary, source=model)
    data_out = {"input": str(model), "output": str(output), "arch": loaded.arch, **result.to_dict()}

    def render(console: Console) -> None:
        rows = [_row("params", result.before.params, result.after.params),
                _row("MACs", result.before.macs, result.after.macs)]
        if result.before.top1 is not None:
            rows.append({"": "top-1 %", "before": result.before.top1, "after": result.after.top1,
                         "after/before": f"{result.after.top1 - result.before.top1:+.2f} pt"})
        if result.latency is not None:
            for b in result.latency.batch_sizes:
                rows.append(_row(f"ORT CPU ms (batch {b})", result.before.latency_ms[b], result.after.latency_ms[b]))
        title = f"Pruned {loaded.arch}: {rep.criterion}, {rep.ranking}, round-to {rep.round_to}"
        console.print(rows_table(rows, ["", "before", "after", "after/before"], title=title))
        console.print(f"wrote {output}")

    Output(as_json).result(data_out, render)


def _row(name: str, before: float, after: float) -> dict:
    return {"": name, "before": before, "after": after, "after/before": f"{after / before:.3f}"}


def _parse_lr(text: str) -> float | None:
    """``auto`` (None: chosen by trials) or a learning rate in (0, 10]."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--lr must be a number or auto, got {text!r}") from None
    if not 0 < value <= 10:  # NaN fails this too
        raise UsageError(f"--lr must be in (0, 10] or auto, got {text!r}")
    return value


def _limited(dataset, limit: int | None, seed: int):
    """A seeded random ``limit`` of the items (:func:`rescompress.data.limit_indices`), not the first ones."""
    if limit is None or limit >= len(dataset):
        return dataset
    from torch.utils.data import Subset

    from rescompress.data import limit_indices

    sub = Subset(dataset, limit_indices(len(dataset), limit, seed))
    sub.info = dataset.info  # keeps "labeled" visible to the pruner
    return sub
