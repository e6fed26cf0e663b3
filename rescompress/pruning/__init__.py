"""Structured channel pruning: coupled groups (Torch-Pruning), criteria, targets, schedule, recovery.

``prune_model(model, preprocess, PruneConfig(...), data=...)`` returns a :class:`PruneResult` with the
pruned copy and before/after statistics; ``save_pruned`` writes it as a pickle-free project checkpoint.
"""

from rescompress.pruning.finetune import (
    FinetuneConfig,
    FinetuneReport,
    choose_lr,
    finetune,
    finetune_auto,
    recalibrate_bn,
)
from rescompress.pruning.groups import ChannelGroup, MacModel, PruningGraphError, build_graph, channel_groups
from rescompress.pruning.importance import CRITERIA, make_importance
from rescompress.pruning.pruner import ModelStats, PruneConfig, PruneReport, PruneResult, prune_model, top1_accuracy
from rescompress.pruning.save import save_pruned
from rescompress.pruning.targets import default_round_to, effective_round_to

__all__ = [
    "CRITERIA", "ChannelGroup", "FinetuneConfig", "FinetuneReport", "MacModel", "ModelStats", "PruneConfig",
    "PruneReport", "PruneResult", "PruningGraphError", "build_graph", "channel_groups", "choose_lr", "default_round_to",
    "effective_round_to", "finetune", "finetune_auto", "make_importance", "prune_model", "recalibrate_bn",
    "save_pruned", "top1_accuracy",
]
