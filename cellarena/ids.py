"""Identifier rules shared by cards, config keys, Snakemake wildcards and table columns."""

from __future__ import annotations

import re

ID_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
# Snakemake wildcard constraint: the same rule without anchors.
WILDCARD_PATTERN = r"[a-z][a-z0-9_]{0,63}"


def is_valid_id(value: str) -> bool:
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value))


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a snake_case identifier, else raise ValueError.

    The pattern forbids path separators, dots and upper case, so an id can be used in a file name
    without any risk of path traversal.
    """
    if not is_valid_id(value):
        raise ValueError(
            f"{what} {value!r} is not a valid identifier: use lower-case snake_case "
            f"matching {ID_PATTERN} (letters, digits, underscores; starts with a letter)"
        )
    return value
