//! Hyperparameters read by name.
//!
//! A kernel's hyperparameter record is declared once with [`hyper_record!`]:
//! each field is read from a [`HyperSource`] (the param-group dict in the
//! Python glue, a map in Rust tests) under its own name, so adding a
//! hyperparameter is one line in the kernel file and nothing anywhere else.

use std::collections::HashMap;
use std::fmt;

/// Why a hyperparameter could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HyperError {
    /// The group has no entry of this name.
    Missing(String),
    /// The entry is not what the kernel computes with (`lr=None`, a string).
    Type { name: String, found: String },
}

impl fmt::Display for HyperError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HyperError::Missing(name) => write!(f, "the param group has no {name:?} entry"),
            HyperError::Type { name, found } => write!(
                f,
                "hyperparameter '{name}' must be a real number or a 1-element tensor, got {found}"
            ),
        }
    }
}

impl std::error::Error for HyperError {}

/// A learning rate (or another scalar) and whether it is a float32 tensor:
/// torch then derives per-step scalars from it in float32 tensor arithmetic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorScalar {
    pub value: f64,
    pub is_f32_tensor: bool,
}

impl TensorScalar {
    pub const fn of(value: f64) -> TensorScalar {
        TensorScalar {
            value,
            is_f32_tensor: false,
        }
    }
}

/// Where hyperparameters come from (names are the record's field names: `'static`,
/// so a source may cache what it derives from them).
pub trait HyperSource {
    /// A real number (a Python float, int, bool or 1-element tensor).
    fn number(&self, name: &'static str) -> Result<TensorScalar, HyperError>;
    /// A flag, with Python's truthiness (`maximize=1` is true).
    fn flag(&self, name: &'static str) -> Result<bool, HyperError>;
    /// A pair of numbers (`betas`).
    fn pair(&self, name: &'static str) -> Result<[f64; 2], HyperError>;
    /// Three numbers (the `betas` of AdEMAMix and Adan).
    fn triple(&self, name: &'static str) -> Result<[f64; 3], HyperError>;
    /// Whether the entry is `None` (an optional hyperparameter left unset).
    fn is_none(&self, name: &'static str) -> Result<bool, HyperError>;
}

/// A value a hyperparameter record field can hold.
pub trait HyperValue: Sized {
    fn read(source: &dyn HyperSource, name: &'static str) -> Result<Self, HyperError>;
}

impl HyperValue for f64 {
    fn read(source: &dyn HyperSource, name: &'static str) -> Result<f64, HyperError> {
        Ok(source.number(name)?.value)
    }
}

impl HyperValue for TensorScalar {
    fn read(source: &dyn HyperSource, name: &'static str) -> Result<TensorScalar, HyperError> {
        source.number(name)
    }
}

impl HyperValue for bool {
    fn read(source: &dyn HyperSource, name: &'static str) -> Result<bool, HyperError> {
        source.flag(name)
    }
}

impl HyperValue for [f64; 2] {
    fn read(source: &dyn HyperSource, name: &'static str) -> Result<[f64; 2], HyperError> {
        source.pair(name)
    }
}

impl HyperValue for [f64; 3] {
    fn read(source: &dyn HyperSource, name: &'static str) -> Result<[f64; 3], HyperError> {
        source.triple(name)
    }
}

/// `None` or a real number (AdEMAMix's `t_alpha_beta3`).
impl HyperValue for Option<f64> {
    fn read(source: &dyn HyperSource, name: &'static str) -> Result<Option<f64>, HyperError> {
        if source.is_none(name)? {
            return Ok(None);
        }
        Ok(Some(source.number(name)?.value))
    }
}

/// A step counter kept in the param group (a Python int, as the reference
/// implementations of AdEMAMix and Adan keep it): the steps taken before this one.
/// The reference creates the entry on its first step, so a group without it has
/// taken none.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupStep(pub f64);

impl HyperValue for GroupStep {
    fn read(source: &dyn HyperSource, name: &'static str) -> Result<GroupStep, HyperError> {
        match source.number(name) {
            Ok(count) => Ok(GroupStep(count.value)),
            Err(HyperError::Missing(_)) => Ok(GroupStep(0.0)),
            Err(error) => Err(error),
        }
    }
}

/// A record of hyperparameters read by name.
pub trait HyperRecord: Sized + Clone + Send + Sync + fmt::Debug {
    fn read(source: &dyn HyperSource) -> Result<Self, HyperError>;
}

/// Declares a hyperparameter record: a struct whose every field is read from
/// a [`HyperSource`] under the field's own name.
///
/// ```ignore
/// hyper_record! {
///     /// Adam's hyperparameters.
///     pub struct AdamHyper { lr: TensorScalar, betas: [f64; 2], eps: f64, amsgrad: bool }
/// }
/// ```
#[macro_export]
macro_rules! hyper_record {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $crate::engine::hyper::HyperRecord for $name {
            fn read(
                source: &dyn $crate::engine::hyper::HyperSource,
            ) -> Result<Self, $crate::engine::hyper::HyperError> {
                let _ = source; // (a record without fields reads nothing)
                Ok($name {
                    $( $field: <$ty as $crate::engine::hyper::HyperValue>::read(
                        source,
                        stringify!($field),
                    )?, )*
                })
            }
        }
    };
}

/// A [`HyperSource`] over plain values, for Rust tests and benches.
#[derive(Clone, Debug, Default)]
pub struct HyperMap {
    numbers: HashMap<String, f64>,
    pairs: HashMap<String, [f64; 2]>,
    triples: HashMap<String, [f64; 3]>,
    nones: std::collections::HashSet<String>,
}

impl HyperMap {
    pub fn new() -> HyperMap {
        HyperMap::default()
    }

    /// Sets a number (flags read it as `!= 0`).
    pub fn set(mut self, name: &str, value: f64) -> HyperMap {
        self.numbers.insert(name.to_string(), value);
        self
    }

    pub fn set_flag(self, name: &str, value: bool) -> HyperMap {
        self.set(name, f64::from(u8::from(value)))
    }

    pub fn set_pair(mut self, name: &str, value: [f64; 2]) -> HyperMap {
        self.pairs.insert(name.to_string(), value);
        self
    }

    pub fn set_triple(mut self, name: &str, value: [f64; 3]) -> HyperMap {
        self.triples.insert(name.to_string(), value);
        self
    }

    /// Sets an entry to `None`.
    pub fn set_none(mut self, name: &str) -> HyperMap {
        self.nones.insert(name.to_string());
        self
    }

    pub fn record<R: HyperRecord>(&self) -> R {
        R::read(self).expect("every hyperparameter set")
    }
}

impl HyperSource for HyperMap {
    fn number(&self, name: &'static str) -> Result<TensorScalar, HyperError> {
        self.numbers
            .get(name)
            .map(|&v| TensorScalar::of(v))
            .ok_or_else(|| HyperError::Missing(name.to_string()))
    }

    fn flag(&self, name: &'static str) -> Result<bool, HyperError> {
        Ok(self.number(name)?.value != 0.0)
    }

    fn pair(&self, name: &'static str) -> Result<[f64; 2], HyperError> {
        self.pairs
            .get(name)
            .copied()
            .ok_or_else(|| HyperError::Missing(name.to_string()))
    }

    fn triple(&self, name: &'static str) -> Result<[f64; 3], HyperError> {
        self.triples
            .get(name)
            .copied()
            .ok_or_else(|| HyperError::Missing(name.to_string()))
    }

    fn is_none(&self, name: &'static str) -> Result<bool, HyperError> {
        Ok(self.nones.contains(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::hyper_record! {
        /// A record for the test.
        pub struct Example { lr: TensorScalar, betas: [f64; 2], on: bool }
    }

    #[test]
    fn records_read_fields_by_name() {
        let map = HyperMap::new()
            .set("lr", 0.5)
            .set_pair("betas", [0.9, 0.99])
            .set_flag("on", true);
        let record: Example = map.record();
        assert_eq!(record.lr.value, 0.5);
        assert_eq!(record.betas, [0.9, 0.99]);
        assert!(record.on);
        let missing = Example::read(&HyperMap::new().set("lr", 1.0));
        assert_eq!(missing, Err(HyperError::Missing("betas".to_string())));
    }
}
