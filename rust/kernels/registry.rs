//! Every element-wise kernel by name: adding an optimizer adds one line to
//! the [`registry!`] call below (and nothing to the Python glue, which looks
//! kernels up here by the name its Python spec gives).

use crate::engine::elementwise::{self, Elementwise, StepContext};
use crate::engine::{EngineError, Group, HyperError, HyperRecord, HyperSource};
use crate::simd::SimdLevel;

macro_rules! registry {
    ($($variant:ident => $kernel:ty),* $(,)?) => {
        /// A registered kernel with its hyperparameters read.
        #[derive(Clone, Debug)]
        pub enum Configured {
            $( $variant(<$kernel as Elementwise>::Hyper), )*
        }

        /// Names of every registered kernel.
        pub const NAMES: &[&str] = &[$( <$kernel as Elementwise>::NAME ),*];

        impl Configured {
            /// Reads kernel `name`'s hyperparameters from `source`; `None`:
            /// no kernel of that name.
            pub fn read(
                name: &str,
                source: &dyn HyperSource,
            ) -> Result<Option<Configured>, HyperError> {
                $(
                    if name == <$kernel as Elementwise>::NAME {
                        return Ok(Some(Configured::$variant(HyperRecord::read(source)?)));
                    }
                )*
                Ok(None)
            }

            pub fn name(&self) -> &'static str {
                match self {
                    $( Configured::$variant(_) => <$kernel as Elementwise>::NAME, )*
                }
            }

            /// State buffers, in kernel order, under torch's state-dict keys.
            pub fn state_keys(&self) -> &'static [&'static str] {
                match self {
                    $( Configured::$variant(h) => <$kernel as Elementwise>::state_keys(h), )*
                }
            }

            /// Per-tensor scalar state under torch's state-dict keys.
            pub fn scalar_keys(&self) -> &'static [&'static str] {
                match self {
                    $( Configured::$variant(_) => <$kernel as Elementwise>::SCALARS, )*
                }
            }

            /// Steps `group` (see [`elementwise::step`]).
            pub fn step(
                &self,
                group: &Group<'_>,
                ctx: &StepContext,
                level: SimdLevel,
            ) -> Result<(), EngineError> {
                match self {
                    $( Configured::$variant(h) => elementwise::step::<$kernel>(group, h, ctx, level), )*
                }
            }
        }
    };
}

registry! {
    Adam => super::adam::Adam,
    Sgd => super::sgd::Sgd,
    Rmsprop => super::rmsprop::Rmsprop,
    Adagrad => super::adagrad::Adagrad,
    Adamax => super::adamax::Adamax,
    Nadam => super::nadam::Nadam,
    SparseAdam => super::sparse_adam::SparseAdam,
    Lion => super::lion::Lion,
    Lars => super::lars::Lars,
    LarsPlain => super::lars::LarsPlain,
    Muon => super::muon::Muon,
    Radam => super::radam::Radam,
    Adadelta => super::adadelta::Adadelta,
    Rprop => super::rprop::Rprop,
    Asgd => super::asgd::Asgd,
    Ademamix => super::ademamix::Ademamix,
    Adan => super::adan::Adan,
    ScheduleFreeAdamw => super::schedulefree::ScheduleFreeAdamw,
    ScheduleFreeSgd => super::schedulefree::ScheduleFreeSgd,
    StreamProbe => super::probe::StreamProbe,
}
