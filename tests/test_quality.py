"""The training-quality experiment (examples/quality.py), on its quick path.

* Both models train (the loss falls by a set factor in a few dozen steps) with
  torch.optim.AdamW and ferroptim.AdamW in float32, and the two runs agree step by step;
  with ``state_dtype=torch.bfloat16`` (where ferroptim has it) the states are bfloat16 and
  the loss stays close to fp32's; the bf16-param baseline trains bf16 params.
* The report: gaps, the markdown table, the JSON and the plot.
* The generated text is deterministic given its seed and has the grammar's structure.
* Importing ferroptim (or the experiment's module) does not import matplotlib.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # quality.py imports demo.py beside it, as a script does
import quality  # noqa: E402  (examples/quality.py)

VARIANTS = {v.name: v for v in quality.VARIANTS}
HAS_BF16_STATES = VARIANTS["bf16-states"].missing() is None
# The variants the quick checks run: float32 both ways, and bf16 states where they exist.
CHECKED = ["fp32", "ferro-fp32"] + (["bf16-states", "8bit-states"] if HAS_BF16_STATES else [])


def quick_tasks() -> list[quality.Task]:
    # Fewer steps and a smaller LM batch than --quick: a few seconds for all the runs.
    return [quality.digits_task(40), quality.charlm_task(40, batch_size=16)]


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, dict[str, quality.RunResult]]]:
    # One thread each, as the script runs: a module fixture sets up before conftest's
    # per-test one, and two spin-waiting OpenMP threads on a shared 2-core machine run
    # these steps up to 10x slower.
    threads = torch.get_num_threads(), quality.ferroptim.get_num_threads()
    torch.set_num_threads(1)
    quality.ferroptim.set_num_threads(1)
    try:
        out: dict[str, dict[str, quality.RunResult]] = {}
        for task in quick_tasks():
            batches = task.batches(0, task.steps)
            out[task.name] = {n: quality.train(task, VARIANTS[n], 0, batches) for n in CHECKED}
        yield out
    finally:
        torch.set_num_threads(threads[0])
        quality.ferroptim.set_num_threads(threads[1])


# Final loss (mean over the last 10% of steps) at most this fraction of the first step's.
FALLS_TO = {"digits": 0.12, "charlm": 0.65}  # measured: 0.07, 0.53


@pytest.mark.parametrize("task", ["digits", "charlm"])
@pytest.mark.parametrize("variant", CHECKED)
def test_loss_falls(runs, task, variant):
    losses = runs[task][variant].losses
    assert quality.tail_mean(losses) < FALLS_TO[task] * losses[0], losses


@pytest.mark.parametrize("task", ["digits", "charlm"])
def test_ferroptim_fp32_matches_torch(runs, task):
    ref, ferro = runs[task]["fp32"], runs[task]["ferro-fp32"]
    assert ferro.losses == pytest.approx(ref.losses, rel=1e-5, abs=1e-6)
    assert ferro.heldout == pytest.approx(ref.heldout, rel=1e-5)
    # Params agree to a fraction of one step's size (lr 1e-3 / 3e-3), not to rounding: the
    # attention's key bias has an analytically zero gradient, so Adam normalises its
    # rounding noise (torch's and ferroptim's differ by ulps in sqrt/div) into full steps.
    for p, q in zip(ref.model.parameters(), ferro.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=3e-4)
    assert isinstance(ferro.optimizer, quality.ferroptim.AdamW)
    assert not isinstance(ref.optimizer, quality.ferroptim.AdamW)


@pytest.mark.skipif(not HAS_BF16_STATES, reason="ferroptim.AdamW has no state_dtype yet")
@pytest.mark.parametrize("task", ["digits", "charlm"])
def test_bf16_states_stay_close(runs, task):
    run, ref = runs[task]["bf16-states"], runs[task]["fp32"]
    dtypes = {
        key: value.dtype
        for state in run.optimizer.state.values()
        for key, value in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    }
    assert dtypes == {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    # Within 0.5% of fp32 after a few dozen steps (measured: 0.05%, 0.02%; the issue asks
    # 1% at the end of the full run, mean of 3 seeds).
    assert quality.tail_mean(run.losses) == pytest.approx(quality.tail_mean(ref.losses), rel=5e-3)


@pytest.mark.parametrize("task", ["digits", "charlm"])
def test_8bit_states_stay_close(runs, task):
    run, ref = runs[task]["8bit-states"], runs[task]["fp32"]
    dtypes = {
        value.dtype
        for state in run.optimizer.state.values()
        for key, value in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    }
    assert dtypes == {torch.uint8}  # every moment 8-bit (min_8bit_size=0)
    # Within 1% of fp32 after a few dozen steps (the issue asks 1% at the end of the full
    # run, mean of 3 seeds).
    assert quality.tail_mean(run.losses) == pytest.approx(quality.tail_mean(ref.losses), rel=1e-2)


def test_bf16_param_baseline_trains_bf16_params():
    task = quality.digits_task(40)
    run = quality.train(task, VARIANTS["bf16-params-rne"], 0, task.batches(0, task.steps))
    assert all(p.dtype == torch.bfloat16 for p in run.model.parameters())
    state = next(iter(run.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16  # torch keeps states in the param's dtype
    assert quality.tail_mean(run.losses) < FALLS_TO["digits"] * run.losses[0]


# The bf16-param variants of ferroptim: (state key, dtype) each param's state holds.
BF16_PARAM_STATES = {
    "bf16-params-sr": {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16},
    "bf16-params-8bit": {"exp_avg": torch.uint8, "exp_avg_sq": torch.uint8},
    "bf16-params-master": {
        "exp_avg": torch.float32,
        "exp_avg_sq": torch.float32,
        "master_param": torch.float32,
    },
}


@pytest.mark.parametrize("variant", sorted(BF16_PARAM_STATES))
def test_ferroptim_bf16_param_variants_train(variant):
    if (reason := VARIANTS[variant].missing()) is not None:
        pytest.skip(reason)
    task = quality.digits_task(40)
    run = quality.train(task, VARIANTS[variant], 0, task.batches(0, task.steps))
    assert all(p.dtype == torch.bfloat16 for p in run.model.parameters())
    for state in run.optimizer.state.values():
        dtypes = {key: v.dtype for key, v in state.items() if key != "step"}
        assert dtypes == BF16_PARAM_STATES[variant]
    if variant == "bf16-params-master":  # the param is its master rounded to nearest
        for p in run.model.parameters():
            assert torch.equal(p, run.optimizer.state[p]["master_param"].bfloat16())
    assert quality.tail_mean(run.losses) < FALLS_TO["digits"] * run.losses[0]


def test_same_batches_and_init_per_seed():
    task = quality.charlm_task(3, batch_size=4)
    a, b, c = task.batches(0, 3), task.batches(0, 3), task.batches(1, 3)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert not torch.equal(a[0][0], c[0][0])
    # The targets are the inputs shifted by one character.
    assert torch.equal(a[0][0][:, 1:], a[0][1][:, :-1])
    fp32 = quality.train(task, VARIANTS["fp32"], 0, a)
    rne = quality.train(task, VARIANTS["bf16-params-rne"], 0, a)
    assert fp32.losses[0] == pytest.approx(rne.losses[0], rel=1e-2)  # same init, rounded


def test_generated_text_is_deterministic_and_structured():
    lexicon = quality.make_lexicon(0)
    assert lexicon == quality.make_lexicon(0)
    text = quality.Grammar(lexicon, seed=1).text(5000)
    assert text == quality.Grammar(lexicon, seed=1).text(5000)
    assert text != quality.Grammar(lexicon, seed=2).text(5000)
    assert len(text) == 5000 and text.count("\n") > 10
    # Subject-verb agreement at a sentence's start: "The <noun>s <verb>" and
    # "The <noun> <verb>s" only (later, "the <noun>" may end a relative clause before the
    # subject's verb, which agrees with the subject: the long-range part of the grammar).
    words = text.replace(".", " ").replace('"', " ").replace(",", " ").split()
    verbs, nouns = set(lexicon.verbs), set(lexicon.nouns)
    checked = 0
    for i in range(len(words) - 2):
        if words[i] == "The" and words[i + 2] in verbs | {v + "s" for v in verbs}:
            noun, verb = words[i + 1], words[i + 2]
            if noun in nouns:  # singular subject (not an adjective before the noun)
                assert verb.endswith("s") and verb[:-1] in verbs, (noun, verb)
                checked += 1
            elif noun.endswith("s") and noun[:-1] in nouns:
                assert verb in verbs, (noun, verb)
                checked += 1
    assert checked > 10


def summary(final: list[float], heldout: list[float]) -> quality.Summary:
    return quality.Summary(final, heldout, [1.0] * len(final), [3.0, 2.0, statistics.fmean(final)])


def test_report_table_json_and_plot(tmp_path):
    tasks = quick_tasks()
    summaries = {
        task.name: {
            "fp32": summary([1.0, 3.0], [2.0, 2.0]),
            "bf16-params-rne": summary([2.2, 2.2], [2.0, 3.0]),
        }
        for task in tasks
    }
    for task in tasks:
        task.steps = 3  # the summaries' curves are 3 steps long
    table = quality.markdown_table(tasks, summaries).splitlines()
    assert len(table) == 2 + 2 * len(tasks)
    assert table[2] == "| digits | fp32 | 2.0000 ± 1.4142 |  | 2.0000 |  |"
    assert table[3] == "| digits | bf16-params-rne | 2.2000 ± 0.0000 | +10.00% | 2.5000 | +25.00% |"
    report = quality.json_report(tasks, summaries, seeds=[0, 1])
    json.dumps(report)  # serialisable
    rne = report["tasks"]["charlm"]["variants"]["bf16-params-rne"]
    assert rne["final_gap_pct"] == pytest.approx(10.0)
    assert rne["heldout_gap_pct"] == pytest.approx(25.0)
    assert "final_gap_pct" not in report["tasks"]["charlm"]["variants"]["fp32"]
    path = tmp_path / "quality.png"
    quality.plot(tasks, summaries, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smooth():
    assert quality.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_no_matplotlib_on_import():
    code = textwrap.dedent(
        f"""
        import sys
        import ferroptim
        print("matplotlib" in sys.modules)
        sys.path.insert(0, {str(EXAMPLES)!r})
        import quality
        print("matplotlib" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]
