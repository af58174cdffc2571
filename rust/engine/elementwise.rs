//! The one trait every element-wise optimizer implements, and the driver that
//! runs it: per-tensor scalar state, per-step constants, gradient
//! preparation, the loops, and the (storage format × SIMD level) dispatch.
//!
//! A kernel file holds its hyperparameter record ([`Elementwise::Hyper`],
//! read by name), its per-step constants ([`Elementwise::consts`], float64
//! rounded where torch rounds) and its per-element update
//! ([`Elementwise::update`]). Everything else is here, once:
//!
//! * step counters (`step += 1` in the counter's dtype) and any other scalar
//!   state ([`Elementwise::advance`], e.g. NAdam's `mu_product`);
//! * gradient preparation, in torch's order: GradScaler's unscale and the
//!   clip coefficient (`grad * inv_scale * clip_coef`, each rounded), then
//!   `maximize` (negation), then L2 decay (`grad + weight_decay * param`,
//!   one fused multiply-add, as torch's `grad.add(param, alpha=wd)`);
//!   `maximize` is folded into the unscale factor (`grad * -inv_scale`: negation
//!   commutes exactly with round-to-nearest products), so it costs no flag bit and
//!   no second copy of each loop;
//! * flags as compile-time specialisations: a kernel maps its hyperparameters
//!   to a bit set ([`Elementwise::flags`]) and lists the bit sets it compiles
//!   with [`flag_match!`]; the update is monomorphised per bit set;
//! * loads and stores in each buffer's format, computing in float32 (float32,
//!   bfloat16, float16 storage) or float64.

use super::buffers::{EngineError, ScalarSlot, MAX_SCALARS, MAX_STATES};
use super::format::Q8_BLOCK;
use super::format::{Format, Real, Storage};
use super::group::{BlockState, ChunkSlices, Group, QuantizedSlices, Slices};
use super::hyper::HyperRecord;
use super::random;
use crate::simd::{dispatch, SimdLevel, SimdTask};

/// Flag bit owned by the engine: L2 weight decay added to the gradient.
pub const L2: u32 = 1 << 1;
/// The first bit a kernel may use for its own flags.
pub const FIRST_KERNEL_FLAG: u32 = 1 << 2;

/// Whether `flags` has `bit` (for `const` flag sets inside `update`).
#[inline(always)]
pub const fn has(flags: u32, bit: u32) -> bool {
    flags & bit != 0
}

/// The engine's part of the gradient preparation, read from the kernel's
/// hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradPrep {
    pub maximize: bool,
    /// L2 decay (`grad + l2 * param`); 0: off.
    pub l2: f64,
}

impl GradPrep {
    pub fn flags(self) -> u32 {
        if self.l2 != 0.0 {
            L2
        } else {
            0
        }
    }

    /// torch's `weight_decay` with a `decoupled_weight_decay` switch (Adam, NAdam,
    /// RAdam): L2 decay of the gradient, which the engine applies, unless decoupled
    /// (see [`decays_param`]: the kernel's own flag then).
    pub fn with_weight_decay(maximize: bool, weight_decay: f64, decoupled: bool) -> GradPrep {
        GradPrep {
            maximize,
            l2: if decoupled { 0.0 } else { weight_decay },
        }
    }
}

/// Whether a kernel with a `decoupled_weight_decay` switch decays the param itself
/// (`param *= 1 - lr * weight_decay`) this step.
pub fn decays_param(decoupled: bool, weight_decay: f64) -> bool {
    decoupled && weight_decay != 0.0
}

/// How a step reads its gradients and whether lazily created state is new.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepContext {
    /// GradScaler's inverse scale (1.0: off).
    pub unscale: f64,
    /// The clip coefficient of `max_grad_norm` (1.0: off).
    pub clip: f64,
    /// The plan's lazily created state buffers are new: kernels that create
    /// state on the first step (SGD's momentum buffer) write, not read, them.
    pub fresh: bool,
    /// The weight `1 - ema_decay` of the parameters' exponential moving
    /// average, kept in each tensor's last state buffer (after the kernel's),
    /// updated right after the step as `torch.lerp(ema, param, weight)`;
    /// `None`: no average.
    pub ema: Option<f64>,
    /// The group's per-step key of stochastic rounding: narrow (bfloat16,
    /// float16) stores round stochastically with random bits drawn from
    /// (key, tensor stream, buffer, element index); `None`: round to nearest.
    pub stochastic: Option<u64>,
}

impl Default for StepContext {
    fn default() -> Self {
        StepContext {
            unscale: 1.0,
            clip: 1.0,
            fresh: false,
            ema: None,
            stochastic: None,
        }
    }
}

/// When a kernel's [`Elementwise::advance`] updates its scalar state, relative to
/// the values [`Elementwise::consts`] sees (the step counter is always
/// incremented first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advance {
    /// The update uses the advanced values (NAdam's `mu_product *= mu` comes first).
    BeforeConsts,
    /// The update uses the values from before this step; `advance` runs after they
    /// were read (ASGD's `eta` and `mu` are recomputed at the end of its step).
    AfterConsts,
}

/// An element-wise optimizer (see the module docs).
pub trait Elementwise: Sized + Send + Sync + 'static {
    /// Its name in the registry (what Python asks for).
    const NAME: &'static str;
    /// Per-tensor scalar state, in slot order, under torch's state-dict keys.
    /// `"step"` first means the engine increments it before every step.
    const SCALARS: &'static [&'static str];

    type Hyper: HyperRecord;
    /// Per-step constants, in the tensor's compute type.
    type Consts<C: Real>: Copy + Send + Sync;

    /// State buffers, in kernel order, under torch's state-dict keys.
    fn state_keys(h: &Self::Hyper) -> &'static [&'static str];

    /// The engine's gradient preparation for these hyperparameters.
    fn grad_prep(h: &Self::Hyper) -> GradPrep;

    /// The flag set to compile for: `grad_prep(h).flags()` plus the kernel's
    /// own bits (from [`FIRST_KERNEL_FLAG`] up).
    fn flags(h: &Self::Hyper, ctx: &StepContext) -> u32;

    /// Runs `runner` with `flags` as a constant: implemented with
    /// [`flag_match!`] over every flag set the kernel supports.
    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output;

    /// Number of state buffers under `flags` (must equal `state_keys`' length;
    /// a constant once `flags` is).
    fn num_states(flags: u32) -> usize;

    /// Whether the update reads state buffer `k` under `flags` (false for a
    /// buffer written before it is ever read, like a new momentum buffer).
    #[inline(always)]
    fn reads_state(flags: u32, k: usize) -> bool {
        let _ = (flags, k);
        true
    }

    /// Whether `advance` runs before or after the scalar state is read for `consts`.
    const ADVANCE: Advance = Advance::BeforeConsts;

    /// Updates the tensor's scalar state (after the step counter, if any, was
    /// incremented), in place in each slot's dtype.
    fn advance(h: &Self::Hyper, scalars: &[ScalarSlot]) {
        let _ = (h, scalars);
    }

    /// The constants of one tensor's update from its scalar state (as read
    /// after `advance`, or before it under [`Advance::AfterConsts`]), computed
    /// in float64 as torch's Python does and rounded to `C` where torch rounds.
    fn consts<C: Real>(h: &Self::Hyper, scalars: &[f64]) -> Self::Consts<C>;

    /// Whether the kernel has [`Elementwise::update_rounded`]: torch's for-loop on
    /// bfloat16/float16 params in Rust.
    const ROUNDED: bool = false;

    /// One element of torch's for-loop on a bfloat16 or float16 param (and states
    /// in its dtype): each tensor op computed in float32 as torch's CPU kernel
    /// computes it and its result rounded to the param's dtype (`round`), where
    /// the float32 [`Elementwise::update`] rounds once at the end. Scalars enter
    /// each op as torch converts them: a multiplier (`mul_`, `lerp_`'s weight,
    /// `addcmul_`'s and `addcdiv_`'s `value`, a divisor) in float32, an `add`'s
    /// `alpha` and an added scalar (`add_(eps)`) in the param's dtype (`round`ed:
    /// a bfloat16 `x.add(1e-6)` adds bfloat16's nearest value to 1e-6, measured
    /// against torch). `grad` arrives prepared the same way
    /// ([`PrepConsts::apply_rounded`]). Only called where [`Elementwise::ROUNDED`].
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &Self::Consts<C>,
        param: &mut C,
        grad: C,
        states: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let _ = (k, param, grad, states, round);
        unreachable!("{} has no rounded update", Self::NAME)
    }

    /// One element: `grad` prepared, `param` and `states` updated in place.
    fn update<C: Real, const FLAGS: u32>(
        k: &Self::Consts<C>,
        param: &mut C,
        grad: C,
        states: &mut [C; MAX_STATES],
    );
}

/// Something run with a flag set as a constant.
pub trait FlagRunner {
    type Output;
    fn run<const FLAGS: u32>(self) -> Self::Output;
}

/// Matches a run-time flag set against the listed constants and calls
/// `$runner.run::<F>()` for the one that matches; any other set panics (a
/// kernel must list every set its `flags` can return).
#[macro_export]
macro_rules! flag_match {
    ($flags:expr, $runner:expr, [$($value:expr),+ $(,)?]) => {{
        let flags: u32 = $flags;
        $(
            if flags == $value {
                const F: u32 = $value;
                return $runner.run::<F>();
            }
        )+
        panic!("flag set {flags:#b} is not compiled for this kernel")
    }};
}

/// The engine's per-tensor constants of gradient preparation.
#[derive(Clone, Copy, Debug)]
pub struct PrepConsts<C> {
    unscale: C,
    clip: C,
    l2: C,
}

impl<C: Real> PrepConsts<C> {
    pub fn new(prep: &GradPrep, ctx: &StepContext) -> Self {
        PrepConsts {
            // maximize: -(g * u) == g * (-u) exactly (round-to-nearest is symmetric)
            unscale: C::from_f64(if prep.maximize {
                -ctx.unscale
            } else {
                ctx.unscale
            }),
            clip: C::from_f64(ctx.clip),
            l2: C::from_f64(prep.l2),
        }
    }

    /// The gradient as torch's for-loop on a bfloat16/float16 param sees it: GradScaler's
    /// unscale and the clip coefficient each multiplied in and rounded (as their
    /// in-place `mul_` on the grads rounds), maximize, then L2 decay
    /// (`grad.add(param, alpha=weight_decay)`: `alpha` in the param's dtype).
    #[inline(always)]
    pub fn apply_rounded<const FLAGS: u32>(
        &self,
        grad: C,
        param: C,
        round: impl Fn(C) -> C + Copy,
    ) -> C {
        let g = round(round(grad * self.unscale) * self.clip);
        if has(FLAGS, L2) {
            round(param.mul_add(round(self.l2), g))
        } else {
            g
        }
    }

    /// The gradient as the kernel sees it.
    #[inline(always)]
    pub fn apply<const FLAGS: u32>(&self, grad: C, param: C) -> C {
        let g = grad * self.unscale * self.clip;
        if has(FLAGS, L2) {
            param.mul_add(self.l2, g)
        } else {
            g
        }
    }
}

/// Per-tensor constants, computed once per distinct scalar state (tensors of
/// a group usually share one step count, and the `pow` calls behind bias
/// corrections are not free at a thousand tensors per step).
fn per_tensor<K: Elementwise, C: Real>(
    h: &K::Hyper,
    scalars: &[[f64; MAX_SCALARS]],
    wanted: bool,
) -> Vec<K::Consts<C>> {
    if !wanted {
        return Vec::new();
    }
    let mut out: Vec<K::Consts<C>> = Vec::with_capacity(scalars.len());
    let mut previous: Option<(&[f64; MAX_SCALARS], K::Consts<C>)> = None;
    for values in scalars {
        let consts = match previous {
            Some((seen, consts)) if seen == values => consts,
            _ => K::consts(h, &values[..K::SCALARS.len()]),
        };
        previous = Some((values, consts));
        out.push(consts);
    }
    out
}

/// Steps a whole group with kernel `K`: scalar state first (every tensor),
/// then every element, chunk by chunk, on the pool.
///
/// Errors (before anything is written) when the buffers do not carry what the
/// kernel needs or their formats are a combination no loop is compiled for.
pub fn step<K: Elementwise>(
    group: &Group<'_>,
    h: &K::Hyper,
    ctx: &StepContext,
    level: SimdLevel,
) -> Result<(), EngineError> {
    let flags = K::flags(h, ctx);
    let keys = K::state_keys(h);
    if K::num_states(flags) != keys.len() {
        return Err(EngineError::Mismatch {
            what: format!("{}: flag set and state keys disagree", K::NAME),
        });
    }
    let num_buffers = keys.len() + usize::from(ctx.ema.is_some());
    for (index, t) in group.tensors().iter().enumerate() {
        check_tensor::<K>(index, t, num_buffers, ctx)?;
    }
    let mut scalars = vec![[0.0; MAX_SCALARS]; group.len()];
    for (t, values) in group.tensors().iter().zip(scalars.iter_mut()) {
        let slots = t.scalars();
        if K::SCALARS.first() == Some(&"step") {
            slots[0].set(slots[0].get() + 1.0);
        }
        if K::ADVANCE == Advance::BeforeConsts {
            K::advance(h, slots);
        }
        for (value, slot) in values.iter_mut().zip(slots) {
            *value = slot.get();
        }
        if K::ADVANCE == Advance::AfterConsts {
            K::advance(h, slots);
        }
    }
    let prep = K::grad_prep(h);
    let has_f32 = group
        .tensors()
        .iter()
        .any(|t| t.compute() == super::Compute::F32);
    let has_f64 = group
        .tensors()
        .iter()
        .any(|t| t.compute() == super::Compute::F64);
    let runner = Runner::<K> {
        group,
        level,
        consts32: per_tensor::<K, f32>(h, &scalars, has_f32),
        consts64: per_tensor::<K, f64>(h, &scalars, has_f64),
        prep32: PrepConsts::new(&prep, ctx),
        prep64: PrepConsts::new(&prep, ctx),
        ema: ctx.ema.map(Lerp::new),
        stochastic: ctx.stochastic,
    };
    K::dispatch_flags(flags, runner);
    Ok(())
}

/// Refuses a tensor whose buffers the kernel cannot step.
fn check_tensor<K: Elementwise>(
    index: usize,
    t: &super::TensorBuffers,
    num_states: usize,
    ctx: &StepContext,
) -> Result<(), EngineError> {
    let ema = ctx.ema.is_some();
    let mismatch = |what: String| {
        Err(EngineError::Mismatch {
            what: format!("{}: parameter {index}: {what}", K::NAME),
        })
    };
    let (Some(param), Some(grad)) = (t.param, t.grad) else {
        return mismatch("a parameter and its gradient are needed".to_string());
    };
    if t.num_states != num_states {
        return mismatch(format!(
            "{} state buffers, the kernel needs {num_states}",
            t.num_states
        ));
    }
    if t.num_scalars != K::SCALARS.len() {
        return mismatch(format!(
            "{} scalar state slots, the kernel needs {}",
            t.num_scalars,
            K::SCALARS.len()
        ));
    }
    if grad.format != param.format {
        return mismatch("the gradient's dtype differs from the parameter's".to_string());
    }
    if t.states().iter().any(|s| s.format.is_quantized()) {
        return check_quantized::<K>(index, t, param.format, ctx);
    }
    if let Some(master) = t.master {
        return check_master::<K>(index, t, param.format, master.format, ctx);
    }
    let (kernel_states, ema_buffer) = match t.states().split_last() {
        Some((last, rest)) if ema => (rest, Some(last)),
        _ => (t.states(), None),
    };
    if ema_buffer.is_some_and(|b| b.format != param.format) {
        return mismatch("the moving average's dtype differs from the parameter's".to_string());
    }
    let state_format = kernel_states.first().map_or(param.format, |s| s.format);
    if kernel_states.iter().any(|s| s.format != state_format)
        || !supported_formats(param.format, state_format)
    {
        return Err(EngineError::Unsupported {
            what: format!(
                "{}: parameter {index}: {} parameters with {} states",
                K::NAME,
                param.format.name(),
                state_format.name()
            ),
        });
    }
    if ctx.stochastic.is_none() && rounded_formats(param.format, state_format) && !K::ROUNDED {
        return Err(EngineError::Unsupported {
            what: format!(
                "{}: parameter {index}: torch's for-loop on {} parameters",
                K::NAME,
                param.format.name()
            ),
        });
    }
    if ctx.stochastic.is_some() && !stochastic_formats(param.format, state_format) {
        return Err(EngineError::Unsupported {
            what: format!(
                "{}: parameter {index}: stochastic rounding of {} parameters with {} states",
                K::NAME,
                param.format.name(),
                state_format.name()
            ),
        });
    }
    Ok(())
}

/// Refuses a parameter with a master copy the loops cannot step: a float32
/// master of a bfloat16 or float16 parameter, float32 states (or bfloat16
/// ones, rounded stochastically), no moving average fused.
fn check_master<K: Elementwise>(
    index: usize,
    t: &super::TensorBuffers,
    param: Format,
    master: Format,
    ctx: &StepContext,
) -> Result<(), EngineError> {
    let state = t.states().first().map_or(Format::F32, |s| s.format);
    let states_ok = t.states().iter().all(|s| s.format == state)
        && (state == Format::F32 || (state == Format::BF16 && ctx.stochastic.is_some()));
    let low = matches!(param, Format::BF16 | Format::F16);
    if !low || master != Format::F32 || !states_ok || ctx.ema.is_some() {
        return Err(EngineError::Unsupported {
            what: format!(
                "{}: parameter {index}: a {} master copy of a {} parameter with {} states{}",
                K::NAME,
                master.name(),
                param.name(),
                state.name(),
                if ctx.ema.is_some() {
                    " and a moving average"
                } else {
                    ""
                }
            ),
        });
    }
    Ok(())
}

/// Refuses a tensor with 8-bit states the loops cannot step: float32
/// parameters, bfloat16 or float16 ones with a float32 master copy (and no
/// moving average), or bfloat16 ones rounded stochastically; every other
/// state in float32, a moving average in the parameter's dtype.
fn check_quantized<K: Elementwise>(
    index: usize,
    t: &super::TensorBuffers,
    param: Format,
    ctx: &StepContext,
) -> Result<(), EngineError> {
    let ema = ctx.ema.is_some();
    let (kernel_states, ema_buffer) = match t.states().split_last() {
        Some((last, rest)) if ema => (rest, Some(last)),
        _ => (t.states(), None),
    };
    let low = matches!(param, Format::BF16 | Format::F16);
    let states_ok = kernel_states
        .iter()
        .all(|s| s.format.is_quantized() || s.format == Format::F32);
    let master_ok = match t.master {
        Some(m) => m.format == Format::F32 && low && !ema,
        None => param == Format::F32 || (param == Format::BF16 && ctx.stochastic.is_some()),
    };
    let ema_ok = ema_buffer.is_none_or(|b| b.format == param);
    if (param == Format::F32 || low) && states_ok && master_ok && ema_ok {
        return Ok(());
    }
    Err(EngineError::Unsupported {
        what: format!(
            "{}: parameter {index}: 8-bit states of {} parameters{} with states {:?}",
            K::NAME,
            param.name(),
            if t.master.is_some() {
                " with a master copy"
            } else {
                ""
            },
            kernel_states
                .iter()
                .map(|s| s.format.name())
                .collect::<Vec<_>>()
        ),
    })
}

/// The (parameter, state) format pairs whose loops round stochastically
/// (float32 and float64 pairs have nothing to round: they run as they are).
pub fn stochastic_formats(param: Format, state: Format) -> bool {
    use Format::*;
    matches!(
        (param, state),
        (F32, F32) | (F64, F64) | (F32, BF16) | (BF16, BF16) | (F16, F16)
    )
}

/// The (parameter, state) format pairs that step as torch's for-loop does on them,
/// rounding after every op ([`Elementwise::update_rounded`]) unless rounded
/// stochastically.
pub fn rounded_formats(param: Format, state: Format) -> bool {
    use Format::*;
    matches!((param, state), (BF16, BF16) | (F16, F16))
}

/// The (parameter, state) format pairs the loops are compiled for.
pub fn supported_formats(param: Format, state: Format) -> bool {
    use Format::*;
    matches!(
        (param, state),
        (F32, F32)
            | (F64, F64)
            | (F32, BF16)
            | (BF16, BF16)
            | (BF16, F32)
            | (F16, F16)
            | (F16, F32)
    )
}

struct Runner<'g, 'a, K: Elementwise> {
    group: &'g Group<'a>,
    level: SimdLevel,
    consts32: Vec<K::Consts<f32>>,
    consts64: Vec<K::Consts<f64>>,
    prep32: PrepConsts<f32>,
    prep64: PrepConsts<f64>,
    ema: Option<Lerp>,
    stochastic: Option<u64>,
}

/// `torch.lerp(start, end, weight)` with a scalar weight, as torch's CPU kernel
/// computes it (vectorised and tail alike): `start + weight*(end - start)` for
/// `|weight| < 0.5`, else `end - (end - start)*(1 - weight)`, each one fused
/// multiply-add of `end - start` with the weight (or `weight - 1`, exact)
/// rounded to the tensor's dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lerp {
    weight: f64,
}

impl Lerp {
    pub fn new(weight: f64) -> Lerp {
        Lerp { weight }
    }

    /// The coefficient and whether the result is based at `start` (a small weight).
    #[inline(always)]
    fn constants<C: Real>(self) -> (C, bool) {
        let weight = C::from_f64(self.weight);
        let small = weight.abs() < C::from_f64(0.5);
        (if small { weight } else { weight - C::ONE }, small)
    }

    /// `average[i] = lerp(average[i], param[i], weight)` for every element.
    #[inline(always)]
    fn apply<P: Storage>(self, param: &[P], average: &mut [P]) {
        let (coefficient, small) = self.constants::<P::Compute>();
        let average = &mut average[..param.len()];
        for (a, p) in average.iter_mut().zip(param) {
            let start = a.load();
            let end = p.load();
            let base = if small { start } else { end };
            *a = P::store((end - start).mul_add(coefficient, base));
        }
    }
}

/// Elements stepped before their slice of the moving average is updated: the
/// average reads the just-written parameters from cache, so it adds only its
/// own 2 × element size of memory traffic to the step's one pass.
const EMA_BLOCK: usize = 4096;

impl<K: Elementwise> FlagRunner for Runner<'_, '_, K> {
    type Output = ();

    fn run<const FLAGS: u32>(self) {
        let level = self.level;
        let ema = self.ema;
        let stochastic = self.stochastic;
        self.group.for_each_chunk(|segments| {
            for segment in segments {
                let t = segment.buffers();
                let param = t.param.map_or(Format::F32, |b| b.format);
                // (with a moving average the kernel's states are all but the last; none
                // when the average is the only one)
                let kernel_states = t.num_states - usize::from(ema.is_some());
                let state = t.states()[..kernel_states]
                    .first()
                    .map_or(param, |s| s.format);
                let i = segment.tensor_index();
                if t.states().iter().any(|s| s.format.is_quantized()) {
                    let k = (&self.consts32[i], &self.prep32);
                    use half::{bf16, f16};
                    match (param, t.master.is_some(), stochastic) {
                        (Format::BF16, true, _) => {
                            run_quantized::<K, f32, bf16, FLAGS, false, true>(
                                level, k, segment, None, 0,
                            )
                        }
                        (Format::F16, true, _) => run_quantized::<K, f32, f16, FLAGS, false, true>(
                            level, k, segment, None, 0,
                        ),
                        (Format::BF16, false, Some(key)) => {
                            run_quantized::<K, bf16, bf16, FLAGS, true, false>(
                                level, k, segment, ema, key,
                            )
                        }
                        _ => run_quantized::<K, f32, f32, FLAGS, false, false>(
                            level, k, segment, ema, 0,
                        ),
                    }
                    continue;
                }
                if t.master.is_some() {
                    let k = (&self.consts32[i], &self.prep32);
                    use half::{bf16, f16};
                    match (param, state, stochastic) {
                        (Format::F16, Format::BF16, Some(key)) => {
                            run_master::<K, f16, bf16, FLAGS, true>(level, k, segment, key)
                        }
                        (Format::F16, _, _) => {
                            run_master::<K, f16, f32, FLAGS, false>(level, k, segment, 0)
                        }
                        (_, Format::BF16, Some(key)) => {
                            run_master::<K, bf16, bf16, FLAGS, true>(level, k, segment, key)
                        }
                        _ => run_master::<K, bf16, f32, FLAGS, false>(level, k, segment, 0),
                    }
                    continue;
                }
                match (param, state) {
                    (Format::F64, _) => {
                        let k = (&self.consts64[i], &self.prep64);
                        run_segment::<K, f64, f64, FLAGS, false, false>(level, k, segment, ema, 0)
                    }
                    (Format::F32, Format::BF16) => {
                        let k = (&self.consts32[i], &self.prep32);
                        match stochastic {
                            Some(key) => run_segment::<K, f32, half::bf16, FLAGS, true, false>(
                                level, k, segment, ema, key,
                            ),
                            None => run_segment::<K, f32, half::bf16, FLAGS, false, false>(
                                level, k, segment, ema, 0,
                            ),
                        }
                    }
                    (Format::BF16, Format::BF16) => {
                        let k = (&self.consts32[i], &self.prep32);
                        match stochastic {
                            Some(key) => {
                                run_segment::<K, half::bf16, half::bf16, FLAGS, true, false>(
                                    level, k, segment, ema, key,
                                )
                            }
                            None => run_segment::<K, half::bf16, half::bf16, FLAGS, false, true>(
                                level, k, segment, ema, 0,
                            ),
                        }
                    }
                    (Format::BF16, _) => {
                        let k = (&self.consts32[i], &self.prep32);
                        run_segment::<K, half::bf16, f32, FLAGS, false, false>(
                            level, k, segment, ema, 0,
                        )
                    }
                    (Format::F16, Format::F16) => {
                        let k = (&self.consts32[i], &self.prep32);
                        match stochastic {
                            Some(key) => {
                                run_segment::<K, half::f16, half::f16, FLAGS, true, false>(
                                    level, k, segment, ema, key,
                                )
                            }
                            None => run_segment::<K, half::f16, half::f16, FLAGS, false, true>(
                                level, k, segment, ema, 0,
                            ),
                        }
                    }
                    (Format::F16, _) => {
                        let k = (&self.consts32[i], &self.prep32);
                        run_segment::<K, half::f16, f32, FLAGS, false, false>(
                            level, k, segment, ema, 0,
                        )
                    }
                    _ => {
                        let k = (&self.consts32[i], &self.prep32);
                        run_segment::<K, f32, f32, FLAGS, false, false>(level, k, segment, ema, 0)
                    }
                }
            }
        });
    }
}

/// Runs one segment's update; with `SR`, narrow stores round stochastically
/// under the group's per-step key `step_key`; with `ROUNDED`, torch's for-loop on a
/// bfloat16/float16 param ([`Elementwise::update_rounded`]).
#[inline(always)]
fn run_segment<K, P, S, const FLAGS: u32, const SR: bool, const ROUNDED: bool>(
    level: SimdLevel,
    (consts, prep): (&K::Consts<P::Compute>, &PrepConsts<P::Compute>),
    segment: ChunkSlices<'_>,
    ema: Option<Lerp>,
    step_key: u64,
) where
    K: Elementwise,
    P: Storage,
    S: Storage<Compute = P::Compute>,
{
    let rounding = Rounding {
        step_key,
        stream: segment.buffers().stream,
        offset: segment.range().start,
    };
    let (slices, average) = segment.slices_and_ema(ema.is_some());
    dispatch(
        level,
        UpdateTask::<K, P, P, S, FLAGS, SR, false, ROUNDED> {
            consts,
            prep,
            slices,
            ema: average.zip(ema),
            low: &mut [],
            rounding,
        },
    )
}

/// Runs one segment of a bfloat16 or float16 (`N`) parameter with a float32
/// master copy: the master is updated from the low-precision gradient (states
/// stored as `S`), then the parameter is written as the master rounded to
/// nearest.
#[inline(always)]
fn run_master<K, N, S, const FLAGS: u32, const SR: bool>(
    level: SimdLevel,
    (consts, prep): (&K::Consts<f32>, &PrepConsts<f32>),
    segment: ChunkSlices<'_>,
    step_key: u64,
) where
    K: Elementwise,
    N: Storage<Compute = f32>,
    S: Storage<Compute = f32>,
{
    let rounding = Rounding {
        step_key,
        stream: segment.buffers().stream,
        offset: segment.range().start,
    };
    let (slices, low) = segment.master_slices::<f32, N, S>();
    dispatch(
        level,
        UpdateTask::<K, f32, N, S, FLAGS, SR, true, false> {
            consts,
            prep,
            slices,
            ema: None,
            low,
            rounding,
        },
    )
}

/// Runs one segment of a tensor with 8-bit blockwise states: block by block,
/// the quantised states are dequantised into float32 scratch, the update runs
/// on the block as for float32 states (the value updated stored as `P`: the
/// parameter, or under `MASTER` its float32 master copy with the
/// low-precision parameter and gradient stored as `G`), and the block's new
/// states are quantised back with fresh scales.
#[inline(always)]
fn run_quantized<K, P, G, const FLAGS: u32, const SR: bool, const MASTER: bool>(
    level: SimdLevel,
    (consts, prep): (&K::Consts<f32>, &PrepConsts<f32>),
    segment: ChunkSlices<'_>,
    ema: Option<Lerp>,
    step_key: u64,
) where
    K: Elementwise,
    P: Storage<Compute = f32>,
    G: Storage<Compute = f32>,
{
    let rounding = Rounding {
        step_key,
        stream: segment.buffers().stream,
        offset: segment.range().start,
    };
    let slices = segment.quantized_slices::<P, G>(ema.is_some(), MASTER);
    dispatch(
        level,
        QuantizedTask::<K, P, G, FLAGS, SR, MASTER> {
            level,
            consts,
            prep,
            slices,
            ema,
            rounding,
        },
    )
}

/// One segment's update with 8-bit states (see [`run_quantized`]).
struct QuantizedTask<'s, K: Elementwise, P, G, const FLAGS: u32, const SR: bool, const MASTER: bool>
{
    /// The level the task runs at, for the encoder's intrinsics.
    level: SimdLevel,
    consts: &'s K::Consts<f32>,
    prep: &'s PrepConsts<f32>,
    slices: QuantizedSlices<'s, P, G>,
    ema: Option<Lerp>,
    rounding: Rounding,
}

impl<K, P, G, const FLAGS: u32, const SR: bool, const MASTER: bool> SimdTask
    for QuantizedTask<'_, K, P, G, FLAGS, SR, MASTER>
where
    K: Elementwise,
    P: Storage<Compute = f32>,
    G: Storage<Compute = f32>,
{
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let QuantizedSlices {
            param,
            grad,
            low,
            mut states,
            ema: mut average,
        } = self.slices;
        let n = param.len();
        let used = K::num_states(FLAGS);
        let mut scratch = [[0f32; Q8_BLOCK]; MAX_STATES];
        for (block, start) in (0..n).step_by(Q8_BLOCK).enumerate() {
            let end = n.min(start + Q8_BLOCK);
            // The streams' lines some blocks ahead: a block's work is short, and
            // the hardware prefetchers alone leave the update waiting on memory.
            let ahead = start + PREFETCH_BLOCKS * Q8_BLOCK;
            prefetch_block(&*param, ahead);
            prefetch_block(grad, ahead);
            if MASTER {
                prefetch_block(&*low, ahead);
            }
            for state in states.iter().take(used) {
                match state {
                    BlockState::Plain(values) => prefetch_block(values, ahead),
                    BlockState::Quantized { codes, .. } => prefetch_block(codes, ahead),
                    BlockState::Unused => {}
                }
            }
            let mut views: [&mut [f32]; MAX_STATES] = Default::default();
            for (k, ((view, state), buffer)) in views
                .iter_mut()
                .zip(states.iter_mut())
                .zip(scratch.iter_mut())
                .enumerate()
                .take(used)
            {
                *view = match state {
                    BlockState::Unused => &mut [],
                    BlockState::Plain(values) => &mut values[start..end],
                    BlockState::Quantized { codes, scales, map } => {
                        let buffer = &mut buffer[..end - start];
                        if K::reads_state(FLAGS, k) {
                            map.dequantize_block(&codes[start..end], scales[block], buffer);
                        }
                        buffer
                    }
                };
            }
            UpdateTask::<K, P, G, f32, FLAGS, SR, MASTER, false> {
                consts: self.consts,
                prep: self.prep,
                slices: Slices {
                    param: &mut param[start..end],
                    grad: &grad[start..end],
                    states: views,
                },
                ema: average
                    .as_deref_mut()
                    .map(|values| &mut values[start..end])
                    .zip(self.ema),
                low: if MASTER {
                    &mut low[start..end]
                } else {
                    &mut []
                },
                rounding: Rounding {
                    offset: self.rounding.offset + start,
                    ..self.rounding
                },
            }
            .run();
            for (state, buffer) in states.iter_mut().zip(&scratch).take(used) {
                if let BlockState::Quantized { codes, scales, map } = state {
                    scales[block] = map.quantize_block(
                        self.level,
                        &buffer[..end - start],
                        &mut codes[start..end],
                    );
                }
            }
        }
    }
}

/// How many blocks ahead [`QuantizedTask`] prefetches (8 KiB of a float32 stream).
const PREFETCH_BLOCKS: usize = 8;

/// Hints the cache lines of one block of `values`, from element `from`, into
/// cache (nothing where the block lies past the slice: prefetching a tensor's
/// worth of lines nobody reads would cost small tensors).
#[inline(always)]
fn prefetch_block<T>(values: &[T], from: usize) {
    if from < values.len() {
        let first = values.as_ptr().wrapping_add(from).cast::<u8>();
        for offset in (0..Q8_BLOCK * std::mem::size_of::<T>()).step_by(64) {
            // (`wrapping_add`: the block's end may lie past the slice's)
            crate::simd::prefetch(first.wrapping_add(offset));
        }
    }
}

/// Where a segment's random bits come from: the group's step key, the
/// tensor's stream, and the segment's first element's index in its tensor.
#[derive(Clone, Copy)]
struct Rounding {
    step_key: u64,
    stream: u64,
    offset: usize,
}

impl Rounding {
    /// The keys of the random words for the elements whose index has high 32
    /// bits `high`: one word per pair of state buffers (a bfloat16 store uses 16
    /// bits: buffer `2j` the word's low half, `2j + 1` its high half), then one
    /// for the parameter (last).
    #[inline]
    fn keys(&self, high: u64) -> [u32; WORDS] {
        let mut keys = [0; WORDS];
        for (j, key) in keys.iter_mut().enumerate() {
            let buffer = if j == WORDS - 1 {
                random::PARAM_STREAM
            } else {
                j as u64
            };
            *key = random::block_key(self.step_key, self.stream, buffer, high);
        }
        keys
    }
}

/// Random words per element: one per pair of state buffers, one for the parameter.
const WORDS: usize = MAX_STATES / 2 + 1;

/// Stores `value`: stochastically rounded with the random `bits` under `SR`,
/// else to nearest.
#[inline(always)]
fn put<T: Storage, const SR: bool>(value: T::Compute, bits: u32) -> T {
    if SR {
        T::store_stochastic(value, bits)
    } else {
        T::store(value)
    }
}

/// The element's random word under key `key` (0 when not rounding
/// stochastically: nothing is computed).
#[inline(always)]
fn word<const SR: bool>(index: u32, key: u32) -> u32 {
    if SR {
        random::bits(index, key)
    } else {
        0
    }
}

/// One segment's update. `P`: the stored form of the value updated (the
/// parameter, or its float32 master copy under `MASTER`); `G`: the gradient's
/// (and, under `MASTER`, the low-precision parameter's); `S`: the states'.
struct UpdateTask<
    's,
    K: Elementwise,
    P: Storage,
    G,
    S,
    const FLAGS: u32,
    const SR: bool,
    const MASTER: bool,
    const ROUNDED: bool,
> {
    consts: &'s K::Consts<P::Compute>,
    prep: &'s PrepConsts<P::Compute>,
    slices: Slices<'s, P, S, G>,
    /// The moving average of the parameter and its lerp weight.
    ema: Option<(&'s mut [P], Lerp)>,
    /// Under `MASTER`: the low-precision parameter, written from the master.
    low: &'s mut [G],
    rounding: Rounding,
}

impl<K, P, G, S, const FLAGS: u32, const SR: bool, const MASTER: bool, const ROUNDED: bool> SimdTask
    for UpdateTask<'_, K, P, G, S, FLAGS, SR, MASTER, ROUNDED>
where
    K: Elementwise,
    P: Storage,
    G: Storage<Compute = P::Compute>,
    S: Storage<Compute = P::Compute>,
{
    type Output = ();

    /// The loop every optimizer runs: one pass, each element loaded, updated
    /// and stored once (with a moving average: block by block, each block's
    /// average updated right after it). `num_states` and `reads_state` are
    /// constants here, so the unused slots vanish and the loop vectorises.
    #[inline(always)]
    fn run(self) {
        let Slices {
            param,
            grad,
            states,
        } = self.slices;
        let n = param.len();
        let grad = &grad[..n];
        let low = self.low;
        let low = if MASTER { &mut low[..n] } else { low };
        let used = K::num_states(FLAGS);
        let [s0, s1, s2, s3] = states;
        let s0 = if used > 0 { &mut s0[..n] } else { s0 };
        let s1 = if used > 1 { &mut s1[..n] } else { s1 };
        let s2 = if used > 2 { &mut s2[..n] } else { s2 };
        let s3 = if used > 3 { &mut s3[..n] } else { s3 };
        let reads = |k: usize| used > k && K::reads_state(FLAGS, k);
        let zero = <P::Compute as Real>::ZERO;
        let block = if self.ema.is_some() {
            EMA_BLOCK
        } else {
            n.max(1)
        };
        let mut average = self.ema;
        let offset = self.rounding.offset;
        let mut start = 0;
        while start < n {
            let mut end = n.min(start + block);
            let mut keys = [0u32; WORDS];
            if SR {
                // One block of keys per 2^32 elements of the tensor.
                let high = ((offset + start) >> 32) as u64;
                end = end.min((((high + 1) << 32) as usize) - offset);
                keys = self.rounding.keys(high);
            }
            for i in start..end {
                let index = (offset + i) as u32;
                let mut p = param[i].load();
                let round = P::round;
                let g = if ROUNDED {
                    self.prep.apply_rounded::<FLAGS>(grad[i].load(), p, round)
                } else {
                    self.prep.apply::<FLAGS>(grad[i].load(), p)
                };
                let mut s = [zero; MAX_STATES];
                if reads(0) {
                    s[0] = s0[i].load();
                }
                if reads(1) {
                    s[1] = s1[i].load();
                }
                if reads(2) {
                    s[2] = s2[i].load();
                }
                if reads(3) {
                    s[3] = s3[i].load();
                }
                if ROUNDED {
                    K::update_rounded::<P::Compute, FLAGS>(self.consts, &mut p, g, &mut s, round);
                } else {
                    K::update::<P::Compute, FLAGS>(self.consts, &mut p, g, &mut s);
                }
                param[i] = put::<P, SR>(p, word::<SR>(index, keys[WORDS - 1]));
                if MASTER {
                    low[i] = G::store(p);
                }
                let low_pair = if used > 0 {
                    word::<SR>(index, keys[0])
                } else {
                    0
                };
                let high_pair = if used > 2 {
                    word::<SR>(index, keys[1])
                } else {
                    0
                };
                if used > 0 {
                    s0[i] = put::<S, SR>(s[0], low_pair);
                }
                if used > 1 {
                    s1[i] = put::<S, SR>(s[1], low_pair >> 16);
                }
                if used > 2 {
                    s2[i] = put::<S, SR>(s[2], high_pair);
                }
                if used > 3 {
                    s3[i] = put::<S, SR>(s[3], high_pair >> 16);
                }
            }
            if let Some((values, lerp)) = average.as_mut() {
                lerp.apply(&param[start..end], &mut values[start..end]);
            }
            start = end;
        }
    }
}
