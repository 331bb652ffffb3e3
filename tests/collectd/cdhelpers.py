"""Run Debian's collectd (``collectd -f -C FILE``) with the kvmfleet plugin, and read what it left behind.

A :class:`Collectd` writes a config (global options, logfile with severities, optionally csv, and the fragment
:func:`kvmfleet.collectd_config.render` produces, i.e. what ``kvmfleet collectd-config`` prints), starts collectd
in the foreground as a subprocess, and offers its log, its csv values, its RSS and CPU time.
"""

from __future__ import annotations

import bisect
import glob
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_for  # noqa: F401  (the collectd tests import it from here)

from kvmfleet.collectd_config import render

HOSTNAME = "cdt-hv1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def collectd_binary() -> str:
    path = shutil.which("collectd") or ("/usr/sbin/collectd" if os.access("/usr/sbin/collectd", os.X_OK) else None)
    if path is None:
        raise RuntimeError("collectd is not installed: the Debian package 'collectd-core' is missing "
                           "(scripts/install-deps)")
    return path


class Collectd:
    """One collectd instance in ``workdir``: ``start()``, ``stop()``, ``log()``, ``csv_times()``, ``rss_kb()``."""

    def __init__(self, workdir: Path, options: Sequence[tuple[str, Sequence[Any]]] | None = None, *,
                 raw_module: str | None = None, csv: bool = True, interval: float = 1,
                 hostname: str = HOSTNAME, read_threads: int = 5) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "collectd.log"
        self.csv_dir = self.dir / "csv"
        self.conf_path = self.dir / "collectd.conf"
        self.hostname = hostname
        self.proc: subprocess.Popen[bytes] | None = None
        self.exe = collectd_binary()
        head = [
            f'Hostname "{hostname}"',
            "FQDNLookup false",
            f"Interval {interval:g}",
            f"ReadThreads {read_threads}",
            "AutoLoadPlugin false",
            f'BaseDir "{self.dir}"',
            f'PIDFile "{self.dir / "collectd.pid"}"',
            "LoadPlugin logfile",
            "<Plugin logfile>",
            "  LogLevel info",
            f'  File "{self.log_path}"',
            "  Timestamp true",
            "  PrintSeverity true",
            "</Plugin>",
        ]
        if csv:
            head += ["LoadPlugin csv", "<Plugin csv>", f'  DataDir "{self.csv_dir}"', "</Plugin>"]
        fragment = raw_module if raw_module is not None else render(list(options or []))
        self.conf_path.write_text("\n".join(head) + "\n\n" + fragment)

    # -- process
    def start(self) -> Collectd:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        out = open(self.dir / "collectd.stdout", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen([self.exe, "-f", "-C", str(self.conf_path)], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)
        finally:
            out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM and wait; returns the seconds collectd took to exit (SIGKILL and AssertionError past
        ``timeout``)."""
        proc = self.proc
        if proc is None:
            return 0.0
        t0 = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise AssertionError(f"collectd did not exit within {timeout:g}s of SIGTERM:\n{self.log()[-3000:]}"
                                     ) from None
        return time.monotonic() - t0

    def run_once(self, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``collectd -T -C FILE``: parse the config, init, one read of every plugin, shutdown."""
        return subprocess.run([self.exe, "-T", "-C", str(self.conf_path)], capture_output=True, text=True,
                              timeout=timeout, cwd=self.dir)

    def test_config(self) -> subprocess.CompletedProcess[str]:
        """``collectd -t -C FILE`` (in 5.12 it exits 0 without reading the file: see docs/plugin.md)."""
        return subprocess.run([self.exe, "-t", "-C", str(self.conf_path)], capture_output=True, text=True,
                              timeout=60, cwd=self.dir)

    # -- what it left
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.log().splitlines() if needle in line]

    def csv_values(self, plugin_dir: str, value_file: str) -> list[tuple[float, float]]:
        """(epoch, value) rows of ``csv/<host>/<plugin_dir>/<value_file>-<date>`` files, in time order."""
        rows: list[tuple[float, float]] = []
        pattern = str(self.csv_dir / self.hostname / plugin_dir / f"{value_file}-*")
        for path in sorted(glob.glob(pattern)):
            for line in Path(path).read_text().splitlines():
                fields = line.split(",")
                if line[:1].isdigit() and len(fields) >= 2 and fields[1]:  # (a line being written may be partial)
                    rows.append((float(fields[0]), float(fields[1])))
        return sorted(rows)

    def sample_times_ms(self) -> list[int]:
        """The time of every sample the plugin took, from the host total ``exits`` it dispatched (csv, ms)."""
        return [round(t * 1000) for t, _ in self.csv_values("kvm", "derive-exits")]

    def status(self, key: str) -> int:
        """A /proc/<pid>/status field in kB (VmRSS, VmHWM, ...)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def rss_kb(self) -> int:
        return self.status("VmRSS")

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads) so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def __enter__(self) -> Collectd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.running():
            self.stop()


def unmatched(sample_ms: Sequence[int], stored_ns: Sequence[int], slack_ms: int = 2) -> list[int]:
    """The sample times (ms, from collectd's csv: rounded through collectd's 2^-30 s clock) that have no stored
    point (ns) within ``slack_ms``."""
    stored = sorted(t / 1e6 for t in stored_ns)

    missing = []
    for t in sample_ms:
        i = bisect.bisect_left(stored, t - slack_ms)
        if i >= len(stored) or stored[i] > t + slack_ms:
            missing.append(t)
    return missing
