"""The step as compiled graphs: inductor's CPU backend, one decode graph per batch-size bucket and
one prefill graph over any prompt chunks.

Measured (DESIGN.md, and here on an AMX Xeon: 30 SmolLM2-sized layers at one row, 14 ms against
28 ms for inductor's ATen GEMMs and 32 ms eager): inductor's C++ micro-GEMM over frozen weights
reads a decode step's weights faster than oneDNN at few rows, and inductor fuses the small ops
between the matmuls. So the compiled step is the engine's own Transformer, rebuilt over the same
tensors without oneDNN's packed copies, its tensors nn.Parameters (which dynamo freezes into the
graph as constants: what the C++ GEMM needs), and its GEMMs the C++ template alone: max-autotune's
own choice between it and ATen times the kernels with the weights in cache and picked ATen,
the slower with weights read from memory as a decode step reads them.

- Batch sizes are padded to buckets (1, 2, 4, 8, ...), as CUDA graphs are captured: a padding
  row has slot -1, attends nothing and is cut from the result; its picks are not counted.
- A step's prompt chunks run in one graph whose token dimension is symbolic: they are packed into
  its one row (Batch.packed), so any chunks of 2 tokens or more in all share it, and the
  operators that work row by row (the cache's, separate attention's) unpack them. It takes
  inductor's own GEMMs (oneDNN over packed weights), which autotuning at one length would not
  serve the others better. Measured on the demo composition, one thread: 44 tokens in 68-77 ms
  against 88-97 ms eager, 200 tokens in 197-220 against 243-258.
- The KV cache never enters a graph: attention over it is the `mergeserve::cache_attention`
  operator (kv_cache.py), so the varying key length recompiles nothing.
- Compiling runs on a thread of its own, bucket by bucket and then the prefill graph, while the
  engine serves eagerly; each serves compiled once it is built. Nothing compiles on the serving thread:
  it calls the graphs under dynamo's `eager_on_recompile` stance, which runs cached graphs whose
  guards pass and anything else eagerly (a request with a router bias, for one). The stance is
  process-wide, so a step serves eagerly while any engine compiles.
- Inductor's caches live in `cache_dir`. Of a frozen graph (`freeze`, the default) a restart or
  a replica reuses only the C++ kernels and autotuning, not the graph (torch 2.13 bypasses its FX
  graph cache for graphs holding oneDNN-packed constants, and AOTAutograd's for any frozen
  graph), so a warm start lowers every graph again. Unfrozen, the tensors are graph inputs
  (nothing of the weights in the cache key: one entry serves any composition of those shapes),
  both caches keep the whole graph, and a restart loads it: `cached_graphs` counts them.
  Measured on the demo, 2-core AVX2 EPYC, fp32, one thread, buckets 1 and 8: frozen with
  autotune, 344 s cold and 313 s warm, a step of 46 ms at one row (eager 67); unfrozen, 145 s
  cold and 14 s warm, 61 ms. Unfrozen, the demo's whole set (buckets 1, 8, 16 and the prefill,
  2 threads): 277 s cold, 34 s warm. A failure logs its reason and the engine stays eager.
- Pieces whose shapes follow the data (dense experts grouped by expert, separate attention)
  would break the graph inside the layer loop: they are opaque operators over the eager model's
  own pieces (opaque_ops.py), and everything around them compiles. A mixture router over MoE
  FFNs picks every expert, the unchosen at weight 0 (mixture_layers.fixed_routing).
- An int8 composition's graph runs int8 weights (kernels/int8.Int8Graph: the copies shared with
  the eager model). A base engine's graph is base_model.BaseGraph: its projections and FFNs
  are operators over the step's tables, since the compositions a step mixes change every step.
- What a graph buys depends on the CPU. On a 2-core AVX2-only EPYC (fp32 or int8, no oneDNN
  packing, autotune off) the demo's compiled and eager steps measured alike at 1 and 8 rows,
  and a base engine's two compositions too: there the step is its GEMMs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.layers import Batch, unpack

log = logging.getLogger(__name__)

# Compiles share dynamo's caches and stance, which are process-wide: one at a time, and the
# serving thread calls a compiled graph only while no compile runs.
_COMPILE_LOCK = threading.Lock()


def buckets_for(max_num_seqs: int) -> list[int]:
    """Powers of two up to the first that holds max_num_seqs."""
    sizes = [1]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] * 2)
    return sizes


@contextlib.contextmanager
def inductor_settings(cache_dir: str | None, autotune: bool, freeze: bool = True) -> Iterator[None]:
    """The settings of a compile, made on the thread that compiles (inductor's and dynamo's configs
    are per thread). The cache folder is an environment variable, read by inductor whenever it
    opens its caches: set for the compile (they hold _COMPILE_LOCK), then put back."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    inductor_config.freezing = freeze  # the composition's tensors become constants: what the C++ GEMM needs
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True  # with the FX cache, the whole graph of an unfrozen compile
    # The thread's settings stay from its last compile otherwise; the C++ GEMM takes constant weights only.
    inductor_config.max_autotune = autotune and freeze
    if autotune and freeze:
        inductor_config.max_autotune_gemm_backends = "CPP"
    # Graphs per code object: engines x buckets x the resumes after graph breaks.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 512)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


@dataclass
class CompileState:
    """What the admin API shows of a compiled step."""

    status: str = "pending"  # pending, compiling, ready, failed
    buckets: list[int] = field(default_factory=list)  # batch sizes to compile
    ready: dict[int, float] = field(default_factory=dict)  # compiled buckets and the seconds each took
    prefill: bool = False  # whether the prefill graph is to be compiled
    prefill_seconds: float | None = None  # what it took, once ready
    error: str | None = None
    seconds: float | None = None  # from start to the last graph
    compiled_steps: int = 0  # decode steps served by a compiled graph
    eager_steps: int = 0  # decode steps served eagerly: past every ready bucket, during a compile, or unguarded
    compiled_prefills: int = 0  # prefill steps served by the prefill graph
    eager_prefills: int = 0  # prefill steps served eagerly (before it is ready, during a compile, unguarded)
    cached_graphs: int = 0  # graphs loaded whole from inductor's cache (unfrozen graphs, a warm cache_dir)

    def describe(self) -> dict:
        prefill = None
        if self.prefill:
            prefill = {"ready": self.prefill_seconds is not None, "seconds": _rounded(self.prefill_seconds),
                       "compiled_steps": self.compiled_prefills, "eager_steps": self.eager_prefills}
        return {"status": self.status, "buckets": self.buckets, "ready_buckets": sorted(self.ready),
                "bucket_seconds": {str(b): round(s, 2) for b, s in sorted(self.ready.items())},
                "seconds": self.seconds, "error": self.error,
                "compiled_steps": self.compiled_steps, "eager_steps": self.eager_steps, "prefill": prefill,
                "cached_graphs": self.cached_graphs}


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


class CompiledStep:
    """A model's decode forward compiled per bucket, and its prefill forward, in the background;
    `decode` and `prefill` run a ready graph or say there is none."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, buckets: list[int], alpha_experts: int | None,
                 count: Callable[[Batch, int | None], None], cache_dir: str | None = None, autotune: bool = True,
                 prefill: bool = True, freeze: bool = True) -> None:
        """model: the forward to compile (over plain tensors); alpha_experts: E for a mixture-routed
        model (its batches carry alpha [B, E]), else None; count(batch, rows): the router
        statistics of a forward's first `rows` real rows."""
        self.model = model.eval()
        self.cache = cache
        self.alpha_experts = alpha_experts
        self.cache_dir, self.autotune, self.freeze = cache_dir, autotune, freeze
        self.count = count
        self.state = CompileState(buckets=sorted(buckets), prefill=prefill)
        self._decode = torch.compile(self.model, dynamic=False)  # the module: its tensors are frozen, its inputs not
        self._prefill = torch.compile(self.model)  # the chunk length marked dynamic (warm_up_batch)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._compile_all, name="mergeserve-compile", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compiling ended (tests, benchmarks); whether every graph is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state.status == "ready"

    def decode(self, batch: Batch) -> torch.Tensor | None:
        """Hidden states [B, 1, D] of a decode batch through the smallest ready bucket that holds
        it; None when none does (the caller runs it eagerly)."""
        rows = batch.tokens.shape[0]
        bucket = next((b for b in sorted(self.state.ready) if b >= rows), None)
        hidden, compiled = self._run(self._decode, pad(batch, bucket), rows) if bucket is not None else (None, False)
        self.state.compiled_steps += compiled
        self.state.eager_steps += not compiled
        return None if hidden is None else hidden[:rows]

    def prefill(self, batch: Batch) -> torch.Tensor | None:
        """Hidden states [B, T, D] of a step's prompt chunks (right-padded rows, 2 tokens or more in
        all) through the prefill graph, packed into one row (Batch.packed); None when it is not
        ready (the caller runs it eagerly)."""
        ready = self.state.prefill_seconds is not None
        hidden, compiled = self._run(self._prefill, batch.packed(), None, batch) if ready else (None, False)
        self.state.compiled_prefills += compiled
        self.state.eager_prefills += not compiled
        if hidden is None:
            return None
        real = batch.real()
        return hidden.view(*batch.tokens.shape, -1) if real is None else unpack(hidden[0], real)

    def _run(self, graph: Callable, batch: Batch, rows: int | None, counted: Batch | None = None) -> tuple[torch.Tensor | None, bool]:
        """`graph` over `batch`, whose first `rows` rows are real (None: all): the hidden states
        (None while a compile holds dynamo) and whether they came from a compiled graph (a batch
        whose guards fail runs eagerly, with the same result). The router statistics count the
        step as `counted` (a packed prefill's rows) or `batch`."""
        if not _COMPILE_LOCK.acquire(blocking=False):  # a compile is running: dynamo's stance is not ours to set
            return None, False
        try:
            before = self.model.eager_forwards
            with torch.compiler.set_stance("eager_on_recompile"):  # a graph whose guards fail runs eagerly, never compiles
                hidden = graph(batch, self.cache)
        finally:
            _COMPILE_LOCK.release()
        self.count(counted or batch, rows)
        return hidden, self.model.eager_forwards == before

    def _compile_all(self) -> None:
        start = time.perf_counter()
        self.state.status = "compiling"
        try:
            with torch.inference_mode():  # warm-ups of inference tensors, as served batches are: the guards check it
                self._compile_graphs()
        except Exception as e:  # noqa: BLE001 - any failure leaves the engine serving eagerly
            self.state.status, self.state.error = "failed", f"{type(e).__name__}: {e}"
            log.warning("compiling the step failed; the engine stays eager: %s", self.state.error, exc_info=True)
            return
        finally:
            self.state.seconds = time.perf_counter() - start
        self.state.status = "ready"

    def _compile_graphs(self) -> None:
        for bucket in self.state.buckets:
            self.state.ready[bucket] = self._compile(self._decode, warm_up_batch(bucket, self.alpha_experts), self.autotune)
            log.info("compiled decode step: batch bucket %d in %.1f s", bucket, self.state.ready[bucket])
        if self.state.prefill:
            # Inductor's own GEMMs: the C++ template autotuned at one chunk length serves no other.
            self.state.prefill_seconds = self._compile(self._prefill, warm_up_batch(1, self.alpha_experts, PREFILL_WARM_UP), False)
            log.info("compiled prefill step in %.1f s", self.state.prefill_seconds)

    def _compile(self, graph: Callable, batch: Batch, autotune: bool) -> float:
        """Compile `graph` on `batch` (padding rows only: it writes nothing); the seconds it took."""
        t0 = time.perf_counter()
        with _COMPILE_LOCK, inductor_settings(self.cache_dir, autotune, self.freeze):
            before, hits = self.model.eager_forwards, _cache_hits()
            graph(batch, self.cache)
            self.model._picks = []  # the warm-up's picks are not traffic
            self.state.cached_graphs += _cache_hits() - hits  # one compile at a time: the counter's change is ours
        if self.model.eager_forwards != before:  # dynamo skipped the frame and ran it eagerly
            raise RuntimeError(f"a warm-up of {tuple(batch.tokens.shape)} tokens ran eagerly: dynamo compiled no graph for it")
        return time.perf_counter() - t0


def _cache_hits() -> int:
    """Graphs inductor has loaded from its FX graph cache in this process (dynamo's counters)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"]


def as_parameters(x: Any, seen: dict[int, torch.nn.Parameter] | None = None) -> Any:
    """x with every tensor in it (through dataclasses and lists, copied) an nn.Parameter over the
    same storage: under freezing, dynamo makes Parameters constants of the graph, where it would
    pass other tensors in as inputs (and inductor's C++ GEMM needs constant weights)."""
    seen = {} if seen is None else seen
    if isinstance(x, torch.nn.Parameter):
        return x
    if isinstance(x, torch.Tensor):
        if id(x) not in seen:
            # A view that starts inside its storage is copied: frozen into a graph with inductor's
            # C++ GEMM, such a view was read from the storage's start (wrong logits, measured).
            own = x if x.storage_offset() == 0 and x.is_contiguous() else x.contiguous().clone()
            seen[id(x)] = torch.nn.Parameter(own, requires_grad=False)
        return seen[id(x)]
    if isinstance(x, list):
        return [as_parameters(v, seen) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        y = copy.copy(x)
        for f in dataclasses.fields(x):
            if not isinstance(getattr(type(x), f.name, None), property):  # a property over the field: left as it is
                object.__setattr__(y, f.name, as_parameters(getattr(x, f.name), seen))
        return y
    return x


# The chunk length the prefill graph is traced at (any length from 2 up runs in it).
PREFILL_WARM_UP = 16


def warm_up_batch(rows: int, alpha_experts: int | None, tokens: int = 1) -> Batch:
    """A batch of padding rows only: it compiles a graph and writes nothing to the cache. tokens > 1:
    a packed prefill, its length marked dynamic."""
    alpha = None
    if alpha_experts is not None:  # every row on expert 0
        alpha = torch.zeros(rows, alpha_experts)
        alpha[:, 0] = 1.0
    batch = Batch(torch.zeros(rows, tokens, dtype=torch.long), torch.zeros(rows, tokens, dtype=torch.long),
                  torch.full((rows,), -1), alpha=alpha, cache_operator=True)
    if tokens > 1:  # a packed prefill of one chunk (Batch.packed)
        batch = batch.packed()
        for t in (batch.tokens, batch.positions, batch.chunk_ids):
            torch._dynamo.mark_dynamic(t, 1)
        for t in (batch.slots, batch.alpha):  # per token
            if t is not None:
                torch._dynamo.mark_dynamic(t, 0)
    return batch


def pad(batch: Batch, rows: int) -> Batch:
    """`batch` with padding rows (slot -1) up to `rows`; the bucket's graph was compiled on this layout."""
    extra = rows - batch.tokens.shape[0]
    zeros = torch.zeros(extra, 1, dtype=torch.long)
    alpha = None
    if batch.alpha is not None:
        alpha = torch.cat([batch.alpha, warm_up_batch(extra, batch.alpha.shape[1]).alpha.to(batch.alpha.dtype)])
    bias = None
    if batch.router_bias is not None:
        bias = torch.cat([batch.router_bias, batch.router_bias.new_zeros(extra, batch.router_bias.shape[1])])
    return Batch(torch.cat([batch.tokens, zeros]), torch.cat([batch.positions, zeros]),
                 torch.cat([batch.slots, torch.full((extra,), -1)]), bias, alpha=alpha, cache_operator=True)
