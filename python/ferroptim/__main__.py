"""``python -m ferroptim``: the environment report to paste into a bug report.

What decides ferroptim's speed and numbers on this machine: its version and how it was
installed, the SIMD level and thread count its kernels run with, the backend, torch's
version and thread settings (torch's OpenMP threads compete with ferroptim's pool), the
thread environment variables, CUDA, Python, the platform and the CPU model.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

#: Environment variables that change thread counts or ferroptim's choices.
ENV_VARS = (
    "FERROPTIM_NUM_THREADS",
    "FERROPTIM_SIMD",
    "FERROPTIM_BACKEND",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "KMP_AFFINITY",
    "OMP_PROC_BIND",
    "CUDA_VISIBLE_DEVICES",
)


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cpus() -> int | None:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def installation() -> str:
    """How ferroptim was installed: a wheel (with its tags), editable, or a source tree."""
    try:
        dist = importlib.metadata.distribution("ferroptim")
    except importlib.metadata.PackageNotFoundError:
        return "not installed (imported from a source tree)"
    direct_url = dist.read_text("direct_url.json")
    if direct_url:
        info = json.loads(direct_url)
        if info.get("dir_info", {}).get("editable"):
            return f"editable, from {info.get('url', '?')}"
    tags = [
        line.split(":", 1)[1].strip()
        for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    ]
    return f"wheel {', '.join(tags) or '(no tags recorded)'}"


def torch_lines() -> Iterator[str]:
    try:
        import torch
    except ImportError:
        yield "torch: not installed (ferroptim.functional only)"
        return
    yield f"torch: {torch.__version__} ({Path(torch.__file__).parent})"
    yield (
        f"  threads: intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}"
    )
    yield "  parallel_info:"
    for line in torch.__config__.parallel_info().splitlines():
        if line.strip():
            yield "    " + line.replace("\t", "  ").rstrip()
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        yield f"  CUDA: available, {len(names)} device(s): {'; '.join(names)}"
        yield f"  CUDA runtime: {torch.version.cuda}"
    else:
        built = torch.version.cuda or "none"
        yield f"  CUDA: not available (torch built with CUDA {built})"


def report() -> str:
    """The whole report, one fact per line."""
    import ferroptim
    from ferroptim import _core

    lines = [
        f"ferroptim: {ferroptim.__version__}",
        f"  package: {Path(ferroptim.__file__).parent}",
        f"  extension: {Path(_core.__file__).name}",
        f"  installed: {installation()}",
        f"  SIMD level: {ferroptim.simd_level()} "
        f"(this CPU supports: {', '.join(ferroptim.supported_simd_levels())})",
        f"  threads: {ferroptim.get_num_threads()}",
        f"  backend: {ferroptim.get_backend()}",
        *torch_lines(),
    ]
    try:
        lines.append(f"numpy: {importlib.metadata.version('numpy')}")
    except importlib.metadata.PackageNotFoundError:
        lines.append("numpy: not installed")
    lines += [
        f"python: {platform.python_version()} ({platform.python_implementation()}) "
        f"{sys.executable}",
        f"platform: {platform.platform()}",
        f"cpu: {cpu_model()}; {os.cpu_count()} logical CPUs, {usable_cpus()} usable",
        "environment:",
        *(f"  {name}={os.environ.get(name, '[not set]')}" for name in ENV_VARS),
    ]
    return "\n".join(lines)


def main() -> int:
    print("ferroptim environment (paste this into bug reports)")
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
