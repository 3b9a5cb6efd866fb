"""Files that are written whole or not at all, folders checked for writing before work starts, one-writer locks, and
text files that are not UTF-8 named with their line."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; nothing keeps two writers apart there
    fcntl = None

log = logging.getLogger(__name__)


def write_whole(texts: dict[Path, str]) -> None:
    """Write each of `texts` (path -> content) whole or leave it as it was: every file goes to a temp file first, and
    the temp files are renamed over their targets only once all are written (a rename needs no space), so a full disk
    leaves every earlier file, and the files of one set together. An OSError names the target, not its temp file."""
    temps = {path: path.with_name(f".{path.name}.tmp") for path in texts}
    try:
        for path, text in texts.items():
            try:
                temps[path].write_text(text, encoding="utf-8")
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(path)) from None
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def is_full_disk(e: BaseException | None) -> bool:
    """Whether `e` comes of a full disk or an exhausted quota, also when wrapped: torch.save reports the OSError of a
    failed write as a RuntimeError ("unexpected pos ...") with that OSError as its context."""
    seen = set()
    while e is not None and id(e) not in seen:  # a chain can loop back on itself
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and a file in it, now rather than after hours of work; raises the OSError."""
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()


def lock_exclusive(file: IO, busy: str) -> None:
    """Hold an exclusive lock on an open file for as long as it stays open (the process's end releases it too). A file
    another process holds is a ValueError with the message `busy`; a file system without locks (some network mounts)
    only gets a warning, and the work goes on unguarded."""
    if fcntl is None:
        return
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(busy) from None
    except OSError as e:
        log.warning("%s cannot be locked (%s), so nothing keeps a second writer out of it", file.name, e.strerror)


def not_utf8_error(path: Path, data: bytes, fix: str = "save the file as UTF-8") -> ValueError:
    """The error for a text file whose bytes `data` do not decode as UTF-8: the file, the line of the first bad byte,
    and the fix."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); {fix}")
    return ValueError(f"{path}: not UTF-8 text; {fix}")
