"""The encoder against influxdb-client's Point.to_line_protocol(), byte for byte."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from influxdb_client import Point  # type: ignore[attr-defined]

from kvmfleet.ship import lineproto
from kvmfleet.ship.lineproto import (
    encode_fields,
    encode_int_fields,
    encode_point,
    escape_measurement,
    line,
    series_prefix,
)

# Awkward text: everything that gets escaped, plus unicode, quotes, backslashes and control characters.
AWKWARD = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(',= "\\\n\t\r#\'{}')),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    max_size=12,
)
KEYS = AWKWARD.filter(lambda s: s != "")
FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    AWKWARD,
)
TAG_VALUES = st.one_of(st.none(), AWKWARD, st.integers())
TIMESTAMPS = st.one_of(st.none(), st.integers(min_value=0, max_value=2**63 - 1))


def stand_in(value: Any) -> Any:
    """A tag value as kvmfleet ships it: each backslash InfluxDB 1.x and VictoriaMetrics would read differently
    (before a backslash, a separator, a control character Point escapes, or at the end) becomes U+FF3C."""
    if not isinstance(value, str):
        return value
    return "".join("\uff3c" if ch == "\\" and (i + 1 == len(value) or value[i + 1] in "\\, \n\t\r") else ch
                   for i, ch in enumerate(value))


def reference(measurement: str, tags: dict[str, Any], fields: dict[str, Any], ts: int | None) -> str:
    """Point's line; tag values with an ambiguous backslash are given to it as kvmfleet ships them."""
    p = Point(measurement)
    for k, v in tags.items():
        p.tag(k, stand_in(v))
    for k, v in fields.items():
        p.field(k, v)
    if ts is not None:
        p.time(ts)
    return str(p.to_line_protocol())


@settings(max_examples=400, deadline=None)
@given(
    measurement=KEYS.filter(lambda s: not s.startswith("#")),
    tags=st.dictionaries(KEYS, TAG_VALUES, max_size=5),
    fields=st.dictionaries(KEYS, FIELD_VALUES, max_size=6),
    ts=TIMESTAMPS,
)
def test_same_bytes_as_influxdb_client(
    measurement: str, tags: dict[str, Any], fields: dict[str, Any], ts: int | None
) -> None:
    expected = reference(measurement, tags, fields, ts)
    assert encode_point(measurement, tags, fields, ts) == expected
    assert line(series_prefix(measurement, tags), fields, ts) == expected
    assert line(series_prefix(measurement, tags), encode_fields(fields), ts) == expected


@settings(max_examples=200, deadline=None)
@given(
    tags=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=4),
    fields=st.dictionaries(KEYS, st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=40),
    ts=st.integers(min_value=0, max_value=2**62),
)
def test_int_fast_path(tags: dict[str, str], fields: dict[str, int], ts: int) -> None:
    prefix = series_prefix("kvm_vcpu", tags)
    assert line(prefix, encode_int_fields(fields), ts) == reference("kvm_vcpu", tags, fields, ts)


def test_escaping_examples() -> None:
    assert escape_measurement("a b,c=d") == r"a\ b\,c=d"
    assert series_prefix("m", {"b": "x y", "a": "1,2=3"}) == r"m,a=1\,2\=3,b=x\ y"
    assert encode_fields({"s": 'say "hi" \\o/', "f": 1.0, "g": 2.5, "i": 7, "b": True}) == (
        r'b=true,f=1,g=2.5,i=7i,s="say \"hi\" \\o/"'
    )
    assert encode_fields({"k=1 2": 3}) == r"k\=1\ 2=3i"
    # a backslash before an ordinary character or "=" is kept, as influxdb-client does
    assert series_prefix("m", {"t": "CORP\\web01", "u": "a\\=b"}) == "m,t=CORP\\web01,u=a\\\\=b"


# (VM name, the tag value kvmfleet ships, its bytes): both servers store that value (a newline as the two
# characters \\n, as for any name). What influxdb-client's Point ships instead, and what each server made of it:
# docs/schema.md, "Names with a backslash"; tests/server/test_ship_backslash.py checks both servers.
BACKSLASH_NAMES = [
    ("x\\", "x\uff3c", "x\uff3c"),
    ("a\\\\b", "a\uff3c\\b", "a\uff3c\\b"),
    ("a\\ b", "a\uff3c b", "a\uff3c\\ b"),
    ("a\\,b", "a\uff3c,b", "a\uff3c\\,b"),
    ("a\\\nb", "a\uff3c\nb", "a\uff3c\\nb"),
    ("\\\\\\", "\uff3c\uff3c\uff3c", "\uff3c\uff3c\uff3c"),
]


@pytest.mark.parametrize(("name", "value", "shipped"), BACKSLASH_NAMES)
def test_ambiguous_backslashes_in_tag_values(name: str, value: str, shipped: str) -> None:
    """The backslashes InfluxDB 1.x and VictoriaMetrics read differently become U+FF3C."""
    assert stand_in(name) == value
    assert series_prefix("kvm_vm", {"vm": name}) == "kvm_vm,vm=" + shipped


def test_skips_none_and_non_finite() -> None:
    assert encode_fields({"a": None, "b": math.nan, "c": math.inf, "d": 1}) == "d=1i"
    assert line(series_prefix("m", {"t": None, "": "x", "u": ""}), {"a": None}, 1) == ""
    assert line("m", {"a": None, "b": 2}, 5) == "m b=2i 5"
    assert line("m", {"b": 2}) == "m b=2i"


def test_bool_is_not_int_and_big_ints() -> None:
    assert encode_fields({"a": False, "b": 2**63 - 1, "c": -(2**63)}) == (
        "a=false,b=9223372036854775807i,c=-9223372036854775808i"
    )


def test_unsupported_type() -> None:
    with pytest.raises(ValueError):
        encode_fields({"a": [1]})  # type: ignore[dict-item]


def test_lines_for_series() -> None:
    p = series_prefix("m", {"h": "x"})
    assert lineproto.lines_for_series(p, [({"a": 1}, 1), ({"a": None}, 2), ({"a": 3}, 3)]) == [
        "m,h=x a=1i 1",
        "m,h=x a=3i 3",
    ]


def test_the_hot_path_encodes_200_vms_of_40_fields() -> None:
    """200 VMs x 40 integer fields with pre-encoded prefixes, as a sample encodes them (what it costs is
    bench/ship_cost.py's figure, not a timed test's)."""
    names = [f"counter_{i}" for i in range(40)]
    prefixes = [series_prefix("kvm_vm", {"host": "hv01", "vm": f"instance-{i:04d}"}) for i in range(200)]
    values = [{n: 1_000_000 + i * 7 + j for j, n in enumerate(names)} for i in range(200)]
    ts = time.time_ns()
    out = [line(p, encode_int_fields(v), ts) for p, v in zip(prefixes, values)]
    assert len(out) == 200
    fields = ",".join(f"{n}={values[199][n]}i" for n in sorted(names))  # sorted by name
    assert out[199] == f"kvm_vm,host=hv01,vm=instance-0199 {fields} {ts}"


def test_int_fields_template_fills_to_the_encoders_bytes() -> None:
    fields = {"exits": 12, "a b,c=d": 3, "pct%": 7, "halt_exits": 0}
    names = sorted(fields)
    assert lineproto.int_fields_template(names) % tuple(fields[n] for n in names) == lineproto.encode_int_fields(fields)
