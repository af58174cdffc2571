"""One ``step()`` of ferroptim.Rprop vs torch.optim.Rprop (defaults, lr 0.01): foreach,
for-loop, default (torch has no fused Rprop). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["rprop"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_rprop_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
