"""Accuracy-aware fallback: return the fewest, most sensitive layers to float until the drop is small enough.

Sensitivity is measured one layer at a time: the model with *only* that layer quantized, its logit SQNR
against FP32 (lower = more sensitive). Layers are then returned to float in that order; the search tries
k = 0, 1, 2, 4, ... layers and bisects back between the last failing and the first passing k, so it
evaluates O(log n) configurations. The callbacks keep this module free of graph and runtime details.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rescompress.errors import CheckFailed
from rescompress.measure.accuracy import TOLERANCE


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    sqnr_db: float  # logit SQNR with only this layer quantized

    def to_dict(self) -> dict:
        return {"node": self.node, "sqnr_db": self.sqnr_db}


@dataclass(frozen=True)
class FallbackResult:
    max_drop: float
    metric: str  # "top1_drop" (labeled eval data) or "disagreement" (percent of changed top-1, no labels)
    float_nodes: tuple[str, ...]
    achieved: float
    tried: tuple[tuple[int, float], ...]  # (layers in float, metric)
    ranking: tuple[LayerSensitivity, ...]

    def to_dict(self) -> dict:
        return {
            "max_drop": self.max_drop, "metric": self.metric, "float_nodes": list(self.float_nodes),
            "num_float": len(self.float_nodes), "achieved": self.achieved,
            "tried": [{"num_float": k, "value": v} for k, v in self.tried],
            "ranking": [r.to_dict() for r in self.ranking],
        }


def rank_layers(nodes: Sequence[str], sensitivity: Callable[[str], float]) -> list[LayerSensitivity]:
    """Most sensitive (lowest SQNR when quantized alone) first; ties keep graph order."""
    scored = [LayerSensitivity(n, float(sensitivity(n))) for n in nodes]
    return sorted(scored, key=lambda s: s.sqnr_db)


def search_fallback(
    ranking: Sequence[LayerSensitivity] | Callable[[], Sequence[LayerSensitivity]],
    measure: Callable[[tuple[str, ...]], float],
    max_drop: float,
    metric: str = "top1_drop",
    max_float: int | None = None,
) -> FallbackResult:
    """The smallest k such that keeping the k most sensitive layers in float gives ``measure <= max_drop``.

    ``ranking`` may be a callable: ranking costs one run per layer, so it is only called when the fully
    quantized model (k = 0) misses the target and ``max_float`` allows a fallback at all. ``max_float``
    caps k (default: all but one layer, so something stays quantized). Raises :class:`CheckFailed` when no
    k up to the cap meets the target.
    """
    cache: dict[int, float] = {}
    ranked: list[tuple[LayerSensitivity, ...]] = []  # filled on first need

    def order() -> tuple[LayerSensitivity, ...]:
        if not ranked:
            ranked.append(tuple(ranking() if callable(ranking) else ranking))
        return ranked[0]

    def value(k: int) -> float:
        if k not in cache:
            cache[k] = float(measure(tuple(r.node for r in order()[:k]) if k else ()))
        return cache[k]

    def meets(k: int) -> bool:  # inclusive, like the gate: a drop equal to the limit passes
        return value(k) <= max_drop + TOLERANCE

    k, last_fail = 0, -1
    if meets(0):
        given = () if callable(ranking) else tuple(ranking)  # a ranking given as a list costs nothing to return
        return FallbackResult(max_drop=max_drop, metric=metric, float_nodes=(), achieved=value(0),
                              tried=((0, value(0)),), ranking=ranked[0] if ranked else given)
    cap = 0
    if max_float != 0:  # (0: no ranking at all) at least one layer stays quantized, or it is not an INT8 file
        most = max(0, len(order()) - 1)
        cap = most if max_float is None else min(max_float, most)
    while not meets(k):
        last_fail = k
        if k >= cap:
            tried = tuple(sorted(cache.items()))
            best = min(cache, key=cache.get)
            raise CheckFailed(
                f"no configuration with at most {cap} layer(s) in float meets {metric} <= {max_drop:g} "
                f"(best {cache[best]:.3g} with {best} in float); allow more fallback or a larger --max-drop"
                + (f"; tried {tried}" if len(tried) <= 6 else ""),
                details={
                    "max_drop": max_drop, "metric": metric, "max_float": cap,
                    "best": {"num_float": best, "value": cache[best]},
                    "tried": [{"num_float": n, "value": v} for n, v in tried],
                    "ranking": [r.to_dict() for r in (ranked[0] if ranked else ())],
                },
            )
        k = min(cap, 1 if k == 0 else 2 * k)
    lo, hi = last_fail, k  # value(lo) fails (or lo == -1), value(hi) passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return FallbackResult(
        max_drop=max_drop, metric=metric, float_nodes=tuple(r.node for r in order()[:hi]), achieved=value(hi),
        tried=tuple(sorted(cache.items())), ranking=order(),
    )
