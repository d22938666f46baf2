"""The listener's channels are the ones herder's SQL notifies."""

from __future__ import annotations

import re

from herder import listener
from herder.sql import QUERIES, schema_sql


def test_the_sql_notifies_exactly_the_channels_the_daemon_listens_on() -> None:
    sql = schema_sql() + "\n".join(QUERIES.values())
    notified = set(re.findall(r"pg_notify\('([a-z_]+)'", sql))
    assert notified == set(listener.CHANNELS)
