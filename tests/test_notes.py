"""The note that says where a kernel's exception was raised, on every supported Python.

Python 3.11+ keeps notes in ``__notes__`` and prints them under the message; 3.10 has no
notes, and ``autotune._errors.add_note`` writes the note into a plain message instead (or into
``__notes__`` where the message is the exception's own).  Each test reads the text a traceback
shows, ``shown()``, so that the same assertion holds on every version.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from autotune import Evaluator
from autotune._errors import add_note


class Tagged(Exception):
    def __init__(self, message: str, tag: int = 0) -> None:
        super().__init__(message)
        self.tag = tag


def shown(exc: BaseException) -> str:
    """The message and then the notes, as a traceback prints them."""
    return "\n".join([str(exc), *getattr(exc, "__notes__", [])])


def test_the_traceback_shows_the_notes_under_the_message():
    # A plain interpreter, not this one: pytest's exceptiongroup backport prints
    # __notes__ on 3.10, which a user's Python does not.
    code = """
        from autotune._errors import add_note
        exc = ValueError("bad item")
        add_note(exc, "[first]")
        add_note(exc, "[second]")
        raise exc
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.endswith("ValueError: bad item\n[first]\n[second]\n"), done.stderr


def test_a_noted_exception_keeps_its_type_attributes_and_pickles():
    cause = RuntimeError("underneath")
    exc = Tagged("bad item", tag=7)
    exc.__cause__ = cause
    add_note(exc, "[items [10, 20)]")
    assert type(exc) is Tagged and exc.tag == 7 and exc.__cause__ is cause
    assert shown(exc) == "bad item\n[items [10, 20)]"
    # a Dask worker's exception travels pickled, its note with it
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is Tagged and shown(back) == "bad item\n[items [10, 20)]"


@pytest.mark.parametrize(
    "exc",
    [KeyError("x"), OSError(2, "No such file or directory"), ValueError("a", 1), ValueError()],
    ids=["own-str", "oserror", "two-args", "no-args"],
)
def test_an_exception_that_formats_its_own_message_keeps_it(exc):
    message, args = str(exc), exc.args
    add_note(exc, "[items [0, 5)]")
    assert str(exc) == message and exc.args == args
    assert shown(exc) == f"{message}\n[items [0, 5)]"
    if isinstance(exc, OSError):
        assert exc.errno == 2 and exc.strerror == "No such file or directory"


def fails_from_50(shared, start, stop):
    if stop > 50:
        raise ValueError(f"bad item {max(start, 50)}")
    return shared.x[start:stop] * 2.0


def test_a_kernel_error_in_a_thread_names_its_items(no_leaks):
    x = np.arange(100.0)
    with Evaluator(2, 10, shared={"x": x}, backend="threads") as ev:
        with pytest.raises(ValueError, match="bad item 50") as info:
            ev.map(fails_from_50, 100)
        assert "[raised by the kernel in a thread on items [50, 60)]" in shown(info.value)


def test_a_kernel_error_in_the_calling_process_names_its_items(no_leaks):
    x = np.arange(100.0)
    # adapting: the first call of a kernel this small runs whole in this process
    with Evaluator(shared={"x": x}, backend="threads", adapt=True) as ev:
        with pytest.raises(ValueError, match="bad item 50") as info:
            ev.map(fails_from_50, 60)
        assert "[raised by the kernel in the calling process on items [0, 60)]" in shown(info.value)


N_SLOW = 400_000


def slow_fails_at_the_end(shared, start, stop):
    """About 2 us an item, so that an adapting evaluator sends the call to its pool."""
    if stop > N_SLOW - 1_000:
        raise ValueError(f"bad item {max(start, N_SLOW - 1_000)}")
    time.sleep((stop - start) * 2e-6)
    return float(stop - start)


def test_a_kernel_error_in_a_slice_names_the_calls_item_numbers(no_leaks):
    """An adapting evaluator runs a long call in slices; the kernel and the note are
    given the call's own item numbers, wherever the slice began."""
    ev = Evaluator(shared={}, backend="threads", adapt=True)
    with ev, pytest.raises(ValueError, match=r"bad item \d+") as info:
        ev.reduce(slow_fails_at_the_end, N_SLOW)
    text = shown(info.value)
    found = re.search(r"raised by the kernel in a thread on items \[(\d+), (\d+)\)\]", text)
    assert found, text
    start, stop = int(found[1]), int(found[2])
    assert N_SLOW - 1_000 < stop <= N_SLOW
    assert f"bad item {max(start, N_SLOW - 1_000)}" in text
    assert "count from" not in text
