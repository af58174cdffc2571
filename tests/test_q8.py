"""8-bit blockwise optimizer states (``state_dtype="8bit"``).

* Every step of the Rust kernel is exactly "dequantize, the float32 update, quantize":
  from the same dequantized values, its params equal the float32 kernel's bit for bit and
  its packed states are the float32 kernel's states quantized by ``ferroptim._q8`` (the
  format's torch-op reference, itself held to bitsandbytes in test_q8_format.py), for
  every element-wise optimizer, with ragged blocks and a transposed param.
* torch's path (dequantize, torch's for-loop, quantize) stays with the Rust path.
* Threads and SIMD levels give the same bits; small params stay full precision.
* Checkpoints: dequantized by default (torch.optim loads them), compact on request, both
  load back into any ``state_dtype``; a resumed run repeats the unbroken one.
* Broken packed states are refused or re-laid out before anything is written.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import ferroptim
import pytest
import torch
from ferroptim import _lowp, _q8
from optim_db import FAMILIES, OPTIMIZERS
from test_lowp import _assert_same, _set_grads  # the same steps' gradients and checks
from torch import nn

#: Every optimizer that keeps its states in ``state_dtype`` (the element-wise kernels).
NARROW = tuple(
    name
    for name in OPTIMIZERS
    if FAMILIES[name].rust and FAMILIES[name].ferro._ferro_spec.keeps_state_dtype
)


class Params(nn.Module):
    """float32 params with ragged last blocks: two quantized with the group's
    ``min_8bit_size`` of 1000 (one transposed: its blocks run in memory order), one of
    4099 elements quantized at the default 4096, one too small."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.matrix = nn.Parameter(torch.randn(37, 129, generator=g))
        self.transposed = nn.Parameter(torch.randn(70, 33, generator=g).t())
        self.vector = nn.Parameter(torch.randn(4099, generator=g))
        self.small = nn.Parameter(torch.randn(3, generator=g))


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    return [
        {"params": [model.matrix, model.transposed], "min_8bit_size": 1000},
        {"params": [model.vector, model.small], "lr": 1e-3},
    ]


def _kwargs(name: str, **extra: Any) -> dict[str, Any]:
    family = FAMILIES[name]
    kwargs = {**family.train_kwargs, "state_dtype": "8bit", **extra}
    if "foreach" in inspect.signature(family.ferro).parameters:
        kwargs["foreach"] = False  # torch's path: its for-loop, the reference
    return kwargs


def _make(name: str, model: nn.Module, **extra: Any) -> torch.optim.Optimizer:
    opt = FAMILIES[name].ferro(_groups(model), **_kwargs(name, **extra))
    if extra.get("state_dtype", "8bit") is None:
        for group in opt.param_groups:
            group.pop("min_8bit_size", None)
    return opt


def _train(name: str, steps: int, **extra: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Params()
    opt = _make(name, model, **extra)
    for step in range(steps):
        _set_grads(model, step, skip="small" if step % 4 == 3 else None)
        opt.step()
    return model, opt


def _quantized(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, bool]:
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    keys = _state_keys(opt, group)
    return _lowp.quantized_keys(keys, group, p)


def _state_keys(opt: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[str, ...]:
    return tuple(type(opt)._ferro_spec.state_keys(group))


@pytest.mark.parametrize("name", NARROW)
def test_each_step_is_the_float32_step_quantized(name: str) -> None:
    """From the same values every step: the 8-bit step's params equal the float32
    kernel's bit for bit, and each packed state is the float32 kernel's new state
    quantized by the torch-op reference; states left full precision are equal."""
    narrow_model, wide_model = Params(), Params()
    narrow = _make(name, narrow_model)
    wide = _make(name, wide_model, state_dtype=None)
    seen_packed = 0
    for step in range(20):
        skip = "small" if step % 4 == 3 else None
        _set_grads(narrow_model, step, skip=skip)
        _set_grads(wide_model, step, skip=skip)
        narrow.step()
        wide.step()
        for p, q in zip(narrow_model.parameters(), wide_model.parameters(), strict=True):
            if p.grad is None or p not in narrow.state:
                continue
            assert torch.equal(p, q), f"step {step}: max diff {(p - q).abs().max()}"
            quantized = _quantized(narrow, p)
            for key, value in narrow.state[p].items():
                if not isinstance(value, torch.Tensor) or key == "step":
                    continue
                other = wide.state[q][key]
                if key in quantized:
                    seen_packed += 1
                    assert value.dtype == torch.uint8
                    want = _lowp.pack(other, q.detach(), quantized[key])
                    assert torch.equal(value, want), f"step {step}: {key}"
                    with torch.no_grad():  # the next step starts from the same values
                        other.copy_(_lowp.unpack(value, p.detach(), quantized[key], other.dtype))
                else:
                    assert torch.equal(value, other), f"step {step}: {key}"
            with torch.no_grad():
                q.copy_(p)
    quantizable = any(
        key in _lowp.QUANTIZED_STATES
        for group in narrow.param_groups
        for key in _state_keys(narrow, group)
    )
    assert (seen_packed > 0) == quantizable


@pytest.mark.parametrize("name", ["AdamW", "SGD", "RMSprop", "Adagrad", "Lion", "Adan"])
def test_torch_path_keeps_to_the_rust_path(name: str) -> None:
    """torch's path (other devices, the backend forced to torch: dequantize, torch's
    for-loop in float32, quantize) stays with the Rust step (torch's for-loop differs
    from the correctly rounded kernel by an ulp here and there, which can move a code)."""
    if name not in FAMILIES:
        pytest.skip(f"{name} is not registered")
    rust = _train(name, 30)
    ferroptim.set_backend("torch")
    try:
        torch_path = _train(name, 30)
    finally:
        ferroptim.set_backend("auto")
    (model_a, opt_a), (model_b, opt_b) = rust, torch_path
    for (pname, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=1e-4, msg=pname)
        for key, value in opt_a.state[p].items():
            other = opt_b.state[q][key]
            assert value.dtype == other.dtype, f"{pname}.{key}"
            if value.dtype == torch.uint8:
                n = p.numel()
                same = (value[:n] == other[:n]).float().mean().item()
                assert same > 0.95, f"{pname}.{key}: {same:.3f} of the codes agree"


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_threads_and_simd_levels_give_the_same_bits(name: str, simd_levels: list[str]) -> None:
    runs = []
    for threads, level in [(1, simd_levels[-1]), (ferroptim.max_num_threads(), simd_levels[0])]:
        ferroptim.set_num_threads(threads)
        ferroptim.set_simd_level(level)
        runs.append(_train(name, 12))
    _assert_same(runs[0], runs[1])


def test_cached_plan_and_slow_path_agree() -> None:
    """Steps through the cached plan (every step after the first) give the bits of steps
    that lay everything out again each time (the plan's re-check turned off)."""
    from ferroptim import _core

    assert _core._native_recheck()
    cached = _train("AdamW", 10)
    _core._native_recheck(True)
    try:
        assert not _core._native_recheck()
        slow = _train("AdamW", 10)
    finally:
        _core._native_recheck(False)
    _assert_same(cached, slow)


def test_state_is_about_two_bytes_per_param() -> None:
    p = nn.Parameter(torch.randn(1 << 20))
    opt = ferroptim.AdamW([p], state_dtype="8bit")
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.uint8
    state_bytes = sum(
        t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor)
    )
    assert state_bytes / p.numel() <= 2.1
    assert state["exp_avg"].numel() == _q8.packed_len(p.numel())


def test_small_params_and_other_states_stay_full_precision() -> None:
    model = Params()
    opt = ferroptim.AdamW(_groups(model), state_dtype="8bit", amsgrad=True)
    _set_grads(model, 0)
    opt.step()
    assert opt.param_groups[1]["min_8bit_size"] == 4096
    for p in (model.matrix, model.transposed, model.vector):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert opt.state[p][key].dtype == torch.uint8
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert opt.state[model.small][key].dtype == torch.float32
    asgd = ferroptim.ASGD([nn.Parameter(torch.randn(5000))], state_dtype="8bit")
    p = asgd.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    asgd.step()
    assert asgd.state[p]["ax"].dtype == torch.float32  # an average of params, not a moment


def test_quantized_moments_track_the_float32_optimizer() -> None:
    """Over 300 steps of a noisy quadratic (squared error 1 at the start), 8-bit AdamW
    converges with float32 AdamW: down to its noise floor (measured: 0.0108 for float32,
    0.0140 for 8-bit: the coarse codes of small second moments in a block with a large
    one make the last steps noisier)."""
    target = torch.randn(50000, generator=torch.Generator().manual_seed(0))
    runs = []
    for state_dtype in (None, "8bit"):
        p = nn.Parameter(torch.zeros(50000))
        opt = ferroptim.AdamW([p], lr=1e-2, state_dtype=state_dtype)
        g = torch.Generator().manual_seed(1)
        for _ in range(300):
            p.grad = (p.detach() - target) + 0.1 * torch.randn(50000, generator=g)
            opt.step()
        runs.append(((p.detach() - target) ** 2).mean().item())
    wide, narrow = runs
    assert wide < 0.02 and narrow < 1.5 * wide, runs


def test_checkpoints_are_dequantized_by_default_and_compact_on_request() -> None:
    model, opt = _train("AdamW", 5)
    saved = copy.deepcopy(opt.state_dict())
    compact = copy.deepcopy(opt.state_dict(compact=True))
    assert saved["state"][0]["exp_avg"].dtype == torch.float32
    assert saved["state"][0]["exp_avg"].shape == model.matrix.shape
    assert compact["state"][0]["exp_avg"].dtype == torch.uint8
    assert opt.state[model.matrix]["exp_avg"].dtype == torch.uint8  # the live state is kept
    signed = _lowp.QUANTIZED_STATES["exp_avg"]
    want = _lowp.unpack(
        compact["state"][0]["exp_avg"], model.matrix.detach(), signed, torch.float32
    )
    assert torch.equal(saved["state"][0]["exp_avg"], want)

    # torch.optim loads the default checkpoint
    groups = [{"params": [model.matrix, model.transposed]}, {"params": [model.vector, model.small]}]
    reference = torch.optim.AdamW(groups)
    reference.load_state_dict(saved)
    assert torch.equal(reference.state[model.matrix]["exp_avg"], want)

    # both load back into an 8-bit optimizer: the compact one as it was, the dequantized
    # one quantized again (within the format's error of the values saved: quantizing is
    # not idempotent, a block's scale moves when its largest value is not a map end)
    for checkpoint in (saved, compact):
        back = ferroptim.AdamW(_groups(model), state_dtype="8bit")
        back.load_state_dict(copy.deepcopy(checkpoint))
        for p in model.parameters():
            for key, value in opt.state[p].items():
                got = back.state[p][key]
                if checkpoint is compact or value.dtype != torch.uint8:
                    assert torch.equal(got, value), key
                    continue
                sign = _lowp.QUANTIZED_STATES[key]
                values = _lowp.unpack(value, p.detach(), sign, torch.float32)
                again = _lowp.unpack(got, p.detach(), sign, torch.float32)
                scale = values.abs().max()
                assert (again - values).abs().max() <= 0.02 * scale, key
    # and into a float32 one, dequantized; and torch's into an 8-bit one, quantized
    wide = ferroptim.AdamW(_groups(model))
    wide.load_state_dict(copy.deepcopy(compact))
    assert torch.equal(wide.state[model.matrix]["exp_avg"], want)
    assert "state_dtype" not in wide.param_groups[0]
    back = ferroptim.AdamW(_groups(model), state_dtype="8bit")
    back.load_state_dict(reference.state_dict())
    assert back.state[model.matrix]["exp_avg"].dtype == torch.uint8
    want = _lowp.pack(reference.state[model.matrix]["exp_avg"], model.matrix.detach(), signed)
    assert torch.equal(back.state[model.matrix]["exp_avg"], want)
    _set_grads(model, 99)
    back.step()
    wide.step()


def test_a_resumed_run_repeats_the_unbroken_one() -> None:
    unbroken = _train("AdamW", 10)
    model, opt = _train("AdamW", 4)
    for compact in (False, True):
        saved = copy.deepcopy(opt.state_dict(compact=compact))
        resumed_model = copy.deepcopy(model)
        resumed = _make("AdamW", resumed_model)
        resumed.load_state_dict(saved)
        for step in range(4, 10):
            _set_grads(resumed_model, step, skip="small" if step % 4 == 3 else None)
            resumed.step()
        if compact:  # the packed states come back as they were: the same bits
            _assert_same(unbroken, (resumed_model, resumed))
        else:  # dequantized and quantized again: within the format's error
            for p, q in zip(unbroken[0].parameters(), resumed_model.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-3)


@pytest.fixture(params=["rust", "torch"])
def backend(request: pytest.FixtureRequest) -> Any:
    ferroptim.set_backend("auto" if request.param == "rust" else "torch")
    yield request.param
    ferroptim.set_backend("auto")


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_master_weights_with_8bit_states(low: torch.dtype, backend: str) -> None:
    """bfloat16/float16 params with float32 masters: the masters step exactly as float32
    params with 8-bit states fed the same (upcast) gradients, on either path (torch's
    steps the masters with its float32 step between dequantizing and quantizing)."""
    wide_model = Params()
    low_model = copy.deepcopy(wide_model).to(low)
    with torch.no_grad():
        for p, q in zip(wide_model.parameters(), low_model.parameters(), strict=True):
            p.copy_(q.float())
    wide = ferroptim.AdamW(_groups(wide_model), state_dtype="8bit")
    opt = ferroptim.AdamW(_groups(low_model), state_dtype="8bit", master_weights=True)
    for step in range(15):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(wide_model.parameters(), low_model.parameters(), strict=True):
            q.grad = torch.randn(q.shape, generator=g).to(low)
            p.grad = q.grad.float()
        wide.step()
        opt.step()
    for p, q in zip(wide_model.parameters(), low_model.parameters(), strict=True):
        assert torch.equal(opt.state[q]["master_param"], p.detach())
        assert torch.equal(q, p.detach().to(low))
        assert torch.equal(opt.state[q]["exp_avg"], wide.state[p]["exp_avg"])


def test_stochastic_rounding_of_bf16_params_with_8bit_states(simd_levels: list[str]) -> None:
    """bfloat16 params rounded stochastically beside 8-bit states: the same bits for any
    thread count and SIMD level, and close to the float32 run."""
    runs = []
    for threads, level in [(1, simd_levels[-1]), (ferroptim.max_num_threads(), simd_levels[0])]:
        ferroptim.set_num_threads(threads)
        ferroptim.set_simd_level(level)
        model = Params().to(torch.bfloat16)
        opt = ferroptim.AdamW(_groups(model), state_dtype="8bit", stochastic_rounding=True, seed=3)
        for step in range(8):
            g = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            opt.step()
        runs.append((model, opt))
    _assert_same(runs[0], runs[1])
    assert runs[0][1].state[runs[0][0].matrix]["exp_avg"].dtype == torch.uint8


def test_stochastic_rounding_with_8bit_states_on_torch_path() -> None:
    """torch's path (other devices; forced here) for bfloat16 params rounded
    stochastically beside 8-bit states: float32 stand-ins, dequantized states, torch's
    float32 step, then the same rounding bits and quantization as the Rust kernel: it
    stays with the Rust step (an ulp of difference in torch's float32 arithmetic can flip
    a rounding or move a code)."""
    runs = []
    for backend in ("auto", "torch"):
        ferroptim.set_backend(backend)
        try:
            model = Params().to(torch.bfloat16)
            opt = ferroptim.AdamW(
                _groups(model), state_dtype="8bit", stochastic_rounding=True, seed=3
            )
            for step in range(10):
                g = torch.Generator().manual_seed(step)
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
                opt.step()
        finally:
            ferroptim.set_backend("auto")
        runs.append((model, opt))
    (model_a, opt_a), (model_b, opt_b) = runs
    for (pname, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert p.dtype == q.dtype == torch.bfloat16
        same = (p == q).float().mean().item()
        assert same > 0.97, f"{pname}: {same:.3f} of the params agree"
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=1e-3, msg=pname)
        for key, value in opt_a.state[p].items():
            assert value.dtype == opt_b.state[q][key].dtype, f"{pname}.{key}"
    assert opt_b.state[model_b.matrix]["exp_avg"].dtype == torch.uint8
    assert list(opt_b.state) == list(model_b.parameters())  # no stand-in left behind


@pytest.mark.parametrize("what", ["wrong size", "float", "offset view", "resized"])
def test_a_broken_packed_state_is_refused_or_relaid_before_writing(what: str) -> None:
    model, opt = _train("AdamW", 3)
    p = model.matrix
    state = opt.state[p]
    packed = state["exp_avg"]
    expected = None
    if what == "wrong size":
        state["exp_avg"] = torch.zeros(packed.numel() - 4, dtype=torch.uint8)
    elif what == "float":  # a float state of the param's shape is quantized, for good
        expected = _lowp.unpack(packed, p.detach(), True, torch.float32)
        state["exp_avg"] = expected.clone()
    elif what == "offset view":  # the same bytes at an odd offset: copied, re-laid out
        holder = torch.zeros(packed.numel() + 1, dtype=torch.uint8)
        holder[1:] = packed
        state["exp_avg"] = holder[1:]
    else:  # the storage shrunk under the tensor
        packed.untyped_storage().resize_(16)
    before = [t.detach().clone() for t in model.parameters()]
    _set_grads(model, 50)
    if what in ("wrong size", "resized"):
        with pytest.raises((RuntimeError, ValueError)):
            opt.step()
        for t, b in zip(model.parameters(), before, strict=True):
            assert torch.equal(t, b)  # nothing written
        return
    twin_model, twin = _train("AdamW", 3)
    if expected is not None:  # the twin is given the same float state
        twin.state[twin_model.matrix]["exp_avg"] = expected.clone()
    _set_grads(twin_model, 50)
    opt.step()
    twin.step()
    assert opt.state[p]["exp_avg"].dtype == torch.uint8
    assert torch.equal(p, twin_model.matrix)
    assert torch.equal(opt.state[p]["exp_avg"], twin.state[twin_model.matrix]["exp_avg"])


def test_bad_settings_raise() -> None:
    p = nn.Parameter(torch.randn(5000))
    with pytest.raises(ValueError, match="8bit"):
        ferroptim.AdamW([p], state_dtype="4bit")
    with pytest.raises(ValueError, match="seed"):
        ferroptim.AdamW([p], state_dtype="8bit", seed=1)
    with pytest.raises(TypeError, match="state_dtype"):  # full-precision factored moments
        ferroptim.Adafactor([p], state_dtype="8bit")
    with pytest.raises(ValueError, match="does not support"):
        ferroptim.LAMB([p], state_dtype="8bit")


def test_clipping_in_the_step_and_skipped_steps() -> None:
    """``max_grad_norm`` inside the 8-bit step gives the bits of ``ferroptim.clip_grad_norm_`` then
    the step; ``skip_nonfinite`` leaves params and packed states untouched on a NaN."""
    inside_model, outside_model = Params(), Params()
    inside = _make("AdamW", inside_model, max_grad_norm=1.0, skip_nonfinite=True)
    outside = _make("AdamW", outside_model)
    for step in range(6):
        _set_grads(inside_model, step)
        _set_grads(outside_model, step)
        ferroptim.clip_grad_norm_(list(outside_model.parameters()), 1.0)
        inside.step()
        outside.step()
    _assert_same((inside_model, inside), (outside_model, outside))
    before = copy.deepcopy(inside.state_dict(compact=True))
    params = [p.detach().clone() for p in inside_model.parameters()]
    _set_grads(inside_model, 7)
    with torch.no_grad():
        inside_model.vector.grad[5] = float("nan")
    inside.step()
    assert inside.skipped_steps == 1
    after = inside.state_dict(compact=True)
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), key
    for p, q in zip(inside_model.parameters(), params, strict=True):
        assert torch.equal(p, q)


def test_grad_scaler_and_scheduler_step_as_unscaled_gradients() -> None:
    """``GradScaler.step`` with 8-bit states (the unscale fused into the step) and an lr
    scheduler: the bits of the same optimizer fed the unscaled gradients (a power-of-two
    scale divides exactly); an inf in the scaled gradients skips the step and halves the
    scale, leaving params and packed states as they were."""
    scale = 2.0**12
    scaled_model, plain_model = Params(), Params()
    scaled, plain = _make("AdamW", scaled_model), _make("AdamW", plain_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    schedulers = [
        torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (scaled, plain)
    ]
    for step in range(8):
        _set_grads(plain_model, step)
        _set_grads(scaled_model, step)
        scaler.scale(torch.ones(()))  # (the scaler's scale, as a scaled loss would make it)
        with torch.no_grad():
            for p in scaled_model.parameters():
                p.grad.mul_(scale)
        scaler.step(scaled)
        scaler.update()
        plain.step()
        for scheduler in schedulers:
            scheduler.step()
    _assert_same((scaled_model, scaled), (plain_model, plain))
    assert scaled.state[scaled_model.matrix]["exp_avg"].dtype == torch.uint8

    before = copy.deepcopy(scaled.state_dict(compact=True))
    params = [p.detach().clone() for p in scaled_model.parameters()]
    _set_grads(scaled_model, 99)
    with torch.no_grad():
        scaled_model.matrix.grad[0, 0] = float("inf")
    scaler.step(scaled)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(scaled.state_dict(compact=True)["state"][index][key], value), key
    for p, q in zip(scaled_model.parameters(), params, strict=True):
        assert torch.equal(p, q)


def test_min_8bit_size_as_a_keyword_is_every_groups_default() -> None:
    """``min_8bit_size=`` (as bitsandbytes' optimizers take it) sets the groups' key; a
    group's own key wins; it is refused without 8-bit states or when not a size."""
    model = Params()
    opt = ferroptim.AdamW(
        [
            {"params": [model.matrix, model.small]},
            {"params": [model.vector], "min_8bit_size": 5000},
        ],
        state_dtype="8bit",
        min_8bit_size=0,
    )
    assert [g["min_8bit_size"] for g in opt.param_groups] == [0, 5000]
    _set_grads(model, 0, skip="transposed")
    opt.step()
    assert opt.state[model.small]["exp_avg"].dtype == torch.uint8  # 3 elements, quantized
    assert opt.state[model.vector]["exp_avg"].dtype == torch.float32  # 4099 < 5000
    assert (
        ferroptim.SGD([model.small], momentum=0.9, state_dtype="8bit").param_groups[0][
            "min_8bit_size"
        ]
        == _lowp.DEFAULT_MIN_8BIT_SIZE
    )
    with pytest.raises(ValueError, match="8-bit"):
        ferroptim.AdamW([model.small], min_8bit_size=0)
    with pytest.raises(ValueError, match=">= 0"):
        ferroptim.AdamW([model.small], state_dtype="8bit", min_8bit_size=-1)
    with pytest.raises(TypeError, match="int"):
        ferroptim.AdamW([model.small], state_dtype="8bit", min_8bit_size=1.5)
    with pytest.raises(ValueError, match="does not support"):
        ferroptim.LAMB([model.small], state_dtype="8bit", min_8bit_size=0)
