"""What the serve config lets a composition spec choose of the processes it runs and the hosts it reaches.

A spec may come from an admin request, so it names what the operator's config file defines
rather than defining it: a vLLM profile (interpreter, environment, extra arguments), an
upstream URL under an allowed prefix, an API key variable from an allowed list. This server's
own API and admin keys never leave it: not as an upstream's key, not in a child's environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from mergeserve.server.auth import ADMIN_KEY_ENV, API_KEYS_ENV, Auth
from mergeserve.spec import CompositionSpec, ServeConfig, SpecError, VLLMLoRA, VLLMProfile

GATEWAY_KEY_ENV = (API_KEYS_ENV, ADMIN_KEY_ENV)
DEFAULT_PORT = {"http": 80, "https": 443}


class NotAllowed(SpecError):
    """A spec that chooses what the serve config does not allow; `field` names the spec's field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class BackendPolicy:
    """The serve config's vllm_profiles, upstream_allowlist, upstream_key_env and vllm_lora; empty:
    no upstream may be proxied, and a vLLM child runs as the built-in default profile."""

    vllm_profiles: Mapping[str, VLLMProfile] = field(default_factory=dict)
    upstream_allowlist: tuple[str, ...] = ()
    upstream_key_env: tuple[str, ...] = ()
    # This server's API and admin keys: never sent upstream, never in a child's environment.
    gateway_keys: frozenset[str] = frozenset()
    vllm_lora: VLLMLoRA = field(default_factory=VLLMLoRA)  # one-LoRA compositions as adapters of one vLLM engine per base

    @classmethod
    def from_config(cls, config: ServeConfig, auth: Auth) -> BackendPolicy:
        named = [("upstream_key_env", v) for v in config.upstream_key_env if v in GATEWAY_KEY_ENV]
        named += [(f"vllm_profiles.{p}.env", v) for p, profile in config.vllm_profiles.items() for v in profile.env if v in GATEWAY_KEY_ENV]
        if named:
            raise SpecError(f"{named[0][0]}: {named[0][1]} holds this server's own keys; they never leave it")
        keys = frozenset([*auth.api_keys, *([auth.admin_key] if auth.admin_key else [])])
        return cls(dict(config.vllm_profiles), tuple(config.upstream_allowlist), tuple(config.upstream_key_env), keys,
                   config.vllm_lora)

    def check(self, spec: CompositionSpec) -> None:
        """Refuse, naming the field, a spec that chooses what the serve config does not allow."""
        if spec.backend == "vllm":
            self.profile(spec)
        if spec.backend != "openai":
            return
        upstream = spec.upstream
        if not any(_under(urlsplit(upstream.url), urlsplit(prefix)) for prefix in self.upstream_allowlist):
            raise NotAllowed("upstream.url", f"{upstream.url} is not under any prefix of the serve config's upstream_allowlist "
                             f"{list(self.upstream_allowlist)}")
        if upstream.api_key_env is not None and upstream.api_key_env not in self.upstream_key_env:
            raise NotAllowed("upstream.api_key_env", f"{upstream.api_key_env!r} is not one of the serve config's upstream_key_env "
                             f"{list(self.upstream_key_env)}")

    def profile(self, spec: CompositionSpec) -> VLLMProfile:
        """The profile that runs `spec`'s vLLM child."""
        name = spec.vllm.profile if spec.vllm else None
        if name is None:
            return self.vllm_profiles.get("default", VLLMProfile())
        if name not in self.vllm_profiles:
            raise NotAllowed("vllm.profile", f"{name!r} is not one of the serve config's vllm_profiles {sorted(self.vllm_profiles)}")
        return self.vllm_profiles[name]

    def upstream_key(self, spec: CompositionSpec) -> str | None:
        """The key `spec`'s upstream gets: the value of its upstream.api_key_env, which the serve config allows."""
        self.check(spec)
        env = spec.upstream.api_key_env
        if env is None:
            return None
        key = os.environ.get(env)
        if not key:
            raise ValueError(f"upstream.api_key_env: the environment variable {env} is not set")
        if key in self.gateway_keys:
            raise NotAllowed("upstream.api_key_env", f"{env} holds one of this server's own keys")
        return key


def _under(url: SplitResult, prefix: SplitResult) -> bool:
    """Same scheme, host and port, and the path at or below the prefix's (by whole segments)."""
    base = prefix.path.rstrip("/")
    return _origin(url) == _origin(prefix) and (url.path.rstrip("/") == base or url.path.startswith(base + "/"))


def _origin(parts: SplitResult) -> tuple[str, str | None, int]:
    return parts.scheme, parts.hostname, parts.port or DEFAULT_PORT[parts.scheme]
