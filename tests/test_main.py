"""``python -m ferroptim``: the environment report for bug reports."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ferroptim


def run_report(*python_args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FERROPTIM_")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, *python_args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        check=False,
    )


def fields(report: str) -> dict[str, str]:
    """``key: value`` lines (indented ones too), first occurrence of each key."""
    out: dict[str, str] = {}
    for line in report.splitlines():
        key, sep, value = line.strip().partition(": ")
        if sep:
            out.setdefault(key, value)
    return out


def test_report_shows_this_environment():
    proc = run_report(
        "-m",
        "ferroptim",
        FERROPTIM_NUM_THREADS="1",
        FERROPTIM_BACKEND="torch",
        OMP_NUM_THREADS="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    report = proc.stdout
    got = fields(report)
    assert got["ferroptim"] == ferroptim.__version__
    assert Path(got["package"]) == Path(ferroptim.__file__).parent
    assert got["extension"] == Path(ferroptim._core.__file__).name
    # The default level is the best the CPU supports (FERROPTIM_SIMD is unset).
    best = ferroptim.supported_simd_levels()[0]
    assert (
        got["SIMD level"]
        == f"{best} (this CPU supports: " + ", ".join(ferroptim.supported_simd_levels()) + ")"
    )
    assert got["threads"] == "1"
    assert got["backend"] == "torch"
    assert got["torch"].startswith(torch.__version__ + " ")
    assert "intra-op 1, inter-op " in report  # torch honours OMP_NUM_THREADS=1
    assert "ATen parallel backend" in report  # torch's parallel_info
    assert got["CUDA"].startswith("available" if torch.cuda.is_available() else "not available")
    assert got["python"].startswith(
        f"{platform.python_version()} ({platform.python_implementation()})"
    )
    assert "OMP_NUM_THREADS=1" in report
    assert "FERROPTIM_BACKEND=torch" in report
    assert "FERROPTIM_SIMD=[not set]" in report
    assert got["cpu"].endswith("usable") and "logical CPUs" in got["cpu"]


def test_report_says_how_ferroptim_was_installed():
    from ferroptim.__main__ import installation

    how = installation()
    source = Path(__file__).resolve().parent.parent / "python"
    imported_from_source = source in Path(ferroptim.__file__).resolve().parents
    if imported_from_source:
        assert how.startswith(("editable", "not installed")), how
    else:
        # A wheel (pip install ".", or maturin's): its tags, abi3 since pyo3's abi3 feature.
        assert how.startswith("wheel ") and "abi3" in how, how


def test_report_without_torch():
    """ferroptim.functional works without torch, and so does the report."""
    code = (
        "import sys, runpy; sys.modules['torch'] = None; "
        "runpy.run_module('ferroptim', run_name='__main__')"
    )
    proc = run_report("-c", code)
    assert proc.returncode == 0, proc.stderr
    got = fields(proc.stdout)
    assert got["torch"].startswith("not installed")
    assert got["ferroptim"] == ferroptim.__version__
