//! Hand-written CPU kernels for the operations where candle's generic CPU ops are slow or memory-hungry
//! on Stable Diffusion's shapes: attention that never holds the whole score matrix, 3×3 / 1×1
//! convolution as shifted matrix products (no im2col buffer), and group norm fused with SiLU.
//!
//! No crate provides these for candle tensors (candle's own CPU attention materialises the scores, its
//! group norm is a chain of ~10 tensor ops, its convolution copies the input into an im2col buffer), so
//! they are written here on top of the `gemm` crate (the matrix kernel candle itself uses, with its
//! AVX-512 kernels enabled). Each kernel is a candle custom op for f32 tensors on the CPU; the callers
//! in `models::layers` and `models::attention` fall back to the plain candle operation for any other
//! device or dtype, and the tests in this module check each kernel against that plain operation.

pub mod amx;
pub mod attention;
pub mod conv;
pub mod geglu;
pub mod group_norm;
pub mod linear;
mod vector;
pub mod winograd;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// The f32 data of a contiguous CPU tensor, or an error naming the kernel that needed it.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, kernel: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data.as_slice(),
        other => candle_core::bail!("{kernel}: expected f32, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{kernel}: expected a contiguous tensor"),
    }
}

/// A raw output pointer shared by parallel tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);

// SAFETY: every kernel hands each task a region of the buffer no other task touches.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer `offset` elements in. (A method, so closures capture the whole `Send` wrapper.)
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the allocation the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

/// Whether convolutions and linear layers multiply in bf16 on AMX (`--precision bf16`), process-wide.
static BF16_PRODUCTS: AtomicBool = AtomicBool::new(false);

/// Turns bf16 products on or off for this process (a server or one command). Turning them on fails,
/// with the reason, on a CPU without AMX.
pub fn set_bf16_products(on: bool) -> std::result::Result<(), String> {
    if on && !amx::available() {
        return Err(
            "--precision bf16 needs a CPU with AMX-BF16 (Intel Xeon Sapphire Rapids or later) \
                    and a Linux kernel that grants it; this machine has none, use fp32"
                .to_string(),
        );
    }
    BF16_PRODUCTS.store(on, Ordering::Relaxed);
    Ok(())
}

/// Whether bf16 products are on (see [`set_bf16_products`]).
pub fn bf16_products() -> bool {
    BF16_PRODUCTS.load(Ordering::Relaxed)
}

/// How many worker threads the kernels spread over (rayon's pool, which gemm uses too).
fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// The largest |a − b| over all elements: how the kernel tests compare with the plain candle operation.
#[cfg(test)]
fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}
