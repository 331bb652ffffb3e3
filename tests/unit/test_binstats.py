import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmfleet.binstats import HEADER, StatsFormatError, parse_header, read_layout
from kvmfleet.model import StatType, StatUnit

from .statsbytes import stats_file

CUMUL, INSTANT, PEAK, LINHIST, LOGHIST = 0, 1, 2, 3, 4
SECONDS, BOOLEAN, POW2 = 0x20, 0x40, 0x100


def layout_of(raw: bytes, tmp_path):
    path = tmp_path / "stats"
    path.write_bytes(raw)
    fd = os.open(path, os.O_RDONLY)
    try:
        layout = read_layout(fd)
        return layout, layout.read(fd)
    finally:
        os.close(fd)


def test_every_type_unit_and_base(tmp_path):
    raw = stats_file(
        [("exits", CUMUL, 0, 1, 0), ("pages_4k", INSTANT, 0, 1, 0), ("max_rmap", PEAK, 0, 1, 0),
         ("halt_poll_ns", CUMUL | SECONDS, -9, 1, 0), ("guest_mode", INSTANT | BOOLEAN, 0, 1, 0),
         ("lin_hist", LINHIST, 0, 3, 10), ("log_hist", LOGHIST | POW2, 0, 4, 0)],
        [7, 8, 9, 10, 1, 1, 2, 3, 4, 5, 6, 7], stat_id="kvm-42/vcpu-3")
    layout, values = layout_of(raw, tmp_path)
    assert layout.id == "kvm-42/vcpu-3"
    assert values == {"exits": 7, "pages_4k": 8, "max_rmap": 9, "halt_poll_ns": 10, "guest_mode": 1,
                      "lin_hist": (1, 2, 3), "log_hist": (4, 5, 6, 7)}
    descs = {d.name: d for d in layout.descs}
    assert descs["halt_poll_ns"].unit is StatUnit.SECONDS and descs["halt_poll_ns"].scale == 1e-9
    assert descs["halt_poll_ns"].unit_name == "ns"
    assert descs["guest_mode"].unit is StatUnit.BOOLEAN
    assert descs["lin_hist"].type is StatType.LINEAR_HIST and descs["lin_hist"].bucket_size == 10
    assert descs["log_hist"].base == 2 and descs["log_hist"].size == 4
    assert layout.skipped == []


def test_unknown_type_unit_base_and_flags_are_skipped_not_fatal(tmp_path):
    raw = stats_file(
        [("a", CUMUL, 0, 1, 0), ("newtype", 9, 0, 1, 0), ("newunit", 0x90, 0, 1, 0),
         ("newbase", 0x300, 0, 1, 0), ("newflag", 0x1000, 0, 1, 0), ("b", INSTANT, 0, 1, 0)],
        [1, 2, 3, 4, 5, 6])
    layout, values = layout_of(raw, tmp_path)
    assert values == {"a": 1, "b": 6}  # b keeps its own offset past the skipped ones
    assert len(layout.skipped) == 4 and all("flags" in s for s in layout.skipped)


def test_zero_descriptors(tmp_path):
    layout, values = layout_of(stats_file([], []), tmp_path)
    assert values == {} and layout.descs == () and layout.data_size == 0


@pytest.mark.parametrize("cut", [0, 5, 23])
def test_truncated_header(tmp_path, cut):
    raw = stats_file([("exits", CUMUL, 0, 1, 0)], [1])[:cut]
    with pytest.raises(StatsFormatError, match="header truncated"):
        layout_of(raw, tmp_path)


def test_truncated_descriptors_and_data(tmp_path):
    raw = stats_file([("exits", CUMUL, 0, 1, 0), ("halt_exits", CUMUL, 0, 1, 0)], [1, 2])
    with pytest.raises(StatsFormatError, match="descriptors truncated"):
        layout_of(raw[: 24 + 48 + 70], tmp_path)
    with pytest.raises(StatsFormatError, match="data truncated"):
        layout_of(raw[:-4], tmp_path)


@pytest.mark.parametrize("field,value", [(1, 0), (1, 1 << 20), (2, 1 << 30), (5, 1 << 31)])
def test_absurd_header_sizes_are_refused(field, value):
    words = list(HEADER.unpack(stats_file([("exits", CUMUL, 0, 1, 0)], [1])[:24]))
    words[field] = value
    with pytest.raises(StatsFormatError, match="out of range"):
        parse_header(HEADER.pack(*words))


def test_bad_sizes_and_duplicates_skipped(tmp_path):
    raw = stats_file([("scalar2", CUMUL, 0, 2, 0), ("hist0", LOGHIST, 0, 0, 0), ("x", CUMUL, 0, 1, 0),
                      ("x", CUMUL, 0, 1, 0)], [1, 2, 3, 4])
    layout, values = layout_of(raw, tmp_path)
    assert values == {"x": 3}
    assert len(layout.skipped) == 3


@given(st.binary(max_size=600))
def test_random_bytes_never_crash_with_anything_but_format_error(raw):
    import tempfile

    with tempfile.TemporaryFile() as handle:
        handle.write(raw)
        handle.flush()
        try:
            layout = read_layout(handle.fileno())
            layout.read(handle.fileno())
        except StatsFormatError:
            pass


# -- layouts no kernel makes: refused as a whole, at once (docs/statistics.md, "Hostile VMMs") -------------------
TWO = [("exits", CUMUL, 0, 1, 0), ("halt_exits", CUMUL, 0, 1, 0)]


@pytest.mark.parametrize("descs,offsets,values", [
    (TWO, [0, 0], [1, 2]),  # two counters on one word
    ([("log_hist", LOGHIST, 0, 4, 0), ("exits", CUMUL, 0, 1, 0)], [0, 16], [1, 2, 3, 4, 5]),  # inside a histogram
    ([("exits", CUMUL, 0, 1, 0), ("log_hist", LOGHIST, 0, 4, 0)], [8, 0], [1, 2, 3, 4, 5]),  # out of order
])
def test_overlapping_descriptors_are_refused(tmp_path, descs, offsets, values):
    with pytest.raises(StatsFormatError, match="overlap"):
        layout_of(stats_file(descs, values, offsets=offsets), tmp_path)


def test_descriptor_reaching_past_the_data_is_refused_when_borrowed(tmp_path):
    raw = stats_file([("exits", CUMUL, 0, 1, 0), ("log_hist", LOGHIST, 0, 32, 0)], [1, 2, 3])  # 31 words short
    path = tmp_path / "stats"
    path.write_bytes(raw)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(StatsFormatError, match="data truncated"):
            read_layout(fd)  # not at the first sample: the fd is refused before anything reads it
    finally:
        os.close(fd)


@pytest.mark.parametrize("offsets", [[0, 12], [0, 256 << 10], [0, (1 << 32) - 8]])
def test_descriptor_offsets_out_of_range_are_refused(tmp_path, offsets):
    with pytest.raises(StatsFormatError, match="out of range"):
        layout_of(stats_file(TWO, [1] * 64, offsets=offsets), tmp_path)


@pytest.mark.parametrize("header,why", [
    ({"id_offset": 0}, "id_offset 0 out of range"),  # inside the header
    ({"desc_offset": 8}, "desc_offset 8 out of range"),
    ({"desc_offset": 40}, "id and descriptors overlap"),
    ({"data_offset": 24 + 48 + 64}, "descriptors and data overlap"),
    ({"data_offset": 30}, "overlap"),
    ({"data_offset": 4}, "data_offset 4 out of range"),
])
def test_header_regions_that_overlap_are_refused(tmp_path, header, why):
    with pytest.raises(StatsFormatError, match=why):
        layout_of(stats_file(TWO, [1, 2], **header), tmp_path)


@pytest.mark.parametrize("field,value", [(1, 1024), (1, 257), (2, 2049), (2, 60000), (3, 2 << 20)])
def test_sizes_no_kernel_makes_are_refused(field, value):
    words = list(HEADER.unpack(stats_file(TWO, [1, 2])[:24]))
    words[field] = value
    with pytest.raises(StatsFormatError, match="out of range"):
        parse_header(HEADER.pack(*words))


@pytest.mark.parametrize("name", ["exits\x1b[2J", "a b", "ha\u00eflt", "1st"])
def test_descriptor_names_that_are_not_identifiers_are_refused(tmp_path, name):
    with pytest.raises(StatsFormatError, match="not an identifier"):
        layout_of(stats_file([(name, CUMUL, 0, 1, 0)], [1]), tmp_path)


def test_the_kernels_own_layout_passes(tmp_path):
    """A layout like 6.18's vCPU stats fd (47 descriptors, three 32-bucket histograms) reads as before."""
    descs = [(f"c{i}", CUMUL, 0, 1, 0) for i in range(44)] + [(f"h{i}", LOGHIST | POW2, 0, 32, 0) for i in range(3)]
    layout, values = layout_of(stats_file(descs, list(range(140))), tmp_path)
    assert layout.data_size == 1120 and values["c43"] == 43 and values["h2"] == tuple(range(108, 140))
