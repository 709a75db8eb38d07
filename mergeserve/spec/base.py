"""What every spec model shares: strict parsing, field comments as descriptions, the name pattern,
and the error type."""

from __future__ import annotations

import ast
import functools
import inspect
import io
import re
import textwrap
import tokenize
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag


class SpecError(ValueError):
    """A spec or config that cannot be used; the message names the file and the field."""


# Composition and alias names: they appear in URLs (/admin/compositions/{name}) and metric labels.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]+$")


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the body of `cls` or of a class it inherits from: the comment lines
    right above the field, then the comment after the field's code on its line, as one text ({}
    where the source cannot be read). A field's comment is its description: see Strict."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if issubclass(klass, Strict):
            comments |= _own_comments(klass)
    return comments


@functools.cache
def _own_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        body = ast.parse(source).body[0].body
    except (OSError, TypeError, SyntaxError):  # no source to read (a frozen or generated class)
        return {}
    lines = source.splitlines()
    alone, after = {}, {}  # line number -> a comment on a line of its own / after code
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not re.match(r"#\s*(noqa|type:)", tok.string):
            text = tok.string.lstrip("#").strip()
            (alone if not lines[tok.start[0] - 1][:tok.start[1]].strip() else after)[tok.start[0]] = text
    found = {}
    for stmt in body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, n = [], stmt.lineno - 1
        while n in alone:
            above.insert(0, alone[n])
            n -= 1
        own = [after[i] for i in range(stmt.lineno, stmt.end_lineno + 1) if i in after]
        parts = [p for p in (" ".join(above), *own) if p]
        if parts:  # sentences: a part that goes on gets a full stop
            found[stmt.target.id] = " ".join([p if p[-1] in ".:;!?" else p + "." for p in parts[:-1]] + parts[-1:])
    return found


def _describe_fields(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """A field's comment as its JSON Schema description, where the field gives none of its own."""
    comments, properties = field_comments(cls), schema.get("properties", {})
    for name, info in cls.model_fields.items():
        for key in {name, info.alias} & set(properties):
            if name in comments and "description" not in properties[key]:
                properties[key]["description"] = comments[name]


class Strict(BaseModel):
    # A field's comment (above it, or after it on its line) is its description in the JSON Schema:
    # editors show it, and docs/reference/ is rendered from it (spec/reference.py).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra=_describe_fields)


def refuse_moved(data: object, moved: dict[str, str], where: str = "") -> None:
    """A field that was renamed or moved gets an error naming its new place, not 'extra input'."""
    if isinstance(data, dict) and (old := sorted(set(data) & set(moved))):
        raise ValueError("; ".join(f"{where}{k}: moved to {moved[k]}" for k in old))


def one_of(names: object) -> str:
    """'a', 'b' or 'c': the allowed values, as pydantic lists a Literal's."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def tagged_union(models: dict[str, type[BaseModel]], field: str, default: str, where: str) -> Any:
    """A union of `models` picked by the value of `field` (`default` when the input leaves it out),
    whose error for an unknown value names the place (`where`, e.g. `router.kind`) and the allowed values."""

    def tag(v: Any) -> str | None:
        return v.get(field, default) if isinstance(v, dict) else getattr(v, field, None)

    return Annotated[Union[tuple(Annotated[m, Tag(name)] for name, m in models.items())],
                     Discriminator(tag, custom_error_type=f"{field}_tag",
                                   custom_error_message=f"{where}: Input should be {one_of(models)}")]
