"""An alias as it serves, beside its declared spec: the weights in force, their generation, its rollout.

The registry owns one per alias and saves it with the state (server/state.py), so a restart
serves the same weights and shows the same rollout history.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mergeserve.spec import AliasSpec

MAX_DECISIONS = 100  # kept per rollout, newest last: enough for any ramp, bounded for the state file

Action = Literal["start", "advance", "complete", "rollback"]


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    time: float
    action: Action
    step: int  # the step it leaves the rollout at (-1: rolled back)
    weight: float  # the variant's weight from then on
    reason: str


class RolloutState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["running", "completed", "rolled_back"] = "running"
    step: int = 0  # index into the policy's steps
    step_since: float = Field(default_factory=time.time)
    decisions: list[Decision] = []
    # The last evaluation's guards (name -> "pass" | "wait" | "fail: why"), for the report.
    guards: dict[str, str] = {}


class AliasState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float]
    # +1 at every change of weights; A/B tallies count within one generation.
    generation: int = Field(1, ge=1)
    since: float = Field(default_factory=time.time)  # when the weights last changed
    rollout: RolloutState | None = None

    @classmethod
    def declared(cls, spec: AliasSpec, after: AliasState | None = None) -> AliasState:
        """The state of a newly declared alias: its own weights, or its rollout's first step;
        numbered on from `after`, the state of the alias it replaces."""
        generation = after.generation + 1 if after is not None else 1
        if spec.rollout is None:
            return cls(weights=dict(spec.targets), generation=generation)
        share = spec.rollout.steps[0]
        rollout = RolloutState()
        rollout.decisions.append(Decision(time=rollout.step_since, action="start", step=0, weight=share,
                                          reason="the alias was set with a rollout"))
        return cls(weights=variant_weights(spec, share), generation=generation, rollout=rollout)


def variant_weights(spec: AliasSpec, share: float) -> dict[str, float]:
    """The control at 1 - share, the variant (the second target) at share."""
    control, variant = spec.targets
    return {control: 1.0 - share, variant: share}
