"""A/B aliases: one model name that sends each request to one of several compositions, by weight.

A request with a sticky key (its `X-Session-Id` header, else its `user` field) always lands
on the same target while the weights stay the same; without one the pick is random.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergeserve.spec import NAME_PATTERN

MAX_TARGETS = 16


class Alias(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: dict[str, float] = Field(min_length=1, max_length=MAX_TARGETS)
    # "user": sticky by X-Session-Id or the request's `user`; "none": every request picks anew.
    sticky: Literal["user", "none"] = "user"

    @field_validator("targets")
    @classmethod
    def _weights(cls, targets: dict[str, float]) -> dict[str, float]:
        for name, weight in targets.items():
            if not NAME_PATTERN.fullmatch(name):
                raise ValueError(f"{name!r} is not a composition name")
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"the weight of {name!r} must be a positive number, got {weight}")
        return targets

    def pick(self, alias: str, ready: dict[str, float], sticky_key: str | None) -> str:
        """One of `ready` (the targets serving now, with their weights)."""
        if self.sticky == "user" and sticky_key:
            digest = hashlib.sha256(f"{alias}\0{sticky_key}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1), the same for the same key
        else:
            u = random.random()
        names = sorted(ready)
        total = sum(ready.values())
        cumulative = 0.0
        for name in names:
            cumulative += ready[name] / total
            if u < cumulative:
                return name
        return names[-1]  # rounding at the top end
