"""parse_size / format_size: the units users type for --max-memory and --out-shard-size."""

from __future__ import annotations

import doctest
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusemerge.sizes import format_size, parse_shard_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("8GiB", 8 * 2**30),
        ("5GB", 5 * 10**9),
        ("1.5G", 3 * 2**29),
        ("100M", 100 * 2**20),
        ("4096", 4096),
        ("2KB", 2000),
        ("7kb", 7000),
        ("3kib", 3 * 1024),
        ("3KIB", 3 * 1024),
        ("2 TB", 2 * 10**12),
        ("1t", 2**40),
        ("3TiB", 3 * 2**40),
        ("2PB", 2 * 10**15),
        ("1.5PiB", 3 * 2**49),
        ("6k", 6 * 1024),
        ("12B", 12),
        ("12b", 12),
        ("0.5KiB", 512),
        ("  64 mib ", 64 * 2**20),
        ("1.1KB", 1100),  # 1.1 * 1000 is 1100.0000000000002 in binary floats; Decimal keeps it exact
        ("0.29KB", 290),  # 0.29 * 1000 is 289.99999999999994 in binary floats
        ("1.0005K", 1024),  # 1024.512 bytes round down
        (".5M", 2**19),
        ("1.", 1),
        (4096, 4096),
        (1, 1),
    ],
)
def test_parse_size_accepts(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected a positive number"),
        ("abc", "expected a positive number"),
        ("GiB", "expected a positive number"),
        ("5XB", "unknown unit 'XB'"),
        ("5 G B", "expected a positive number"),
        ("1e9", "expected a positive number"),
        ("2EiB", "unknown unit 'EiB'"),
        ("-5GB", "must be positive"),
        ("0", "at least 1 byte"),
        ("0MiB", "at least 1 byte"),
        ("0.0001K", "at least 1 byte"),
        ("1.5", "must be whole"),
        ("1.5B", "must be whole"),
        (0, "must be positive"),
        (-3, "must be positive"),
        (True, "invalid size True"),
        (1.5, "invalid size 1.5"),
        (None, "invalid size None"),
    ],
)
def test_parse_size_rejects(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid size") as info:
        parse_size(text)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (7, "7 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (3 * 2**29, "1.50 GiB"),
        (5 * 10**9, "4.66 GiB"),
        (2**40, "1.00 TiB"),
        (2**20 - 1, "1.00 MiB"),  # 1023.999 KiB would round to "1024.00 KiB"
        (3 * 2**50, "3.00 PiB"),
        (2**60, "1024.00 PiB"),  # the largest unit keeps growing
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


_UNITS = [("", 1), ("B", 1), ("kB", 10**3), ("Mb", 10**6), ("GB", 10**9), ("tb", 10**12),
          ("KiB", 2**10), ("mib", 2**20), ("GIB", 2**30), ("TiB", 2**40), ("k", 2**10), ("M", 2**20),
          ("g", 2**30), ("T", 2**40), ("PB", 10**15), ("pib", 2**50), ("P", 2**50)]


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(_UNITS), st.booleans())
def test_parse_size_whole_numbers_any_unit(n: int, unit: tuple[str, int], space: bool) -> None:
    suffix, factor = unit
    assert parse_size(f"{n}{' ' if space and suffix else ''}{suffix}") == n * factor


@given(st.integers(min_value=1, max_value=2**62))
def test_format_then_parse_is_close(n: int) -> None:
    back = parse_size(format_size(n))
    if n < 1024:
        assert back == n
    else:
        # two decimals of a value in [1, 1024) lose at most 0.005 units, i.e. < 0.5 %
        assert abs(back - n) <= 0.005 * n + 1


def test_docstring_examples() -> None:
    import fusemerge.sizes

    assert doctest.testmod(fusemerge.sizes).failed == 0


@pytest.mark.parametrize("text, expected", [
    ("5B", 5 * 10**9), ("5b", 5 * 10**9), ("500M", 5 * 10**8), ("100k", 10**5), ("4096", 4096), (4096, 4096),
    ("2GiB", 2 * 2**30), ("5GB", 5 * 10**9), ("1.5G", 3 * 2**29),
])
def test_out_shard_size_reads_mergekit_parse_kmb_forms(text, expected: int) -> None:
    # mergekit/common.py parse_kmb: k / m / b are decimal thousand / million / billion (bytes, in its writer)
    assert parse_shard_size(text) == expected


@pytest.mark.parametrize("text", ["0B", "0k", "-5B", "5X", ""])
def test_bad_shard_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_shard_size(text)


def test_a_bad_shard_size_says_what_its_units_mean() -> None:
    """It listed --max-memory's units ("B; ...; K, M, G"), where 5B is a byte and 2M 2 MiB: for a shard size 5B is
    5 * 10^9 bytes and 2M 2 * 10^6 (a new user's walk-through)."""
    with pytest.raises(ValueError) as e:
        parse_shard_size("5XB")
    assert "k, m or b: thousand, million or billion bytes, e.g. 5B" in str(e.value)
    assert "K, M, G, T, P" not in str(e.value)


def test_default_cpu_budget_counts_reclaimable_page_cache(tmp_path, monkeypatch) -> None:
    """MemAvailable, not free pages: a machine whose RAM is mostly page cache (a merge's inputs, read before)
    still gets the full default budget."""
    import torch

    from fusemerge import planner

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          500000 kB\nMemAvailable:   20000000 kB\n")
    assert planner.available_ram(str(meminfo)) == 20000000 * 1024
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(planner.available_ram(str(tmp_path / "none")) - free) < 64 << 20  # not Linux: the free pages
    monkeypatch.setattr(planner, "available_ram", lambda: 20000000 * 1024)
    assert planner._default_budget(torch.device("cpu")) == planner.DEFAULT_CPU_BUDGET
    monkeypatch.setattr(planner, "available_ram", lambda: 100 << 20)
    assert planner._default_budget(torch.device("cpu")) == 64 << 20
    monkeypatch.setattr(planner, "available_ram", lambda: None)
    assert planner._default_budget(torch.device("cpu")) == planner.DEFAULT_CPU_BUDGET
