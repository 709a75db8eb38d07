"""The statistics of an A/B report: intervals for one target, and an always-valid comparison of two.

A report is read again and again while traffic flows. A fixed-sample test read that way finds
a difference that is not there far more often than its alpha says: every look is one more
chance. The comparison therefore uses a confidence sequence: the normal-mixture boundary
(Robbins 1970; Howard et al. 2021, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", eq. 14), which is the mixture SPRT of Johari et al. (2017) read as an interval. It
covers the true difference at every sample size at once with probability 1 - alpha, so a
`better` or `worse` stays valid however often the report is read.

scipy gives the distributions and the one-target intervals. No maintained package ships the
boundary itself (confseq is an unmaintained C++ sdist, savvi pulls in cvxpy); it is one closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

Verdict = Literal["better", "worse", "not yet"]
CONFIDENCE = 0.95
# Each comparison (feedback, error rate) spends half of alpha, so that a variant's overall
# verdict, `worse` if either is, stays wrong at most 5 % of the time when the variants are alike.
ALPHA_EACH = (1 - CONFIDENCE) / 2
MIN_SAMPLES = 10  # per side: below this a variance estimate is noise, and no verdict is given
# A sample variance below this is taken as this: a handful of equal scores (all +1) would
# otherwise claim an exact mean. Scores lie in [-1, 1]; a spread under 0.1 is not seen in real feedback.
VARIANCE_FLOOR = 0.01


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a sample: its size, sum and sum of squares."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float:
        """The sample variance (n - 1), floored at VARIANCE_FLOOR."""
        if self.n < 2:
            return math.inf
        spread = (self.squares - self.total**2 / self.n) / (self.n - 1)
        return max(spread, VARIANCE_FLOOR)

    @classmethod
    def bernoulli(cls, successes: int, n: int) -> Moments:
        return cls(n, float(successes), float(successes))

    def __add__(self, other: Moments) -> Moments:
        """The moments of both samples together."""
        return Moments(self.n + other.n, self.total + other.total, self.squares + other.squares)


@dataclass(frozen=True)
class Difference:
    """variant - control, with an always-valid interval and what it says."""

    estimate: float | None
    low: float | None
    high: float | None
    verdict: Verdict

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "interval": [self.low, self.high] if self.low is not None else None,
                "verdict": self.verdict}


def mean_interval(m: Moments) -> tuple[float, float] | None:
    """The 95 % t-interval of the mean (a single look, for display); None under two samples."""
    if m.n < 2:
        return None
    low, high = stats.t.interval(CONFIDENCE, m.n - 1, loc=m.mean, scale=math.sqrt(m.variance / m.n))
    return float(low), float(high)


def rate_interval(k: int, n: int) -> tuple[float, float] | None:
    """The 95 % Wilson interval of a rate k / n; None for n = 0."""
    if n == 0:
        return None
    ci = stats.binomtest(k, n).proportion_ci(CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def compare(control: Moments, variant: Moments, tau: float, higher_is_better: bool = True) -> Difference:
    """The difference of the means, variant - control, with the normal-mixture confidence sequence
    at level 1 - ALPHA_EACH. `tau`: the mixing prior's scale, the size of effect the test is
    quickest to find (it stays valid for any effect; only its speed depends on tau)."""
    if control.n == 0 or variant.n == 0:
        return Difference(None, None, None, "not yet")
    estimate = variant.mean - control.mean
    if min(control.n, variant.n) < MIN_SAMPLES:
        return Difference(estimate, None, None, "not yet")
    v = control.variance / control.n + variant.variance / variant.n  # of the estimate
    t2 = tau**2
    radius = math.sqrt(v * (v + t2) / t2 * (math.log((v + t2) / v) + 2 * math.log(1 / ALPHA_EACH)))
    low, high = estimate - radius, estimate + radius
    verdict: Verdict = "not yet"
    if low > 0 or high < 0:
        verdict = "better" if (low > 0) == higher_is_better else "worse"
    return Difference(estimate, low, high, verdict)


def histogram_quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The q-quantile of observations counted in buckets (`counts[i]` in (bounds[i-1], bounds[i]],
    the last one past bounds[-1]), interpolated within its bucket as Prometheus's histogram_quantile
    does; one in the overflow bucket reads as bounds[-1]. None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    cumulative = np.cumsum([0, *counts[: len(bounds)]])
    edges = np.array([0.0, *bounds])
    return float(np.interp(q * total, cumulative, edges))
