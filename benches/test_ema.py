"""One ``step()`` of ferroptim.AdamW with ``ema_decay`` (the average updated inside the
step's pass) vs AdamW followed by AveragedModel's EMA update, and vs ferroptim.AdamW
without an average (the EMA's cost). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["ema"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_ema_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
