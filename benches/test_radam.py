"""One ``step()`` of ferroptim.RAdam vs torch.optim.RAdam (lr 1e-3, decoupled weight decay
0.01): foreach, for-loop, default (torch has no fused RAdam). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["radam"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_radam_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
