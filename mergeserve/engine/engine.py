"""Engine: one composition's model, KV cache, scheduler and sampler, advanced one step at a time.

`step()` is called by a single executor thread; `add_request` and `abort` may be called
from any thread and take effect at the start of the next step.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections import deque

import torch

from mergeserve.composition import ComposedModel
from mergeserve.engine.detokenizer import Detokenizer
from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.layers import Batch, padded_groups
from mergeserve.engine.mixing import MixGroup
from mergeserve.engine.mixture_router import MixtureRouter
from mergeserve.engine.model import Transformer
from mergeserve.engine.sampler import sample
from mergeserve.engine.scheduler import ScheduledBatch, Scheduler
from mergeserve.engine.sequence import RequestOutput, SamplingParams, Sequence, TokenLogprob
from mergeserve.kernels.packed import WeightPacker
from mergeserve.spec import EngineConfig

log = logging.getLogger(__name__)


def kv_slots(config: EngineConfig, bytes_per_position: int, max_len: int) -> int:
    """Sequences that run at once: max_num_seqs, fewer where the KV cache budget holds fewer
    whole sequences (a request waits for a slot, or is refused past max_waiting: the cache
    never grows past the budget). bytes_per_position: K and V of one position, every layer."""
    if config.kv_cache_budget_bytes is None:
        return config.max_num_seqs
    fits = config.kv_cache_budget_bytes // (bytes_per_position * max_len)
    if fits < 1:
        raise ValueError(f"engine.kv_cache_budget_bytes={config.kv_cache_budget_bytes} holds no sequence of "
                         f"max_model_len={max_len} ({bytes_per_position * max_len} bytes); raise it or lower max_model_len")
    if fits < config.max_num_seqs:
        log.info("KV cache budget of %d bytes: %d sequences at once instead of max_num_seqs=%d", config.kv_cache_budget_bytes, fits, config.max_num_seqs)
    return min(fits, config.max_num_seqs)


class StepFailed(RuntimeError):
    """A step raised (its cause is the error): the requests it ran failed and are gone; the
    outputs it had produced before (aborts) still belong to their requests."""

    def __init__(self, request_ids: list[str], outputs: list[RequestOutput]) -> None:
        super().__init__(f"a step failed; its requests {request_ids} were ended")
        self.request_ids, self.outputs = request_ids, outputs


class Engine:
    def __init__(self, composed: ComposedModel, config: EngineConfig = EngineConfig(), packer: WeightPacker | None = None):
        """`packer`: shares packed weights with other engines (the pool's); None packs for this engine alone."""
        self.composed = composed
        self.config = config
        self.name = composed.name
        self.tokenizer = composed.tokenizer
        self.expert_names = composed.expert_names
        self.max_model_len = min(config.max_model_len, composed.config.max_position_embeddings)
        self.model = Transformer(composed, self.max_model_len, packer if packer is not None else WeightPacker())
        args = self.model.args
        self.slots = kv_slots(config, self.model.cache_layers * args.n_kv_heads * args.head_dim * 2 * 4, self.max_model_len)
        self.cache = KVCache(self.model.cache_layers, self.slots, args.n_kv_heads, args.head_dim, self.max_model_len)
        self.scheduler = Scheduler(self.slots, config.max_prefill_tokens)
        self.eos_ids = _eos_ids(composed)
        self._inbox: deque[tuple[str, object]] = deque()  # ("add", Sequence) | ("abort", request_id)
        self._lock = threading.Lock()
        self._generators: dict[str, torch.Generator] = {}
        self.mixture_router = MixtureRouter(composed) if composed.mixture_routing is not None else None
        # Mixture routing: requests that chose each expert (top-k choices count once each), [E].
        self.expert_requests = torch.zeros(composed.num_experts, dtype=torch.int64) if self.mixture_router else None
        self.failed_steps = 0  # steps that raised: their requests failed, the engine went on
        self._refused: list[tuple[str, Exception]] = []  # requests whose admission raised, with the error

    # --- thread-safe surface -------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_model_len={self.max_model_len}")
        if params.router_bias is not None:
            self._check_router_bias(params.router_bias)
        seq = Sequence(request_id, list(prompt_ids), params)
        followers = self._mix_group(seq) if params.mix is not None else []
        self._enqueue(seq)
        for engine, follower in zip(params.mix.engines if params.mix else (), followers):
            engine._enqueue(follower)  # every engine's queue sees groups in one order: admission cannot deadlock

    def _enqueue(self, seq: Sequence) -> None:
        with self._lock:
            self._inbox.append(("add", seq))

    def _mix_group(self, lead: Sequence) -> list[Sequence]:
        """The follower sequences (one per other engine) of a request decoded as a mixture."""
        mix = lead.params.mix
        engines = (self, *mix.engines)
        if len(mix.log_weights) != len(engines):
            raise ValueError(f"a mixture of {len(engines)} engines needs {len(engines)} weights, got {len(mix.log_weights)}")
        if lead.params.prompt_logprobs is not None:
            raise ValueError("prompt logprobs of a mixed request are not computed")
        if (short := min(e.max_model_len for e in engines)) <= len(lead.prompt_ids):
            raise ValueError(f"prompt of {len(lead.prompt_ids)} tokens leaves no room in a mixed member's max_model_len={short}")
        follow = SamplingParams(max_tokens=lead.params.max_tokens, ignore_eos=True)  # followers never sample
        followers = [Sequence(lead.request_id, list(lead.prompt_ids), follow) for _ in mix.engines]
        weights = torch.log_softmax(torch.tensor(mix.log_weights, dtype=torch.float32), dim=0)
        group = MixGroup([lead, *followers], weights, short)
        for seq in group.members:
            seq.group = group
        return followers

    def _check_router_bias(self, bias: tuple[float, ...]) -> None:
        e = self.composed.num_experts
        if e <= 1:
            raise ValueError(f"composition {self.name!r} is dense: there is no router to bias")
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
            if self.mixture_router is not None:  # the new requests it was routing fail too
                failed += [seq for seq in self.scheduler.running if seq.alpha is None and seq not in failed]
            for seq in failed:
                self._finish(seq, "error")
            self.failed_steps += 1
            raise StepFailed([s.request_id for s in failed], outputs) from e

    def _run(self, batch: ScheduledBatch) -> list[RequestOutput]:
        if self.mixture_router is not None:
            self._route_admitted()
            batch.prefill = [(seq, n) for seq, n in batch.prefill if seq.alpha is not None]  # the rest wait their turn
        outputs: list[RequestOutput] = []
        rows: list[torch.Tensor] = []  # last-position hidden state of each sequence that samples now
        ready: list[Sequence] = []
        if batch.prefill:
            hidden = self._prefill(batch.prefill)  # [B, T, D]
            for row, (seq, n) in enumerate(batch.prefill):
                if seq.params.prompt_logprobs is not None:
                    self._score_prompt_chunk(seq, hidden[row, :n])
                seq.num_cached += n
                if not seq.in_prefill:
                    rows.append(hidden[row, n - 1])
                    ready.append(seq)
        if batch.decode:
            decode = sorted(batch.decode, key=lambda s: s.slot)  # consecutive slots read the cache as views
            rows += list(self._decode(decode)[:, -1])
            ready += decode
        if ready:
            logits = self.model.logits(torch.stack(rows))  # [N, V]
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

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence, in one forward; hidden states [B, 1, D]."""
        tokens = torch.tensor([[s.last_token] for s in seqs])
        ends = [s.num_tokens for s in seqs]
        positions = torch.tensor(ends).unsqueeze(1) - 1
        slot_ids = [s.slot for s in seqs]
        first = slot_ids[0] if slot_ids == list(range(slot_ids[0], slot_ids[0] + len(seqs))) else None
        bias = self._router_bias([(s, 1) for s in seqs])
        batch = Batch(tokens, positions, torch.tensor(slot_ids), bias, alpha=self._alpha(seqs), key_len=max(ends), first_slot=first)
        hidden = self.model(batch, self.cache)
        for seq in seqs:
            seq.num_cached += 1
        return hidden

    def _prefill(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One forward for every prompt chunk of the step, right-padded: weights are read once."""
        lengths = torch.tensor([n for _, n in chunks])
        width = max(n for _, n in chunks)
        tokens = torch.zeros(len(chunks), width, dtype=torch.long)
        positions = torch.empty(len(chunks), width, dtype=torch.long)
        for row, (seq, n) in enumerate(chunks):
            tokens[row, :n] = torch.tensor(seq.prompt_ids[seq.num_cached:seq.num_cached + n])
            offsets = torch.arange(width).clamp_max(n - 1)  # padding repeats the last real position
            positions[row] = seq.num_cached + offsets
        slots = torch.tensor([seq.slot for seq, _ in chunks])
        alpha = self._alpha([seq for seq, _ in chunks])
        key_len = max(seq.num_cached + n for seq, n in chunks)
        batch = Batch(tokens, positions, slots, self._router_bias(chunks), lengths, alpha, key_len=key_len)
        return self.model(batch, self.cache)

    def _score_prompt_chunk(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that this prefill chunk's positions predict (hidden [n, D])."""
        start = seq.num_cached
        targets = seq.prompt_ids[start + 1:start + 1 + hidden.shape[0]]  # the last prompt position predicts the output
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]  # nothing predicts the first token
        if targets:
            logprobs = torch.log_softmax(self.model.logits(hidden[:len(targets)]), dim=-1)  # [m, V]
            top = seq.params.prompt_logprobs
            seq.prompt_logprobs += [self._logprob(t, lp, top) for t, lp in zip(targets, logprobs)]

    def _route_admitted(self) -> None:
        """Mixture routing: newly admitted requests' prompts, routed in one batch before their first
        chunk. Scoring a prompt runs every expert over it, so a step routes prompts of at most
        max_prefill_tokens tokens in all (at least one prompt), as prefill is bounded: a burst of
        long prompts cannot stall every engine on the executor thread for one huge step."""
        new, tokens = [], 0
        for seq in self.scheduler.running:
            if seq.alpha is None and (not new or tokens + len(seq.prompt_ids) <= self.config.max_prefill_tokens):
                new.append(seq)
                tokens += len(seq.prompt_ids)
        if not new:
            return
        bias = self._bias_rows(new)  # [N, E] or None
        alpha = self.mixture_router.weights([seq.prompt_ids for seq in new], bias)  # [N, E]
        for seq, a in zip(new, alpha):
            seq.alpha = a
        self.expert_requests += (alpha > 0).sum(0)

    def _router_bias(self, rows: list[tuple[Sequence, int]]) -> torch.Tensor | None:
        """Token routing: the router bias of every real token of the batch, [tokens, E], row after row;
        None when no request in it has one (the common path adds nothing)."""
        if self.mixture_router is not None:
            return None  # applied once, at admission
        bias = self._bias_rows([seq for seq, _ in rows])  # [B, E]
        return None if bias is None else bias.repeat_interleave(torch.tensor([n for _, n in rows]), dim=0)

    def _bias_rows(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Each request's router_bias, [B, E] (zeros for a request without one); None when none has one."""
        if all(s.params.router_bias is None for s in seqs):
            return None
        zeros = (0.0,) * self.composed.num_experts
        return torch.tensor([s.params.router_bias or zeros for s in seqs])

    def _alpha(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Per-row expert weights [B, E] under a mixture router; None for token routing."""
        return torch.stack([s.alpha for s in seqs]) if self.mixture_router is not None else None

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        with self._lock:
            items, self._inbox = list(self._inbox), deque()
        for kind, item in items:
            if kind == "add":
                self._admit(item)
            elif (seq := self.scheduler.find(item)) is not None:
                self._finish(seq, "abort")
                outputs.append(self._output(seq, [], []))
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
        seq.detokenizer = Detokenizer(self.tokenizer)
        self.scheduler.add(seq)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        params = [s.params for s in seqs]
        tokens, logprobs = sample(logits, params, [self._generators[s.request_id] for s in seqs])
        outputs = []
        for row, seq in enumerate(seqs):
            token = int(tokens[row])
            seq.output_ids.append(token)
            lp = [self._logprob(token, logprobs[row], seq.params.logprobs)] if logprobs is not None and seq.params.logprobs is not None else []
            reason = self._check_stop(seq, token)
            if reason:
                self._finish(seq, reason)
            out = self._output(seq, [token], lp)
            if len(seq.output_ids) == 1:
                out.prompt_logprobs = seq.prompt_logprobs
            outputs.append(out)
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        stopped_by_token = (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
        if not stopped_by_token:
            seq.text += seq.detokenizer.add(token)
        if p.stop:
            hits = [i for s in p.stop if (i := seq.text.find(s, max(0, seq.emitted - len(s)))) >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                return "stop"
        if stopped_by_token:
            return "stop"
        max_len = seq.group.max_len if seq.group is not None else self.max_model_len
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= max_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.group is not None:
            seq.group.ended = True  # the lead is done, or a member failed: the others leave at their next step
        if (moved := self.scheduler.finish(seq, reason)) is not None:
            other, old_slot = moved
            self.cache.move(old_slot, other.slot, other.num_cached)
        self._generators.pop(seq.request_id, None)

    def _output(self, seq: Sequence, new_ids: list[int], logprobs: list[TokenLogprob]) -> RequestOutput:
        end = len(seq.text)
        if seq.finish_reason is None:
            # Hold back text that may still turn out to be the start of a stop string,
            # and a trailing partial UTF-8 character.
            end -= max((len(s) - 1 for s in seq.params.stop), default=0)
            while end > seq.emitted and seq.text[end - 1] == "\ufffd":
                end -= 1
        new_text = seq.text[seq.emitted:max(end, seq.emitted)]
        seq.emitted += len(new_text)
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, new_text=new_text, logprobs=logprobs,
            finished=seq.finish_reason is not None, finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
        )

    def _logprob(self, token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
        alts = torch.topk(logprobs, top) if top > 0 else None
        return TokenLogprob(
            token_id=token, token=self.tokenizer.decode([token]), logprob=float(logprobs[token]),
            top=tuple(
                (int(i), self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(alts.values, alts.indices)
            ) if alts is not None else (),
        )

    # --- offline helpers -----------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of every position of one sequence, [T, V], without touching the cache."""
        positions = torch.arange(len(token_ids)).unsqueeze(0)
        alpha = self.mixture_router.weights([token_ids]) if self.mixture_router else None
        hidden = self.model(Batch(torch.tensor([token_ids]), positions, None, alpha=alpha))
        return self.model.logits(hidden)[0]

    @torch.inference_mode()
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
        out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
        for group in padded_groups([len(s) for s in sequences], max_batch_tokens):
            chunk = [sequences[i] for i in group]
            alpha = self.mixture_router.weights([s[:route_tokens] for s in chunk]) if self.mixture_router else None
            batch = Batch.right_padded(chunk, alpha=alpha)
            hidden = self.model(batch)  # [B, T, D]
            for row, i in enumerate(group):
                n = len(sequences[i])
                logprobs = torch.log_softmax(self.model.logits(hidden[row, : n - 1]), dim=-1)  # [n-1, V]
                out[i] = logprobs.gather(1, batch.tokens[row, 1:n].unsqueeze(1)).squeeze(1)
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion through the continuous-batching loop; output token ids per prompt.
        `params`: one for all, or one per prompt; the engines of mixed requests are stepped too."""
        ids = [f"offline-{i}" for i in range(len(prompts))]
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        for rid, prompt, p in zip(ids, prompts, per_prompt):
            self.add_request(rid, prompt, p)
        engines = list(dict.fromkeys([self, *(e for p in per_prompt if p.mix for e in p.mix.engines)]))
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(e.has_work() for e in engines):
            for engine in engines:
                outputs = engine.step() if engine.has_work() else []
                for _, error in engine.take_refused():
                    raise error
                for out in outputs if engine is self else ():  # followers emit nothing
                    results[out.request_id] += out.new_token_ids
        return [results[rid] for rid in ids]


def _eos_ids(composed: ComposedModel) -> set[int]:
    ids = composed.config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if composed.tokenizer.eos_token_id is not None:
        ids.add(composed.tokenizer.eos_token_id)
    return ids
