"""ModelRunner: the Transformer, its KV cache and the tensors of each forward.

It turns the scheduler's sequences into a `Batch` (tokens, positions, slots, router bias
rows, mixture weights), runs the model and projects hidden states to logits. It reads
sequences and never changes them: what a step did to a request is the engine's to record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from mergeserve.composition import ComposedModel
from mergeserve.engine.compiled import CompiledStep, as_parameters
from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.layers import Batch, first_of_run, padded_groups
from mergeserve.engine.mixture_router import MixtureRouter
from mergeserve.engine.model import Transformer
from mergeserve.engine.opaque_ops import register as register_eager
from mergeserve.engine.sequence import Sequence
from mergeserve.kernels.int8 import Int8Graph, Int8Packer
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


class ModelRunner:
    def __init__(self, composed: ComposedModel, config: EngineConfig, max_model_len: int, packer: WeightPacker):
        self.num_experts = composed.num_experts
        self.pack = Int8Packer(packer) if composed.int8 else packer
        self.model = Transformer(composed, max_model_len, self.pack)
        args = self.model.args
        self.slots = kv_slots(config, self.model.cache_layers * args.n_kv_heads * args.head_dim * 2 * 4, max_model_len)
        self.cache = KVCache(self.model.cache_layers, self.slots, args.n_kv_heads, args.head_dim, max_model_len,
                             self.model.cache_windows)
        self.mixture_router = MixtureRouter(composed) if composed.mixture_routing is not None else None
        self.compiled: CompiledStep | None = None  # the step compiled (compile)
        self._counted: Transformer = self.model  # the model that counted the last forward (token_routing)

    # --- the step's forwards ---------------------------------------------------------------
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence, in one forward; hidden states [B, 1, D]."""
        tokens = torch.tensor([[s.last_token] for s in seqs])
        ends = [s.num_tokens for s in seqs]
        positions = torch.tensor(ends).unsqueeze(1) - 1
        slot_ids = [s.slot for s in seqs]
        first = first_of_run(slot_ids)
        bias = self._router_bias([(s, 1) for s in seqs])
        batch = Batch(tokens, positions, torch.tensor(slot_ids), bias, alpha=self._alpha(seqs), key_len=max(ends), first_slot=first)
        rows = [(s, 1) for s in seqs]
        if self.compiled is not None and (hidden := self._run_compiled(self.compiled.decode, batch, rows)) is not None:
            return hidden
        return self._forward(batch, rows)

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One forward for every prompt chunk of the step, right-padded: weights are read once; [B, T, D]."""
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
        packs = int(lengths.sum()) > 1  # packed into one row of a length the prefill graph takes
        if packs and self.compiled is not None:
            if (hidden := self._run_compiled(self.compiled.prefill, batch, chunks)) is not None:
                return hidden
        return self._forward(batch, chunks)

    def _forward(self, batch: Batch, rows: list[tuple[Sequence, int]]) -> torch.Tensor:
        """The step's forward over `batch`, whose rows are `rows` (sequence, its real tokens)."""
        self._counted = self.model
        return self.model(batch, self.cache)

    def _run_compiled(self, run: Callable[[Batch], torch.Tensor | None], batch: Batch,
                      rows: list[tuple[Sequence, int]]) -> torch.Tensor | None:
        """A compiled graph's `run` (CompiledStep.decode or prefill) over `batch`; None where none is ready."""
        self._counted = self.compiled.model  # it counts the rows it ran
        return run(batch)

    def token_routing(self) -> torch.Tensor | None:
        """The last forward's token routing: each real token's weight on each expert, summed over
        the MoE layers, [N, E] (row after row); None without token routing."""
        return self._counted.token_routing

    def compile(self, buckets: list[int], cache_dir: str | None = None, autotune: bool = True, prefill: bool = True,
                freeze: bool = True) -> CompiledStep:
        """Compile the decode step per bucket, and the prefill, in the background (compiled.py);
        decode() and prefill() run each graph once it is ready."""
        # The same tensors without oneDNN's packs; an int8 composition's int8 copies (shared with the eager model).
        graph_pack = Int8Graph(self.pack) if isinstance(self.pack, Int8Packer) else None
        plain = Transformer(self.model.composed, self.model.cos.shape[0], graph_pack)
        plain.counts_in_forward = False  # CompiledStep counts the real rows
        # Dense experts and separate attention run as opaque operators over the eager model's own
        # (packed) pieces (opaque_ops.py): the copy's are not frozen into a graph.
        plain.eager_key = register_eager(self.model)
        plain.expert_runs = [None] * len(plain.expert_runs)
        plain.run_layers = [replace(run, ffns=[]) if run.layer.is_moe else run for run in plain.run_layers]
        plain.run_layers, plain.expert_runs, plain.lm_head = as_parameters([plain.run_layers, plain.expert_runs, plain.lm_head])
        plain.expert_load, plain.expert_weight = self.model.expert_load, self.model.expert_weight  # one set of statistics
        alpha = self.num_experts if self.mixture_router is not None else None
        self.compiled = CompiledStep(plain, self.cache, buckets, alpha, plain.count, cache_dir, autotune, prefill, freeze)
        self.compiled.start()
        return self.compiled

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] to logits [..., V]."""
        return self.model.logits(hidden)

    def route(self, seqs: list[Sequence]) -> torch.Tensor:
        """Mixture routing: each request's expert weights from its whole prompt, [N, E]."""
        return self.mixture_router.weights([seq.prompt_ids for seq in seqs], self._bias_rows(seqs),
                                           [seq.params.route_span for seq in seqs])

    def move(self, old_slot: int, new_slot: int, length: int) -> None:
        """A sequence changed slot (the scheduler keeps running slots dense): its cache follows."""
        self.cache.move(old_slot, new_slot, length)

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
        zeros = (0.0,) * self.num_experts
        return torch.tensor([s.params.router_bias or zeros for s in seqs])

    def _alpha(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Per-row expert weights [B, E] under a mixture router; None for token routing."""
        return torch.stack([s.alpha for s in seqs]) if self.mixture_router is not None else None

    # --- offline: whole sequences, the cache untouched ------------------------------------
    @torch.inference_mode()
    def sequence_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of every position of one sequence, [T, V], without touching the cache."""
        positions = torch.arange(len(token_ids)).unsqueeze(0)
        alpha = self.mixture_router.weights([token_ids]) if self.mixture_router else None
        hidden = self.model(Batch(torch.tensor([token_ids]), positions, None, alpha=alpha))
        return self.model.logits(hidden)[0]

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], max_batch_tokens: int, route_tokens: int | None) -> list[torch.Tensor]:
        """Log-probability of every token after the first given those before it, per sequence: [len - 1]
        (Engine.score says how sequences are batched and routed)."""
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
