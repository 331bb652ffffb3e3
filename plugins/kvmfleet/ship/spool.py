"""The spool: a private file holding lines not yet delivered, so that a restart or a crash does not lose them.

Format v2 (text, one record a line; each record starts with the CRC-32 of the rest of it, so that a record torn
by a crash or damaged on disk is recognised and skipped while every whole record still loads)::

    # kvmfleet-spool v2
    <crc32 as 8 hex digits> L <seq> <line protocol as a JSON string>    a line, numbered by the shipper
    <crc32 as 8 hex digits> A <seq>                                     every line numbered below <seq> is done
    <crc32 as 8 hex digits> E                                           a clean stop wrote this file

While the server fails, :class:`~kvmfleet.ship.journal.Journal` appends the lines that wait and, as they are
delivered, ``A`` records; it rewrites the file with only the undelivered lines when most of it is dead, and
removes it once nothing in it is undelivered. A file another user could have planted or changed is never read
(:mod:`kvmfleet.privfile`: no link followed, owner and type checked on the fd, a directory no other user can
write to), and reading is bounded: the newest ``max_lines`` lines of the last ``max_bytes`` bytes.
Version 1 files (written at shutdown by earlier releases: a header, JSON strings, ``# end N``) are read too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Union

from .. import privfile
from ..replacefile import sync_directory

log = logging.getLogger("kvmfleet.ship.spool")

PathLike = Union[str, "os.PathLike[str]"]
HEADER = b"# kvmfleet-spool v2\n"
HEADER_V1 = b"# kvmfleet-spool v1"
END_V1 = b"# end "
MAX_RECORD_BYTES = 1 << 20  # a longer record is damage (a line of line protocol is a few kB)
LINE_BYTES_ALLOWANCE = 8 << 10  # reading stops at max_lines of this size (see read_bytes_bound)
WRITE_BLOCK_RECORDS = 512  # records encoded and written at once: bounded memory, few syscalls

Chunk = tuple[int, Sequence[str]]  # (seq of the first line, lines with consecutive seqs)


class NotASpool(ValueError):
    """A file at the spool's path that is not a spool (no header): never read, moved aside."""


@dataclass
class Spooled:
    """What reading a spool found: the lines still undelivered (oldest first) and what could not be kept."""

    lines: list[str] = field(default_factory=list)
    version: int = 2
    records: int = 0  # whole records read
    damaged: int = 0  # records that failed their check (or did not parse) and were skipped
    torn: bool = False  # the last record was cut short: a crash while it was written
    over: int = 0  # undelivered lines older than the newest max_lines: dropped
    skipped_bytes: int = 0  # the start of a file longer than max_bytes, not read
    clean: bool = False  # written by a clean stop

    def problems(self) -> list[str]:
        """What was dropped, in words (empty when nothing was)."""
        out = []
        if self.damaged:
            out.append(f"{self.damaged} damaged record(s) skipped")
        if self.torn:
            out.append("its last record was cut short (a crash while writing) and skipped")
        if self.over:
            out.append(f"{self.over} older line(s) beyond the buffer's capacity dropped")
        if self.skipped_bytes:
            out.append(f"its first {self.skipped_bytes} bytes (beyond the size bound) not read")
        return out


def read_bytes_bound(max_lines: int) -> int:
    """How much of a spool is read at most: ``max_lines`` lines of 8 KiB, twice (dead records), plus 16 MiB."""
    return 2 * max_lines * LINE_BYTES_ALLOWANCE + (16 << 20)


# ---------------------------------------------------------------------------------------------- records
def _record(body: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(body), body)


def line_record(seq: int, text: str) -> bytes:
    return _record(b"L %d %s" % (seq, json.dumps(text).encode("ascii")))


def ack_record(seq: int) -> bytes:
    return _record(b"A %d" % seq)


END_RECORD = _record(b"E")


def encode_chunks(chunks: Iterable[Chunk]) -> Iterator[bytes]:
    """The ``L`` records of ``chunks``, in blocks of at most :data:`WRITE_BLOCK_RECORDS` (bounded memory)."""
    block: list[bytes] = []
    for seq, lines in chunks:
        for i, text in enumerate(lines):
            block.append(line_record(seq + i, text))
            if len(block) >= WRITE_BLOCK_RECORDS:
                yield b"".join(block)
                block = []
    if block:
        yield b"".join(block)


def _parse(raw: bytes) -> tuple[str, int, str | None] | None:
    """(kind, seq, line) of one whole record (``raw`` ends with a newline), or None if it fails its check."""
    crc, _, body = raw[:-1].partition(b" ")
    try:
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
            return None
        if body == b"E":
            return "E", -1, None
        kind, seq, *rest = body.split(b" ", 2)
        if kind == b"A" and not rest:
            return "A", int(seq), None
        if kind == b"L" and rest:
            text = json.loads(rest[0])
            if isinstance(text, str) and text:
                return "L", int(seq), text
    except ValueError:
        pass
    return None


# ---------------------------------------------------------------------------------------------- reading
def read_spool(path: PathLike, max_lines: int | None = None, max_bytes: int | None = None) -> Spooled:
    """Read a spool without changing it. :class:`FileNotFoundError` if there is none, :class:`NotASpool` if the
    file is something else, :class:`kvmfleet.privfile.PrivateFileError` if it could have been planted."""
    path = os.path.abspath(os.fspath(path))
    max_bytes = max_bytes or (read_bytes_bound(max_lines) if max_lines else None)
    fd = privfile.open_private(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.readline(len(HEADER) + 64)
        if head.startswith(HEADER_V1):
            return _read_v1(f, max_lines)
        if head != HEADER:
            raise NotASpool(f"{path} is not a kvmfleet spool (no header)")
        out = Spooled()
        if max_bytes and size > max_bytes:
            f.seek(size - max_bytes)
            out.skipped_bytes = size - max_bytes
            _skip_rest_of_record(f)
        _read_v2(f, max_lines, out)
    return out


def _skip_rest_of_record(f: BinaryIO) -> None:
    while True:
        part = f.readline(MAX_RECORD_BYTES)
        if not part or part.endswith(b"\n"):
            return


def _read_v2(f: BinaryIO, max_lines: int | None, out: Spooled) -> None:
    """The undelivered lines of a v2 spool: each ``L`` record not covered by a later ``A`` record."""
    kept: deque[tuple[int, str]] = deque()
    over: deque[list[int]] = deque()  # seq ranges dropped beyond max_lines, until an ack says they were done
    ack = last = -1
    while raw := f.readline(MAX_RECORD_BYTES + 1):
        if not raw.endswith(b"\n"):
            if len(raw) <= MAX_RECORD_BYTES:
                out.torn = True  # at the end of the file
                break
            out.damaged += 1
            _skip_rest_of_record(f)
            continue
        rec = _parse(raw)
        if rec is None or (rec[0] == "L" and rec[1] <= last):
            out.damaged += 1
            continue
        out.records += 1
        kind, seq, text = rec
        out.clean = kind == "E"
        if kind == "A":
            ack = max(ack, seq)
            while kept and kept[0][0] < ack:
                kept.popleft()
            _forget_below(over, ack)
        elif kind == "L" and text is not None and seq >= ack:
            last = seq
            kept.append((seq, text))
            if max_lines and len(kept) > max_lines:
                _note_range(over, kept.popleft()[0])
    out.over = sum(end - start for start, end in over)
    out.lines = [text for _, text in kept]


def _note_range(ranges: deque[list[int]], seq: int) -> None:
    if ranges and ranges[-1][1] == seq:
        ranges[-1][1] = seq + 1
    else:
        ranges.append([seq, seq + 1])


def _forget_below(ranges: deque[list[int]], seq: int) -> None:
    while ranges and ranges[0][1] <= seq:
        ranges.popleft()
    if ranges and ranges[0][0] < seq:
        ranges[0][0] = seq


def _read_v1(f: BinaryIO, max_lines: int | None) -> Spooled:
    """A version 1 spool (a clean stop of an earlier release): every JSON string record is undelivered."""
    out = Spooled(version=1)
    kept: deque[str] = deque()
    while raw := f.readline(MAX_RECORD_BYTES + 1):
        if raw.startswith(END_V1) and raw.endswith(b"\n"):
            out.clean = True
            continue
        try:
            text = json.loads(raw) if raw.endswith(b"\n") else None
        except (ValueError, UnicodeDecodeError):
            text = None
        if not isinstance(text, str) or not text:
            out.damaged += 1
            continue
        out.records += 1
        kept.append(text)
        if max_lines and len(kept) > max_lines:
            kept.popleft()
            out.over += 1
    out.lines = list(kept)
    return out


def load_spool(path: PathLike, max_lines: int | None = None) -> list[str]:
    """The undelivered lines of the spool at ``path`` (none if there is no file); the file is left as it is."""
    try:
        return read_spool(path, max_lines).lines
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------------------- writing
def ensure_dir(directory: str) -> None:
    """Create the spool directory (and parents) with mode 0700 if it does not exist, then check that no other user
    can write to it (:class:`kvmfleet.privfile.PrivateFileError` otherwise)."""
    if directory and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
    privfile.check_directory(directory)


def temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.tmp-"


def remove_stale_temp_files(path: str) -> None:
    """Remove what a crash in the middle of a rewrite left next to the spool (``.<name>.tmp-*``, ours only)."""
    directory, prefix = os.path.dirname(path), temp_prefix(path)
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        full = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode) and st.st_uid in privfile.TRUSTED_OWNERS:
                os.unlink(full)


class SpoolFile:
    """The spool file while a shipper runs: atomic rewrites, appends, fsync, removal.

    A rewrite writes a new file next to the spool (mode 0600, created exclusively, never through a link),
    fsyncs it and renames it over the spool, then fsyncs the directory: a crash at any moment leaves the old
    file or the new one, whole. The new file's descriptor is kept for the appends that follow. Used by one
    thread at a time.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.directory = os.path.dirname(self.path)
        self.size = 0  # bytes in the file we hold
        self._fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def rewrite(self, chunks: Iterable[Chunk], clean: bool = False) -> int:
        """Replace the spool by these lines (and an end record if ``clean``); returns the lines written."""
        self.close()
        ensure_dir(self.directory)
        tmp = os.path.join(self.directory, f"{temp_prefix(self.path)}{os.getpid()}-{time.monotonic_ns()}")
        fd = privfile.open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        written = 0
        try:
            os.fchmod(fd, 0o600)
            size = _write_all(fd, HEADER)
            for block in encode_chunks(chunks):
                size += _write_all(fd, block)
                written += block.count(b"\n")
            if clean:
                size += _write_all(fd, END_RECORD)
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        sync_directory(self.directory)
        self._fd, self.size = fd, size
        return written

    def append(self, data: bytes) -> None:
        """Add records at the end; :class:`FileNotFoundError` if the file is no longer the one written (removed
        or replaced meanwhile: rewrite it)."""
        if self._fd is None:
            raise FileNotFoundError(errno.ENOENT, f"{self.path} is not open")
        st, now = os.fstat(self._fd), os.lstat(self.path)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise FileNotFoundError(errno.ENOENT, f"{self.path} was replaced")
        self.size += _write_all(self._fd, data)

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def remove(self) -> None:
        """Delete the spool (nothing in it is undelivered)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
            sync_directory(self.directory)
        self.size = 0

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


def write_spool(path: PathLike, lines: Sequence[str], max_lines: int | None = None) -> int:
    """Write ``lines`` (the newest ``max_lines`` of them) as the spool at ``path``, as a clean stop does; with no
    line, remove the spool. Returns the number of lines written."""
    if max_lines is not None and len(lines) > max_lines:
        log.warning("spool: %d unsent lines, keeping the newest %d", len(lines), max_lines)
        lines = lines[len(lines) - max_lines:]
    spool = SpoolFile(path)
    try:
        if not lines:
            spool.remove()
            return 0
        return spool.rewrite([(0, lines)], clean=True)
    finally:
        spool.close()


def move_aside(path: str, why: str) -> None:
    """Rename a file that must not be read (not a spool, or one another user could have planted) to
    ``<path>.bad-<unix time>`` for a human to look at, so that the spool can be written again."""
    aside = f"{path}.bad-{int(time.time())}"
    try:
        os.replace(path, aside)
        log.error("spool: %s %s; moved it to %s, not read", path, why, aside)
    except OSError as e:
        log.error("spool: %s %s; cannot move it aside (%s): the spool is off", path, why, e)
        raise
