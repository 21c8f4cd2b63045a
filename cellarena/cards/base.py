"""What every card shares: the strict pydantic base, the id and sha256 field types, and reading a YAML
card file with errors that name the file and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellarena.errors import CardError
from cellarena.ids import ID_PATTERN

SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256")]
Id = Annotated[str, Field(pattern=ID_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not in the card schema)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def read_yaml_mapping(path: Path, what: str, fix_missing: str) -> dict:
    """Read a YAML card file that must hold a mapping; errors name the file."""
    if not path.is_file():
        raise CardError(f"{what} not found", where=path, fix=fix_missing)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CardError(f"not valid YAML: {exc}", where=path) from None
    if not isinstance(data, dict):
        raise CardError(f"a {what} must be a YAML mapping", where=path)
    return data


def load_yaml_card(schema: type[BaseModel], path: Path, what: str, *, fix_missing: str, fix_invalid: str):
    """Read ``path`` and validate it against the pydantic ``schema``; errors name the file and the fix."""
    data = read_yaml_mapping(path, what, fix_missing)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        fields = tuple(dict.fromkeys(str(e["loc"][0]) for e in exc.errors() if e["loc"]))
        raise CardError(f"invalid {what}:\n{format_validation_error(exc)}", where=path, fix=fix_invalid,
                        fields=fields) from None


def require_matching_id(card_id: str, name: str, path: Path, *, what: str, rename: str) -> None:
    """A card's id must equal the name of its file (or folder): one place says what a thing is."""
    if card_id != name:
        raise CardError(f"{what} id {card_id!r} does not match its {'folder' if what == 'model' else 'file name'} "
                        f"{name!r}", where=path, fix=f"rename it to {rename} or fix the id")
