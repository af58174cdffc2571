"""One ``step()`` of ferroptim.RMSprop vs torch.optim.RMSprop (lr 0.01): foreach,
for-loop, default (torch has no fused RMSprop). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["rmsprop"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_rmsprop_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
