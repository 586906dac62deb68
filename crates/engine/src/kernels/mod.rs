//! Hand-written CPU kernels for the operations where candle's generic CPU ops are slow or memory-hungry
//! on Stable Diffusion's shapes: attention that never holds the whole score matrix, 3×3 / 1×1
//! convolution as shifted matrix products or by Winograd's minimal filtering (no im2col buffer), and
//! group norm fused with SiLU.
//!
//! No crate provides these for candle tensors (candle's own CPU attention materialises the scores, its
//! group norm is a chain of ~10 tensor ops, its convolution copies the input into an im2col buffer), so
//! they are written here, with two matrix kernels under them: [`sgemm`], our blocked f32 product for a
//! right operand packed once and reused (linear layers, attention, Winograd), and the `gemm` crate (the
//! kernel candle itself uses, with its AVX-512 kernels enabled) for the tiled convolution; in bf16
//! ([`set_bf16_products`]) the products run on [`amx`] tiles or, without AMX, with AVX-512 BF16
//! ([`dot_bf16`]), over the same packed operands ([`bf16_matmul`]). Each kernel is
//! a candle custom op for f32 tensors on the CPU; the callers in `models::layers` and
//! `models::attention` fall back to the plain candle operation for any other device or dtype, and the
//! tests in this module check each kernel against that plain operation, at every instruction-set
//! [`tier`] the machine can run (AVX-512, AVX2 + FMA, portable).

pub mod activation;
pub mod amx;
pub mod amx_conv;
pub mod attention;
pub mod conv;
pub mod dot_bf16;
pub mod geglu;
pub mod group_norm;
pub mod linear;
pub mod sgemm;
pub mod tier;
mod vector;
pub mod winograd;
pub mod winograd_bf16;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// Frees the buffers the kernels keep on the calling thread between calls (the Winograd convolution's
/// transformed weights and windows, the linear layers' packed weights): hundreds of MiB after a 512²
/// UNet step. For the end of a generation, so that an idle process does not hold them; the next call
/// allocates them again.
pub fn release_buffers() {
    winograd::release_buffers();
    linear::release_buffers();
}

/// Whether the kernels here can take a tensor: f32 on the CPU. Callers use candle's own operation otherwise.
pub fn accepts(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// `xs` (b, c, h, w) with `n` zero rows below and `n` zero columns to the right, made in one copy (two
/// `pad_with_zeros` calls make two: 128 MiB each at the VAE encoder's 512² downsampler). Tensors the
/// kernels do not take are padded by candle.
pub fn pad_bottom_right(xs: &candle_core::Tensor, n: usize) -> Result<candle_core::Tensor> {
    if !accepts(xs) {
        return xs
            .pad_with_zeros(candle_core::D::Minus1, 0, n)?
            .pad_with_zeros(candle_core::D::Minus2, 0, n);
    }
    let (b, c, h, w) = xs.dims4()?;
    let xs = xs.contiguous()?;
    let (storage, layout) = xs.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("pad_bottom_right: not a CPU tensor");
    };
    let data = contiguous_f32(storage, layout, "pad_bottom_right")?;
    let padded = pad_planes(data, (h, w), (h + n, w + n), 0, 0);
    candle_core::Tensor::from_vec(padded, (b, c, h + n, w + n), xs.device())
}

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

/// A raw output pointer shared by parallel tasks that write disjoint parts of one buffer (of f32, or of
/// bf16 operands being packed).
struct SharedMut<T = f32>(*mut T);

impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SharedMut<T> {}

// SAFETY: every kernel hands each task a region of the buffer no other task touches.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer `offset` elements in. (A method, so closures capture the whole `Send` wrapper.)
    fn at(self, offset: usize) -> *mut T {
        // SAFETY: callers stay inside the allocation the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

/// Whether convolutions and linear layers multiply in bf16 on AMX (`--precision bf16`), process-wide.
static BF16_PRODUCTS: AtomicBool = AtomicBool::new(false);

/// Turns bf16 products on or off for this process (a server or one command). Turning them on fails,
/// with the reason, on a CPU that can multiply bf16 neither on AMX nor with AVX-512 BF16.
pub fn set_bf16_products(on: bool) -> std::result::Result<(), String> {
    if on && !bf16_available() {
        return Err(
            "--precision bf16 needs a CPU with AMX-BF16 (Intel Xeon Sapphire Rapids or later, and a \
             Linux kernel that grants it) or AVX-512 BF16 (AMD Zen 4 or later); this machine has \
             neither, use fp32"
                .to_string(),
        );
    }
    if on && tier::Tier::active() < tier::Tier::Avx512 {
        return Err(format!(
            "--precision bf16 runs on the avx512 CPU tier, but {}={} asks for a lower one; use fp32",
            tier::ENV,
            tier::Tier::active()
        ));
    }
    BF16_PRODUCTS.store(on, Ordering::Relaxed);
    Ok(())
}

/// Whether this CPU multiplies bf16 matrices, on AMX or with AVX-512 BF16 (see [`bf16_matmul`]).
pub fn bf16_available() -> bool {
    amx::available() || dot_bf16::available()
}

/// The depth a bf16 product of depth `k` is padded to: a multiple of [`amx::DEPTH`] for AMX's tiles,
/// of 2 (whole pairs) for AVX-512 BF16.
pub fn bf16_depth(k: usize) -> usize {
    if amx::available() {
        amx::pad(k, amx::DEPTH)
    } else {
        k.next_multiple_of(2)
    }
}

/// The columns a bf16 product with `n` columns of B is padded to: a multiple of [`amx::BLOCK`] for AMX's
/// tiles, of 16 (one vector) for AVX-512 BF16.
pub fn bf16_columns(n: usize) -> usize {
    if amx::available() {
        amx::pad(n, amx::BLOCK)
    } else {
        n.next_multiple_of(16)
    }
}

/// C (m × n, f32, row stride `ldc`) = A · B for operands packed by [`amx`]'s packers, on AMX where the
/// CPU has it, else with AVX-512 BF16 ([`dot_bf16`]); split over the thread pool when `parallel`.
///
/// # Safety
/// [`bf16_available`] must be true; m a multiple of [`amx::BLOCK`], n too (or padded by
/// [`bf16_columns`]), k of [`amx::DEPTH`] (or padded by [`bf16_depth`]); `a` and `b` hold m·k and k·n
/// values; `c` is valid for writes of m rows of n values at stride `ldc`, used by no one else
/// meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn bf16_matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[half::bf16],
    b: &[half::bf16],
    c: *mut f32,
    ldc: usize,
    parallel: bool,
) {
    // SAFETY: the caller's contract, which both kernels share.
    unsafe {
        if amx::available() {
            amx::matmul(m, n, k, a, b, c, ldc, parallel)
        } else {
            dot_bf16::matmul(m, n, k, a, b, c, ldc, parallel)
        }
    }
}

/// Whether bf16 products are on (see [`set_bf16_products`]).
pub fn bf16_products() -> bool {
    BF16_PRODUCTS.load(Ordering::Relaxed)
}

/// Copies planes of h × w (`xs`, one after another) into zero-filled planes of hp × wp with each plane's
/// top-left corner at (pad, pad), followed by `tail` zeros: the padded input the convolutions read.
fn pad_planes(
    xs: &[f32],
    (h, w): (usize, usize),
    (hp, wp): (usize, usize),
    pad: usize,
    tail: usize,
) -> Vec<f32> {
    let mut padded = vec![0f32; xs.len() / (h * w) * hp * wp + tail];
    padded
        .par_chunks_mut(hp * wp)
        .zip(xs.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for (y, row) in src.chunks_exact(w).enumerate() {
                dst[(y + pad) * wp + pad..][..w].copy_from_slice(row);
            }
        });
    padded
}

/// A piece of a run of grid positions that stays on one row of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    image: usize,
    row: usize,
    /// First column.
    col: usize,
    count: usize,
    /// Where the piece starts within the run.
    offset: usize,
}

/// Splits the run of `len` positions from `start`, numbered image by image and row by row over images of
/// `rows` × `width` positions, into pieces that each stay on one row.
fn row_segments(start: usize, len: usize, (rows, width): (usize, usize)) -> Vec<Segment> {
    let per_image = rows * width;
    let mut segments = Vec::with_capacity(len / width + 2);
    let mut pos = start;
    while pos < start + len {
        let (image, rest) = (pos / per_image, pos % per_image);
        let (row, col) = (rest / width, rest % width);
        let count = (width - col).min(start + len - pos);
        segments.push(Segment {
            image,
            row,
            col,
            count,
            offset: pos - start,
        });
        pos += count;
    }
    segments
}

/// Runs `run(buffers, tile, parallelism)` for tiles 0..`tiles`: side by side when there are at least two
/// per thread (each `gemm` on its own thread), else one after another with each `gemm` spread over the
/// threads. `buffers` are per-thread scratch space.
fn for_each_tile<B: Default + Send>(tiles: usize, run: impl Fn(&mut B, usize, Parallelism) + Sync) {
    if tiles >= 2 * threads() {
        (0..tiles)
            .into_par_iter()
            .for_each_init(B::default, |buffers, tile| {
                run(buffers, tile, Parallelism::None)
            });
    } else {
        let mut buffers = B::default();
        for tile in 0..tiles {
            run(&mut buffers, tile, Parallelism::Rayon(threads()));
        }
    }
}

/// How many worker threads the kernels spread over (rayon's pool, which gemm uses too).
fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Runs a kernel test at every [`tier::Tier`] this CPU supports, naming the tier in a failure.
#[cfg(test)]
fn at_every_tier(test: impl Fn() -> Result<()> + Send + Sync) -> Result<()> {
    for tier in tier::Tier::supported() {
        tier::run_at(tier, &test)
            .map_err(candle_core::Error::msg)?
            .map_err(|e| candle_core::Error::msg(format!("at CPU tier {tier}: {e}")))?;
    }
    Ok(())
}

/// The largest |a − b| over all elements: how the kernel tests compare with the plain candle operation.
#[cfg(test)]
fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_segments_cut_runs_at_row_and_image_ends() {
        // Images of 2 rows × 3 columns; the run 4..11 covers image 0 row 1 from column 1, image 1 row 0,
        // and image 1 row 1 up to column 1.
        let pieces: Vec<_> = row_segments(4, 7, (2, 3))
            .iter()
            .map(|s| (s.image, s.row, s.col, s.count, s.offset))
            .collect();
        assert_eq!(
            pieces,
            vec![(0, 1, 1, 2, 0), (1, 0, 0, 3, 2), (1, 1, 0, 2, 5)]
        );
    }

    #[test]
    fn pad_planes_frames_each_plane_with_zeros() {
        let xs: Vec<f32> = (1..=8).map(|v| v as f32).collect(); // two planes of 2 × 2
        let padded = pad_planes(&xs, (2, 2), (4, 5), 1, 3);
        assert_eq!(padded.len(), 2 * 20 + 3);
        assert_eq!(&padded[5..10], &[0.0, 1.0, 2.0, 0.0, 0.0]);
        assert_eq!(&padded[20 + 10..20 + 15], &[0.0, 7.0, 8.0, 0.0, 0.0]);
        assert_eq!(padded.iter().sum::<f32>(), 36.0);
    }

    #[test]
    fn pad_bottom_right_equals_candles_two_pads() -> Result<()> {
        let xs = candle_core::Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &candle_core::Device::Cpu)?;
        let plain = xs
            .pad_with_zeros(candle_core::D::Minus1, 0, 2)?
            .pad_with_zeros(candle_core::D::Minus2, 0, 2)?;
        let padded = pad_bottom_right(&xs, 2)?;
        assert_eq!(padded.dims(), &[2, 3, 7, 6]);
        assert_eq!(max_abs_diff(&padded, &plain)?, 0.0);
        // A transposed view is made contiguous first.
        let view = xs.transpose(2, 3)?;
        let plain = view
            .pad_with_zeros(candle_core::D::Minus1, 0, 1)?
            .pad_with_zeros(candle_core::D::Minus2, 0, 1)?;
        assert_eq!(max_abs_diff(&pad_bottom_right(&view, 1)?, &plain)?, 0.0);
        Ok(())
    }
}
