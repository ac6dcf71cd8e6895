"""The cost model against published measurements (bench/data, transcribed from the papers)."""

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import validate_megatron  # noqa: E402


@pytest.mark.slow
def test_megatron_table1_within_ten_percent_and_free_search_never_slower():
    results = [validate_megatron.check_row(r) for r in validate_megatron.rows()]
    errors = [abs(r["error"]) for r in results]
    assert len(results) == 10
    assert max(errors) <= 0.10, results
    assert sum(errors) / len(errors) <= 0.05, errors
    for r in results:
        assert r["free_step_s"] <= r["fixed_step_s"] * (1 + 1e-9), r
