"""ferroptim in real process groups: DDP, ZeroRedundancyOptimizer, FSDP2 (DTensor
params), torch.distributed.checkpoint and plain ``torch.save`` checkpoints.

Every run spawns two fresh interpreters that join a gloo group on 127.0.0.1 (see
``_dist.py``). Spawning costs seconds, so each area runs all its scenarios in one
spawn (a module-scoped fixture); every scenario is wrapped on both ranks, so an
exception in one is reported by its test without taking the others down. The
single-process references are computed here, in the parent.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import run_workers
from _kernels import kernel_calls
from conftest import ferroptim, runs_in_rust, train_cases

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

F32 = {"rtol": 1e-5, "atol": 1e-6}
F64 = {"rtol": 1e-12, "atol": 1e-12}
#: Distributed vs single-process (gradients summed in another order), float64.
CROSS64 = {"rtol": 1e-9, "atol": 1e-11}
#: Distributed vs single-process, float32.
CROSS32 = {"rtol": 1e-4, "atol": 1e-5}

WORLD = 2
IN, HIDDEN, OUT = 6, 10, 5  # HIDDEN=10 rows split 5/5, OUT=5 rows split 3/2 (uneven)
BATCH = 16  # full batch; each rank gets BATCH // WORLD rows

# ----------------------------------------------------------------------------------------
# Families, models, data (shared by the workers and the parent's references)
# ----------------------------------------------------------------------------------------

#: (class name, kwargs): every optimizer of the registry, state buffers in play (the
#: spawned workers make the registry's class: :func:`make_opt`).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    name: (family.ferro.__name__, {**family.fixed, **kwargs})
    for name, (family, kwargs) in train_cases().items()
}


def assert_stepped_in_rust(calls: int, steps: int, family: str) -> None:
    """The steps ran in Rust (at least one kernel call per step); none did where the family
    steps through torch's implementation."""
    if runs_in_rust(family):
        assert calls >= steps, "the steps did not run in Rust"
    else:
        assert calls == 0


NAMES = tuple(FAMILIES)
#: The families torch's own optimizer steps under FSDP2 (DTensor params).
FSDP_NAMES = tuple(name for name, (family, _) in train_cases().items() if family.fsdp2)


def make_opt(
    family: str, params: Any, *, torch_ref: bool = False, **extra: Any
) -> torch.optim.Optimizer:
    """The family's ferroptim optimizer, or (``torch_ref``) its for-loop reference."""
    _, kwargs = FAMILIES[family]
    if torch_ref:
        # (torch.optim's class, or the reference of an optimizer torch lacks: the registry's)
        reference = train_cases()[family][0].torch
        return reference(params, **kwargs, foreach=False, **extra)
    # (the registry's class: ferroptim's, or a test subclass of it)
    return train_cases()[family][0].ferro(params, **kwargs, **extra)


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """A small MLP initialised from ``seed`` alone (not the global RNG)."""
    model = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)
    ).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    return model


def batch(step: int, dtype: torch.dtype, rank: int | None = None) -> tuple[torch.Tensor, ...]:
    """Step ``step``'s full batch, or rank ``rank``'s half of it."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, IN, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(BATCH, OUT, generator=gen, dtype=torch.float64).to(dtype)
    if rank is None:
        return x, y
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return x[rows], y[rows]


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a detached copy), else a detached copy."""
    t = t.detach()
    return (t.to_local() if hasattr(t, "to_local") else t).clone()


def full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def plain_state(opt: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """``state_dict()["state"]`` with tensors as plain (local) copies."""
    return {
        i: {k: local(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for i, s in opt.state_dict()["state"].items()
    }


def single_process_run(
    family: str, steps: int, dtype: torch.dtype, *, torch_ref: bool = False, seed: int = 0
) -> tuple[list[list[torch.Tensor]], torch.optim.Optimizer, torch.nn.Module]:
    """The unsharded, one-process reference: full batches, per-step params."""
    model = make_mlp(seed, dtype)
    opt = make_opt(family, model.parameters(), torch_ref=torch_ref)
    trajectory = []
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, *batch(step, dtype)).backward()
        opt.step()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory, opt, model


# ----------------------------------------------------------------------------------------
# Worker plumbing: every scenario runs on both ranks, its exception is recorded
# ----------------------------------------------------------------------------------------


def _run_scenarios(scenarios: list[tuple[str, Callable[[], Any]]]) -> dict[str, Any]:
    import torch.distributed as dist

    results: dict[str, Any] = {}
    for name, fn in scenarios:
        try:
            results[name] = ("ok", fn())
        except Exception:
            results[name] = ("error", traceback.format_exc())
        dist.barrier()
    return results


def _scenario(results: list[dict[str, Any]], name: str) -> list[Any]:
    """Both ranks' results of scenario ``name``; fails with the workers' traceback."""
    outs = []
    for rank, res in enumerate(results):
        status, value = res[name]
        if status != "ok":
            pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{value}", pytrace=False)
        outs.append(value)
    return outs


def assert_close_lists(a: list[torch.Tensor], b: list[torch.Tensor], what: str, **tol_: Any):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if tol_:
            torch.testing.assert_close(x, y, **tol_, msg=lambda m, i=i: f"{what} [{i}]: {m}")
        else:
            assert torch.equal(x, y), f"{what} [{i}]: not bitwise equal"


def assert_close_states(a: dict, b: dict, what: str, **tol_: Any) -> None:
    assert set(a) == set(b), f"{what}: params with state {sorted(a)} != {sorted(b)}"
    for i in a:
        assert set(a[i]) == set(b[i]), f"{what}: state keys of param {i}"
        for key, va in a[i].items():
            vb = b[i][key]
            if key == "step":
                assert float(va) == float(vb), f"{what}: step of param {i}"
            elif tol_:
                torch.testing.assert_close(
                    va, vb, **tol_, msg=lambda m, i=i, k=key: f"{what} {i} {k}: {m}"
                )
            else:
                assert torch.equal(va, vb), f"{what}: state {key!r} of param {i} not bitwise"


# ----------------------------------------------------------------------------------------
# DDP
# ----------------------------------------------------------------------------------------

DDP_STEPS = 8


def _ddp_parity(rank: int, family: str, bucket_view: bool) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype = torch.float64
    model = DDP(make_mlp(0, dtype), gradient_as_bucket_view=bucket_view)
    opt = make_opt(family, model.parameters())
    trajectory = []
    with kernel_calls() as calls:
        for step in range(DDP_STEPS):
            opt.zero_grad()
            loss_of(model, *batch(step, dtype, rank)).backward()
            opt.step()
            trajectory.append([local(p) for p in model.parameters()])
    return {"trajectory": trajectory, "state": plain_state(opt), "kernel_calls": calls.total()}


def _ddp_resume(rank: int, outdir: Path, family: str) -> dict[str, Any]:
    """N steps, ``torch.save`` checkpoint (rank 0), M steps; then a fresh model and
    optimizer load the checkpoint and take the same M steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype = torch.float32
    path = outdir / f"ddp_{family}.pt"
    model = DDP(make_mlp(0, dtype))
    opt = make_opt(family, model.parameters())

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            loss_of(model, *batch(step, dtype, rank)).backward()
            opt.step()

    train(model, opt, range(4))
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()
    train(model, opt, range(4, 8))
    uninterrupted = ([local(p) for p in model.parameters()], plain_state(opt))

    resumed_model = make_mlp(7, dtype)  # another init: the checkpoint must overwrite it
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    resumed_model.load_state_dict(ckpt["model"])
    resumed_model = DDP(resumed_model)
    resumed_opt = make_opt(family, resumed_model.parameters())
    resumed_opt.load_state_dict(ckpt["optim"])
    train(resumed_model, resumed_opt, range(4, 8))
    resumed = ([local(p) for p in resumed_model.parameters()], plain_state(resumed_opt))
    return {"uninterrupted": uninterrupted, "resumed": resumed}


#: 8-bit states for the MLP's small tensors too (bitsandbytes' default leaves them float32).
EIGHT_BIT = {"lr": 1e-2, "state_dtype": "8bit"}


def _eight_bit_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    return [{"params": list(model.parameters()), "min_8bit_size": 0}]


def compact_state(opt: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {
        i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for i, s in opt.state_dict(compact=True)["state"].items()
    }


def _ddp_8bit(rank: int) -> dict[str, Any]:
    """DDP with 8-bit states: every rank steps the same all-reduced gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_mlp(0, torch.float32))
    opt = ferroptim.AdamW(_eight_bit_groups(model), **EIGHT_BIT)
    for step in range(DDP_STEPS):
        opt.zero_grad()
        loss_of(model, *batch(step, torch.float32, rank)).backward()
        opt.step()
    return {"params": [local(p) for p in model.parameters()], "state": compact_state(opt)}


def worker_ddp(rank: int, world_size: int, outdir: Path) -> dict[str, Any]:
    scenarios: list[tuple[str, Callable[[], Any]]] = [("8bit", lambda: _ddp_8bit(rank))]
    for family in NAMES:
        for bucket_view in (False, True):
            scenarios.append(
                (
                    f"parity-{family}-{bucket_view}",
                    lambda f=family, b=bucket_view: _ddp_parity(rank, f, b),
                )
            )
        scenarios.append((f"resume-{family}", lambda f=family: _ddp_resume(rank, outdir, f)))
    return _run_scenarios(scenarios)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_workers(worker_ddp, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("bucket_view", [False, True], ids=["grad-copies", "bucket-views"])
@pytest.mark.parametrize("family", NAMES)
def test_ddp_matches_single_process(ddp_results, family, bucket_view):
    r0, r1 = _scenario(ddp_results, f"parity-{family}-{bucket_view}")
    assert_stepped_in_rust(r0["kernel_calls"], DDP_STEPS, family)
    # Both ranks saw the same all-reduced gradients: bitwise the same model and state.
    for step, (a, b) in enumerate(zip(r0["trajectory"], r1["trajectory"], strict=True)):
        assert_close_lists(a, b, f"step {step}: rank 0 vs rank 1")
    assert_close_states(r0["state"], r1["state"], "rank 0 vs rank 1")
    # ... and what one process gets on the full batch, with ferroptim and with torch.optim.
    for torch_ref in (False, True):
        ref, ref_opt, _ = single_process_run(family, DDP_STEPS, torch.float64, torch_ref=torch_ref)
        name = "torch.optim" if torch_ref else "single-process ferroptim"
        for step, (a, b) in enumerate(zip(r0["trajectory"], ref, strict=True)):
            assert_close_lists(a, b, f"step {step}: DDP vs {name}", **CROSS64)
        assert_close_states(r0["state"], plain_state(ref_opt), f"DDP vs {name}", **CROSS64)


def _eight_bit_single_process(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_mlp(0, torch.float32)
    opt = ferroptim.AdamW(_eight_bit_groups(model), **EIGHT_BIT)
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, *batch(step, torch.float32)).backward()
        opt.step()
    return model, opt


#: DDP's gradients are averaged in another order than one process's: a state value on a
#: midpoint may take the neighbouring code, which moves an update by a code's gap.
EIGHT_BIT_CROSS = {"rtol": 0.0, "atol": 2e-3}


def test_ddp_with_8bit_states(ddp_results):
    r0, r1 = _scenario(ddp_results, "8bit")
    assert_close_lists(r0["params"], r1["params"], "rank 0 vs rank 1")
    assert_close_states(r0["state"], r1["state"], "rank 0 vs rank 1 (packed)")
    assert all(s["exp_avg"].dtype == torch.uint8 for s in r0["state"].values())
    model, _ = _eight_bit_single_process(DDP_STEPS)
    want = [p.detach() for p in model.parameters()]
    assert_close_lists(r0["params"], want, "DDP vs one process", **EIGHT_BIT_CROSS)


@pytest.mark.parametrize("family", NAMES)
def test_ddp_torch_save_checkpoint_resumes(ddp_results, family):
    for rank, out in enumerate(_scenario(ddp_results, f"resume-{family}")):
        params_a, state_a = out["uninterrupted"]
        params_b, state_b = out["resumed"]
        assert_close_lists(params_b, params_a, f"rank {rank}: resumed vs uninterrupted params")
        assert_close_states(state_b, state_a, f"rank {rank}: resumed vs uninterrupted state")


# ----------------------------------------------------------------------------------------
# ZeroRedundancyOptimizer
# ----------------------------------------------------------------------------------------

ZERO_STEPS = 6
ZERO_FAMILIES = ("AdamW", "SGD", "NAdam")


def _zero(rank: int, family: str) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype = torch.float64
    model = DDP(make_mlp(0, dtype))
    _, kwargs = FAMILIES[family]
    opt = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=train_cases()[family][0].ferro, **kwargs
    )
    local_type = type(opt.optim).__name__
    local_params = sum(len(g["params"]) for g in opt.optim.param_groups)
    trajectory = []
    for step in range(ZERO_STEPS):
        opt.zero_grad()
        loss_of(model, *batch(step, dtype, rank)).backward()
        opt.step()
        trajectory.append([local(p) for p in model.parameters()])
    opt.consolidate_state_dict(to=0)
    state_dict = opt.state_dict() if rank == 0 else None
    return {
        "trajectory": trajectory,
        "state_dict": state_dict,
        "local_type": local_type,
        "local_params": local_params,
    }


def _zero_skip(rank: int) -> dict[str, Any]:
    """ZeRO with ``skip_nonfinite``: one parameter's gradient non-finite (the same on both
    ranks, as after DDP's all-reduce). The unsharded optimizer skips the whole step; each
    rank's optimizer sees only its shard, so the ranks agree through ``nonfinite_group``."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype = torch.float32
    model = DDP(make_mlp(0, dtype))
    params = list(model.parameters())
    opt = ZeroRedundancyOptimizer(
        params,
        optimizer_class=ferroptim.AdamW,
        lr=1e-2,
        skip_nonfinite=True,
        nonfinite_group=dist.group.WORLD,
    )
    owned = [i for i, p in enumerate(params) if opt._param_to_rank[p] == rank]
    for step in range(2):
        opt.zero_grad()
        loss_of(model, *batch(step, dtype, rank)).backward()
        opt.step()
    opt.zero_grad()
    loss_of(model, *batch(2, dtype, rank)).backward()
    with torch.no_grad():
        params[0].grad.view(-1)[0] = float("nan")
    before = [local(p) for p in params]
    opt.step()
    return {
        "owned": owned,
        "changed": [not torch.equal(a, local(p)) for a, p in zip(before, params, strict=True)],
        "skipped_steps": opt.optim.skipped_steps,
    }


def _zero_8bit(rank: int) -> dict[str, Any]:
    """ZeRO with 8-bit states: each rank quantizes the states of its own params."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_mlp(0, torch.float32))
    opt = ZeroRedundancyOptimizer(
        _eight_bit_groups(model), optimizer_class=ferroptim.AdamW, **EIGHT_BIT
    )
    for step in range(ZERO_STEPS):
        opt.zero_grad()
        loss_of(model, *batch(step, torch.float32, rank)).backward()
        opt.step()
    dtypes = {k: v.dtype for s in opt.optim.state.values() for k, v in s.items() if k != "step"}
    opt.consolidate_state_dict(to=0)
    return {
        "params": [local(p) for p in model.parameters()],
        "state_dtypes": dtypes,
        "state_dict": opt.state_dict() if rank == 0 else None,
    }


def worker_zero(rank: int, world_size: int, outdir: Path) -> dict[str, Any]:
    scenarios = [(f, lambda f=f: _zero(rank, f)) for f in ZERO_FAMILIES]
    scenarios.append(("8bit", lambda: _zero_8bit(rank)))
    scenarios.append(("skip", lambda: _zero_skip(rank)))
    return _run_scenarios(scenarios)


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_workers(worker_zero, tmp_path_factory.mktemp("zero"))


@pytest.mark.parametrize("family", ZERO_FAMILIES)
def test_zero_redundancy_optimizer_matches_unsharded(zero_results, family):
    r0, r1 = _scenario(zero_results, family)
    cls_name = FAMILIES[family][0]
    assert r0["local_type"] == r1["local_type"] == cls_name
    n_params = len(list(make_mlp().parameters()))
    # The parameters really are partitioned between the ranks.
    assert r0["local_params"] + r1["local_params"] == n_params
    assert r0["local_params"] > 0 and r1["local_params"] > 0
    for step, (a, b) in enumerate(zip(r0["trajectory"], r1["trajectory"], strict=True)):
        assert_close_lists(a, b, f"step {step}: rank 0 vs rank 1")
    for torch_ref in (False, True):
        ref, ref_opt, _ = single_process_run(family, ZERO_STEPS, torch.float64, torch_ref=torch_ref)
        name = "torch.optim" if torch_ref else "unsharded ferroptim"
        for step, (a, b) in enumerate(zip(r0["trajectory"], ref, strict=True)):
            assert_close_lists(a, b, f"step {step}: ZeRO vs {name}", **CROSS64)

    # The consolidated state_dict has torch's format over all params ...
    sd = r0["state_dict"]
    assert r1["state_dict"] is None
    _, ref_opt, _ = single_process_run(family, ZERO_STEPS, torch.float64)
    assert sorted(sd["state"]) == list(range(n_params))
    assert_close_states(
        {i: dict(s) for i, s in sd["state"].items()},
        plain_state(ref_opt),
        "consolidated vs unsharded state",
        **CROSS64,
    )
    # ... and an unsharded ferroptim optimizer resumes from it to the unsharded numbers.
    model = make_mlp(0, torch.float64)
    with torch.no_grad():
        for p, final in zip(model.parameters(), r0["trajectory"][-1], strict=True):
            p.copy_(final)
    opt = make_opt(family, model.parameters())
    opt.load_state_dict(sd)
    long_ref, _, _ = single_process_run(family, ZERO_STEPS + 3, torch.float64)
    for step in range(ZERO_STEPS, ZERO_STEPS + 3):
        opt.zero_grad()
        loss_of(model, *batch(step, torch.float64)).backward()
        opt.step()
        assert_close_lists(
            [p.detach() for p in model.parameters()],
            long_ref[step],
            f"step {step} after resuming from the consolidated state",
            **CROSS64,
        )


def test_zero_redundancy_optimizer_with_8bit_states(zero_results):
    """Each rank keeps its own params' states packed; the consolidated state_dict holds
    them dequantized (float32, shaped like the params) and loads into one process."""
    r0, r1 = _scenario(zero_results, "8bit")
    assert_close_lists(r0["params"], r1["params"], "rank 0 vs rank 1")
    for out in (r0, r1):
        assert out["state_dtypes"] and set(out["state_dtypes"].values()) == {torch.uint8}
    model, opt = _eight_bit_single_process(ZERO_STEPS)
    assert_close_lists(
        r0["params"],
        [p.detach() for p in model.parameters()],
        "ZeRO vs one process",
        **EIGHT_BIT_CROSS,
    )
    sd = r0["state_dict"]
    for i, p in enumerate(model.parameters()):
        assert sd["state"][i]["exp_avg"].dtype == torch.float32
        assert sd["state"][i]["exp_avg"].shape == p.shape
    resumed = ferroptim.AdamW(_eight_bit_groups(model), **EIGHT_BIT)
    resumed.load_state_dict(sd)
    assert resumed.state[next(iter(model.parameters()))]["exp_avg"].dtype == torch.uint8
    assert_close_states(
        plain_state(resumed), plain_state(opt), "resumed vs one process", **EIGHT_BIT_CROSS
    )


def test_zero_redundancy_optimizer_skip_nonfinite_skips_on_every_rank(zero_results):
    """A non-finite gradient anywhere skips the whole step, as the unsharded optimizer
    does — not just the shard of the rank that owns that parameter."""
    r0, r1 = _scenario(zero_results, "skip")
    assert 0 in r0["owned"] and 0 not in r1["owned"]
    for rank, out in enumerate((r0, r1)):
        changed = [i for i, c in enumerate(out["changed"]) if c]
        assert not changed, (
            f"rank {rank}: params {changed} were stepped although param 0's gradient holds a "
            f"nan (rank 0 owns {r0['owned']} and skipped; rank 1 owns {r1['owned']})"
        )
        assert out["skipped_steps"] == 1, f"rank {rank}: skipped_steps {out['skipped_steps']}"


# ----------------------------------------------------------------------------------------
# FSDP2 (fully_shard): DTensor parameters
# ----------------------------------------------------------------------------------------

FSDP_STEPS = 6


def _sharded_mlp(seed: int, dtype: torch.dtype, mixed_precision: bool = False) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision else None,
        reduce_dtype=torch.float32 if mixed_precision else None,
    )
    model = make_mlp(seed, dtype)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _all_dtensors(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return all(isinstance(p, DTensor) for p in model.parameters())


def _fsdp_parity(rank: int, family: str, mixed_precision: bool = False) -> dict[str, Any]:
    """ferroptim and torch.optim on identically sharded models (``mixed_precision``:
    bf16 compute, float32 sharded params and reduced gradients)."""
    dtype = torch.float32
    out: dict[str, Any] = {}
    for name, torch_ref in (("ferro", False), ("torch", True)):
        model = _sharded_mlp(0, dtype, mixed_precision)
        assert _all_dtensors(model)
        opt = make_opt(family, model.parameters(), torch_ref=torch_ref)
        trajectory = []
        with kernel_calls() as calls:
            for step in range(FSDP_STEPS):
                opt.zero_grad()
                x, y = batch(step, dtype, rank)
                if mixed_precision:
                    x, y = x.bfloat16(), y.bfloat16()
                loss_of(model, x, y).float().backward()
                opt.step()
                trajectory.append([local(p) for p in model.parameters()])
        out[name] = {
            "kernel_calls": calls.total(),
            "trajectory": trajectory,
            "state": plain_state(opt),
            "full": [full(p) for p in model.parameters()],
            "dtensors": _all_dtensors(model),
        }
    return out


def _fsdp_clip(rank: int) -> dict[str, Any]:
    """One backward on two identical sharded models; ferroptim's and torch's
    clip_grad_norm_ (and get_total_norm) on their DTensor gradients."""
    dtype = torch.float64
    a, b = _sharded_mlp(0, dtype), _sharded_mlp(0, dtype)
    for model in (a, b):
        loss_of(model, *batch(0, dtype, rank)).backward()
    total = full(ferroptim.get_total_norm([p.grad for p in a.parameters()]))
    norm_f = full(ferroptim.clip_grad_norm_(a.parameters(), 0.05))
    norm_t = full(torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05))
    return {
        "total": total,
        "norm_f": norm_f,
        "norm_t": norm_t,
        "grads_f": [local(p.grad) for p in a.parameters()],
        "grads_t": [local(p.grad) for p in b.parameters()],
    }


def _fsdp_max_grad_norm(rank: int, family: str) -> dict[str, Any]:
    """``max_grad_norm=`` inside ferroptim's step vs torch's clip_grad_norm_ + step."""
    dtype = torch.float32
    max_norm = 0.05
    a, b = _sharded_mlp(0, dtype), _sharded_mlp(0, dtype)
    opt_f = make_opt(family, a.parameters(), max_grad_norm=max_norm)
    opt_t = make_opt(family, b.parameters(), torch_ref=True)
    norms_f, norms_t = [], []
    for step in range(FSDP_STEPS):
        for model, opt in ((a, opt_f), (b, opt_t)):
            opt.zero_grad()
            loss_of(model, *batch(step, dtype, rank)).backward()
        norms_t.append(full(torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)))
        opt_t.step()
        opt_f.step()
        norms_f.append(full(opt_f.last_grad_norm))
    return {
        "ferro": [local(p) for p in a.parameters()],
        "torch": [local(p) for p in b.parameters()],
        "state_f": plain_state(opt_f),
        "state_t": plain_state(opt_t),
        "norms_f": norms_f,
        "norms_t": norms_t,
    }


#: (family, extra ferroptim kwargs, {step: (rank that gets the bad value, param index, value)})
SKIP_CASES: dict[str, tuple[str, dict[str, Any], dict[int, tuple[int, int, float]]]] = {
    "Adam": ("Adam", {}, {2: (0, 0, float("nan")), 4: (1, 3, float("inf"))}),
    "SGD-warn": ("SGD", {"skip_nonfinite": "warn"}, {1: (1, 2, float("nan"))}),
    "AdamW-clip": ("AdamW", {"max_grad_norm": 0.05}, {3: (0, 1, float("-inf"))}),
}


def _fsdp_skip(rank: int, case: str) -> dict[str, Any]:
    """skip_nonfinite with a non-finite value in ONE rank's shard: both ranks skip."""
    family, extra, bad = SKIP_CASES[case]
    extra = {"skip_nonfinite": True, **extra}
    dtype = torch.float32
    a, b = _sharded_mlp(0, dtype), _sharded_mlp(0, dtype)
    opt_f = make_opt(family, a.parameters(), **extra)
    opt_t = make_opt(family, b.parameters(), torch_ref=True)
    max_norm = extra.get("max_grad_norm")
    changed_on_bad_step = {}
    skipped = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(FSDP_STEPS):
            for model, opt in ((a, opt_f), (b, opt_t)):
                opt.zero_grad()
                loss_of(model, *batch(step, dtype, rank)).backward()
            if step in bad:
                bad_rank, index, value = bad[step]
                if rank == bad_rank:
                    grad = list(a.parameters())[index].grad
                    with torch.no_grad():
                        grad.to_local().view(-1)[0] = value
                before = [local(p) for p in a.parameters()], plain_state(opt_f)
                opt_f.step()
                after = [local(p) for p in a.parameters()], plain_state(opt_f)
                changed_on_bad_step[step] = {
                    "params": [
                        not torch.equal(x, y) for x, y in zip(before[0], after[0], strict=True)
                    ],
                    "before_state": before[1],
                    "after_state": after[1],
                }
                # The reference simply does not step.
            else:
                if max_norm is not None:
                    torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
                opt_t.step()
                opt_f.step()
            skipped.append(opt_f.skipped_steps)
    return {
        "ferro": [local(p) for p in a.parameters()],
        "torch": [local(p) for p in b.parameters()],
        "state_f": plain_state(opt_f),
        "state_t": plain_state(opt_t),
        "skipped": skipped,
        "bad_steps": changed_on_bad_step,
        "warnings": [str(w.category.__name__) for w in caught],
    }


def _fsdp_dcp(rank: int, outdir: Path, family: str) -> dict[str, Any]:
    """get/set_optimizer_state_dict + torch.distributed.checkpoint save/load round trip."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    dtype = torch.float32
    ckpt = outdir / f"dcp_{family}"

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            loss_of(model, *batch(step, dtype, rank)).backward()
            opt.step()

    model = _sharded_mlp(0, dtype)
    opt = make_opt(family, model.parameters())
    train(model, opt, range(3))
    osd = get_optimizer_state_dict(model, opt)
    saved_keys = sorted(osd["state"])
    dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=str(ckpt))
    train(model, opt, range(3, 6))
    uninterrupted = ([local(p) for p in model.parameters()], plain_state(opt))

    fresh = _sharded_mlp(5, dtype)  # another init: the checkpoint must overwrite it
    fresh_opt = make_opt(family, fresh.parameters())
    sd = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(sd, checkpoint_id=str(ckpt))
    set_model_state_dict(fresh, sd["model"])
    set_optimizer_state_dict(fresh, fresh_opt, sd["optim"])
    restored = ([local(p) for p in fresh.parameters()], plain_state(fresh_opt))
    train(fresh, fresh_opt, range(3, 6))
    resumed = ([local(p) for p in fresh.parameters()], plain_state(fresh_opt))
    return {
        "saved_keys": saved_keys,
        "uninterrupted": uninterrupted,
        "restored": restored,
        "resumed": resumed,
    }


def _fsdp_checkpoint_reference(rank: int, outdir: Path, family: str) -> dict[str, Any]:
    """The state right after step 3, to compare what set_optimizer_state_dict restored."""
    dtype = torch.float32
    model = _sharded_mlp(0, dtype)
    opt = make_opt(family, model.parameters())
    for step in range(3):
        opt.zero_grad()
        loss_of(model, *batch(step, dtype, rank)).backward()
        opt.step()
    return ([local(p) for p in model.parameters()], plain_state(opt))


def _wide_sharded_mlp(seed: int) -> torch.nn.Module:
    """An MLP whose shards span several 8-bit blocks, with ragged last ones (its hidden
    layer's 600 x 6 weight: 300 rows a rank; the output layer's 5 x 600: 3 rows, 2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN, 600), torch.nn.Tanh(), torch.nn.Linear(600, OUT)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_8bit(rank: int, outdir: Path) -> dict[str, Any]:
    """FSDP2 with 8-bit states, quantized per shard: each rank's step equals one process
    stepping the rank's local shards as plain params (fed the same reduced gradients),
    bit for bit; torch.distributed.checkpoint round-trips the states as DTensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    model = _wide_sharded_mlp(0)
    opt = ferroptim.AdamW(_eight_bit_groups(model), **EIGHT_BIT)
    shards = [torch.nn.Parameter(local(p).detach().clone()) for p in model.parameters()]
    shard_opt = ferroptim.AdamW([{"params": shards, "min_8bit_size": 0}], **EIGHT_BIT)

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            loss_of(model, *batch(step, torch.float32, rank)).backward()
            opt.step()

    exact = []
    for step in range(3):
        opt.zero_grad()
        loss_of(model, *batch(step, torch.float32, rank)).backward()
        for p, shard in zip(model.parameters(), shards, strict=True):
            shard.grad = local(p.grad).clone()
        opt.step()
        shard_opt.step()
        exact.append(
            all(torch.equal(local(p), s) for p, s in zip(model.parameters(), shards, strict=True))
            and all(
                torch.equal(opt.state[p][key], shard_opt.state[s][key])
                for p, s in zip(model.parameters(), shards, strict=True)
                for key in ("exp_avg", "exp_avg_sq")
            )
        )
    packed = [opt.state[p]["exp_avg"].dtype == torch.uint8 for p in model.parameters()]
    osd = get_optimizer_state_dict(model, opt)
    saved = {
        key: (type(value).__name__, value.dtype, tuple(value.shape))
        for state in osd["state"].values()
        for key, value in state.items()
        if key != "step"
    }
    dtensor_states = all(
        isinstance(v, DTensor) for s in osd["state"].values() for k, v in s.items() if k != "step"
    )
    ckpt = outdir / "dcp_8bit"
    dcp.save({"optim": osd}, checkpoint_id=str(ckpt))
    params_at_save = [local(p).clone() for p in model.parameters()]
    train(model, opt, range(3, 6))
    uninterrupted = [local(p) for p in model.parameters()]

    fresh = _wide_sharded_mlp(0)
    with torch.no_grad():
        for p, q in zip(fresh.parameters(), params_at_save, strict=True):
            p.to_local().copy_(q)  # (the shard itself: ``local`` copies it)
    fresh_opt = ferroptim.AdamW(_eight_bit_groups(fresh), **EIGHT_BIT)
    sd = {"optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(sd, checkpoint_id=str(ckpt))
    set_optimizer_state_dict(fresh, fresh_opt, sd["optim"])
    restored_packed = [
        fresh_opt.state[p]["exp_avg"].dtype == torch.uint8 for p in fresh.parameters()
    ]
    train(fresh, fresh_opt, range(3, 6))
    return {
        "exact": exact,
        "packed": packed,
        "saved": saved,
        "dtensor_states": dtensor_states,
        "restored_packed": restored_packed,
        "uninterrupted": uninterrupted,
        "resumed": [local(p) for p in fresh.parameters()],
    }


def _fsdp_8bit_backends(rank: int) -> dict[str, Any]:
    """FSDP2 with 8-bit states stepped in Rust and on torch's path (dequantize, torch's
    for-loop on the DTensors, quantize the shards)."""
    runs = {}
    before = ferroptim.get_backend()
    for backend in ("auto", "torch"):
        ferroptim.set_backend(backend)
        try:
            model = _wide_sharded_mlp(0)
            opt = ferroptim.AdamW(_eight_bit_groups(model), **EIGHT_BIT)
            for step in range(4):
                opt.zero_grad()
                loss_of(model, *batch(step, torch.float32, rank)).backward()
                opt.step()
        finally:
            ferroptim.set_backend(before)
        runs[backend] = {
            "params": [local(p) for p in model.parameters()],
            "packed": all(
                opt.state[p][k].dtype == torch.uint8
                for p in model.parameters()
                for k in ("exp_avg", "exp_avg_sq")
            ),
        }
    return runs


def _fsdp_8bit_empty_shard(rank: int, outdir: Path) -> dict[str, Any]:
    """A param of one row on two ranks: rank 1's shard is empty, and so is its packed
    state; steps and a DCP round trip work on both ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, 600), torch.nn.Tanh(), torch.nn.Linear(600, 1))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = ferroptim.AdamW(model.parameters(), lr=1e-2, state_dtype="8bit", min_8bit_size=0)

    def train(steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            model(batch(step, torch.float32, rank)[0]).sum().backward()
            opt.step()

    train(range(3))
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(outdir / "e8"))
    sd = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=str(outdir / "e8"))
    set_optimizer_state_dict(model, opt, sd["optim"])
    train(range(3, 5))
    return {
        "shard_sizes": [local(p).numel() for p in model.parameters()],
        "packed_sizes": [opt.state[p]["exp_avg"].numel() for p in model.parameters()],
        "packed": all(opt.state[p]["exp_avg"].dtype == torch.uint8 for p in model.parameters()),
        "finite": all(bool(torch.isfinite(local(p)).all()) for p in model.parameters()),
    }


def worker_fsdp(rank: int, world_size: int, outdir: Path) -> dict[str, Any]:
    scenarios: list[tuple[str, Callable[[], Any]]] = [
        (f"parity-{f}", lambda f=f: _fsdp_parity(rank, f)) for f in FSDP_NAMES
    ]
    scenarios += [
        (f"parity-mp-{f}", lambda f=f: _fsdp_parity(rank, f, mixed_precision=True))
        for f in ("AdamW", "SGD")
    ]
    scenarios.append(("clip", lambda: _fsdp_clip(rank)))
    scenarios.append(("8bit", lambda: _fsdp_8bit(rank, outdir)))
    scenarios.append(("8bit-backends", lambda: _fsdp_8bit_backends(rank)))
    scenarios.append(("8bit-empty", lambda: _fsdp_8bit_empty_shard(rank, outdir)))
    scenarios += [
        (f"max_grad_norm-{f}", lambda f=f: _fsdp_max_grad_norm(rank, f)) for f in ("AdamW", "SGD")
    ]
    scenarios += [(f"skip-{c}", lambda c=c: _fsdp_skip(rank, c)) for c in SKIP_CASES]
    for f in FSDP_NAMES:
        scenarios.append((f"dcp-{f}", lambda f=f: _fsdp_dcp(rank, outdir, f)))
        scenarios.append((f"dcp-ref-{f}", lambda f=f: _fsdp_checkpoint_reference(rank, outdir, f)))
    return _run_scenarios(scenarios)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_workers(worker_fsdp, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("family", FSDP_NAMES)
def test_fsdp2_matches_torch_on_identically_sharded_model(fsdp_results, family):
    outs = _scenario(fsdp_results, f"parity-{family}")
    for rank, out in enumerate(outs):
        ferro, ref = out["ferro"], out["torch"]
        assert ferro["dtensors"], "params must still be DTensors after ferroptim's steps"
        assert_stepped_in_rust(ferro["kernel_calls"], FSDP_STEPS, family)
        assert ref["kernel_calls"] == 0
        for step, (a, b) in enumerate(zip(ferro["trajectory"], ref["trajectory"], strict=True)):
            assert_close_lists(a, b, f"rank {rank} step {step}: local shards vs torch", **F32)
        assert_close_states(ferro["state"], ref["state"], f"rank {rank}: state vs torch", **F32)
        assert_close_lists(
            ferro["full"], outs[0]["ferro"]["full"], f"rank {rank} vs rank 0 full params"
        )
    # The gathered model matches an unsharded single-process run on the full batch.
    single, _, _ = single_process_run(family, FSDP_STEPS, torch.float32)
    assert_close_lists(outs[0]["ferro"]["full"], single[-1], "FSDP2 vs unsharded", **CROSS32)


@pytest.mark.parametrize("family", ["AdamW", "SGD"])
def test_fsdp2_mixed_precision_matches_torch(fsdp_results, family):
    for rank, out in enumerate(_scenario(fsdp_results, f"parity-mp-{family}")):
        ferro, ref = out["ferro"], out["torch"]
        assert ferro["kernel_calls"] >= FSDP_STEPS
        for step, (a, b) in enumerate(zip(ferro["trajectory"], ref["trajectory"], strict=True)):
            assert all(t.dtype == torch.float32 for t in a), "sharded params stay float32"
            assert_close_lists(a, b, f"rank {rank} step {step}: local shards vs torch", **F32)
        assert_close_states(ferro["state"], ref["state"], f"rank {rank}: state vs torch", **F32)


def test_fsdp2_clip_grad_norm_is_the_global_norm(fsdp_results):
    outs = _scenario(fsdp_results, "clip")
    # The unsharded model's full-batch gradient norm, in this process.
    model = make_mlp(0, torch.float64)
    loss_of(model, *batch(0, torch.float64)).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(expected) > 0.05, "the test needs clipping to kick in"
    for rank, out in enumerate(outs):
        assert torch.equal(out["norm_f"], out["norm_t"]), (
            f"rank {rank}: ferroptim's norm {out['norm_f']} != torch's {out['norm_t']}"
        )
        torch.testing.assert_close(out["norm_f"], expected, **CROSS64)
        torch.testing.assert_close(out["total"], expected, **CROSS64)
        assert_close_lists(out["grads_f"], out["grads_t"], f"rank {rank}: clipped grads", **F64)


@pytest.mark.parametrize("family", ["AdamW", "SGD"])
def test_fsdp2_max_grad_norm_matches_torch_clip_and_step(fsdp_results, family):
    for rank, out in enumerate(_scenario(fsdp_results, f"max_grad_norm-{family}")):
        assert_close_lists(out["ferro"], out["torch"], f"rank {rank}: params", **F32)
        assert_close_states(out["state_f"], out["state_t"], f"rank {rank}: state", **F32)
        assert_close_lists(out["norms_f"], out["norms_t"], f"rank {rank}: norms", **F32)
        assert all(float(n) > 0.05 for n in out["norms_t"]), "clipping must be active"


@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_fsdp2_skip_nonfinite_on_one_rank_skips_on_both(fsdp_results, case):
    _, extra, bad = SKIP_CASES[case]
    outs = _scenario(fsdp_results, f"skip-{case}")
    expected_skips = []
    count = 0
    for step in range(FSDP_STEPS):
        count += step in bad
        expected_skips.append(count)
    for rank, out in enumerate(outs):
        assert out["skipped"] == expected_skips, f"rank {rank}: skipped_steps per step"
        for step, info in out["bad_steps"].items():
            assert not any(info["params"]), f"rank {rank}: step {step} wrote params"
            assert_close_states(
                info["after_state"], info["before_state"], f"rank {rank}: step {step} state"
            )
        assert_close_lists(out["ferro"], out["torch"], f"rank {rank}: params vs torch", **F32)
        assert_close_states(out["state_f"], out["state_t"], f"rank {rank}: state", **F32)
        n_warn = out["warnings"].count("RuntimeWarning")
        assert n_warn == (len(bad) if extra.get("skip_nonfinite") == "warn" else 0)


@pytest.mark.parametrize("family", FSDP_NAMES)
def test_fsdp2_distributed_checkpoint_round_trip(fsdp_results, family):
    outs = _scenario(fsdp_results, f"dcp-{family}")
    refs = _scenario(fsdp_results, f"dcp-ref-{family}")
    for rank, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert out["saved_keys"], "get_optimizer_state_dict returned no state"
        # What was loaded is the state after step 3, bitwise.
        assert_close_lists(out["restored"][0], ref[0], f"rank {rank}: restored params")
        assert_close_states(out["restored"][1], ref[1], f"rank {rank}: restored state")
        # ... and training continues to the uninterrupted run's numbers.
        assert_close_lists(out["resumed"][0], out["uninterrupted"][0], f"rank {rank}: params")
        assert_close_states(out["resumed"][1], out["uninterrupted"][1], f"rank {rank}: state")


def test_fsdp2_with_8bit_states_quantizes_per_shard(fsdp_results):
    for rank, out in enumerate(_scenario(fsdp_results, "8bit")):
        assert all(out["packed"]), f"rank {rank}: states not 8-bit"
        assert out["exact"] == [True] * 3, f"rank {rank}: not the per-shard step, bitwise"
        # The checkpoint holds float32 DTensors shaped like the params.
        assert out["dtensor_states"], out["saved"]
        assert {dtype for _, dtype, _ in out["saved"].values()} == {torch.float32}
        assert all(out["restored_packed"]), f"rank {rank}: loaded states not 8-bit again"
        # Dequantized and quantized again on load: within the format's error.
        assert_close_lists(
            out["resumed"], out["uninterrupted"], f"rank {rank}: resumed", **EIGHT_BIT_CROSS
        )


def test_fsdp2_with_8bit_states_on_torchs_path(fsdp_results):
    for rank, runs in enumerate(_scenario(fsdp_results, "8bit-backends")):
        assert runs["auto"]["packed"] and runs["torch"]["packed"]
        # torch's for-loop rounds its ops one by one: a few ulps, and at most a code's
        # gap where a state lands on the other side of a midpoint
        assert_close_lists(
            runs["torch"]["params"], runs["auto"]["params"], f"rank {rank}", **EIGHT_BIT_CROSS
        )


def test_fsdp2_with_8bit_states_and_an_empty_shard(fsdp_results):
    r0, r1 = _scenario(fsdp_results, "8bit-empty")
    assert r0["shard_sizes"] == [1800, 300, 600, 1] and r1["shard_sizes"] == [1800, 300, 0, 0]
    for out in (r0, r1):
        assert out["packed"] and out["finite"]
        # codes padded to 4 bytes, then one scale per 256 (none for an empty shard)
        assert out["packed_sizes"] == [n + (-n % 4) + 4 * -(-n // 256) for n in out["shard_sizes"]]
