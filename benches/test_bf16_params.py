"""One ``step()`` of ferroptim.AdamW on a bfloat16 model: ``stochastic_rounding=True``
(bf16 params, grads and states, 14 bytes/element) and ``master_weights=True`` (a float32
master copy), vs torch's AdamW on the float32 model (fused and default) and on the same
bfloat16 model (fused and for-loop). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["bf16_params"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_bf16_params_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
