"""JsonLinesSource: file splitting, resume by byte offset, stable schema, malformed lines."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, settings

from onceflow.errors import DataError, PlanError
from onceflow.operators.sources.base import RescaledOffsets, SourceContext
from onceflow.operators.sources.jsonl import JsonLinesSource, JsonLinesSourceReader
from tests.helpers import assert_resumes_from_every_offset, read_ids
from tests.test_restore import assert_exactly_once, rescales


def write_lines(path: Path, rows: list[dict[str, object]], trailing_newline: bool = True) -> None:
    text = "\n".join(json.dumps(row) for row in rows)
    path.write_text(text + ("\n" if trailing_newline else ""))


def rows(start: int, stop: int) -> list[dict[str, object]]:
    return [{"id": i, "name": f"n{i}"} for i in range(start, stop)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Files in order: a.jsonl ids 0-6, b.json ids 7-9, sub/c.jsonl ids 10-14."""
    write_lines(tmp_path / "a.jsonl", rows(0, 7))
    write_lines(tmp_path / "b.json", rows(7, 10), trailing_newline=False)
    (tmp_path / "sub").mkdir()
    write_lines(tmp_path / "sub" / "c.jsonl", rows(10, 15))
    write_lines(tmp_path / "_hidden.jsonl", rows(100, 101))
    write_lines(tmp_path / ".hidden.jsonl", rows(100, 101))
    (tmp_path / "notes.txt").write_text('{"id": 100}\n')
    return tmp_path


def test_one_subtask_reads_files_in_sorted_order_batch_size_lines_at_a_time(folder: Path) -> None:
    reader = JsonLinesSource(folder, batch_size=3).build(SourceContext("json_0"))
    assert read_ids(reader) == [[0, 1, 2], [3, 4, 5], [6], [7, 8, 9], [10, 11, 12], [13, 14]]
    assert reader.offset() == {"cursors": [[1, 0, 3, 0]]}


def test_subtask_takes_every_pth_file(folder: Path) -> None:
    source = JsonLinesSource(folder, batch_size=3)
    assert read_ids(source.build(SourceContext("json_0", 0, 2))) == [[0, 1, 2], [3, 4, 5], [6], [10, 11, 12], [13, 14]]
    assert read_ids(source.build(SourceContext("json_0", 1, 2))) == [[7, 8, 9]]


@pytest.mark.parametrize("parallelism", [1, 2, 3])
def test_subtasks_cover_every_row_exactly_once(folder: Path, parallelism: int) -> None:
    source = JsonLinesSource(str(folder), batch_size=4)
    seen = [i for s in range(parallelism)
            for batch in read_ids(source.build(SourceContext("json_0", s, parallelism))) for i in batch]
    assert sorted(seen) == list(range(15))
    assert len(seen) == 15


def test_offset_is_the_byte_of_the_next_line(folder: Path) -> None:
    reader = JsonLinesSource(folder, batch_size=3).build(SourceContext("json_0"))
    reader.read()
    first_three = sum(len(json.dumps(row)) + 1 for row in rows(0, 3))
    assert reader.offset() == {"cursors": [[1, 0, 0, first_three]]}
    reader.read()
    reader.read()
    assert reader.offset() == {"cursors": [[1, 0, 1, 0]]}


@pytest.mark.parametrize("parallelism", [1, 2])
def test_resume_from_every_offset_gives_exactly_the_remaining_rows(folder: Path, parallelism: int) -> None:
    source = JsonLinesSource(folder, batch_size=2)
    for subtask in range(parallelism):
        assert_resumes_from_every_offset(source, SourceContext("json_0", subtask, parallelism))


def test_resume_mid_file_seeks_to_the_byte(folder: Path) -> None:
    source = JsonLinesSource(folder / "a.jsonl", batch_size=10)
    byte = sum(len(json.dumps(row)) + 1 for row in rows(0, 5))
    assert read_ids(source.build(SourceContext("json_0"), {"file": 0, "byte": byte})) == [[5, 6]]


def test_malformed_line_names_the_file_and_line_number(folder: Path) -> None:
    path = folder / "sub" / "c.jsonl"
    path.write_text('{"id": 10, "name": "a"}\n{"id": 11, "name": "b"}\n\n{"id": 12, "name": \n{"id": 13}\n')
    source = JsonLinesSource(path, batch_size=2)
    reader = source.build(SourceContext("json_0"))
    assert read_all_until_error(reader) == [[10, 11]]
    with pytest.raises(DataError, match=r"jsonl source json_0: malformed line 4 in '.*sub/c\.jsonl' \(.*\); fix or"):
        reader.read()
    # The failed chunk is not consumed; after a resume the line number still counts from the file's start.
    assert reader.offset() == {"cursors": [[1, 0, 0, 48]]}
    with pytest.raises(DataError, match=r"malformed line 4 in"):
        reader.read()
    resumed = source.build(SourceContext("json_0"), {"file": 0, "byte": 48})
    with pytest.raises(DataError, match=r"malformed line 4 in") as info:
        resumed.read()
    assert info.value.operator == "json_0"


def read_all_until_error(reader: JsonLinesSourceReader) -> list[list[int]]:
    batch = reader.read()
    assert batch is not None
    return [batch.column("id").to_pylist()]


def test_inferred_schema_stays_stable_and_a_type_change_asks_for_a_schema(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n{"x": 2}\n{"x": 2.5}\n')
    reader = JsonLinesSource(path, batch_size=2).build(SourceContext("json_0"))
    batch = reader.read()
    assert batch is not None and batch.schema == pa.schema([("x", pa.int64())])
    with pytest.raises(DataError, match=r"malformed line 3 in '.*a\.jsonl'.*pass schema= to JsonLinesSource"):
        reader.read()
    typed = JsonLinesSource(path, batch_size=2, schema=pa.schema([("x", pa.float64())]))
    assert [b.column("x").to_pylist() for b in iter(typed.build(SourceContext("json_0")).read, None)] == [
        [1.0, 2.0], [2.5]]


def test_every_subtask_uses_the_schema_of_the_first_chunk(tmp_path: Path) -> None:
    write_lines(tmp_path / "a.jsonl", [{"x": 1}])
    write_lines(tmp_path / "b.jsonl", [{"x": None}, {}])
    batch = JsonLinesSource(tmp_path).build(SourceContext("json_0", 1, 2)).read()
    assert batch is not None
    assert batch.schema == pa.schema([("x", pa.int64())])
    assert batch.to_pylist() == [{"x": None}, {"x": None}]


def test_an_unexpected_field_with_an_inferred_schema_is_reported(tmp_path: Path) -> None:
    write_lines(tmp_path / "a.jsonl", [{"x": 1}, {"x": 2, "y": 3}])
    reader = JsonLinesSource(tmp_path, batch_size=1).build(SourceContext("json_0"))
    assert reader.read() is not None
    with pytest.raises(DataError, match=r"malformed line 2 .*unexpected field.*pass schema="):
        reader.read()
    assert reader.offset() == {"cursors": [[1, 0, 0, 9]]}  # the failed chunk is not consumed


def test_a_given_schema_ignores_other_fields_and_fills_missing_ones(tmp_path: Path) -> None:
    write_lines(tmp_path / "a.jsonl", [{"x": 1, "y": "skip"}, {"z": 3}])
    schema = pa.schema([("x", pa.int32()), ("z", pa.int64())])
    batch = JsonLinesSource(tmp_path, schema=schema).build(SourceContext("json_0")).read()
    assert batch is not None
    assert batch.schema == schema
    assert batch.to_pylist() == [{"x": 1, "z": None}, {"x": None, "z": 3}]


def test_blank_lines_give_no_rows(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('\n\n{"x": 1}\n\n\n\n{"x": 2}')
    source = JsonLinesSource(tmp_path, batch_size=2)
    assert [b.to_pylist() for b in iter(source.build(SourceContext("json_0")).read, None)] == [
        [{"x": 1}], [{"x": 2}]]


def test_empty_input_has_no_rows(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("")
    assert JsonLinesSource(tmp_path).build(SourceContext("json_0")).read() is None


def test_a_missing_path_and_a_foreign_offset_are_plan_errors(folder: Path) -> None:
    with pytest.raises(PlanError, match=r"jsonl source json_0: path '.*nowhere' does not exist"):
        JsonLinesSource(folder / "nowhere").build(SourceContext("json_0"))
    with pytest.raises(PlanError, match="does not belong to subtask 0 of 2"):
        JsonLinesSource(folder).build(SourceContext("json_0", 0, 2), {"file": 1, "byte": 0})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@rescales
def test_lines_are_read_exactly_once_across_rescales(folder: Path, parallelisms: list[int],
                                                     reads: list[list[int]]) -> None:
    """Stop readers mid file at one parallelism, resume at another (and again): every line once."""
    assert_exactly_once(lambda: JsonLinesSource(folder, batch_size=2), list(range(15)), parallelisms, reads)


def test_old_offsets_are_taken_over_at_another_parallelism(folder: Path) -> None:
    source = JsonLinesSource(folder, batch_size=100)
    first_two = len("\n".join(json.dumps(row) for row in rows(0, 2))) + 1
    old = RescaledOffsets(({"file": 0, "byte": first_two}, {"file": 1, "byte": 0}))
    got = sorted(i for s in range(3) for batch in read_ids(source.build(SourceContext("json_0", s, 3), old))
                 for i in batch)
    assert got == list(range(2, 15))
