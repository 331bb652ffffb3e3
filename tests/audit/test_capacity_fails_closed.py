"""``kvmfleet capacity`` fails closed like the audit: a server that misbehaves, no data, a database that does not
exist: exit 2 with one line on stderr and nothing on stdout, in bounded time."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from tests.support.faultserver import FaultServer
from tests.support.servers import InfluxDB1

pytestmark = pytest.mark.server

TIMEOUT = 2
FAULT_WORDS = {
    "ok": "no kvm samples for hosts matching .* in the last 24h in http://",
    "500": "HTTP 500 for query capacity_",
    "trickle": f"within {TIMEOUT}s",
    "garbage": "is not an InfluxDB answer: no results list",
}


def run_capacity(*args: str) -> tuple[int, str, list[str], float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kvmfleet.cli", "capacity", *args], capture_output=True, text=True,
                       timeout=120, env=os.environ, stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout, r.stderr.splitlines(), time.monotonic() - t0


@pytest.mark.parametrize("fault", list(FAULT_WORDS))
def test_every_fault_is_exit_2_with_one_line(fault: str) -> None:
    with FaultServer([fault]) as server:
        rc, out, err, took = run_capacity("--url", server.url, "--database", "kvm", "--timeout", str(TIMEOUT))
    assert (rc, out) == (2, ""), err
    assert len(err) == 1 and err[0].startswith("kvmfleet capacity: error: ") and FAULT_WORDS[fault] in err[0], err
    assert took < 4 * TIMEOUT + 10, took


def test_no_database_and_bad_arguments_are_exit_2(audit_influx: InfluxDB1) -> None:
    rc, out, err, _ = run_capacity("--url", audit_influx.url, "--database", "no_such_capacity_db")
    assert (rc, out) == (2, "") and "database not found: no_such_capacity_db" in err[0]
    for args, words in ((["--horizon", "-1"], "--horizon must be >= 0"), (["--place", "-5"], "--place must be >= 0"),
                        (["--window", "forever"], "'forever' is not a duration"),
                        (["--limit", "ram=2"], "--limit 'ram=2': expected NAME=VALUE")):
        rc, out, err, _ = run_capacity("--url", audit_influx.url, "--database", "x", *args)
        assert (rc, out) == (2, "") and len(err) == 1 and words in err[0], (args, err)
