"""One ``step()`` of ferroptim.Muon vs torch.optim.Muon (lr 0.02), and the Newton–Schulz
matrix products alone. Cases: ``harness.MATRIX_CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["muon"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_muon_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
