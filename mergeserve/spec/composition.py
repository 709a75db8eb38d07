"""A composition spec: which experts, which method merges or routes them, and what serves the result."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationInfo, field_validator, model_validator

from mergeserve.spec.base import NAME_PATTERN, Strict, refuse_moved
from mergeserve.spec.merge import MERGEME_MODELS, MODELS, DenseMerge, MergemeMerge
from mergeserve.spec.router import (CentroidRouterSpec, ExpertRouter, HiddenRouterSpec, KeywordsRouterSpec, MixtureRouterSpec,
                                        ModelRouter, REQUEST_KINDS, ROUTERS, RequestCentroidRouterSpec)
from mergeserve.spec.transport import BackendKind, Upstream, VLLMOptions

# btx: MoE, FFNs kept as experts, the rest averaged; mergeme: MoE, the rest merged as `merge` says
# (TIES by default); any task-vector method: one dense merged model; route: every expert a whole
# model (any family, size or tokenizer) in its own engine, each request routed to one; hetero:
# MergeME's heterogeneous merge, route's whole models (any family or size, one vocabulary) sharing
# one averaged embedding and head through per-member projectors (merge/hetero.py).
Method = Literal["route", "hetero", "btx", "mergeme", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp",
                 "consensus", "fisher"]
MOE_METHODS = ("btx", "mergeme")
REQUEST_METHODS = ("route", "hetero")  # whole member models, one chosen per request by a request router
AnyMerge = Union[tuple(dict.fromkeys([*MERGEME_MODELS.values(), *MODELS.values()]))]
AnyRouter = Union[ROUTERS]
_DENSE, _MERGEME = TypeAdapter(DenseMerge), TypeAdapter(MergemeMerge)
_EXPERT_ROUTER, _MODEL_ROUTER = TypeAdapter(ExpertRouter), TypeAdapter(ModelRouter)

# Fields that moved into a section of their own: a spec naming the old place is told the new one.
MOVED = {"url": "upstream.url", "upstream_model": "upstream.model", "api_key_env": "upstream.api_key_env",
         "timeout_s": "upstream.timeout_s (backend openai) or vllm.timeout_s (backend vllm)"}


class ExpertSpec(Strict):
    # What requests (`experts`, `expert_bias`), responses' expert shares and metrics call it.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # A checkpoint: a Hugging Face folder, a PEFT adapter folder or a GGUF file; a path relative to
    # the spec's folder, or `pkg://module/file` inside an installed package.
    source: str
    # Source of the base a PEFT adapter applies to; defaults to the composition's base.
    base: str | None = None
    # Texts of this expert's domain; their hidden states initialise its router row.
    prompts: list[str] = []
    # router.kind=hidden: its row is the prompts' mean state minus these texts' (unset: minus the other experts' prompts').
    negative_prompts: list[str] = []
    # Weight in a `linear` merge (normalised over the experts).
    weight: float = Field(1.0, gt=0)
    # method=route, router.kind=keywords: words or phrases whose presence in a request sends it here.
    keywords: list[str] = []


def _method_built(info: ValidationInfo) -> str | None:
    """The method whose merge and router sections are being read; None for a remote spec (nothing
    is built) or when the method itself was invalid (its error says so)."""
    return None if info.data.get("backend") == "openai" else info.data.get("method")


class CompositionSpec(Strict):
    # The model name clients ask for; also its admin URL (/admin/compositions/{name}) and metric label.
    name: str = Field(pattern=NAME_PATTERN.pattern, max_length=128)
    # What serves it: local (this process's engine), vllm (its export in a vLLM child process),
    # openai (an OpenAI-compatible server already running at upstream.url).
    backend: BackendKind = "local"
    vllm: VLLMOptions | None = None  # backend vllm only
    upstream: Upstream | None = None  # backend openai only: then no base, experts or method
    base: str | None = None  # required unless backend openai or method route
    # The checkpoints composed (at least one; none for backend openai), or a YAML file holding the list.
    experts: list[ExpertSpec] = Field([], max_length=256)
    # btx, mergeme: an MoE of the experts' FFNs; linear ... fisher: one dense merged model; route:
    # each request to one whole member model; hetero: MergeME's merge of whole models of other shapes.
    method: Method = "btx"
    # The task-vector merge: of every tensor (a dense method, whose own parameters these are) or of
    # the shared layers (mergeme). btx and route take none.
    merge: AnyMerge | None = Field(None, validate_default=True)
    # btx, mergeme: a token or mixture router; route: a request router. Unset: the family's default.
    router: AnyRouter | None = Field(None, validate_default=True)
    # Refuse a LoRA adapter whose adapter_config.json names another base than the one it is applied
    # to (false: log a warning; shapes alone cannot tell two bases of one architecture apart).
    strict_base: bool = False
    # Compute and storage dtype of the composition's weights: float32, bfloat16, int8 (bf16 weights
    # run as int8 with per-channel scales: kernels/int8.py), or auto (the fastest here, by CPU flags
    # and a short measurement at start). Unset: the serve config's.
    dtype: Literal["auto", "float32", "bfloat16", "int8"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        refuse_moved(data, MOVED)
        return data

    @field_validator("merge", mode="wrap")
    @classmethod
    def _merge(cls, v: Any, handler: Any, info: ValidationInfo) -> Any:
        if (method := _method_built(info)) is None:
            return handler(v)
        if method in ("btx", *REQUEST_METHODS):
            if v is not None:
                raise ValueError("btx averages the shared layers; use method=mergeme to merge them otherwise" if method == "btx"
                                 else f"method={method} merges no layers: give no merge section")
            return None
        if method == "mergeme":
            return _MERGEME.validate_python({} if v is None else v)
        given = {} if v is None else v
        if isinstance(given, dict):
            if given.get("method", method) != method:
                raise ValueError(f"merge.method={given['method']} contradicts method={method}")
            given = {**given, "method": method}
        return _DENSE.validate_python(given)

    @field_validator("router", mode="wrap")
    @classmethod
    def _router(cls, v: Any, handler: Any, info: ValidationInfo) -> Any:
        if (method := _method_built(info)) is None:
            return handler(v)
        if method in REQUEST_METHODS:
            kind = v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)
            if kind not in REQUEST_KINDS:
                raise ValueError(f"router.kind={kind} is not a request router; method={method} takes {', '.join(REQUEST_KINDS)}")
            return _MODEL_ROUTER.validate_python(v)
        if isinstance(v, dict) and v.get("kind") == "keywords":
            raise ValueError("router.kind=keywords routes whole requests between whole models: it needs method=route")
        return _EXPERT_ROUTER.validate_python({} if v is None else v)

    @model_validator(mode="after")
    def _check(self) -> CompositionSpec:
        self._check_backend()
        if self.backend == "openai":
            return self
        names = [e.name for e in self.experts]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"expert names must be unique, repeated: {dupes}")
        if (self.routes_requests or len(self.experts) > 1) and self.router.top_k > len(self.experts):
            raise ValueError(f"router.top_k={self.router.top_k} exceeds the {len(self.experts)} experts")
        if self.routes_requests:
            self._check_route()
            return self
        if self.is_moe and isinstance(self.router, (HiddenRouterSpec, CentroidRouterSpec)) and len(self.experts) > 1:
            if missing := [e.name for e in self.experts if not e.prompts]:
                raise ValueError(f"router.kind={self.router.kind} needs prompts for every expert; none for {missing}")
        if (unknown := sorted(set(getattr(self.router, "offsets", None) or {}) - set(names))):
            raise ValueError(f"router.offsets names {unknown}, not experts of this composition ({names})")
        if self.merge is not None and self.merge.method == "slerp" and len(self.experts) != 2:
            raise ValueError(f"slerp merges exactly two experts, got {len(self.experts)}")
        return self

    def _check_backend(self) -> None:
        remote = self.backend == "openai"
        if remote != (self.upstream is not None):
            raise ValueError("upstream (url, model, api_key_env, timeout_s) is required for backend=openai and only used by it")
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError("the vllm section applies to backend=vllm only")
        if remote and (self.base is not None or self.experts):
            raise ValueError("backend=openai serves a remote model: give no base or experts")
        if not remote and self.base is None and not self.routes_requests:
            raise ValueError(f"base: required (backend={self.backend})")
        if not remote and not self.experts:
            raise ValueError(f"experts: give at least one (backend={self.backend})")

    def _check_route(self) -> None:
        router, names, method = self.router, [e.name for e in self.experts], self.method
        if self.backend != "local":
            raise ValueError(f"method={method} runs each member in its own local engine; backend={self.backend} does not")
        if self.base is not None:
            raise ValueError(f"method={method} composes whole models: give no base (each expert's source is a complete "
                             "checkpoint, or a LoRA adapter with a base of its own)")
        needs = {RequestCentroidRouterSpec: "prompts", KeywordsRouterSpec: "keywords"}.get(type(router))
        if needs and (missing := [e.name for e in self.experts if not getattr(e, needs)]):
            raise ValueError(f"router.kind={router.kind} needs {needs} for every expert; none for {missing}")
        encoder = getattr(router, "encoder", None)
        if encoder is not None and encoder not in names:
            raise ValueError(f"router.encoder={encoder!r} is not one of the experts {names}")

    @property
    def routes_requests(self) -> bool:
        """Whole member models, one engine each, a request router choosing (route, hetero)."""
        return self.method in REQUEST_METHODS

    def member(self, expert: ExpertSpec) -> CompositionSpec:
        """method=route or hetero: the composition that serves one member alone (its own engine): a whole
        checkpoint, or a LoRA adapter over the member's own `base`."""
        return CompositionSpec(name=f"{self.name}.{expert.name}", base=expert.base or expert.source, dtype=self.dtype,
                               experts=[ExpertSpec(name=expert.name, source=expert.source)])

    @property
    def timeout_s(self) -> float:
        """Per request forwarded to a vLLM child or an upstream server."""
        return self.upstream.timeout_s if self.upstream else (self.vllm or VLLMOptions()).timeout_s

    @property
    def source_paths(self) -> list[str]:
        """Every file or folder the spec reads, each once."""
        return list(dict.fromkeys(self.source_fields.values()))

    @property
    def source_fields(self) -> dict[str, str]:
        """Every path field that is set, by its place in the spec (`experts.0.source`): base,
        experts, experts' own bases, router weights, merge coefficients and Fishers. A new path
        field belongs in PATH_FIELDS, or it escapes the source roots check."""
        fields = {"base": self.base} | {f"experts.{i}.{k}": getattr(e, k) for k in ("source", "base") for i, e in enumerate(self.experts)}
        fields |= {f"{section}.{key}": getattr(getattr(self, section), key, None) for section, key in PATH_FIELDS}
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def is_moe(self) -> bool:
        return self.method in MOE_METHODS

    @property
    def mixture_routed(self) -> bool:
        """Whether a mixture router (MergeME's sequence-level routing) picks the experts."""
        return isinstance(self.router, MixtureRouterSpec)


# Path fields inside sections, resolved against the spec's folder and checked against the source roots.
PATH_FIELDS = (("router", "weights"), ("merge", "coefficients"), ("merge", "fisher"))
