"""OpenAI request and response objects for /v1/completions and /v1/chat/completions.

Requests ignore fields they do not know (clients send new OpenAI parameters before
servers learn them) but validate the type and range of every field they declare.
Parameters we declare but cannot honour are rejected with 400 rather than ignored.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mergeserve.engine.sequence import SamplingParams
from mergeserve.server.errors import bad_request, clip

if TYPE_CHECKING:
    from mergeserve.engine.engine import Engine

# Bounds on what one request may ask for. Every list is bounded (and checked in linear time), so
# validating a request costs at most a few milliseconds and what it asks of the executor thread
# is known up front; a request past a bound is a 400 naming the field.
MAX_N = 8
MAX_PROMPTS = 256  # prompts of one completion request; prompts x n must also fit the queue (max_waiting)
MAX_PROMPT_TOKEN_IDS = 1 << 17  # token ids of one prompt (a 128K context); max_model_len bounds them further
MAX_STOP = 16  # stop strings: every one is searched for at every generated token (OpenAI takes 4)
MAX_STOP_CHARS = 1024  # characters of one stop string
MAX_MESSAGES = 2048  # messages of one chat
MAX_CONTENT_PARTS = 256  # content parts of one message
MAX_TOOLS = 128  # OpenAI's limit (tools are refused here anyway)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (refused here anyway)
MAX_EXPERTS = 256  # names in experts and expert_bias: a composition has at most 256 experts (spec/composition.py)
MAX_EXPERT_BIAS = 100.0  # like OpenAI's logit_bias range
INT32_MAX = 2**31 - 1  # bound of counts (max_tokens, top_k): past it no engine could honour them anyway
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI's range for seed
MAX_LISTED = 10  # names an error message lists before it says how many more there are

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: object, info: ValidationInfo) -> object:
        """JSON true is not a number: pydantic would read it as 1 (temperature: true -> 1.0)."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and bool not in (annotation, *get_args(annotation)):
            raise ValueError("expected a number or a string, got a boolean")
        return value

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # vLLM extension; -1 and 0 mean off
    # The schema's float bounds round 2**63 - 1 up; the description has them exactly.
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description=f"An int64: {INT64_MIN} to {INT64_MAX}")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"Up to {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters",
    )
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description=f"At most {MAX_LOGIT_BIAS} entries (not supported: only {{}})",
    )
    ignore_eos: bool = False  # vLLM extension: generate max_tokens even past end-of-sequence
    # mergeserve extensions, MoE compositions only: route to these experts only; add to their router logits.
    experts: list[str] | None = Field(
        None, max_length=MAX_EXPERTS, description=f"Route to these experts only (MoE compositions); at most {MAX_EXPERTS}",
    )
    expert_bias: dict[str, float] | None = Field(
        None, max_length=MAX_EXPERTS,
        description=f"Added to these experts' router logits, each in [-{MAX_EXPERT_BIAS:g}, {MAX_EXPERT_BIAS:g}]; at most {MAX_EXPERTS}",
    )

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported; only 0 is accepted", param=name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        if any(s == "" for s in self.stops):
            raise bad_request("stop strings must not be empty", param="stop")

    @property
    def num_sequences(self) -> int:
        """Engine sequences the request runs: what admission and the queue limit count."""
        return self.num_prompts * (self.n or 1)

    @property
    def num_prompts(self) -> int:
        return 1

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def router_bias(self, expert_names: list[str] | None) -> tuple[float, ...] | None:
        """SamplingParams.router_bias [E] from `experts` and `expert_bias`; None when neither asks for one.

        expert_names: the composition's experts (expert_names_of), None for a dense composition.
        """
        if self.experts is None and not self.expert_bias:
            return None
        param = "experts" if self.experts is not None else "expert_bias"
        if expert_names is None:
            raise bad_request(f"{param} needs a mixture of experts; this model is dense (it has no router)", param=param)
        allowed = self._allowed_experts(expert_names)
        bias = self._checked_bias(expert_names, allowed)
        return tuple(bias.get(n, 0.0) if n in allowed else -math.inf for n in expert_names)

    def _allowed_experts(self, expert_names: list[str]) -> set[str]:
        if self.experts is None:
            return set(expert_names)
        if not self.experts:
            raise bad_request("experts must name at least one expert", param="experts")
        _check_known(self.experts, expert_names, "experts")
        repeated = sorted(n for n, count in Counter(self.experts).items() if count > 1)
        if repeated:
            raise bad_request(f"experts must not repeat a name: {_listed(repeated)}", param="experts")
        return set(self.experts)

    def _checked_bias(self, expert_names: list[str], allowed: set[str]) -> dict[str, float]:
        bias = self.expert_bias or {}
        _check_known(list(bias), expert_names, "expert_bias")
        for name, value in bias.items():
            if not (math.isfinite(value) and abs(value) <= MAX_EXPERT_BIAS):
                raise bad_request(
                    f"expert_bias[{clip(repr(name))}] must be a finite number in [-{MAX_EXPERT_BIAS:g}, {MAX_EXPERT_BIAS:g}], got {value}",
                    param="expert_bias",
                )
            if name not in allowed:
                raise bad_request(f"expert_bias names {clip(repr(name))}, which experts leaves out", param="expert_bias")
        return bias

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, expert_names: list[str] | None = None,
    ) -> SamplingParams:
        """expert_names: as for router_bias (expert_names_of the serving engine)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=self.seed,
            stop=self.stops,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            router_bias=self.router_bias(expert_names),
        )


def expert_names_of(engine: Engine) -> list[str] | None:
    """What `experts` and `expert_bias` may name on `engine`: its experts; None for a dense composition."""
    return list(engine.expert_names) if engine.composed.num_experts > 1 else None


def _check_known(names: list[str], expert_names: list[str], param: str) -> None:
    known = set(expert_names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise bad_request(
            f"{param}: no expert named {_listed(unknown)}; this model's experts are {_listed(expert_names)}", param=param,
        )


def _listed(names: list[str]) -> str:
    """`names` as a list for an error message: the first MAX_LISTED, each clipped, then how many more."""
    shown = "[" + ", ".join(clip(repr(n), 80) for n in names[:MAX_LISTED]) + "]"
    return shown if len(names) <= MAX_LISTED else f"{shown} and {len(names) - MAX_LISTED} more"


TokenIds = Annotated[list[int], Field(max_length=MAX_PROMPT_TOKEN_IDS)]


class CompletionRequest(_SamplingRequest):
    prompt: str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | TokenIds | Annotated[
        list[TokenIds], Field(max_length=MAX_PROMPTS)
    ] = Field(description=(
        f"Text, token ids, or a list of up to {MAX_PROMPTS} of either (each prompt at most "
        f"{MAX_PROMPT_TOKEN_IDS} token ids); prompts x n must fit the model's queue"
    ))
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _long_lists_are_token_ids(cls, value: object) -> object:
        # Each list type of the union is tried in turn: a long list of the wrong items would cost
        # an error per item in every branch.
        if isinstance(value, list) and len(value) > MAX_PROMPTS and not all(type(t) is int for t in value):
            raise ValueError(f"a list of more than {MAX_PROMPTS} entries must be token ids (at most {MAX_PROMPTS} prompts)")
        return value

    @property
    def num_prompts(self) -> int:
        if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int):
            return 1
        return len(self.prompt)

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = Field(
        None, description=f"Text, or up to {MAX_CONTENT_PARTS} text parts",
    )
    name: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, description=f"1 to {MAX_MESSAGES} messages")
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = Field(None, max_length=MAX_TOOLS, description=f"At most {MAX_TOOLS} (not supported: only [])")

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise bad_request(
                f"response_format {clip(repr(self.response_format.type), 80)} is not supported; only 'text'",
                param="response_format",
            )
        if self.tools:
            raise bad_request("tools are not supported", param="tools")

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them: content flattened to one string."""
        out = []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                if any(p.type != "text" for p in m.content):
                    raise bad_request(f"messages[{i}]: only text content parts are supported", param="messages")
                content = "".join(p.text or "" for p in m.content)
            else:
                content = m.content or ""
            out.append({"role": m.role, "content": content} | ({"name": m.name} if m.name else {}))
        return out


# --- responses -----------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mergeserve"
    # As vLLM's cards: what the model is built from (a one-expert composition: that expert's
    # checkpoint, e.g. a LoRA adapter's folder; else its base), and the base it is built over.
    root: str | None = None
    parent: str | None = None
    # An A/B alias lists the compositions it sends requests to, with their weights.
    targets: dict[str, float] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    # None for an echoed prompt's first token, which nothing predicts (as OpenAI and vLLM send it).
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


# mergeserve's own field, beside `usage`: the experts a response was routed to (X-Mergeserve-Experts too).
EXPERTS_DESCRIPTION = (
    "Each expert's share of this response's routing, summing to 1, largest first: a sequence router's weights, or "
    "for token routing each expert's share of the routing weight of the response's tokens (over the MoE layers); "
    "a stream sends it with each choice's finish_reason (that choice's) and with the usage chunk (all choices'). "
    "null for a composition of one expert.")


class CompletionResponse(BaseModel):
    """A whole completion, and also one streamed chunk (OpenAI streams the same object)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    experts: dict[str, float] | None = Field(None, description=EXPERTS_DESCRIPTION)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    experts: dict[str, float] | None = Field(None, description=EXPERTS_DESCRIPTION)


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    experts: dict[str, float] | None = Field(None, description=EXPERTS_DESCRIPTION)


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a score for a response this server gave, e.g. 1 / -1 for thumbs up / down."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256)  # the response's `id`
    score: float = Field(ge=-1, le=1, strict=True)  # a number: not "1", not false


class FeedbackResponse(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    model: str  # the composition that served the response
    revision: int
    experts: dict[str, float] | None = Field(None, description=EXPERTS_DESCRIPTION)  # the response's, where it had routing and has finished



class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's body of POST /v1/load_lora_adapter: a PEFT folder served as model `lora_name`."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace a model of that name (a hot swap) rather than refuse


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's body of POST /v1/unload_lora_adapter."""

    lora_name: str
    lora_int_id: int | None = None  # vLLM's internal id; unused here
