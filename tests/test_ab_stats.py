"""The A/B report's statistics: an A/A test stays `not yet` however often it is read, a real difference
is found, and the report of several replicas is the report of their summed /metrics series."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mergeserve.server.ab.alias_state import AliasState
from mergeserve.server.ab.report import comparison, report
from mergeserve.server.ab.stats import Moments, histogram_quantile
from mergeserve.server.ab.tally import Tallies, TallyCollector, TargetTally, tallies_from_metrics
from mergeserve.spec import AliasSpec

LOOK_EVERY = 25  # requests per arm between two readings of the report
LOOKS = 40


def tally(thumbs_up: np.ndarray, errors: np.ndarray, n: int) -> TargetTally:
    """The first n requests of an arm: each with an error flag and a thumbs up (+1) or down (-1)."""
    scores = np.where(thumbs_up[:n], 1.0, -1.0)
    t = TargetTally(requests=n, errors=int(errors[:n].sum()))
    t.feedback = Moments(n, float(scores.sum()), float((scores**2).sum()))
    return t


def first_verdict(rng: np.random.Generator, up: tuple[float, float], error: tuple[float, float]) -> tuple[str, int]:
    """Read the report every LOOK_EVERY requests per arm: the first verdict other than `not yet`,
    and the requests per arm it took ("not yet", LOOKS * LOOK_EVERY if none)."""
    n = LOOKS * LOOK_EVERY
    arms = [(rng.random(n) < u, rng.random(n) < e) for u, e in zip(up, error)]
    for look in range(1, LOOKS + 1):
        k = look * LOOK_EVERY
        verdict = comparison(tally(*arms[0], k), tally(*arms[1], k))["verdict"]
        if verdict != "not yet":
            return verdict, k
    return "not yet", n


def test_an_aa_test_read_forty_times_gives_a_verdict_in_at_most_5_percent_of_runs() -> None:
    """Two arms alike (60 % thumbs up, 5 % errors), the report read after every 25 requests up to
    1000 per arm: a fixed-sample test read that way would be wrong far more often than its 5 %."""
    runs = [first_verdict(np.random.default_rng(seed), (0.6, 0.6), (0.05, 0.05))[0] for seed in range(300)]
    false = sum(v != "not yet" for v in runs)
    assert false / len(runs) <= 0.05, f"{false} of {len(runs)} A/A runs gave a verdict"


def test_a_real_difference_is_found_within_a_bounded_number_of_requests() -> None:
    """Thumbs up 50 % vs 70 % (a difference of 0.4 in mean score)."""
    found = [first_verdict(np.random.default_rng(seed), (0.5, 0.7), (0.05, 0.05)) for seed in range(20)]
    assert all(v == "better" for v, _ in found)
    assert max(n for _, n in found) <= 600


def test_more_errors_are_worse() -> None:
    """2 % vs 15 % errors, same feedback: by 300 requests per arm the error rates tell them apart."""
    for seed in range(20):
        rng = np.random.default_rng(seed)
        arms = [(rng.random(300) < 0.6, rng.random(300) < e) for e in (0.02, 0.15)]
        errors = comparison(tally(*arms[0], 300), tally(*arms[1], 300))["error_rate"]
        assert errors["verdict"] == "worse" and errors["interval"][0] > 0


def test_quantiles_read_from_buckets_as_prometheus_does() -> None:
    bounds = (0.1, 0.5, 1.0)
    assert histogram_quantile(bounds, [0, 10, 0, 0], 0.5) == pytest.approx(0.3)  # halfway through (0.1, 0.5]
    assert histogram_quantile(bounds, [5, 0, 5, 0], 0.95) == pytest.approx(0.95)
    assert histogram_quantile(bounds, [0, 0, 0, 4], 0.5) == 1.0  # past the last bound: the last bound
    assert histogram_quantile(bounds, [0, 0, 0, 0], 0.5) is None


def replica(seed: int) -> Tallies:
    """One replica's counts for alias `ab` over `a` and `b`."""
    rng, tallies = np.random.default_rng(seed), Tallies()
    for _ in range(200):
        target = "a" if rng.random() < 0.5 else "b"
        tallies.record("ab", 3, target, error=bool(rng.random() < 0.1), ttft_s=float(rng.exponential(0.05)),
                       latency_s=float(rng.exponential(0.5)), output_tokens=int(rng.integers(1, 50)))
        tallies.feedback("ab", 3, target, float(rng.choice([-1.0, 1.0])))
        tallies.routing("ab", 3, target, {"math": 0.75, "code": 0.25})
    return tallies


def scrape(tallies: Tallies) -> str:
    registry = CollectorRegistry()
    registry.register(TallyCollector(tallies))
    return generate_latest(registry).decode()


def rounded(body: dict) -> dict:
    """`body` with every number to 9 digits (sums over text round-trips may differ in the last bit)."""
    return json.loads(json.dumps(body), parse_float=lambda v: round(float(v), 9))


def test_the_report_of_two_replicas_is_the_report_of_their_summed_series() -> None:
    one, two = replica(1), replica(2)
    summed, generations = tallies_from_metrics([scrape(one), scrape(two)], "ab")
    assert generations == {3}
    merged = {t: TargetTally() for t in "ab"}
    for tallies in (one, two):
        for t, counts in tallies.snapshot("ab", 3, "ab").items():
            merged[t].add(counts)
    spec, state = AliasSpec(targets={"a": 1, "b": 1}), AliasState(weights={"a": 1, "b": 1}, generation=3, since=0)
    assert rounded(report("ab", spec, state, summed)) == rounded(report("ab", spec, state, merged))
    assert summed["a"].requests + summed["b"].requests == 400


def test_counts_from_an_earlier_generation_are_dropped() -> None:
    tallies = Tallies()
    tallies.record("ab", 1, "a", error=False, ttft_s=0.1, latency_s=0.2, output_tokens=3)
    tallies.record("ab", 2, "a", error=True, ttft_s=None, latency_s=0.2, output_tokens=0)  # the weights changed
    tallies.feedback("ab", 1, "a", 1.0)  # late feedback for a response served before the change
    now = tallies.snapshot("ab", 2, ["a"])["a"]
    assert (now.requests, now.errors, now.feedback.n) == (1, 1, 0)
