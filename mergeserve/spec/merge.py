"""How tensors are merged: one model per task-vector method, each with its own parameters and defaults.

Task vectors are tau_i = theta_i - theta_base; a method returns base + lambda * merge(w_i * tau_i).
A new method is a model here (added to `DenseMerge`), its function in merge/methods/ and a line in
merge/methods' `METHODS`; tests/test_merge_methods.py checks that the two lists agree.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mergeserve.spec.base import Strict, tagged_union


class MergeOverride(Strict):
    """Other merge parameters for the tensors whose name matches `match` (a regex, `re.search`)."""

    match: str
    lambda_: float | None = Field(None, alias="lambda")
    density: float | None = Field(None, gt=0, le=1)
    t: float | None = Field(None, ge=0, le=1)

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return v


class TaskVectorMerge(Strict):
    """What every method shares: the seed of its random choices, per-tensor overrides."""

    method: str
    seed: int = 0  # the seed of the method's random choices (DARE's drops), per tensor
    # Other parameters for the tensors an override's `match` finds (the first that matches).
    overrides: list[MergeOverride] = []

    @model_validator(mode="before")
    @classmethod
    def _foreign_fields(cls, data: Any) -> Any:
        # Name the methods that do take a field this one does not, rather than "extra input".
        if isinstance(data, dict):
            for key in data:
                name = "lambda_" if key == "lambda" else key
                if name not in cls.model_fields and (takers := [m for m, model in MODELS.items() if name in model.model_fields]):
                    method = data.get("method", cls.model_fields["method"].default)
                    raise ValueError(f"merge.{key}: merge.method={method} does not take them "
                                     f"(use {', '.join(takers)})")
        return data

    @model_validator(mode="after")
    def _overrides_fit(self) -> "TaskVectorMerge":
        for o in self.overrides:
            if unknown := sorted(f for f in o.model_fields_set - {"match"} if f not in type(self).model_fields):
                raise ValueError(f"merge.overrides: {unknown} are not parameters of merge.method={self.method}")
        return self


class Scaled(TaskVectorMerge):
    lambda_: float = Field(1.0, alias="lambda")  # the merged task vector's scale
    # safetensors file of learned coefficients [layers, experts] (`mergeserve tune-merge`, relative
    # to the spec's folder): expert i's task vector in layer n is weighted by coefficients[n, i].
    coefficients: str | None = None


class Trimmed(Scaled):
    density: float = Field(1.0, gt=0, le=1)  # the fraction of each task vector kept


class SignElected(Trimmed):
    # Divide by the summed weight of the experts agreeing with the elected sign (mergekit's form)
    # instead of summing (the TIES/MergeME form).
    normalize: bool = False
    consensus: Literal["sum", "count"] = "sum"  # the sign elected by summed mass (TIES) or by count


class LinearMerge(TaskVectorMerge):
    """The experts' weighted average (`weight` per expert, normalised)."""

    method: Literal["linear"] = "linear"


class TaskArithmeticMerge(Scaled):
    method: Literal["task_arithmetic"] = "task_arithmetic"


class TiesMerge(SignElected):
    """Trim each task vector to its largest `density` entries, elect a sign, sum the agreeing."""

    method: Literal["ties"] = "ties"


class DareLinearMerge(Trimmed):
    """Drop entries at random (keep `density`), rescale the kept by 1/density, sum."""

    method: Literal["dare_linear"] = "dare_linear"
    rescale: bool = True


class DareTiesMerge(SignElected):
    method: Literal["dare_ties"] = "dare_ties"
    rescale: bool = True


class SlerpMerge(TaskVectorMerge):
    """Spherical interpolation between exactly two experts."""

    method: Literal["slerp"] = "slerp"
    t: float = Field(0.5, ge=0, le=1)  # 0: the first expert, 1: the second


class ConsensusMerge(Scaled):
    """TALL masks: task i keeps the entries where |tau_i| >= tall_lambda * |tau_MTL - tau_i|; only
    entries kept by at least consensus_k masks survive."""

    method: Literal["consensus"] = "consensus"
    tall_lambda: float = Field(0.6, gt=0)
    consensus_k: int = Field(2, ge=1)


class FisherMerge(TaskVectorMerge):
    """Each entry weighted by the experts' diagonal Fisher (`mergeserve fisher`)."""

    method: Literal["fisher"] = "fisher"
    fisher: str  # the folder of the experts' cached Fishers, relative to the spec


# MergeME (Zhou et al. 2024) merges the shared layers with lambda 1/3 and keeps 80 % of each task vector.
class MergemeTaskArithmetic(TaskArithmeticMerge):
    lambda_: float = Field(1 / 3, alias="lambda")


class MergemeTies(TiesMerge):
    lambda_: float = Field(1 / 3, alias="lambda")
    density: float = Field(0.8, gt=0, le=1)


class MergemeDareLinear(DareLinearMerge):
    lambda_: float = Field(1 / 3, alias="lambda")
    density: float = Field(0.8, gt=0, le=1)


class MergemeDareTies(DareTiesMerge):
    lambda_: float = Field(1 / 3, alias="lambda")
    density: float = Field(0.8, gt=0, le=1)


class MergemeConsensus(ConsensusMerge):
    lambda_: float = Field(1 / 3, alias="lambda")


MODELS: dict[str, type[TaskVectorMerge]] = {
    m.model_fields["method"].default: m
    for m in (LinearMerge, TaskArithmeticMerge, TiesMerge, DareLinearMerge, DareTiesMerge, SlerpMerge, ConsensusMerge, FisherMerge)
}
MERGEME_MODELS: dict[str, type[TaskVectorMerge]] = MODELS | {
    m.model_fields["method"].default: m
    for m in (MergemeTaskArithmetic, MergemeTies, MergemeDareLinear, MergemeDareTies, MergemeConsensus)
}


# A dense composition's merge section: its `method` is the composition's own (given or not).
DenseMerge = tagged_union(MODELS, "method", "linear", "merge.method")
# mergeme's shared layers: TIES unless the section names another method; MergeME's defaults.
MergemeMerge = tagged_union(MERGEME_MODELS, "method", "ties", "merge.method")


def merge_params(method: str, **fields: Any) -> TaskVectorMerge:
    """The parameters of `method`, validated: `merge_params("ties", density=0.5)`."""
    return MODELS[method].model_validate({"method": method, **fields})
