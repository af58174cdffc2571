"""One ``step()`` of ferroptim.AdamW with 8-bit blockwise states (``state_dtype="8bit"``)
vs torch's AdamW on float32 states (fused and default), ferroptim's float32- and
bfloat16-state steps and bitsandbytes' AdamW8bit. Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["q8_states"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_q8_states_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
