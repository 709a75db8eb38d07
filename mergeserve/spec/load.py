"""Reading specs and serve configs from YAML: sources resolved against the file's folder, errors
that name the file and the field."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from mergeserve.spec.base import SpecError
from mergeserve.spec.composition import PATH_FIELDS, CompositionSpec
from mergeserve.spec.merge import MERGEME_MODELS
from mergeserve.spec.router import ROUTERS
from mergeserve.spec.serve import ServeConfig
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
    for section, key in PATH_FIELDS:
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
        # A union's tag (router.hidden.top_k) is the value of a field, not a place: leave it out.
        loc = [p for i, p in enumerate(item["loc"]) if not (i and item["loc"][i - 1] in ("router", "merge") and p in _TAGS)]
        where = ".".join(str(p) for p in loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        # A message that names its own field (router.kind: ...) names it more exactly than the loc.
        named = re.match(r"^([\w.]+)(=\S+)?[: ]", message)
        own = named and (where == "(top level)" or named[1].startswith(where))
        lines.append(f"  {message}" if own else f"  {where}: {message}")
    return SpecError("\n".join(lines))


_TAGS = {m.model_fields[f].default for m in (*MERGEME_MODELS.values(), *ROUTERS) for f in ("method", "kind") if f in m.model_fields}


# backend -> (its transport section, old top-level field -> its name in that section)
_SAVED_MOVES = {
    "openai": ("upstream", {"url": "url", "upstream_model": "model", "api_key_env": "api_key_env", "timeout_s": "timeout_s"}),
    "vllm": ("vllm", {"timeout_s": "timeout_s"}),
}


def upgrade_saved(data: dict) -> dict:
    """A spec saved by an older version, in today's form: the fields that moved, moved. Only for
    state this server wrote itself; a spec from a user is told where its fields went (MOVED)."""
    data = dict(data)
    section, renames = _SAVED_MOVES.get(data.get("backend"), (None, {}))
    for old in _SAVED_MOVES["openai"][1]:
        value = data.pop(old, None)  # a local composition's old transport fields were unused: dropped
        if old in renames and value is not None:
            data[section] = {**(data.get(section) or {}), renames[old]: value}
    router = data.get("router")
    if isinstance(router, dict) and router.get("kind") in ("perplexity", "task_vector") and data.get("method") not in ("route", "hetero") and "scale" in router:
        data["router"] = {k: v for k, v in router.items() if k != "scale"} | {"inverse_temperature": router["scale"]}
    return data


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
