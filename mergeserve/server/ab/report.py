"""An A/B alias's report: each target since the weights last changed, and each variant against the control.

The control is the alias's first target. A variant's verdict is `worse` when its feedback is
worse or its error rate higher, `better` when its feedback is better and its error rate not
higher, else `not yet`; both comparisons are always-valid (server/ab/stats.py), so the report
may be read as often as one likes while traffic flows.
"""

from __future__ import annotations

from typing import Any

from mergeserve.server.ab.alias_state import AliasState
from mergeserve.server.ab.stats import Difference, Moments, Verdict, compare, mean_interval, rate_interval
from mergeserve.server.ab.tally import TargetTally
from mergeserve.spec import AliasSpec

# The mixing scales of the two comparisons: the effect each is quickest to find. Feedback lies in
# [-1, 1] (thumbs up / down: a difference of 0.2 is one user in ten changing their mind); error
# rates that matter differ by a few percent.
FEEDBACK_TAU = 0.2
ERROR_TAU = 0.05


def summary(t: TargetTally) -> dict[str, Any]:
    """One target's figures."""
    f = t.feedback
    return {
        "requests": t.requests,
        "errors": t.errors,
        "error_rate": t.errors / t.requests if t.requests else None,
        "error_rate_interval": _listed(rate_interval(t.errors, t.requests)),
        "ttft_s": {"p50": t.ttft.quantile(0.5), "p95": t.ttft.quantile(0.95)},
        "latency_s": {"p50": t.latency.quantile(0.5), "p95": t.latency.quantile(0.95)},
        "output_tokens": t.output_tokens,
        "feedback": {"count": f.n, "mean": f.mean, "interval": _listed(mean_interval(f))},
        "experts": {e: s / t.routed for e, s in sorted(t.expert_shares.items(), key=lambda kv: -kv[1])} if t.routed else {},
    }


def _listed(interval: tuple[float, float] | None) -> list[float] | None:
    """As JSON has it (a report read back from JSON compares equal)."""
    return list(interval) if interval is not None else None


def feedback_difference(control: TargetTally, variant: TargetTally) -> Difference:
    return compare(control.feedback, variant.feedback, FEEDBACK_TAU)


def error_difference(control: TargetTally, variant: TargetTally) -> Difference:
    return compare(Moments.bernoulli(control.errors, control.requests),
                   Moments.bernoulli(variant.errors, variant.requests), ERROR_TAU, higher_is_better=False)


def comparison(control: TargetTally, variant: TargetTally) -> dict[str, Any]:
    """A variant against the control: both differences, and the verdict."""
    feedback, errors = feedback_difference(control, variant), error_difference(control, variant)
    return {"feedback": feedback.as_dict(), "error_rate": errors.as_dict(), "verdict": verdict(feedback, errors)}


def verdict(feedback: Difference, errors: Difference) -> Verdict:
    if "worse" in (feedback.verdict, errors.verdict):
        return "worse"
    return "better" if feedback.verdict == "better" else "not yet"


def report(name: str, spec: AliasSpec, state: AliasState, tallies: dict[str, TargetTally]) -> dict[str, Any]:
    """The whole report of alias `name` (GET /admin/aliases/{name}/report, `mergeserve ab report`)."""
    control = spec.control
    targets = {t: tallies.get(t, TargetTally()) for t in spec.targets}
    body: dict[str, Any] = {
        "alias": name,
        "generation": state.generation,
        "since": state.since,
        "control": control,
        "weights": {t: w / sum(state.weights.values()) for t, w in state.weights.items()},  # shares of the traffic
        "targets": {t: summary(tally) for t, tally in targets.items()},
        "comparisons": {t: comparison(targets[control], tally) for t, tally in targets.items() if t != control},
    }
    if state.rollout is not None and spec.rollout is not None:
        body["rollout"] = {"policy": spec.rollout.model_dump(), **state.rollout.model_dump()}
    return body
