"""One ``step()`` of ferroptim.ASGD vs torch.optim.ASGD (lr 0.01, t0 10): foreach, for-loop,
default (torch has no fused ASGD). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["asgd"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_asgd_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
