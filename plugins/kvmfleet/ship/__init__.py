"""Durable shipping of InfluxDB line protocol: encoder, bounded buffer, spool, writers, shipper.

Typical use (collectd's init callback builds and starts it, the read callback submits, shutdown stops)::

    from kvmfleet.ship import make_shipper
    shipper = make_shipper({"api": "v1", "url": "https://influx:8086", "database": "kvm",
                            "username": "kvm", "password_file": "/etc/kvmfleet/influx.pass"})
    shipper.start()
    shipper.submit(lines)          # never blocks on the network
    shipper.stop(timeout=10)       # flush, then spool the rest

Config keys (:class:`ShipConfig`): ``api`` ("v1" | "v2"), ``url``, ``database``, ``retention_policy``,
``username``, ``password_file`` (v1), ``org``, ``bucket``, ``token_file`` (v2), ``verify_tls``, ``ca_file``,
``allow_plain_http``,
``timeout``, ``buffer_lines``, ``spool_path``, and the tuning keys ``batch_lines``, ``retry_min``,
``retry_max``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import words
from .buffer import DEFAULT_CAPACITY, LineBuffer
from .lineproto import encode_fields, encode_int_fields, encode_point, line, series_prefix
from .shipper import Shipper
from .writers import (
    ConfigWriteError,
    PermanentWriteError,
    RetryableWriteError,
    ShipConfigError,
    V1Writer,
    V2Writer,
    WriteError,
    Writer,
)

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_SPOOL_PATH",
    "ConfigWriteError",
    "LineBuffer",
    "PermanentWriteError",
    "RetryableWriteError",
    "ShipConfig",
    "ShipConfigError",
    "Shipper",
    "V1Writer",
    "V2Writer",
    "WriteError",
    "Writer",
    "encode_fields",
    "encode_int_fields",
    "encode_point",
    "line",
    "make_shipper",
    "make_writer",
    "series_prefix",
]

DEFAULT_SPOOL_PATH = "/var/lib/kvmfleet/spool/ship.spool"


@dataclass
class ShipConfig:
    """Where and how to ship. ``password_file``/``token_file`` name files holding the secret alone."""

    api: str = "v1"
    url: str = "http://127.0.0.1:8086"
    database: str = "kvm"
    retention_policy: str | None = None
    username: str | None = None
    password_file: str | None = None
    org: str = ""
    bucket: str | None = None  # v2; default: database
    token_file: str | None = None
    verify_tls: bool = True
    ca_file: str | None = None
    allow_plain_http: bool = False  # credentials over http:// to another machine: refused unless true
    timeout: float = 10.0
    buffer_lines: int = DEFAULT_CAPACITY
    spool_path: str | None = DEFAULT_SPOOL_PATH  # None or "": no spool
    batch_lines: int = 5000
    retry_min: float = 1.0
    retry_max: float = 60.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ShipConfig:
        """Build from a dict (keys case-insensitive, ``-`` or ``_``); strings are converted; unknown keys fail."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).strip().lower().replace("-", "_")
            if key not in fields:
                raise ShipConfigError(f"unknown shipping option {raw_key!r} (known: {', '.join(sorted(fields))})")
            kwargs[key] = _convert(key, fields[key].type, value)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        self.api = str(self.api).lower()
        if self.api not in ("v1", "v2"):
            raise ShipConfigError(f"api must be 'v1' or 'v2', got {self.api!r}")
        if self.timeout <= 0:
            raise ShipConfigError("timeout must be > 0 seconds")
        if self.buffer_lines < 1:
            raise ShipConfigError("buffer_lines must be >= 1")
        if self.batch_lines < 1:
            raise ShipConfigError("batch_lines must be >= 1")


def _convert(key: str, typ: Any, value: Any) -> Any:
    t = str(typ)
    try:
        if value is None:
            return None
        if t == "bool":
            flag = value if isinstance(value, bool) else words.parse_bool(str(value))
            if flag is None:
                raise ValueError(value)
            return flag
        if t == "int":
            return int(float(value)) if isinstance(value, (int, float)) else int(str(value).strip())
        if t == "float":
            return float(value)
        text = str(value)
        if "None" in t and text.strip() == "":
            return None
        return text
    except ValueError:
        raise ShipConfigError(f"option {key!r}: bad value {value!r} (expected {t})") from None


def make_writer(cfg: ShipConfig) -> Writer:
    """The writer for ``cfg`` (reads the secret file now)."""
    if cfg.api == "v1":
        return V1Writer(
            cfg.url,
            cfg.database,
            retention_policy=cfg.retention_policy,
            username=cfg.username,
            password_file=cfg.password_file,
            verify_tls=cfg.verify_tls,
            ca_file=cfg.ca_file,
            timeout=cfg.timeout,
            allow_plain_http=cfg.allow_plain_http,
        )
    return V2Writer(
        cfg.url,
        org=cfg.org,
        bucket=cfg.bucket or cfg.database,
        token_file=cfg.token_file,
        verify_tls=cfg.verify_tls,
        ca_file=cfg.ca_file,
        timeout=cfg.timeout,
        allow_plain_http=cfg.allow_plain_http,
    )


def make_shipper(config: ShipConfig | Mapping[str, Any], **shipper_kwargs: Any) -> Shipper:
    """A ready-to-start :class:`Shipper` from a :class:`ShipConfig` or a dict of the same keys."""
    cfg = config if isinstance(config, ShipConfig) else ShipConfig.from_mapping(config)
    cfg.validate()
    writer = make_writer(cfg)
    kwargs: dict[str, Any] = {
        "batch_lines": cfg.batch_lines,
        "retry_min": cfg.retry_min,
        "retry_max": cfg.retry_max,
    }
    kwargs.update(shipper_kwargs)
    return Shipper(writer, LineBuffer(cfg.buffer_lines), cfg.spool_path or None, **kwargs)
