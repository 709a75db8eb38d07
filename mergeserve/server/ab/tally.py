"""What an A/B alias's targets did since its weights last changed: the report's sufficient statistics.

Each alias counts per target: requests, errors, output tokens, time to first token and latency
in histogram buckets, feedback (count, sum, sum of squares) and the experts' routing shares. A
change of the alias's weights starts a new generation (the registry numbers them): counts from
an earlier one (a request in flight across the change, feedback that comes late) are dropped.

/metrics exports exactly these counts (`mergeserve:ab_*`), so the report of several replicas is the
report of their summed series (`tallies_from_metrics`), and what a rollout decides depends only on them.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    SummaryMetricFamily)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from mergeserve.server.ab.stats import Moments, histogram_quantile

# Buckets of the first token and of the whole request, seconds (as vLLM's histograms).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class Buckets:
    """Observations counted per bucket: counts[i] in (bounds[i-1], bounds[i]], the last past bounds[-1]."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        self.total += value

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(self.bounds, self.counts, q)

    def add(self, other: Buckets) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total

    @property
    def n(self) -> int:
        return sum(self.counts)


@dataclass
class TargetTally:
    """One target's counts within one generation of its alias."""

    requests: int = 0
    errors: int = 0
    output_tokens: int = 0
    ttft: Buckets = field(default_factory=lambda: Buckets(TTFT_BUCKETS))
    latency: Buckets = field(default_factory=lambda: Buckets(E2E_BUCKETS))  # of requests that succeeded
    feedback: Moments = Moments()
    routed: int = 0  # responses that carried routing (an MoE or a request router)
    expert_shares: dict[str, float] = field(default_factory=dict)  # summed over those responses

    def add(self, other: TargetTally) -> None:
        """Count `other` in too (another replica's)."""
        self.requests += other.requests
        self.errors += other.errors
        self.output_tokens += other.output_tokens
        self.ttft.add(other.ttft)
        self.latency.add(other.latency)
        self.feedback += other.feedback
        self.routed += other.routed
        for expert, share in other.expert_shares.items():
            self.expert_shares[expert] = self.expert_shares.get(expert, 0.0) + share


@dataclass
class AliasTally:
    generation: int
    targets: dict[str, TargetTally] = field(default_factory=dict)

    def target(self, name: str) -> TargetTally:
        return self.targets.setdefault(name, TargetTally())


class Tallies:
    """Every alias's counts of its current generation. Request handlers, the feedback route, the
    rollout thread and scrapes all come here, hence the lock."""

    def __init__(self) -> None:
        self._by_alias: dict[str, AliasTally] = {}
        self._lock = threading.Lock()

    def record(self, alias: str, generation: int, target: str, *, error: bool, ttft_s: float | None,
               latency_s: float | None, output_tokens: int) -> None:
        """One request the alias sent to `target` has ended."""
        with self._lock:
            if (tally := self._current(alias, generation)) is None:
                return
            t = tally.target(target)
            t.requests += 1
            t.errors += error
            t.output_tokens += output_tokens
            if ttft_s is not None:
                t.ttft.observe(ttft_s)
            if latency_s is not None and not error:
                t.latency.observe(latency_s)

    def feedback(self, alias: str, generation: int, target: str, score: float) -> None:
        with self._lock:
            if (tally := self._current(alias, generation)) is None:
                return
            tally.target(target).feedback += Moments(1, score, score * score)

    def routing(self, alias: str, generation: int, target: str, experts: dict[str, float]) -> None:
        """A response the alias sent to `target` finished, routed to `experts` (shares summing to 1)."""
        with self._lock:
            if (tally := self._current(alias, generation)) is None:
                return
            t = tally.target(target)
            t.routed += 1
            for expert, share in experts.items():
                t.expert_shares[expert] = t.expert_shares.get(expert, 0.0) + share

    def snapshot(self, alias: str, generation: int, targets: Iterable[str]) -> dict[str, TargetTally]:
        """A copy of each of `targets`' counts in `generation` (empty ones for a newer generation)."""
        with self._lock:
            tally = self._by_alias.get(alias)
            found = tally.targets if tally is not None and tally.generation == generation else {}
            return {t: _copy(found.get(t, TargetTally())) for t in targets}

    def sync(self, generations: dict[str, int]) -> None:
        """Keep only the aliases in `generations` (alias -> its current generation), each from that
        generation on: what a scrape exports is then always the current generation's counts."""
        with self._lock:
            for alias in list(self._by_alias):
                if alias not in generations:
                    del self._by_alias[alias]
            for alias, generation in generations.items():
                self._current(alias, generation)

    def items(self) -> list[tuple[str, AliasTally]]:
        with self._lock:
            return [(a, AliasTally(t.generation, {n: _copy(x) for n, x in t.targets.items()}))
                    for a, t in self._by_alias.items()]

    def _current(self, alias: str, generation: int) -> AliasTally | None:
        """The alias's tally for `generation`: a newer generation starts afresh; an older one is None."""
        tally = self._by_alias.get(alias)
        if tally is None or tally.generation < generation:
            tally = self._by_alias[alias] = AliasTally(generation)
        return tally if tally.generation == generation else None


def _copy(t: TargetTally) -> TargetTally:
    fresh = TargetTally()
    fresh.add(t)
    return fresh


class TallyCollector(Collector):
    """The tallies as Prometheus series, labelled alias, model (the target) and generation."""

    def __init__(self, tallies: Tallies) -> None:
        self.tallies = tallies

    def collect(self) -> Iterator:
        labels = ["alias", "model", "generation"]
        requests = CounterMetricFamily("mergeserve:ab_requests", "Requests an A/B alias sent to each target that "
                                       "ended, since the alias's weights last changed (its generation).", labels=labels)
        errors = CounterMetricFamily("mergeserve:ab_errors", "Of those, the ones the server failed (5xx, or a stream "
                                     "cut by an error); a client's own errors (4xx) do not count.", labels=labels)
        tokens = CounterMetricFamily("mergeserve:ab_output_tokens", "Their output tokens.", labels=labels)
        ttft = HistogramMetricFamily("mergeserve:ab_time_to_first_token_seconds", "Their time to first token.",
                                     labels=labels)
        latency = HistogramMetricFamily("mergeserve:ab_e2e_request_latency_seconds",
                                        "End-to-end latency of the ones that succeeded.", labels=labels)
        feedback = SummaryMetricFamily("mergeserve:ab_feedback_score", "Feedback scores of their responses.",
                                       labels=labels)
        squares = GaugeMetricFamily("mergeserve:ab_feedback_score_squares",
                                    "Sum of the squared feedback scores (with _sum and _count: the variance).", labels=labels)
        routed = CounterMetricFamily("mergeserve:ab_routed_responses", "Responses that carried expert routing.",
                                     labels=labels)
        shares = CounterMetricFamily("mergeserve:ab_expert_share", "Each expert's routing share, summed over those "
                                     "responses (over ab_routed_responses_total: its mean share).", labels=[*labels, "expert"])
        for alias, tally in self.tallies.items():
            for target, t in tally.targets.items():
                key = [alias, target, str(tally.generation)]
                requests.add_metric(key, t.requests)
                errors.add_metric(key, t.errors)
                tokens.add_metric(key, t.output_tokens)
                ttft.add_metric(key, _cumulative(t.ttft), t.ttft.total)
                latency.add_metric(key, _cumulative(t.latency), t.latency.total)
                feedback.add_metric(key, t.feedback.n, t.feedback.total)
                squares.add_metric(key, t.feedback.squares)
                routed.add_metric(key, t.routed)
                for expert, share in t.expert_shares.items():
                    shares.add_metric([*key, expert], share)
        yield from (requests, errors, tokens, ttft, latency, feedback, squares, routed, shares)


def _cumulative(b: Buckets) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, count in zip([*map(str, b.bounds), "+Inf"], b.counts):
        running += count
        out.append((bound, running))
    return out


def tallies_from_metrics(texts: Iterable[str], alias: str) -> tuple[dict[str, TargetTally], set[int]]:
    """Each target's counts summed over the /metrics texts of several replicas, and the generations
    they were in (one, when the replicas took the same steps)."""
    found: dict[str, TargetTally] = {}
    generations: set[int] = set()
    for text in texts:
        per_replica: dict[str, TargetTally] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not s.name.startswith("mergeserve:ab_") or s.labels.get("alias") != alias:
                    continue
                generations.add(int(s.labels["generation"]))
                _read_sample(per_replica.setdefault(s.labels["model"], TargetTally()), s.name, s.labels, s.value)
        for target, t in per_replica.items():
            found.setdefault(target, TargetTally()).add(t)
    return found, generations


def _read_sample(t: TargetTally, name: str, labels: dict[str, str], value: float) -> None:
    f = t.feedback
    match name.removeprefix("mergeserve:ab_"):
        case "requests_total":
            t.requests = int(value)
        case "errors_total":
            t.errors = int(value)
        case "output_tokens_total":
            t.output_tokens = int(value)
        case "time_to_first_token_seconds_bucket":
            _read_bucket(t.ttft, labels["le"], value)
        case "time_to_first_token_seconds_sum":
            t.ttft.total = value
        case "e2e_request_latency_seconds_bucket":
            _read_bucket(t.latency, labels["le"], value)
        case "e2e_request_latency_seconds_sum":
            t.latency.total = value
        case "feedback_score_count":
            t.feedback = Moments(int(value), f.total, f.squares)
        case "feedback_score_sum":
            t.feedback = Moments(f.n, value, f.squares)
        case "feedback_score_squares":
            t.feedback = Moments(f.n, f.total, value)
        case "routed_responses_total":
            t.routed = int(value)
        case "expert_share_total":
            t.expert_shares[labels["expert"]] = value


def _read_bucket(b: Buckets, le: str, cumulative: float) -> None:
    """Buckets come in increasing order: each count is the cumulative one less those before it."""
    index = len(b.bounds) if le == "+Inf" else b.bounds.index(float(le))
    b.counts[index] = int(cumulative) - sum(b.counts[:index])
