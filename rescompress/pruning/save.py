"""Saving a pruned model as a project checkpoint: safetensors weights whose shapes are the new widths.

No pickle and no width table to keep in sync: :func:`rescompress.checkpoint.load_checkpoint` rebuilds the
named architecture and resizes every Conv/BN/Linear to the stored shapes. The header marks the model as
pruned and records a short summary of how (criterion, target, MACs before/after).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from rescompress.checkpoint import CheckpointHeader, read_header, save_checkpoint
from rescompress.fileio import ensure_not_input
from rescompress.spec import Preprocess


def save_pruned(
    model: nn.Module,
    path: Path | str,
    *,
    arch: str,
    num_classes: int,
    in_channels: int,
    preprocess: Preprocess | None,
    summary: dict | None = None,
    source: Path | str | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (refusing to overwrite ``source``)."""
    if source is not None:
        ensure_not_input(path, [source])
    # A rescompress checkpoint's own record (e.g. training notes) carries over; "pruning" is this run's.
    from_source = read_header(source) if source is not None else None
    extra = dict(from_source.extra or {}) if from_source is not None else {}
    if summary:
        extra["pruning"] = summary
    header = CheckpointHeader(arch=arch, num_classes=num_classes, in_channels=in_channels, preprocess=preprocess,
                              pruned=True, extra=extra or None)
    return save_checkpoint(model, path, header)
