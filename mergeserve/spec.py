"""Composition specs and serve configs: pydantic models validated once, at the edge.

A composition spec says which experts, which merge method for the shared layers and
which router; a serve config says which compositions to serve and how.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A spec or config that cannot be used; the message names the file and the field."""


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


class RouterSpec(_Strict):
    kind: Literal["hidden", "random"] = "hidden"
    top_k: int = Field(2, ge=1)
    seed: int = 0
    # Router logit margin between an expert's own domain and the rest; larger is sharper.
    scale: float = Field(4.0, gt=0)


class CompositionSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]+$")
    base: str
    experts: list[ExpertSpec] = Field(min_length=1)
    # btx: MoE, FFNs kept as experts, the rest averaged; linear: one dense weighted average.
    method: Literal["btx", "linear"] = "btx"
    router: RouterSpec = RouterSpec()
    dtype: Literal["float32"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> CompositionSpec:
        names = [e.name for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique, repeated: {dupes}")
        if len(self.experts) > 1 and self.router.top_k > len(self.experts):
            raise ValueError(f"router.top_k={self.router.top_k} exceeds the {len(self.experts)} experts")
        if self.method == "btx" and self.router.kind == "hidden" and len(self.experts) > 1:
            missing = [e.name for e in self.experts if not e.prompts]
            if missing:
                raise ValueError(f"router.kind=hidden needs prompts for every expert; none for {missing}")
        return self


class EngineConfig(_Strict):
    max_num_seqs: int = Field(8, ge=1, le=256)
    max_model_len: int = Field(2048, ge=16)
    # Prompt tokens prefilled per step; bounds how long one step can stall decodes.
    max_prefill_tokens: int = Field(256, ge=1)


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    compositions: list[CompositionSpec] = Field(min_length=1)
    engine: EngineConfig = EngineConfig()

    @field_validator("compositions")
    @classmethod
    def _unique(cls, specs: list[CompositionSpec]) -> list[CompositionSpec]:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"composition names must be unique: {names}")
        return specs


def resolve_source(source: str, relative_to: Path) -> str:
    """Turn a source string into an absolute path.

    `pkg://module/file` names a file shipped inside an installed package (found
    without importing it); other sources are paths, relative to the spec's folder.
    """
    if source.startswith("pkg://"):
        import importlib.util

        module, _, rest = source[len("pkg://"):].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise SpecError(f"source {source!r}: package {module!r} is not installed")
        return str(Path(found.submodule_search_locations[0]) / rest)
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else (relative_to / path).resolve())


def _with_resolved_sources(spec: dict, relative_to: Path) -> dict:
    spec = dict(spec)
    if isinstance(spec.get("base"), str):
        spec["base"] = resolve_source(spec["base"], relative_to)
    experts = []
    for expert in spec.get("experts") or []:
        if isinstance(expert, dict):
            expert = dict(expert)
            for key in ("source", "base"):
                if isinstance(expert.get(key), str):
                    expert[key] = resolve_source(expert[key], relative_to)
        experts.append(expert)
    if experts:
        spec["experts"] = experts
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
    path = Path(path)
    return parse_composition(_read_yaml(path), path.parent.resolve(), str(path))


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
            specs.append(parse_composition(entry, path.parent.resolve(), f"{path}: compositions.{i}"))
    data["compositions"] = specs
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        raise _explain(path, e) from None
