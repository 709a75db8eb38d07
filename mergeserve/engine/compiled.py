"""The decode step as compiled graphs: inductor's CPU backend, one graph per batch-size bucket.

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
- The KV cache never enters a graph: attention over it is the `mergeserve::cache_attention`
  operator (kv_cache.py), so the varying key length recompiles nothing.
- Compiling runs on a thread of its own, bucket by bucket, while the engine serves eagerly;
  a bucket serves compiled once it is built. Nothing compiles on the serving thread:
  it calls the graphs under dynamo's `eager_on_recompile` stance, which runs cached graphs whose
  guards pass and anything else eagerly (a request with a router bias, for one). The stance is
  process-wide, so a step serves eagerly while any engine compiles.
- Inductor's caches (FX graphs, autotuning) live in `cache_dir`, so a restart or a replica
  reuses the compiled artifacts. A failure logs its reason and the engine stays eager.
- Forwards whose shapes follow the data (dense experts grouped by expert, separate attention)
  would break the graph inside the layer loop: they are refused up front (model_runner.graph_break).
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
from mergeserve.engine.layers import Batch

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
def inductor_settings(cache_dir: str | None, autotune: bool) -> Iterator[None]:
    """The settings of a compile, made on the thread that compiles (inductor's and dynamo's configs
    are per thread). The cache folder is an environment variable, read by inductor whenever it
    opens its caches: set for the compile (they hold _COMPILE_LOCK), then put back."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    inductor_config.freezing = True  # the composition's tensors become constants: what the C++ GEMM needs
    inductor_config.fx_graph_cache = True
    if autotune:
        inductor_config.max_autotune = True
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
    error: str | None = None
    seconds: float | None = None  # from start to the last bucket
    compiled_steps: int = 0  # decode steps served by a compiled graph
    eager_steps: int = 0  # decode steps served eagerly: past every ready bucket, during a compile, or unguarded

    def describe(self) -> dict:
        return {"status": self.status, "buckets": self.buckets, "ready_buckets": sorted(self.ready),
                "bucket_seconds": {str(b): round(s, 2) for b, s in sorted(self.ready.items())},
                "seconds": self.seconds, "error": self.error,
                "compiled_steps": self.compiled_steps, "eager_steps": self.eager_steps}


class CompiledDecode:
    """A model's decode forward compiled per bucket in the background; `decode` runs a ready one."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, buckets: list[int], alpha_experts: int | None,
                 count: Callable[[Batch, int], None], cache_dir: str | None = None, autotune: bool = True) -> None:
        """model: the forward to compile (over plain tensors); alpha_experts: E for a mixture-routed
        model (its batches carry alpha [B, E]), else None; count(batch, rows): the router
        statistics of a forward's first `rows` real rows."""
        self.model = model.eval()
        self.cache = cache
        self.alpha_experts = alpha_experts
        self.cache_dir, self.autotune = cache_dir, autotune
        self.count = count
        self.state = CompileState(buckets=sorted(buckets))
        self._compiled = torch.compile(self.model, dynamic=False)  # the module: its tensors are frozen, its inputs not
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._compile_all, name="mergeserve-compile", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compiling ended (tests, benchmarks); whether every bucket is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state.status == "ready"

    def decode(self, batch: Batch) -> torch.Tensor | None:
        """Hidden states [B, 1, D] of a decode batch through the smallest ready bucket that holds
        it; None when none does (the caller runs it eagerly)."""
        rows = batch.tokens.shape[0]
        bucket = next((b for b in sorted(self.state.ready) if b >= rows), None)
        if bucket is None:
            self.state.eager_steps += 1
            return None
        if not _COMPILE_LOCK.acquire(blocking=False):  # a compile is running: dynamo's stance is not ours to set
            self.state.eager_steps += 1
            return None
        try:
            padded, before = pad(batch, bucket), self.model.eager_forwards
            with torch.compiler.set_stance("eager_on_recompile"):  # a graph whose guards fail runs eagerly, never compiles
                hidden = self._compiled(padded, self.cache)
        finally:
            _COMPILE_LOCK.release()
        self.count(padded, rows)
        if self.model.eager_forwards == before:  # it ran in the compiled graph
            self.state.compiled_steps += 1
        else:
            self.state.eager_steps += 1
        return hidden[:rows]

    def _compile_all(self) -> None:
        start = time.perf_counter()
        self.state.status = "compiling"
        try:
            for bucket in self.state.buckets:
                t0 = time.perf_counter()
                with _COMPILE_LOCK, torch.inference_mode(), inductor_settings(self.cache_dir, self.autotune):
                    before = self.model.eager_forwards
                    self._compiled(warm_up_batch(bucket, self.alpha_experts), self.cache)
                    self.model._picks = []  # the warm-up's picks are not traffic
                if self.model.eager_forwards != before:  # dynamo skipped the frame and ran it eagerly
                    raise RuntimeError(f"bucket {bucket} ran eagerly when compiled: dynamo compiled no graph for it")
                self.state.ready[bucket] = time.perf_counter() - t0
                log.info("compiled decode step: batch bucket %d in %.1f s", bucket, self.state.ready[bucket])
        except Exception as e:  # noqa: BLE001 - any failure leaves the engine serving eagerly
            self.state.status, self.state.error = "failed", f"{type(e).__name__}: {e}"
            log.warning("compiling the decode step failed; the engine stays eager: %s", self.state.error, exc_info=True)
            return
        finally:
            self.state.seconds = time.perf_counter() - start
        self.state.status = "ready"


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


def warm_up_batch(rows: int, alpha_experts: int | None) -> Batch:
    """A decode batch of padding rows only: it compiles the bucket and writes nothing to the cache."""
    alpha = None
    if alpha_experts is not None:  # every row on expert 0
        alpha = torch.zeros(rows, alpha_experts)
        alpha[:, 0] = 1.0
    return Batch(torch.zeros(rows, 1, dtype=torch.long), torch.zeros(rows, 1, dtype=torch.long),
                 torch.full((rows,), -1), alpha=alpha, cache_operator=True)


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
