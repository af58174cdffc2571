"""Interleaved benchmark report: ferroptim vs torch.optim, printed as Markdown for the README.

    python benches/report.py            # ~1 minute on 2 cores
    python benches/report.py --quick    # a few rounds: checks that everything runs

For each case every contender (ferroptim; torch fused, foreach, for-loop, default; the
bandwidth floor where measured) runs round-robin in one process after a warm-up, and
each reports its median. Contenders too slow for the time budget run in every k-th
round only. On a shared machine absolute times are noise: the ratios, measured side
by side, are the result. Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass

import ferroptim
from harness import (
    CASES,
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
    torch_default_impl,
)

OURS = "ferroptim"
FLOOR = "floor"


@dataclass
class Settings:
    rounds: int
    scaling_rounds: int
    warmup: int
    budget: float


FULL = Settings(rounds=30, scaling_rounds=15, warmup=3, budget=4.0)
QUICK = Settings(rounds=5, scaling_rounds=3, warmup=1, budget=1.0)


@dataclass
class CaseResult:
    case: Case
    #: contender -> its samples
    main: dict[str, Samples]
    #: contender -> {threads: samples}, for big cases
    scaling: dict[str, dict[int, Samples]]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def short(contender: str) -> str:
    return contender.removeprefix("torch ")


def run_case(suite: Suite, case: Case, threads: int, settings: Settings) -> CaseResult:
    contenders = suite.contenders(case.name)
    log(f"[{case.name}] building {len(contenders)} contenders on {fmt_numel(case.numel)} elements")
    main = {
        name: Entry(factory(fresh_params(case.name)), threads)
        for name, factory in contenders.items()
    }
    log(f"[{case.name}] interleaving: {', '.join(main)}")
    interleave(
        list(main.values()), rounds=settings.rounds, warmup=settings.warmup, budget=settings.budget
    )

    scaling: dict[str, dict[int, Samples]] = {}
    flat: dict[tuple[str, int], Entry] = {}
    if case.big and threads > 1:
        # ferroptim and the strongest reference (listed first), alternating between
        # 1 thread and all of them (both libraries get the thread count under test).
        names = [OURS, next(iter(suite.references))]
        # Grouped by thread count: two switches per round.
        flat = {(n, t): Entry(main[n].runner, t) for t in (1, threads) for n in names}
        log(f"[{case.name}] thread scaling: {', '.join(f'{n} x{t}' for n, t in flat)}")
        interleave(
            list(flat.values()), rounds=settings.scaling_rounds, warmup=1, budget=settings.budget
        )
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


def report(
    suite: Suite,
    results: list[CaseResult],
    threads: int,
    settings: Settings,
    other_load: float | None,
) -> str:
    info = describe_machine()
    refs = list(suite.references)
    bpe = suite.bytes_per_element
    out: list[str] = [
        f"## {suite.title}: one `step()`, float32",
        "",
        f"- **Machine:** {info['cpu']}, {info['cores']} cores; "
        f"ferroptim {info['ferroptim']} (SIMD `{info['simd_level']}`, "
        f"{info['ferroptim_threads']} threads); torch {info['torch']} "
        f"({info['torch_threads']} threads).",
        f"- **Threads:** `torch.set_num_threads({threads})`, the same count ferroptim uses "
        "(`ferroptim.get_num_threads()`), so both sides get the same cores.",
        f"- **torch default** (no `foreach`/`fused` flag) on CPU tensors is the "
        f"{torch_default_impl()} implementation.",
        f"- **Method:** contenders interleaved round-robin in one process, {settings.rounds} "
        "rounds after warm-up, the order rotated each round; median per contender (slow "
        "contenders run in fewer rounds, fast ones several times per round). Each step "
        "follows other contenders' work, as a training step follows backward: caches are "
        "not kept warm for it. Ratios = torch's median / ferroptim's median, from the same "
        "run: how many times faster ferroptim is.",
        load_note(other_load),
        "",
    ]

    header = ["case", "tensors", "elements", "ferroptim", "elements/s", "GB/s"]
    header += [f"vs {short(r)}" for r in refs]
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
                *(ratio(res.main[r], ours) for r in refs),
            ]
        )
    out += [markdown_table(header, rows, "lrrrrr" + "r" * len(refs)), ""]

    for res in results:
        if FLOOR in res.main:
            floor, ours = res.main[FLOOR], res.main[OURS]
            gbs = res.case.numel * bpe / 1e9
            out.append(
                f"**Bandwidth floor** ({res.case.title}, {bpe} bytes/element, "
                f"`stream_probe` on ferroptim's engine): floor {fmt_time(floor.median)} "
                f"({gbs / floor.median:.1f} GB/s), ferroptim {fmt_time(ours.median)} "
                f"({gbs / ours.median:.1f} GB/s) = **{ours.median / floor.median:.2f}× floor**."
            )
            out.append("")

    scaled = [r for r in results if r.scaling]
    if scaled:
        names = list(scaled[0].scaling)
        header = ["case"]
        for n in names:
            header += [f"{n}, 1 thread", f"{n}, {threads} threads", "speed-up"]
        rows = []
        for res in scaled:
            row = [res.case.title]
            for n in names:
                one, many = res.scaling[n][1], res.scaling[n][threads]
                row += [fmt_time(one.median), fmt_time(many.median), ratio(one, many)]
            rows.append(row)
        out += [
            f"### Threads: 1 vs {threads}",
            "",
            "Both libraries on 1 thread, then both on all of them, interleaved "
            f"({settings.scaling_rounds} rounds).",
            "",
            markdown_table(header, rows, "l" + "r" * (len(header) - 1)),
            "",
        ]

    names = [OURS, *refs] + ([FLOOR] if any(FLOOR in r.main for r in results) else [])
    rows = [
        [r.case.name, *(spread(r.main[n]) if n in r.main else "–" for n in names)] for r in results
    ]
    out += [
        "### Median step time per contender",
        "",
        "± is half the interquartile range relative to the median; n is the number of samples.",
        "",
        markdown_table(["case", *names], rows, "l" + "r" * len(names)),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument("--suite", default="adamw", choices=sorted(SUITES))
    parser.add_argument(
        "--cases", default=None, help=f"comma-separated subset of: {', '.join(CASES)}"
    )
    parser.add_argument("--rounds", type=int, default=None, help="round-robin rounds per case")
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = Settings(args.rounds, max(3, args.rounds // 2), settings.warmup, settings.budget)
    suite = SUITES[args.suite]
    cases = args.cases.split(",") if args.cases else list(suite.cases)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")

    threads = ferroptim.get_num_threads()
    set_threads(threads)
    other_load = OtherLoad()
    results = [run_case(suite, CASES[c], threads, settings) for c in cases]
    print(report(suite, results, threads, settings, other_load.share()))


if __name__ == "__main__":
    main()
