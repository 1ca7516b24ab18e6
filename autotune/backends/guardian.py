"""A small process that unlinks our segments if this process dies, even with its process group.

Python's resource tracker would unlink the segments of a parent killed with
SIGKILL, but it is a member of the parent's process group, and some killers
end the whole group at once: Jupyter restarts or shuts down a busy kernel
with ``killpg(SIGKILL)`` (the kernel runs in a session of its own), and the
tracker dies in the same instant as the kernel, leaving every segment in
``/dev/shm``.  The guardian runs in a session of its own, so a group kill
does not reach it.

It is started on the first segment this process creates (``posix_spawn``,
interpreter without ``site``: it costs the parent about a millisecond and
never blocks it) and reads ``+name`` / ``-name`` lines on its stdin.  When
that pipe closes (this process exited, however it ended; forked workers
that inherited the pipe exit when their parent does) or this process is
gone, it unlinks the names still listed and exits.  :func:`watch` and
:func:`forget` say whether it took the line: where it cannot be started (no
``posix_spawn``, an odd ``sys.executable``) or has died, the caller leaves
its segments to the resource tracker instead (:mod:`autotune.backends.shm`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

__all__ = ["watch", "forget", "ensure_running", "MARKER"]

#: In the guardian's command line, so that tests and ``ps`` can tell what it is.
MARKER = "autotune-segment-guardian"

_CODE = r"""
import os, select, sys
try:
    import _posixshmem
except ImportError:
    sys.exit(0)
parent, names, buf = int(sys.argv[2]), set(), b""
def take(data):
    global buf
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        (names.add if line[:1] == b"+" else names.discard)(line[1:].decode())
while True:
    ready = select.select([0], [], [], 0.5)[0]
    if ready:
        data = os.read(0, 65536)
        if not data:
            break
        take(data)
        continue
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        while select.select([0], [], [], 0)[0]:  # what it wrote before dying
            data = os.read(0, 65536)
            if not data:
                break
            take(data)
        break
    except OSError:
        pass
for name in names:
    try:
        _posixshmem.shm_unlink("/" + name)
    except OSError:
        pass
"""

_lock = threading.Lock()
_pipe: int | None = None  # write end, to the guardian of this process
_owner: int | None = None  # the pid that started it (a forked child has none)
pid: int | None = None  # the guardian's
_failed = False


def ensure_running() -> bool:
    """Start this process's guardian if it is not running; whether one runs."""
    global _pipe, _owner, _failed, pid
    with _lock:
        if _owner == os.getpid() and _pipe is not None:
            return True
        if _failed or not hasattr(os, "posix_spawn"):
            return False
        read, write = os.pipe()  # both non-inheritable; dup2 makes stdin inheritable
        try:
            spawned = os.posix_spawn(
                sys.executable,
                [sys.executable, "-I", "-S", "-c", _CODE, MARKER, str(os.getpid())],
                os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, read, 0)],
                setsid=True,
            )
        except (OSError, ValueError, TypeError):
            os.close(write)
            _failed = True
            return False
        finally:
            os.close(read)
        _pipe, _owner, pid = write, os.getpid(), spawned
        return True


def _send(line: str) -> bool:
    """Write ``line`` to this process's guardian; False if it is gone (or never ran)."""
    global _pipe, _failed
    with _lock:
        if _pipe is None or _owner != os.getpid():
            return False
        try:
            os.write(_pipe, line.encode() + b"\n")
            return True
        except OSError:  # the guardian is gone
            with contextlib.suppress(OSError):
                os.close(_pipe)
            _pipe, _failed = None, True
            return False


def watch(name: str) -> bool:
    """Have ``name`` unlinked if this process dies before unlinking it.

    False when no guardian runs for this process: then nothing watches ``name``,
    nor any name it was given before.
    """
    return ensure_running() and _send("+" + name)


def forget(name: str) -> bool:
    """``name`` was unlinked by this process.

    False when this process's guardian turned out to be gone: the names it
    was watching are no longer watched.  True in a process that never
    started one (a forked child: its parent's guardian is not its own).
    """
    if _owner != os.getpid():
        return True
    return _send("-" + name)
