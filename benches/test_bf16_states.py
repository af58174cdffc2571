"""One ``step()`` of ferroptim.AdamW with bfloat16 states (``state_dtype=torch.bfloat16``,
stochastic rounding inside the pass) vs torch's AdamW on float32 states (fused and
default) and vs ferroptim's float32-state step. Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["bf16_states"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_bf16_states_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
