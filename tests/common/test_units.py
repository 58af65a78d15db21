"""common/units.py: one meaning for sizes everywhere — K/M/G/T decimal, Ki/Mi/Gi/Ti binary, plain numbers bytes."""

from __future__ import annotations

import pytest

from common.units import SizeError, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("0", 0),
        ("100B", 100),
        ("1K", 1000), ("1KB", 1000), ("1Ki", 1024), ("1KiB", 1024),
        ("500M", 500 * 1000**2), ("500MB", 500 * 1000**2), ("8Mi", 8 * 1024**2), ("1MiB", 1024**2),
        ("500G", 500 * 1000**3), ("100GB", 100 * 1000**3), ("2Gi", 2 * 1024**3), ("2GiB", 2 * 1024**3),
        ("3T", 3 * 1000**4), ("3TB", 3 * 1000**4), ("1Ti", 1024**4), ("1TiB", 1024**4),
    ],
)
def test_k_m_g_t_are_powers_of_ten_and_ki_mi_gi_ti_powers_of_two(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("100gb", 100 * 1000**3), ("2gib", 2 * 1024**3),
                                                ("64kib", 64 * 1024), ("1mI", 1024**2), ("5g", 5 * 1000**3)])
def test_units_are_case_insensitive(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("1.5GiB", 3 * 1024**3 // 2), ("0.5K", 500), ("2.25MiB", 2359296)])
def test_decimals_are_allowed(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_blanks_around_the_number_and_unit_are_ignored() -> None:
    assert parse_size(" 8 Mi ") == 8 * 1024**2


def test_huge_sizes_are_exact() -> None:
    assert parse_size("18446744073709551615") == 2**64 - 1
    assert parse_size("9007199254740.993K") == 2**53 + 1  # a float would round this to 2**53


def test_an_int_is_already_bytes() -> None:
    assert parse_size(4096) == 4096


@pytest.mark.parametrize("text", ["lots", "", "GiB", "1XB", "-1GiB", "1e9", "1 G B", "1GiBs", "two gigs", "1,5G"])
def test_anything_else_is_a_size_error_with_examples(text: str) -> None:
    with pytest.raises(SizeError, match=r"not a size: .*(examples: .*powers of 10.*powers of 2)"):
        parse_size(text)


def test_a_size_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(-1)


def test_sizes_are_formatted_in_binary_units() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1024**2) == "1.00 MiB"
    assert format_size(3 * 1024**3 // 2) == "1.50 GiB"
    assert format_size(5 * 1024**5) == "5120.00 TiB"
