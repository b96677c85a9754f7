"""JsonLinesSource(dead_letter=True): lines that do not decode go to the source's dead-letter side output."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pyarrow as pa
import pyarrow.json as pajson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import onceflow as of
from onceflow.errors import DataError, PlanError
from onceflow.operators.logic import DEAD_LETTERS
from onceflow.operators.sources.base import SourceContext
from onceflow.operators.sources.jsonl import JSON_LINES_DEAD_LETTER_SCHEMA, JsonLinesSource, JsonLinesSourceReader
from onceflow.testing.workload import feature_events
from tests.helpers import assert_feature_reference, run_killing_a_subtask
from tests.test_kafka_source import slow

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])

Letter = tuple[str, int, int, bytes]
"""A dead letter as (file name, line, offset, value)."""


def read_all(reader: JsonLinesSourceReader) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read to the end as the runtime does: after every batch, take what the read set aside."""
    rows: list[dict[str, Any]] = []
    letters: list[dict[str, Any]] = []
    while (batch := reader.read()) is not None:
        assert isinstance(batch, pa.RecordBatch)
        rows += batch.to_pylist()
        for port, dead in reader.take_side_outputs():
            assert port == DEAD_LETTERS
            assert dead.schema == JSON_LINES_DEAD_LETTER_SCHEMA
            letters += dead.to_pylist()
    assert reader.take_side_outputs() == []
    return rows, letters


def good(i: int) -> bytes:
    return json.dumps({"id": i, "name": f"n{i}"}).encode()


@pytest.fixture
def mixed(tmp_path: Path) -> dict[str, list[bytes]]:
    """Two files of good lines (ids in order) and bad ones; returns each file's lines (with newlines)."""
    files = {
        "a.jsonl": [good(0), b'{"id": 1, "name": ', good(2), b"", good(3), b'{"id": "four"}', b"[5]",
                    good(6), b"null", b"   ", good(7)],
        "b.jsonl": [b'{"id": 8.5}', good(9), b'{"id": 10}{"id": 11}', good(12) + b"\r", b'{"name": "\xff"}',
                    b'{"id": 13, "name": 7}', good(14)],
    }
    written = {}
    for name, lines in files.items():
        written[name] = [line + b"\n" for line in lines]
        (tmp_path / name).write_bytes(b"".join(written[name]))
    return written


def expected_letters(folder: Path, files: dict[str, list[bytes]], bad: dict[str, list[int]]) -> list[Letter]:
    out = []
    for name, numbers in bad.items():
        for number in numbers:
            offset = sum(len(line) for line in files[name][:number - 1])
            out.append((str(folder / name), number, offset, files[name][number - 1].rstrip(b"\r\n")))
    return out


def as_letter(letter: dict[str, Any]) -> Letter:
    return letter["file"], letter["line"], letter["offset"], letter["value"]


def test_bad_lines_leave_the_batch_as_dead_letters_and_the_good_ones_go_on_in_order(
        tmp_path: Path, mixed: dict[str, list[bytes]]) -> None:
    source = JsonLinesSource(tmp_path, batch_size=4, schema=SCHEMA, dead_letter=True)
    rows, letters = read_all(source.build(SourceContext("json_0")))
    assert rows == [{"id": i, "name": f"n{i}"} for i in (0, 2, 3, 6, 7, 9, 12, 14)]
    assert [as_letter(letter) for letter in letters] == expected_letters(
        tmp_path, mixed, {"a.jsonl": [2, 6, 7, 9], "b.jsonl": [1, 3, 5, 6]})
    errors = [letter["error"] for letter in letters]
    assert errors[0].startswith("invalid JSON")
    assert errors[1].startswith("field 'id' does not convert to int64")
    assert errors[2:4] == ["a JSON list, not an object", "a JSON null, not an object"]
    assert errors[4].startswith("field 'id' does not convert to int64")
    assert errors[5].startswith("invalid JSON (Extra data")
    assert errors[6].startswith("invalid JSON ('utf-8' codec")
    assert errors[7].startswith("field 'name' does not convert to string")


def test_a_clean_file_costs_one_parse_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"".join(good(i) + b"\n" for i in range(1_000)) + b"\n\n")
    parses = []
    read_json = pajson.read_json
    monkeypatch.setattr(pajson, "read_json", lambda *a, **k: parses.append(1) or read_json(*a, **k))
    source = JsonLinesSource(tmp_path, batch_size=500, schema=SCHEMA, dead_letter=True)
    rows, letters = read_all(source.build(SourceContext("json_0")))
    assert [r["id"] for r in rows] == list(range(1_000))
    assert letters == []
    assert len(parses) == 2  # one per batch of 500 lines (the blank lines cost none): no fallback


@pytest.mark.parametrize("parallelism", [1, 2])
def test_resume_from_every_offset_gives_exactly_the_remaining_rows_and_dead_letters(
        tmp_path: Path, mixed: dict[str, list[bytes]], parallelism: int) -> None:
    source = JsonLinesSource(tmp_path, batch_size=3, schema=SCHEMA, dead_letter=True)
    for subtask in range(parallelism):
        ctx = SourceContext("json_0", subtask, parallelism)
        expected = read_all(source.build(ctx))
        reader = source.build(ctx)
        consumed: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        while True:
            offset = msgpack.unpackb(msgpack.packb(reader.offset()))
            rows, letters = read_all(source.build(ctx, offset))
            assert (consumed[0] + rows, consumed[1] + letters) == expected, offset
            batch = reader.read()
            if batch is None:
                break
            assert isinstance(batch, pa.RecordBatch)
            consumed[0].extend(batch.to_pylist())
            consumed[1].extend(row for _, dead in reader.take_side_outputs() for row in dead.to_pylist())


def test_an_inferred_schema_skips_bad_lines_of_the_first_chunk_and_an_unknown_field_is_a_dead_letter(
        tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('[1]\n{"x": 1}\n{"x": \n{"x": 2, "y": 3}\n{"x": 4}\n')
    source = JsonLinesSource(tmp_path, batch_size=2, dead_letter=True)  # the first chunk: [1] and {"x": 1}
    rows, letters = read_all(source.build(SourceContext("json_0")))
    assert rows == [{"x": 1}, {"x": 4}]
    assert [(letter["line"], letter["error"].split(" (")[0]) for letter in letters] == [
        (1, "a JSON list, not an object"), (3, "invalid JSON"), (4, "field 'y' is not in the schema ['x']")]


def test_first_chunk_objects_that_disagree_ask_for_a_schema(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n[1]\n{"x": "one"}\n')
    with pytest.raises(DataError, match=r"objects of the first chunk of '.*a\.jsonl' do not share one schema.*schema="):
        JsonLinesSource(tmp_path, dead_letter=True).build(SourceContext("json_0"))


def test_a_null_line_is_a_data_error_not_a_crash_without_dead_letters(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('null\n{"x": 1}\n')
    with pytest.raises(DataError, match=r"malformed line 1 in .*a JSON null, not an object"):
        JsonLinesSource(tmp_path).build(SourceContext("json_0"))
    reader = JsonLinesSource(tmp_path, schema=pa.schema([("x", pa.int64())])).build(SourceContext("json_0"))
    with pytest.raises(DataError, match=r"malformed line 1 in .*a JSON null, not an object"):
        reader.read()


def test_dead_letters_need_dead_letter_true() -> None:
    flow = of.Dataflow("jsonl-dead-letters-plan")
    with pytest.raises(PlanError, match=r"'plain' \(JsonLinesSource\) emits no dead letters.*dead_letter=True"):
        flow.source(JsonLinesSource("/data"), name="plain").dead_letters()
    flow.source(JsonLinesSource("/data", dead_letter=True), name="lines").dead_letters(name="bad")
    assert [node.name for node in flow.nodes] == ["plain", "lines", "bad"]


# ---------------------------------------------------------------------------------------------------------------------
# Property: every non-blank line is exactly one row or one dead letter, rows are what json.loads gives.

FUZZ_SCHEMA = pa.schema([("i", pa.int64()), ("f", pa.float64()), ("s", pa.string()), ("b", pa.bool_())])

ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False) | st.integers(min_value=-(2**53), max_value=2**53)
texts = st.text(max_size=20)
valid_rows = st.fixed_dictionaries({}, optional={
    "i": ints | st.none(), "f": floats | st.none(), "s": texts | st.none(), "b": st.booleans() | st.none(),
    "other": st.integers() | texts | st.lists(st.integers(), max_size=3),
})
valid_lines = st.builds(lambda row, ascii_only: json.dumps(row, ensure_ascii=ascii_only).encode(), valid_rows,
                        st.booleans())
wrong_types = st.one_of(
    st.fixed_dictionaries({"i": texts | st.floats(allow_nan=False).filter(lambda v: not v.is_integer())
                           | st.just(2**63) | st.booleans()}),
    st.fixed_dictionaries({"s": st.integers() | st.lists(st.integers(), max_size=2)}),
    st.fixed_dictionaries({"b": st.integers() | texts}),
    st.fixed_dictionaries({"f": texts | st.booleans()}),
).map(lambda row: json.dumps(row).encode())
invalid_lines = st.one_of(
    valid_lines.filter(lambda line: len(line) > 2).flatmap(
        lambda line: st.integers(1, len(line) - 1).map(lambda cut: line[:cut])),  # truncated
    st.sampled_from([b"null", b" null ", b"1", b"[1, 2]", b'"text"', b"true", b"{", b"}", b"\x0c", b"\xff{}",
                     b'{"i": 1}{"i": 2}', b'{"i": 1} x', b'{"s": "\\ud800"}', b'{"i": 1, "i": 2}']),
    wrong_types,
    st.integers(10_000, 40_000).map(lambda n: b'{"s": "' + b"x" * n),  # very long and cut
)
blank_lines = st.sampled_from([b"", b" ", b"\t", b"\r", b"  \t "])
long_valid = st.integers(10_000, 40_000).map(lambda n: json.dumps({"s": "y" * n, "i": n}).encode())
Kind = str
lines = st.lists(st.one_of(valid_lines.map(lambda v: ("good", v)), long_valid.map(lambda v: ("good", v)),
                           invalid_lines.map(lambda v: ("bad", v)), blank_lines.map(lambda v: ("blank", v))),
                 max_size=25)


def expected_row(line: bytes) -> dict[str, Any]:
    row = json.loads(line)
    out = {field.name: row.get(field.name) for field in FUZZ_SCHEMA}
    if out["f"] is not None:
        out["f"] = float(out["f"])
    return out


def write_files(folder: Path, files: list[list[tuple[Kind, bytes]]], newline_at_end: list[bool]) -> dict[str, Any]:
    """Write the files; return each (file path, line number): its kind and bytes."""
    folder.mkdir()
    out = {}
    for index, (file_lines, ends) in enumerate(zip(files, newline_at_end, strict=True)):
        path = folder / f"part-{index}.jsonl"
        data = b"\n".join(line for _, line in file_lines) + (b"\n" if ends and file_lines else b"")
        path.write_bytes(data)
        for number, (kind, line) in enumerate(file_lines, start=1):
            out[str(path), number] = (kind, line)
    return out


def read_everything(source: JsonLinesSource, parallelism: int, stop_after: int | None) -> tuple[list, list]:
    """Read every subtask; with ``stop_after`` each reader stops after that many batches and a new one resumes."""
    rows, letters = [], []
    for subtask in range(parallelism):
        ctx = SourceContext("json_0", subtask, parallelism)
        reader = source.build(ctx)
        if stop_after is not None:
            for _ in range(stop_after):
                batch = reader.read()
                if batch is None:
                    break
                assert isinstance(batch, pa.RecordBatch)
                rows += batch.to_pylist()
                letters += [r for _, dead in reader.take_side_outputs() for r in dead.to_pylist()]
            offset = msgpack.unpackb(msgpack.packb(reader.offset()))
            reader.close()
            reader = source.build(ctx, offset)
        more_rows, more_letters = read_all(reader)
        rows += more_rows
        letters += more_letters
    return rows, letters


@settings(max_examples=60, deadline=None)
@given(files=st.lists(lines, min_size=1, max_size=3), ends=st.lists(st.booleans(), min_size=3, max_size=3),
       batch_size=st.integers(1, 8), parallelism=st.integers(1, 3), stop_after=st.integers(0, 4))
@example(files=[[("bad", b"null"), ("good", b'{"i": 1}')]], ends=[True] * 3, batch_size=2, parallelism=1,
         stop_after=0).via("a null first row crashed pyarrow's JSON reader")
@example(files=[[("good", b'{"i": 1}'), ("bad", b"null")]], ends=[True] * 3, batch_size=2, parallelism=1,
         stop_after=0).via("a later null row was read as a row of nulls")
@example(files=[[("bad", b'{"s": "\xff"}')]], ends=[True] * 3, batch_size=1, parallelism=1,
         stop_after=0).via("invalid UTF-8 was stored in a string column")
def test_every_line_is_one_row_or_one_dead_letter_and_a_resume_changes_nothing(
        tmp_path_factory: pytest.TempPathFactory, files: list[list[tuple[Kind, bytes]]], ends: list[bool],
        batch_size: int, parallelism: int, stop_after: int) -> None:
    folder = tmp_path_factory.mktemp("fuzz") / "in"
    written = write_files(folder, files, ends[:len(files)])
    source = JsonLinesSource(folder, batch_size=batch_size, schema=FUZZ_SCHEMA, dead_letter=True)
    rows, letters = read_everything(source, parallelism, None)

    letter_keys = [(letter["file"], letter["line"]) for letter in letters]
    assert len(letter_keys) == len(set(letter_keys)), "a line is one dead letter at most"
    assert {key for key, (kind, _) in written.items() if kind == "bad"} == set(letter_keys)
    for letter in letters:
        assert letter["value"] == written[letter["file"], letter["line"]][1]
        assert letter["error"]
    by_file: dict[str, list[bytes]] = {}
    for (path, _), (_, line) in sorted(written.items()):
        by_file.setdefault(path, []).append(line)
    for letter in letters:
        assert letter["offset"] == sum(len(line) + 1 for line in by_file[letter["file"]][:letter["line"] - 1])
    good_lines = [line for _, (kind, line) in sorted(written.items()) if kind == "good"]
    assert Counter(map(repr, rows)) == Counter(repr(expected_row(line)) for line in good_lines)

    twice = read_everything(source, parallelism, stop_after)
    assert Counter(map(repr, twice[0])) == Counter(map(repr, rows))
    assert Counter(map(repr, twice[1])) == Counter(map(repr, letters))


# ---------------------------------------------------------------------------------------------------------------------
# End to end: a killed source subtask, every row and every dead letter exactly once.

TOTAL = 40_000
FILES = 4
EVERY = 1_000
FEATURE_BAD = [b'{"user_id": 5, "amount": ', b'{"user_id": "u5", "amount": 1.0, "event_time": 5}', b"[1, 2]",
               b"null", b'{"user_id": 1.5, "amount": 1.0, "event_time": 5}']


@pytest.mark.usefixtures("ray_session")
def test_a_killed_source_emits_every_good_row_and_every_dead_letter_exactly_once(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    bad: dict[tuple[str, int], bytes] = {}
    events = feature_events(0, TOTAL).to_pylist()
    per_file = TOTAL // FILES
    for index in range(FILES):
        path = folder / f"part-{index}.jsonl"
        out = []
        for i, row in enumerate(events[index * per_file:(index + 1) * per_file]):
            if i % EVERY == 0:
                bad[str(path), len(out) + 1] = FEATURE_BAD[len(bad) % len(FEATURE_BAD)]
                out.append(bad[str(path), len(out) + 1])
            out.append(json.dumps(row).encode())
        path.write_bytes(b"\n".join(out) + b"\n")
    job = "jsonl-dead-letters"
    schema = pa.schema([("user_id", pa.int64()), ("amount", pa.float64()), ("event_time", pa.int64())])
    sink, dead = of.sinks.TestingSink(), of.sinks.TestingSink()
    flow = of.Dataflow(job)
    lines = flow.source(JsonLinesSource(folder, batch_size=500, schema=schema, dead_letter=True), name="events",
                        watermark=of.BoundedOutOfOrderness("event_time", max_delay_ms=10**9))
    (lines.map_batches(slow, name="slow").key_by("user_id").window(of.windows.Tumbling(size_ms=10_000))
     .aggregate(count=of.agg.count(), total=of.agg.sum("amount")).sink(sink, name="out"))
    lines.dead_letters(name="bad").sink(dead, name="bad_out")
    _, killed, _ = run_killing_a_subtask(
        flow, str(tmp_path / "chk"), pick=lambda names: next(n for n in names if n.startswith(f"{job}/events/")))
    assert killed.startswith(f"{job}/events/")
    assert_feature_reference(sink.table(), TOTAL)
    letters = dead.table()
    assert letters.schema == JSON_LINES_DEAD_LETTER_SCHEMA
    got = list(zip(letters.column("file").to_pylist(), letters.column("line").to_pylist(), strict=True))
    assert sorted(got) == sorted(bad), "every bad line is a dead letter exactly once"
    assert [bad[key] for key in got] == letters.column("value").to_pylist()
    assert all(letters.column("error").to_pylist())
