"""`mergeserve ab report`: an alias's report over several replicas, from their /metrics alone.

Each replica exports its own counts (`mergeserve:ab_*`, server/ab/tally.py); they are sufficient
statistics, so the report of the replicas together is the report of the summed counts. /metrics
needs no key. The alias's targets, in order (the first is the control), and the weights in force
come from `mergeserve:alias_weight`; the rollout's step and status from `mergeserve:rollout_*`.
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mergeserve.server.ab.alias_state import AliasState
from mergeserve.server.ab.report import report
from mergeserve.server.ab.tally import tallies_from_metrics
from mergeserve.spec import AliasSpec


def fetch(urls: list[str], timeout: float = 10.0) -> list[str]:
    """Each server's /metrics text."""
    texts = []
    for url in urls:
        response = httpx.get(f"{url.rstrip('/')}/metrics", timeout=timeout)
        response.raise_for_status()
        texts.append(response.text)
    return texts


def replicas_report(texts: list[str], alias: str) -> dict[str, Any]:
    """The report of `alias` over the replicas whose /metrics texts these are."""
    weights: dict[str, float] = {}
    rollout: dict[str, Any] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("alias") != alias:
                    continue
                if s.name == "mergeserve:alias_weight":
                    weights.setdefault(s.labels["model"], s.value)  # the first replica's, in the alias's order
                elif s.name == "mergeserve:rollout_step":
                    rollout.setdefault("steps", set()).add(int(s.value))
                elif s.name == "mergeserve:rollout_status":
                    rollout.setdefault("statuses", set()).add(s.labels["status"])
    if not weights:
        raise LookupError(f"no replica serves an alias named {alias!r}")
    tallies, generations = tallies_from_metrics(texts, alias)
    state = AliasState(weights=weights, generation=max(generations, default=1), since=0.0)
    body = report(alias, AliasSpec(targets={t: 1.0 for t in weights}), state, tallies)
    body |= {"replicas": len(texts), "generations": sorted(generations)}
    del body["since"]  # each replica has its own
    if rollout:
        body["rollout"] = {k: sorted(v) for k, v in rollout.items()}  # more than one of each: replicas disagree
    return body


def table(body: dict[str, Any]) -> str:
    """The report as a person reads it: a line per target, then a line per variant's comparison."""
    lines = [f"alias {body['alias']} (control: {body['control']}; generation {body['generation']})",
             f"{'target':20} {'weight':>6} {'requests':>8} {'err %':>6} {'ttft p50/p95 s':>15} "
             f"{'latency p50/p95 s':>18} {'tokens':>7} {'feedback':>22}  experts"]
    for name, t in body["targets"].items():
        f = t["feedback"]
        feedback = (f"{f['mean']:+.3f} [{f['interval'][0]:+.2f}, {f['interval'][1]:+.2f}] n={f['count']}"
                    if f["interval"] else f"n={f['count']}")
        experts = ", ".join(f"{e}={s:.2f}" for e, s in t["experts"].items())
        lines.append(f"{name:20} {body['weights'].get(name, 0):6.2f} {t['requests']:8d} "
                     f"{_pct(t['error_rate']):>6} {_pair(t['ttft_s']):>15} {_pair(t['latency_s']):>18} "
                     f"{t['output_tokens']:7d} {feedback:>22}  {experts}")
    for name, c in body["comparisons"].items():
        lines.append(f"{name} vs {body['control']}: {c['verdict']}  (feedback {_diff(c['feedback'])}; "
                     f"error rate {_diff(c['error_rate'])})")
    if rollout := body.get("rollout"):
        lines.append("rollout: " + "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in rollout.items()))
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _pair(q: dict[str, float | None]) -> str:
    return "-" if q["p50"] is None else f"{q['p50']:.3f}/{q['p95']:.3f}"


def _diff(d: dict[str, Any]) -> str:
    if d["estimate"] is None:
        return "no data"
    interval = f" [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]" if d["interval"] else ""
    return f"{d['estimate']:+.3f}{interval} {d['verdict']}"

