"""The SQL herder runs: named queries, read once from ``queries.sql``; ``schema.sql``, the
current shape of the schema; and the numbered upgrade steps in ``upgrades/`` that bring a
database created by an earlier version to the point where schema.sql applies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from herder.sql.queries import QUERIES

__all__ = ["QUERIES", "Upgrade", "schema_sql", "upgrades"]


def schema_sql() -> str:
    return resources.files(__name__).joinpath("schema.sql").read_text()


@dataclass(frozen=True, slots=True)
class Upgrade:
    """One file of ``upgrades/``: ``NNN_what_it_upgrades.sql``."""

    number: int
    name: str
    sql: str


_UPGRADE_FILE = re.compile(r"^(\d{3})_\w+\.sql$")


def upgrades() -> list[Upgrade]:
    """The upgrade steps in the order they run.

    A misnamed file or two steps with one number would silently change which steps a
    database has had: both are refused.
    """
    steps: dict[int, Upgrade] = {}
    for entry in resources.files(__name__).joinpath("upgrades").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _UPGRADE_FILE.match(entry.name)
        if match is None:
            raise ValueError(f"upgrade step {entry.name!r} is not named NNN_name.sql")
        number = int(match[1])
        if number in steps:
            raise ValueError(f"upgrade steps {steps[number].name} and {entry.name} share a number")
        steps[number] = Upgrade(number, entry.name, entry.read_text())
    return [steps[number] for number in sorted(steps)]
