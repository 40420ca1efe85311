//! Element types: f32, f16 and bf16 activations; parameters and statistics are always f32.

use std::fmt;

/// The dtype of activations (`x`, `y`, `dy`, `dx`), known at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 ([`half::f16`]).
    F16,
    /// bfloat16 ([`half::bf16`]).
    BF16,
}

impl DType {
    /// Every dtype, in this order.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Size of one element in bytes.
    pub const fn size_of(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The suffix of the CUDA entry points instantiated for this dtype (`bn_stats_f16_i32`...).
    pub const fn kernel_suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Parses the names used by the golden files (a test tool) (`f32`, `f16`, `bf16`).
    #[cfg(feature = "test-tools")]
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_suffix())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An activation element type. Sealed: implemented for `f32`, [`half::f16`] and [`half::bf16`],
/// the three types the kernels are instantiated for. Arithmetic always happens in f32 (GPU) or
/// f64 (CPU reference); the element type is only how values are stored.
pub trait Element:
    sealed::Sealed
    + Copy
    + Default
    + PartialEq
    + fmt::Debug
    + Send
    + Sync
    + bytemuck::Pod
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + 'static
{
    /// The run-time tag of this type.
    const DTYPE: DType;
    /// Widens exactly.
    fn to_f64(self) -> f64;
    /// Rounds once, to nearest even.
    fn from_f64(value: f64) -> Self;
}

/// `value` rounded to f32 toward the neighbour with an odd last bit when inexact ("round to
/// odd"). Rounding that result to nearest-even in a format with at most 22 significand bits
/// (f16: 11, bf16: 8) gives the correctly rounded value of `value`: f64 -> f32 -> half rounds once.
/// `half`'s own `from_f64` does not (it truncates the low 32 bits of the f64, or goes through a
/// round-to-nearest f32 on x86), which misrounds values just above a tie.
fn to_f32_round_to_odd(value: f64) -> f32 {
    let nearest = value as f32;
    let bits = nearest.to_bits();
    if !nearest.is_finite() || f64::from(nearest) == value || bits & 1 == 1 {
        return nearest;
    }
    // Inexact with an even last bit: the odd neighbour on `value`'s side (same sign, so a larger
    // magnitude is the next bit pattern up).
    f32::from_bits(if value.abs() > f64::from(nearest).abs() {
        bits + 1
    } else {
        bits - 1
    })
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(value: f64) -> Self {
        value as f32
    }
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
    fn from_f64(value: f64) -> Self {
        half::f16::from_f32(to_f32_round_to_odd(value))
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
    fn from_f64(value: f64) -> Self {
        half::bf16::from_f32(to_f32_round_to_odd(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_types_round_once_from_f64() {
        use half::{bf16, f16};
        // 1 + 2^-11 lies exactly between two f16 values; ties go to even (1.0).
        assert_eq!(<f16 as Element>::from_f64(1.0 + 2f64.powi(-11)), f16::ONE);
        // Just above the tie rounds up. A double rounding through round-to-nearest f32 (half's
        // from_f64 on x86) or truncating the f64's low bits (its fallback) gives 1.0 here.
        let above = 1.0 + 2f64.powi(-11) + 2f64.powi(-30);
        assert_eq!(
            <f16 as Element>::from_f64(above).to_f64(),
            1.0 + 2f64.powi(-10)
        );
        assert_eq!(
            <f16 as Element>::from_f64(-above).to_f64(),
            -(1.0 + 2f64.powi(-10))
        );
        // Just below the tie rounds down, the same in bf16 (8 significand bits).
        let below = 1.0 + 2f64.powi(-11) - 2f64.powi(-30);
        assert_eq!(<f16 as Element>::from_f64(below), f16::ONE);
        let above = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(
            <bf16 as Element>::from_f64(above).to_f64(),
            1.0 + 2f64.powi(-7)
        );
        assert_eq!(<bf16 as Element>::from_f64(1.0 + 2f64.powi(-8)), bf16::ONE);
        assert_eq!(<bf16 as Element>::from_f64(3.0).to_f64(), 3.0);
        // Exact values, infinities, NaN and the smallest subnormals survive.
        assert_eq!(
            <f16 as Element>::from_f64(2f64.powi(-24)).to_f64(),
            2f64.powi(-24)
        );
        assert_eq!(<f16 as Element>::from_f64(2f64.powi(-26)).to_f64(), 0.0);
        assert_eq!(<f16 as Element>::from_f64(1e6), f16::INFINITY);
        assert!(<bf16 as Element>::from_f64(f64::NAN).is_nan());
        assert_eq!(<f32 as Element>::from_f64(0.1), 0.1f32);
    }

    #[test]
    fn dtype_names_round_trip() {
        for dtype in DType::ALL {
            assert_eq!(DType::parse(dtype.kernel_suffix()), Some(dtype));
        }
        assert_eq!(DType::parse("f64"), None);
    }
}
