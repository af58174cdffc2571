"""pytest-benchmark setup for ferroptim's benchmarks.

Run ``pytest benches -n0`` for timings (``-n0``: in one process; the project's pytest
options spread tests over xdist workers, under which pytest-benchmark does not time;
``--benchmark-disable`` runs each benchmark once, as a smoke test). pytest-benchmark runs
contenders one after another; for ratios measured interleaved in one run, use
``python benches/report.py``.

torch runs on as many threads as ferroptim, so neither side gets more cores.
"""

from __future__ import annotations

import math
import time

import ferroptim
import pytest
from harness import CASES, Runner, Suite, describe_machine, fresh_params, set_threads

THREADS = ferroptim.get_num_threads()
set_threads(THREADS)

#: Time each benchmark aims to take (seconds), and the bounds on its rounds.
TARGET_SECONDS = 2.0
MIN_ROUNDS, MAX_ROUNDS = 5, 200


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info["ferroptim"] = {k: v for k, v in describe_machine().items() if k != "cpu"}


def pytest_report_header(config) -> str:
    info = describe_machine()
    return (
        f"ferroptim {info['ferroptim']} ({info['simd_level']}, {info['ferroptim_threads']} threads)"
        f", torch {info['torch']} ({info['torch_threads']} threads), {info['cpu']}"
    )


def _rounds(runner: Runner) -> tuple[int, int]:
    """(rounds, iterations) for about ``TARGET_SECONDS``, from a warm-up call's time."""
    runner()  # first step: state is created here
    if runner.prepare is not None:
        runner.prepare()
    t0 = time.perf_counter()
    runner.step()
    cost = max(time.perf_counter() - t0, 1e-7)
    iterations = 1 if runner.prepare is not None else max(1, min(100, int(1e-3 / cost)))
    rounds = int(TARGET_SECONDS / (cost * iterations))
    return max(MIN_ROUNDS, min(MAX_ROUNDS, rounds)), iterations


@pytest.fixture
def step_benchmark(benchmark):
    """``step_benchmark(suite, case, contender)``: benchmarks one call of the contender's step
    on the case's parameters and records elements/s and bytes/s in ``extra_info``."""

    def run(suite: Suite, case_name: str, contender: str) -> None:
        case = CASES[case_name]
        runner = suite.contenders(case_name)[contender](fresh_params(case_name))
        benchmark.extra_info.update(
            contender=contender,
            elements=case.numel,
            tensors=case.num_tensors,
            bytes_per_element=suite.bytes_per_element,
            threads=THREADS,
        )
        if benchmark.disabled:
            benchmark.pedantic(runner.step, setup=runner.prepare)
            return
        rounds, iterations = _rounds(runner)
        benchmark.pedantic(
            runner.step,
            setup=runner.prepare,
            rounds=rounds,
            iterations=iterations,
            warmup_rounds=1,
        )
        median = benchmark.stats.stats.median
        if median > 0 and math.isfinite(median):
            benchmark.extra_info["elements_per_s"] = case.numel / median
            benchmark.extra_info["bytes_per_s"] = case.numel * suite.bytes_per_element / median

    return run
