"""Fixtures for the shipping tests: real InfluxDB 1.6 / VictoriaMetrics, a blackhole, secrets, TLS material."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.server.shiphelpers import INFLUX_PASSWORD, secret_file
from tests.support.fixtures import influxdb, victoria  # noqa: F401  (shared fixtures)
from tests.support.servers import (
    BlackholeServer,
    MissingBinary,
    make_self_signed_cert,
)


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
