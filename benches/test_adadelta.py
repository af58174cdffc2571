"""One ``step()`` of ferroptim.Adadelta vs torch.optim.Adadelta (defaults, lr 1.0): foreach,
for-loop, default (torch has no fused Adadelta). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["adadelta"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_adadelta_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
