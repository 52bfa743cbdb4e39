"""Reading files named by callers (ingested paths, kept image copies) without trusting them."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# The largest image accepted anywhere (visearch.imaging.ImageLimits.max_bytes is the same).
MAX_BYTES = 32 * 1024 * 1024


class ReadError(OSError):
    """The file cannot be read as an item's image; the message says why."""


def read_file(path: str | os.PathLike, max_bytes: int = MAX_BYTES,
              within: list[os.PathLike] | None = None) -> bytes:
    """The bytes of a regular file, read without trusting it: the last component is never
    followed (a symlink is refused), the open never blocks (a FIFO or device answers at once),
    anything but a regular file is refused, and the size is checked before reading (a sparse
    2 GB file costs nothing) and again while reading (a file that grows is cut off). With
    `within`, the file opened must lie inside one of those folders (checked on the open file, so
    a folder on the way swapped for a symlink cannot lead elsewhere). A path that cannot be
    opened (missing, too long, permission) raises ReadError with the reason."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except ValueError:  # a NUL byte
        raise ReadError(f"cannot read {_short(path)!r}: the path holds a NUL byte") from None
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise ReadError(f"cannot read {_short(path)}: {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReadError(f"cannot read {_short(path)}: not a regular file")
        if within is not None:
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if not any(real.is_relative_to(Path(w).resolve()) for w in within):
                raise ReadError(f"cannot read {_short(path)}: it leads outside the folders it may be read from")
        if st.st_size > max_bytes:
            raise ReadError(f"{_short(path)} is {st.st_size} bytes, over the limit of {max_bytes} bytes")
        os.set_blocking(fd, True)
        chunks, n = [], 0
        while n <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > max_bytes:
            raise ReadError(f"{_short(path)} grew past the limit of {max_bytes} bytes while being read")
        return b"".join(chunks)
    except ReadError:
        raise
    except OSError as exc:
        raise ReadError(f"cannot read {_short(path)}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _short(path) -> str:
    text = os.fspath(path)
    return text if len(text) <= 200 else text[:100] + "..." + text[-60:]
