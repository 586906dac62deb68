//! An f32 matrix product `C = A · B` for a right operand packed once and used many times: layer weights
//! (packed by the layer on first use), or an attention head's keys and values (packed once per head and
//! read by every block of queries).
//!
//! The `gemm` crate packs both operands on every call; on Stable Diffusion's shapes (a short depth of
//! 40–1280 against thousands of rows) that repacking of the weights is a large part of the time, and it
//! cannot take an operand packed beforehand. This is the classic blocked product instead: B in panels of
//! [`NR`] columns, A read in place by blocks of rows and depth (copied only at row strides that would
//! crowd one L1 set, see [`row_stride`]), so the register tile ([`MR`] × [`NR`]) streams both from
//! cache; one micro-kernel per [`Tier`]: AVX-512 (12 × 32 register tile), AVX2 + FMA (6 × 16) and plain
//! Rust.

use rayon::prelude::*;

use super::tier::Tier;
use super::SharedMut;

/// Columns per panel of the packed right operand (two AVX-512 vectors).
pub const NR: usize = 32;
/// Rows per register tile.
const MR: usize = 12;
/// Depth per block: an A micro-panel (MR × KC) and a B micro-panel (KC × NR) fit in L1 together.
const KC: usize = 384;
/// [`KC`] for the AVX2 tier (see [`product`]).
const KC_AVX2: usize = 256;
/// Rows per block of A packed at once (a multiple of [`MR`]), kept in L2 while every panel of B passes.
const MC: usize = 144;
/// Up to this many rows, A is one block and the work is split by columns only.
const SMALL_M: usize = 768;
/// The most floats of C one task of [`gemm`] writes (256 KiB, a quarter of a Zen 4 core's L2). At AVX2 on
/// an AMD EPYC Zen 4, `sgemm_rate`-style products alternated in one process: 2048 × 640 × 5120 155 → 180
/// GFLOP/s, 8192 × 320 × 2560 187 → 206, others unchanged; at AVX-512 within noise.
const C_BLOCK: usize = 1 << 16;

/// The right operand, k × n, packed in panels of [`NR`] columns: panel `j` holds rows 0..k of columns
/// `j·NR .. j·NR + NR` one row after another, the columns past n zero.
#[derive(Debug, Clone, Default)]
pub struct PackedB {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Packs `B = Wᵀ` from W stored as n rows of k (a linear layer's (out, in) weight, or keys (m, d) for
    /// the scores `q · kᵀ`), row `j` of W starting at `w[j * ld]`.
    pub fn transposed(w: &[f32], n: usize, k: usize, ld: usize) -> Self {
        let mut packed = PackedB::default();
        packed.repack_transposed(w, n, k, ld);
        packed
    }

    /// [`PackedB::transposed`] into this buffer, reusing its allocation.
    pub fn repack_transposed(&mut self, w: &[f32], n: usize, k: usize, ld: usize) {
        self.resize(k, n);
        for (panel, dst) in self.data.chunks_exact_mut(k * NR).enumerate() {
            transpose_panel(dst, w, panel, n, k, ld);
        }
    }

    /// [`PackedB::repack_transposed`] with the panels spread over the rayon pool (weights of layers
    /// whose product has few rows, where packing is a visible part of the time).
    pub fn repack_transposed_par(&mut self, w: &[f32], n: usize, k: usize, ld: usize) {
        self.resize(k, n);
        self.data
            .par_chunks_exact_mut(k.max(1) * NR)
            .enumerate()
            .for_each(|(panel, dst)| transpose_panel(dst, w, panel, n, k, ld));
    }

    /// Packs the rows `rows` (n columns each, row `p` starting at `b[p * ld]`) of a row-major B, reusing
    /// this buffer's allocation (an attention head's values).
    pub fn repack_rows(&mut self, b: &[f32], k: usize, n: usize, ld: usize) {
        self.resize(k, n);
        for (panel, dst) in self.data.chunks_exact_mut(k * NR).enumerate() {
            let (first, width) = (panel * NR, NR.min(n - panel * NR));
            for (p, row) in dst.chunks_exact_mut(NR).enumerate() {
                row[..width].copy_from_slice(&b[p * ld + first..][..width]);
            }
        }
    }

    /// Makes this a k × n matrix to be filled in place through [`PackedB::data_mut`] at
    /// [`panel_offset`]s. Old values stay where nothing new is written; columns past n only ever feed
    /// outputs that are not stored, so they need no clearing.
    pub fn reshape(&mut self, k: usize, n: usize) {
        self.k = k;
        self.n = n;
        self.data.resize(n.div_ceil(NR) * NR * k, 0.0);
    }

    /// The packed values, for filling in place.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// [`PackedB::reshape`] with every value zero (the packers write only the columns below n).
    fn resize(&mut self, k: usize, n: usize) {
        self.data.clear();
        self.reshape(k, n);
    }

    /// Rows (the depth of the product).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// Where element (row p, column j) of a packed matrix of depth `k` lives in its data.
#[inline]
pub fn panel_offset(k: usize, p: usize, j: usize) -> usize {
    (j / NR) * k * NR + p * NR + j % NR
}

/// Packs panel `panel` of `B = Wᵀ` (W: n rows of k, row stride `ld`) into `dst`, 16 depth steps × the
/// panel's 32 columns at a time so both sides stay in L1.
fn transpose_panel(dst: &mut [f32], w: &[f32], panel: usize, n: usize, k: usize, ld: usize) {
    const STEP: usize = 16;
    let width = NR.min(n - panel * NR);
    for p0 in (0..k).step_by(STEP) {
        let depth = STEP.min(k - p0);
        let block = &mut dst[p0 * NR..(p0 + depth) * NR];
        for c in 0..width {
            let src = &w[(panel * NR + c) * ld + p0..][..depth];
            for (q, &value) in src.iter().enumerate() {
                block[q * NR + c] = value;
            }
        }
    }
}

/// What the product starts from in C.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// C is overwritten.
    Zero,
    /// C is overwritten with the bias (one value per column) plus the product.
    Bias(&'a [f32]),
    /// The product is added to what C holds.
    Add,
}

/// `C = start + A · B` for A of m rows (row `i` starting at `a[i * lda]`, `b.k()` values) and C of m rows
/// (row `i` at `c[i * ldc]`, `b.n()` values), spread over the rayon pool.
pub fn gemm(m: usize, a: &[f32], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize, start: Start) {
    check(m, a, lda, b, c.len(), ldc, start);
    let panels = b.n.div_ceil(NR);
    // Few rows: one block of all of them, so each panel of B is read from memory once. Else blocks of
    // about MC rows, as many as a whole number of rounds over the pool, so that no thread idles while
    // another runs a last block (a UNet's 1280 output channels were nine blocks for two threads).
    let mc = if m <= SMALL_M {
        m.max(1)
    } else {
        let blocks = m
            .div_ceil(MC)
            .next_multiple_of(rayon::current_num_threads());
        m.div_ceil(blocks).next_multiple_of(MR)
    };
    let row_blocks = m.div_ceil(mc);
    // Enough tasks for every thread; split columns too when there are few rows.
    let want = 4 * rayon::current_num_threads();
    let column_groups = if row_blocks >= want {
        1
    } else {
        panels.min(want.div_ceil(row_blocks))
    };
    let per_group = panels.div_ceil(column_groups);
    // Wide products are split by columns as well, so that a task's part of C stays in L2 from one
    // depth block to the next instead of going out to memory and back for each.
    let per_group = per_group.min((C_BLOCK / (mc * NR)).max(1));
    let column_groups = panels.div_ceil(per_group.max(1));
    // Several tasks read the same rows of A: copy them once, at a stride read in place, rather than
    // once per task (see `product`).
    let restrided;
    let (a, lda) = if column_groups > 1 && crowded(lda, Tier::active()) && m > 0 {
        let stride = row_stride(b.k);
        let mut copy = vec![0f32; m * stride];
        copy.par_chunks_mut(stride)
            .enumerate()
            .for_each(|(row, dst)| dst[..b.k].copy_from_slice(&a[row * lda..][..b.k]));
        restrided = copy;
        (&restrided[..], stride)
    } else {
        (a, lda)
    };
    let out = SharedMut(c.as_mut_ptr());
    (0..row_blocks * column_groups)
        .into_par_iter()
        .for_each(|task| {
            let (block, group) = (task / column_groups, task % column_groups);
            let rows = block * mc..(block * mc + mc).min(m);
            let panels = group * per_group..(group * per_group + per_group).min(panels);
            // SAFETY: tasks write disjoint (row block, column group) rectangles of C, checked to fit.
            unsafe { product(rows, panels, a, lda, b, out, ldc, start) };
        });
}

/// [`gemm`] when `parallel`, else [`gemm_serial`]: for callers that run either as one task among many
/// or alone (the convolutions' tiles).
#[allow(clippy::too_many_arguments)]
pub fn gemm_maybe_parallel(
    parallel: bool,
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    start: Start,
) {
    if parallel {
        gemm(m, a, lda, b, c, ldc, start);
    } else {
        gemm_serial(m, a, lda, b, c, ldc, start);
    }
}

/// [`gemm`] on the calling thread (for callers that are themselves one task of a parallel loop).
#[allow(clippy::too_many_arguments)]
pub fn gemm_serial(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    start: Start,
) {
    check(m, a, lda, b, c.len(), ldc, start);
    // SAFETY: checked to fit; one task covers all of C.
    unsafe { gemm_serial_unchecked(m, a, lda, b, c.as_mut_ptr(), ldc, start) };
}

/// [`gemm_serial`] into C given by pointer, for tasks that write disjoint columns of shared rows (each
/// attention head its own columns of the output).
///
/// # Safety
/// `c` must be valid for writes of rows `0..m` × columns `0..b.n()` at stride `ldc`, and no other
/// thread may access those elements meanwhile; `a` must hold m rows of `b.k()` values at stride `lda`.
pub unsafe fn gemm_serial_unchecked(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    c: *mut f32,
    ldc: usize,
    start: Start,
) {
    if m == 0 || b.n == 0 {
        return;
    }
    product(
        0..m,
        0..b.n.div_ceil(NR),
        a,
        lda,
        b,
        SharedMut(c),
        ldc,
        start,
    );
}

fn check(m: usize, a: &[f32], lda: usize, b: &PackedB, c_len: usize, ldc: usize, start: Start) {
    if m == 0 || b.n == 0 {
        return;
    }
    assert!(
        lda >= b.k && (m - 1) * lda + b.k <= a.len(),
        "sgemm: A too short"
    );
    assert!(
        ldc >= b.n && (m - 1) * ldc + b.n <= c_len,
        "sgemm: C too short"
    );
    if let Start::Bias(bias) = start {
        assert!(bias.len() >= b.n, "sgemm: bias too short");
    }
}

/// The rows `rows` × panels `panels` part of C.
///
/// # Safety
/// `out` must point at C as checked by [`check`], and no other thread may write this part of C.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    out: SharedMut,
    ldc: usize,
    start: Start,
) {
    let k = b.k;
    // AVX2 streams half a panel (16 columns, one 64-byte line per depth step) at a time: a shorter
    // depth block keeps it and six rows of A within a 32 KiB L1.
    let tier = Tier::active();
    let kc_max = if tier == Tier::Avx512 { KC } else { KC_AVX2 };
    let depth_blocks = k.div_ceil(kc_max).max(1);
    let kc_even = k.div_ceil(depth_blocks);
    let tiles = rows.len().div_ceil(MR);
    // A's rows for one depth block are copied into a buffer whose row stride is not a multiple of 4 KiB
    // (a plain copy, reused by every panel): strides like 4096 floats (attention's scores) or 5120
    // (a linear layer's input) would put all twelve rows of a tile into the same L1 set.
    let copy = crowded(lda, tier);
    let stride = if copy {
        kc_even.next_multiple_of(16) + 16
    } else {
        lda
    };
    A_BLOCK.with_borrow_mut(|block| {
        if copy {
            block.resize(rows.len() * stride, 0.0);
        }
        for depth in 0..depth_blocks {
            let p0 = depth * kc_even;
            let kc = kc_even.min(k - p0);
            let block: &[f32] = if copy {
                for (r, row) in rows.clone().enumerate() {
                    block[r * stride..][..kc].copy_from_slice(&a[row * lda + p0..][..kc]);
                }
                block
            } else {
                &a[rows.start * lda + p0..]
            };
            let tile_start = if depth == 0 { start } else { Start::Add };
            for panel in panels.clone() {
                let first_col = panel * NR;
                let cols = NR.min(b.n - first_col);
                let b_panel = &b.data[panel * k * NR + p0 * NR..][..kc * NR];
                let bias = match tile_start {
                    Start::Bias(bias) => Some(&bias[first_col..first_col + cols]),
                    _ => None,
                };
                let add = matches!(tile_start, Start::Add);
                // The active tier is never above what the CPU has (see `tier`).
                #[cfg(target_arch = "x86_64")]
                if tier == Tier::Avx2 {
                    // One call for all the block's rows: each 16-column half of the panel stays in L1
                    // while every row tile passes (a 12-row tile at a time would alternate the halves,
                    // keeping the whole 32 KiB panel and twelve rows of A in L1 at once).
                    let n_rows = rows.len();
                    let a_rows = &block[..(n_rows - 1) * stride + kc];
                    let c = out.at(rows.start * ldc + first_col);
                    micro_avx2(kc, a_rows, stride, b_panel, c, ldc, n_rows, cols, bias, add);
                    continue;
                }
                for tile in 0..tiles {
                    let row = rows.start + tile * MR;
                    let n_rows = MR.min(rows.end - row);
                    let a_tile = &block[tile * MR * stride..][..(n_rows - 1) * stride + kc];
                    let c = out.at(row * ldc + first_col);
                    #[cfg(target_arch = "x86_64")]
                    if tier == Tier::Avx512 {
                        // A panel at most half full (the last of an attention head's 40 or 80
                        // values) takes the half-width tile: half the multiplications.
                        let micro = if cols <= NR / 2 {
                            micro_avx512::<1>
                        } else {
                            micro_avx512::<2>
                        };
                        micro(kc, a_tile, stride, b_panel, c, ldc, n_rows, cols, bias, add);
                        continue;
                    }
                    micro_plain(kc, a_tile, stride, b_panel, c, ldc, n_rows, cols, bias, add);
                }
            }
        }
    });
}

/// A row stride of at least `k` floats at which A's rows are read in place (no copy, see [`crowded`]),
/// for callers that lay out A themselves: padded wherever a tile's twelve rows would share fewer than
/// six L1 sets (at every tier: laying out with that margin costs nothing extra).
pub fn row_stride(k: usize) -> usize {
    if few_sets(k) {
        k + 16
    } else {
        k
    }
}

/// How many of a tile's twelve rows at row stride `lda` (floats) fall into each L1 set (64-byte lines,
/// 64 sets).
fn rows_per_set(lda: usize) -> [usize; 64] {
    let mut per_set = [0usize; 64];
    for r in 0..MR {
        per_set[(r * lda * 4 / 64) % 64] += 1;
    }
    per_set
}

/// Whether the twelve rows of a tile at row stride `lda` share fewer than six L1 sets.
fn few_sets(lda: usize) -> bool {
    rows_per_set(lda).iter().filter(|&&rows| rows > 0).count() < MR / 2
}

/// Whether A's rows at stride `lda` are copied before `tier`'s micro-kernel reads them, because they
/// would evict each other from L1. At AVX2 only when more than six of a tile's twelve rows fall into one
/// set (strides of 4096 or 5120 floats): measured on a Zen 4 (EPYC Genoa, 32 KiB 8-way L1;
/// `sgemm_rate`, `conv_rate`), six per set (2560, 23040 floats) or three (1280, 11520) run as fast or up to
/// 60 % faster in place, where the copy is pure overhead on small maps (a 3×3 convolution's weights
/// serve only 32 or 128 positions). Other tiers keep the wider [`few_sets`] test: at AVX-512 the
/// narrower one could not be told from noise on a UNet step (±3 %) and was slower in three of four pairs.
fn crowded(lda: usize, tier: Tier) -> bool {
    if tier == Tier::Avx2 {
        rows_per_set(lda).into_iter().max().unwrap_or(0) > MR / 2
    } else {
        few_sets(lda)
    }
}

thread_local! {
    /// Each thread's copy of the block of A it is multiplying (see [`product`]).
    static A_BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One register tile: C[rows, cols] (start) + A tile · B panel, in AVX-512, over the panel's first
/// `HALVES` × 16 columns (`HALVES` is 1 or 2; with 1, `cols` ≤ 16).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn micro_avx512<const HALVES: usize>(
    kc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut lo = [_mm512_setzero_ps(); MR];
    let mut hi = [_mm512_setzero_ps(); MR];
    // Rows past the tile's end read the last row again (computed, never stored).
    let ap: [*const f32; MR] = std::array::from_fn(|r| a.as_ptr().add(r.min(rows - 1) * lda));
    let bp = b.as_ptr();
    for p in 0..kc {
        let b0 = _mm512_loadu_ps(bp.add(p * NR));
        if HALVES == 2 {
            let b1 = _mm512_loadu_ps(bp.add(p * NR + 16));
            for r in 0..MR {
                let av = _mm512_set1_ps(*ap[r].add(p));
                lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
            }
        } else {
            for r in 0..MR {
                lo[r] = _mm512_fmadd_ps(_mm512_set1_ps(*ap[r].add(p)), b0, lo[r]);
            }
        }
    }
    let mask_lo: __mmask16 = if cols >= 16 {
        0xffff
    } else {
        (1u16 << cols) - 1
    };
    let mask_hi: __mmask16 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        (1u16 << (cols - 16)) - 1
    } else {
        0
    };
    let (bias_lo, bias_hi) = match bias {
        Some(bias) => (
            _mm512_maskz_loadu_ps(mask_lo, bias.as_ptr()),
            _mm512_maskz_loadu_ps(mask_hi, bias.as_ptr().wrapping_add(16)),
        ),
        None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
    };
    for r in 0..rows {
        let row = c.add(r * ldc);
        let (mut v0, mut v1) = (_mm512_add_ps(lo[r], bias_lo), _mm512_add_ps(hi[r], bias_hi));
        if add {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(mask_lo, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(mask_hi, row.wrapping_add(16)));
        }
        _mm512_mask_storeu_ps(row, mask_lo, v0);
        _mm512_mask_storeu_ps(row.wrapping_add(16), mask_hi, v1);
    }
}

/// Rows of the AVX2 register tile: 6 rows × 16 columns is 12 of the 16 ymm registers for the sums, two
/// for the panel's row and one for the broadcast value of A.
const MR_AVX2: usize = 6;

/// [`micro_avx512`] in AVX2 + FMA, over all the rows of a block at once ([`product`] calls it once per
/// panel): the panel as (up to) two runs of 16 columns, each run through every register tile of
/// [`MR_AVX2`] rows (a run of at most 8 as tiles of 12 rows), every tile streaming the whole depth block.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2(
    kc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
    add: bool,
) {
    let mut first_col = 0;
    while first_col < cols {
        let width = (cols - first_col).min(16);
        let bias = bias.map(|bias| &bias[first_col..first_col + width]);
        let (a, b, c) = (a.as_ptr(), b.as_ptr().add(first_col), c.add(first_col));
        if width <= 8 {
            // A last run of at most 8 columns (an attention head's 40 values end in one): one vector
            // per row, twice the rows, no multiplications into discarded lanes.
            for first in (0..rows).step_by(2 * MR_AVX2) {
                let n_rows = (2 * MR_AVX2).min(rows - first);
                let (a, c) = (a.add(first * lda), c.add(first * ldc));
                tile_avx2::<1, { 2 * MR_AVX2 }>(kc, a, lda, b, c, ldc, n_rows, width, bias, add);
            }
        } else {
            for first in (0..rows).step_by(MR_AVX2) {
                let n_rows = MR_AVX2.min(rows - first);
                let (a, c) = (a.add(first * lda), c.add(first * ldc));
                tile_avx2::<2, MR_AVX2>(kc, a, lda, b, c, ldc, n_rows, width, bias, add);
            }
        }
        first_col += 16;
    }
}

/// One AVX2 register tile: C[rows, width] (start) + A (`rows` ≤ `R` rows at stride `lda`) · B (`V` × 8
/// columns of a panel, at the panel's row stride [`NR`]), `width` ≤ `V` × 8; `V` is 1 or 2 and `R` · `V`
/// at most 12 (the sums' registers).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const V: usize, const R: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    width: usize,
    bias: Option<&[f32]>,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    // Rows past the tile's end read the last row again (computed, never stored).
    let ap: [*const f32; R] = std::array::from_fn(|r| a.add(r.min(rows - 1) * lda));
    for p in 0..kc {
        let b0 = _mm256_loadu_ps(b.add(p * NR));
        if V == 2 {
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            for r in 0..R {
                let av = _mm256_broadcast_ss(&*ap[r].add(p));
                lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
            }
        } else {
            for r in 0..R {
                lo[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*ap[r].add(p)), b0, lo[r]);
            }
        }
    }
    // Lane masks for the first `n` of 8 lanes: the 8 values from LANE_MASKS[8 − n].
    const LANE_MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    let mask = |n: usize| _mm256_loadu_si256(LANE_MASKS.as_ptr().add(8 - n.min(8)).cast());
    let (mask_lo, mask_hi) = (mask(width), mask(width.saturating_sub(8)));
    let (bias_lo, bias_hi) = match bias {
        Some(bias) => (
            _mm256_maskload_ps(bias.as_ptr(), mask_lo),
            _mm256_maskload_ps(bias.as_ptr().wrapping_add(8), mask_hi),
        ),
        None => (_mm256_setzero_ps(), _mm256_setzero_ps()),
    };
    for r in 0..rows {
        let row = c.add(r * ldc);
        let (mut v0, mut v1) = (_mm256_add_ps(lo[r], bias_lo), _mm256_add_ps(hi[r], bias_hi));
        if width == 16 {
            if add {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
            }
            _mm256_storeu_ps(row, v0);
            _mm256_storeu_ps(row.add(8), v1);
        } else {
            if add {
                v0 = _mm256_add_ps(v0, _mm256_maskload_ps(row, mask_lo));
                v1 = _mm256_add_ps(v1, _mm256_maskload_ps(row.wrapping_add(8), mask_hi));
            }
            _mm256_maskstore_ps(row, mask_lo, v0);
            _mm256_maskstore_ps(row.wrapping_add(8), mask_hi, v1);
        }
    }
}

/// [`micro_avx512`] in plain Rust, for CPUs without AVX2.
#[allow(clippy::too_many_arguments)]
unsafe fn micro_plain(
    kc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
    add: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for p in 0..kc {
        let b_row = &b[p * NR..][..NR];
        for (r, acc_row) in acc.iter_mut().enumerate().take(rows) {
            let av = a[r * lda + p];
            for (slot, &bv) in acc_row.iter_mut().zip(b_row) {
                *slot += av * bv;
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate().take(rows) {
        let row = std::slice::from_raw_parts_mut(c.add(r * ldc), cols);
        for (j, slot) in row.iter_mut().enumerate() {
            let mut value = acc_row[j] + bias.map_or(0.0, |bias| bias[j]);
            if add {
                value += *slot;
            }
            *slot = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * k + p] * b[p * n + j];
                }
            }
        }
        c
    }

    /// The k × n matrix whose element (row p, column j) is `at(p, j)`, packed element by element: the
    /// reference for the fast packers.
    fn pack_each(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> PackedB {
        let mut packed = PackedB::default();
        packed.resize(k, n);
        for j in 0..n {
            for p in 0..k {
                packed.data[panel_offset(k, p, j)] = at(p, j);
            }
        }
        packed
    }

    fn random(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn avx2_copies_only_strides_that_put_most_of_a_tile_into_one_l1_set() {
        for lda in [4096, 5120, 1024] {
            assert!(crowded(lda, Tier::Avx2), "{lda}");
        }
        for lda in [40, 320, 640, 768, 1280, 2560, 11520, 23040] {
            assert!(!crowded(lda, Tier::Avx2), "{lda}");
        }
        // Other tiers, and strides laid out by the callers, keep the wider margin.
        for lda in [4096, 5120, 1024, 1280, 2560, 768] {
            assert!(crowded(lda, Tier::Portable), "{lda}");
            assert!(row_stride(lda) > lda, "{lda}");
            assert!(!crowded(row_stride(lda), Tier::Portable), "{lda}");
        }
        for lda in [40, 320, 640] {
            assert_eq!(row_stride(lda), lda);
        }
    }

    #[test]
    fn products_equal_the_plain_triple_loop_on_awkward_shapes_at_every_tier(
    ) -> candle_core::Result<()> {
        super::super::at_every_tier(products_equal_the_plain_triple_loop)
    }

    fn products_equal_the_plain_triple_loop() -> candle_core::Result<()> {
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 7),
            (13, 40, 33),
            (150, 300, 70),
            (300, 600, 64),
            (12, 257, 32),
            // Depths past one AVX2 block and past one AVX-512 block; a panel of 9 columns (AVX2's
            // second half holds one).
            (7, 700, 25),
            (19, 520, 9),
            // An attention head's values: last panels of 8 and of exactly 16 columns (half-width tile).
            (75, 40, 40),
            (40, 80, 80),
            // Past SMALL_M rows (blocks balanced over the pool), read in place and (a stride of 5120
            // floats) copied.
            (800, 50, 40),
            (800, 5120, 9),
            // Wide enough that each block of rows is split by columns too (see C_BLOCK).
            (800, 300, 600),
        ] {
            let a = random(m * k, 1);
            let b = random(k * n, 2);
            let bias = random(n, 3);
            let want = reference(m, k, n, &a, &b);
            let packed = pack_each(k, n, |p, j| b[p * n + j]);
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let packed_t = PackedB::transposed(&bt, n, k, k);
            let mut packed_rows = PackedB::default();
            packed_rows.repack_rows(&b, k, n, n);
            assert_eq!(packed_t.data, packed.data, "{k}x{n}: transposed packer");
            assert_eq!(packed_rows.data, packed.data, "{k}x{n}: row packer");
            let tolerance = 1e-4 * k as f32;
            for packed in [&packed, &packed_t, &packed_rows] {
                let mut c = vec![f32::NAN; m * n];
                gemm(m, &a, k, packed, &mut c, n, Start::Zero);
                let diff = c
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(diff < tolerance, "{}: {m}x{k}x{n}: {diff}", Tier::active());
                let mut c2 = vec![f32::NAN; m * n];
                gemm_serial(m, &a, k, packed, &mut c2, n, Start::Bias(&bias));
                gemm(m, &a, k, packed, &mut c2, n, Start::Add);
                for i in 0..m * n {
                    let expected = 2.0 * want[i] + bias[i % n];
                    assert!(
                        (c2[i] - expected).abs() < 2.0 * tolerance,
                        "{m}x{k}x{n} at {i}"
                    );
                }
            }
        }
        Ok(())
    }
}
