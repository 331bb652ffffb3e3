"""VM names with a backslash: InfluxDB 1.6 and VictoriaMetrics store the same tag value from kvmfleet's lines
(they read a backslash before a backslash, a separator or the end differently: docs/schema.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from influxdb_client import Point  # type: ignore[attr-defined]
from tests.server.shiphelpers import INFLUX_USER, secret_file
from tests.support.servers import InfluxDB1, VictoriaMetrics
from tests.unit.test_lineproto import stand_in

from kvmfleet.ship.lineproto import encode_point
from kvmfleet.ship.writers import V1Writer, V2Writer

pytestmark = pytest.mark.server

NAMES = ["CORP\\web01", "a\\=b", "a\\tb", "x\\", "a\\\\b", "a\\ b", "a\\,b", "a\\=\\", "\\", "\\\\", "a\\\nb",
         "tab\\\tx", "a\\\\\\,b c"]
AMBIGUOUS = {n for n in NAMES if stand_in(n) != n}


def lines(encode: str) -> list[str]:
    """One kvm_vm line per name (tag ``i`` = its index), from kvmfleet's encoder or from influxdb-client's Point."""
    base = (time.time_ns() // 10**9 - 600) * 10**9
    out = []
    for i, name in enumerate(NAMES):
        tags, fields, ts = {"host": encode, "i": str(i), "vm": name}, {"x": i}, base + i * 10**9
        if encode == "kvmfleet":
            out.append(encode_point("kvm_vm", tags, fields, ts))
        else:
            point = Point("kvm_vm").field("x", i).time(ts)
            for k, v in tags.items():
                point.tag(k, v)
            out.append(point.to_line_protocol())
    return [*out, f"kvm_vm,host={encode},i=end,vm=end x=0i {base - 10**9}"]  # once seen, the write was read


def settled(victoria: VictoriaMetrics, match: str) -> list[dict[str, Any]]:
    """What VictoriaMetrics exports for ``match`` once two looks 0.3 s apart agree (it drops some lines without a
    word, so there is no count to wait for)."""
    def look() -> list[dict[str, Any]]:
        return sorted(victoria.export(match, min_samples=0), key=lambda s: json.dumps(s, sort_keys=True))

    deadline = time.monotonic() + 5
    last = look()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = look()
        if now == last:
            return now
        last = now
    raise AssertionError(f"VictoriaMetrics' answer for {match} did not settle within 5 s")


def stored(influxdb: InfluxDB1, victoria: VictoriaMetrics, password_file: str, token_file: str,
           encode: str) -> tuple[dict[int, str], dict[int, str]]:
    """What each server keeps as the ``vm`` tag of each name (by index); a name missing was dropped."""
    encoded = lines(encode)
    V1Writer(influxdb.url, "kvm", username=INFLUX_USER, password_file=password_file).write(encoded)
    V2Writer(victoria.url, org="o", bucket="kvm", token_file=token_file).write(encoded)
    rows = influxdb.rows(f"SELECT x FROM kvm_vm WHERE host = '{encode}' AND i != 'end' GROUP BY *", db="kvm")
    victoria.export(f'{{__name__="kvm_vm_x",host="{encode}",i="end"}}', min_samples=1, timeout=5)
    series = settled(victoria, f'{{__name__="kvm_vm_x",host="{encode}",i!="end"}}')
    return {int(r["i"]): r["vm"] for r in rows}, {int(s["metric"]["i"]): s["metric"]["vm"] for s in series}


def test_backslash_names_are_stored_the_same_by_influxdb1_and_victoriametrics(
    influxdb: InfluxDB1, victoria: VictoriaMetrics, password_file: str, tmp_path: Path
) -> None:
    token_file = secret_file(tmp_path, "token", "tok")
    v1, v2 = stored(influxdb, victoria, password_file, token_file, "kvmfleet")
    want = {i: stand_in(n).replace("\n", "\\n").replace("\t", "\\t") for i, n in enumerate(NAMES)}
    assert v1 == want and v2 == want

    # influxdb-client's bytes, for the record: each ambiguous name is stored differently, or dropped by one
    v1, v2 = stored(influxdb, victoria, password_file, token_file, "point")
    differ = {NAMES[i] for i in range(len(NAMES)) if v1.get(i) != v2.get(i) or v1.get(i) != NAMES[i]}
    assert differ == AMBIGUOUS, sorted(differ ^ AMBIGUOUS)
