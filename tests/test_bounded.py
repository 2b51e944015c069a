"""Values of megabytes encoded and freed in bounded steps (qmpmux/bounded.py): the same
bytes as encoding at once, and no single C call on more than a run of the value."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from types import FrameType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpmux import bounded, qjson
from qmpmux.bounded import compact_pieces, let_go
from qmpmux.qjson import JsonValue, encode_compact
from tests.test_qjson import ALL_TEXT, INTEGERS, json_values

# Wide and deep enough that small runs cut containers, strings and keys anywhere.
VALUES = json_values(
    ALL_TEXT | st.text(max_size=40), INTEGERS | st.floats(allow_nan=False), width=12, leaves=60
)


@contextlib.contextmanager
def small_runs() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bounded, "_RUN_WEIGHT", 64)
        patch.setattr(bounded, "_SHORT", 4)
        patch.setattr(bounded, "_FLAT", 2)
        patch.setattr(bounded, "_CHUNK", 3)
        patch.setattr(bounded, "_PIECE_BYTES", 16)
        yield


@settings(max_examples=200, deadline=None)
@given(value=VALUES)
def test_pieces_join_to_the_value_encoded_at_once(value: JsonValue) -> None:
    with small_runs():
        assert b"".join(compact_pieces(value)) == encode_compact(value)


@settings(max_examples=200, deadline=None)
@given(value=VALUES, parts=st.lists(st.text(max_size=80), min_size=2, max_size=5))
def test_a_stand_in_is_written_as_its_pieces(value: JsonValue, parts: list[str]) -> None:
    stand_in = "\ufdd0qmpmux-0\ufdd0"
    wrapped: JsonValue = {"a": [value, stand_in, value]}
    want = encode_compact({"a": [value, "".join(parts), value]})
    with small_runs():
        assert b"".join(compact_pieces(wrapped, {stand_in: parts})) == want
        with pytest.raises(ValueError, match="not found once"):
            compact_pieces({"a": [stand_in, stand_in]}, {stand_in: parts})
        with pytest.raises(ValueError, match="not found once"):
            compact_pieces(value, {stand_in: parts})


BIG_SHAPES: dict[str, Callable[[], JsonValue]] = {
    "a list of names": lambda: {"fds": [f"qmpmux.1.{n}" for n in range(200_000)]},
    "one long name": lambda: {"fd": "a" * (8 << 20)},
    "a long key": lambda: {"k" * (4 << 20): 1},
    "padding of {}": lambda: {"addr": [*([{}] * 300_000), {"type": "fd", "str": "x"}]},
    "actions": lambda: {"actions": [{"type": "abort", "data": {}}] * 200_000},
    "deep": lambda: {"a": [[[[["x" * 1000] * 500] * 4] * 4] * 4]},
}


@pytest.mark.parametrize("shape", BIG_SHAPES)
def test_no_call_encodes_more_than_a_run(monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    value = BIG_SHAPES[shape]()
    sizes: list[int] = []

    def encode(v: JsonValue) -> bytes:
        sizes.append(len(out := encode_compact(v)))
        return out

    monkeypatch.setattr(bounded, "encode_compact", encode)
    pieces = compact_pieces(value)
    assert b"".join(pieces) == encode_compact(value)
    # (escapes aside, a run of weight W is at most W bytes)
    assert max(sizes) <= bounded._RUN_WEIGHT + 2
    assert len(pieces) <= 2 + sum(sizes) // bounded._PIECE_BYTES * 2


class Leaf:
    """A member whose freeing is seen: `freed` counts the interpreter's steps so far."""

    def __del__(self) -> None:
        FREED.append(STEPS[0])


FREED: list[int] = []
STEPS = [0]


def _steps_counted() -> Callable[[FrameType, str, object], None]:
    """A profiler counting the interpreter's calls and returns, apart from Leaf's own:
    leaves freed between two of them were freed by one C call."""
    own = Leaf.__del__.__code__

    def profile(frame: FrameType, _event: str, _arg: object) -> None:
        if frame.f_code is not own:
            STEPS[0] += 1

    return profile


def _freed_at_once(release: Callable[[], None]) -> int:
    FREED.clear()
    sys.setprofile(_steps_counted())
    try:
        release()
    finally:
        sys.setprofile(None)
    return max(Counter(FREED).values())


LEAVES: dict[str, Callable[[], object]] = {
    "a list": lambda: [Leaf() for _ in range(20_000)],
    "dicts": lambda: [{"k": Leaf(), "v": [Leaf(), Leaf()]} for _ in range(10_000)],
    "a dict": lambda: {f"k{n}": Leaf() for n in range(20_000)},
}


@pytest.mark.parametrize("shape", LEAVES)
def test_let_go_frees_a_run_at_a_time(shape: str) -> None:
    everything = [LEAVES[shape]()]
    assert _freed_at_once(lambda: let_go(everything)) <= bounded._FREED_RUN
    assert everything == []

    # the same value dropped at once: one call frees it all (what the test would catch)
    held = [LEAVES[shape]()]
    assert _freed_at_once(held.clear) > bounded._FREED_RUN


def test_let_go_leaves_what_someone_else_holds() -> None:
    shared = {"kept": ["x", {"y": [1, 2]}]}
    audited = [shared, [3]]
    renamed = {"a": shared, "b": [Leaf()]}
    args = {"a": shared, "c": audited}
    held: list[object] = [renamed, args]
    del renamed, args
    let_go(held)
    assert held == []
    assert shared == {"kept": ["x", {"y": [1, 2]}]}
    assert audited == [shared, [3]]


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.text(max_size=20), max_size=30), step=st.sampled_from([1, 5, 1 << 18]))
def test_a_string_joined_in_steps_is_the_string_joined(parts: list[str], step: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qjson, "_JOIN_STEP", step)
        assert qjson.joined_in_steps(parts) == "".join(parts)
