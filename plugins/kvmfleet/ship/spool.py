"""The spool: what is still unsent at shutdown, kept in a private file until the next start.

Format (text, UTF-8), one record a line, so that a damaged file still yields every intact record::

    # kvmfleet-spool v1 lines=N
    "<line protocol as a JSON string>"        (N times; JSON keeps a newline inside a string field intact)
    # end N

Writing: a temp file in the same directory created with ``os.open(..., O_CREAT | O_EXCL, 0o600)``, written,
fsynced, renamed over the spool, then the directory is fsynced; the directory is created 0700 if missing. At
most ``max_lines`` (the buffer capacity) are written: the newest ones.

Loading: every record that parses is returned (at most ``max_lines``, the newest); an intact file is deleted,
a damaged one (bad header, unparsable record, missing or wrong end marker) is logged and renamed to
``<spool>.bad-<unix time>`` so that nothing is silently lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Union

log = logging.getLogger("kvmfleet.ship.spool")

PathLike = Union[str, "os.PathLike[str]"]
HEADER_PREFIX = b"# kvmfleet-spool v1"
END_PREFIX = b"# end "


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_dir(directory: str) -> None:
    """Create the spool directory (and parents) with mode 0700 if it does not exist."""
    if directory and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)


def write_spool(path: PathLike, lines: Sequence[str], max_lines: int | None = None) -> int:
    """Write ``lines`` (the newest ``max_lines`` of them) atomically to ``path`` with mode 0600.

    Returns the number of lines written. With no line, an existing spool file is removed instead.
    """
    path = os.fspath(path)
    if max_lines is not None and len(lines) > max_lines:
        log.warning("spool: %d unsent lines, keeping the newest %d", len(lines), max_lines)
        lines = lines[len(lines) - max_lines:]
    if not lines:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return 0
    directory = os.path.dirname(os.path.abspath(path))
    ensure_dir(directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            f.write(b"%s lines=%d\n" % (HEADER_PREFIX, len(lines)))
            dumps = json.dumps
            chunk: list[str] = []
            for text in lines:
                chunk.append(dumps(text))
                if len(chunk) >= 4096:
                    f.write(("\n".join(chunk) + "\n").encode("utf-8"))
                    chunk = []
            if chunk:
                f.write(("\n".join(chunk) + "\n").encode("utf-8"))
            f.write(b"%s%d\n" % (END_PREFIX, len(lines)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return len(lines)


def load_spool(path: PathLike, max_lines: int | None = None) -> list[str]:
    """Read the spool at ``path`` (if any), then delete it, or move it aside if it was damaged."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return []
    except OSError as e:
        log.error("spool: cannot read %s: %s", path, e)
        return []
    with f:
        kept, total, problems = _read_records(f, max_lines)
    if max_lines and total > max_lines:
        log.warning("spool: %s holds %d lines, keeping the newest %d", path, total, max_lines)
    _dispose(path, problems, len(kept))
    return list(kept)


def _read_records(f: Iterable[bytes], max_lines: int | None) -> tuple[deque[str], int, list[str]]:
    """(the newest ``max_lines`` lines, how many the file held, what is wrong with it) of an open spool file."""
    kept: deque[str] = deque(maxlen=max_lines) if max_lines else deque()
    problems: list[str] = []
    total = 0
    end_count: int | None = None
    declared: int | None = None
    for lineno, raw in enumerate(f, 1):
        if lineno == 1:
            if not raw.startswith(HEADER_PREFIX):
                problems.append("no spool header")
            else:
                with contextlib.suppress(ValueError, IndexError):
                    declared = int(raw.rsplit(b"lines=", 1)[1])
                continue
        if raw.startswith(END_PREFIX):
            try:
                end_count = int(raw[len(END_PREFIX):])
            except ValueError:
                problems.append(f"bad end marker at line {lineno}")
            continue
        if end_count is not None:
            problems.append(f"data after the end marker at line {lineno}")
            end_count = None
        try:
            text = json.loads(raw.decode("utf-8"))
        except ValueError:
            problems.append(f"unparsable record at line {lineno}" if len(problems) < 5 else "")
            continue
        if not isinstance(text, str) or not text:
            problems.append(f"not a line at line {lineno}")
            continue
        kept.append(text)
        total += 1
    if end_count is None:
        problems.append("no end marker (partial file)")
    elif end_count != total or (declared is not None and declared != total):
        problems.append(f"{total} records but the file declares {declared}/{end_count}")
    return kept, total, problems


def _dispose(path: str, problems: list[str], kept: int) -> None:
    """Delete a spool once loaded, or move a damaged one aside for a human to look at."""
    if not problems:
        try:
            os.unlink(path)
        except OSError as e:
            log.error("spool: cannot delete %s after loading it: %s", path, e)
        log.info("spool: loaded %d lines from %s", kept, path)
        return
    aside = f"{path}.bad-{int(time.time())}"
    shown = "; ".join(p for p in problems if p)
    try:
        os.replace(path, aside)
        log.error("spool: %s is damaged (%s); kept %d lines, moved the file to %s", path, shown, kept, aside)
    except OSError as e:
        log.error("spool: %s is damaged (%s); kept %d lines; cannot move it aside (%s), deleting it",
                  path, shown, kept, e)
        with contextlib.suppress(OSError):
            os.unlink(path)
