"""collectd glue for kvmfleet: ``Import "kvmfleet.collectd_plugin"`` and a ``<Module "kvmfleet.collectd_plugin">``
block in collectd's ``<Plugin python>`` (see ``docs/plugin.md``; ``kvmfleet collectd-config`` writes one).

Only callbacks live here; the work is in :mod:`kvmfleet.options` and :mod:`kvmfleet.agent`:

* config: the ``<Module>`` block -> :func:`~kvmfleet.options.parse_config` and the writer (secret files read now).
  Each mistake is logged as one error line naming the option, its value and what was expected; the plugin then
  stays inactive (no read callback, no thread, nothing written) while collectd goes on with its other plugins.
* init: learn collectd's ``Hostname``, open the source, read the spool, start the sender thread and the spool's
  journal thread (it keeps the lines that wait on disk: :mod:`kvmfleet.ship.journal`), register the read callback.
* read: :meth:`~kvmfleet.agent.Agent.read` (one sample; no network I/O; lines go to a bounded buffer).
* shutdown: flush for up to ``Timeout`` seconds, spool what is left (mode 0600), join the threads.

Log lines of the ``kvmfleet`` loggers go to collectd's log, prefixed ``kvmfleet:``.
"""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import Sequence
from typing import Any

import collectd

from . import agent as _agent
from . import options as _options
from .points import AGENT_PLUGIN_NAME

MODULE = _agent.MODULE_NAME


class CollectdLogHandler(logging.Handler):
    """Python logging -> collectd's log (``collectd.error`` / ``warning`` / ``info`` / ``debug``)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.levelno >= logging.ERROR:
                exc = record.exc_info[1]
                text += f" ({type(exc).__name__}: {exc})"
            if not text.startswith("kvmfleet"):
                text = "kvmfleet: " + text
            if record.levelno >= logging.ERROR:
                collectd.error(text)
            elif record.levelno >= logging.WARNING:
                collectd.warning(text)
            elif record.levelno >= logging.INFO:
                collectd.info(text)
            else:
                collectd.debug(text)
        except Exception:  # logging must never break a callback
            pass


class _State:
    def __init__(self) -> None:
        self.configured = 0
        self.failed = False
        self.config: _options.AgentConfig | None = None
        self.writer: Any = None
        self.agent: _agent.Agent | None = None
        self.read_id: Any = None
        self.values: Any = None
        self.dispatch_errors = 0


STATE = _State()
_handler = CollectdLogHandler()


def _install_logging() -> None:
    logger = logging.getLogger("kvmfleet")
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # no second copy through the root logger / stderr


def _inactive(reason: str) -> None:
    STATE.failed = True
    collectd.error(f"kvmfleet: plugin inactive: {reason}; nothing is read, dispatched or shipped until it is fixed "
                   f"and collectd restarted")


def config(conf: Any) -> None:
    """collectd config callback for ``<Module "kvmfleet.collectd_plugin">``."""
    STATE.configured += 1
    if STATE.configured > 1:
        collectd.error(f'kvmfleet: config: <Module "{MODULE}"> appears more than once: expected one block')
        _inactive("configured twice")
        return
    entries = [_options.ConfigEntry(str(child.key), tuple(child.values), len(child.children))
               for child in conf.children]
    try:
        cfg = _options.parse_config(entries)
        writer = _options.build_writer(cfg)
    except _options.ConfigError as e:
        for problem in e.problems:
            collectd.error(f"kvmfleet: config: {problem}")
        _inactive(f"{len(e.problems)} configuration error(s) in <Module \"{MODULE}\">")
        return
    except Exception as e:  # a bug: say it, stay inactive, keep collectd running
        collectd.error(f"kvmfleet: config: unexpected {type(e).__name__}: {e}")
        _inactive("unexpected error while reading the configuration")
        return
    STATE.config = cfg
    STATE.writer = writer


def collectd_hostname() -> str:
    """collectd's ``Hostname`` (as it fills in values dispatched with an empty host).

    A throwaway write callback receives one value written to it alone (``Values.write(destination=...)``, which
    skips the cache, the filter chains and every other writer), then is unregistered. Falls back to
    ``socket.gethostname()``.
    """
    seen: list[str] = []

    def probe(values: Any, data: Any = None) -> None:
        seen.append(str(values.host))

    ident = None
    try:
        ident = collectd.register_write(probe, name="kvmfleet_hostname_probe")
        collectd.Values(type="gauge", plugin=AGENT_PLUGIN_NAME, type_instance="hostname_probe",
                        values=[0]).write(destination=ident)
    except Exception as e:
        collectd.warning(f"kvmfleet: cannot learn collectd's Hostname ({type(e).__name__}: {e}); "
                         f"using the system host name")
    finally:
        if ident is not None:
            try:
                collectd.unregister_write(ident)
            except Exception:
                pass
    return seen[0] if seen and seen[0] else socket.gethostname()


def _sink(plugin: str, plugin_instance: str, time_s: float, types: Sequence[str], names: Sequence[str],
          values: Sequence[int | float]) -> int:
    """Dispatch one group of values (see :class:`kvmfleet.points.ValueSink`)."""
    vl = STATE.values
    vl.plugin = plugin
    vl.plugin_instance = plugin_instance
    vl.time = time_s
    dispatch = vl.dispatch
    done = 0
    current = ""
    for type_, name, value in zip(types, names, values):
        if type_ != current:  # fewer keyword arguments per call: the type changes rarely within a group
            vl.type = current = type_
        try:
            dispatch(type_instance=name, values=[value])
            done += 1
        except Exception:  # RuntimeError from collectd ("read the logs"), OverflowError for > int64
            STATE.dispatch_errors += 1
    return done


def init() -> None:
    """collectd init callback: start the agent and register the read callback (valid config only)."""
    if STATE.failed:
        return
    cfg = STATE.config
    if cfg is None:  # Import without a <Module> block: the defaults
        cfg = _options.parse_config([])
        collectd.info(f'kvmfleet: no <Module "{MODULE}"> block: using the defaults')
    hostname = collectd_hostname()
    agent = _agent.Agent(cfg, STATE.writer)
    try:
        if cfg.dispatch:
            STATE.values = collectd.Values()
        agent.start(hostname, sink=_sink if cfg.dispatch else None)
        kwargs: dict[str, Any] = {"name": "kvmfleet"}
        if cfg.interval:
            kwargs["interval"] = cfg.interval
        STATE.read_id = collectd.register_read(read, **kwargs)
    except Exception as e:
        collectd.error(f"kvmfleet: init: {type(e).__name__}: {e}")
        try:
            agent.stop(timeout=1.0)
        except Exception:
            pass
        _inactive("the agent could not start")
        return
    STATE.agent = agent
    # what the imports and the start made lives as long as collectd: moved out of the cyclic collector's reach, so
    # that a full collection (every few samples) walks only what samples make
    gc.freeze()
    collectd.info(f"kvmfleet: active on host {hostname}: {cfg.summary()}")


def read(data: Any = None) -> None:
    """collectd read callback: one sample (never raises; failures are logged once per kind)."""
    agent = STATE.agent
    if agent is not None:
        agent.read()


def shutdown() -> None:
    """collectd shutdown callback: flush within Timeout seconds, spool the rest, join the threads."""
    agent = STATE.agent
    if agent is None:
        return
    STATE.agent = None
    try:
        final = agent.stop()
    except Exception as e:
        collectd.error(f"kvmfleet: shutdown: {type(e).__name__}: {e}")
        return
    if final is not None:
        collectd.info(f"kvmfleet: stopped: {final['sent']} lines sent, {final['spooled']} spooled, "
                      f"{final['dropped']} dropped (buffer full), {final['dropped_rejected']} rejected, "
                      f"{final['lost_at_stop']} lost")
    else:
        collectd.info("kvmfleet: stopped")


_install_logging()
collectd.register_config(config)
collectd.register_init(init)
collectd.register_shutdown(shutdown)
