"""Engine: one composition's requests, added, stepped and aborted.

Beside it, as in nano-vllm: the `Scheduler` picks each step's sequences, the `ModelRunner`
owns the Transformer and its KV cache and runs the step's forwards, the `OutputProcessor`
turns sampled tokens into text, stops and `RequestOutput`s. The engine holds the requests'
lifetimes: admission, sampling generators, mixed groups, finishing.

`step()` is called by a single executor thread; `add_request` and `abort` may be called
from any thread and take effect at the start of the next step.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections import deque
from pathlib import Path

import torch

from mergeserve.composition import ComposedModel
from mergeserve.engine.compiled import buckets_for
from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.mixture_router import MixtureRouter
from mergeserve.engine.model import Transformer
from mergeserve.engine.model_runner import ModelRunner
from mergeserve.engine.output_processor import OutputProcessor
from mergeserve.engine.sampler import sample
from mergeserve.engine.scheduler import ScheduledBatch, Scheduler
from mergeserve.engine.sequence import RequestOutput, SamplingParams, Sequence
from mergeserve.engine.tables import CompositionTables
from mergeserve.kernels.packed import WeightPacker
from mergeserve.spec import EngineConfig
from mergeserve.spec.serve import CompileConfig

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A step raised (its cause is the error): the requests it ran failed and are gone; the
    outputs it had produced before (aborts) still belong to their requests."""

    def __init__(self, request_ids: list[str], outputs: list[RequestOutput]) -> None:
        super().__init__(f"a step failed; its requests {request_ids} were ended")
        self.request_ids, self.outputs = request_ids, outputs


class Engine:
    def __init__(
        self, composed: ComposedModel, config: EngineConfig = EngineConfig(), packer: WeightPacker | None = None,
        runner: ModelRunner | None = None,
    ):
        """`packer`: shares packed weights with other engines (the pool's); None packs for this engine alone.
        `runner`: runs the forwards (a base engine's); None: a ModelRunner of `composed`."""
        self.composed = composed
        self.config = config
        self.name = composed.name
        self.tokenizer = composed.tokenizer
        self.expert_names = composed.expert_names
        self.max_model_len = min(config.max_model_len, composed.config.max_position_embeddings)
        packer = packer if packer is not None else WeightPacker()
        self.runner = runner if runner is not None else ModelRunner(composed, config, self.max_model_len, packer)
        self.outputs = OutputProcessor(composed, self.max_model_len)
        self.scheduler = Scheduler(self.runner.slots, config.max_prefill_tokens)
        self._inbox: deque[tuple[str, object]] = deque()  # ("add", Sequence) | ("abort", request_id)
        self._lock = threading.Lock()
        self._generators: dict[str, torch.Generator] = {}
        # Mixture routing: requests that chose each expert (top-k choices count once each), [E].
        self.expert_requests = torch.zeros(composed.num_experts, dtype=torch.int64) if self.mixture_router else None
        self.failed_steps = 0  # steps that raised: their requests failed, the engine went on
        self._refused: list[tuple[str, Exception]] = []  # requests whose admission raised, with the error
        self._compile_error: str | None = None  # why the decode step could not be compiled here
        if config.compile.enabled:
            self._start_compile(config.compile)

    def _start_compile(self, c: CompileConfig) -> None:
        """The step compiled in the background (engine/compiled.py); until then, and where it fails, eager."""
        try:
            self.runner.compile(c.buckets or buckets_for(self.runner.slots),
                                c.cache_dir or str(Path.home() / ".cache/mergeserve/inductor"), c.autotune, c.prefill, c.freeze)
        except NotImplementedError as e:
            self._compile_error = str(e)
            log.warning("engine %s serves eagerly: %s", self.name, e)

    @property
    def compile_state(self) -> dict | None:
        """The compiled step's state (admin API); None when compiling is off."""
        if self.runner.compiled is not None:
            return self.runner.compiled.state.describe()
        if self._compile_error is not None:
            return {"status": "unsupported", "error": self._compile_error}
        return None

    # --- thread-safe surface -------------------------------------------------------------
    @property
    def host(self) -> Engine:
        """The engine the executor steps for requests added here (a placed composition's is its base engine)."""
        return self

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, composition: CompositionTables | None = None,
    ) -> None:
        """`composition`: on a base engine, the placed composition that runs the request."""
        self.add_sequence(self.sequence(request_id, prompt_ids, params, composition))

    def sequence(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, composition: CompositionTables | None = None,
    ) -> Sequence:
        """A request as this engine would run it, checked (ValueError names what is wrong); add_sequence admits it."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_model_len={self.max_model_len}")
        seq = Sequence(request_id, list(prompt_ids), params, composition=composition)
        if params.router_bias is not None:
            self._check_router_bias(params.router_bias, self._composed(seq))
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        with self._lock:
            self._inbox.append(("add", seq))

    def _composed(self, seq: Sequence) -> ComposedModel:
        """The composition `seq` runs: its own on a base engine, else the engine's."""
        return seq.composition.composed if seq.composition is not None else self.composed

    def _unrouted(self) -> list[Sequence]:
        """Running sequences of mixture-routed compositions that have no alpha yet."""
        return [s for s in self.scheduler.running if s.alpha is None and self._composed(s).mixture_routing is not None]

    @staticmethod
    def _check_router_bias(bias: tuple[float, ...], composed: ComposedModel) -> None:
        e = composed.num_experts
        if e <= 1:
            raise ValueError(f"composition {composed.name!r} is dense: there is no router to bias")
        if len(bias) != e:
            raise ValueError(f"router_bias has {len(bias)} entries for {e} experts")
        if any(math.isnan(b) or b == math.inf for b in bias):
            raise ValueError("router_bias entries must be finite or -inf")
        if all(b == -math.inf for b in bias):
            raise ValueError("router_bias excludes every expert")

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))

    def abort_all(self) -> list[str]:
        """Drop every request (after a failed step); returns their ids. Executor thread only."""
        with self._lock:
            pending, self._inbox = [item for kind, item in self._inbox if kind == "add"], deque()
        seqs = [*self.scheduler.running, *self.scheduler.waiting, *pending]
        for seq in seqs:
            self._finish(seq, "abort")
        return [s.request_id for s in seqs]

    def take_refused(self) -> list[tuple[str, Exception]]:
        """(request id, error) of each request whose admission raised since the last call: that
        request failed alone and is gone. Executor thread only."""
        refused, self._refused = self._refused, []
        return refused

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + sum(1 for kind, _ in list(self._inbox) if kind == "add")

    # The runner's, read here by callers that hold an engine.
    @property
    def model(self) -> Transformer:
        return self.runner.model

    @property
    def cache(self) -> KVCache:
        return self.runner.cache

    @property
    def slots(self) -> int:
        return self.runner.slots

    @property
    def mixture_router(self) -> MixtureRouter | None:
        return self.runner.mixture_router

    @property
    def expert_load(self) -> torch.Tensor | None:
        """Tokens routed to each expert so far, [layers, experts]; None for a dense model."""
        return self.model.expert_load if self.composed.num_experts > 1 else None

    @property
    def expert_weight(self) -> torch.Tensor | None:
        """Summed routing weight of those tokens, [layers, experts]; / expert_load = mean weight."""
        return self.model.expert_weight if self.composed.num_experts > 1 else None

    # --- the step ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduling step. If it fails, only the requests it was running fail (StepFailed
        names them; their slots are freed) and the engine goes on with the rest. A request whose
        admission raises fails alone (take_refused)."""
        outputs = self._drain_inbox() + self._settle_groups()
        batch = self.scheduler.schedule()
        try:
            return outputs + self._run(batch)
        except Exception as e:
            failed = [seq for seq, _ in batch.prefill] + list(batch.decode)
            failed += [seq for seq in self._unrouted() if seq not in failed]  # the new requests it was routing fail too
            for seq in failed:
                self._finish(seq, "error")
            self.failed_steps += 1
            raise StepFailed([s.request_id for s in failed], outputs) from e

    def _run(self, batch: ScheduledBatch) -> list[RequestOutput]:
        if unrouted := self._unrouted():
            self._route_admitted(unrouted)
            routed = set(self._unrouted())
            batch.prefill = [(seq, n) for seq, n in batch.prefill if seq not in routed]  # the rest wait their turn
        outputs: list[RequestOutput] = []
        rows: list[torch.Tensor] = []  # last-position hidden state of each sequence that samples now
        ready: list[Sequence] = []
        if batch.prefill:
            hidden = self.runner.prefill(batch.prefill)  # [B, T, D]
            routing, end = self.runner.token_routing(), 0  # [N, E] over the real tokens, row after row
            for row, (seq, n) in enumerate(batch.prefill):
                end += n
                if seq.params.prompt_logprobs is not None:
                    self._score_prompt_chunk(seq, hidden[row, :n])
                seq.num_cached += n
                if not seq.in_prefill:
                    rows.append(hidden[row, n - 1])
                    ready.append(seq)
                    if routing is not None:  # its last prompt token gives the first output token
                        seq.add_routing(routing[end - 1, :self._composed(seq).num_experts])
        if batch.decode:
            decode = sorted(batch.decode, key=lambda s: s.slot)  # consecutive slots read the cache as views
            rows += list(self.runner.decode(decode)[:, -1])
            routing = self.runner.token_routing()
            for i, seq in enumerate(decode):
                seq.num_cached += 1
                if routing is not None:
                    seq.add_routing(routing[i, :self._composed(seq).num_experts])
            ready += decode
        if ready:
            logits = self.runner.logits(torch.stack(rows))  # [N, V]
            if all(seq.group is None for seq in ready):  # the common path: no copy of the logits
                return outputs + self._sample(ready, logits)
            plain = [i for i, seq in enumerate(ready) if seq.group is None]
            for i, seq in enumerate(ready):
                if seq.group is not None:
                    seq.group.deposit(seq, logits[i])
            if plain:
                outputs += self._sample([ready[i] for i in plain], logits[plain])
            outputs += self._settle_groups()
        return outputs

    def _settle_groups(self) -> list[RequestOutput]:
        """Mixed requests: a group led here whose members have all contributed draws its token
        (the lead samples from the mixture, the followers take the token); a follower whose
        group ended leaves, and a lead whose follower failed ends (its stream has the error)."""
        outputs: list[RequestOutput] = []
        for seq in [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.group is not None]:
            group = seq.group
            if group.ended:
                self._finish(seq, "abort" if seq is not group.lead else "error")
            elif seq is group.lead and group.complete():
                outputs += self._sample([seq], group.mixture().unsqueeze(0))
                group.advance(seq.output_ids[-1])
        return outputs

    def _score_prompt_chunk(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that this prefill chunk's positions predict (hidden [n, D])."""
        start = seq.num_cached
        targets = seq.prompt_ids[start + 1:start + 1 + hidden.shape[0]]  # the last prompt position predicts the output
        self.outputs.add_prompt_logprobs(seq, targets, self.runner.logits(hidden[:len(targets)]) if targets else None)

    def _route_admitted(self, unrouted: list[Sequence]) -> None:
        """Mixture routing: newly admitted requests' prompts, routed in one batch before their first
        chunk. Scoring a prompt runs every expert over it, so a step routes prompts of at most
        max_prefill_tokens tokens in all (at least one prompt), as prefill is bounded: a burst of
        long prompts cannot stall every engine on the executor thread for one huge step."""
        new, tokens = [], 0
        for seq in unrouted:
            if not new or tokens + len(seq.prompt_ids) <= self.config.max_prefill_tokens:
                new.append(seq)
                tokens += len(seq.prompt_ids)
        for seq, a in zip(new, self.runner.route(new)):  # each [E]
            seq.alpha = a
            counts = seq.composition.expert_requests if seq.composition is not None else self.expert_requests
            counts += (a > 0).long()

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        with self._lock:
            items, self._inbox = list(self._inbox), deque()
        for kind, item in items:
            if kind == "add":
                self._admit(item)
            elif (seq := self.scheduler.find(item)) is not None:
                self._finish(seq, "abort")
                outputs.append(self.outputs.output(seq, [], []))
        return outputs

    def _admit(self, seq: Sequence) -> None:
        try:
            self._add(seq)
        except Exception as e:  # noqa: BLE001 - whatever it is, it is this request's alone
            log.exception("engine %s could not admit request %s", self.name, seq.request_id)
            self._generators.pop(seq.request_id, None)
            if seq.group is not None:
                seq.group.ended = True  # the other members leave at their next step
            self._refused.append((seq.request_id, e))

    def _add(self, seq: Sequence) -> None:
        seed = seq.params.seed if seq.params.seed is not None else random.getrandbits(63)
        self._generators[seq.request_id] = torch.Generator().manual_seed(seed)
        self.outputs.track(seq)
        self.scheduler.add(seq)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        params = [s.params for s in seqs]
        tokens, logprobs = sample(logits, params, [self._generators[s.request_id] for s in seqs])
        outputs = []
        for row, seq in enumerate(seqs):
            token = int(tokens[row])
            lp, reason = self.outputs.add_token(seq, token, logprobs[row] if logprobs is not None else None)
            if reason:
                self._finish(seq, reason)
            outputs.append(self.outputs.token_output(seq, token, lp))
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.group is not None:
            seq.group.ended = True  # the lead is done, or a member failed: the others leave at their next step
        if (moved := self.scheduler.finish(seq, reason)) is not None:
            other, old_slot = moved
            self.runner.move(old_slot, other.slot, other.num_cached)
        self._generators.pop(seq.request_id, None)

    # --- offline helpers -----------------------------------------------------------------
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of every position of one sequence, [T, V], without touching the cache."""
        return self.runner.sequence_logits(token_ids)

    def score(
        self, sequences: list[list[int]], max_batch_tokens: int = 4096, route_tokens: int | None = None,
    ) -> list[torch.Tensor]:
        """Log-probability of every token after the first given those before it, per sequence: [len - 1].

        Sequences are sorted by length and run in right-padded batches of at most
        `max_batch_tokens` (padding never reaches a real token through causal attention).
        A mixture router routes each sequence on its first `route_tokens` tokens (all when
        None): scoring text with a choice made from that same whole text would let a
        perplexity router pick by the very loss being measured.
        """
        return self.runner.score(sequences, max_batch_tokens, route_tokens)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion through the continuous-batching loop; output token ids per prompt.
        `params`: one for all, or one per prompt (coordinator.generate decodes mixtures over engines)."""
        ids = [f"offline-{i}" for i in range(len(prompts))]
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        for rid, prompt, p in zip(ids, prompts, per_prompt):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_work():
            outputs = self.step()
            for _, error in self.take_refused():
                raise error
            for out in outputs:
                results[out.request_id] += out.new_token_ids
        return [results[rid] for rid in ids]
