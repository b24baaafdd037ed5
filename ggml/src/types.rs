//! ggml tensor types as a checked newtype: a value only exists for a type ggml defines and
//! can size (removed types such as Q4_2 have block size 0 and are refused).
use std::ffi::CStr;
use std::fmt;

use ggml_sys as sys;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorType(sys::ggml_type::Type);

impl TensorType {
    pub const F32: TensorType = TensorType(sys::ggml_type::GGML_TYPE_F32);
    pub const F16: TensorType = TensorType(sys::ggml_type::GGML_TYPE_F16);
    pub const BF16: TensorType = TensorType(sys::ggml_type::GGML_TYPE_BF16);
    pub const I32: TensorType = TensorType(sys::ggml_type::GGML_TYPE_I32);
    pub const I8: TensorType = TensorType(sys::ggml_type::GGML_TYPE_I8);
    pub const Q8_0: TensorType = TensorType(sys::ggml_type::GGML_TYPE_Q8_0);
    pub const Q2_K: TensorType = TensorType(sys::ggml_type::GGML_TYPE_Q2_K);
    pub const Q4_K: TensorType = TensorType(sys::ggml_type::GGML_TYPE_Q4_K);
    pub const IQ2_XXS: TensorType = TensorType(sys::ggml_type::GGML_TYPE_IQ2_XXS);
    pub const MXFP4: TensorType = TensorType(sys::ggml_type::GGML_TYPE_MXFP4);

    /// The type with ggml's number `raw`, if ggml defines and can size it.
    pub fn from_raw(raw: u32) -> Option<TensorType> {
        if raw >= sys::ggml_type::GGML_TYPE_COUNT {
            return None;
        }
        // SAFETY: `raw` is below GGML_TYPE_COUNT, so ggml's type-traits table has an entry.
        let blck = unsafe { sys::ggml_blck_size(raw) };
        (blck > 0).then_some(TensorType(raw))
    }

    pub fn raw(self) -> sys::ggml_type::Type {
        self.0
    }

    pub fn name(self) -> &'static str {
        // SAFETY: valid type (constructor invariant); ggml returns a static string.
        unsafe { CStr::from_ptr(sys::ggml_type_name(self.0)) }.to_str().unwrap_or("?")
    }

    /// Elements per quantization block.
    pub fn block_size(self) -> u64 {
        // SAFETY: valid type (constructor invariant).
        unsafe { sys::ggml_blck_size(self.0) as u64 }
    }

    /// Bytes per quantization block.
    pub fn block_bytes(self) -> u64 {
        // SAFETY: valid type (constructor invariant).
        unsafe { sys::ggml_type_size(self.0) as u64 }
    }

    pub fn is_quantized(self) -> bool {
        // SAFETY: valid type (constructor invariant).
        unsafe { sys::ggml_is_quantized(self.0) }
    }

    /// Bytes of one row of `n` elements; `None` if `n` is not a whole number of blocks or
    /// the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.block_bytes())
    }
}

impl fmt::Debug for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
