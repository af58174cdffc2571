"""One ``step()`` of ferroptim.ScheduleFreeSGD vs schedulefree.SGDScheduleFree
(its default foreach flavour and its for-loop; torch has no Schedule-Free optimizers).
Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["schedulefree_sgd"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_schedulefree_sgd_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
