"""A fast InfluxDB line-protocol encoder, byte-for-byte the same as influxdb-client's ``Point``.

Hot path: a collector emits hundreds of points per sample with the same tag sets each time, so the
``measurement,tag=value,...`` part is encoded once per series with :func:`series_prefix` and each sample
only encodes its fields::

    prefix = series_prefix("kvm_vm", {"host": "hv1", "vm": "web-1"})    # once per series
    text = line(prefix, {"exits": 123, "halt_exits": 4}, ts_ns)           # each sample

Rules (those of influxdb-client 1.50's ``Point.to_line_protocol()``, which tests check against):

* measurement: ``,`` and space are backslash-escaped; tag keys, tag values and field keys: ``,``, ``=`` and
  space. In all of them newline, tab and carriage return become the two characters ``\\n``, ``\\t``,
  ``\\r``.
* one deliberate difference, in tag values only: a backslash followed by a backslash, ``,``, space, newline, tab,
  carriage return, or ending the value, becomes U+FF3C FULLWIDTH REVERSE SOLIDUS. InfluxDB 1.x and
  VictoriaMetrics read such a backslash differently (1.x keeps ``\\\\`` as two backslashes and treats any
  separator after a backslash as escaped; VictoriaMetrics turns ``\\\\`` into one and counts the backslashes
  before a separator), so no bytes give the same value on both: VictoriaMetrics silently dropped the line of a
  VM named ``a\\ b``, and stored ``a\\\\b`` as ``a\\b``. Point appends a space to a value ending in a
  backslash, which both servers store as that space. Every other backslash (before a letter, a digit, ``=``...)
  is kept and reads the same on both (``docs/schema.md``, "Names with a backslash").
* tags are sorted by key (InfluxDB's canonical order); a tag whose value is ``None`` or whose key or value is
  empty is left out. Fields are sorted by key too.
* field values: ``bool`` -> ``true``/``false``; ``int`` -> ``123i``; ``float`` -> ``repr`` without a
  trailing ``.0`` (non-finite floats are skipped); ``str`` -> double-quoted with ``"`` and ``\\`` escaped.
  A field whose value is ``None`` is skipped; a point with no field left yields ``""`` (no line).
* the timestamp is an integer in nanoseconds, or absent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Union

FieldValue = Union[int, float, bool, str]

_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})
# A backslash in a tag value that InfluxDB 1.x and VictoriaMetrics would read differently (see the module doc).
_AMBIGUOUS_BACKSLASH = re.compile(r"\\(?=[\\, \n\t\r]|\Z)")
BACKSLASH_STAND_IN = "\uff3c"

# Field keys repeat from sample to sample: remember their escaped form (bounded; cleared when full).
_KEY_CACHE: dict[str, str] = {}
_KEY_CACHE_MAX = 65536


def escape_measurement(name: str) -> str:
    return str(name).translate(_ESCAPE_MEASUREMENT)


def escape_key(key: str) -> str:
    """Escape a tag key or a field key."""
    return str(key).translate(_ESCAPE_KEY)


def escape_tag_value(value: object) -> str:
    """Escape a tag value; an ambiguous backslash becomes :data:`BACKSLASH_STAND_IN` (see the module doc)."""
    text = str(value)
    if "\\" in text:
        text = _AMBIGUOUS_BACKSLASH.sub(BACKSLASH_STAND_IN, text)
    return text.translate(_ESCAPE_KEY)


def escape_string(value: str) -> str:
    """Escape the inside of a string field value (the quotes are not included)."""
    return str(value).translate(_ESCAPE_STRING)


def _field_key(key: str) -> str:
    esc = _KEY_CACHE.get(key)
    if esc is None:
        if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
            _KEY_CACHE.clear()
        esc = _KEY_CACHE[key] = str(key).translate(_ESCAPE_KEY)
    return esc


def encode_tags(tags: Mapping[str, object] | None) -> str:
    """``,k=v,k2=v2`` (sorted by key, leading comma) or ``""``."""
    if not tags:
        return ""
    parts = []
    for key, value in sorted(tags.items()):
        if value is None:
            continue
        k = escape_key(key)
        v = escape_tag_value(value)
        if k and v:
            parts.append(f",{k}={v}")
    return "".join(parts)


def series_prefix(measurement: str, tags: Mapping[str, object] | None = None) -> str:
    """The ``measurement,tag=value,...`` part of a line, to encode once per series."""
    return escape_measurement(measurement) + encode_tags(tags)


def encode_value(value: FieldValue) -> str | None:
    """One field value as line protocol, or ``None`` if it is to be skipped (``None``, NaN, infinities)."""
    t = type(value)
    if t is int:
        return f"{value}i"
    if t is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            return None
        s = str(value)
        return s[:-2] if s.endswith(".0") else s
    if t is str:
        return '"' + value.translate(_ESCAPE_STRING) + '"'  # type: ignore[union-attr]
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):  # int subclasses (IntEnum, ...): as the client does, via str()
        return f"{value!s}i"
    if isinstance(value, float):
        return encode_value(float(value))
    if isinstance(value, str):
        return '"' + escape_string(value) + '"'
    raise ValueError(f"unsupported field value type {type(value).__name__}")


def encode_fields(fields: Mapping[str, FieldValue | None]) -> str:
    """``k=1i,k2=2.5,...`` sorted by key; ``None`` values are skipped; ``""`` if nothing is left."""
    parts = []
    for key, value in sorted(fields.items()):
        t = type(value)
        if t is int:
            parts.append(f"{_field_key(key)}={value}i")
            continue
        enc = encode_value(value)  # type: ignore[arg-type]
        if enc is not None:
            parts.append(f"{_field_key(key)}={enc}")
    return ",".join(parts)


def encode_int_fields(fields: Mapping[str, int]) -> str:
    """:func:`encode_fields` for fields that are all plain ``int`` (no check): the collector's fast path."""
    return ",".join([f"{_field_key(k)}={v}i" for k, v in sorted(fields.items())])


def int_fields_template(names: Iterable[str]) -> str:
    """``k1=%di,k2=%di,...`` for these field names (escaped, in the order given), to fill with
    ``template % values``: the fast path for many lines that carry the same integer fields."""
    return ",".join(_field_key(name).replace("%", "%%") + "=%di" for name in names)


def line(prefix: str, fields: str | Mapping[str, FieldValue | None], ts_ns: int | None = None) -> str:
    """One line from a :func:`series_prefix`, fields (a mapping, or already encoded) and a ns timestamp.

    Returns ``""`` when there is no field (callers skip it; :meth:`Shipper.submit` ignores empty lines).
    """
    encoded = fields if isinstance(fields, str) else encode_fields(fields)
    if not encoded:
        return ""
    if ts_ns is None:
        return f"{prefix} {encoded}"
    return f"{prefix} {encoded} {int(ts_ns)}"


def encode_point(
    measurement: str,
    tags: Mapping[str, object] | None,
    fields: Mapping[str, FieldValue | None],
    ts_ns: int | None = None,
) -> str:
    """One line in one call (no prefix reuse)."""
    return line(series_prefix(measurement, tags), fields, ts_ns)


def lines_for_series(
    prefix: str, samples: Iterable[tuple[Mapping[str, FieldValue | None], int | None]]
) -> list[str]:
    """Lines for many samples of one series; samples without fields are left out."""
    out = []
    for fields, ts in samples:
        text = line(prefix, fields, ts)
        if text:
            out.append(text)
    return out
