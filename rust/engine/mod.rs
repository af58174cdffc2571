//! The engine: one driver for every optimizer and every storage format.
//!
//! * [`format`]: storage formats and the compute types they load into;
//! * [`buffers`]: a tensor's buffers by role and format, scalar state slots,
//!   and the checks that make raw addresses safe;
//! * [`group`]: a parameter group cut into chunks across all its tensors;
//! * [`hyper`]: hyperparameter records read by name;
//! * [`elementwise`]: the `Elementwise` trait and the step driver;
//! * [`random`]: the counter-based generator of stochastic rounding;
//! * [`reduce`]: reductions (per tensor, per row or column) and maps over
//!   gradients (norms, clipping, factored moments).

pub mod buffers;
pub mod elementwise;
pub mod format;
pub mod group;
pub mod hyper;
pub mod quant;
pub mod random;
pub mod reduce;

pub use buffers::{
    check_buffers, is_dense, Buffer, EngineError, GradAccess, ScalarSlot, TensorBuffers,
    WrittenSet, MAX_SCALARS, MAX_STATES, STATE_SLOTS,
};
pub use elementwise::{has, Advance, Elementwise, FlagRunner, GradPrep, StepContext, L2};
pub use format::{Compute, Format, Real, Storage};
pub use group::{ChunkSlices, Group, Slices};
pub use hyper::{HyperError, HyperMap, HyperRecord, HyperSource, TensorScalar};
