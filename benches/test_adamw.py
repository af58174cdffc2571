"""One ``step()`` of ferroptim.AdamW vs torch.optim.AdamW (fused, foreach, for-loop, default).

Cases (see ``harness.CASES``): a GPT-2-like transformer (148 tensors, ~25M elements),
1000 tensors of 1024 elements, one tensor of 32M elements (plus the bandwidth floor:
``stream_probe``, Adam's memory traffic with no arithmetic), one tensor of 16 elements.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["adamw"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_adamw_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
