//! bf16 matrix products with f32 sums on AVX-512 BF16 (`vdpbf16ps`), for `--precision bf16` on CPUs
//! that have it but no AMX (AMD Zen 4 and 5). They read the operands exactly as [`super::amx`] packs
//! them, so every bf16 path packs once and runs on either unit.
//!
//! `vdpbf16ps` adds, in each of 16 f32 lanes, the products of one pair of bf16 values from each source:
//! with a vector of B (16 columns × one pair of rows, the VNNI order `amx::pack_b` writes) and one pair
//! of A's values broadcast to every lane, one instruction is 32 multiply-adds (an f32 FMA is 16). A
//! register tile is 12 (or 8) rows × 32 columns (two vectors per row, 24 sums held in registers over
//! the whole depth); a 32 × 32 block of C is three such tiles (12 + 12 + 8 rows). No crate offers this
//! product over these layouts; the intrinsics are `core::arch`'s.

use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use super::amx::{BLOCK, DEPTH};
use super::SharedMut;

/// Whether this CPU has AVX-512 BF16.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// C (m × n, f32, row stride `ldc`) = A · B, with A (m × k) and B (k × n) packed by `amx`'s packers
/// (m a multiple of [`BLOCK`], n of 16, k even: whole pairs); split over the thread pool when `parallel`.
///
/// # Safety
/// [`available`] must be true, `a` and `b` must hold m·k and k·n values, and `c` must be valid for
/// writes of m rows of n values at stride `ldc`, not read or written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[bf16],
    b: &[bf16],
    c: *mut f32,
    ldc: usize,
    parallel: bool,
) {
    debug_assert!(m.is_multiple_of(BLOCK) && n.is_multiple_of(16) && k.is_multiple_of(2));
    debug_assert!(a.len() >= m * k && b.len() >= k * n);
    let c = SharedMut(c);
    // Blocks of 32 columns, the last one 16 wide when n is an odd number of 16s.
    let across = n.div_ceil(BLOCK);
    let blocks = (m / BLOCK) * across;
    let run = |range: std::ops::Range<usize>| {
        for block in range {
            let (mb, nb) = (block / across, block % across);
            let row = mb * BLOCK;
            let (a, b) = (a.as_ptr(), b.as_ptr());
            // SAFETY: the caller's contract; the block lies inside A, B and C.
            unsafe {
                let (a, b, c) = (
                    a.add(row * k),
                    b.add(nb * BLOCK * k),
                    c.at(row * ldc + nb * BLOCK),
                );
                if nb * BLOCK + 16 < n {
                    block_product(a, k, b, c, ldc)
                } else {
                    half_block_product(a, k, b, c, ldc)
                }
            };
        }
    };
    if parallel && blocks > 1 {
        let per_task = blocks.div_ceil(4 * super::threads()).max(1);
        (0..blocks.div_ceil(per_task))
            .into_par_iter()
            .for_each(|task| run(task * per_task..((task + 1) * per_task).min(blocks)));
    } else {
        run(0..blocks);
    }
}

/// One 32 × 32 block of C: rows `a` (32 rows of `k` values) times the 32 columns of B starting at `b`,
/// as register tiles of 12, 12 and 8 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block_product(a: *const bf16, k: usize, b: *const bf16, c: *mut f32, ldc: usize) {
    block_tile::<12, 2>(a, k, b, c, ldc);
    block_tile::<12, 2>(a.add(12 * k), k, b, c.add(12 * ldc), ldc);
    block_tile::<8, 2>(a.add(24 * k), k, b, c.add(24 * ldc), ldc);
}

/// A 32 × 16 block of C (the last 16 columns of an odd number of 16s): rows `a` times the 16 columns of
/// B starting at `b`, as two register tiles of 16 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn half_block_product(a: *const bf16, k: usize, b: *const bf16, c: *mut f32, ldc: usize) {
    block_tile::<16, 1>(a, k, b, c, ldc);
    block_tile::<16, 1>(a.add(16 * k), k, b, c.add(16 * ldc), ldc);
}

/// One register tile: rows `a` (R rows of `k` values) times the V · 16 columns of B starting at `b`
/// (V VNNI column blocks of 16, each k/2 pairs × 16 × 2), written to `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn block_tile<const R: usize, const V: usize>(
    a: *const bf16,
    k: usize,
    b: *const bf16,
    c: *mut f32,
    ldc: usize,
) {
    use std::arch::x86_64::*;
    let pairs = k / 2;
    // A's values as pairs: row r's pair p is the u32 at r·pairs + p.
    let a = a.cast::<u32>();
    let columns: [*const u32; V] = std::array::from_fn(|h| b.add(h * 16 * k).cast::<u32>());
    let mut sums = [[_mm512_setzero_ps(); V]; R];
    for p in 0..pairs {
        // SAFETY: p < k / 2 pairs of every row of A and of every column block of B.
        let v: [__m512bh; V] = std::array::from_fn(|h| unsafe {
            as_bf16(_mm512_loadu_si512(columns[h].add(16 * p).cast()))
        });
        for (r, row) in sums.iter_mut().enumerate() {
            // SAFETY: as above.
            let pair = unsafe { a.add(r * pairs + p).read_unaligned() };
            let broadcast = as_bf16(_mm512_set1_epi32(pair as i32));
            for (sum, &v) in row.iter_mut().zip(&v) {
                *sum = _mm512_dpbf16_ps(*sum, v, broadcast);
            }
        }
    }
    for (r, row) in sums.iter().enumerate() {
        for (h, sum) in row.iter().enumerate() {
            // SAFETY: row r of the tile, V · 16 columns, inside C.
            unsafe { _mm512_storeu_ps(c.add(r * ldc + 16 * h), *sum) };
        }
    }
}

/// The geometry of one direct convolution block (see [`super::amx_conv`]): which weights and which
/// shifted input each (tap, block of 32 input channels) multiplies.
pub struct ConvGeometry {
    /// Kernel taps (kh · kw) and kernel width.
    pub taps: usize,
    /// Kernel width.
    pub kw: usize,
    /// Padded input width: a tap (ky, kx) shifts the positions by ky · wp + kx.
    pub wp: usize,
    /// Input channels (a multiple of 32).
    pub c_in: usize,
    /// Elements of one plane of channel pairs (hp · wp positions × 2).
    pub plane: usize,
}

/// One 32 × 32 block of a direct bf16 convolution into `block` (row stride 32): for 32 output
/// channels (weights at `a`, rows of `depth` = taps · c_in in (tap, channel) order) and 32 positions
/// (their channel-pair planes at `b`), the sum over every tap and input channel, each (tap, block of
/// 32 channels) one depth-32 step whose B rows are 64-byte runs of the shifted planes.
///
/// # Safety
/// [`available`] must be true; `a` must hold 32 rows of `depth`; every run of 32 positions at every
/// shift, in every plane of `c_in / 2`, must lie inside the allocation `b` points into; `block` must
/// be valid for 32 × 32 writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn conv_block(
    a: *const bf16,
    depth: usize,
    b: *const bf16,
    g: &ConvGeometry,
    block: *mut f32,
) {
    conv_rows::<12>(a, depth, b, g, block);
    conv_rows::<12>(a.add(12 * depth), depth, b, g, block.add(12 * BLOCK));
    conv_rows::<8>(a.add(24 * depth), depth, b, g, block.add(24 * BLOCK));
}

/// R rows of [`conv_block`] (one register tile), into `block` (row stride 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn conv_rows<const R: usize>(
    a: *const bf16,
    depth: usize,
    b: *const bf16,
    g: &ConvGeometry,
    block: *mut f32,
) {
    use std::arch::x86_64::*;
    let pairs = depth / 2;
    let a = a.cast::<u32>();
    let mut sums = [[_mm512_setzero_ps(); 2]; R];
    for t in 0..g.taps {
        let shift = (t / g.kw) * g.wp + t % g.kw;
        for kb in 0..g.c_in / DEPTH {
            let column = (t * g.c_in + kb * DEPTH) / 2;
            let b0 = b.add(kb * 16 * g.plane + shift * 2);
            for p in 0..DEPTH / 2 {
                // SAFETY: the caller's contract: pair p of this channel block, 32 positions.
                let (v0, v1) = unsafe {
                    let row = b0.add(p * g.plane);
                    (
                        as_bf16(_mm512_loadu_si512(row.cast())),
                        as_bf16(_mm512_loadu_si512(row.add(32).cast())),
                    )
                };
                for (r, row) in sums.iter_mut().enumerate() {
                    // SAFETY: column + p < depth / 2 pairs of row r.
                    let pair = unsafe { a.add(r * pairs + column + p).read_unaligned() };
                    let broadcast = as_bf16(_mm512_set1_epi32(pair as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], v0, broadcast);
                    row[1] = _mm512_dpbf16_ps(row[1], v1, broadcast);
                }
            }
        }
    }
    for (r, row) in sums.iter().enumerate() {
        // SAFETY: row r of the tile, inside the 32 × 32 block.
        unsafe {
            _mm512_storeu_ps(block.add(r * BLOCK), row[0]);
            _mm512_storeu_ps(block.add(r * BLOCK + 16), row[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn conv_block(_: *const bf16, _: usize, _: *const bf16, _: &ConvGeometry, _: *mut f32) {
    unreachable!("AVX-512 BF16 is x86-64 only; `available` is false elsewhere")
}

/// The 32 bf16 values in a vector's bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn as_bf16(v: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    use std::arch::x86_64::{__m512bh, __m512i};
    // SAFETY: both are 64 plain bytes; every bit pattern is a valid value of either.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_product(_: *const bf16, _: usize, _: *const bf16, _: *mut f32, _: usize) {
    unreachable!("AVX-512 BF16 is x86-64 only; `available` is false elsewhere")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn half_block_product(_: *const bf16, _: usize, _: *const bf16, _: *mut f32, _: usize) {
    unreachable!("AVX-512 BF16 is x86-64 only; `available` is false elsewhere")
}

#[cfg(test)]
mod tests {
    use super::super::amx::tests::{check_product, operands};
    use super::super::amx::{pack_a_rows, pack_b_rows_to, pad};
    use super::*;

    #[test]
    fn product_equals_f64_sum_of_bf16_inputs() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this machine: skipped");
            return;
        }
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (33, 17, 45),
            (64, 96, 320),
            (5, 70, 100),
            (64, 40, 1024),
            (96, 64, 2880),
        ] {
            let (a, b) = operands(m, n, k);
            let mut pa = Vec::new();
            pack_a_rows(&mut pa, &a, m, k, k);
            let (mp, kp) = (pad(m, BLOCK), pad(k, DEPTH));
            // B's columns padded to whole blocks of 32, and to 16 (a last block of 16 columns).
            for np in [pad(n, BLOCK), n.next_multiple_of(16)] {
                let mut pb = Vec::new();
                pack_b_rows_to(&mut pb, &b, k, n, n, np);
                for parallel in [false, true] {
                    let mut c = vec![f32::NAN; mp * np];
                    // SAFETY: available; pa is mp × kp, pb kp × np, c mp × np.
                    unsafe { matmul(mp, np, kp, &pa, &pb, c.as_mut_ptr(), np, parallel) };
                    check_product(&a, &b, (m, n, k), &c, np, 1e-4);
                }
            }
        }
    }
}
