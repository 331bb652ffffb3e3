"""Fixtures for the audit tests: a real InfluxDB 1.6 per session, fleets written straight in the schema."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from tests.support import synthetic as sy
from tests.support.fixtures import running
from tests.support.servers import InfluxDB1

from kvmfleet.audit.client import Connection, InfluxQLClient
from kvmfleet.audit.engine import AuditOptions, AuditResult, run_audit
from kvmfleet.querypack import load_rules

_db_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def audit_influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    """InfluxDB 1.6 without auth, shared by the audit tests (each writes its own database)."""
    with running(lambda: InfluxDB1(workdir=tmp_path_factory.mktemp("audit-influxdb"))) as server:
        yield server


def write_fleet(server: InfluxDB1, hosts: Sequence[sy.HostSpec], minutes: int = 60, step: int = 10,
                db: str | None = None, rp: str | None = None, ago: int = 0) -> str:
    """A new database (or ``db``) holding ``hosts`` over ``minutes`` ending ``ago`` seconds before now; returns
    its name."""
    name = db or f"audit{next(_db_numbers)}"
    server.create_database(name)
    if rp:
        server.query(f'CREATE RETENTION POLICY "{rp}" ON "{name}" DURATION 0s REPLICATION 1')
    end = (int(time.time()) - ago) // step * step
    sy.post_lines(server.url, name, sy.fleet_lines(hosts, end, minutes * 60, step), rp=rp)
    return name


def audit(server: InfluxDB1, db: str, **kw: Any) -> AuditResult:
    client = InfluxQLClient(Connection(url=server.url, database=db))
    try:
        opts = {"rules": load_rules(), **kw}
        return run_audit(client, AuditOptions(**opts), source=server.url)
    finally:
        client.close()


def triples(result: AuditResult) -> set[tuple[str, str, str]]:
    return {(f.host, f.rule, f.severity) for f in result.findings}
