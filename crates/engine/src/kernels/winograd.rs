//! 3×3 stride-1 convolution by Winograd's minimal filtering, with two tile sizes ([`Tile`]):
//! F(2×2, 3×3) costs 16 multiplications per 2×2 block of outputs and input/output channel pair instead of
//! 36 (2.25× less matrix work), F(4×4, 3×3) costs 36 per 4×4 block instead of 144 (4× less).
//!
//! Per call the weights are transformed to U = G g Gᵀ, (n, c_out, c_in) for the n = 16 or 36 points
//! ξ of a window. The padded input is cut into windows (4×4 at stride 2, or 6×6 at stride 4), each
//! transformed to V = Bᵀ d B, (n, c_in, windows), written straight in the panel layout of
//! [`super::sgemm`]; n products give M = U·V, (n, c_out, windows); and the output transform Aᵀ M A
//! writes each block with the bias. F(2×2, 3×3) uses the points 0, ±1, for which the transforms are
//! exact additions and halvings, so f32 results stay within a few ulps of the direct sum; F(4×4, 3×3)
//! adds ±2, whose factors (up to 8, and 1/6, 1/24 in G) cost a few more ulps, still far below what the
//! images can show. The weight transform is per call, so [`worthwhile`] keeps Winograd for feature maps
//! large enough to repay it and [`Tile::choose`] takes the large tile only where it repays its 2.25×
//! larger U.
//!
//! Three schedules: with few channels (U fits in cache) every task carries a cache-sized chunk of windows
//! through all three steps; with many channels over few windows (V small, see [`by_channel_blocks`]),
//! each task transforms the weights of one block of output channels and carries them through the
//! products and the output transform, so U is never whole; otherwise U (up to 240 MB at SD's 1280
//! channels) is read once per large group of windows, the transforms spread over the threads and each
//! product over the threads too.
//! U, V and M live in per-thread buffers kept between calls (fresh allocations of that size fault in
//! every page; in the block schedule only V does, each task's few MiB of U and M are its own), and the
//! n U[ξ] and M[ξ] start at staggered offsets so the transforms, which touch all n at once, do not
//! thrash one cache set.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::sgemm::{self, PackedB, Start};
use super::vector::dispatched;
use super::{contiguous_f32, row_segments, threads, Segment, SharedMut};

/// Whether a 3×3 stride-1 convolution of `c_in` → `c_out` channels whose output is `batch` × `ho` × `wo`
/// is worth the weight transform, or the direct product of [`super::conv`] is as fast: below 128 output
/// positions (32 windows of F(2×2)) it never is, and with F(2×2) (see [`Tile::choose`]) only while U per
/// window stays within [`F2_MAX_U_PER_WINDOW`]. Measured side by side, best of seven, on an AMD EPYC
/// Zen 4 held to AVX2, with the weights transformed per block of output channels
/// ([`convolve_by_channel_blocks`]): at 8² × 2, 1280 / 2560 → 1280 channels (819k / 1.6M U floats per
/// window) F2 took 18.5–20.6 / 38.7–44.1 ms against 28.5 / 55.6 ms direct; at 8² × 1 10.9 against 11.4
/// ms (no gain, so not taken); at 4² × 2 10.1 against 7.5 ms.
pub fn worthwhile(batch: usize, (ho, wo): (usize, usize), c_in: usize, c_out: usize) -> bool {
    if batch * ho * wo < 128 {
        return false;
    }
    match Tile::choose(batch, (ho, wo), c_in, c_out) {
        Tile::F4 => true,
        Tile::F2 => {
            let windows = batch * ho.div_ceil(2) * wo.div_ceil(2);
            16 * c_in * c_out <= F2_MAX_U_PER_WINDOW * windows
        }
    }
}

/// With F(2×2), the most floats of U per window for which the weight transform still repays itself.
const F2_MAX_U_PER_WINDOW: usize = 1 << 21;

/// Convolves `xs` (b, c_in, h, w) with a 3×3 `weight` (c_out, c_in, 3, 3) at stride 1 and zero padding
/// `padding`, and adds `bias` (c_out); returns (b, c_out, h + 2p − 2, w + 2p − 2).
pub fn conv3x3(xs: &Tensor, weight: &Tensor, bias: &Tensor, padding: usize) -> Result<Tensor> {
    conv3x3_tiled(xs, weight, bias, padding, 1, None)
}

/// [`conv3x3`] of `xs` upsampled to twice its height and width (nearest neighbour, as the UNet's and
/// the VAE's upsamplers do before their convolution), reading `xs` in place: the upsampled map (four
/// times the input, 256 MiB before the VAE decoder's last 512² layers) is never made.
pub fn conv3x3_upsampled(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
) -> Result<Tensor> {
    conv3x3_tiled(xs, weight, bias, padding, 2, None)
}

/// [`conv3x3`] of `xs` upsampled `scale` times (1 or 2), with the tile forced (`None`: chosen by
/// [`Tile::choose`]).
fn conv3x3_tiled(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    scale: usize,
    tile: Option<Tile>,
) -> Result<Tensor> {
    let (_, c_in, h, w) = xs.dims4()?;
    let (h, w) = (h * scale, w * scale);
    let (c_out, w_in, kh, kw) = weight.dims4()?;
    if w_in != c_in
        || (kh, kw) != (3, 3)
        || bias.dims() != [c_out]
        || h + 2 * padding < 3
        || w + 2 * padding < 3
    {
        candle_core::bail!(
            "winograd conv: input {:?}, weight {:?}, bias {:?} with padding {padding} do not fit",
            xs.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    xs.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &Winograd {
            padding,
            scale,
            tile,
        },
    )
}

/// The Winograd tile: how many outputs one window yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tile {
    /// F(2×2, 3×3): 4×4 windows at stride 2, 16 points.
    F2,
    /// F(4×4, 3×3): 6×6 windows at stride 4, 36 points.
    F4,
}

/// G of F(2×2, 3×3) (points 0, 1, −1, ∞).
const G2: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// G of F(4×4, 3×3) (points 0, 1, −1, 2, −2, ∞).
const G4: [[f32; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

dispatched!(
    /// Row `o` of every U[ξ] = G g Gᵀ of tile `T`: the kernels `weights` (c_in × 9, one output
    /// channel's) are transformed and written at `u + ξ · u_stride + row` for ξ in order, followed by
    /// zeros up to `ldu` floats (`row` = (row, ldu)).
    ///
    /// # Safety
    /// `u` must be valid for writes of `ldu` floats at each of those places, which no other thread
    /// touches.
    unsafe fn weight_row<T: Transforms>(
        weights: &[f32],
        u: SharedMut,
        u_stride: usize,
        row: (usize, usize)
    ) -> () = T::weight_row
);

/// [`weight_row`] for a G of `S` rows (a constant, so that the loops unroll): sixteen kernels at
/// a time are turned from (kernel, tap) to (tap, kernel) order and transformed with the kernel index
/// innermost, so that every step is one vector operation over the sixteen; each U[ξ] gets sixteen
/// consecutive values, and the row's padding (`ldu` − c_in floats) is written as zeros.
#[inline(always)]
unsafe fn weight_row_with<const S: usize>(
    big_g: &[[f32; 3]; S],
    weights: &[f32],
    u: SharedMut,
    u_stride: usize,
    (row, ldu): (usize, usize),
) {
    let mut first = 0;
    #[cfg(target_arch = "x86_64")]
    if super::tier::Tier::active() >= super::tier::Tier::Avx2 {
        // SAFETY: the active tier is never above what the CPU has (see `tier`); the caller keeps
        // this function's contract, which `weight_row_avx2` shares.
        first = unsafe { weight_row_avx2(big_g, weights, u, u_stride, row) };
    }
    const LANES: usize = 16;
    let c_in = weights.len() / 9;
    let mut taps = [[0f32; LANES]; 9];
    let mut down = [[[0f32; LANES]; 3]; S];
    let mut out = [[0f32; LANES]; 36];
    for i0 in (first..c_in).step_by(LANES) {
        let len = LANES.min(c_in - i0);
        for (lane, kernel) in weights[i0 * 9..][..len * 9].chunks_exact(9).enumerate() {
            for (tap, &value) in kernel.iter().enumerate() {
                taps[tap][lane] = value;
            }
        }
        // G g (S × 3), then U = (G g) Gᵀ, each entry over the sixteen lanes at once.
        for (a, c) in big_g.iter().enumerate() {
            for col in 0..3 {
                for lane in 0..LANES {
                    down[a][col][lane] = c[0] * taps[col][lane]
                        + c[1] * taps[3 + col][lane]
                        + c[2] * taps[6 + col][lane];
                }
            }
        }
        for (a, r) in down.iter().enumerate() {
            for (b, c) in big_g.iter().enumerate() {
                for lane in 0..LANES {
                    out[a * S + b][lane] =
                        r[0][lane] * c[0] + r[1][lane] * c[1] + r[2][lane] * c[2];
                }
            }
        }
        for (xi, values) in out[..S * S].iter().enumerate() {
            copy_short(&values[..len], u.at(xi * u_stride + row + i0));
        }
    }
    for xi in 0..S * S {
        std::ptr::write_bytes(u.at(xi * u_stride + row + c_in), 0, ldu - c_in);
    }
}

/// [`weight_row_with`] for the kernels in whole runs of eight, in AVX2: the nine taps of eight kernels
/// (72 consecutive floats) are turned into nine vectors of one tap each by two 4 × 4 transposes and a
/// third for the last tap, so the kernels never pass through scalar stores and reloads (the portable
/// form's gather, which made it 6× slower for F(2×2) and 3× for F(4×4) with U in cache, measured on a
/// Zen 4). Returns how many kernels it transformed (the rest, fewer than eight, and the row's padding
/// are the caller's).
///
/// # Safety
/// As [`weight_row`]; the CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weight_row_avx2<const S: usize>(
    big_g: &[[f32; 3]; S],
    weights: &[f32],
    u: SharedMut,
    u_stride: usize,
    row: usize,
) -> usize {
    use std::arch::x86_64::*;
    let c_in = weights.len() / 9;
    let full = c_in / 8 * 8;
    for i0 in (0..full).step_by(8) {
        let base = weights.as_ptr().add(i0 * 9);
        let [t0, t1, t2, t3] = taps_avx2(base, 0);
        let [t4, t5, t6, t7] = taps_avx2(base, 4);
        let [_, _, _, t8] = taps_avx2(base, 5);
        let taps = [t0, t1, t2, t3, t4, t5, t6, t7, t8];
        // G g (S × 3, one vector per entry), then each U[ξ] = (G g) Gᵀ entry, stored at once.
        let mut down = [[_mm256_setzero_ps(); 3]; S];
        for (a, g) in big_g.iter().enumerate() {
            for col in 0..3 {
                down[a][col] = combine_avx2(g, taps[col], taps[3 + col], taps[6 + col]);
            }
        }
        for (a, r) in down.iter().enumerate() {
            for (b, g) in big_g.iter().enumerate() {
                _mm256_storeu_ps(
                    u.at((a * S + b) * u_stride + row + i0),
                    combine_avx2(g, r[0], r[1], r[2]),
                );
            }
        }
    }
    full
}

/// Taps `first .. first + 4` of the eight kernels at `base` (9 floats each), one vector per tap: rows of
/// four taps, kernel j in the low half and j + 4 in the high half, transposed 4 × 4 in each half.
///
/// # Safety
/// `base` must hold 72 floats from `first` ≤ 5 on; the CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn taps_avx2(base: *const f32, first: usize) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    let row = |j: usize| {
        _mm256_set_m128(
            _mm_loadu_ps(base.add((j + 4) * 9 + first)),
            _mm_loadu_ps(base.add(j * 9 + first)),
        )
    };
    let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
    let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
    let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
    [
        _mm256_shuffle_ps::<0x44>(t0, t2),
        _mm256_shuffle_ps::<0xEE>(t0, t2),
        _mm256_shuffle_ps::<0x44>(t1, t3),
        _mm256_shuffle_ps::<0xEE>(t1, t3),
    ]
}

/// `c · x` for a row `c` of G: three vector operations whatever the entries.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn combine_avx2(
    c: &[f32; 3],
    x0: std::arch::x86_64::__m256,
    x1: std::arch::x86_64::__m256,
    x2: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let sum = _mm256_mul_ps(_mm256_set1_ps(c[0]), x0);
    let sum = _mm256_fmadd_ps(_mm256_set1_ps(c[1]), x1, sum);
    _mm256_fmadd_ps(_mm256_set1_ps(c[2]), x2, sum)
}

/// The large tile's U takes at most this many floats (256 MiB, kept for the next call: see
/// [`KEEP_U_FLOATS`]). SD's 1280 → 1280 and 1920 → 640 layers on 32² maps (U of 236 and 177 MB) take it:
/// on 2 Zen 5 cores held to AVX2, 175 → 107 and 176 → 87 ms a call (a 512² SD 1.5 UNet step 6.92 →
/// 6.73 s, median of three alternated runs, peak +20 MiB); 2560 → 1280 (472 MB) stays on F(2×2).
const F4_MAX_U_FLOATS: usize = 1 << 26;

/// The large tile needs at least this many windows (batch · ⌈ho/4⌉ · ⌈wo/4⌉): its weight transform
/// writes 36 values per channel pair, which a product over fewer windows does not repay.
const F4_MIN_WINDOWS: usize = 64;

/// [`F4_MIN_WINDOWS`] where the weights are transformed per block of output channels
/// ([`by_channel_blocks`]), so U is never written out whole: 32 windows (SD's 1280-channel layers on
/// 16² maps at batch 2) repay it. On the Zen 4 at AVX2 (`conv_rate`, alternated): 1280 → 1280 F2
/// 43.5 / 46.0 / 47.5 ms, F4 35.3 / 37.0 / 38.5 ms (then 30 ms with [`BLOCK_U_FLOATS`]); 2560 → 1280
/// F2 89.5 / 90.4, F4 73.0 / 70.5 ms.
const F4_MIN_WINDOWS_BY_BLOCKS: usize = 32;

impl Tile {
    /// The tile for a convolution of `c_in` → `c_out` channels whose output is `batch` × `ho` × `wo`:
    /// the large one when there are enough windows to repay its weight transform and either its weights
    /// go by blocks of output channels ([`F4_MIN_WINDOWS_BY_BLOCKS`]: SD's 1280-channel layers on 16²
    /// maps) or its whole U stays within [`F4_MAX_U_FLOATS`] (on 8² maps they have too few windows and
    /// stay on F2, see [`worthwhile`]).
    fn choose(batch: usize, (ho, wo): (usize, usize), c_in: usize, c_out: usize) -> Tile {
        let windows = batch * ho.div_ceil(4) * wo.div_ceil(4);
        let by_blocks =
            windows >= F4_MIN_WINDOWS_BY_BLOCKS && by_channel_blocks(36, c_in, c_out, windows);
        if by_blocks || (windows >= F4_MIN_WINDOWS && 36 * c_in * c_out <= F4_MAX_U_FLOATS) {
            Tile::F4
        } else {
            Tile::F2
        }
    }
}

/// The custom op behind [`conv3x3`].
struct Winograd {
    padding: usize,
    /// The input is read as if upsampled this many times (1 or 2, nearest neighbour).
    scale: usize,
    /// Forced tile (tests); `None` lets [`Tile::choose`] decide.
    tile: Option<Tile>,
}

/// Floats between consecutive U[ξ] and M[ξ] beyond their size (one cache line).
const SKEW: usize = 16;

/// Up to this size of U (floats), the convolution runs chunk by chunk in cache (see `cpu_fwd`).
const PIPELINE_U_FLOATS: usize = 1 << 20;

/// Floats of V and M per chunk in that mode (1 MiB, half an L2).
const CHUNK_FLOATS: usize = 1 << 18;

/// Floats of V and M per group of windows (64 MiB for both together).
const GROUP_FLOATS: usize = 1 << 24;

impl CustomOp3 for Winograd {
    fn name(&self) -> &'static str {
        "pictor-winograd-conv3x3"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
        b_storage: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(x_storage, x_layout, self.name())?;
        let weight = contiguous_f32(w_storage, w_layout, self.name())?;
        let bias = contiguous_f32(b_storage, b_layout, self.name())?;
        let (batch, c_in, h, w) = x_layout.shape().dims4()?;
        let c_out = w_layout.shape().dims()[0];
        let (p, scale) = (self.padding, self.scale);
        let (ho, wo) = (scale * h + 2 * p - 2, scale * w + 2 * p - 2);
        let tile = self
            .tile
            .unwrap_or_else(|| Tile::choose(batch, (ho, wo), c_in, c_out));
        let source = Source {
            xs,
            c_in,
            size: (h, w),
            pad: p,
            scale,
        };
        let out = match tile {
            Tile::F2 => convolve::<F2x2>(&source, weight, bias, batch, c_out),
            Tile::F4 => convolve::<F4x4>(&source, weight, bias, batch, c_out),
        };
        Ok((CpuStorage::F32(out), Shape::from((batch, c_out, ho, wo))))
    }
}

/// The convolution with tile `T` (see [`Winograd`]); returns the (b, c_out, ho, wo) output.
fn convolve<T: Transforms>(
    source: &Source<'_>,
    weight: &[f32],
    bias: &[f32],
    batch: usize,
    c_out: usize,
) -> Vec<f32> {
    let (c_in, p) = (source.c_in, source.pad);
    let (h, w) = (source.scale * source.size.0, source.scale * source.size.1);
    let (ho, wo) = (h + 2 * p - 2, w + 2 * p - 2);
    let (step, points) = (T::STEP, T::POINTS);
    let (th, tw) = (ho.div_ceil(step), wo.div_ceil(step));

    SCRATCH.with_borrow_mut(|scratch| {
        let Scratch { u, v, m } = scratch;
        let windows = batch * th * tw;
        if by_channel_blocks(points, c_in, c_out, windows) {
            return convolve_by_channel_blocks::<T>(
                source,
                (weight, bias),
                (batch, c_out, ho, wo),
                (th, tw),
                v,
            );
        }
        // U = G g Gᵀ for every (o, i), stored (points, c_out, c_in).
        // Each U[ξ] (and M[ξ] below) starts 16 floats further into a 4 KiB page than the one
        // before: the transforms touch all of them at the same (o, i) or (o, window), and at
        // page-multiple strides those streams would fall into one L1 set.
        // Rows of U[ξ] at a stride the product can read in place (see sgemm::row_stride).
        let ldu = sgemm::row_stride(c_in);
        let u_stride = c_out * ldu + SKEW;
        // Every float of U is written below (rows with their padding, then the gaps between the
        // U[ξ]), so the buffer is not cleared first: at SD's 1280 channels that would be a single-
        // threaded pass over 100–240 MB.
        let len = points * u_stride;
        if u.capacity() < len {
            *u = Vec::with_capacity(len);
        }
        let u_ptr = SharedMut(u.as_mut_ptr());
        (0..c_out).into_par_iter().for_each(|o| {
            // SAFETY: row o of every U[ξ], padding included, is within the capacity (ldu floats
            // at o · ldu of U[ξ]) and written by this task only.
            unsafe {
                weight_row::<T>(
                    &weight[o * c_in * 9..][..c_in * 9],
                    u_ptr,
                    u_stride,
                    (o * ldu, ldu),
                )
            };
        });
        for xi in 0..points {
            // SAFETY: the SKEW floats after U[ξ] are within the capacity.
            unsafe { std::ptr::write_bytes(u_ptr.at(xi * u_stride + c_out * ldu), 0, SKEW) };
        }
        // SAFETY: all `len` floats were written above.
        unsafe { u.set_len(len) };

        let mut out = vec![0f32; batch * c_out * ho * wo];
        let dst = SharedMut(out.as_mut_ptr());
        if points * c_in * c_out <= PIPELINE_U_FLOATS {
            // Small channel counts: U stays in cache, so each task carries a cache-sized chunk of
            // windows through all three steps and V and M never leave L2.
            let chunk = (CHUNK_FLOATS / (points * (c_in + c_out)))
                .next_multiple_of(sgemm::NR)
                .max(sgemm::NR)
                .min(windows.div_ceil(threads()).next_multiple_of(sgemm::NR));
            let chunks = windows.div_ceil(chunk);
            let u = &*u;
            (0..chunks).into_par_iter().for_each_init(
                || {
                    (
                        Vec::new(),
                        Vec::new(),
                        (0..points).map(|_| PackedB::default()).collect::<Vec<_>>(),
                    )
                },
                |(rows, m, v), index| {
                    let start = index * chunk;
                    let len = chunk.min(windows - start);
                    let segments = row_segments(start, len, (th, tw));
                    for vx in v.iter_mut() {
                        vx.reshape(c_in, len);
                    }
                    let v_ptrs = panel_pointers(v);
                    let m_stride = c_out * len + SKEW;
                    m.resize(points * m_stride, 0.0);
                    // SAFETY: V[ξ] were reshaped to c_in × len; this task's own buffers.
                    unsafe { input_transform::<T>(source, rows, &segments, 0, &v_ptrs) };
                    products(u, (u_stride, ldu), v, m, m_stride, c_out, false);
                    // SAFETY: this task writes the outputs of its own windows only.
                    unsafe {
                        output_transform::<T>(
                            m,
                            m_stride,
                            len,
                            rows,
                            &segments,
                            0,
                            (c_out, ho, wo),
                            bias,
                            dst,
                        )
                    };
                },
            );
            return out;
        }
        // Windows per group: V and M of a group take at most GROUP_FLOATS, and a group is a whole
        // number of sgemm panels wide (transform tasks then write disjoint panels of V).
        let group = (GROUP_FLOATS / (points * (c_in + c_out)))
            .max(sgemm::NR)
            .next_multiple_of(sgemm::NR)
            .min(windows.next_multiple_of(sgemm::NR));
        v.resize_with(points, PackedB::default);
        m.resize(points * (c_out * group + SKEW), 0.0);
        for g0 in (0..windows).step_by(group) {
            let glen = group.min(windows - g0);
            let m_stride = c_out * glen + SKEW;
            let piece = transform_windows::<T>(source, v, (g0, glen), (th, tw));
            products(u, (u_stride, ldu), v, m, m_stride, c_out, true);
            let m = &*m;
            for_each_piece((g0, glen), piece, (th, tw), |rows, j_start, segments| {
                // SAFETY: this task writes the outputs of its windows only.
                unsafe {
                    output_transform::<T>(
                        &m[..points * m_stride],
                        m_stride,
                        glen,
                        rows,
                        segments,
                        j_start,
                        (c_out, ho, wo),
                        bias,
                        dst,
                    )
                };
            });
        }
        release_large(u);
        out
    })
}

/// Whether a convolution of `c_in` → `c_out` channels over `windows` windows of `points` points runs by
/// [`convolve_by_channel_blocks`]: U too large to stay in cache, V small enough to be read again by every
/// block of output channels.
fn by_channel_blocks(points: usize, c_in: usize, c_out: usize, windows: usize) -> bool {
    let v_floats = points * c_in * windows;
    points * c_in * c_out > PIPELINE_U_FLOATS && v_floats <= FUSED_MAX_V_FLOATS
}

/// The most floats of V for [`convolve_by_channel_blocks`] (16 MiB).
const FUSED_MAX_V_FLOATS: usize = 1 << 22;

/// Output channels per task of [`convolve_by_channel_blocks`] for U[ξ] rows of `ldu` floats: a multiple
/// of 12 (the AVX-512 register tile's rows) from 12 to 48, the task's U within [`BLOCK_U_FLOATS`], and
/// at least four tasks per thread.
fn channel_block(c_out: usize, points: usize, ldu: usize) -> usize {
    let by_size = BLOCK_U_FLOATS / (points * ldu) / 12 * 12;
    by_size
        .clamp(12, 48)
        .min(c_out.div_ceil(4 * threads()).next_multiple_of(12))
}

/// The most floats of U one task of [`convolve_by_channel_blocks`] holds (5 MiB). On the Zen 4 at AVX2
/// (`conv_rate`, two alternated rounds), 2560 → 1280 channels on 16² maps with F(4×4): 48 output
/// channels a task (17.8 MB of U each) 88.9 / 94.3 ms, 24 (this bound at 1280 input channels) 80.1 /
/// 77.7, 12 (this bound at 2560) 73.0 / 70.5 ms; 1280 → 1280 likewise 34.0 / 36.8 → 30.8 / 31.0 ms.
const BLOCK_U_FLOATS: usize = 5 << 18;

/// The schedule for layers with many channels over few windows (SD's 1280-channel layers on 16² and 8²
/// maps, 640 on 32²), whose U is several times their V: V for every window first; then each task takes
/// a block of output channels, transforms only their weights into a buffer of its own, multiplies them
/// by every V[ξ] and writes those channels' outputs. U is never written out whole (106 MB at 1280 → 1280
/// channels with F(2×2), written to memory and read back once per call by the other schedule), and M
/// stays in the task's cache.
/// `tiles` is the (rows, columns) grid of windows per image, as [`convolve`] found it for the
/// (b, c_out, ho, wo) output.
fn convolve_by_channel_blocks<T: Transforms>(
    source: &Source<'_>,
    (weight, bias): (&[f32], &[f32]),
    (batch, c_out, ho, wo): (usize, usize, usize, usize),
    tiles: (usize, usize),
    v: &mut Vec<PackedB>,
) -> Vec<f32> {
    let (c_in, points) = (source.c_in, T::POINTS);
    let windows = batch * tiles.0 * tiles.1;
    let ldu = sgemm::row_stride(c_in);

    v.resize_with(points, PackedB::default);
    transform_windows::<T>(source, v, (0, windows), tiles);

    let mut out = vec![0f32; batch * c_out * ho * wo];
    let dst = SharedMut(out.as_mut_ptr());
    let block = channel_block(c_out, points, ldu);
    let segments = row_segments(0, windows, tiles);
    let v = &*v;
    (0..c_out.div_ceil(block)).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(u, m, rows), index| {
            let first = index * block;
            let count = block.min(c_out - first);
            // This block's rows of every U[ξ] and M[ξ], one cache line apart (see `convolve`).
            let u_stride = count * ldu + SKEW;
            let m_stride = count * windows + SKEW;
            u.resize(points * u_stride, 0.0);
            m.resize(points * m_stride, 0.0);
            let u_ptr = SharedMut(u.as_mut_ptr());
            for o in 0..count {
                let kernels = &weight[(first + o) * c_in * 9..][..c_in * 9];
                // SAFETY: row o of every U[ξ] of this task's own buffer, padding included, fits.
                unsafe { weight_row::<T>(kernels, u_ptr, u_stride, (o * ldu, ldu)) };
            }
            for (xi, vx) in v.iter().enumerate() {
                sgemm::gemm_serial(
                    count,
                    &u[xi * u_stride..],
                    ldu,
                    vx,
                    &mut m[xi * m_stride..][..count * windows],
                    windows,
                    Start::Zero,
                );
            }
            // SAFETY: this task writes the outputs of its own channels only; the output of channel
            // first + o is where `output_transform` puts channel o of a tensor starting first
            // channels further on.
            unsafe {
                output_transform::<T>(
                    m,
                    m_stride,
                    windows,
                    rows,
                    &segments,
                    0,
                    (c_out, ho, wo),
                    &bias[first..first + count],
                    SharedMut(dst.at(first * ho * wo)),
                )
            };
        },
    );
    out
}

/// V[ξ] = Bᵀ d B, each reshaped to c_in × `glen`, for the windows `g0 .. g0 + glen` of a `tiles` grid,
/// the transform spread over the pool in runs a whole number of panels long (about two per thread, so
/// tasks write disjoint panels of V); returns that run length.
fn transform_windows<T: Transforms>(
    source: &Source<'_>,
    v: &mut [PackedB],
    (g0, glen): (usize, usize),
    tiles: (usize, usize),
) -> usize {
    for vx in v.iter_mut() {
        vx.reshape(source.c_in, glen);
    }
    let piece = glen
        .div_ceil(2 * threads())
        .next_multiple_of(sgemm::NR)
        .max(sgemm::NR);
    let v_ptrs = panel_pointers(v);
    for_each_piece((g0, glen), piece, tiles, |rows, j_start, segments| {
        // SAFETY: this task writes the columns of its windows in every V[ξ] (reshaped to c_in ×
        // glen above) and nothing else.
        unsafe { input_transform::<T>(source, rows, segments, j_start, &v_ptrs) };
    });
    piece
}

/// Runs `work(rows, j_start, segments)` over the group of `glen` windows from window `g0` in runs of
/// `piece` windows spread over the pool: `j_start` is the run's first window within the group,
/// `segments` its windows row by row (of a `tiles` grid), `rows` a per-thread scratch buffer.
fn for_each_piece(
    (g0, glen): (usize, usize),
    piece: usize,
    tiles: (usize, usize),
    work: impl Fn(&mut Vec<f32>, usize, &[Segment]) + Sync + Send,
) {
    (0..glen.div_ceil(piece))
        .into_par_iter()
        .for_each_init(Vec::new, |rows, index| {
            let j_start = index * piece;
            let len = piece.min(glen - j_start);
            work(rows, j_start, &row_segments(g0 + j_start, len, tiles));
        });
}

/// Pointers to the data of each V[ξ], for transform tasks that write disjoint columns of all of them.
fn panel_pointers(v: &mut [PackedB]) -> Vec<SharedMut> {
    v.iter_mut()
        .map(|vx| SharedMut(vx.data_mut().as_mut_ptr()))
        .collect()
}

/// A thread's buffers for [`Winograd`], kept between calls: the transformed weights, V and M are tens
/// to hundreds of MiB on SD's layers, and fresh allocations of that size cost a page fault per 4 KiB.
#[derive(Default)]
struct Scratch {
    /// U = G g Gᵀ, (points, c_out, c_in).
    u: Vec<f32>,
    /// V[ξ] of the current group of windows.
    v: Vec<PackedB>,
    /// M[ξ] = U[ξ] · V[ξ] of the current group, (points, c_out, windows).
    m: Vec<f32>,
}

/// M[ξ] (c_out × windows) = U[ξ] (c_out × c_in, rows at `ldu`, slices `u_stride` apart) · V[ξ]
/// (c_in × windows) for every ξ, M[ξ] at `m_stride` apart; each product spread over the threads
/// when `parallel`, else on the calling thread.
fn products(
    u: &[f32],
    (u_stride, ldu): (usize, usize),
    v: &[PackedB],
    m: &mut [f32],
    m_stride: usize,
    c_out: usize,
    parallel: bool,
) {
    for (xi, vx) in v.iter().enumerate() {
        let windows = vx.n();
        let (u, m) = (
            &u[xi * u_stride..][..c_out * ldu],
            &mut m[xi * m_stride..][..c_out * windows],
        );
        sgemm::gemm_maybe_parallel(parallel, c_out, u, ldu, vx, m, windows, Start::Zero);
    }
}

/// Above this many floats (256 MiB), U is not kept for the next call. Kept, the one buffer serves every
/// layer (SD's largest U are 239 MB); freed, each large layer gets a fresh block whose pages the kernel
/// faults in and clears again: at avx2 on 2 Zen 5 cores the weight transforms of a 512² SD 1.5 UNet step
/// took 356 ms with a 64 MiB bound and 211 ms with this one, for a peak 190 MiB higher (4151 MiB,
/// PyTorch's is 4459). [`super::release_buffers`] frees it when a generation ends.
const KEEP_U_FLOATS: usize = 1 << 26;

/// Frees `u` when it is too large to keep (see [`KEEP_U_FLOATS`]).
fn release_large(u: &mut Vec<f32>) {
    if u.capacity() > KEEP_U_FLOATS {
        *u = Vec::new();
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Frees the calling thread's [`Scratch`] (U, V and M: up to a few hundred MiB after SD's 1280-channel
/// layers).
pub(super) fn release_buffers() {
    SCRATCH.with_borrow_mut(|scratch| *scratch = Scratch::default());
}

/// One tile's transforms of a run of `count` consecutive windows along a row, written as contiguous
/// loops over the run (so they vectorise); [`input_transform_body`] and [`output_transform_body`] walk
/// channels and runs and move the data.
trait Transforms {
    /// Side of the output block (and stride between windows).
    const STEP: usize;
    /// Points ξ per window.
    const POINTS: usize;
    /// Scratch rows (of n floats) the input transform needs besides its POINTS result rows.
    const INPUT_SCRATCH: usize;
    /// Scratch rows (of n floats) the output transform needs besides its output line (STEP·n).
    const OUTPUT_SCRATCH: usize;

    /// The body of [`weight_row`]: this tile's G applied by [`weight_row_with`].
    ///
    /// # Safety
    /// As [`weight_row`].
    unsafe fn weight_row(weights: &[f32], u: SharedMut, u_stride: usize, row: (usize, usize));

    /// V for the windows whose input rows are `padded[base + y·wp ..]` (`at` = (base, wp), y over the
    /// window's rows): result row ξ (window k at `results[ξ·n + k]`); `n` ≥ count + 1.
    fn input_run(
        padded: &[f32],
        at: (usize, usize),
        count: usize,
        n: usize,
        scratch: &mut [f32],
        results: &mut [f32],
    );

    /// Aᵀ (down) of the run whose M[ξ] values are `m[ξ·m_stride + at ..][..count]` (`place` =
    /// (m_stride, at)), into `scratch`.
    fn output_down(m: &[f32], place: (usize, usize), count: usize, n: usize, scratch: &mut [f32]);

    /// A (across) of output row `dy` from `scratch` (as left by [`Transforms::output_down`]), plus the
    /// bias, into `line` (STEP·count outputs).
    fn output_across(
        scratch: &[f32],
        n: usize,
        count: usize,
        dy: usize,
        bias: f32,
        line: &mut [f32],
    );
}

/// F(2×2, 3×3): G in [`G2`], Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]],
/// Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
struct F2x2;

impl Transforms for F2x2 {
    const STEP: usize = 2;
    const POINTS: usize = 16;
    const INPUT_SCRATCH: usize = 8;
    const OUTPUT_SCRATCH: usize = 8;

    #[inline(always)]
    unsafe fn weight_row(weights: &[f32], u: SharedMut, u_stride: usize, row: (usize, usize)) {
        weight_row_with(&G2, weights, u, u_stride, row)
    }

    /// The four input rows are split into even and odd columns (E, O), transformed down as whole rows,
    /// then across: window k of a transformed row spans E[k], O[k], E[k+1], O[k+1].
    #[inline(always)]
    fn input_run(
        padded: &[f32],
        (base, wp): (usize, usize),
        count: usize,
        n: usize,
        split: &mut [f32],
        results: &mut [f32],
    ) {
        for y in 0..4 {
            let src = &padded[base + y * wp..][..2 * count + 2];
            let (even, odd) = split[2 * y * n..(2 * y + 2) * n].split_at_mut(n);
            for (x, pair) in src.chunks_exact(2).enumerate() {
                even[x] = pair[0];
                odd[x] = pair[1];
            }
        }
        // Down (Bᵀ) per parity: t_a = (d0 − d2, d1 + d2, d2 − d1, d1 − d3), computed in place (each
        // element is read only by its own position).
        for parity in 0..2 {
            let at = |y: usize| (2 * y + parity) * n;
            for x in 0..=count {
                let (d0, d1, d2, d3) = (
                    split[at(0) + x],
                    split[at(1) + x],
                    split[at(2) + x],
                    split[at(3) + x],
                );
                split[at(0) + x] = d0 - d2;
                split[at(1) + x] = d1 + d2;
                split[at(2) + x] = d2 - d1;
                split[at(3) + x] = d1 - d3;
            }
        }
        // Across (B) for each transformed row a: (E[k] − E[k+1], O[k] + E[k+1], E[k+1] − O[k],
        // O[k] − O[k+1]).
        for a in 0..4 {
            let e = &split[2 * a * n..][..count + 1];
            let o = &split[(2 * a + 1) * n..][..count + 1];
            let out = &mut results[4 * a * n..][..4 * n];
            let (r0, rest) = out.split_at_mut(n);
            let (r1, rest) = rest.split_at_mut(n);
            let (r2, r3) = rest.split_at_mut(n);
            for k in 0..count {
                r0[k] = e[k] - e[k + 1];
                r1[k] = o[k] + e[k + 1];
                r2[k] = e[k + 1] - o[k];
                r3[k] = o[k] - o[k + 1];
            }
        }
    }

    /// Row dy, column c of the down pass: dy 0: m0 + m1 + m2, dy 1: m1 − m2 − m3 (rows of M), stored at
    /// `(4·dy + c)·n`.
    #[inline(always)]
    fn output_down(
        m: &[f32],
        (m_stride, at): (usize, usize),
        count: usize,
        n: usize,
        down: &mut [f32],
    ) {
        let mv = |xi: usize| &m[xi * m_stride + at..][..count];
        for dy in 0..2 {
            for c in 0..4 {
                let (top, mid, bottom) = (mv(4 * dy + c), mv(4 * dy + 4 + c), mv(4 * dy + 8 + c));
                let sign = if dy == 0 { 1.0 } else { -1.0 };
                let out = &mut down[(4 * dy + c) * n..][..count];
                for k in 0..count {
                    out[k] = top[k] + sign * (mid[k] + bottom[k]);
                }
            }
        }
    }

    /// Even outputs s0 + s1 + s2, odd ones s1 − s2 − s3, interleaved.
    #[inline(always)]
    fn output_across(down: &[f32], n: usize, count: usize, dy: usize, bias: f32, line: &mut [f32]) {
        let s = |c: usize| &down[(4 * dy + c) * n..][..count];
        let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
        let line = &mut line[..2 * count];
        for k in 0..count {
            line[2 * k] = s0[k] + s1[k] + s2[k] + bias;
            line[2 * k + 1] = s1[k] - s2[k] - s3[k] + bias;
        }
    }
}

/// F(4×4, 3×3) (points 0, ±1, ±2, ∞): G in [`G4`], Bᵀ in [`bt4`], Aᵀ in [`at4`].
struct F4x4;

/// Bᵀ of F(4×4, 3×3) applied to one column (d0 … d5).
#[inline(always)]
fn bt4([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
    [
        4.0 * d0 - 5.0 * d2 + d4,
        d3 + d4 - 4.0 * (d1 + d2),
        d4 - d3 + 4.0 * (d1 - d2),
        d4 - d2 + 2.0 * (d3 - d1),
        d4 - d2 + 2.0 * (d1 - d3),
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// Aᵀ of F(4×4, 3×3) applied to one column (m0 … m5).
#[inline(always)]
fn at4([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
    let (p, q, r, s) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [m0 + p + r, q + 2.0 * s, p + 4.0 * r, q + 8.0 * s + m5]
}

impl Transforms for F4x4 {
    const STEP: usize = 4;
    const POINTS: usize = 36;
    const INPUT_SCRATCH: usize = 28;
    const OUTPUT_SCRATCH: usize = 24;

    #[inline(always)]
    unsafe fn weight_row(weights: &[f32], u: SharedMut, u_stride: usize, row: (usize, usize)) {
        weight_row_with(&G4, weights, u, u_stride, row)
    }

    /// The six input rows are transformed down as whole rows (six rows of up to 4n), each result row
    /// is split into its four column phases (P_r[k] = row[4k + r], four rows of n), and transformed
    /// across: window k spans P0[k] … P3[k], P0[k+1], P1[k+1].
    #[inline(always)]
    fn input_run(
        padded: &[f32],
        (base, wp): (usize, usize),
        count: usize,
        n: usize,
        scratch: &mut [f32],
        results: &mut [f32],
    ) {
        let width = 4 * count + 2;
        let (down, phases) = scratch.split_at_mut(24 * n);
        {
            let row = |y: usize| &padded[base + y * wp..][..width];
            let (d0, d1, d2, d3, d4, d5) = (row(0), row(1), row(2), row(3), row(4), row(5));
            let (t0, rest) = down.split_at_mut(4 * n);
            let (t1, rest) = rest.split_at_mut(4 * n);
            let (t2, rest) = rest.split_at_mut(4 * n);
            let (t3, rest) = rest.split_at_mut(4 * n);
            let (t4, t5) = rest.split_at_mut(4 * n);
            let (t0, t1, t2) = (&mut t0[..width], &mut t1[..width], &mut t2[..width]);
            let (t3, t4, t5) = (&mut t3[..width], &mut t4[..width], &mut t5[..width]);
            for x in 0..width {
                let [r0, r1, r2, r3, r4, r5] = bt4([d0[x], d1[x], d2[x], d3[x], d4[x], d5[x]]);
                t0[x] = r0;
                t1[x] = r1;
                t2[x] = r2;
                t3[x] = r3;
                t4[x] = r4;
                t5[x] = r5;
            }
        }
        for a in 0..6 {
            let t = &down[a * 4 * n..][..width];
            let (p0, rest) = phases.split_at_mut(n);
            let (p1, rest) = rest.split_at_mut(n);
            let (p2, p3) = rest.split_at_mut(n);
            for (k, quad) in t.chunks_exact(4).enumerate() {
                p0[k] = quad[0];
                p1[k] = quad[1];
                p2[k] = quad[2];
                p3[k] = quad[3];
            }
            p0[count] = t[4 * count];
            p1[count] = t[4 * count + 1];
            let (p0, p1, p2, p3) = (&p0[..=count], &p1[..=count], &p2[..count], &p3[..count]);
            let (p0_next, p1_next) = (&p0[1..], &p1[1..]);
            let out = &mut results[6 * a * n..][..6 * n];
            let (r0, rest) = out.split_at_mut(n);
            let (r1, rest) = rest.split_at_mut(n);
            let (r2, rest) = rest.split_at_mut(n);
            let (r3, rest) = rest.split_at_mut(n);
            let (r4, r5) = rest.split_at_mut(n);
            let (r0, r1, r2) = (&mut r0[..count], &mut r1[..count], &mut r2[..count]);
            let (r3, r4, r5) = (&mut r3[..count], &mut r4[..count], &mut r5[..count]);
            for k in 0..count {
                let [e0, e1, e2, e3, e4, e5] =
                    bt4([p0[k], p1[k], p2[k], p3[k], p0_next[k], p1_next[k]]);
                r0[k] = e0;
                r1[k] = e1;
                r2[k] = e2;
                r3[k] = e3;
                r4[k] = e4;
                r5[k] = e5;
            }
        }
    }

    /// All four rows of the down pass for each window column c, stored at `(4·c + dy)·n`.
    #[inline(always)]
    fn output_down(
        m: &[f32],
        (m_stride, at): (usize, usize),
        count: usize,
        n: usize,
        down: &mut [f32],
    ) {
        let mv = |xi: usize| &m[xi * m_stride + at..][..count];
        for c in 0..6 {
            let (m0, m1, m2) = (mv(c), mv(6 + c), mv(12 + c));
            let (m3, m4, m5) = (mv(18 + c), mv(24 + c), mv(30 + c));
            let block = &mut down[4 * c * n..][..4 * n];
            let (d0, rest) = block.split_at_mut(n);
            let (d1, rest) = rest.split_at_mut(n);
            let (d2, d3) = rest.split_at_mut(n);
            let (d0, d1, d2, d3) = (
                &mut d0[..count],
                &mut d1[..count],
                &mut d2[..count],
                &mut d3[..count],
            );
            for k in 0..count {
                let [y0, y1, y2, y3] = at4([m0[k], m1[k], m2[k], m3[k], m4[k], m5[k]]);
                d0[k] = y0;
                d1[k] = y1;
                d2[k] = y2;
                d3[k] = y3;
            }
        }
    }

    /// Aᵀ across the six columns of row dy, the four outputs of each window interleaved.
    #[inline(always)]
    fn output_across(down: &[f32], n: usize, count: usize, dy: usize, bias: f32, line: &mut [f32]) {
        let s = |c: usize| &down[(4 * c + dy) * n..][..count];
        let (s0, s1, s2, s3, s4, s5) = (s(0), s(1), s(2), s(3), s(4), s(5));
        let line = &mut line[..4 * count];
        for (k, block) in line.chunks_exact_mut(4).enumerate() {
            let ys = at4([s0[k], s1[k], s2[k], s3[k], s4[k], s5[k]]);
            block[0] = ys[0] + bias;
            block[1] = ys[1] + bias;
            block[2] = ys[2] + bias;
            block[3] = ys[3] + bias;
        }
    }
}

dispatched!(
    /// V = Bᵀ d B of tile `T` for the windows of `segments` (columns `j_base + segment offset ..` of
    /// each V[ξ]).
    ///
    /// # Safety
    /// `v[ξ]` must point at V[ξ], packed by [`PackedB::reshape`] as c_in × (at least the columns
    /// written), and no other thread may touch these columns.
    unsafe fn input_transform<T: Transforms>(
        source: &Source<'_>,
        rows: &mut Vec<f32>,
        segments: &[Segment],
        j_base: usize,
        v: &[SharedMut]
    ) -> () = input_transform_body::<T>
);

/// The input as the input transform reads it: (b, c_in, h, w), upsampled `scale` times (nearest
/// neighbour) and seen through `pad` zeros on every side, without a padded or upsampled copy (at the
/// VAE decoder's 512² layers each would be 256 MiB).
struct Source<'a> {
    xs: &'a [f32],
    c_in: usize,
    /// (h, w) of `xs`.
    size: (usize, usize),
    pad: usize,
    scale: usize,
}

impl Source<'_> {
    /// Copies `rows` rows of `width` values of channel `channel` of image `image`, from padded row
    /// `top` and column `left` on, into `patch` (rows `stride` apart); zeros where they fall outside
    /// the input.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &self,
        (image, channel): (usize, usize),
        (top, left): (usize, usize),
        rows: usize,
        width: usize,
        patch: &mut [f32],
        stride: usize,
    ) {
        let (h, w) = self.size;
        let scale = self.scale;
        let plane = &self.xs[(image * self.c_in + channel) * h * w..][..h * w];
        // Columns of the patch that fall on the (upsampled) input: [first, last).
        let first = self.pad.saturating_sub(left).min(width);
        let last = (scale * w + self.pad)
            .saturating_sub(left)
            .clamp(first, width);
        let x0 = (left + first).saturating_sub(self.pad);
        for r in 0..rows {
            let dst = &mut patch[r * stride..][..width];
            match (top + r).checked_sub(self.pad).filter(|&y| y < scale * h) {
                Some(y) => {
                    dst[..first].fill(0.0);
                    let row = &plane[y / scale * w..][..w];
                    let inside = &mut dst[first..last];
                    if scale == 1 {
                        inside.copy_from_slice(&row[x0..][..inside.len()]);
                    } else {
                        for (k, value) in inside.iter_mut().enumerate() {
                            *value = row[(x0 + k) / scale];
                        }
                    }
                    dst[last..].fill(0.0);
                }
                None => dst.fill(0.0),
            }
        }
    }
}

/// The body of [`input_transform`]: per input channel and run of windows, [`Transforms::input_run`],
/// then each result row is copied into V[ξ] in pieces that stay within a panel.
#[inline(always)]
unsafe fn input_transform_body<T: Transforms>(
    source: &Source<'_>,
    rows: &mut Vec<f32>,
    segments: &[Segment],
    j_base: usize,
    v: &[SharedMut],
) {
    const NR: usize = sgemm::NR;
    let c_in = source.c_in;
    let n = segments.iter().map(|s| s.count + 1).max().unwrap_or(0);
    // The window rows of one run, gathered from the input with their padding.
    let patch_width = T::STEP * n + 2;
    let patch_floats = (T::STEP + 2) * patch_width;
    rows.resize((T::INPUT_SCRATCH + T::POINTS) * n + patch_floats, 0.0);
    let (scratch, rest) = rows.split_at_mut(T::INPUT_SCRATCH * n);
    let (results, patch) = rest.split_at_mut(T::POINTS * n);
    for i in 0..c_in {
        for &Segment {
            image: b,
            row: ty,
            col: tx,
            count,
            offset,
        } in segments
        {
            source.gather(
                (b, i),
                (T::STEP * ty, T::STEP * tx),
                T::STEP + 2,
                T::STEP * count + 2,
                patch,
                patch_width,
            );
            T::input_run(patch, (0, patch_width), count, n, scratch, results);
            // Copy out: columns j.. of row i of each V[ξ], a panel (NR columns) at a time.
            let mut k = 0;
            while k < count {
                let j = j_base + offset + k;
                let piece = (NR - j % NR).min(count - k);
                let at = sgemm::panel_offset(c_in, i, j);
                for (xi, vx) in v.iter().enumerate() {
                    copy_short(&results[xi * n + k..][..piece], vx.at(at));
                }
                k += piece;
            }
        }
    }
}

dispatched!(
    /// Y = Aᵀ M A of tile `T` plus the bias for the windows of `segments` (columns `j_base + segment
    /// offset ..` of each M[ξ], c_out × `len` at stride `m_stride` between the ξ).
    ///
    /// # Safety
    /// `dst` must point at the (b, c_out, ho, wo) output, and no other thread may write these windows'
    /// outputs.
    #[allow(clippy::too_many_arguments)]
    unsafe fn output_transform<T: Transforms>(
        m: &[f32],
        m_stride: usize,
        len: usize,
        rows: &mut Vec<f32>,
        segments: &[Segment],
        j_base: usize,
        shape: (usize, usize, usize),
        bias: &[f32],
        dst: SharedMut
    ) -> () = output_transform_body::<T>
);

/// The body of [`output_transform`]: per output channel and run of windows, the down pass once, then
/// each output row across and written out.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn output_transform_body<T: Transforms>(
    m: &[f32],
    m_stride: usize,
    len: usize,
    rows: &mut Vec<f32>,
    segments: &[Segment],
    j_base: usize,
    (c_out, ho, wo): (usize, usize, usize),
    bias: &[f32],
    dst: SharedMut,
) {
    let n = segments.iter().map(|s| s.count).max().unwrap_or(0);
    rows.resize((T::OUTPUT_SCRATCH + T::STEP) * n, 0.0);
    let (down, line) = rows.split_at_mut(T::OUTPUT_SCRATCH * n);
    for (o, &bias) in bias.iter().enumerate() {
        for &Segment {
            image: b,
            row: ty,
            col: tx,
            count,
            offset,
        } in segments
        {
            T::output_down(m, (m_stride, o * len + j_base + offset), count, n, down);
            let x0 = T::STEP * tx;
            let width = (T::STEP * count).min(wo - x0);
            for dy in 0..T::STEP {
                let y = T::STEP * ty + dy;
                if y >= ho {
                    break;
                }
                T::output_across(down, n, count, dy, bias, line);
                let at = ((b * c_out + o) * ho + y) * wo + x0;
                std::ptr::copy_nonoverlapping(line.as_ptr(), dst.at(at), width);
            }
        }
    }
}

/// Copies a short run (at most a panel) to `dst` with inline vector moves: `copy_nonoverlapping` of a
/// run whose length is not known at compile time is a call to `memcpy`, which costs more than the copy.
///
/// # Safety
/// `dst` must be valid for `src.len()` writes.
#[inline(always)]
unsafe fn copy_short(src: &[f32], dst: *mut f32) {
    let mut chunks = src.chunks_exact(16);
    let mut at = dst;
    for chunk in &mut chunks {
        let block: [f32; 16] = chunk.try_into().unwrap_or([0.0; 16]);
        at.cast::<[f32; 16]>().write_unaligned(block);
        at = at.add(16);
    }
    for (q, &value) in chunks.remainder().iter().enumerate() {
        *at.add(q) = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_kept_buffers_are_freed_on_request() -> Result<()> {
        let xs = Tensor::randn(0f32, 1.0, (1, 64, 16, 16), &Device::Cpu)?;
        let weight = Tensor::randn(0f32, 0.1, (64, 64, 3, 3), &Device::Cpu)?;
        let bias = Tensor::zeros(64, candle_core::DType::F32, &Device::Cpu)?;
        let held = || SCRATCH.with_borrow(|scratch| scratch.u.capacity());
        conv3x3(&xs, &weight, &bias, 1)?;
        assert!(held() >= 16 * 64 * 64, "U is kept between calls");
        super::super::release_buffers();
        assert_eq!(held(), 0);
        Ok(())
    }

    #[test]
    fn equals_candle_conv2d_on_awkward_shapes_at_every_tier() -> Result<()> {
        super::super::at_every_tier(equals_candle_conv2d_on_awkward_shapes)
    }

    fn equals_candle_conv2d_on_awkward_shapes() -> Result<()> {
        let device = Device::Cpu;
        // (batch, c_in, c_out, h, w, padding): sizes that leave partial blocks of both tiles, non-square,
        // odd channel counts, no padding, batch 1 and 8, many chunks.
        for &(b, c_in, c_out, h, w, p) in &[
            (1, 3, 5, 7, 9, 1),
            (8, 4, 6, 5, 3, 1),
            (1, 7, 3, 1, 1, 1),
            (1, 6, 4, 8, 5, 0),
            (2, 13, 17, 70, 45, 1),
            (8, 3, 3, 4, 4, 1),
            (1, 33, 129, 31, 64, 1),
            (1, 5, 7, 37, 38, 1),
            // Channels past the chunked mode: two groups of windows, the second partial.
            (1, 260, 300, 90, 88, 1),
            // Many channels over few windows: by blocks of output channels (the last one partial),
            // with a run of fewer than eight kernels at the end of each row of U.
            (2, 203, 340, 9, 7, 1),
        ] {
            let xs = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &device)?;
            let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &device)?;
            let bias = Tensor::randn(0f32, 1.0, c_out, &device)?;
            // The weights over the input itself, then over it upsampled twice (read in place).
            for scale in [1, 2] {
                let input = xs.upsample_nearest2d(scale * h, scale * w)?;
                let plain = input
                    .conv2d(&weight, p, 1, 1, 1)?
                    .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
                // Tolerance relative to the outputs' size (their std grows as √(9 c_in)).
                let size = plain.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                for (tile, tolerance) in [(Tile::F2, 4e-6), (Tile::F4, 5e-5)] {
                    let fast = conv3x3_tiled(&xs, &weight, &bias, p, scale, Some(tile))?;
                    assert_eq!(fast.dims(), plain.dims());
                    let diff = super::super::max_abs_diff(&fast, &plain)? / size;
                    assert!(
                        diff < tolerance,
                        "×{scale}, {tile:?} {b}x{c_in}x{h}x{w} → {c_out}, pad {p}: {diff}"
                    );
                }
            }
        }
        let xs = Tensor::zeros((1, 2, 3, 3), candle_core::DType::F32, &device)?;
        let weight = Tensor::zeros((4, 2, 1, 1), candle_core::DType::F32, &device)?;
        let bias = Tensor::zeros(4, candle_core::DType::F32, &device)?;
        assert!(conv3x3(&xs, &weight, &bias, 1).is_err());
        Ok(())
    }

    #[test]
    fn many_channels_over_few_windows_go_by_blocks_of_output_channels() {
        // The test shape above, both tiles (16 points over 2 · 5 · 4 windows, 36 over 2 · 3 · 2).
        assert!(by_channel_blocks(16, 203, 340, 40));
        assert!(by_channel_blocks(36, 203, 340, 12));
        // SD's 1280-channel layers on 16² and 8² maps, 640 on 32²; not 320 on 64² (V of 5.9M floats).
        assert!(by_channel_blocks(16, 1280, 1280, 128));
        assert!(by_channel_blocks(16, 2560, 1280, 32));
        assert!(by_channel_blocks(36, 640, 640, 128));
        assert!(!by_channel_blocks(36, 320, 320, 512));
        // Few channels: U stays in cache, chunks of windows instead.
        assert!(!by_channel_blocks(16, 64, 64, 40));
    }

    #[test]
    fn large_tile_only_where_it_repays_its_weight_transform() {
        // SD's 320 channels on a 64² latent: the large tile.
        assert_eq!(Tile::choose(2, (64, 64), 320, 320), Tile::F4);
        // 1280 channels on a 32² map: 128 windows repay a U of 236 MB.
        assert_eq!(Tile::choose(2, (32, 32), 1280, 1280), Tile::F4);
        assert_eq!(Tile::choose(2, (32, 32), 1920, 640), Tile::F4);
        // On a 16² map only 32 windows, enough where U is transformed per block of output channels.
        assert_eq!(Tile::choose(2, (16, 16), 1280, 1280), Tile::F4);
        assert_eq!(Tile::choose(2, (16, 16), 2560, 1280), Tile::F4);
        assert_eq!(Tile::choose(1, (16, 16), 1280, 1280), Tile::F2);
        // 2560 → 1280 channels on a 32² map: V too large for blocks, and a whole U would take 472 MB.
        assert_eq!(Tile::choose(2, (32, 32), 2560, 1280), Tile::F2);
        // Few windows: the weight transform is not repaid.
        assert_eq!(Tile::choose(1, (16, 16), 64, 64), Tile::F2);
    }

    #[test]
    fn winograd_only_where_it_repays_its_weight_transform() {
        // Fewer than 128 output positions: the direct product.
        assert!(!worthwhile(1, (8, 8), 1280, 1280));
        assert!(!worthwhile(2, (4, 4), 1280, 1280));
        // The UNet's 1280-channel layers on 8² maps at batch 2 (819k and 1.6M U floats per window).
        assert!(worthwhile(2, (8, 8), 1280, 1280));
        assert!(worthwhile(2, (8, 8), 2560, 1280));
        // F4 layers (the VAE, the UNet's 320 and 640 channels on large maps).
        assert!(worthwhile(2, (64, 64), 320, 320));
        assert!(worthwhile(1, (512, 512), 128, 128));
        // F2 with up to 819k U floats per window (the UNet's 1280-channel layers on 16² maps, batch 1 or
        // 2): Winograd.
        assert!(worthwhile(2, (16, 16), 1280, 1280));
        assert!(worthwhile(2, (16, 16), 2560, 1280));
        assert!(worthwhile(1, (16, 16), 2560, 1280));
        assert!(worthwhile(2, (16, 16), 1280, 640));
        assert!(worthwhile(2, (32, 32), 1280, 1280));
        // Beyond that (3.3M per window: 2560 → 2560 channels on an 8² map, batch 2): the direct product.
        assert!(!worthwhile(2, (8, 8), 2560, 2560));
    }
}
