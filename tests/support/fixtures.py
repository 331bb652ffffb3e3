"""Server fixtures shared by the shipping, collectd and audit tests (imported into their conftest.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, TypeVar

import pytest
from tests.server.shiphelpers import INFLUX_PASSWORD, INFLUX_USER
from tests.support.servers import InfluxDB1, MissingBinary, VictoriaMetrics

S = TypeVar("S", InfluxDB1, VictoriaMetrics)


@contextlib.contextmanager
def running(make: Callable[[], S]) -> Iterator[S]:
    """A started server, closed afterwards; a missing binary fails the test (it never skips here)."""
    try:
        server = make()
    except MissingBinary as err:
        pytest.fail(str(err))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    """InfluxDB 1.6 with auth on, database ``kvm`` (retention policies ``autogen`` and ``rp1``) and a writer
    user ``kvmwriter`` allowed to write it."""
    with running(lambda: InfluxDB1(workdir=tmp_path_factory.mktemp("influxdb"), auth=True)) as server:
        server.create_database("kvm")
        server.query('CREATE RETENTION POLICY "rp1" ON "kvm" DURATION 0s REPLICATION 1')
        server.query(f"CREATE USER {INFLUX_USER} WITH PASSWORD '{INFLUX_PASSWORD}'")
        server.query(f'GRANT WRITE ON "kvm" TO {INFLUX_USER}')
        yield server


@pytest.fixture
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    with running(lambda: VictoriaMetrics(workdir=tmp_path_factory.mktemp("victoria"))) as server:
        yield server
