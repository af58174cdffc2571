"""Interleaved benchmark report: ferroptim vs torch.optim, printed as Markdown for the README.

    python benches/report.py                      # every suite: a few minutes on 2 cores
    python benches/report.py --suite adamw,clip   # some suites (names: harness.SUITES)
    python benches/report.py --quick              # a few rounds: checks that everything runs

For each suite and case every contender (ferroptim; torch fused, foreach, for-loop,
default; the bandwidth floor where measured) runs round-robin in one process after a
warm-up, and each reports its median. Contenders too slow for the time budget run in
every k-th round only. On a shared machine absolute times are noise: the ratios,
measured side by side, are the result. Progress goes to stderr, the report to stdout:
a common header, a summary across suites (for the README), then one section per suite.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass

import ferroptim
from harness import (
    CASES,
    FLOOR,
    OURS,
    SUITES,
    Case,
    Entry,
    OtherLoad,
    Samples,
    Suite,
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


@dataclass
class Settings:
    rounds: int
    scaling_rounds: int
    warmup: int
    #: Seconds per contender and case (times the suite's ``budget_share``).
    budget: float


FULL = Settings(rounds=30, scaling_rounds=15, warmup=3, budget=4.0)
QUICK = Settings(rounds=5, scaling_rounds=3, warmup=1, budget=1.0)


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


def floor_time(suite: Suite, res: CaseResult) -> float | None:
    """Seconds the suite's traffic takes at the floor's bandwidth, where it was measured."""
    if FLOOR not in res.main:
        return None
    return res.main[FLOOR].median * suite.bytes_per_element / suite.floor_bytes_per_element


def at_floor_note(res: CaseResult, floor_s: float) -> str:
    """The ratio to torch's best flavour a kernel at the floor would get."""
    best = best_torch(res)
    if best is None:
        return ""
    return f" A kernel at the floor would be {best[1].median / floor_s:.2f}× {best[0]}."


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
    """torch's fastest flavour in a case (lowest median)."""
    torch_names = [n for n in res.main if n.startswith("torch ")]
    if not torch_names:
        return None
    name = min(torch_names, key=lambda n: res.main[n].median)
    return name, res.main[name]


def summary(results: list[SuiteResult]) -> str:
    """Compact tables across suites: ratios to torch's best flavour and to its default,
    and the option costs of self-relative suites."""
    out = [
        "## Summary",
        "",
        "ferroptim's median; torch's median over it (how many times faster ferroptim is) "
        "for torch's fastest flavour in that case (named) and for torch's default; "
        "× floor = ferroptim's time over the time its traffic takes at the bandwidth of "
        "`stream_probe` (1.00× = at the machine's streaming limit); at floor = torch's best "
        "over that time: the ratio a kernel at the floor would get (where torch's for-loop "
        "runs small states partly from cache, the floor itself caps the ratio).",
        "",
    ]
    rows = []
    for sr in results:
        if sr.suite.self_relative:
            continue
        for res in sr.cases:
            ours = res.main[OURS]
            best = best_torch(res)
            default = res.main.get("torch default")
            floor = floor_time(sr.suite, res)
            at_floor = f"{best[1].median / floor:.2f}×" if floor and best else "–"
            rows.append(
                [
                    sr.suite.name,
                    res.case.name,
                    fmt_time(ours.median),
                    f"{ratio(best[1], ours)} ({short(best[0])})" if best else "–",
                    ratio(default, ours) if default else "–",
                    f"{ours.median / floor:.2f}×" if floor else "–",
                    at_floor,
                ]
            )
    if rows:
        head = ["suite", "case", "ferroptim", "vs torch's best", "vs torch default", "× floor"]
        head.append("at floor")
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


def report(suite: Suite, results: list[CaseResult], threads: int, settings: Settings) -> str:
    bpe = suite.bytes_per_element
    columns = suite.table_columns()
    out: list[str] = [f"## {suite.title}, float32", ""]
    out += [f"- {note}" for note in suite.notes]
    out.append("")

    head = ["case", "tensors", "elements", "ferroptim", "elements/s", "GB/s"]
    head += [c.label for c in columns]
    rows = []
    for res in results:
        ours = res.main[OURS]
        rows.append(
            [
                res.case.title,
                str(res.case.num_tensors),
                fmt_numel(res.case.numel),
                fmt_time(ours.median),
                fmt_count(res.case.numel / ours.median, "/s"),
                f"{res.case.numel * bpe / ours.median / 1e9:.1f}",
                *(c.format(res.main) for c in columns),
            ]
        )
    out += [markdown_table(head, rows, "lrrrrr" + "r" * len(columns)), ""]

    for res in results:
        floor_s = floor_time(suite, res)
        if floor_s is None:
            continue
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
            f"floor**.{at_floor_note(res, floor_s)}",
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument(
        "--suite",
        default="all",
        help=f"comma-separated subset of: {', '.join(SUITES)} (default: all)",
    )
    parser.add_argument(
        "--cases", default=None, help=f"comma-separated subset of: {', '.join(CASES)}"
    )
    parser.add_argument("--rounds", type=int, default=None, help="round-robin rounds per case")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = Settings(args.rounds, max(3, args.rounds // 2), settings.warmup, settings.budget)
    names = list(SUITES) if args.suite == "all" else args.suite.split(",")
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(unknown)}; known: {', '.join(SUITES)}")
    cases = args.cases.split(",") if args.cases else list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")

    threads = ferroptim.get_num_threads()
    set_threads(threads)
    other_load = OtherLoad()
    results: list[SuiteResult] = []
    for name in names:
        suite = SUITES[name]
        start = time.perf_counter()
        chosen = [CASES[c] for c in cases if c in suite.cases]
        results.append(SuiteResult(suite, [run_case(suite, c, threads, settings) for c in chosen]))
        log(f"[{name}] done in {time.perf_counter() - start:.0f} s")
    sections = [header(threads, settings, other_load.share()), summary(results)]
    sections += [report(r.suite, r.cases, threads, settings) for r in results if r.cases]
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
