"""GeneratorSource: splitting, replay from offsets, rate limiting, validation."""

from __future__ import annotations

import msgpack
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import settings

from onceflow.errors import DataError, PlanError
from onceflow.operators.sources.base import Idle, RescaledOffsets, SourceContext
from onceflow.operators.sources.generator import GeneratorSource, GeneratorSourceReader
from tests.test_restore import assert_exactly_once, rescales


def make_batch(offset: int, n: int) -> pa.RecordBatch:
    rng = np.random.default_rng(offset)
    return pa.record_batch({"id": np.arange(offset, offset + n, dtype=np.int64), "x": rng.random(n)})


def ids(reader: GeneratorSourceReader) -> list[list[int]]:
    """Read to the end; return each batch's ids."""
    out = []
    while (batch := reader.read()) is not None:
        assert isinstance(batch, pa.RecordBatch)
        out.append(batch.column("id").to_pylist())
    return out


def idle_seconds(item: object) -> float:
    assert isinstance(item, Idle), item
    return item.seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_subtask_reads_every_row_in_batches() -> None:
    reader = GeneratorSource(make_batch, total=25, batch_size=10).build(SourceContext("gen_0"))
    assert ids(reader) == [list(range(0, 10)), list(range(10, 20)), list(range(20, 25))]
    assert reader.offset() == {"cursors": [[1, 0, 3, 0]]}
    assert reader.read() is None


@pytest.mark.parametrize("parallelism", [2, 3])
def test_subtasks_take_every_pth_batch_and_cover_every_row_once(parallelism: int) -> None:
    source = GeneratorSource(make_batch, total=95, batch_size=10)
    seen: list[int] = []
    for subtask in range(parallelism):
        batches = ids(source.build(SourceContext("gen_0", subtask, parallelism)))
        assert [b[0] // 10 for b in batches] == list(range(subtask, 10, parallelism))
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(95))


def test_rows_are_the_ones_make_batch_gives_for_the_offset() -> None:
    reader = GeneratorSource(make_batch, total=30, batch_size=10).build(SourceContext("gen_0", 1, 2))
    batch = reader.read()
    assert isinstance(batch, pa.RecordBatch)
    assert batch.equals(make_batch(10, 10))


def test_resume_from_a_mid_stream_offset_gives_exactly_the_remaining_rows() -> None:
    source = GeneratorSource(make_batch, total=100, batch_size=10)
    ctx = SourceContext("gen_0", subtask=1, parallelism=3)
    first = source.build(ctx)
    assert [b.column("id")[0].as_py() for b in (first.read(), first.read())] == [10, 40]  # type: ignore[union-attr]
    offset = msgpack.unpackb(msgpack.packb(first.offset()))
    assert offset == {"cursors": [[3, 1, 7, 0]]}  # batches 1, 4, 7, ...: next is 7
    assert ids(source.build(ctx, offset)) == [list(range(70, 80))]
    assert ids(first) == [list(range(70, 80))]


def test_unbounded_source_keeps_going() -> None:
    reader = GeneratorSource(make_batch, batch_size=1_000).build(SourceContext("gen_0", 0, 2))
    starts = []
    for _ in range(50):
        batch = reader.read()
        assert isinstance(batch, pa.RecordBatch)
        starts.append(batch.column("id")[0].as_py())
    assert starts == list(range(0, 100_000, 2_000))
    assert reader.offset() == {"cursors": [[2, 0, 100, 0]]}


def test_empty_total_and_idle_subtasks_end_at_once() -> None:
    assert GeneratorSource(make_batch, total=0).build(SourceContext("gen_0")).read() is None
    source = GeneratorSource(make_batch, total=15, batch_size=10)
    assert source.build(SourceContext("gen_0", 2, 3)).read() is None


def test_a_table_is_combined_into_one_batch() -> None:
    def chunked(offset: int, n: int) -> pa.Table:
        half = n // 2
        return pa.Table.from_batches([make_batch(offset, half), make_batch(offset + half, n - half)])

    batch = GeneratorSource(chunked, total=10, batch_size=10).build(SourceContext("gen_0")).read()
    assert isinstance(batch, pa.RecordBatch)
    assert batch.column("id").to_pylist() == list(range(10))


def test_make_batch_returning_a_non_batch_names_the_operator() -> None:
    source = GeneratorSource(lambda offset, n: list(range(n)), total=10, batch_size=5)
    with pytest.raises(DataError, match=r"generator source gen_7: make_batch\(0, 5\) returned list, not a "
                                        r"pyarrow.RecordBatch; return") as info:
        source.build(SourceContext("gen_7")).read()
    assert info.value.operator == "gen_7"


def test_make_batch_returning_the_wrong_row_count_is_reported() -> None:
    source = GeneratorSource(lambda offset, n: make_batch(offset, n - 1), total=20, batch_size=10)
    with pytest.raises(DataError, match=r"gen_0: make_batch\(0, 10\) returned 9 rows, expected 10; return exactly"):
        source.build(SourceContext("gen_0")).read()


def test_make_batch_changing_a_column_type_names_the_column() -> None:
    def drifting(offset: int, n: int) -> pa.RecordBatch:
        batch = make_batch(offset, n)
        if offset >= 20:
            return pa.record_batch({"id": batch.column("id"), "x": pa.array(["?"] * n)})
        return batch

    reader = GeneratorSource(drifting, total=30, batch_size=10).build(SourceContext("gen_0"))
    reader.read()
    reader.read()
    with pytest.raises(DataError, match=r"gen_0: make_batch\(20, 10\) returned column 'x' as string, but the "
                                        r"first batch had double; return the same schema") as info:
        reader.read()
    assert (info.value.operator, info.value.column) == ("gen_0", "x")


def test_make_batch_dropping_a_column_names_the_column() -> None:
    def dropping(offset: int, n: int) -> pa.RecordBatch:
        batch = make_batch(offset, n)
        return batch.select(["id"]) if offset else batch

    reader = GeneratorSource(dropping, total=20, batch_size=10).build(SourceContext("gen_0"))
    reader.read()
    with pytest.raises(DataError, match="column 'x' missing") as info:
        reader.read()
    assert info.value.column == "x"


def test_a_non_deterministic_generator_is_caught_on_the_first_read_of_subtask_0() -> None:
    rng = np.random.default_rng()

    def unseeded(offset: int, n: int) -> pa.RecordBatch:
        return pa.record_batch({"x": rng.random(n)})

    source = GeneratorSource(unseeded, total=40, batch_size=10)
    with pytest.raises(DataError, match=r"gen_0: .*not deterministic.*seed any randomness from the offset"):
        source.build(SourceContext("gen_0")).read()
    # Other subtasks, and resumed readers, do not pay for the check.
    assert source.build(SourceContext("gen_0", 1, 2)).read() is not None
    assert source.build(SourceContext("gen_0"), {"next_batch": 2}).read() is not None


def test_the_determinism_check_calls_make_batch_twice_only_once() -> None:
    calls: list[int] = []

    def counted(offset: int, n: int) -> pa.RecordBatch:
        calls.append(offset)
        return make_batch(offset, n)

    assert ids(GeneratorSource(counted, total=30, batch_size=10).build(SourceContext("gen_0")))
    assert calls == [0, 0, 10, 20]


def test_nan_values_count_as_deterministic() -> None:
    def with_nan(offset: int, n: int) -> pa.RecordBatch:
        return pa.record_batch({"x": np.full(n, np.nan)})

    batch = GeneratorSource(with_nan, total=5, batch_size=5).build(SourceContext("gen_0")).read()
    assert isinstance(batch, pa.RecordBatch)
    assert batch.num_rows == 5


def test_rate_limit_is_shared_by_the_subtasks_and_returns_idle() -> None:
    clock = FakeClock()
    source = GeneratorSource(make_batch, total=1_000, batch_size=10, max_events_per_s=100, clock=clock)
    reader = source.build(SourceContext("gen_0", 1, 2))  # 50 events/s: one batch of 10 per 0.2 s
    assert isinstance(reader.read(), pa.RecordBatch)
    assert idle_seconds(reader.read()) == pytest.approx(0.2)
    clock.now += 0.15
    assert idle_seconds(reader.read()) == pytest.approx(0.05)
    assert reader.offset() == {"cursors": [[2, 1, 3, 0]]}
    clock.now += 0.05
    batch = reader.read()
    assert isinstance(batch, pa.RecordBatch)
    assert batch.column("id")[0].as_py() == 30
    clock.now += 10.0  # falling behind lets the reader catch up without waiting
    assert all(isinstance(reader.read(), pa.RecordBatch) for _ in range(5))


def test_rate_limit_idle_is_capped_so_the_runtime_stays_responsive() -> None:
    clock = FakeClock()
    source = GeneratorSource(make_batch, total=100, batch_size=10, max_events_per_s=1, clock=clock)
    reader = source.build(SourceContext("gen_0"))
    reader.read()
    assert reader.read() == Idle(1.0)


def test_resume_offset_of_another_subtask_is_rejected() -> None:
    source = GeneratorSource(make_batch, total=100, batch_size=10)
    with pytest.raises(PlanError, match=r"gen_0: resume offset .* does not belong to subtask 0 of 2"):
        source.build(SourceContext("gen_0", 0, 2), {"next_batch": 3})
    with pytest.raises(PlanError, match=r"is not \{'next_batch': k\}"):
        source.build(SourceContext("gen_0"), {"unit": 3})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"batch_size": 0}, "batch_size must be > 0"), ({"total": -1}, "total must be >= 0"),
     ({"max_events_per_s": 0}, "max_events_per_s must be > 0")],
)
def test_bad_options_are_plan_errors(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        GeneratorSource(make_batch, **kwargs)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@rescales
def test_batches_are_read_exactly_once_across_rescales(parallelisms: list[int], reads: list[list[int]]) -> None:
    """Stop readers at one parallelism, resume at another (and again): every batch once."""
    assert_exactly_once(lambda: GeneratorSource(make_batch, total=97, batch_size=4), list(range(97)),
                        parallelisms, reads)


def test_old_offsets_are_read_at_the_same_and_at_another_parallelism() -> None:
    source = GeneratorSource(make_batch, total=60, batch_size=10)
    assert [b[0] for b in ids(source.build(SourceContext("g", 1, 2), {"next_batch": 3}))] == [30, 50]
    rescaled = RescaledOffsets(({"next_batch": 2}, {"next_batch": 3}))  # batches 0, 1 read; 2..5 left
    firsts = sorted(b[0] for s in range(3) for b in ids(source.build(SourceContext("g", s, 3), rescaled)))
    assert firsts == [20, 30, 40, 50]
