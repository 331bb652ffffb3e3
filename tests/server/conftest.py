"""Fixtures for the shipping tests: real InfluxDB 1.6 / VictoriaMetrics, a blackhole, secrets, TLS material."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.server.shiphelpers import INFLUX_PASSWORD, INFLUX_USER, secret_file
from tests.support.servers import (
    BlackholeServer,
    InfluxDB1,
    MissingBinary,
    VictoriaMetrics,
    make_self_signed_cert,
)


@pytest.fixture
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    """InfluxDB 1.6 with auth on, database ``kvm`` (retention policies ``autogen`` and ``rp1``) and a writer
    user ``kvmwriter`` allowed to write it."""
    try:
        server = InfluxDB1(workdir=tmp_path_factory.mktemp("influxdb"), auth=True)
    except MissingBinary as e:
        pytest.fail(str(e))
    server.start()
    try:
        server.create_database("kvm")
        server.query('CREATE RETENTION POLICY "rp1" ON "kvm" DURATION 0s REPLICATION 1')
        server.query(f"CREATE USER {INFLUX_USER} WITH PASSWORD '{INFLUX_PASSWORD}'")
        server.query(f'GRANT WRITE ON "kvm" TO {INFLUX_USER}')
        yield server
    finally:
        server.close()


@pytest.fixture
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    try:
        server = VictoriaMetrics(workdir=tmp_path_factory.mktemp("victoria"))
    except MissingBinary as e:
        pytest.fail(str(e))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def blackhole() -> Iterator[BlackholeServer]:
    with BlackholeServer() as server:
        yield server


@pytest.fixture
def password_file(tmp_path: Path) -> str:
    return secret_file(tmp_path, "influx.pass", INFLUX_PASSWORD)


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    try:
        return make_self_signed_cert(tmp_path_factory.mktemp("tls"))
    except MissingBinary as e:
        pytest.fail(str(e))
