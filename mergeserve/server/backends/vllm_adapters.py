"""One vLLM engine per base for every `backend: vllm` composition that is exactly one LoRA over it.

A single adapter, or a linear or task-arithmetic merge of adapters (export/adapter.py), is
written as a PEFT folder in the export cache and loaded into its base's running vLLM child with
`POST /v1/load_lora_adapter`; requests go to it under the adapter's name, and vLLM batches
every adapter of the base in one forward (its punica kernels). The child starts with the first
such composition over its base (LoRA enabled, runtime loading allowed, limits from the serve
config's `vllm_lora`) and stops with the last.

A hot swap loads the new revision's adapter under a name of its own and switches; the old
adapter is unloaded when its revision has drained (the registry frees it then). vLLM never
restarts for a swap. When the child restarts on its own (a crash), its adapters are loaded again
before it counts as ready.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mergeserve.composition import ComposedModel
from mergeserve.export.adapter import adapter_factors, adapter_rank, export_adapter, export_base
from mergeserve.server.backends.process import ManagedServer, child_env, free_port
from mergeserve.server.backends.proxy import ProxyBackend
from mergeserve.server.backends.vllm import EXPORT_DTYPE, argv, options, written_once
from mergeserve.spec import CompositionSpec, VLLMLoRA, VLLMProfile

log = logging.getLogger(__name__)
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
ADMIN_TIMEOUT_S = 120.0  # loading an adapter reads its folder; unloading waits for nothing
BASE_NAME = "base"  # what the child serves the base itself as (requests always name an adapter)


@dataclass(eq=False)
class BaseChild:
    """One base's vLLM child and the adapters loaded into it (name -> folder)."""

    server: ManagedServer
    key: str  # the child's API key
    adapters: dict[str, Path] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # loads and unloads, one at a time

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    def load(self, name: str, folder: Path) -> None:
        with self.lock:
            self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
            self.adapters[name] = folder

    def unload(self, name: str) -> None:
        with self.lock:
            if self.adapters.pop(name, None) is not None and self.server.ready:
                self._post("/unload_lora_adapter", {"lora_name": name})

    def reload(self) -> None:
        """After a restart: every adapter it held, loaded again (ManagedServer.on_start)."""
        with self.lock:
            for name, folder in self.adapters.items():
                self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})

    def _post(self, path: str, body: dict) -> None:
        response = httpx.post(self.url + path, json=body, timeout=ADMIN_TIMEOUT_S,
                              headers={"Authorization": f"Bearer {self.key}"})
        if response.status_code != 200:
            raise RuntimeError(f"vLLM {path} {body['lora_name']!r} answered {response.status_code}: {response.text[:300]}")


class AdapterEngines:
    """The vLLM children serving one-LoRA compositions, one per base and options (owned by the Builder)."""

    def __init__(self, export_dir: Path, settings: VLLMLoRA, withheld: Collection[str] = ()) -> None:
        """withheld: values kept out of the children's environment (this server's keys)."""
        self.export_dir, self.settings, self.withheld = export_dir, settings, withheld
        self._children: dict[str, BaseChild] = {}  # base_key() -> its child
        self._lock = threading.Lock()  # guards _children; builds run one at a time (Builder's queue)

    def serve(self, spec: CompositionSpec, composed: ComposedModel, profile: VLLMProfile, revision_id: str) -> ProxyBackend:
        """`composed` (revision `revision_id` of `spec`) as an adapter of its base's child, started
        now if none runs. Raises NotOneAdapter when it is not one LoRA over its base, ValueError
        when its rank is past max_lora_rank."""
        factors = adapter_factors(composed)
        name = adapter_name(revision_id)
        folder = self.export_dir / "adapters" / f"{name}-{secrets.token_hex(4)}"  # never an earlier process's
        # Written before any child starts: a rank past the serve config's max_lora_rank is refused here.
        export_adapter(composed, folder, EXPORT_DTYPE[options(spec).dtype], self.settings.max_lora_rank, factors)
        key = base_key(spec, composed.sources[0], profile)
        child = None
        try:
            child = self._child(key, spec, composed, profile)
            child.load(name, folder)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            if child is not None:
                self._stop_if_unused(key, child, wait=False)
            raise
        log.info("%s: adapter %r (rank %d) loaded into vLLM pid %s", spec.name, name, adapter_rank(factors), child.server.pid)
        return ProxyBackend(spec.name, child.url, name, child.key, spec.timeout_s, process=child.server,
                            release=lambda wait: self._release(key, child, name, folder, wait))

    def _child(self, key: str, spec: CompositionSpec, composed: ComposedModel, profile: VLLMProfile) -> BaseChild:
        with self._lock:
            child = self._children.get(key)
        if child is not None:
            if not child.server.ready:
                raise RuntimeError(f"the vLLM engine of this base is {child.server.state} (restarting); retry shortly")
            return child
        dtype = EXPORT_DTYPE[options(spec).dtype]
        model_dir = written_once(self.export_dir / f"base-{key}", lambda out: export_base(composed, out, dtype))
        port, api_key = free_port(), secrets.token_urlsafe(32)
        lora = ["--enable-lora", "--max-loras", str(self.settings.max_loras), "--max-lora-rank", str(self.settings.max_lora_rank)]
        env = child_env(profile.env, self.withheld) | {"VLLM_API_KEY": api_key, RUNTIME_LORA_ENV: "True"}
        o = options(spec)
        server = ManagedServer(f"vLLM base {key}", argv(spec, model_dir, port, profile, BASE_NAME) + lora, port, env=env,
                               api_key=api_key, startup_timeout_s=o.startup_timeout_s, stop_grace_s=o.stop_grace_s)
        child = BaseChild(server, api_key)
        server.on_start = child.reload
        server.start()
        server.wait_ready()
        with self._lock:
            self._children[key] = child
        return child

    def _release(self, key: str, child: BaseChild, name: str, folder: Path, wait: bool) -> None:
        """A revision's adapter is drained: unload it, and stop the child once it holds none."""
        def run() -> None:
            try:
                child.unload(name)
            except Exception as e:  # noqa: BLE001 - the child may be gone; nothing to answer
                log.warning("unloading adapter %r: %s", name, e)
            shutil.rmtree(folder, ignore_errors=True)
            self._stop_if_unused(key, child, wait)

        if wait:
            run()
        else:  # close() runs on the event loop: the HTTP call goes elsewhere
            threading.Thread(target=run, name=f"mergeserve-unload-{name}", daemon=True).start()

    def _stop_if_unused(self, key: str, child: BaseChild, wait: bool) -> None:
        with self._lock:
            if child.adapters or self._children.get(key) is not child:
                return
            del self._children[key]
        log.info("vLLM base %s serves no adapter any more: stopping it", key)
        child.server.stop(wait)


def base_key(spec: CompositionSpec, base_source: str, profile: VLLMProfile) -> str:
    """Which child serves `spec`: its base (path, size, mtime), its vLLM options and its profile."""
    base = Path(base_source)
    stat = base.stat() if base.is_file() else None
    files = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(base.rglob("*")) if f.is_file()] if base.is_dir() else []
    o = options(spec).model_dump(mode="json", exclude={"timeout_s", "startup_timeout_s", "stop_grace_s"})
    text = json.dumps({"base": str(base), "stat": [stat.st_size, stat.st_mtime_ns] if stat else None, "files": files,
                       "options": o, "profile": profile.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def adapter_name(revision_id: str) -> str:
    """The adapter's name in vLLM: the revision's id, in characters any model name may hold."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", revision_id)
