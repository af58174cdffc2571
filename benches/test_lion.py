"""One ``step()`` of ferroptim.Lion vs lion_pytorch.Lion (lr 1e-4, weight decay 0.01), the
reference's default flavour (torch has no Lion). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["lion"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_lion_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
