"""ferroptim.AdamW(max_grad_norm=1.0).step() vs torch's clip_grad_norm_(params, 1.0) +
torch.optim.AdamW step (fused, foreach, default); gradients restored before every call.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["adamw_clip"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_adamw_clip_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
