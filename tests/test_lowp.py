"""bfloat16 optimizer states (``state_dtype=torch.bfloat16``) with stochastic rounding.

* The Rust step and torch's path (``set_backend("torch")``: torch's for-loop on float32
  copies of the states, rounded back by ``ferroptim._lowp``'s torch ops) give the same
  bits, for every element-wise optimizer, over many steps: the kernel computes exactly as
  the float32 optimizer does and its random bits are the generator's.
* The rounding is unbiased and the bits do not depend on threads or SIMD level.
* Checkpoints: torch.optim loads ours, we load torch's, ``state_dtype`` may change
  between save and load, and a resumed run repeats the bits of an unbroken one.
* Bad settings raise before anything is written.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import ferroptim
import pytest
import torch
from ferroptim import _lowp
from optim_db import FAMILIES, OPTIMIZERS
from torch import nn

BF16 = torch.bfloat16
#: Every optimizer that keeps its states in ``state_dtype`` (the element-wise kernels).
NARROW = tuple(
    name
    for name in OPTIMIZERS
    if FAMILIES[name].rust and FAMILIES[name].ferro._ferro_spec.keeps_state_dtype
)


class Params(nn.Module):
    """float32 params wider than any SIMD width with ragged tails, one transposed (dense
    but not contiguous: the kernel walks it in memory order)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.matrix = nn.Parameter(torch.randn(37, 129, generator=g))
        self.vector = nn.Parameter(torch.randn(4099, generator=g))
        self.small = nn.Parameter(torch.randn(3, generator=g))
        self.transposed = nn.Parameter(torch.randn(70, 33, generator=g).t())


def _set_grads(model: nn.Module, step: int, *, skip: str | None = None) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for name, p in model.named_parameters():
        p.grad = None if name == skip else torch.randn(p.shape, generator=g)


def _kwargs(name: str, **extra: Any) -> dict[str, Any]:
    family = FAMILIES[name]
    kwargs = {**family.train_kwargs, "state_dtype": BF16, "seed": 1234, **extra}
    if "foreach" in inspect.signature(family.ferro).parameters:
        kwargs["foreach"] = False  # torch's path: its for-loop, the reference
    return kwargs


def _train(name: str, steps: int, **extra: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Params()
    opt = FAMILIES[name].ferro(
        [
            {"params": [model.matrix, model.transposed]},
            {"params": [model.vector, model.small], "lr": 1e-3},
        ],
        **_kwargs(name, **extra),
    )
    for step in range(steps):
        _set_grads(model, step, skip="small" if step % 4 == 3 else None)
        opt.step()
    return model, opt


def _assert_same(a: tuple[nn.Module, Any], b: tuple[nn.Module, Any]) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: max diff {(p - q).abs().max()}"
        state_a, state_b = opt_a.state[p], opt_b.state[q]
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            other = state_b[key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype, f"{name}.{key}"
                assert torch.equal(value, other), f"{name}.{key}"


def _make(name: str, model: nn.Module, **extra: Any) -> torch.optim.Optimizer:
    return FAMILIES[name].ferro(
        [
            {"params": [model.matrix, model.transposed]},
            {"params": [model.vector, model.small], "lr": 1e-3},
        ],
        **_kwargs(name, **extra),
    )


@pytest.mark.parametrize("name", NARROW)
def test_each_step_is_the_float32_step_rounded_stochastically(name: str) -> None:
    """Every step from the same values: the bf16-state step's params equal the float32
    kernel's bit for bit, and its states are the float32 kernel's states rounded with
    the generator's bits (computed here with torch ops, independently of the kernel)."""
    narrow_model, wide_model = Params(), Params()
    narrow = _make(name, narrow_model)
    wide = _make(name, wide_model, state_dtype=None, seed=None)
    keys = FAMILIES[name].ferro._ferro_spec.state_keys
    streams = {0: [narrow_model.matrix, narrow_model.transposed], 1: [narrow_model.vector]}
    streams[1].append(narrow_model.small)
    for step in range(25):
        skip = "small" if step % 4 == 3 else None
        _set_grads(narrow_model, step, skip=skip)
        _set_grads(wide_model, step, skip=skip)
        narrow.step()
        wide.step()
        for index, group in enumerate(narrow.param_groups):
            key = _lowp.step_key(1234, index, step)
            for stream, (p, q) in enumerate(
                zip(group["params"], wide.param_groups[index]["params"], strict=True)
            ):
                if step > 0 and p.grad is not None:
                    assert torch.equal(p, q), f"step {step}: param {index}.{stream}"
                for k, state_key in enumerate(keys(group)):
                    if state_key not in narrow.state[p] or p.grad is None:
                        continue
                    got = narrow.state[p][state_key]
                    assert got.dtype == BF16
                    if step > 0:
                        bits = _lowp.random_bits(_lowp.stream_index(p.detach()), key, stream, k)
                        want = _lowp.stochastic_round(wide.state[q][state_key], BF16, bits)
                        assert torch.equal(got, want), f"step {step}: {state_key} {index}.{stream}"
                    # the next step starts from the same values
                    wide.state[q][state_key].copy_(got)
                with torch.no_grad():
                    q.copy_(p)
    assert streams  # (the params above are walked in group order: their streams)


@pytest.mark.parametrize("name", NARROW)
def test_torch_path_keeps_to_the_rust_path(name: str) -> None:
    """torch's path (other devices, the backend forced to torch) steps float32 copies of
    the states with torch's for-loop and rounds them back with the same bits: it stays
    with the Rust step (torch's float32 for-loop differs from the correctly rounded
    kernel by an ulp here and there, which can flip a rounding)."""
    rust = _train(name, 30)
    ferroptim.set_backend("torch")
    torch_path = _train(name, 30)
    ferroptim.set_backend("auto")
    (model_a, opt_a), (model_b, opt_b) = rust, torch_path
    for (pname, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=1e-5, msg=pname)
        for key, value in opt_a.state[p].items():
            other = opt_b.state[q][key]
            assert value.dtype == other.dtype, f"{pname}.{key}"
            if value.dtype == BF16:
                same = (value == other).float().mean().item()
                assert same > 0.9, f"{pname}.{key}: {same:.3f} of the elements agree"


def test_first_momentum_buffer_is_the_rounded_gradient() -> None:
    """SGD's momentum buffer starts as the gradient: stored, it is the gradient rounded
    with the generator's bits for (seed, group 0, step 0, the param's stream, buffer 0),
    computed here independently of the kernel."""
    model = Params()
    opt = ferroptim.SGD(model.parameters(), lr=0.1, momentum=0.9, state_dtype=BF16, seed=7)
    _set_grads(model, 0)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    key = _lowp.step_key(7, 0, 0)
    for stream, (p, g) in enumerate(zip(model.parameters(), grads, strict=True)):
        bits = _lowp.random_bits(_lowp.stream_index(p.detach()), key, stream, 0)
        want = _lowp.stochastic_round(g, BF16, bits)
        got = opt.state[p]["momentum_buffer"]
        assert got.dtype == BF16
        assert torch.equal(got, want)
        assert not torch.equal(got, g.to(BF16))  # not round to nearest
    assert opt.param_groups[0]["rounding_step"] == 1


def test_rounding_is_unbiased() -> None:
    """1 + 2^-9 lies a quarter of the way from 1 to the next bfloat16: a quarter of the
    elements round up, and the mean is the value."""
    value = 1.0 + 2.0**-9
    p = nn.Parameter(torch.zeros(1 << 18))
    opt = ferroptim.SGD([p], lr=0.0, momentum=0.5, state_dtype=BF16, seed=3)
    p.grad = torch.full_like(p, value)
    opt.step()
    buffer = opt.state[p]["momentum_buffer"].float()
    up = (buffer > 1.0).float().mean().item()
    assert set(buffer.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(up - 0.25) < 0.005
    assert abs(buffer.double().mean().item() - value) < 2e-5


def test_small_updates_are_not_rounded_away() -> None:
    """RMSprop's square average with alpha=0.999 moves by 0.1% a step: round to nearest
    in bfloat16 (8 bits) would never move it; stochastic rounding tracks the float32 run."""
    torch.manual_seed(0)
    wide = nn.Parameter(torch.randn(20000))
    narrow = nn.Parameter(wide.detach().clone())
    opt_wide = ferroptim.RMSprop([wide], lr=1e-4, alpha=0.999)
    opt_narrow = ferroptim.RMSprop([narrow], lr=1e-4, alpha=0.999, state_dtype=BF16)
    for step in range(300):
        g = torch.randn(20000, generator=torch.Generator().manual_seed(step)) * (
            2.0 if step >= 100 else 1.0
        )
        wide.grad, narrow.grad = g, g.clone()
        opt_wide.step()
        opt_narrow.step()
    want = opt_wide.state[wide]["square_avg"].double().mean()
    got = opt_narrow.state[narrow]["square_avg"].double().mean()
    assert abs(got / want - 1) < 0.01, (got, want)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_threads_and_simd_levels_give_the_same_bits(name: str, simd_levels: list[str]) -> None:
    if name not in FAMILIES:
        pytest.skip(f"{name} is not registered")
    runs = []
    for threads, level in [(1, simd_levels[-1]), (ferroptim.max_num_threads(), simd_levels[0])]:
        ferroptim.set_num_threads(threads)
        ferroptim.set_simd_level(level)
        runs.append(_train(name, 12))
    _assert_same(runs[0], runs[1])


def test_bf16_params_give_the_same_bits_on_any_threads_and_simd_level(
    simd_levels: list[str],
) -> None:
    runs = []
    for threads, level in [(1, simd_levels[-1]), (ferroptim.max_num_threads(), simd_levels[0])]:
        ferroptim.set_num_threads(threads)
        ferroptim.set_simd_level(level)
        for kwargs in ({"stochastic_rounding": True}, {"master_weights": True}):
            model = _bf16_model()
            opt = _make(
                "AdamW",
                model,
                state_dtype=None,
                seed=5 if kwargs.get("stochastic_rounding") else None,
                **kwargs,
            )
            g = torch.Generator().manual_seed(3)
            for _ in range(6):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=g).to(BF16)
                opt.step()
            runs.append((model, opt))
    _assert_same(runs[0], runs[2])
    _assert_same(runs[1], runs[3])


def test_state_is_half_the_bytes() -> None:
    model = Params()
    opt = ferroptim.AdamW(model.parameters(), state_dtype=BF16)
    _set_grads(model, 0)
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for k, t in s.items()
        if k != "step"
    )
    assert state_bytes == 2 * 2 * numel


def test_torch_optim_loads_our_checkpoint_and_we_load_its() -> None:
    model, opt = _train("AdamW", 5)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["exp_avg"].dtype == BF16
    assert saved["param_groups"][0]["state_dtype"] == BF16
    reference = torch.optim.AdamW(
        [{"params": [model.matrix, model.transposed]}, {"params": [model.vector, model.small]}]
    )
    reference.load_state_dict(saved)
    state = reference.state[model.matrix]
    assert state["exp_avg"].dtype == torch.float32  # torch casts to the param's dtype
    assert torch.equal(state["exp_avg"], saved["state"][0]["exp_avg"].float())

    # torch's float32 checkpoint into a bf16-state ferroptim optimizer: rounded down
    back = ferroptim.AdamW(
        [{"params": [model.matrix, model.transposed]}, {"params": [model.vector, model.small]}],
        state_dtype=BF16,
    )
    back.load_state_dict(reference.state_dict())
    assert back.state[model.matrix]["exp_avg"].dtype == BF16
    assert back.param_groups[0]["state_dtype"] == BF16
    _set_grads(model, 99)
    back.step()  # and it steps


def test_state_dtype_may_change_between_save_and_load() -> None:
    model, opt = _train("AdamW", 5)
    saved = copy.deepcopy(opt.state_dict())
    groups = [{"params": [model.matrix, model.transposed]}, {"params": [model.vector, model.small]}]
    wide = ferroptim.AdamW(groups)
    wide.load_state_dict(saved)
    assert "state_dtype" not in wide.param_groups[0]
    assert wide.state[model.vector]["exp_avg"].dtype == torch.float32
    assert torch.equal(
        wide.state[model.vector]["exp_avg"], opt.state[model.vector]["exp_avg"].float()
    )
    _set_grads(model, 99)
    wide.step()
    assert wide.state[model.vector]["exp_avg"].dtype == torch.float32


def test_a_resumed_run_repeats_the_unbroken_one() -> None:
    model, opt = _train("AdamW", 6)
    resumed_model = copy.deepcopy(model)
    resumed = ferroptim.AdamW(
        [
            {"params": [resumed_model.matrix, resumed_model.transposed]},
            {"params": [resumed_model.vector, resumed_model.small], "lr": 1e-3},
        ],
        state_dtype=BF16,
        seed=99,  # the checkpoint's seed wins over this one
    )
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(6, 12):
        for m in (model, resumed_model):
            _set_grads(m, step)
        opt.step()
        resumed.step()
    _assert_same((model, opt), (resumed_model, resumed))


def test_seeds() -> None:
    torch.manual_seed(5)
    a = _train("AdamW", 3, seed=None)
    torch.manual_seed(5)
    b = _train("AdamW", 3, seed=None)
    _assert_same(a, b)  # the default seed is torch.initial_seed(): nothing drawn
    assert a[1].param_groups[0]["seed"] == 5
    c = _train("AdamW", 3, seed=6)
    assert not torch.equal(a[1].state[a[0].vector]["exp_avg"], c[1].state[c[0].vector]["exp_avg"])


def test_moving_average_with_narrow_states() -> None:
    """``ema_decay`` beside ``state_dtype``: the average (float32, like its param) is
    what AveragedModel keeps."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = Params()
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = ferroptim.AdamW(model.parameters(), state_dtype=BF16, ema_decay=0.9)
    for step in range(8):
        _set_grads(model, step)
        opt.step()
        averaged.update_parameters(model)
    for p, want in zip(model.parameters(), averaged.module.parameters(), strict=True):
        assert torch.equal(opt.state[p]["ema"], want)


def test_bad_settings_raise_before_anything_is_written() -> None:
    p = nn.Parameter(torch.ones(10))
    with pytest.raises(ValueError, match="state_dtype"):
        ferroptim.AdamW([p], state_dtype=torch.float16)
    with pytest.raises(ValueError, match="seed"):
        ferroptim.AdamW([p], seed=3)
    with pytest.raises(TypeError, match="seed"):
        ferroptim.AdamW([p], state_dtype=BF16, seed=1.5)
    with pytest.raises(ValueError, match="does not support state_dtype"):
        ferroptim.LAMB([p], state_dtype=BF16)  # two passes: not an element-wise kernel
    wide = nn.Parameter(torch.ones(10, dtype=torch.float64))
    narrow = nn.Parameter(torch.ones(10))
    opt = ferroptim.AdamW([narrow, wide], state_dtype=BF16)
    narrow.grad, wide.grad = torch.ones(10), torch.ones(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 parameters"):
        opt.step()
    assert torch.equal(narrow, torch.ones(10)) and torch.equal(wide, torch.ones(10))


def test_training_quality_matches_float32() -> None:
    """A small regression trained with bf16 states ends within 1% of float32's loss."""
    losses = {}
    for state_dtype in (None, BF16):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
        opt = ferroptim.AdamW(net.parameters(), lr=3e-3, state_dtype=state_dtype)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(512, 16, generator=g)
        y = (x[:, :1] * x[:, 1:2]).sin() + 0.1 * x[:, 2:3]
        for _ in range(300):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
        losses[state_dtype] = loss.item()
    assert losses[None] < 0.05
    assert abs(losses[BF16] / losses[None] - 1) < 0.05, losses


# -- bfloat16 params: float32 master copies and stochastic rounding -----------------------


def _bf16_model(dtype: torch.dtype = BF16) -> nn.Module:
    return Params().to(dtype)


def _wide_twin(model: nn.Module) -> nn.Module:
    twin = Params()
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            q.copy_(p.float())
    return twin


def _set_pair_grads(narrow: nn.Module, wide: nn.Module, step: int, skip: str | None) -> None:
    _set_grads(wide, step, skip=skip)
    for (name, p), q in zip(narrow.named_parameters(), wide.parameters(), strict=True):
        p.grad = None if name == skip else q.grad.to(p.dtype)
        if p.grad is not None:
            q.grad = p.grad.float()  # the float32 run reads the same (upcast) gradient


LOW = [pytest.param(BF16, id="bf16"), pytest.param(torch.float16, id="f16")]


@pytest.fixture(params=["rust", "torch"])
def backend(request: pytest.FixtureRequest) -> Any:
    """Both paths: the Rust kernels, and torch's (other devices; forced here), which
    steps float32 stand-ins of the low-precision params with torch's float32 step."""
    ferroptim.set_backend("auto" if request.param == "rust" else "torch")
    yield request.param
    ferroptim.set_backend("auto")


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("state_dtype", [None, BF16], ids=["f32-states", "bf16-states"])
@pytest.mark.parametrize("name", NARROW)
def test_master_weights_follow_the_float32_optimizer_exactly(
    name: str, state_dtype: Any, low: torch.dtype, backend: str
) -> None:
    """A bfloat16 or float16 model with ``master_weights=True``: each param's float32
    master copy is the float32 optimizer's param fed the same (upcast) gradients, bit for
    bit, every step (on either path: the float32 run takes the same one); the param is
    its master rounded to nearest; the states are the float32 run's."""
    narrow_model = _bf16_model(low)
    wide_model = _wide_twin(narrow_model)
    extra = {"seed": 1234} if state_dtype is not None else {"seed": None}
    narrow = _make(name, narrow_model, state_dtype=state_dtype, master_weights=True, **extra)
    wide = _make(name, wide_model, state_dtype=state_dtype, **extra)
    for step in range(25):
        _set_pair_grads(narrow_model, wide_model, step, "small" if step % 4 == 3 else None)
        narrow.step()
        wide.step()
        pairs = zip(narrow_model.named_parameters(), wide_model.parameters(), strict=True)
        for (pname, p), q in pairs:
            master = narrow.state[p]["master_param"]
            assert master.dtype == torch.float32
            assert torch.equal(master, q), f"step {step}: {pname}"
            assert torch.equal(p, q.to(low)), f"step {step}: {pname}"
            for key, value in wide.state[q].items():
                assert torch.equal(narrow.state[p][key], value), f"step {step}: {pname}.{key}"


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("name", NARROW)
def test_stochastic_rounding_of_low_precision_params(
    name: str, low: torch.dtype, backend: str
) -> None:
    """A bfloat16 or float16 model with ``stochastic_rounding=True``: each step computes
    in float32 exactly as the float32 optimizer from the same (upcast) values (on either
    path: the float32 run takes the same one), and stores the param and its states (in
    the param's dtype) rounded with the generator's bits."""
    narrow_model = _bf16_model(low)
    wide_model = _wide_twin(narrow_model)
    narrow = _make(name, narrow_model, state_dtype=None, stochastic_rounding=True, seed=77)
    wide = _make(name, wide_model, state_dtype=None, seed=None)
    keys = FAMILIES[name].ferro._ferro_spec.state_keys
    for step in range(20):
        skip = "small" if step % 4 == 3 else None
        _set_pair_grads(narrow_model, wide_model, step, skip)
        narrow.step()
        wide.step()
        for index, group in enumerate(narrow.param_groups):
            key = _lowp.step_key(77, index, step)
            pairs = zip(group["params"], wide.param_groups[index]["params"], strict=True)
            for stream, (p, q) in enumerate(pairs):
                if p.grad is None:
                    continue
                where = _lowp.stream_index(p.detach())
                if step > 0:
                    bits = _lowp.random_bits(where, key, stream, _lowp.PARAM_STREAM)
                    want = _lowp.stochastic_round(q.detach(), low, bits)
                    assert torch.equal(p, want), f"step {step}: param {index}.{stream}"
                for k, state_key in enumerate(keys(group)):
                    if state_key not in narrow.state[p]:
                        continue
                    got = narrow.state[p][state_key]
                    assert got.dtype == low
                    if step > 0:
                        bits = _lowp.random_bits(where, key, stream, k)
                        want = _lowp.stochastic_round(wide.state[q][state_key], low, bits)
                        assert torch.equal(got, want), f"step {step}: {state_key}"
                    wide.state[q][state_key].copy_(got)  # the next step starts alike
                with torch.no_grad():
                    q.copy_(p)


def test_stochastic_rounding_keeps_small_updates() -> None:
    """An update of a quarter of a bfloat16 ulp: round to nearest (torch's bfloat16 SGD)
    never moves the params; stochastic rounding moves a quarter of them a whole ulp,
    the float32 trajectory on average; a master copy keeps it exactly."""
    start = torch.full((1 << 16,), 1.0, dtype=BF16)
    grad = torch.full_like(start, 2.0**-9)  # lr 1: a quarter of the ulp at 1.0 (2^-7)
    runs = {}
    for label, kwargs in {
        "torch": {},
        "rounding": {"stochastic_rounding": True, "seed": 1},
        "master": {"master_weights": True},
    }.items():
        p = nn.Parameter(start.clone())
        opt = (
            torch.optim.SGD([p], lr=1.0, foreach=False)
            if label == "torch"
            else ferroptim.SGD([p], lr=1.0, **kwargs)
        )
        p.grad = -grad
        opt.step()
        runs[label] = (p.detach().float(), opt)
    assert torch.equal(runs["torch"][0], start.float())
    moved = (runs["rounding"][0] > 1.0).float().mean().item()
    assert abs(moved - 0.25) < 0.01
    master = runs["master"][1].state[next(iter(runs["master"][1].state))]["master_param"]
    assert torch.equal(master, torch.full_like(master, 1.0 + 2.0**-9))


def test_master_copies_survive_checkpoints() -> None:
    narrow_model = _bf16_model()
    opt = ferroptim.AdamW(narrow_model.parameters(), master_weights=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p in narrow_model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(BF16)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["master_param"].dtype == torch.float32
    assert saved["state"][0]["exp_avg"].dtype == torch.float32
    again = ferroptim.AdamW(narrow_model.parameters(), master_weights=True)
    again.load_state_dict(saved)  # (torch's own loading would round them to bfloat16)
    for p in narrow_model.parameters():
        for key in ("master_param", "exp_avg", "exp_avg_sq"):
            assert again.state[p][key].dtype == torch.float32
            assert torch.equal(again.state[p][key], opt.state[p][key])
    reference = torch.optim.AdamW(narrow_model.parameters())
    reference.load_state_dict(saved)  # torch.optim takes it (and ignores the master)
    plain = ferroptim.AdamW(narrow_model.parameters())  # no master: the copy is dropped
    plain.load_state_dict(saved)
    assert "master_param" not in plain.state[narrow_model.vector]


def test_bf16_param_settings_are_checked() -> None:
    p = nn.Parameter(torch.ones(10, dtype=BF16))
    with pytest.raises(ValueError, match="choose one"):
        ferroptim.AdamW([p], stochastic_rounding=True, master_weights=True)
    with pytest.raises(ValueError, match="does not support"):
        ferroptim.LAMB([p], master_weights=True)
    # not through autograd: a differentiable step would be torch's bfloat16 for-loop
    opt = ferroptim.AdamW([p], master_weights=True, differentiable=True)
    p.grad = torch.ones(10, dtype=BF16)
    with pytest.raises(ValueError, match="differentiable=True"):
        opt.step()
    assert torch.equal(p, torch.ones(10, dtype=BF16)) and not opt.state


@pytest.mark.parametrize("setting", ["master_weights", "stochastic_rounding"])
def test_torch_path_refuses_a_mismatched_grad_before_anything(setting: str) -> None:
    """A float32 grad slipped behind torch's checks (``p.grad.data = ...``) onto a
    bfloat16 param: torch's path raises before it makes state or writes the param; with
    a proper grad it steps, and no stand-in is left in the state."""
    p = nn.Parameter(torch.ones(10, dtype=BF16))
    opt = ferroptim.AdamW([p], lr=0.1, **{setting: True})
    p.grad = torch.ones(10, dtype=BF16)
    p.grad.data = torch.ones(10)
    ferroptim.set_backend("torch")
    try:
        with pytest.raises(RuntimeError, match="does not match"):
            opt.step()
        assert torch.equal(p, torch.ones(10, dtype=BF16)) and not opt.state
        p.grad = torch.ones(10, dtype=BF16)
        opt.step()
    finally:
        ferroptim.set_backend("auto")
    assert list(opt.state) == [p]
    assert not torch.equal(p, torch.ones(10, dtype=BF16))
    if setting == "master_weights":
        assert opt.state[p]["master_param"].dtype == torch.float32
        assert opt.state[p]["master_param"].grad is None
    else:
        assert opt.state[p]["exp_avg"].dtype == BF16
