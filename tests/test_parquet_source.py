"""ParquetSource: (file, row group) units, splitting, resume mid row group, errors."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, settings

from onceflow.errors import DataError, PlanError
from onceflow.operators.sources.base import RescaledOffsets, SourceContext
from onceflow.operators.sources.parquet import ParquetSource
from tests.helpers import assert_resumes_from_every_offset, read_ids
from tests.test_restore import assert_exactly_once, rescales


def rows(start: int, stop: int) -> pa.Table:
    return pa.table({"id": pa.array(range(start, stop), pa.int64()), "name": [f"n{i}" for i in range(start, stop)]})


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Units in order: a.parquet groups [0-3] [4-7] [8-9]; c.parquet [15-19] [20-24]; sub/b.parquet [10-14]."""
    pq.write_table(rows(0, 10), tmp_path / "a.parquet", row_group_size=4)
    (tmp_path / "sub").mkdir()
    pq.write_table(rows(10, 15), tmp_path / "sub" / "b.parquet")
    pq.write_table(rows(15, 25), tmp_path / "c.parquet", row_group_size=5)
    # Skipped: hidden names, hidden directories, other extensions.
    pq.write_table(rows(100, 101), tmp_path / "_pending.parquet")
    pq.write_table(rows(100, 101), tmp_path / ".inprogress.parquet")
    (tmp_path / "_temporary").mkdir()
    pq.write_table(rows(100, 101), tmp_path / "_temporary" / "d.parquet")
    (tmp_path / "notes.txt").write_text("not parquet")
    return tmp_path


ORDER = list(range(0, 10)) + list(range(15, 25)) + list(range(10, 15))


def test_one_subtask_reads_units_in_sorted_order(folder: Path) -> None:
    reader = ParquetSource(folder, batch_size=3).build(SourceContext("pq_0"))
    assert read_ids(reader) == [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9], [15, 16, 17], [18, 19],
                                [20, 21, 22], [23, 24], [10, 11, 12], [13, 14]]
    assert reader.offset() == {"cursors": [[1, 0, 6, 0]]}


def test_subtask_takes_every_pth_unit(folder: Path) -> None:
    reader = ParquetSource(folder, batch_size=3).build(SourceContext("pq_0", subtask=0, parallelism=2))
    assert read_ids(reader) == [[0, 1, 2], [3], [8, 9], [20, 21, 22], [23, 24]]


@pytest.mark.parametrize("parallelism", [1, 2, 3])
def test_subtasks_cover_every_row_exactly_once(folder: Path, parallelism: int) -> None:
    source = ParquetSource(str(folder), batch_size=3)
    seen = [i for s in range(parallelism)
            for batch in read_ids(source.build(SourceContext("pq_0", s, parallelism))) for i in batch]
    assert sorted(seen) == list(range(25))
    assert len(seen) == 25


def test_offsets_point_inside_the_row_group(folder: Path) -> None:
    reader = ParquetSource(folder, batch_size=3).build(SourceContext("pq_0"))
    offsets = []
    while reader.read() is not None:
        offsets.append(reader.offset())
    assert offsets[:3] == [{"cursors": [[1, 0, 0, 3]]}, {"cursors": [[1, 0, 1, 0]]}, {"cursors": [[1, 0, 1, 3]]}]


@pytest.mark.parametrize("parallelism", [1, 2])
def test_resume_from_every_offset_gives_exactly_the_remaining_rows(folder: Path, parallelism: int) -> None:
    source = ParquetSource(folder, batch_size=3)
    for subtask in range(parallelism):
        assert_resumes_from_every_offset(source, SourceContext("pq_0", subtask, parallelism))


def test_resume_mid_row_group_with_another_batch_size(folder: Path) -> None:
    rest = ParquetSource(folder, batch_size=100).build(SourceContext("pq_0"), {"unit": 1, "row": 2})
    assert read_ids(rest) == [[6, 7], [8, 9], list(range(15, 20)), list(range(20, 25)), list(range(10, 15))]


def test_a_single_file_and_a_file_uri(folder: Path) -> None:
    assert read_ids(ParquetSource(folder / "c.parquet").build(SourceContext("pq_0"))) == [
        list(range(15, 20)), list(range(20, 25))]
    uri = (folder / "sub").as_uri()
    assert read_ids(ParquetSource(uri).build(SourceContext("pq_0"))) == [list(range(10, 15))]


def test_columns_are_projected(folder: Path) -> None:
    batch = ParquetSource(folder, columns=["name"]).build(SourceContext("pq_0")).read()
    assert batch is not None
    assert batch.schema.names == ["name"]
    assert batch.column("name").to_pylist() == ["n0", "n1", "n2", "n3"]


def test_a_missing_column_names_the_column_and_the_file(folder: Path) -> None:
    with pytest.raises(DataError, match=r"parquet source pq_0: file '.*a\.parquet' has no column 'score'") as info:
        ParquetSource(folder, columns=["id", "score"]).build(SourceContext("pq_0"))
    assert (info.value.operator, info.value.column) == ("pq_0", "score")


def test_a_schema_mismatch_names_the_file_and_column(folder: Path) -> None:
    pq.write_table(pa.table({"id": ["x"], "name": ["y"]}), folder / "sub" / "z.parquet")
    with pytest.raises(DataError, match=r"pq_0: file '.*sub/z\.parquet' has column 'id' as string, not int64, "
                                        r"unlike the schema of '.*a\.parquet'; give every file the same") as info:
        ParquetSource(folder).build(SourceContext("pq_0"))
    assert info.value.column == "id"
    # Reading only the columns the files share works.
    source = ParquetSource(folder, columns=["name"])
    assert sum(b.num_rows for b in iter(source.build(SourceContext("pq_0")).read, None)) == 26


def test_an_extra_column_is_a_schema_mismatch(folder: Path) -> None:
    pq.write_table(rows(30, 31).append_column("extra", pa.array([1])), folder / "z.parquet")
    with pytest.raises(DataError, match=r"z\.parquet' has an extra column 'extra'"):
        ParquetSource(folder).build(SourceContext("pq_0"))


def test_a_corrupt_file_is_named(folder: Path) -> None:
    (folder / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"pq_0: cannot read '.*broken\.parquet' as parquet .*; remove or fix"):
        ParquetSource(folder).build(SourceContext("pq_0"))


def test_a_missing_path_is_a_plan_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"parquet source pq_0: path '.*nowhere' does not exist"):
        ParquetSource(tmp_path / "nowhere").build(SourceContext("pq_0"))


def test_an_empty_directory_has_no_rows(tmp_path: Path) -> None:
    assert ParquetSource(tmp_path).build(SourceContext("pq_0")).read() is None


def test_resume_offset_of_another_subtask_is_rejected(folder: Path) -> None:
    with pytest.raises(PlanError, match="does not belong to subtask 1 of 2"):
        ParquetSource(folder).build(SourceContext("pq_0", 1, 2), {"unit": 2, "row": 0})
    with pytest.raises(PlanError, match=r"is not \{'unit': u, 'row': r\}"):
        ParquetSource(folder).build(SourceContext("pq_0"), {"next_batch": 2})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@rescales
def test_rows_are_read_exactly_once_across_rescales(folder: Path, parallelisms: list[int],
                                                    reads: list[list[int]]) -> None:
    """Stop readers mid row group at one parallelism, resume at another (and again): every row once."""
    assert_exactly_once(lambda: ParquetSource(folder, batch_size=2), sorted(ORDER), parallelisms, reads)


def test_old_offsets_are_taken_over_at_another_parallelism(folder: Path) -> None:
    source = ParquetSource(folder, batch_size=100)
    old = RescaledOffsets(({"unit": 2, "row": 1}, {"unit": 1, "row": 0}))  # unit 0 read, unit 2 started
    got = sorted(i for s in range(3) for batch in read_ids(source.build(SourceContext("pq_0", s, 3), old))
                 for i in batch)
    assert got == sorted(i for i in ORDER if i not in range(0, 4) and i != 8)  # unit 2 is [8, 9]
