"""A stand-in for collectd's ``collectd`` Python module, for unit tests of the glue (kvmfleet.collectd_plugin).

It records what a plugin registers, logs and dispatches, and lets a test drive the callbacks the way collectd
5.12's python plugin does (config with a :class:`Config` tree, init, read, shutdown). ``install()`` puts a fresh
stub in ``sys.modules["collectd"]`` and (re)imports the glue module against it.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import Any, Callable


class Config:
    """collectd.Config: ``key``, ``values`` (tuple of str/float/bool), ``children``, ``parent``."""

    def __init__(self, key: str, values: tuple[Any, ...] = (), children: list[Config] | None = None,
                 parent: Config | None = None) -> None:
        self.key = key
        self.values = tuple(values)
        self.children = tuple(children or ())
        self.parent = parent
        for child in self.children:
            child.parent = self


def module_block(*lines: tuple[Any, ...], name: str = "kvmfleet.collectd_plugin") -> Config:
    """A ``<Module "name">`` block from ``(Key, value, ...)`` tuples; numbers become floats like collectd's."""
    children = []
    for key, *values in lines:
        conv = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values)
        children.append(Config(key, conv))
    return Config("Module", (name,), children)


class StubCollectd(types.ModuleType):
    """The module object. ``hostname`` is what collectd fills in for values with an empty host."""

    def __init__(self, hostname: str = "stubhost") -> None:
        super().__init__("collectd")
        self.hostname = hostname
        self.logs: list[tuple[str, str]] = []
        self.dispatched: list[dict[str, Any]] = []
        self.configs: list[Callable[..., Any]] = []
        self.inits: list[Callable[..., Any]] = []
        self.reads: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
        self.shutdowns: list[Callable[..., Any]] = []
        self.writes: dict[str, Callable[..., Any]] = {}
        self.fail_dispatch = False
        stub = self

        class Values:
            def __init__(self, **kw: Any) -> None:
                self.host = ""
                self.plugin = ""
                self.plugin_instance = ""
                self.type = ""
                self.type_instance = ""
                self.values: list[Any] = []
                self.time = 0.0
                self.interval = 0.0
                for k, v in kw.items():
                    setattr(self, k, v)

            def _merged(self, kw: dict[str, Any]) -> dict[str, Any]:
                out = {k: getattr(self, k) for k in ("host", "plugin", "plugin_instance", "type", "type_instance",
                                                     "values", "time", "interval")}
                out.update(kw)
                if not out["type"]:
                    raise RuntimeError("type not set")
                if not out["host"]:
                    out["host"] = stub.hostname
                return out

            def dispatch(self, **kw: Any) -> None:
                if stub.fail_dispatch:
                    raise RuntimeError("error dispatching values, read the logs")
                stub.dispatched.append(self._merged(kw))

            def write(self, destination: str | None = None, **kw: Any) -> None:
                merged = Values(**self._merged(kw))
                targets = [destination] if destination else list(stub.writes)
                for name in targets:
                    stub.writes[name](merged)

        self.Values = Values

    # -- registration (returns identifiers like "python.<name>")
    def register_config(self, callback: Callable[..., Any], data: Any = None, name: str | None = None) -> str:
        self.configs.append(callback)
        return f"python.{name or callback.__module__}"

    def register_init(self, callback: Callable[..., Any], data: Any = None, name: str | None = None) -> str:
        self.inits.append(callback)
        return f"python.{name or callback.__module__}"

    def register_shutdown(self, callback: Callable[..., Any], data: Any = None, name: str | None = None) -> str:
        self.shutdowns.append(callback)
        return f"python.{name or callback.__module__}"

    def register_read(self, callback: Callable[..., Any], interval: float | None = None, data: Any = None,
                      name: str | None = None) -> str:
        ident = f"python.{name or callback.__module__}"
        self.reads[ident] = (callback, {"interval": interval})
        return ident

    def register_write(self, callback: Callable[..., Any], data: Any = None, name: str | None = None) -> str:
        ident = f"python.{name or callback.__module__}"
        self.writes[ident] = callback
        return ident

    def unregister_write(self, ident: str) -> None:
        if ident not in self.writes:
            raise RuntimeError(f"Unable to unregister write callback '{ident}'.")
        del self.writes[ident]

    # -- logging
    def error(self, msg: str) -> None:
        self.logs.append(("error", msg))

    def warning(self, msg: str) -> None:
        self.logs.append(("warning", msg))

    def notice(self, msg: str) -> None:
        self.logs.append(("notice", msg))

    def info(self, msg: str) -> None:
        self.logs.append(("info", msg))

    def debug(self, msg: str) -> None:
        self.logs.append(("debug", msg))

    # -- driving the plugin like collectd does
    def run_config(self, block: Config) -> None:
        for cb in self.configs:
            cb(block)

    def run_init(self) -> None:
        for cb in self.inits:
            cb()

    def run_reads(self, times: int = 1) -> None:
        for _ in range(times):
            for cb, _opts in list(self.reads.values()):
                cb()

    def run_shutdown(self) -> None:
        for cb in self.shutdowns:
            cb()

    def messages(self, level: str | None = None) -> list[str]:
        return [m for lvl, m in self.logs if level is None or lvl == level]


def install(hostname: str = "stubhost") -> tuple[StubCollectd, types.ModuleType]:
    """A fresh stub as ``collectd`` and the glue module freshly imported against it: (stub, plugin module)."""
    stub = StubCollectd(hostname)
    sys.modules["collectd"] = stub
    sys.modules.pop("kvmfleet.collectd_plugin", None)
    plugin = importlib.import_module("kvmfleet.collectd_plugin")
    return stub, plugin


def uninstall() -> None:
    """Remove the stub and the glue module, and the glue's log handler from the ``kvmfleet`` logger."""
    sys.modules.pop("collectd", None)
    sys.modules.pop("kvmfleet.collectd_plugin", None)
    logger = logging.getLogger("kvmfleet")
    for handler in list(logger.handlers):
        if type(handler).__name__ == "CollectdLogHandler":
            logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
