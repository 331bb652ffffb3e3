"""kvmfleet's collectd agent without collectd: the sampler.

:mod:`kvmfleet.collectd_plugin` is the thin glue that hands collectd's ``<Module>`` block to
:func:`kvmfleet.options.parse_config`, builds an :class:`Agent` in its init callback and calls :meth:`Agent.read`
from its read callback. Nothing here imports ``collectd``: tests and tools use it as a plain library.

Per read, :meth:`Agent.read` takes one :meth:`Collector.sample`, turns it into line protocol and dispatched values
(:class:`kvmfleet.points.PointBuilder`), hands the lines to the shipper's bounded buffer (never the network) and the
values to a :class:`~kvmfleet.points.ValueSink` (collectd's ``Values.dispatch`` in the glue).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from . import schema
from .collector import Collector
from .exitreasons import ExitReasonSource
from .facts import HostFacts, gather
from .logsay import SayOnce
from .options import AgentConfig
from .points import AGENT_PLUGIN_NAME, PointBuilder, ValueSink
from .ship import LineBuffer, Shipper, make_writer
from .ship.writers import Writer
from .sources import make_source
from .sources.base import Source

log = logging.getLogger("kvmfleet.agent")

MODULE_NAME = "kvmfleet.collectd_plugin"


@dataclass
class ReadStats:
    """What the last read did (also the ``kvmfleet_agent`` point)."""

    sample_duration_s: float = 0.0  # Collector.sample() wall time
    read_duration_s: float = 0.0  # the whole read callback up to building the agent point, wall
    read_cpu_s: float = 0.0  # the same in CPU time of the read thread
    points: int = 0
    dispatched: int = 0
    vms: int = 0
    vms_refused: int = 0
    reads: int = 0
    failures: int = 0


class Agent:
    """The sampler: one :class:`Collector` sample per :meth:`read`, lines to the shipper, values to the sink.

    Life cycle (collectd's callbacks): ``Agent(cfg, writer)`` after :func:`parse_config` and
    :func:`build_writer` (config), :meth:`start` (init: opens the source, reads the spool, starts the sender
    thread and the spool's journal thread), :meth:`read` (read: no network or disk I/O, never waits on either
    thread), :meth:`stop` (shutdown: flush within ``Timeout`` seconds, spool the rest, join the threads).
    """

    def __init__(self, config: AgentConfig, writer: Writer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.writer = writer
        self.shipper: Shipper | None = None
        self.collector: Collector | None = None
        self.builder: PointBuilder | None = None
        self.sink: ValueSink | None = None
        self.facts: HostFacts | None = None
        self.stats = ReadStats()
        self.say = SayOnce(logging.getLogger("kvmfleet"))
        self._clock = clock
        self._facts_at = -math.inf
        self._gather = gather

    def start(self, hostname: str, sink: ValueSink | None = None, source: Source | None = None) -> None:
        cfg = self.config
        self.builder = PointBuilder(cfg, hostname)
        self.sink = sink if cfg.dispatch else None
        self.collector = Collector(source if source is not None else make_source(cfg.source, say=self.say,
                                                                                   libvirt_uri=cfg.libvirt_uri),
                                   say=self.say, reasons=self._open_reasons())
        if cfg.ship is not None:
            writer = self.writer if self.writer is not None else make_writer(cfg.ship)
            self.writer = writer
            self.shipper = Shipper(writer, LineBuffer(cfg.ship.buffer_lines), cfg.ship.spool_path or None,
                                   batch_lines=cfg.ship.batch_lines, retry_min=cfg.ship.retry_min,
                                   retry_max=cfg.ship.retry_max)
            self.shipper.start()
        self._refresh_facts()

    def _open_reasons(self) -> ExitReasonSource | None:
        """The exit reasons source when ``ExitReasons`` asks for it. One that cannot count here says why once (through
        this agent's SayOnce) and is kept: the counters are read as usual and the samples carry no reasons."""
        cfg = self.config
        if cfg.exit_reasons == "off":
            return None
        reasons = ExitReasonSource(per_vm=cfg.exit_reasons == "vm", mechanism=cfg.exit_reasons_mechanism,
                                   max_fds=cfg.exit_reasons_max_fds, say=self.say)
        if reasons.usability():
            where = "host-wide and per VM" if cfg.exit_reasons == "vm" else "host-wide"
            log.info("kvmfleet: exit reasons: counting %s with %s (%d fds)", where, reasons.mechanism_name,
                     reasons.fds())
        return reasons

    def _refresh_facts(self) -> None:
        now = self._clock()
        if now - self._facts_at < self.config.facts_interval:
            return
        self._facts_at = now
        try:
            self.facts = self._gather()
        except Exception as e:  # gather() is not meant to raise; keep sampling with the facts we had
            self.say("facts", f"kvmfleet: cannot read host facts: {type(e).__name__}: {e}")
            return
        self.say.forget("facts")
        if self.builder is not None:
            self.builder.set_facts(self.facts)

    def read(self) -> ReadStats:
        """Take one sample, ship and dispatch it. Never raises: failures are logged once per kind."""
        if self.collector is None or self.builder is None:
            raise RuntimeError("Agent.read() before start()")
        c0, t0 = time.thread_time(), time.perf_counter()
        st = self.stats
        st.reads += 1
        try:
            sample = self.collector.sample()
        except Exception as e:
            st.failures += 1
            self.say("sample", f"kvmfleet: reading the KVM statistics failed: {type(e).__name__}: {e}",
                     logging.ERROR)
            log.debug("sample failure", exc_info=True)
            return st
        self.say.forget("sample")
        try:
            self._refresh_facts()
            shipping = self.shipper is not None
            result = self.builder.build(sample, lines=shipping, sink=self.sink)
            lines = result.lines
            if shipping:
                lines.append(self.builder.facts_line(sample))
            st.sample_duration_s = sample.duration_s
            st.vms = len(sample.vms)
            st.vms_refused = len(sample.refused)
            st.dispatched = result.dispatched
            st.points = len(lines) + (1 if shipping else 0)
            st.read_duration_s = time.perf_counter() - t0
            st.read_cpu_s = time.thread_time() - c0
            ship = self.shipper.stats() if self.shipper is not None else None
            if shipping:
                text = self.builder.agent_line(self.agent_fields(ship), sample.time_ns)
                if text:
                    lines.append(text)
                assert self.shipper is not None
                self.shipper.submit(lines)
            if self.sink is not None:
                self._dispatch_self(ship, sample.time_ns / 1e9)
            self.say.forget("build")
        except Exception as e:
            st.failures += 1
            self.say("build", f"kvmfleet: building or queueing points failed: {type(e).__name__}: {e}",
                     logging.ERROR)
            log.debug("build failure", exc_info=True)
        return st

    def agent_fields(self, ship: Mapping[str, Any] | None) -> dict[str, int | float | str | bool | None]:
        st = self.stats
        fields: dict[str, int | float | str | bool | None] = {
            "sample_duration_s": round(st.sample_duration_s, 6),
            "read_duration_s": round(st.read_duration_s, 6),
            "read_cpu_s": round(st.read_cpu_s, 6),
            "points": st.points,
            "dispatched": st.dispatched,
            "read_failures": st.failures,
            "vms_refused": st.vms_refused,
        }
        if ship is not None:
            for name in schema.AGENT_SHIP_FIELDS:
                fields[name] = str(ship[name] or "") if name == "last_error" else int(ship[name])
        return fields

    def _dispatch_self(self, ship: Mapping[str, Any] | None, time_s: float) -> None:
        assert self.sink is not None
        st = self.stats
        names: list[str] = list(schema.AGENT_GAUGES)
        types: list[str] = ["gauge"] * len(names)
        values: list[int | float] = [getattr(st, name) for name in names]
        if ship is not None:
            for type_, group in (("derive", schema.AGENT_SHIP_DERIVES), ("gauge", schema.AGENT_SHIP_GAUGES)):
                names += group
                types += [type_] * len(group)
                values += [int(ship[name]) for name in group]
        self.sink(AGENT_PLUGIN_NAME, "", time_s, types, names, values)

    def stop(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Stop the sender (flush for up to ``timeout``, default the Timeout option; spool the rest), close the
        source. Returns the shipper's final stats (None without shipping)."""
        final = None
        if self.shipper is not None:
            budget = timeout if timeout is not None else (self.config.ship.timeout if self.config.ship else 10.0)
            final = self.shipper.stop(timeout=budget)
            self.shipper = None
        if self.collector is not None:
            try:
                self.collector.close()
            finally:
                self.collector = None
        return final
