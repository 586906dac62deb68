//! Tensor arithmetic with float32 scalars, rounded the way torch rounds it.
//!
//! diffusers multiplies and divides latents by 0-d float32 tensors; torch computes `x * s` and `x / s` in
//! float32 with one rounding each. candle's `affine` multiplies by the scalar cast to the tensor's dtype (the
//! same rounding), but `x / s` in candle is a multiplication by `1 / s`, which can differ in the last bit, so
//! divisions go through a broadcast division instead.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// `x * s` (one float32 rounding, like torch).
pub fn mul(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(x.affine(s as f64, 0.0)?)
}

/// `x / s` (a true division, like torch).
pub fn div(x: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&s)?)
}

/// The tensor in float32 (the dtype diffusers' step arithmetic is matched in).
pub fn f32(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?)
}
