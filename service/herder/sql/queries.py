"""Named queries, read once from ``queries.sql``.

A query names its parameters (``:job_id``). At import each query becomes the positional
SQL that PostgreSQL takes (``$1``), its names numbered in the order they first appear,
and callers pass arguments by name (``QUERIES.bind``): no reordering of a query can
silently swap two of its arguments.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Any

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# A colon or a dollar inside a comment, a literal, a quoted name or a dollar quote, or in
# a cast (`::`), is no parameter: those are matched first and kept whole.
_TOKENS = re.compile(
    r"""
      (?P<kept> --[^\n]*
              | /\*.*?\*/
              | '(?:[^']|'')*'
              | "(?:[^"]|"")*"
              | (?P<quote>\$(?:[A-Za-z_]\w*)?\$).*?(?P=quote)
              | ::)
    | (?P<positional>\$\d+)
    | :(?P<parameter>\w+)
    """,
    re.VERBOSE | re.DOTALL,
)
_PARAMETER = re.compile(r"[a-z_][a-z0-9_]*")


class Queries(Mapping[str, str]):
    """Each query's positional SQL by name (the text sent to PostgreSQL), and the order
    of its parameters."""

    def __init__(self, text: str) -> None:
        parts = _NAME.split(text)
        # parts = [preamble, name1, body1, name2, body2, ...]
        self._sql: dict[str, str] = {}
        self._parameters: dict[str, tuple[str, ...]] = {}
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            self._sql[name], self._parameters[name] = _positional(name, body.strip())

    def __getitem__(self, name: str) -> str:
        return self._sql[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sql)

    def __len__(self) -> int:
        return len(self._sql)

    def bind(self, name: str, /, **arguments: Any) -> tuple[Any, ...]:
        """The query's SQL followed by its arguments in their positions, to unpack into
        a call: ``conn.fetch(*QUERIES.bind("get_job", job_id=7))``. TypeError when an
        argument is missing, or names no parameter of the query."""
        parameters = self._parameters[name]
        problems = [f"missing :{p}" for p in parameters if p not in arguments]
        problems += [f"no parameter :{a}" for a in arguments if a not in parameters]
        if problems:
            raise TypeError(f"query {name}: {', '.join(problems)}")
        return (self._sql[name], *(arguments[p] for p in parameters))


def _positional(name: str, sql: str) -> tuple[str, tuple[str, ...]]:
    """``sql`` with ``:name`` parameters as ``$n``, and the names in order."""
    parameters: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match["kept"] is not None:
            return match[0]
        if match["positional"] is not None:
            raise ValueError(f"query {name}: {match[0]}: name the parameter (:name)")
        parameter = match["parameter"]
        if not _PARAMETER.fullmatch(parameter):
            raise ValueError(f"query {name}: :{parameter} is no parameter name ([a-z_][a-z0-9_]*)")
        if parameter not in parameters:
            parameters.append(parameter)
        return f"${parameters.index(parameter) + 1}"

    return _TOKENS.sub(number, sql), tuple(parameters)


QUERIES = Queries(resources.files("herder.sql").joinpath("queries.sql").read_text())
