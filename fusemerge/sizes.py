"""Byte sizes as users write them ("512MiB", "5GB", "1.5G") and as fusemerge prints them ("1.50 GiB").

Units are case-insensitive:

    B (or nothing)        bytes
    KB  MB  GB  TB  PB    decimal: 10^3, 10^6, 10^9, 10^12, 10^15
    KiB MiB GiB TiB PiB   binary:  2^10, 2^20, 2^30, 2^40, 2^50
    K   M   G   T   P     binary (as in `free -h` and most GPU tools)

`--out-shard-size` is mergekit's flag, so it also reads mergekit's spellings (`parse_shard_size`): an
integer followed by a single `k`, `m` or `b` means thousand, million or billion bytes (`5B` = 5 * 10^9
bytes, `500M` = 5 * 10^8), as mergekit/common.py `parse_kmb` does; its shard writer compares that number
with tensor bytes (mergekit/io/tensor_writer.py), whatever its help text says about parameters.
Everywhere else (`--max-memory`) a lone `B` is a byte and `M` a mebibyte.
"""

from __future__ import annotations

import re
from decimal import ROUND_FLOOR, Decimal, InvalidOperation

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "p": 2**50,
}

_SIZE_RE = re.compile(r"^\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")

_HINT = (
    "expected a positive number with an optional unit "
    "(B; KB, MB, GB, TB, PB; KiB, MiB, GiB, TiB, PiB; K, M, G, T, P), e.g. 512MiB, 8GiB or 5GB"
)

_PRINT_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: str | int, hint: str = _HINT) -> int:
    """Parse a byte size into a positive number of bytes (`hint`: what an error says is expected).

    Fractions are allowed with a unit and rounded down to whole bytes; a size without a unit (or
    with `B`) must be a whole number. Zero, negative and unparsable sizes raise ValueError.

    >>> parse_size("512MiB"), parse_size("5GB"), parse_size("1.5G"), parse_size(4096)
    (536870912, 5000000000, 1610612736, 4096)
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"invalid size {text!r}: {hint}")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"invalid size {text}: a size must be positive")
        return text
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: {hint}")
    sign, number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"invalid size {text!r}: unknown unit {unit!r}; {hint}")
    try:
        value = Decimal(number)
    except InvalidOperation:  # the regex admits only decimal literals; kept for safety
        raise ValueError(f"invalid size {text!r}: {hint}") from None
    if sign == "-" and value != 0:
        raise ValueError(f"invalid size {text!r}: a size must be positive")
    if factor == 1 and value != value.to_integral_value():
        raise ValueError(f"invalid size {text!r}: a number of bytes must be whole")
    n = int((value * factor).to_integral_value(rounding=ROUND_FLOOR))
    if n <= 0:
        raise ValueError(f"invalid size {text!r}: a size must be at least 1 byte")
    return n


def format_size(n: int) -> str:
    """Format a number of bytes with a binary unit: bytes as an integer, larger sizes with two decimals.

    >>> format_size(512), format_size(1536), format_size(3 * 2**29)
    ('512 B', '1.50 KiB', '1.50 GiB')
    """
    sign = "-" if n < 0 else ""
    size = abs(int(n))
    if size < 1024:
        return f"{sign}{size} B"
    index = 1
    while index < len(_PRINT_UNITS) - 1 and size >= 1024 ** (index + 1):
        index += 1
    value = size / 1024**index
    # 1023.999 MiB would print as "1024.00 MiB"; move to the next unit instead.
    if round(value, 2) >= 1024 and index < len(_PRINT_UNITS) - 1:
        index += 1
        value = size / 1024**index
    return f"{sign}{value:.2f} {_PRINT_UNITS[index]}"


_SHARD_HINT = (
    "expected bytes as mergekit writes them (a whole number, or one with k, m or b: thousand, million or billion "
    "bytes, e.g. 5B) or with a unit (KB, MB, GB: decimal; KiB, MiB, GiB: binary), e.g. 5B or 2GiB"
)
_KMB_RE = re.compile(r"^\s*(\d+)\s*([kKmMbB])\s*$")
_KMB = {"k": 10**3, "m": 10**6, "b": 10**9}


def parse_shard_size(text: str | int) -> int:
    """`--out-shard-size`: mergekit's `parse_kmb` forms (`5B`, `500M`, `100k`: decimal thousand / million /
    billion bytes), else `parse_size`.

    >>> parse_shard_size("5B"), parse_shard_size("500M"), parse_shard_size("2GiB"), parse_shard_size("4096")
    (5000000000, 500000000, 2147483648, 4096)
    """
    match = _KMB_RE.match(text) if isinstance(text, str) else None
    if match is None:
        return parse_size(text, _SHARD_HINT)
    n = int(match.group(1)) * _KMB[match.group(2).lower()]
    if n <= 0:
        raise ValueError(f"invalid size {text!r}: a size must be at least 1 byte")
    return n
