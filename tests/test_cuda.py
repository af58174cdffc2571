"""ferroptim on CUDA: tensors on a GPU step through torch's own kernels.

* dispatch: CUDA params step through torch's fused kernels where torch has them (Adam,
  AdamW, SGD, Adagrad; RMSprop: foreach), bitwise what ``torch.optim`` gives with the
  same choice, and no Rust kernel runs;
* a group mixing CPU and CUDA params: the CPU ones step in Rust, the CUDA ones in
  torch's fused kernels, each part as torch.optim steps it;
* ``state_dict`` interop across devices: ferroptim on CUDA -> torch.optim on CPU and
  torch.optim on CPU -> ferroptim on CUDA continue to the same numbers;
* GradScaler on CUDA (float16 autocast): by default GradScaler unscales (ferroptim then
  steps as torch's default does), with ``fused=True`` the fused kernels take the scale,
  bitwise as torch's fused optimizer; overflow steps are skipped either way.

Marked ``cuda`` and skipped without a GPU; run them alone with ``pytest -m cuda``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _kernels import kernel_calls
from conftest import runs_in_rust, train_cases
from ferroptim._torch_compat import fused_kernel_devices_of

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
#: Two float32 implementations of the same update (torch's CUDA kernels vs its CPU
#: for-loop, or vs ferroptim's Rust kernel): a few float32 ulps apart per step.
F32 = {"rtol": 1e-5, "atol": 1e-5}

#: (ferroptim class, torch class, kwargs, this torch has a fused CUDA kernel for it):
#: every optimizer of the registry, state buffers in play. (Adagrad's fused kernel
#: takes CUDA tensors in torch 2.15, not in 2.11: ferroptim asks torch, as here.)
FAMILIES: dict[str, tuple[type, type, dict[str, Any], bool]] = {
    name: (
        family.ferro,
        family.torch,
        {**family.fixed, **kwargs},
        family.has_fused and DEVICE in fused_kernel_devices_of(family.torch),
    )
    for name, (family, kwargs) in train_cases().items()
}
NAMES = list(FAMILIES)
SHAPES = [(64, 32), (32,), (17, 5, 3), (1,)]
STEPS = 5


def make_params(device: str, seed: int = 0, shapes: list = SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def grads_for(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same gradients for every copy of ``params`` (made on the CPU, then moved)."""
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def run(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range = range(STEPS)
) -> None:
    for step in steps:
        for p, g in zip(params, grads_for(step, params), strict=True):
            p.grad = g.to(p.device)
        opt.step()


def assert_state_equal(
    a: torch.optim.Optimizer, pa: list, b: torch.optim.Optimizer, pb: list, **tol: float
) -> None:
    """Params and every state value of ``a`` and ``b`` (bitwise when ``tol`` is empty),
    compared on the CPU."""
    compare: Callable[[torch.Tensor, torch.Tensor, str], None]
    if tol:

        def compare(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
            torch.testing.assert_close(x.cpu(), y.cpu(), **tol, msg=lambda m: f"{what}: {m}")
    else:

        def compare(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
            assert torch.equal(x.cpu(), y.cpu()), f"{what} differs"

    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        compare(x.detach(), y.detach(), f"param {i}")
        sa, sb = a.state[x], b.state[y]
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sb:
            if key == "step":
                assert float(sa[key]) == float(sb[key]), f"param {i}: step"
            else:
                compare(sa[key], sb[key], f"param {i} {key}")


@pytest.mark.parametrize("family", NAMES)
def test_cuda_params_step_in_torchs_fused_kernels(family):
    ferro_cls, torch_cls, kwargs, fused = FAMILIES[family]
    pf, pt = make_params(DEVICE), make_params(DEVICE)
    f = ferro_cls(pf, **kwargs)
    # torch's fused kernels where it has them, else torch's own default (foreach; for
    # Adafactor its for-loop): ferroptim's choice for tensors off the CPU.
    t = torch_cls(pt, **kwargs, **({"fused": True} if fused else {}))
    with kernel_calls() as calls:
        run(f, pf)
    run(t, pt)
    assert calls.total() == 0, "a CUDA tensor reached the Rust kernel"
    assert all(p.device.type == "cuda" for p in pf)
    assert_state_equal(f, pf, t, pt)  # the same kernel on the same inputs: bitwise
    if fused and "step" in t.state[pt[0]]:
        # torch's fused kernels keep `step` on the param's device (foreach: on the CPU).
        assert f.state[pf[0]]["step"].device == t.state[pt[0]]["step"].device == pf[0].device


@pytest.mark.parametrize("family", NAMES)
def test_explicit_foreach_on_cuda_is_honoured(family):
    ferro_cls, torch_cls, kwargs, _ = FAMILIES[family]
    pf, pt = make_params(DEVICE), make_params(DEVICE)
    f = ferro_cls(pf, **kwargs, foreach=True)
    t = torch_cls(pt, **kwargs, foreach=True)
    run(f, pf)
    run(t, pt)
    assert_state_equal(f, pf, t, pt)


@pytest.mark.parametrize("family", NAMES)
def test_group_mixing_cpu_and_cuda_params(family):
    """One group holding CPU and CUDA params (a second group too): the CPU part steps in
    Rust (one kernel call per group per step), the CUDA part in torch's kernels; each
    matches torch.optim run on that part alone (CPU: its for-loop; CUDA: fused/foreach)."""
    ferro_cls, torch_cls, kwargs, fused = FAMILIES[family]
    cpu_shapes, cuda_shapes = [(40, 3), (7,)], [(33, 2), (5, 5)]
    fc, fg = make_params("cpu", 1, cpu_shapes), make_params(DEVICE, 2, cuda_shapes)
    tc, tg = make_params("cpu", 1, cpu_shapes), make_params(DEVICE, 2, cuda_shapes)
    groups = [
        {"params": [fc[0], fg[0]]},
        {"params": [fg[1], fc[1]], "lr": kwargs["lr"] / 3},
    ]
    f = ferro_cls(groups, **kwargs)
    t_cpu = torch_cls(
        [{"params": [tc[0]]}, {"params": [tc[1]], "lr": kwargs["lr"] / 3}],
        **kwargs,
        foreach=False,
    )
    choice = {"fused": True} if fused else {}  # (torch's default: foreach, or a for-loop)
    t_gpu = torch_cls(
        [{"params": [tg[0]]}, {"params": [tg[1]], "lr": kwargs["lr"] / 3}], **kwargs, **choice
    )
    ferro_order, torch_order = [fc[0], fg[0], fg[1], fc[1]], [tc[0], tg[0], tg[1], tc[1]]
    with kernel_calls() as calls:
        for step in range(STEPS):
            grads = grads_for(step, ferro_order)
            for a, b, g in zip(ferro_order, torch_order, grads, strict=True):
                a.grad, b.grad = g.to(a.device), g.to(b.device)
            f.step()
            t_cpu.step()
            t_gpu.step()
    in_rust = runs_in_rust(family)
    # The CPU part of each group, every step (families that step through torch's
    # implementation run the whole group through its for-loop: close to foreach on CUDA).
    assert calls.total() == (2 * STEPS if in_rust else 0)
    assert all(p.device.type == "cpu" for p in fc) and all(p.device.type == "cuda" for p in fg)
    assert_state_equal(f, fg, t_gpu, tg, **({} if in_rust else F32))  # CUDA part: bitwise
    assert_state_equal(f, fc, t_cpu, tc, **F32)  # Rust vs torch's for-loop
    for p in fc:
        assert all(v.device.type == "cpu" for v in f.state[p].values() if torch.is_tensor(v))


@pytest.mark.parametrize("family", NAMES)
def test_state_dict_from_cuda_to_cpu_and_back(family):
    """ferroptim on CUDA -> its state_dict -> torch.optim on CPU, and torch.optim on
    CPU -> ferroptim on CUDA: both continue to the numbers of an uninterrupted run."""
    ferro_cls, torch_cls, kwargs, _ = FAMILIES[family]
    first, rest = range(STEPS), range(STEPS, 2 * STEPS)

    # Uninterrupted: ferroptim on CUDA for both halves.
    p_straight = make_params(DEVICE)
    straight = ferro_cls(p_straight, **kwargs)
    run(straight, p_straight, range(2 * STEPS))

    # ferroptim on CUDA, then torch.optim on the CPU from its state_dict.
    p_gpu = make_params(DEVICE)
    f = ferro_cls(p_gpu, **kwargs)
    run(f, p_gpu, first)
    sd = copy.deepcopy(f.state_dict())
    p_cpu = [torch.nn.Parameter(p.detach().cpu().clone()) for p in p_gpu]
    t = torch_cls(p_cpu, **kwargs)
    t.load_state_dict(sd)
    # Where each state tensor lands is where it lands from torch.optim's own CUDA
    # checkpoint (torch moves buffers to the params' device and leaves a `step` where it
    # was, unless the saved group is fused or capturable).
    p_ref = make_params(DEVICE)
    ref = torch_cls(p_ref, **kwargs)
    run(ref, p_ref, first)
    t_ref = torch_cls([torch.nn.Parameter(p.detach().cpu()) for p in p_ref], **kwargs)
    t_ref.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert state_devices(t) == state_devices(t_ref)
    assert {v.device.type for s in t.state.values() for k, v in s.items() if k != "step"} <= {"cpu"}
    run(t, p_cpu, rest)
    assert_state_equal(t, p_cpu, straight, p_straight, **F32)

    # And back: torch.optim's CPU state_dict into ferroptim on CUDA.
    p_back = [torch.nn.Parameter(p.detach().to(DEVICE, copy=True)) for p in p_cpu]
    back = ferro_cls(p_back, **kwargs)
    back.load_state_dict(copy.deepcopy(t.state_dict()))
    run(back, p_back, range(2 * STEPS, 3 * STEPS))
    run(straight, p_straight, range(2 * STEPS, 3 * STEPS))
    run(t, p_cpu, range(2 * STEPS, 3 * STEPS))
    assert_state_equal(back, p_back, t, p_cpu, **F32)
    assert_state_equal(back, p_back, straight, p_straight, **F32)


def state_devices(opt: torch.optim.Optimizer) -> list[dict[str, str]]:
    """Each param's state: key -> the device type of its tensor."""
    return [
        {k: v.device.type for k, v in s.items() if torch.is_tensor(v)} for s in opt.state.values()
    ]


def scaled_training(
    make_opt: Callable[[list], torch.optim.Optimizer], steps: int = 12
) -> dict[str, Any]:
    """float16 autocast with a CUDA GradScaler; steps 3 and 7 overflow."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model = model.to(DEVICE)
    params = list(model.parameters())
    opt = make_opt(params)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=3)
    scales, step_calls = [], []
    opt.register_step_pre_hook(lambda o, a, k: step_calls.append(len(scales)))
    for step in range(steps):
        x = torch.randn(32, 16, generator=gen).to(DEVICE)
        y = torch.randn(32, 8, generator=gen).to(DEVICE)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step in (3, 7):
            params[1].grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return {"opt": opt, "params": params, "scales": scales, "step_calls": step_calls}


@pytest.mark.parametrize("family", NAMES)
def test_grad_scaler_on_cuda_default(family):
    """By default GradScaler unscales and skips the overflow steps itself, for ferroptim
    as for torch's default optimizer; the steps match torch's (its fused kernel for
    ferroptim, foreach for torch.optim's CUDA default: close, not bitwise; twelve Adam
    steps on float16-autocast gradients take the two a few float32 ulps of the step size
    apart where the second moment is tiny, hence ``atol``). Where ferroptim chose torch's
    fused kernel, it is bitwise that kernel stepping GradScaler's unscaled gradients."""
    ferro_cls, torch_cls, kwargs, fused = FAMILIES[family]
    f = scaled_training(lambda p: ferro_cls(p, **kwargs))
    t = scaled_training(lambda p: torch_cls(p, **kwargs))
    assert not getattr(f["opt"], "_step_supports_amp_scaling", False)
    assert f["scales"] == t["scales"]
    assert f["step_calls"] == t["step_calls"] == [s for s in range(12) if s not in (3, 7)]
    assert_state_equal(f["opt"], f["params"], t["opt"], t["params"], rtol=1e-5, atol=1e-4)
    if fused:

        def unscaled_fused(params: list) -> torch.optim.Optimizer:
            opt = torch_cls(params, **kwargs, fused=True)
            opt._step_supports_amp_scaling = False  # GradScaler unscales, as for ferroptim
            return opt

        twin = scaled_training(unscaled_fused)
        assert_state_equal(f["opt"], f["params"], twin["opt"], twin["params"])


@pytest.mark.parametrize("family", [n for n in NAMES if FAMILIES[n][3]])
def test_grad_scaler_on_cuda_fused(family):
    """fused=True: GradScaler hands the step its scale and inf flag; torch's fused
    kernels unscale and skip, bitwise as torch.optim's fused optimizer."""
    ferro_cls, torch_cls, kwargs, _ = FAMILIES[family]
    f = scaled_training(lambda p: ferro_cls(p, **kwargs, fused=True))
    t = scaled_training(lambda p: torch_cls(p, **kwargs, fused=True))
    assert f["opt"]._step_supports_amp_scaling is True
    assert f["scales"] == t["scales"]
    assert f["step_calls"] == t["step_calls"] == list(range(12))  # step() runs, then skips
    assert_state_equal(f["opt"], f["params"], t["opt"], t["params"])
    if family != "SGD":
        assert {float(s["step"]) for s in f["opt"].state.values()} == {10.0}
