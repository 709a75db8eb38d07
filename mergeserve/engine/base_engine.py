"""One engine per base: every composition that is low-rank over a base (engine/tables.py) runs in
that base's engine, with one scheduler, one KV cache and one forward per step whatever the mix of
compositions in it.

`BaseEngine.place` adds a composition as tables (its router rows, its entries in the factor
tables) and returns its `Placed` face: what a backend needs of an engine, for that composition
alone. `Placed.close` (when the registry frees a drained revision) releases its entries. Placing
and releasing take the step lock: a step runs on one set of tables, and a replacement's new
requests use the new tables while the old revision's requests finish on theirs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from mergeserve.composition import ComposedModel
from mergeserve.engine.base_model import BaseGraph, BaseTransformer, GraphStep, Row, StepRouting
from mergeserve.engine.compiled import CompiledStep
from mergeserve.engine.engine import Engine
from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.layers import Batch
from mergeserve.engine.mixture_router import MixtureRouter
from mergeserve.engine.model_runner import ModelRunner, kv_slots
from mergeserve.engine.opaque_ops import base_step
from mergeserve.engine.sequence import RequestOutput, SamplingParams, Sequence
from mergeserve.engine.tables import BaseWeights, CompositionTables, FactorTables, NotLowRank, RouterTables, base_of, plan
from mergeserve.kernels.int8 import Int8Packer
from mergeserve.kernels.lowrank import Pack
from mergeserve.kernels.packed import WeightPacker
from mergeserve.spec import EngineConfig

__all__ = ["BaseEngine", "BaseRunner", "Placed", "engine_key"]


def engine_key(base: BaseWeights, int8: bool) -> tuple[int, ...]:
    """One base engine per base and weight format: int8 and bf16 compositions over one base run apart."""
    return (int(int8), *base.key())


class BaseRunner(ModelRunner):
    """The ModelRunner of a base engine: the same batches, a forward that takes each row's composition."""

    def __init__(self, base: BaseWeights, hf_config, config: EngineConfig, max_model_len: int, packer: Pack):
        self.num_experts = 0
        self.base = base
        self.model = BaseTransformer(base, hf_config, max_model_len, packer)
        self.tables = FactorTables(base, packer)
        args = self.model.args
        self.slots = kv_slots(config, args.n_layers * args.n_kv_heads * args.head_dim * 2 * 4, max_model_len)
        self.cache = KVCache(args.n_layers, self.slots, args.n_kv_heads, args.head_dim, max_model_len, args.windows)
        self.mixture_router = None  # each mixture-routed composition has its own (route())
        self.routers = RouterTables([])  # the placed compositions' FFN routers (BaseEngine.place sets them)
        self.compiled = None  # see compile
        self._step_routing: StepRouting | None = None  # the last forward's (token_routing)

    def _forward(self, batch: Batch, rows: list[tuple[Sequence, int]]) -> torch.Tensor:
        return self.model(batch, self._routing(rows), self.tables.layers(), self.cache)

    def _routing(self, rows: list[tuple[Sequence, int]]) -> StepRouting:
        self._step_routing = StepRouting([Row(s.composition, n, s.alpha, s.params.router_bias) for s, n in rows], self.routers)
        return self._step_routing

    def token_routing(self) -> torch.Tensor | None:
        """The last forward's token routing, [N, E] (E the most experts of its compositions)."""
        return None if self._step_routing is None else self._step_routing.token_routing

    def compile(self, buckets: list[int], cache_dir: str | None = None, autotune: bool = True, prefill: bool = True,
                freeze: bool = True) -> CompiledStep:
        """The base's step compiled per bucket, and its prefill, in the background: the
        graph holds what lies between the projections; each step's compositions, its projections
        and FFNs come in by operator (base_model.BaseGraph)."""
        graph = BaseGraph(self.model)
        self.compiled = CompiledStep(graph, self.cache, buckets, None, lambda batch, rows: None, cache_dir, autotune, prefill, freeze)
        self.compiled.start()
        return self.compiled

    def _run_compiled(self, run: Callable[[Batch], torch.Tensor | None], batch: Batch,
                      rows: list[tuple[Sequence, int]]) -> torch.Tensor | None:
        """`run` with this step's routing and tables set for the graph's operators; the picks it
        made are counted once it ran (the graph counts nothing: a bucket pads the batch)."""
        routing = self._routing(rows)
        with base_step(self.compiled.model.key, GraphStep(routing, self.tables.layers(), batch)):
            hidden = run(batch)
        if hidden is not None:
            routing.count_picks()
        return hidden

    def route(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        """Each request's expert weights [E] under its composition's mixture router."""
        out: dict[int, torch.Tensor] = {}
        for comp in {id(s.composition): s.composition for s in seqs}.values():
            mine = [s for s in seqs if s.composition is comp]
            weights = comp.mixture_router.weights([s.prompt_ids for s in mine], self._bias_rows(mine),
                                                  [s.params.route_span for s in mine])
            for s, alpha in zip(mine, weights):
                out[id(s)] = alpha
        return [out[id(s)] for s in seqs]

    def _bias_rows(self, seqs: list[Sequence]) -> torch.Tensor | None:
        if all(s.params.router_bias is None for s in seqs):
            return None
        zeros = (0.0,) * seqs[0].composition.num_experts
        return torch.tensor([s.params.router_bias or zeros for s in seqs])

    def _router_bias(self, rows: list[tuple[Sequence, int]]) -> None:
        return None  # per row, in StepRouting

    def _alpha(self, seqs: list[Sequence]) -> None:
        return None  # per row, in StepRouting


class BaseEngine(Engine):
    def __init__(self, first: ComposedModel, config: EngineConfig = EngineConfig(), packer: WeightPacker | None = None):
        """The engine of `first`'s base (`first` is not placed: call place())."""
        packer = packer if packer is not None else WeightPacker()
        base = base_of(first)
        max_len = min(config.max_model_len, first.config.max_position_embeddings)
        self.int8 = first.int8  # the format of every composition placed here
        runner = BaseRunner(base, first.config, config, max_len, Int8Packer(packer) if first.int8 else packer)
        super().__init__(first, config, packer, runner)
        self.name = f"base of {first.name}"
        self.placed: list[CompositionTables] = []
        self._step_lock = threading.Lock()  # a step runs on one set of tables; placing waits for it

    @property
    def base_key(self) -> tuple[int, ...]:
        return engine_key(self.runner.base, self.int8)

    def place(self, composed: ComposedModel) -> Placed:
        """Serve `composed` here (NotLowRank when it is not the base plus adapter terms)."""
        if composed.int8 != self.int8:
            raise NotLowRank(f"its weights run {'as int8' if composed.int8 else 'unquantised'}, this base engine's do not")
        with self._step_lock:
            tables = plan(composed, self.runner.base, self.runner.tables)
            if composed.mixture_routing is not None:
                tables.mixture_router = MixtureRouter(composed)
            # New entries are stacked by the next step, once for every composition placed before it.
            self.placed.append(tables)
            self.runner.routers = RouterTables(self.placed)
        return Placed(self, tables)

    def remove(self, tables: CompositionTables) -> None:
        """A placed composition is gone (its requests have finished): release its entries."""
        with self._step_lock:
            if tables in self.placed:
                self.placed.remove(tables)
                self.runner.tables.release(tables)
                self.runner.routers = RouterTables(self.placed)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        with self._step_lock:
            return super().step()

    def count(self, tables: CompositionTables) -> tuple[int, int]:
        """Running and waiting requests of one placed composition (any thread)."""
        # Snapshots: the executor thread changes both while the event loop asks here, and a deque
        # iterated in Python across such a change raises (list() copies it under the GIL).
        running = sum(1 for s in list(self.scheduler.running) if s.composition is tables)
        waiting = sum(1 for s in list(self.scheduler.waiting) if s.composition is tables)
        waiting += sum(1 for kind, s in list(self._inbox) if kind == "add" and s.composition is tables)
        return running, waiting


class Placed:
    """A composition placed on a base engine, with the face of an engine of its own: its name,
    tokenizer, limits and router statistics; its requests go to the base engine."""

    def __init__(self, engine: BaseEngine, tables: CompositionTables) -> None:
        self.base_engine, self.tables = engine, tables
        self.composed = tables.composed
        self.name = tables.name
        self.tokenizer = self.composed.tokenizer
        self.expert_names = self.composed.expert_names
        self.config, self.max_model_len = engine.config, engine.max_model_len

    @property
    def host(self) -> BaseEngine:
        return self.base_engine

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.base_engine.add_request(request_id, prompt_ids, params, self.tables)

    def sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        return self.base_engine.sequence(request_id, prompt_ids, params, self.tables)

    def add_sequence(self, seq: Sequence) -> None:
        self.base_engine.add_sequence(seq)

    def abort(self, request_id: str) -> None:
        self.base_engine.abort(request_id)

    def close(self) -> None:
        self.base_engine.remove(self.tables)

    @property
    def cache(self) -> KVCache:
        return self.base_engine.cache

    @property
    def compile_state(self) -> dict | None:
        return self.base_engine.compile_state

    @property
    def num_running(self) -> int:
        return self.base_engine.count(self.tables)[0]

    @property
    def num_waiting(self) -> int:
        return self.base_engine.count(self.tables)[1]

    @property
    def failed_steps(self) -> int:
        return self.base_engine.failed_steps

    @property
    def expert_load(self) -> torch.Tensor | None:
        return self.tables.expert_load if self.tables.num_experts > 1 else None

    @property
    def expert_weight(self) -> torch.Tensor | None:
        return self.tables.expert_weight if self.tables.num_experts > 1 else None

    @property
    def expert_requests(self) -> torch.Tensor | None:
        return self.tables.expert_requests if self.tables.mixture_router is not None else None

    @property
    def mixture_router(self) -> MixtureRouter | None:
        return self.tables.mixture_router
