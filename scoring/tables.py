"""Where a Delta table is: by catalog name (``schema.table``, ``catalog.schema.table``) or by
location (a path or URI). Pure values; reading and writing them is :mod:`streamscore.scoring.io`.

A name is two or three dot-separated identifiers; a part that is not a plain identifier
(letters, digits, ``_``, ``-``) is written in backticks, as in Spark SQL."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PART = r"(?:`[^`]+`|[A-Za-z0-9_][A-Za-z0-9_-]*)"
_NAME = re.compile(rf"^{_PART}(?:\.{_PART}){{1,2}}$")
_SPLIT = re.compile(r"`([^`]+)`|([^.`]+)")
SESSION_CATALOG = "spark_catalog"


def check_name(name: str) -> str:
    """``name`` if it is a two- or three-level table name, else ValueError saying what is expected."""
    if not _NAME.match(name):
        raise ValueError(
            f"{name!r} is not a table name: expected schema.table or catalog.schema.table "
            "(a path or URI goes in the matching *_path setting)"
        )
    return name


def name_parts(name: str) -> list[str]:
    """The identifiers of a checked name, backticks removed."""
    return [quoted or plain for quoted, plain in _SPLIT.findall(check_name(name))]


@dataclass(frozen=True)
class TableRef:
    """A Delta table by ``name`` (looked up in the session's catalog) or by ``path``; exactly one."""

    name: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.path is None):
            raise ValueError("a table has either a name or a path")
        if self.name is not None:
            check_name(self.name)

    @classmethod
    def at(cls, path: str) -> TableRef:
        return cls(path=path)

    @classmethod
    def named(cls, name: str) -> TableRef:
        return cls(name=name)

    @property
    def sql(self) -> str:
        """The table in SQL: each part of a name quoted, a path as ``delta.`<path>```."""
        if self.name is not None:
            return ".".join(f"`{p}`" for p in name_parts(self.name))
        assert self.path is not None
        return "delta.`" + self.path.replace("`", "``") + "`"

    @property
    def schema(self) -> str | None:
        """The schema (database) part of a name, quoted for SQL, with its catalog if it has one."""
        if self.name is None:
            return None
        return ".".join(f"`{p}`" for p in name_parts(self.name)[:-1])

    def __str__(self) -> str:
        return self.name if self.name is not None else str(self.path)
