"""How code and objects travel to worker processes: by reference or by value.

Plain pickle stores a function or a class *by reference*: its module and
name, looked up again in the worker.  That is cheap and right for code in an
importable module (the worker imports the same code), and wrong for code
that lives in ``__main__`` when ``__main__`` is a notebook, ``python -c`` or
an interactive session: a spawn or forkserver worker has another
``__main__`` and fails with ``Can't get attribute 'kernel' on <module
'__main__'>``.  Such code is pickled *by value* with cloudpickle (its code
and the globals it uses), as loky does.

Under ``fork`` the workers inherit the parent's ``__main__`` as it was when
they were forked, so a function or class that was already there (the same
object) still goes by reference: a kernel that reads a big notebook global
costs nothing to send.  One defined or redefined since the fork goes by
value, or the workers would fail to find it, or silently run the old one.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import pickle
import sys
import types
import warnings
from collections.abc import Mapping
from typing import Any

import cloudpickle

from autotune._util import format_bytes

__all__ = [
    "KERNEL_WARN_BYTES",
    "main_snapshot",
    "dumps_code",
    "dumps_shared",
    "warn_if_large",
]

#: A kernel pickled by value above this size draws a warning naming the
#: globals that made it big (they are copied to every worker on every call).
KERNEL_WARN_BYTES = 4 * 2**20


def _main_module() -> types.ModuleType | None:
    return sys.modules.get("__main__")


def main_snapshot() -> dict[str, Any]:
    """The functions and classes in ``__main__`` now: what a worker forked now inherits."""
    main = _main_module()
    if main is None:
        return {}
    return {
        name: obj
        for name, obj in list(vars(main).items())
        if isinstance(obj, (types.FunctionType, type))
    }


def _inherited(obj: Any, inherited: Mapping[str, Any]) -> bool:
    """Whether ``obj`` lives in ``__main__`` and a forked worker already has this very object."""
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(qualname, str) or "<locals>" in qualname or "<lambda>" in qualname:
        return False
    main = _main_module()
    top = qualname.split(".")[0]
    if main is None or inherited.get(top) is None or vars(main).get(top) is not inherited[top]:
        return False
    found: Any = main
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, except that ``__main__`` code a forked worker inherited goes by reference."""

    def __init__(self, file: Any, inherited: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL, **kwargs)
        self._inherited = inherited

    def reducer_override(self, obj: Any) -> Any:
        if (
            self._inherited
            and isinstance(obj, (types.FunctionType, type))
            and getattr(obj, "__module__", None) == "__main__"
            and _inherited(obj, self._inherited)
        ):
            return NotImplemented  # plain pickle: __main__.name, found in the worker
        return super().reducer_override(obj)


def _dumps(obj: Any, inherited: Mapping[str, Any] | None = None, **kwargs: Any) -> bytes:
    with io.BytesIO() as buf:
        _Pickler(buf, inherited or {}, **kwargs).dump(obj)
        return buf.getvalue()


def dumps_code(obj: Any, what: str, inherited: Mapping[str, Any] | None = None) -> bytes:
    """Pickle a kernel to send to the workers.

    Parameters
    ----------
    obj : callable
    what : str
        What it is, for messages ("kernel").
    inherited : mapping, optional
        Under fork, :func:`main_snapshot` taken when the workers were forked;
        ``None`` for spawn/forkserver workers, which inherit nothing.
    """
    try:
        payload = _dumps(obj, inherited)
    except Exception as exc:  # PicklingError, TypeError ("cannot pickle '_thread.lock'") ...
        culprit = _unpicklable_global(obj)
        where = f" (it uses {culprit})" if culprit else ""
        raise TypeError(
            f"the {what} {_name(obj)} cannot be pickled to send to the worker processes"
            f"{where}: {type(exc).__name__}: {exc}; create such objects inside the {what}, "
            f"or define it at module level in an importable module"
        ) from exc
    warn_if_large(obj, payload, what, inherited)
    return payload


def dumps_shared(
    shared: Mapping[str, Any], buffer_callback: Any, start_method: str = "spawn"
) -> bytes:
    """Pickle the ``shared`` dict once for spawn/forkserver workers (protocol 5).

    ``__main__`` classes of the objects go by value.  What cannot be pickled
    at all (an open file, a lock, a database connection) is named by its
    key and type.
    """
    try:
        return _dumps(dict(shared), buffer_callback=buffer_callback)
    except Exception as exc:
        raise TypeError(_unpicklable_shared_message(shared, exc, start_method)) from exc


def _discard(buf: pickle.PickleBuffer) -> bool:
    return False  # out of band, and dropped: only whether it pickles matters


def _unpicklable_shared_message(shared: Mapping[str, Any], exc: Exception, method: str) -> str:
    key, value, error = None, None, exc
    for name, item in shared.items():
        try:
            _dumps(item, buffer_callback=_discard)
        except Exception as item_exc:
            key, value, error = name, item, item_exc
            break
    what = "a shared object" if key is None else f"shared[{key!r}] (type {_type_name(value)})"
    if "fork" in mp.get_all_start_methods():
        fix = (
            "pass start_method='fork' (workers then inherit shared objects, nothing is "
            "pickled), or create the object inside the kernel"
        )
    else:
        fix = "create the object inside the kernel, or share plain data (arrays, lists, numbers)"
    return (
        f"{what} cannot be sent to {method} workers, which receive shared objects pickled: "
        f"{type(error).__name__}: {error}. Open files, locks, sockets and database "
        f"connections belong to one process; {fix}"
    )


def warn_if_large(
    obj: Any, payload: bytes, what: str, inherited: Mapping[str, Any] | None = None
) -> None:
    """Warn when a kernel pickled by value drags big globals along with it."""
    if len(payload) <= KERNEL_WARN_BYTES:
        return
    sizes = []
    for name, value in _referenced(obj).items():
        try:
            sizes.append((len(_dumps(value, inherited)), name, value))
        except Exception:
            continue
    sizes.sort(key=lambda t: t[0], reverse=True)
    big = [(size, name, value) for size, name, value in sizes[:3] if size > KERNEL_WARN_BYTES // 4]
    if big:
        uses = ", ".join(f"{n} ({_type_name(v)}, {format_bytes(s)})" for s, n, v in big)
        first = big[0][1]
        hint = (
            f": it refers to {uses}, copied with the {what} to every worker on every call; "
            f"pass shared={{{first!r}: {first}}} to the Evaluator and read shared.{first} in the "
            f"{what} instead (shared data is sent once, its arrays through shared memory)"
        )
    else:
        hint = "; read big data from shared= instead of globals or closures"
    warnings.warn(
        f"the {what} {_name(obj)} is sent to the workers by value (it is defined in __main__, "
        f"e.g. a notebook) and pickles to {format_bytes(len(payload))}{hint}",
        UserWarning,
        stacklevel=6,  # warn_if_large, dumps_code, dumps_callable, _call, map
    )


def _referenced(obj: Any) -> dict[str, Any]:
    """The globals and closure variables a function uses, by name."""
    func = getattr(obj, "__func__", obj)  # a bound method
    func = getattr(func, "func", func)  # functools.partial
    code = getattr(func, "__code__", None)
    if code is None:
        return {}
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    glob = getattr(func, "__globals__", {})
    found = {n: glob[n] for n in names if n in glob and not isinstance(glob[n], types.ModuleType)}
    for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=False):
        try:
            found[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return found


def _unpicklable_global(obj: Any) -> str | None:
    for name, value in _referenced(obj).items():
        try:
            _dumps(value, buffer_callback=_discard)
        except Exception:
            return f"{name}, a {_type_name(value)}"
    return None


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)


def _type_name(value: Any) -> str:
    cls = type(value)
    return (
        cls.__qualname__
        if cls.__module__ in ("builtins", "__main__")
        else (f"{cls.__module__}.{cls.__qualname__}")
    )
