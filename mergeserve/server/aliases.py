"""A/B aliases: one model name that sends each request to one of several compositions, by weight.

A request with a sticky key (its `X-Session-Id` header, else its `user` field) always lands
on the same target while the weights stay the same; without one the pick is random.
The alias itself is data (spec.AliasSpec), declared in a serve config or PUT through the admin API.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mergeserve.spec import AliasSpec


def pick(alias: AliasSpec, name: str, ready: dict[str, float], sticky_key: str | None) -> str:
    """One of `ready` (the targets of the alias `name` serving now, with their weights)."""
    if alias.sticky == "user" and sticky_key:
        digest = hashlib.sha256(f"{name}\0{sticky_key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1), the same for the same key
    else:
        u = random.random()
    names = sorted(ready)
    total = sum(ready.values())
    cumulative = 0.0
    for target in names:
        cumulative += ready[target] / total
        if u < cumulative:
            return target
    return names[-1]  # rounding at the top end
