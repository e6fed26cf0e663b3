"""Per-tensor range refinement: rescale the most error-prone activation grids by their effect on the logits.

A calibration method picks every tensor's range from that tensor's own histogram; what matters is the
error that reaches the model's output. After the method is chosen, this stage ranks a target's quantized
activations by their own quantization SQNR (one run of the Q/DQ model that also outputs each tensor
before and after its Q/DQ pair), then, for the ``max_tensors`` worst ones, tries a few multiples of the
current scale and keeps a change only when it raises the logit SQNR against FP32 on held-out images
(coordinate descent, worst tensor first). The work is bounded: ``max_tensors * len(factors)`` short runs
on at most ``max_images`` images, whatever the model's depth. Only the plan's per-target parameters
change (the emitted graph and its speed do not), so the result is a plain :class:`QuantPlan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from rescompress.calibration.collect import make_session, with_extra_outputs
from rescompress.quantization.fidelity import sqnr_db
from rescompress.quantization.placement import Placement
from rescompress.quantization.plan import QParams, QuantPlan

DEFAULT_REFINE_TENSORS = 12
DEFAULT_FACTORS: tuple[float, ...] = (0.6, 0.75, 0.875, 1.15, 1.35)
MIN_GAIN_DB = 0.1  # a change must beat the current logit SQNR by this much (guards against noise)
DEFAULT_REFINE_IMAGES = 256
# Multiply-accumulates the refinement may spend (all targets): what 128 images x 12 tensors x 5 factors
# x 2 targets cost on a torchvision resnet18 at 64x64 (about a minute on 2 cores). Bigger models get
# fewer images (at least MIN_REFINE_IMAGES), then fewer tensors, so the default stays bounded.
REFINE_MAC_BUDGET = 2.5e12
MIN_REFINE_IMAGES = 32

Emit = Callable[[onnx.ModelProto, QuantPlan, Placement], onnx.ModelProto]


@dataclass(frozen=True)
class RefineResult:
    plan: QuantPlan
    target: str
    before_db: float
    after_db: float
    changed: dict[str, float]  # tensor -> factor applied to its scale
    evaluations: int

    def to_dict(self) -> dict:
        return {
            "target": self.target, "sqnr_before_db": self.before_db, "sqnr_after_db": self.after_db,
            "changed": self.changed, "evaluations": self.evaluations,
        }


def _run(model: onnx.ModelProto, x: np.ndarray, threads: int | None, names: Sequence[str] | None = None):
    s = make_session(model if names is None else with_extra_outputs(model, names), threads)
    return s.run(None if names is None else [model.graph.output[0].name, *names], {s.get_inputs()[0].name: x})


def onnx_macs(model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> int:
    """Multiply-accumulates per image of the Conv and Gemm/MatMul nodes with constant weights."""
    inits = {i.name: i for i in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = int(np.prod(inits[n.input[1]].dims, dtype=np.int64))
        out = shapes.get(n.output[0]) or []
        spatial = int(np.prod([d or 1 for d in out[2:]], dtype=np.int64)) if n.op_type == "Conv" else 1
        total += w * spatial
    return total


@dataclass(frozen=True)
class RefineBudget:
    images: int
    tensors: int
    note: str = ""


def refine_budget(macs_per_image: int, held_out: int, tensors: int, targets: int,
                  factors: int = len(DEFAULT_FACTORS), budget: float = REFINE_MAC_BUDGET) -> RefineBudget:
    """Images and tensors for the refinement so that its model runs stay within ``budget`` MACs."""
    images = min(held_out, DEFAULT_REFINE_IMAGES)
    if tensors <= 0 or images <= 0:
        return RefineBudget(images, 0, "off")
    runs = targets * (tensors * factors + 2)  # + the starting score and the ranking run, per target
    cost = max(macs_per_image, 1)
    fit = int(budget // (runs * cost))
    if fit >= images:
        return RefineBudget(images, tensors)
    if fit >= MIN_REFINE_IMAGES:
        return RefineBudget(fit, tensors, f"{fit} of {images} held-out images (compute budget)")
    images = min(images, MIN_REFINE_IMAGES)
    fit_tensors = int((budget // (images * cost) // targets - 2) // factors)
    if fit_tensors < 1:
        return RefineBudget(images, 0, "skipped: the model is too large for the refinement's compute budget")
    return RefineBudget(images, min(tensors, fit_tensors),
                        f"{images} images, {min(tensors, fit_tensors)} of {tensors} tensors (compute budget)")


def rank_tensors(
    qmodel: onnx.ModelProto, placement: Placement, x: np.ndarray, threads: int | None = None
) -> list[str]:
    """Calibrated tensors of ``placement``, lowest own-quantization SQNR first (one run)."""
    pairs = []
    for q in placement.activations:
        pairs.append((q.calib, q.name, f"{q.name}_dequantized"))
    names = sorted({t for _, a, b in pairs for t in (a, b)})
    outs = dict(zip(names, _run(qmodel, x, threads, names)[1:], strict=True))
    score: dict[str, float] = {}
    for calib, a, b in pairs:
        s = sqnr_db(outs[a], outs[b])
        score[calib] = min(score.get(calib, np.inf), s)
    return sorted(score, key=lambda n: score[n])


def _scaled(plan: QuantPlan, name: str, target: str, factor: float) -> QuantPlan:
    e = plan.activations[name]
    p = e.params[target]
    params = {**e.params, target: QParams(p.scale * factor, p.zero_point, p.dtype)}
    return replace(plan, activations={**plan.activations, name: replace(e, params=params)})


def refine_plan(
    model: onnx.ModelProto,
    plan: QuantPlan,
    placement: Placement,
    x: np.ndarray,
    emit: Emit,
    *,
    max_tensors: int = DEFAULT_REFINE_TENSORS,
    factors: Sequence[float] = DEFAULT_FACTORS,
    threads: int | None = None,
    min_gain_db: float = MIN_GAIN_DB,
) -> RefineResult:
    """Coordinate search over the scales of the ``max_tensors`` worst tensors of ``placement``'s target.

    ``x`` are held-out images (not the ones the histograms came from); ``emit`` builds the Q/DQ model.
    """
    target = placement.target
    ref = _run(model, x, threads)[0]

    def score(p: QuantPlan) -> float:
        return sqnr_db(ref, _run(emit(model, p, placement), x, threads)[0])

    best = score(plan)
    before = best
    evals = 1
    changed: dict[str, float] = {}
    order = rank_tensors(emit(model, plan, placement), placement, x, threads)[: max(0, max_tensors)]
    for name in order:
        base_plan, pick = plan, 1.0
        for f in factors:
            cand = _scaled(base_plan, name, target, f)
            s = score(cand)
            evals += 1
            if s > best + min_gain_db:
                best, plan, pick = s, cand, f
        if pick != 1.0:
            changed[name] = pick
    return RefineResult(plan, target, before, best, changed, evals)
