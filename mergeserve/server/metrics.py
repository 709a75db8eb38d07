"""Prometheus metrics, named like vLLM's with a `mergeserve:` prefix; one CollectorRegistry per app.

A scrape costs O(series): nothing in it walks memory (the KV cache's residency is measured on a
thread of its own), label values an upstream chooses fall into closed sets, and the series of a
composition or alias leave once it is deleted (and drained).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mergeserve.engine.sequence import RequestOutput
from mergeserve.server.ab.alias_state import Action
from mergeserve.server.ab.tally import E2E_BUCKETS, TTFT_BUCKETS, Tallies, TallyCollector
from mergeserve.server import errors

if TYPE_CHECKING:
    from mergeserve.server.ab.alias_state import AliasState, Decision
    from mergeserve.server.registry import Revision, Served

log = logging.getLogger(__name__)
# OpenAI's finish reasons; an upstream's own ones count as "other".
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
# Codes of the errors this server (or OpenAI) gives a chosen composition's requests, and the
# statuses that stand in for a missing code; an upstream's other codes count as "other".
ERROR_CODES = frozenset({
    "server_error", "engine_error", "client_closed_request", "context_length_exceeded", "queue_full", "not_ready",
    "model_not_found", "upstream_unavailable", "chat_template_error", "invalid_api_key", "rate_limit_exceeded",
    "insufficient_quota", *map(str, errors.DESCRIPTIONS), "502", "504",
})
RESIDENCY_PERIOD_S = 10.0  # the KV cache's resident bytes are measured at most this often


class _KVResidency:
    """Each revision's KV-cache resident bytes, as last measured. The measure (mincore(2) over
    the whole cache, page by page) is too slow for the event loop a scrape runs on: a scrape reads
    the last figures and, once they are `period_s` old, starts a new measure on a thread."""

    def __init__(self, revisions: Callable[[], Iterable[Revision]], period_s: float) -> None:
        self._revisions, self.period_s = revisions, period_s
        self._bytes: dict[str, int] = {}  # revision id -> bytes
        self._measured_at = -period_s
        self._measuring = False
        self._lock = threading.Lock()

    def __getitem__(self, revision: Revision) -> int:
        """Its last measured figure (0 before the first measure)."""
        return self._bytes.get(revision.id, 0)

    def refresh_if_stale(self) -> None:
        with self._lock:
            if self._measuring or time.monotonic() - self._measured_at < self.period_s:
                return
            self._measuring = True
        threading.Thread(target=self._measure, name="mergeserve-kv-residency", daemon=True).start()

    def _measure(self) -> None:
        measured: dict[str, int] = {}
        try:
            measured = {r.id: r.kv_cache_bytes() or 0 for r in self._revisions() if not r.retired}
        except Exception:  # the figure is only for show: log it, never stop measuring
            log.exception("measuring the KV caches' resident bytes failed")
        finally:
            with self._lock:
                self._bytes, self._measured_at, self._measuring = measured, time.monotonic(), False


class _ClosedLabel:
    """A counter whose last label takes values from a closed set, any other counting as "other":
    upstream servers choose those values, and each new one would be a series for good."""

    def __init__(self, counter: Counter, allowed: frozenset[str]) -> None:
        self.counter, self.allowed = counter, allowed

    def labels(self, *values: str) -> Counter:
        *first, last = values
        return self.counter.labels(*first, last if last in self.allowed else "other")


class _Pruner(Collector):
    """Collects nothing; registered first, it drops the series of names that are gone before the
    others are collected."""

    def __init__(self, prune: Callable[[], None]) -> None:
        self._prune = prune

    def collect(self) -> Iterable[Metric]:
        self._prune()
        return []


class _CompositionCollector(Collector):
    """Each revision's state and memory, read at scrape time."""

    def __init__(self, revisions: Callable[[], Iterable[Revision]], residency: _KVResidency) -> None:
        self._revisions, self._residency = revisions, residency

    def collect(self) -> Iterable[Metric]:
        self._residency.refresh_if_stale()
        info = GaugeMetricFamily(
            "mergeserve:composition_info", "Revisions held: 1 per (composition, revision, state); "
            "state is building, ready, failed or draining.", labels=["model", "revision", "state"],
        )
        memory = GaugeMetricFamily(
            "mergeserve:composition_memory_bytes",
            "Bytes the live revision holds beyond the shared expert pool (merged layers, routers, KV cache).",
            labels=["model"],
        )
        for r in self._revisions():
            state = "draining" if r.retired and r.backend is not None else r.state
            info.add_metric([r.name, str(r.number), state], 1)
            if r.memory_bytes is not None and not r.retired:
                memory.add_metric([r.name], r.memory_bytes + self._residency[r])
        return [info, memory]


class _BackendCollector(Collector):
    """Queue state (and an in-process engine's router statistics) read at scrape time, so the
    gauges are never stale."""

    def __init__(self, backends: Callable[[], Iterable[Served]]) -> None:
        self._backends = backends

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("mergeserve:num_requests_running", "Requests running.", labels=["model"])
        waiting = GaugeMetricFamily("mergeserve:num_requests_waiting", "Requests waiting.", labels=["model"])
        experts = CounterMetricFamily(
            "mergeserve:expert_tokens", "Tokens routed to each expert, per MoE layer.",
            labels=["model", "layer", "expert"],
        )
        weights = CounterMetricFamily(
            "mergeserve:expert_routing_weight",
            "Summed routing weight of the tokens routed to each expert, per MoE layer "
            "(divided by mergeserve:expert_tokens_total: the mean routing weight).",
            labels=["model", "layer", "expert"],
        )
        requests = CounterMetricFamily(
            "mergeserve:expert_requests", "Requests a sequence router sent to each expert (top-k: k per request).",
            labels=["model", "expert"],
        )
        failures = CounterMetricFamily(
            "mergeserve:engine_step_failures", "Engine steps that raised; the requests they ran got an error.", labels=["model"],
        )
        for backend in self._backends():
            running.add_metric([backend.name], backend.num_running)
            waiting.add_metric([backend.name], backend.num_waiting)
            for engine in _engines(backend):
                failures.add_metric([engine.name], engine.failed_steps)
                if engine.expert_requests is not None:
                    for expert, count in zip(engine.expert_names, engine.expert_requests.tolist()):
                        requests.add_metric([engine.name, expert], count)
                load = engine.expert_load
                if load is None:  # a dense composition
                    continue
                for layer, (counts, sums) in enumerate(zip(load.tolist(), engine.expert_weight.tolist())):
                    for expert, count, total in zip(engine.expert_names, counts, sums):
                        experts.add_metric([engine.name, str(layer), expert], count)
                        weights.add_metric([engine.name, str(layer), expert], total)
        return [running, waiting, experts, weights, requests, failures]


class _ClusterCollector(Collector):
    """What cluster routers read of a vLLM server, under vLLM's names, one series per composition
    (`model_name`): the Gateway API Inference Extension's model-server protocol and vLLM
    production-stack route by them. Every composition is a model those routers can ask for, so
    `vllm:lora_requests_info` lists the compositions with running and waiting requests as its
    adapters (its value: the scrape time, as vLLM sets it)."""

    def __init__(self, backends: Callable[[], Iterable[Served]], max_models: int) -> None:
        self._backends, self._max_models = backends, max_models

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests running (vLLM's name).", labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting (vLLM's name).", labels=["model_name"])
        kv = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "Share of the engine's KV cache sequences in use, 0 to 1 (vLLM's name; "
            "compositions on one base engine share its cache; absent for a remote backend).", labels=["model_name"],
        )
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info", "Compositions with running and waiting requests, comma-separated (vLLM's name).",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        busy, queued = [], []
        for backend in self._backends():
            running.add_metric([backend.name], backend.num_running)
            waiting.add_metric([backend.name], backend.num_waiting)
            if hosts := {id(e.host): e.host for e in _engines(backend)}:
                kv.add_metric([backend.name], max(h.num_running / h.slots for h in hosts.values()))
            busy += [backend.name] if backend.num_running else []
            queued += [backend.name] if backend.num_waiting else []
        lora.add_metric([",".join(busy), ",".join(queued), str(self._max_models)], time.time())
        return [running, waiting, kv, lora]


class _AliasCollector(Collector):
    """Each alias's weights in force, their generation, and its rollout's step and status."""

    def __init__(self, states: Callable[[], dict[str, AliasState]]) -> None:
        self._states = states

    def collect(self) -> Iterable[Metric]:
        weight = GaugeMetricFamily("mergeserve:alias_weight", "The share of the alias's requests each target gets now.",
                                   labels=["alias", "model"])
        generation = GaugeMetricFamily("mergeserve:alias_generation", "Changes of the alias's weights so far: the "
                                       "generation label of its mergeserve:ab_* series.", labels=["alias"])
        step = GaugeMetricFamily("mergeserve:rollout_step", "The step a rollout is at (index into its steps).", labels=["alias"])
        status = GaugeMetricFamily("mergeserve:rollout_status", "1 for the status a rollout is in: running, completed "
                                   "or rolled_back.", labels=["alias", "status"])
        for alias, state in self._states().items():
            total = sum(state.weights.values())
            for target, w in state.weights.items():
                weight.add_metric([alias, target], w / total)
            generation.add_metric([alias], state.generation)
            if state.rollout is not None:
                step.add_metric([alias], state.rollout.step)
                status.add_metric([alias, state.rollout.status], 1)
        return [weight, generation, step, status]


class Metrics:
    """Every per-request series carries `model`, the composition that served it, so an A/B
    comparison of two compositions needs no other join."""

    def __init__(
        self, backends: Callable[[], Iterable[Served]], revisions: Callable[[], Iterable[Revision]] = lambda: (),
        aliases: Callable[[], dict[str, AliasState]] = dict, residency_period_s: float = RESIDENCY_PERIOD_S,
        max_models: int = 16,
    ) -> None:
        """`revisions` and `aliases` (their states): what exists now; the series of any other
        composition or alias are dropped. max_models: the compositions this server may hold
        (vllm:lora_requests_info's max_lora)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self._revisions, self._aliases = revisions, aliases
        r.register(_Pruner(self._prune))  # first: a registry collects in the order of registration
        self.http_requests = Counter(
            "mergeserve:http_requests", "HTTP requests by route, status and composition (\"\" before one is chosen).",
            ["route", "status", "model"], registry=r,
        )
        self.request_errors = _ClosedLabel(Counter(
            "mergeserve:request_errors", "Requests that failed after a composition was chosen, by error code "
            "(an upstream's codes that this server does not know: \"other\").",
            ["model", "code"], registry=r,
        ), ERROR_CODES)
        self.feedback = Summary(
            "mergeserve:feedback_score", "Scores in [-1, 1] posted to /v1/feedback for the composition's responses.",
            ["model"], registry=r,
        )
        self.feedback_by_expert = Summary(
            "mergeserve:feedback_score_by_expert", "The same scores by the expert with the largest share of the "
            "response's routing (its `experts` field; \"none\" for a response without routing).",
            ["model", "expert"], registry=r,
        )
        self.alias_requests = Counter(
            "mergeserve:alias_requests", "Requests an A/B alias sent to each target composition.",
            ["alias", "model"], registry=r,
        )
        self.member_requests = Counter(
            "mergeserve:member_requests", "Requests a routed composition (method=route) sent to each member model; "
            "their tokens count under the member's own model label, <composition>.<member>.",
            ["model", "member"], registry=r,
        )
        self.ttft = Histogram(
            "mergeserve:time_to_first_token_seconds", "Time to first token.", ["model"],
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "mergeserve:e2e_request_latency_seconds", "End-to-end request latency.", ["model"],
            buckets=E2E_BUCKETS, registry=r,
        )
        # A/B aliases' counts since their weights last changed (server/ab/tally.py), as `mergeserve:ab_*`.
        self.tallies = Tallies()
        r.register(TallyCollector(self.tallies))
        self.rollout_decisions = Counter(
            "mergeserve:rollout_decisions", "Decisions of an alias's rollout: start, advance, complete, rollback.",
            ["alias", "action"], registry=r,
        )
        self.prompt_tokens = Counter("mergeserve:prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter("mergeserve:generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.request_success = _ClosedLabel(Counter(
            "mergeserve:request_success", "Requests finished, by reason (one OpenAI does not define: \"other\").",
            ["model", "finished_reason"], registry=r,
        ), FINISH_REASONS)
        r.register(_BackendCollector(backends))
        r.register(_ClusterCollector(backends, max_models))
        r.register(_CompositionCollector(revisions, _KVResidency(revisions, residency_period_s)))
        r.register(_AliasCollector(aliases))

    def _prune(self) -> None:
        """Drop the series of compositions that are gone (deleted, and drained) and of deleted aliases."""
        models = {""}  # http_requests before a composition is chosen
        for revision in self._revisions():
            models |= {revision.name, *(e.name for e in _engines(revision.backend))}  # route members: own names
        states = self._aliases()
        aliases = set(states)
        for metric in (self.http_requests, self.request_errors.counter, self.feedback, self.feedback_by_expert, self.alias_requests,
                       self.member_requests, self.ttft, self.e2e, self.prompt_tokens, self.generation_tokens,
                       self.request_success.counter):
            for gone in _label_values(metric, "model") - models:
                metric.remove_by_labels({"model": gone})
        for metric in (self.alias_requests, self.rollout_decisions):
            for gone in _label_values(metric, "alias") - aliases:
                metric.remove_by_labels({"alias": gone})
        self.tallies.sync({name: state.generation for name, state in states.items()})

    def rollout_decision(self, alias: str, decision: Decision) -> None:
        if decision.action == "start":  # every action's series from the start, so that increase() sees the first
            for action in get_args(Action):
                self.rollout_decisions.labels(alias, action)
        self.rollout_decisions.labels(alias, decision.action).inc()

    async def observe(
        self, model: str, stream: AsyncIterator[RequestOutput], also: tuple[str, ...] = (),
        on_tokens: Callable[[int], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Pass one engine request's deltas through, counting tokens and timing it. `also`: the
        other engines that ran it (a mixed request's followers): their token counts grow too;
        `on_tokens`: told each delta's count of new tokens."""
        start = time.perf_counter()
        seen_output = seen_token = False
        async with aclosing(stream):
            async for out in stream:
                if not seen_output:
                    for name in (model, *also):
                        self.prompt_tokens.labels(name).inc(out.num_prompt_tokens)
                    seen_output = True
                if not seen_token and out.new_token_ids:
                    self.ttft.labels(model).observe(time.perf_counter() - start)
                    seen_token = True
                for name in (model, *also):
                    self.generation_tokens.labels(name).inc(len(out.new_token_ids))
                if on_tokens is not None:
                    on_tokens(len(out.new_token_ids))
                if out.finished:
                    self.e2e.labels(model).observe(time.perf_counter() - start)
                    if out.finish_reason != "abort":
                        self.request_success.labels(model, out.finish_reason).inc()
                yield out


def _engines(backend: Served | None) -> list:
    """The in-process engines of a backend: a route composition has one per member model; a remote backend none."""
    if backend is None:
        return []
    return getattr(backend, "engines", None) or ([backend.engine] if backend.engine else [])


def _label_values(metric: Counter | Histogram | Summary, label: str) -> set[str]:
    return {sample.labels[label] for family in metric.collect() for sample in family.samples}


class HTTPMetricsMiddleware:
    """Counts responses by route template (not raw path, which would explode the label set) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            model = scope.get("state", {}).get("model", "")  # set by the route once it has chosen a composition
            self.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(status), model).inc()
