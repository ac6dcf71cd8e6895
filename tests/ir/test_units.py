import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainplan.ir.units import format_bytes, parse_bandwidth, parse_bytes, parse_flops, parse_seconds


@pytest.mark.parametrize(
    "text, expected",
    [("40 GiB", 40 * 2**30), ("80GB", 80 * 10**9), ("512 MiB", 512 * 2**20), ("1.5 KiB", 1536), ("7", 7), (1024, 1024)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("200 Gb/s", 25e9), ("200 Gbit/s", 25e9), ("300 GB/s", 300e9), ("1.2 GB/s", 1.2e9), (5e9, 5e9)],
)
def test_parse_bandwidth(text, expected):
    assert parse_bandwidth(text) == pytest.approx(expected)


def test_parse_flops_and_seconds():
    assert parse_flops("312 TFLOP/s") == pytest.approx(312e12)
    assert parse_flops("40 GFLOPS") == pytest.approx(40e9)
    assert parse_seconds("5 us") == pytest.approx(5e-6)
    assert parse_seconds("2 ms") == pytest.approx(2e-3)


@pytest.mark.parametrize("bad", ["lots", "40 GiBs", "-3 GB", True, None, [1], "5 parsecs"])
def test_bad_quantities_raise_value_error(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


@given(st.integers(min_value=0, max_value=2**50))
def test_bytes_round_trip_plain_integers(n):
    assert parse_bytes(n) == n
    assert parse_bytes(str(n)) == n


def test_format_bytes():
    assert format_bytes(80 * 2**30) == "80.0 GiB"
    assert format_bytes(12) == "12 B"
