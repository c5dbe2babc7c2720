"""The base of every recipe and config schema, and the one way YAML data is validated against it.

A typo in a YAML key (`min_char: 3`) must stop a build or a training run with the key's path, not
be ignored; and settings that fingerprint a stage must not change after they were read. Corpus
recipes and training configs report their problems the same way: one line per problem, naming
the file and the key path.
"""

from __future__ import annotations

import reprlib
from typing import Collection, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ModelT = TypeVar("ModelT", bound=BaseModel)


def _format_location(loc: tuple, union_tags: Collection[str]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in union_tags and parts and parts[-1].startswith("["):
            continue  # pydantic's discriminator tag, not a key the user wrote
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = 60


def _short_repr(value: object) -> str:
    """At most 60 characters, at a cost bounded whatever the input's size (reprlib stops early;
    a plain repr of a large list would build all of it first)."""
    return _REPR.repr(value)[:60]


def format_validation_error(origin: str, error: ValidationError, union_tags: Collection[str] = ()) -> str:
    """One line per problem: `origin: key.path[i].key: message (got value)`.

    `union_tags` are the discriminator values of the schema's tagged unions (a source's `kind`):
    pydantic puts them in the location after the list index, where the user never wrote them."""
    lines = []
    for err in error.errors():
        where = _format_location(err["loc"], union_tags)
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] not in ("missing", "extra_forbidden") and "input" in err:
            message += f" (got {_short_repr(err['input'])})"
        lines.append(f"{origin}: {where}: {message}")
    return "\n".join(lines)


def validate_mapping(model: type[ModelT], data: object, origin: str, error: type[Exception],
                     union_tags: Collection[str] = ()) -> ModelT:
    """Validate YAML data against a schema; problems become one `error` naming origin and keys."""
    if not isinstance(data, dict):
        raise error(f"{origin}: expected a mapping of keys at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise error(format_validation_error(origin, err, union_tags)) from None
