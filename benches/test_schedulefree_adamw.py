"""One ``step()`` of ferroptim.ScheduleFreeAdamW vs schedulefree.AdamWScheduleFree
(its default foreach flavour and its for-loop; torch has no Schedule-Free optimizers).
Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["schedulefree_adamw"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_schedulefree_adamw_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
