"""One ``step()`` of ferroptim.LARS vs pytorch_optimizer.LARS (lr 0.1, weight decay 1e-4,
momentum 0.9), the reference's default flavour (torch has no LARS). Cases: see
``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["lars"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_lars_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
