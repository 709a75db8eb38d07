"""docs/grafana/mergeserve-ab.json is well formed, and its PromQL (and that of docs/ab-testing.md and
docs/experiments.md) names only series a running server exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from live import live_server, wait_until
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import Registry, create_app
from mergeserve.server.auth import Auth
from mergeserve.server.builder import Builder
from mergeserve.spec import EngineConfig

DOCS = Path(__file__).parent.parent / "docs"
DASHBOARD = DOCS / "grafana" / "mergeserve-ab.json"
GUIDE = DOCS / "ab-testing.md"
EXPERIMENTS = DOCS / "experiments.md"
ADMIN = {"Authorization": "Bearer admin-key"}
MAX_TOKENS_LIMIT = 8

AB_SERIES = {
    "mergeserve:ab_requests_total",
    "mergeserve:ab_errors_total",
    "mergeserve:ab_output_tokens_total",
    *(f"mergeserve:ab_{h}_{part}" for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds")
      for part in ("bucket", "sum", "count")),
    "mergeserve:ab_feedback_score_sum",
    "mergeserve:ab_feedback_score_count",
    "mergeserve:ab_feedback_score_squares",
    "mergeserve:ab_routed_responses_total",
    "mergeserve:ab_expert_share_total",
}
# Every sample name the server's /metrics documents (counters with `_total`, histograms and the
# feedback summary with their `_bucket` / `_sum` / `_count`).
SERIES = {
    "mergeserve:http_requests_total",
    *(f"mergeserve:{h}_{part}" for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds")
      for part in ("bucket", "sum", "count")),
    "mergeserve:prompt_tokens_total",
    "mergeserve:generation_tokens_total",
    "mergeserve:request_success_total",
    "mergeserve:request_errors_total",
    "mergeserve:feedback_score_sum",
    "mergeserve:feedback_score_count",
    "mergeserve:feedback_score_by_expert_sum",
    "mergeserve:feedback_score_by_expert_count",
    "mergeserve:alias_requests_total",
    "mergeserve:num_requests_running",
    "mergeserve:num_requests_waiting",
    "mergeserve:expert_tokens_total",
    "mergeserve:expert_routing_weight_total",
    "mergeserve:expert_requests_total",
    "mergeserve:composition_info",
    "mergeserve:composition_memory_bytes",
    # An A/B alias's counts since its weights last changed (labels alias, model, generation).
    *AB_SERIES,
    "mergeserve:alias_weight",
    "mergeserve:alias_generation",
    "mergeserve:rollout_step",
    "mergeserve:rollout_status",
    "mergeserve:rollout_decisions_total",
}
# PromQL words the dashboard uses that are not series; a new function in a panel goes here.
PROMQL_WORDS = {
    "sum", "max", "avg", "count", "count_values", "rate", "increase", "histogram_quantile", "sqrt", "clamp_min",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(dashboard: dict) -> Iterator[str]:
    """Every PromQL expression: panel targets, and the metric of each label_values() variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"])
            assert found, variable
            yield found[1]


def series_in(expr: str) -> set[str]:
    """The series names in `expr`: what is left once strings, label matchers, ranges, label lists
    and PromQL's own words are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)) - PROMQL_WORDS


def guide_queries(guide: Path | None = None) -> list[str]:
    """The ```promql blocks of the A/B guide and the experiment walk-through (or of `guide` alone)."""
    return [q for g in ([guide] if guide else [GUIDE, EXPERIMENTS])
            for q in re.findall(r"```promql\n(.*?)```", g.read_text(), flags=re.DOTALL)]


def experiment_row(dashboard: dict) -> list[dict]:
    """The panels of the top row, which follows an alias's experiment."""
    rows = [i for i, p in enumerate(dashboard["panels"]) if p["type"] == "row"]
    assert rows[0] == 0 and dashboard["panels"][0]["title"].startswith("Experiment: $alias"), "the experiment row comes first"
    return dashboard["panels"][1:rows[1]]


def used(dashboard: dict) -> set[str]:
    return {name for expr in [*queries(dashboard), *guide_queries()] for name in series_in(expr)}


def test_series_in_reads_names_not_labels_or_functions() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a:b_bucket{model=~"$model", route=~"x{1}"}[5m])))'
        " / ignoring (expert) group_left sum(c_total)"
    )
    assert series_in(expr) == {"a:b_bucket", "c_total"}


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load()
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["alias"]["query"] == "label_values(mergeserve:alias_requests_total, alias)"
    assert variables["model"]["multi"] and variables["model"]["includeAll"]
    assert variables["control"]["query"] == 'label_values(mergeserve:alias_weight{alias="$alias"}, model)'
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    placed: list[tuple[str, set[tuple[int, int]]]] = []  # the grid cells each panel covers
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        overlapping = [title for title, taken in placed if taken & cells]
        assert not overlapping, f"{panel['title']!r} overlaps {overlapping}"
        placed.append((panel["title"], cells))
    for panel in panels(dashboard):
        x, w = panel["gridPos"]["x"], panel["gridPos"]["w"]
        assert 0 <= x and x + w <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_the_dashboard_uses_only_documented_series() -> None:
    names = used(load())
    assert names <= SERIES, f"not series the server documents: {sorted(names - SERIES)}"
    assert {"mergeserve:alias_requests_total", "mergeserve:feedback_score_count"} <= names
    assert len(guide_queries(GUIDE)) >= 4 and len(guide_queries(EXPERIMENTS)) >= 2


def test_the_experiment_row_compares_the_targets_as_the_report_does() -> None:
    """The top row reads every series of the report and of a rollout, and reads the `mergeserve:ab_*`
    series only of each replica's current generation: a replica whose alias's weights changed keeps
    exporting the counts of the generation before until its first request in the new one ends."""
    row = experiment_row(load())
    exprs = [t["expr"] for panel in row for t in panel["targets"]]
    names = {name for expr in exprs for name in series_in(expr)}
    wanted = {"mergeserve:ab_requests_total", "mergeserve:ab_errors_total", "mergeserve:ab_output_tokens_total",
              "mergeserve:ab_time_to_first_token_seconds_bucket", "mergeserve:ab_e2e_request_latency_seconds_bucket",
              "mergeserve:ab_feedback_score_sum", "mergeserve:ab_feedback_score_count",
              "mergeserve:ab_feedback_score_squares", "mergeserve:ab_routed_responses_total",
              "mergeserve:ab_expert_share_total", "mergeserve:alias_weight", "mergeserve:alias_generation",
              "mergeserve:rollout_step", "mergeserve:rollout_status", "mergeserve:rollout_decisions_total"}
    assert wanted <= names, f"not in the experiment row: {sorted(wanted - names)}"
    current = (r' and ignoring \((model|model, le|model, expert)\) count_values without \(\) '
               r'\("generation", mergeserve:alias_generation\{alias="\$alias"\}\)')
    for expr in exprs:
        for found in re.finditer(r"mergeserve:ab_\w+\{([^}]*)\}", expr):
            assert 'alias="$alias"' in found[1], expr
            assert re.match(current, expr[found.end():]), f"not restricted to the current generation: {found[0]}"
    titles = " ".join(p["title"] for p in row)
    assert "variant − control" in titles and "Weights in force" in titles


@pytest.fixture(scope="module")
def scraped(zoo: dict[str, Path]) -> Iterator[set[str]]:
    """Sample names on /metrics after the A/B walk-through of docs/ab-testing.md: two compositions
    (a token router and a sequence router), an alias over them, requests through it, feedback,
    and one request refused after a composition was chosen; then a second alias with a rollout
    (docs/experiments.md), which has started."""
    registry, executor = Registry(), Executor()
    config = EngineConfig(max_num_seqs=4, max_model_len=128, max_tokens_limit=MAX_TOKENS_LIMIT)
    builder = Builder(registry, ExpertPool(roots=[zoo["base"].parent]), executor, config)
    app = create_app(registry, executor, Auth(admin_key="admin-key"), builder)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        routers = {"math-v1": "random", "math-v2": "perplexity"}  # a token router, a sequence router
        for name, kind in routers.items():
            spec = {
                "base": str(zoo["base"]), "router": {"kind": kind, "top_k": 1},
                "experts": [{"name": e, "source": str(zoo[e])} for e in ("code", "math")],
            }
            assert http.put(f"/admin/compositions/{name}", json=spec, headers=ADMIN).status_code == 202
        state = lambda name: http.get(f"/admin/compositions/{name}", headers=ADMIN).json()["state"]  # noqa: E731
        wait_until(lambda: "building" not in {state("math-v1"), state("math-v2")}, what="the builds")
        assert state("math-v1") == state("math-v2") == "ready"
        alias = {"targets": {"math-v1": 0.5, "math-v2": 0.5}, "sticky": "user"}
        assert http.put("/admin/aliases/math", json=alias, headers=ADMIN).status_code == 200

        served: dict[str, str] = {}  # composition -> the id of a response it gave
        for user in range(40):
            chat = {"model": "math", "messages": [{"role": "user", "content": "1 + 1 ="}], "max_tokens": 2,
                    "user": f"user-{user}"}
            response = http.post("/v1/chat/completions", json=chat)
            assert response.status_code == 200, response.text
            composition = response.headers["x-mergeserve-composition"]
            assert response.json()["system_fingerprint"].endswith(f":{composition}@1")
            served.setdefault(composition, response.json()["id"])
            if len(served) == 2:
                break
        assert set(served) == {"math-v1", "math-v2"}
        for answer in served.values():
            assert http.post("/v1/feedback", json={"id": answer, "score": 1}).status_code == 200
        too_long = {"model": "math-v1", "prompt": "1 + 1 =", "max_tokens": MAX_TOKENS_LIMIT + 1}
        assert http.post("/v1/completions", json=too_long).status_code == 400
        canary = {"targets": {"math-v1": 1, "math-v2": 1}, "rollout": {"steps": [0.5, 1.0], "min_requests": 1000}}
        assert http.put("/admin/aliases/math-canary", json=canary, headers=ADMIN).status_code == 200
        wait_until(lambda: "mergeserve:rollout_decisions_total{" in http.get("/metrics").text, what="the rollout's start")

        text = http.get("/metrics").text
    yield {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_series_the_dashboard_uses_is_exposed(scraped: set[str]) -> None:
    missing = used(load()) - scraped
    assert not missing, f"the dashboard or guide queries series a running server does not expose: {sorted(missing)}"


def test_the_server_exposes_every_documented_series(scraped: set[str]) -> None:
    assert SERIES <= scraped, f"documented but not exposed: {sorted(SERIES - scraped)}"
