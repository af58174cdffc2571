"""Interleaved benchmark report: ferroptim vs torch.optim, printed as Markdown for the README.

    python benches/report.py                      # every suite: a few minutes on 2 cores
    python benches/report.py --suite adamw,clip   # some suites (names: harness.SUITES)
    python benches/report.py --quick              # a few rounds: checks that everything runs
    python benches/report.py --suite loop         # the step inside a real training loop

For each suite and case every contender (ferroptim; torch fused, foreach, for-loop,
default; the bandwidth floor where measured) runs round-robin in one process after a
warm-up, and each reports its median. Contenders too slow for the time budget run in
every k-th round only. On a shared machine absolute times are noise: the ratios,
measured side by side, are the result. Progress goes to stderr, the report to stdout:
a common header, a summary across suites (for the README), then one section per suite.

The ``loop`` suite (``training_loop.py``) is different: the step of a real training loop
(forward, backward, ``opt.step()``) on a transformer encoder and an MLP, each contender
training its own copy of the model, interleaved; only the step after a real backward is
timed for the ratio.

Every ratio to torch comes with the ratio a kernel at the bandwidth floor would get (its
time = the suite's bytes per element at the streaming bandwidth ``stream_probe`` measured
in the same run): where that ratio is low, the floor, not ferroptim, caps ours.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass, replace

import ferroptim
import torch
from harness import (
    ADAMW_HYPER,
    CASES,
    FLOOR,
    OURS,
    SGD_HYPER,
    SUITES,
    Case,
    Entry,
    OtherLoad,
    Samples,
    Suite,
    adam_floor,
    describe_machine,
    fmt_count,
    fmt_numel,
    fmt_time,
    fresh_params,
    interleave,
    markdown_table,
    set_threads,
    torch_default_clip_impl,
    torch_default_impl,
)
from training_loop import (
    LOOP_MODELS,
    LOOP_OPTIMIZERS,
    QUICK_MODELS,
    LoopResult,
    run_loop,
)

#: The real-training-loop suite's name (not in ``harness.SUITES``: it has no cases).
LOOP = "loop"
#: Memory traffic per float32 element of ferroptim's step in the loop suite.
LOOP_BYTES = {"adamw": 28, "sgd": 20}


@dataclass
class Settings:
    rounds: int
    scaling_rounds: int
    warmup: int
    #: Seconds per contender and case (times the suite's ``budget_share``).
    budget: float
    #: Timed iterations per contender in the loop suite (after ``loop_warmup`` untimed).
    loop_rounds: int = 30
    loop_warmup: int = 2
    #: Elements of the stand-alone bandwidth probe (above any cache) and its repetitions.
    probe_elements: int = 32 * 2**20
    probe_reps: int = 9


FULL = Settings(rounds=30, scaling_rounds=15, warmup=3, budget=4.0)
QUICK = Settings(
    rounds=5,
    scaling_rounds=3,
    warmup=1,
    budget=1.0,
    loop_rounds=3,
    loop_warmup=1,
    probe_elements=8 * 2**20,
    probe_reps=3,
)


@dataclass
class CaseResult:
    case: Case
    #: contender -> its samples
    main: dict[str, Samples]
    #: contender -> {threads: samples}, for big cases of suites with thread scaling
    scaling: dict[str, dict[int, Samples]]


@dataclass
class SuiteResult:
    suite: Suite
    cases: list[CaseResult]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def short(contender: str) -> str:
    return contender.removeprefix("torch ")


def run_case(suite: Suite, case: Case, threads: int, settings: Settings) -> CaseResult:
    contenders = suite.contenders(case.name)
    budget = settings.budget * suite.budget_share
    tag = f"[{suite.name} {case.name}]"
    log(f"{tag} building {len(contenders)} contenders on {fmt_numel(case.numel)} elements")
    main = {
        name: Entry(factory(fresh_params(case.name)), threads)
        for name, factory in contenders.items()
    }
    log(f"{tag} interleaving: {', '.join(main)}")
    interleave(list(main.values()), rounds=settings.rounds, warmup=settings.warmup, budget=budget)

    scaling: dict[str, dict[int, Samples]] = {}
    flat: dict[tuple[str, int], Entry] = {}
    if suite.thread_scaling and case.big and threads > 1:
        # ferroptim and the strongest reference (listed first), alternating between
        # 1 thread and all of them (both libraries get the thread count under test).
        names = [OURS, next(iter(suite.references))]
        # Grouped by thread count: two switches per round.
        flat = {(n, t): Entry(main[n].runner, t) for t in (1, threads) for n in names}
        log(f"{tag} thread scaling: {', '.join(f'{n} x{t}' for n, t in flat)}")
        interleave(list(flat.values()), rounds=settings.scaling_rounds, warmup=1, budget=budget)
        set_threads(threads)
        scaling = {n: {t: flat[n, t].samples for t in (1, threads)} for n in names}
    result = CaseResult(case, {name: e.samples for name, e in main.items()}, scaling)
    del main, flat
    gc.collect()  # frees this case's tensors before the next case
    return result


def ratio(reference: Samples, ours: Samples) -> str:
    return f"{reference.median / ours.median:.2f}×"


def spread(samples: Samples) -> str:
    """Median with half the interquartile range (relative) and the number of samples."""
    half_iqr = 50 * samples.iqr / samples.median
    return f"{fmt_time(samples.median)} (±{half_iqr:.0f}%, n={len(samples)})"


def load_note(other: float | None) -> str:
    """How much of the machine other processes took during the run, with a warning."""
    if other is None:
        return "- **Other load:** not measured (no /proc/stat)."
    note = (
        f"- **Other load:** processes other than this one took {other:.0%} of the "
        "machine's CPU time during the run."
    )
    if other > 0.1:
        note += (
            " **Too busy for clean numbers: competing processes distort multi-threaded "
            "timings (torch's OpenMP most of all). Re-run on a quiet machine.**"
        )
    return note


def measure_bandwidth(settings: Settings) -> float:
    """Streaming bandwidth (bytes/s) of ``stream_probe`` on one tensor bigger than any cache:
    the median of ``probe_reps`` calls. Used by suites that do not measure their own floor."""
    n = settings.probe_elements
    params = [torch.zeros(n, requires_grad=True)]
    params[0].grad = torch.zeros(n)
    runner = adam_floor(params)
    times = []
    for _ in range(settings.probe_reps + 1):
        assert runner.prepare is not None
        runner.prepare()
        t0 = time.perf_counter()
        runner.step()
        times.append(time.perf_counter() - t0)
    del runner, params
    gc.collect()
    return n * 28 / Samples(times[1:]).median  # the first call faults the memory in


def _case_bandwidth(suite: Suite, res: CaseResult) -> float | None:
    """The floor's bytes/s measured in this case (interleaved with its contenders)."""
    if FLOOR not in res.main:
        return None
    return res.case.numel * suite.floor_bytes_per_element / res.main[FLOOR].median


def suite_bandwidth(sr: SuiteResult, run_bandwidth: float | None) -> float | None:
    """The floor's bytes/s for a suite's cases without a floor of their own: the floor
    measured on its largest case (the 32M one: the most purely streaming), else the
    run's stand-alone probe."""
    measured = [res for res in sr.cases if FLOOR in res.main]
    if not measured:
        return run_bandwidth
    largest = max(measured, key=lambda res: res.case.numel)
    return _case_bandwidth(sr.suite, largest)


def floor_time(suite: Suite, res: CaseResult, bandwidth: float | None) -> float | None:
    """Seconds the suite's traffic takes at the floor's bandwidth, for cases big enough that
    it means something (``Case.big``: their traffic does not sit in the caches): the
    case's own floor measurement where it has one, else ``bandwidth``."""
    if not res.case.big:
        return None
    bandwidth = _case_bandwidth(suite, res) or bandwidth
    if bandwidth is None:
        return None
    return res.case.numel * suite.bytes_per_element / bandwidth


def floor_ratio(reference: Samples, floor_s: float | None) -> str:
    """The ratio to ``reference`` a kernel running at the bandwidth floor would get."""
    return f"{reference.median / floor_s:.2f}×" if floor_s else "–"


def header(threads: int, settings: Settings, other_load: float | None) -> str:
    info = describe_machine()
    return "\n".join(
        [
            "# ferroptim vs torch: CPU benchmarks",
            "",
            f"- **Machine:** {info['cpu']}, {info['cores']} cores; "
            f"ferroptim {info['ferroptim']} (SIMD `{info['simd_level']}`, "
            f"{info['ferroptim_threads']} threads); torch {info['torch']} "
            f"({info['torch_threads']} threads).",
            f"- **Threads:** `torch.set_num_threads({threads})`, the same count ferroptim uses "
            "(`ferroptim.get_num_threads()`), so both sides get the same cores.",
            f"- **torch default** (no `foreach`/`fused` flag) on CPU tensors is the "
            f"{torch_default_impl()} implementation for torch.optim's optimizers and the "
            f"{torch_default_clip_impl()} one for `torch.nn.utils.clip_grad_norm_`.",
            f"- **Method:** contenders interleaved round-robin in one process, {settings.rounds} "
            "rounds after warm-up, the order rotated each round; median per contender (slow "
            "contenders run in fewer rounds, fast ones several times per round). Each step "
            "follows other contenders' work, as a training step follows backward: caches are "
            "not kept warm for it. Ratios = torch's median / ferroptim's median, from the same "
            "run: how many times faster ferroptim is. All tensors float32; every contender "
            "of a case steps the same gradients.",
            load_note(other_load),
        ]
    )


def best_torch(res: CaseResult) -> tuple[str, Samples] | None:
    """The reference's fastest flavour in a case (lowest median): torch's flavours, or
    the reference package of an optimizer torch lacks (``lion-pytorch``)."""
    torch_names = [n for n in res.main if n not in (OURS, FLOOR)]
    if not torch_names:
        return None
    name = min(torch_names, key=lambda n: res.main[n].median)
    return name, res.main[name]


def summary(
    results: list[SuiteResult], loops: list[LoopResult], run_bandwidth: float | None
) -> str:
    """Compact tables across suites: ratios to torch's best flavour and to its default,
    the ratio a kernel at the floor would get, and the option costs of self-relative suites."""
    out = [
        "## Summary",
        "",
        "ferroptim's median; torch's median over it (how many times faster ferroptim is) "
        "for torch's fastest flavour in that case (named) and for torch's default; "
        "**floor vs best** = the ratio to that same torch flavour a kernel running at the "
        "bandwidth floor would get (its time = the case's traffic at `stream_probe`'s "
        "bandwidth, measured in the same run): where it is low, the floor caps ferroptim's "
        "ratio; × floor = ferroptim's time over that floor time (1.00× = at the machine's "
        "streaming limit). Floor columns only for cases whose traffic does not fit in the "
        "caches; `loop` rows time the step inside a real training loop (see its section).",
        "",
    ]
    rows = []
    for sr in results:
        if sr.suite.self_relative:
            continue
        bandwidth = suite_bandwidth(sr, run_bandwidth)
        for res in sr.cases:
            ours = res.main[OURS]
            best = best_torch(res)
            default = res.main.get("torch default")
            floor = floor_time(sr.suite, res, bandwidth)
            rows.append(
                [
                    sr.suite.name,
                    res.case.name,
                    fmt_time(ours.median),
                    f"{ratio(best[1], ours)} ({short(best[0])})" if best else "–",
                    floor_ratio(best[1], floor) if best else "–",
                    ratio(default, ours) if default else "–",
                    f"{ours.median / floor:.2f}×" if floor else "–",
                ]
            )
    for lr in loops:
        ours = lr.trainers[OURS].step
        torch_steps = {n: t.step for n, t in lr.trainers.items() if n.startswith("torch ")}
        best_name = min(torch_steps, key=lambda n: torch_steps[n].median)
        floor = loop_floor(lr, run_bandwidth)
        rows.append(
            [
                f"{LOOP} {lr.family}",
                lr.model.name,
                fmt_time(ours.median),
                f"{ratio(torch_steps[best_name], ours)} ({short(best_name)})",
                floor_ratio(torch_steps[best_name], floor),
                ratio(torch_steps["torch default"], ours),
                f"{ours.median / floor:.2f}×" if floor else "–",
            ]
        )
    if rows:
        head = [
            "suite",
            "case",
            "ferroptim",
            "vs torch's best",
            "floor vs best",
            "vs torch default",
            "× floor",
        ]
        out += [markdown_table(head, rows, "llrrrrr"), ""]
    for sr in results:
        if not sr.suite.self_relative:
            continue
        columns = sr.suite.table_columns()
        rows = [
            [res.case.name, fmt_time(res.main[OURS].median), *(c.format(res.main) for c in columns)]
            for res in sr.cases
        ]
        out += [
            f"**{sr.suite.name}** (see its section for what each column is):",
            "",
            markdown_table(
                ["case", "ferroptim", *(c.label for c in columns)],
                rows,
                "lr" + "r" * len(columns),
            ),
            "",
        ]
    return "\n".join(out).rstrip("\n")


def report(sr: SuiteResult, threads: int, settings: Settings, run_bandwidth: float | None) -> str:
    suite, results = sr.suite, sr.cases
    bpe = suite.bytes_per_element
    bandwidth = suite_bandwidth(sr, run_bandwidth)
    columns = suite.table_columns()
    out: list[str] = [f"## {suite.title}, float32", ""]
    out += [f"- {note}" for note in suite.notes]
    if not suite.self_relative and bandwidth is not None:
        out.append(
            "- **floor vs best** = the ratio to torch's fastest flavour in that case that a "
            f"kernel at the bandwidth floor would get: {bpe} bytes/element at "
            f"{bandwidth / 1e9:.1f} GB/s (`stream_probe`, this run). Where it is close to "
            "ferroptim's own ratio, the floor caps it."
        )
    out.append("")

    head = ["case", "tensors", "elements", "ferroptim", "elements/s", "GB/s"]
    head += [c.label for c in columns]
    if not suite.self_relative:
        head.append("floor vs best")
    rows = []
    for res in results:
        ours = res.main[OURS]
        row = [
            res.case.title,
            str(res.case.num_tensors),
            fmt_numel(res.case.numel),
            fmt_time(ours.median),
            fmt_count(res.case.numel / ours.median, "/s"),
            f"{res.case.numel * bpe / ours.median / 1e9:.1f}",
            *(c.format(res.main) for c in columns),
        ]
        if not suite.self_relative:
            best = best_torch(res)
            row.append(floor_ratio(best[1], floor_time(suite, res, bandwidth)) if best else "–")
        rows.append(row)
    out += [markdown_table(head, rows, "lrrrrr" + "r" * (len(head) - 6)), ""]

    for res in results:
        if FLOOR not in res.main:
            continue
        floor_s = floor_time(suite, res, bandwidth)
        assert floor_s is not None
        floor, ours = res.main[FLOOR], res.main[OURS]
        probe_gbs = res.case.numel * suite.floor_bytes_per_element / floor.median / 1e9
        ours_gbs = res.case.numel * bpe / ours.median / 1e9
        if bpe == suite.floor_bytes_per_element:
            what = f"floor {fmt_time(floor.median)} ({probe_gbs:.1f} GB/s)"
        else:
            what = (
                f"floor {fmt_time(floor.median)} for its {suite.floor_bytes_per_element} "
                f"bytes/element ({probe_gbs:.1f} GB/s), so {fmt_time(floor_s)} for this "
                f"suite's {bpe} at that bandwidth"
            )
        out += [
            f"**Bandwidth floor** ({res.case.title}, {bpe} bytes/element, "
            f"`stream_probe` on ferroptim's engine): {what}; ferroptim "
            f"{fmt_time(ours.median)} ({ours_gbs:.1f} GB/s) = **{ours.median / floor_s:.2f}× "
            "floor**.",
            "",
        ]

    scaled = [r for r in results if r.scaling]
    if scaled:
        names = list(scaled[0].scaling)
        head = ["case"]
        for n in names:
            head += [f"{n}, 1 thread", f"{n}, {threads} threads", "speed-up"]
        rows = []
        for res in scaled:
            row = [res.case.title]
            for n in names:
                one, many = res.scaling[n][1], res.scaling[n][threads]
                row += [fmt_time(one.median), fmt_time(many.median), ratio(one, many)]
            rows.append(row)
        out += [
            f"### {suite.name}: threads 1 vs {threads}",
            "",
            "Both libraries on 1 thread, then both on all of them, interleaved "
            f"({settings.scaling_rounds} rounds).",
            "",
            markdown_table(head, rows, "l" + "r" * (len(head) - 1)),
            "",
        ]

    names = [OURS, *suite.references]
    if any(FLOOR in r.main for r in results):
        names.append(FLOOR)
    rows = [
        [r.case.name, *(spread(r.main[n]) if n in r.main else "–" for n in names)] for r in results
    ]
    out += [
        f"### {suite.name}: median time per contender",
        "",
        "± is half the interquartile range relative to the median; n is the number of samples.",
        "",
        markdown_table(["case", *names], rows, "l" + "r" * len(names)),
    ]
    return "\n".join(out)


def loop_floor(lr: LoopResult, bandwidth: float | None) -> float | None:
    """Seconds a loop's step takes at the floor, for models whose state does not sit in the
    caches (at least 1M elements, as ``Case.big``)."""
    if bandwidth is None or lr.numel < 2**20:
        return None
    return lr.numel * LOOP_BYTES[lr.family] / bandwidth


def run_loops(settings: Settings, quick: bool) -> list[LoopResult]:
    """The loop suite: every model with every optimizer family, contenders interleaved."""
    models = QUICK_MODELS if quick else LOOP_MODELS
    results = []
    for model_name, build in models.items():
        spec = build()
        for family, contenders in LOOP_OPTIMIZERS.items():
            start = time.perf_counter()
            log(f"[{LOOP} {model_name} {family}] interleaving: {', '.join(contenders)}")
            results.append(
                run_loop(
                    spec,
                    family,
                    contenders,
                    rounds=settings.loop_rounds,
                    warmup=settings.loop_warmup,
                )
            )
            log(f"[{LOOP} {model_name} {family}] done in {time.perf_counter() - start:.0f} s")
            gc.collect()  # frees this run's models before the next
    return results


def loop_report(loops: list[LoopResult], settings: Settings, run_bandwidth: float | None) -> str:
    out = [
        "## The step inside a real training loop, float32",
        "",
        "- **Method:** every contender trains its own copy of the same model (same initial "
        "weights, same fixed batch, no dropout) with its own optimizer; each round, in an "
        "order rotated every round, each runs one iteration: `zero_grad()`, forward, "
        "cross-entropy loss, `backward()`, then `opt.step()`. "
        f"{settings.loop_warmup} untimed iterations each, then {settings.loop_rounds} "
        "timed. **step** = the median of `opt.step()` alone (`time.perf_counter()` "
        "around it), right after a real backward: torch's OpenMP workers are still "
        "spinning from backward's kernels and ferroptim's pool has slept through forward "
        "and backward. **iteration** = the median of the whole iteration. Ratios = "
        "torch's step median over ferroptim's (same run).",
        f"- **Optimizers:** AdamW {_hyper('adamw')}; SGD {_hyper('sgd')}. **torch default** "
        f"= no flag ({torch_default_impl()} on CPU).",
    ]
    if run_bandwidth is not None:
        out.append(
            "- **floor vs fused** = the ratio to torch's fused step a kernel at the bandwidth "
            "floor would get (28 bytes/element for AdamW, 20 for SGD with momentum, at "
            f"{run_bandwidth / 1e9:.1f} GB/s: `stream_probe` in this run)."
        )
    out.append("")
    names = list(loops[0].trainers) if loops else []
    refs = [n for n in names if n != OURS]
    head = ["model", "optimizer", "tensors", "elements", "ferroptim step"]
    head += [f"vs {short(n)}" for n in refs]
    head += ["floor vs fused", "ferroptim iteration", "fused iteration"]
    rows = []
    for lr in loops:
        ours = lr.trainers[OURS]
        fused = lr.trainers["torch fused"]
        floor = loop_floor(lr, run_bandwidth)
        rows.append(
            [
                lr.model.name,
                lr.family,
                str(lr.num_tensors),
                fmt_count(lr.numel),
                fmt_time(ours.step.median),
                *(ratio(lr.trainers[n].step, ours.step) for n in refs),
                floor_ratio(fused.step, floor),
                fmt_time(ours.iteration.median),
                fmt_time(fused.iteration.median),
            ]
        )
    out += [markdown_table(head, rows, "llrrr" + "r" * (len(head) - 5)), ""]
    out += [f"- **{lr.model.name}:** {lr.model.title}." for lr in loops[:: len(LOOP_OPTIMIZERS)]]
    rows = [
        [
            lr.model.name,
            lr.family,
            *(
                f"{spread(lr.trainers[n].step)} / {fmt_time(lr.trainers[n].iteration.median)}"
                for n in names
            ),
        ]
        for lr in loops
    ]
    out += [
        "",
        f"### {LOOP}: median step / median iteration per contender",
        "",
        "± is half the interquartile range of the step relative to its median; n is the "
        "number of timed iterations.",
        "",
        markdown_table(["model", "optimizer", *names], rows, "ll" + "r" * len(names)),
    ]
    return "\n".join(out)


def _hyper(family: str) -> str:
    hyper = ADAMW_HYPER if family == "adamw" else SGD_HYPER
    return "(" + ", ".join(f"{k} {v}" for k, v in hyper.items()) + ")"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument(
        "--suite",
        default="all",
        help=f"comma-separated subset of: {', '.join(SUITES)}, {LOOP} (default: all)",
    )
    parser.add_argument(
        "--cases", default=None, help=f"comma-separated subset of: {', '.join(CASES)}"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="round-robin rounds per case (and timed iterations per loop contender)",
    )
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = replace(
            settings,
            rounds=args.rounds,
            scaling_rounds=max(3, args.rounds // 2),
            loop_rounds=args.rounds,
        )
    names = [*SUITES, LOOP] if args.suite == "all" else args.suite.split(",")
    unknown = [s for s in names if s not in SUITES and s != LOOP]
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(unknown)}; known: {', '.join(SUITES)}, {LOOP}")
    cases = args.cases.split(",") if args.cases else list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")

    threads = ferroptim.get_num_threads()
    set_threads(threads)
    other_load = OtherLoad()
    results: list[SuiteResult] = []
    loops: list[LoopResult] = []
    for name in names:
        if name == LOOP:
            loops = run_loops(settings, args.quick)
            continue
        suite = SUITES[name]
        start = time.perf_counter()
        chosen = [CASES[c] for c in cases if c in suite.cases]
        results.append(SuiteResult(suite, [run_case(suite, c, threads, settings) for c in chosen]))
        log(f"[{name}] done in {time.perf_counter() - start:.0f} s")
    # The stand-alone bandwidth probe, for the floor columns of suites without their own.
    run_bandwidth = None
    if loops or any(suite_bandwidth(r, None) is None for r in results if r.cases):
        log("[floor] measuring the streaming bandwidth (stream_probe)")
        run_bandwidth = measure_bandwidth(settings)
    sections = [
        header(threads, settings, other_load.share()),
        summary(results, loops, run_bandwidth),
    ]
    sections += [report(r, threads, settings, run_bandwidth) for r in results if r.cases]
    if loops:
        sections.append(loop_report(loops, settings, run_bandwidth))
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
