"""What every spec model shares: strict parsing, the name pattern, and the error type."""

from __future__ import annotations

import re
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag


class SpecError(ValueError):
    """A spec or config that cannot be used; the message names the file and the field."""


# Composition and alias names: they appear in URLs (/admin/compositions/{name}) and metric labels.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]+$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


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
