"""The split-ring walker, the guest memory model and report parsing, against a hostile guest."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes import F_INDIRECT, F_NEXT, F_WRITE, DriverRing, GuestRam, RamRegion
from vhost_user_balloon.protocol import (
    MAX_STATS_BYTES,
    AddressError,
    BalloonDevice,
    BalloonStat,
    Chain,
    Descriptor,
    DescriptorError,
    GuestMemory,
    LocalProtocolError,
    MemoryRegion,
    MemoryTableError,
    QueueError,
    ReportError,
    RingError,
    RingLayout,
    SplitQueue,
    StatsError,
    VhostUserError,
    balloon_pages,
    need_event,
    read_stats,
    report_ranges,
)

MiB = 1 << 20


def setup(
    size: int = 16, ram_size: int = 4 * MiB, *, indirect: bool = False, event_idx: bool = False
) -> tuple[GuestRam, DriverRing, SplitQueue, GuestMemory]:
    ram = GuestRam.flat(ram_size)
    drv = DriverRing(ram, 0x1000, size)
    q = SplitQueue(drv.layout(), indirect=indirect, event_idx=event_idx)
    mem = ram.guest_memory()
    q.check_layout(mem)
    q.load_used_index(mem)
    return ram, drv, q, mem


def test_direct_chain_round_trip() -> None:
    _, drv, q, mem = setup()
    head = drv.add_chain([(2 * MiB, 2 * MiB, True), (0x20_0000 + 2 * MiB, 4096, True)])
    chain = q.pop(mem)
    assert chain is not None and chain.head == head
    assert [(d.addr, d.length, d.writable) for d in chain.descriptors] == [
        (2 * MiB, 2 * MiB, True),
        (4 * MiB, 4096, True),
    ]
    assert chain.descriptors[0].location is not None
    assert chain.descriptors[1].location is None  # past the end of RAM: the device decides
    assert q.pop(mem) is None
    q.push(mem, chain.head, 0)
    assert drv.take_used() == [(head, 0)]
    assert q.should_notify(mem)
    drv.set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not q.should_notify(mem)


def test_indirect_chain() -> None:
    _, drv, q, mem = setup(indirect=True)
    drv.add_indirect(0x10_0000, [(0x20_0000, 4096, False), (0x30_0000, 8192, True)])
    chain = q.pop(mem)
    assert chain is not None and [d.length for d in chain.descriptors] == [4096, 8192]
    assert chain.total_length == 12288


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda d: (d.write_desc(0, 0x20_0000, 4096, F_NEXT, 0), d.publish(0)), "chain_loop"),
        (lambda d: (d.write_desc(0, 0x20_0000, 4096, F_NEXT, 99), d.publish(0)),
         "next_out_of_range"),
        (lambda d: (d.write_desc(0, 0x20_0000, 0, 0), d.publish(0)), "zero_length"),
        (lambda d: (d.write_desc(0, 0x20_0000, 4096, 0x80), d.publish(0)),
         "bad_descriptor_flags"),
        (lambda d: (d.write_desc(0, 0x20_0000, 4096, F_WRITE | F_NEXT, 1),
                    d.write_desc(1, 0x30_0000, 4096, 0), d.publish(0)),
         "readable_after_writable"),
        (lambda d: (d.write_desc(0, 0x20_0000, 0x8000_0000, F_NEXT, 1),
                    d.write_desc(1, 0x30_0000, 0x8000_0000, 0), d.publish(0)),
         "chain_too_large"),
        (lambda d: (d.write_desc(0, 0x10_0000, 32, F_INDIRECT), d.publish(0)),
         "indirect_not_negotiated"),
    ],
)  # fmt: skip
def test_descriptor_rules(build: object, reason: str) -> None:
    _, drv, q, mem = setup()
    build(drv)  # type: ignore[operator]
    with pytest.raises(DescriptorError) as err:
        q.pop(mem)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda d, r: (d.write_desc(0, 0x10_0000, 32, F_INDIRECT),
                       r.write(0x10_0000, struct.pack("<QIHH", 0x10_0000, 16, F_INDIRECT, 0))),
         "nested_indirect"),
        (lambda d, r: d.write_desc(0, 0x10_0000, 24, F_INDIRECT), "bad_indirect_length"),
        (lambda d, r: d.write_desc(0, 0x10_0000, 0, F_INDIRECT), "bad_indirect_length"),
        (lambda d, r: d.write_desc(0, 0x10_0000, 32, F_INDIRECT | F_NEXT, 1), "indirect_next"),
        (lambda d, r: d.write_desc(0, 0x3F_FFF0, 32, F_INDIRECT), "indirect_outside_memory"),
        (lambda d, r: (d.write_desc(0, 0x20_0000, 16, F_NEXT, 1),
                       d.write_desc(1, 0x10_0000, 32, F_INDIRECT)), "indirect_not_head"),
        (lambda d, r: (d.write_desc(0, 0x10_0000, 32, F_INDIRECT),
                       r.write(0x10_0000, struct.pack("<QIHH", 0x20_0000, 16, F_NEXT, 0))),
         "chain_loop"),
    ],
)  # fmt: skip
def test_indirect_rules(build: object, reason: str) -> None:
    ram, drv, q, mem = setup(indirect=True)
    build(drv, ram)  # type: ignore[operator]
    drv.publish(0)
    with pytest.raises(DescriptorError) as err:
        q.pop(mem)
    assert err.value.reason == reason


def test_avail_index_jump_and_head_out_of_range() -> None:
    _, drv, q, mem = setup(size=16)
    drv.set_avail_idx(17)
    with pytest.raises(RingError) as err:
        q.pop(mem)
    assert err.value.reason == "avail_index_jump"
    _, drv, q, mem = setup(size=16)
    drv.ram.write(drv.avail + 4, struct.pack("<H", 16))
    drv.set_avail_idx(1)
    with pytest.raises(RingError) as err2:
        q.pop(mem)
    assert err2.value.reason == "head_out_of_range"


def test_avail_index_wraps() -> None:
    _, drv, q, mem = setup(size=4)
    q.last_avail_idx = 0xFFFF
    drv.avail_idx = 0xFFFF
    drv.add_chain([(0x20_0000, 4096, True)])
    drv.add_chain([(0x20_0000, 4096, True)])
    assert q.pending(mem) == 2
    assert q.pop(mem) is not None and q.pop(mem) is not None
    assert q.last_avail_idx == 1


def test_event_idx() -> None:
    ram, drv, q, mem = setup(event_idx=True)
    drv.add_chain([(0x20_0000, 4096, True)])
    chain = q.pop(mem)
    assert chain is not None
    # avail_event published for the driver
    assert struct.unpack("<H", ram.read(drv.used + 4 + 8 * 16, 2))[0] == 1
    q.push(mem, chain.head, 0)
    assert q.should_notify(mem)  # first time always
    ram.write(drv.avail + 4 + 2 * 16, struct.pack("<H", 5))  # used_event = 5
    q.push(mem, chain.head, 0)
    assert not q.should_notify(mem)
    assert need_event(0, 1, 0) and not need_event(5, 2, 1)


def test_queue_geometry_rules() -> None:
    with pytest.raises(QueueError):
        RingLayout(16, 0x1001, 0x2000, 0x3000)
    with pytest.raises(QueueError):
        RingLayout(16, 0x1000, 0x2001, 0x3000)
    with pytest.raises(QueueError):
        RingLayout(16, 0x1000, 0x2000, 0x3002)
    _, _, q, mem = setup()
    with pytest.raises(LocalProtocolError):
        q.push(mem, 16, 0)


# -- memory -----------------------------------------------------------------------------
def test_memory_table_validation() -> None:
    r = MemoryRegion(0, 4096, 0x7F00_0000_0000, 0)
    with pytest.raises(MemoryTableError, match="size 0"):
        GuestMemory([MemoryRegion(0, 0, 0, 0)])
    with pytest.raises(MemoryTableError) as err:
        GuestMemory([MemoryRegion((1 << 64) - 4096, 8192, 0, 0)])
    assert err.value.reason == "region_overflow"
    with pytest.raises(MemoryTableError, match="user address"):
        GuestMemory([r, MemoryRegion(4096, 4096, 0x7F00_0000_0000, 0)])
    with pytest.raises(MemoryTableError):
        GuestMemory([])
    with pytest.raises(MemoryTableError):
        GuestMemory([MemoryRegion(i * 4096, 4096, i * 4096, 0) for i in range(9)])
    assert GuestMemory([r], []).regions == (r,)  # a layout without access is fine
    with pytest.raises(LocalProtocolError):
        GuestMemory([r], [object(), object()])  # type: ignore[list-item]


def test_translation_and_ranges() -> None:
    ram = GuestRam([RamRegion(0, bytearray(8192)), RamRegion(1 << 32, bytearray(8192), 8192)])
    mem = ram.guest_memory()
    loc = mem.locate_gpa((1 << 32) + 100, 10)
    assert (loc.region, loc.offset, loc.file_offset) == (1, 100, 8292)
    ram.write((1 << 32) + 100, b"hello")
    assert mem.read_uva(0x7F00_0000_0000 + (1 << 32) + 100, 5) == b"hello"
    with pytest.raises(AddressError) as err:
        mem.locate_gpa(8000, 4096)  # runs off region 0
    assert err.value.reason == "outside_memory"
    with pytest.raises(AddressError):
        mem.locate_gpa(0, 0)
    assert mem.find_gpa(0, 0) is None and mem.find_uva(0, 1) is None
    assert mem.total_size == 16384
    with pytest.raises(LocalProtocolError):
        GuestMemory(mem.regions).read_gpa(0, 1)


@given(
    st.lists(st.tuples(st.integers(1, 8), st.integers(0, 8)), min_size=1, max_size=509),
    st.data(),
)
def test_lookup_among_many_regions_matches_a_scan(
    shapes: list[tuple[int, int]], data: st.DataObject
) -> None:
    """Up to 509 regions (CONFIGURE_MEM_SLOTS), out of order in the table, with gaps:
    a range is found in the one region that holds it whole, and nowhere else."""
    regions, gpa = [], 0
    for pages, gap in shapes:
        # user addresses run the other way, so the two lookups sort differently
        uva = 0x7F00_0000_0000 - gpa - pages * 4096
        regions.append(MemoryRegion(gpa, pages * 4096, uva, gpa))
        gpa += (pages + gap) * 4096
    order = data.draw(st.permutations(regions))
    mem = GuestMemory(order, limit=509)
    for _ in range(20):
        addr = data.draw(st.integers(0, gpa + 4096))
        length = data.draw(st.integers(1, 3 * 4096))
        holders = [
            i for i, r in enumerate(order)
            if r.guest_phys_addr <= addr and addr + length <= r.guest_phys_addr + r.memory_size
        ]  # fmt: skip
        found = mem.find_gpa(addr, length)
        assert (found.region if found else None) == (holders[0] if holders else None)
        if found is not None:
            r = order[found.region]
            assert found.offset == addr - r.guest_phys_addr
            uva = r.userspace_addr + found.offset
            assert mem.find_uva(uva, length) == found


# -- reports -----------------------------------------------------------------------------
def chain_of(*descs: tuple[int, int, bool]) -> Chain:
    return Chain(0, tuple(Descriptor(a, n, w, None) for a, n, w in descs))


def test_report_ranges() -> None:
    ranges = report_ranges(
        chain_of((2 * MiB, 2 * MiB, True), (4 * MiB, 4 * MiB, True), (4096, 4096, True))
    )
    assert [(r.gpa, r.order) for r in ranges] == [(2 * MiB, 9), (4 * MiB, 10), (4096, 0)]
    # An arm64 guest with 16 KiB pages reports 32 MiB blocks (its order 11): the label
    # counts 4 KiB units whatever the guest's page size, so that block is order 13.
    (block,) = report_ranges(chain_of((64 * MiB, 32 * MiB, True)))
    assert block.order == 13


@pytest.mark.parametrize(
    ("desc", "reason"),
    [
        ((2 * MiB, 2 * MiB, False), "report_not_writable"),
        ((0, 3 * 4096, True), "report_bad_length"),
        ((0, 2048, True), "report_bad_length"),
        ((0, 1 << 32, True), "report_bad_length"),
        ((4096, 2 * MiB, True), "report_unaligned"),
    ],
)
def test_malformed_reports(desc: tuple[int, int, bool], reason: str) -> None:
    with pytest.raises(ReportError) as err:
        report_ranges(chain_of(desc))
    assert err.value.reason == reason


# -- anything at all ----------------------------------------------------------------------
RAM = 1 * MiB
TWO_REGIONS = [RamRegion(0, bytearray(RAM // 2)), RamRegion(RAM, bytearray(RAM // 2), 0)]

descriptor = st.tuples(
    st.one_of(st.integers(0, 2 * RAM), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 64 * 1024), st.integers(0, (1 << 32) - 1)),
    st.integers(0, 0xFFFF),
    st.integers(0, 40),
)


@pytest.mark.fuzz
@given(
    size=st.sampled_from([1, 2, 8, 32]),
    table=st.lists(descriptor, min_size=32, max_size=32),
    heads=st.lists(st.integers(0, 40), max_size=8),
    avail_idx=st.integers(0, 0xFFFF),
    indirect=st.booleans(),
    indirect_table=st.lists(descriptor, max_size=8),
    in_place=st.booleans(),
)
def test_any_ring_content_yields_chains_inside_ram_or_typed_errors(
    size: int,
    table: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_idx: int,
    indirect: bool,
    indirect_table: list[tuple[int, int, int, int]],
    in_place: bool,
) -> None:
    """Whether the ring is read in place (a sealed memfd) or through read and write
    (an unsealed file), the same rules hold."""
    ram = GuestRam([RamRegion(r.gpa, bytearray(len(r.buf)), r.mmap_offset) for r in TWO_REGIONS])
    drv = DriverRing(ram, 0x1000, size)
    for i in range(size):
        drv.write_desc(i, *table[i])
    for k, (a, n, f, x) in enumerate(indirect_table):
        ram.write(0x8000 + 16 * k, struct.pack("<QIHH", a, n, f, x))
    for k, h in enumerate(heads):
        ram.write(drv.avail + 4 + 2 * (k % size), struct.pack("<H", h))
    drv.set_avail_idx(avail_idx)
    q = SplitQueue(drv.layout(), indirect=indirect)
    mem = ram.guest_memory(in_place=in_place)
    regions = mem.regions
    for _ in range(size + 1):  # bounded: at most one pass over the ring
        try:
            chain = q.pop(mem)
        except VhostUserError:
            return
        if chain is None:
            return
        assert len(chain.descriptors) <= max(size, 32768)
        for d in chain.descriptors:
            if d.location is not None:
                r = regions[d.location.region]
                assert r.guest_phys_addr <= d.addr
                assert d.addr + d.length <= r.guest_phys_addr + r.memory_size
        try:
            for rr in report_ranges(chain):
                assert rr.length == 4096 << rr.order and rr.gpa % rr.length == 0
        except ReportError:
            pass
        q.push(mem, chain.head, 0)


def test_large_rings_are_walked_descriptor_by_descriptor() -> None:
    # Tables past 64 KiB are not snapshotted whole; the rules are the same.
    _, drv, q, mem = setup(size=8192, ram_size=8 * MiB)
    head = drv.add_chain([(4 * MiB, 4096, True), (5 * MiB, 8192, True)])
    chain = q.pop(mem)
    assert chain is not None and chain.head == head and chain.total_length == 12288
    drv.write_desc(2, 4 * MiB, 4096, F_NEXT, 2)
    drv.publish(2)
    with pytest.raises(DescriptorError) as err:
        q.pop(mem)
    assert err.value.reason == "chain_loop"


# -- statistics buffers -------------------------------------------------------------------
def stats_chain(
    ram: GuestRam, at: int, pairs: list[tuple[int, int]], *, split: int = 0, writable: bool = False
) -> Chain:
    data = b"".join(struct.pack("<HQ", t, v) for t, v in pairs)
    ram.write(at, data)
    mem = ram.guest_memory()
    cut = split or len(data)
    parts = [(at, cut), (at + cut, len(data) - cut)] if split else [(at, len(data))]
    return Chain(0, tuple(Descriptor(a, n, writable, mem.find_gpa(a, n)) for a, n in parts if n))


def test_stats_are_read_whole_across_parts() -> None:
    ram = GuestRam.flat(MiB)
    pairs = [(BalloonStat.MEMFREE, 123 << 20), (BalloonStat.MEMTOT, 2 << 30), (99, 7)]
    chain = stats_chain(ram, 0x4000, pairs, split=14)  # a part ends inside an entry
    assert read_stats(chain, ram.guest_memory()) == tuple(pairs)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"pairs": [(4, 1)] * 2, "writable": True}, "stats_writable"),
        ({"pairs": [(4, 1)] * (MAX_STATS_BYTES // 10 + 1)}, "stats_bad_length"),
    ],
)
def test_bad_stats_buffers(kwargs: dict[str, object], reason: str) -> None:
    ram = GuestRam.flat(MiB)
    chain = stats_chain(ram, 0x4000, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(StatsError) as err:
        read_stats(chain, ram.guest_memory())
    assert err.value.reason == reason


def test_stats_buffer_of_odd_length_or_outside_ram() -> None:
    ram = GuestRam.flat(MiB)
    odd = Chain(0, (Descriptor(0x4000, 15, False, ram.guest_memory().find_gpa(0x4000, 15)),))
    with pytest.raises(StatsError, match="whole"):
        read_stats(odd, ram.guest_memory())
    outside = Chain(0, (Descriptor(8 * MiB, 20, False, None),))
    with pytest.raises(StatsError) as err:
        read_stats(outside, ram.guest_memory())
    assert err.value.reason == "stats_outside_ram"


# -- inflate/deflate page arrays -------------------------------------------------------
def test_balloon_page_arrays() -> None:
    ram = GuestRam.flat(4 * MiB)
    mem = ram.guest_memory()
    ram.write(0x4000, struct.pack("<3I", 16, 17, 5000))  # the last is past the 4 MiB of RAM
    chain = Chain(0, (Descriptor(0x4000, 12, False, mem.find_gpa(0x4000, 12)),))
    pages = balloon_pages(chain, mem)
    assert [(p.gpa, p.length, p.order) for p in pages] == [
        (16 * 4096, 4096, 0),
        (17 * 4096, 4096, 0),
        (5000 * 4096, 4096, 0),
    ]
    assert pages[0].location is not None and pages[2].location is None
    for bad, reason in (
        (Chain(0, (Descriptor(0x4000, 6, False, mem.find_gpa(0x4000, 6)),)), "pfn_bad_length"),
        (Chain(0, (Descriptor(0x4000, 8, True, mem.find_gpa(0x4000, 8)),)), "pfn_writable"),
        (Chain(0, (Descriptor(8 * MiB, 8, False, None),)), "pfn_outside_ram"),
    ):
        with pytest.raises(ReportError) as err:
            balloon_pages(bad, mem)
        assert err.value.reason == reason


def test_balloon_target_must_fit_the_config_field() -> None:
    device = BalloonDevice()
    device.set_target(1 << 20)
    assert device.read_config(0, 4) == struct.pack("<I", 1 << 20)
    with pytest.raises(LocalProtocolError):
        device.set_target(1 << 32)
