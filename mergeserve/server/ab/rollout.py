"""Rollouts: an alias's variant ramped step by step while its guards hold, rolled back when one fails.

Every `interval_s` the controller reads the alias's tally (the counts /metrics exports) and
judges each guard `pass`, `wait` (too few requests to tell) or `fail: why`:
- error rate: judged once the variant has MIN_GUARD_REQUESTS requests; fails once its rate is
  above max_error_rate with confidence (the lower end of its 95 % Wilson interval: at a maximum
  of 5 %, 1 failure in 10 requests is not, 2 are), passes while the rate itself is at most the
  maximum. Errors are the server's (5xx, a stream cut by an error), not a client's 4xx;
- TTFT p95 over the control's: judged once each side has MIN_TTFT_SAMPLES first tokens;
- feedback: fails when the report's always-valid verdict is `worse`.

A failed guard rolls back at once: the variant's weight goes to 0. When every guard passes, the
variant has had min_requests at the step and min_seconds have passed, the next step begins. A
step of 1.0 is the promotion and completes the rollout as it begins (the control has no traffic
left to compare with); so does passing a last step below 1.0, which then keeps its weight. Every decision is logged, counted in
`mergeserve:rollout_decisions_total` and saved with the state.

Replicas: a decision reads only the tally and the time its step began. Replicas given the policy
together (a watched ConfigMap: within a poll or two of each other) that see the same traffic
take the same steps, each when its own counts allow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mergeserve.server.ab.alias_state import MAX_DECISIONS, AliasState, Decision, variant_weights
from mergeserve.server.ab.report import feedback_difference
from mergeserve.server.ab.stats import rate_interval
from mergeserve.server.ab.tally import Tallies, TargetTally
from mergeserve.server.errors import APIError
from mergeserve.server.registry import Registry
from mergeserve.spec import AliasSpec, RolloutPolicy

log = logging.getLogger(__name__)
MIN_GUARD_REQUESTS = 10  # the variant's, before its error rate is judged
MIN_TTFT_SAMPLES = 20
MAX_SLEEP_S = 0.25  # the controller looks for new rollouts this often, and evaluates them at once


def judge(policy: RolloutPolicy, control: TargetTally, variant: TargetTally) -> dict[str, str]:
    """Each guard's state: "pass", "wait" or "fail: why"."""
    g, guards = policy.guards, {}
    if g.max_error_rate is not None:
        rate = variant.errors / variant.requests if variant.requests else 0.0
        low = (rate_interval(variant.errors, variant.requests) or (0.0, 0.0))[0]
        if variant.requests < MIN_GUARD_REQUESTS:
            guards["error_rate"] = "wait"
        elif low > g.max_error_rate:
            guards["error_rate"] = (f"fail: {variant.errors} of {variant.requests} requests failed ({rate:.1%}; above "
                                    f"{g.max_error_rate:.1%} with 95 % confidence)")
        else:
            guards["error_rate"] = "pass" if rate <= g.max_error_rate else "wait"
    if g.max_ttft_p95_ratio is not None:
        if min(control.ttft.n, variant.ttft.n) < MIN_TTFT_SAMPLES:
            guards["ttft_p95"] = "wait"
        else:
            ratio = variant.ttft.quantile(0.95) / max(control.ttft.quantile(0.95), 1e-9)
            guards["ttft_p95"] = (f"fail: p95 time to first token is {ratio:.2f}x the control's (at most "
                                  f"{g.max_ttft_p95_ratio:g}x)" if ratio > g.max_ttft_p95_ratio else "pass")
    if g.feedback_not_worse:
        diff = feedback_difference(control, variant)
        guards["feedback"] = (f"fail: feedback is worse than the control's by {-diff.estimate:.3f} "
                              f"(interval {diff.low:.3f} to {diff.high:.3f})" if diff.verdict == "worse" else "pass")
    return guards


def decide(spec: AliasSpec, state: AliasState, tallies: dict[str, TargetTally], now: float) -> tuple[AliasState, Decision | None]:
    """The alias's next state (its guards judged) and the decision taken, if any."""
    policy, rollout = spec.rollout, state.rollout
    control, variant = spec.targets
    guards = judge(policy, tallies[control], tallies[variant])
    new = state.model_copy(deep=True)
    new.rollout.guards = guards
    failed = [f"{name} {verdict}" for name, verdict in guards.items() if verdict.startswith("fail")]
    if failed:
        decision = Decision(time=now, action="rollback", step=-1, weight=0.0, reason="; ".join(failed))
        new.rollout.status, new.weights = "rolled_back", variant_weights(spec, 0.0)
    elif (all(v == "pass" for v in guards.values()) and tallies[variant].requests >= policy.min_requests
          and now - rollout.step_since >= policy.min_seconds):
        # A step of 1.0 is the promotion: the control has no traffic left to compare with, so it completes at once.
        step = min(rollout.step + 1, len(policy.steps) - 1)
        share = policy.steps[step]
        done = step == rollout.step or share == 1.0
        reason = (f"every guard held for {now - rollout.step_since:.0f} s and {tallies[variant].requests} of the "
                  f"variant's requests at {policy.steps[rollout.step]:g}")
        decision = Decision(time=now, action="complete" if done else "advance", step=step, weight=share, reason=reason)
        new.rollout.status = "completed" if done else "running"
        new.rollout.step, new.rollout.step_since, new.weights = step, now, variant_weights(spec, share)
    else:
        return new, None
    if new.weights != state.weights:
        new.generation, new.since = state.generation + 1, now
    new.rollout.decisions = [*new.rollout.decisions, decision][-MAX_DECISIONS:]
    return new, decision


class Rollouts:
    """The thread that evaluates every running rollout at its interval and applies its decisions."""

    def __init__(self, registry: Registry, tallies: Tallies, on_decision: Callable[[str, Decision], None],
                 save: Callable[[], None]) -> None:
        """on_decision: told each decision (metrics); save: writes the state (the builder's)."""
        self.registry, self.tallies, self.on_decision, self.save = registry, tallies, on_decision, save
        self._due: dict[str, float] = {}  # alias -> monotonic time of its next evaluation
        self._started: dict[str, float] = {}  # alias -> the time its rollout started, once counted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mergeserve-rollouts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._sleep()):
            try:
                self.evaluate_due()
            except Exception:  # noqa: BLE001 - a bug in one evaluation must not end every rollout
                log.exception("evaluating the rollouts failed")

    def _sleep(self) -> float:
        return max(0.0, min([MAX_SLEEP_S, *(t - time.monotonic() for t in self._due.values())]))

    def evaluate_due(self) -> None:
        """Evaluate each running rollout whose interval has passed, and each new one."""
        now = time.monotonic()
        running = {}
        for name, state in self.registry.alias_states().items():
            if state.rollout is not None and state.rollout.status == "running":
                running[name] = state
        self._due = {n: self._due.get(n, now) for n in running}
        for name, state in running.items():
            first = state.rollout.decisions[0] if state.rollout.decisions else None
            if first is not None and first.action == "start" and self._started.get(name) != first.time:
                self._started[name] = first.time  # a rollout this process has not seen before
                log.info("rollout of %s: start at %g", name, first.weight)
                self.on_decision(name, first)
        for name in running:
            if self._due[name] <= now:
                self._due[name] = now + self._interval(name)
                self.evaluate(name)

    def _interval(self, name: str) -> float:
        try:
            spec, _ = self.registry.alias(name)
        except APIError:
            return MAX_SLEEP_S
        return spec.rollout.interval_s if spec.rollout else MAX_SLEEP_S

    def evaluate(self, name: str) -> Decision | None:
        """Judge `name`'s rollout now and apply what it decides."""
        try:
            spec, state = self.registry.alias(name)
        except APIError:  # deleted meanwhile
            return None
        if spec.rollout is None or state.rollout is None or state.rollout.status != "running":
            return None
        tallies = self.tallies.snapshot(name, state.generation, spec.targets)
        new, decision = decide(spec, state, tallies, time.time())
        if not self.registry.update_alias_state(name, state, new) or decision is None:
            return None  # redeclared or removed meanwhile: its next evaluation starts from that
        log.info("rollout of %s: %s to %s=%g (%s)", name, decision.action, list(spec.targets)[1], decision.weight,
                 decision.reason)
        self.on_decision(name, decision)
        try:
            self.save()
        except OSError as e:
            log.error("the state file could not be written after a rollout decision (%s)", e)
        return decision
