//! bf16 matrix products on Intel AMX (the tile unit of Sapphire Rapids and later Xeons), with f32
//! accumulation, for `--precision bf16`.
//!
//! No Rust crate wraps AMX and its intrinsics are not stable Rust, so the few instructions are issued by
//! inline assembly: `ldtilecfg` (eight 16 × 64-byte tiles), `tileloadd`, `tdpbf16ps` (a 16 × 16 f32 block
//! += 16 × 32 bf16 · 32 × 16 bf16), `tilestored`, `tilerelease`. Linux hands the tile state to a process
//! only after `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; [`available`] asks once.
//!
//! Operands: A is row-major bf16 (m × k), B is in the "VNNI" order AMX reads — for each block of 16
//! columns, each pair of rows (2p, 2p+1) stored as 16 column pairs — and C is row-major f32. Sizes are
//! padded by the packers: m and n to multiples of 32, k to a multiple of 32.

use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use super::{vector, SharedMut};

/// Rows and columns of one C block (2 × 2 tiles).
pub const BLOCK: usize = 32;
/// Depth of one tile product.
pub const DEPTH: usize = 32;

/// Whether this CPU has AMX with bf16 and the OS lets this process use it.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall asking for permission; it changes nothing else.
    let status = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    status == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Rounds `n` up to a multiple of `to`.
pub fn pad(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Packs B (rows = k × cols = n) in VNNI order, padded to (pad(k, 32) × pad(n, 32)): `at(k, n)` gives
/// the element. Layout: [n / 16][k / 2][16 columns][2 rows].
pub fn pack_b(rows: usize, cols: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Vec<bf16> {
    pack_b_to(rows, pad(rows, DEPTH), cols, at)
}

/// [`pack_b`] with the depth padded to `k` (at least `rows`, even) instead of a multiple of 32: for
/// the products of [`super::dot_bf16`], which need whole pairs only (see [`super::bf16_depth`]).
pub fn pack_b_to(
    rows: usize,
    k: usize,
    cols: usize,
    at: impl Fn(usize, usize) -> f32 + Sync,
) -> Vec<bf16> {
    debug_assert!(k >= rows && k.is_multiple_of(2));
    let n = pad(cols, BLOCK);
    let mut b = vec![bf16::ZERO; k * n];
    b.par_chunks_mut(k * 16)
        .enumerate()
        .for_each(|(block, chunk)| {
            for pair in 0..k / 2 {
                for j in 0..16 {
                    let col = block * 16 + j;
                    if col >= cols {
                        continue;
                    }
                    for half in 0..2 {
                        let row = 2 * pair + half;
                        if row < rows {
                            chunk[(pair * 16 + j) * 2 + half] = bf16::from_f32(at(row, col));
                        }
                    }
                }
            }
        });
    b
}

/// Packs a row-major f32 matrix (rows × cols, row stride `ld`) into `dst` as row-major bf16 A, padded
/// with zeros to (pad(rows, 32) × pad(cols, 32)).
pub fn pack_a_rows(dst: &mut Vec<bf16>, src: &[f32], rows: usize, cols: usize, ld: usize) {
    pack_a_rows_to(dst, src, rows, cols, ld, pad(cols, DEPTH));
}

/// [`pack_a_rows`] with the rows padded to `k` values (at least `cols`, even) instead of a multiple
/// of 32 (see [`pack_b_to`]).
pub fn pack_a_rows_to(
    dst: &mut Vec<bf16>,
    src: &[f32],
    rows: usize,
    cols: usize,
    ld: usize,
    k: usize,
) {
    debug_assert!(k >= cols && k.is_multiple_of(2));
    let m = pad(rows, BLOCK);
    // Every element is written once (values, then the zero padding), not zeroed first.
    dst.clear();
    dst.reserve(m * k);
    let spare = &mut dst.spare_capacity_mut()[..m * k];
    // SAFETY: MaybeUninit<bf16> has bf16's layout; the slice is only written before `set_len`.
    let out = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<bf16>(), m * k) };
    let fill = |(r, row): (usize, &mut [bf16])| {
        if r < rows {
            vector::bf16_row(&src[r * ld..][..cols], &mut row[..cols]);
            row[cols..].fill(bf16::ZERO);
        } else {
            row.fill(bf16::ZERO);
        }
    };
    // Few rows (an attention block's queries): on the calling thread.
    if rows * cols < 1 << 16 {
        out.chunks_exact_mut(k).enumerate().for_each(fill);
    } else {
        out.par_chunks_mut(k).enumerate().for_each(fill);
    }
    // SAFETY: all m · k elements were written above.
    unsafe { dst.set_len(m * k) };
}

/// Packs a row-major f32 matrix (rows = k × cols = n, row stride `ld`) into `dst` as B (see
/// [`pack_b`]); the per-call path for convolution columns. Runs on the calling thread. Every element is
/// written once (values, then the zero padding), not zeroed first.
pub fn pack_b_rows(dst: &mut Vec<bf16>, src: &[f32], rows: usize, cols: usize, ld: usize) {
    pack_b_rows_to(dst, src, rows, cols, ld, pad(cols, BLOCK));
}

/// [`pack_b_rows`] with the columns padded to `n` (at least `cols`, a multiple of 16) instead of a
/// multiple of 32: for the products of [`super::dot_bf16`] (see [`super::bf16_columns`]).
pub fn pack_b_rows_to(
    dst: &mut Vec<bf16>,
    src: &[f32],
    rows: usize,
    cols: usize,
    ld: usize,
    n: usize,
) {
    debug_assert!(n >= cols && n.is_multiple_of(16));
    let k = pad(rows, DEPTH);
    dst.clear();
    dst.reserve(k * n);
    let spare = &mut dst.spare_capacity_mut()[..k * n];
    // SAFETY: MaybeUninit<bf16> has bf16's layout; the slice is only written before `set_len`.
    let all = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<bf16>(), k * n) };
    for (block, chunk) in all.chunks_exact_mut(k * 16).enumerate() {
        let c0 = block * 16;
        if c0 >= cols {
            chunk.fill(bf16::ZERO);
            continue;
        }
        let width = 16.min(cols - c0);
        for (pair, out) in chunk.chunks_exact_mut(32).enumerate() {
            let (values, padding) = out.split_at_mut(2 * width);
            padding.fill(bf16::ZERO);
            let (r0, r1) = (2 * pair, 2 * pair + 1);
            if r1 < rows {
                let first = &src[r0 * ld + c0..][..width];
                let second = &src[r1 * ld + c0..][..width];
                vector::bf16_pairs(first, second, values);
            } else if r0 < rows {
                let first = &src[r0 * ld + c0..][..width];
                for (slot, &value) in values.chunks_exact_mut(2).zip(first) {
                    slot[0] = vector::to_bf16(value);
                    slot[1] = bf16::ZERO;
                }
            } else {
                values.fill(bf16::ZERO);
            }
        }
    }
    // SAFETY: all k · n elements were written above.
    unsafe { dst.set_len(k * n) };
}

/// The 64-byte tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for tile in 0..8 {
            cfg[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&64u16.to_le_bytes());
            cfg[48 + tile] = 16;
        }
        TileConfig(cfg)
    }
}

/// The tile registers configured on this thread (eight tiles of 16 rows × 64 bytes) for as long as the
/// guard lives; dropping it releases them. Not `Send`: the configuration belongs to the thread.
pub struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// Configures the tiles.
    ///
    /// # Safety
    /// [`available`] must be true.
    pub unsafe fn configure() -> Self {
        let cfg = TileConfig::new();
        // SAFETY: AMX is available (caller's contract); the configuration is valid.
        unsafe { std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
        Tiles(std::marker::PhantomData)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: releases the tile state `configure` set up on this thread.
        unsafe { std::arch::asm!("tilerelease", options(nostack)) };
    }
}

/// C (m × n, row stride `ldc`) = A (m × k, packed by [`pack_a_rows`]) · B (k × n, packed by [`pack_b`]), for
/// padded m, n, k; the blocks of C are spread over the threads when `parallel` is set.
///
/// # Safety
/// [`available`] must be true; `a` must hold m × k, `b` k × n and `c` (m − 1) · ldc + n elements.
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
    debug_assert!(m.is_multiple_of(BLOCK) && n.is_multiple_of(BLOCK) && k.is_multiple_of(DEPTH));
    debug_assert!(a.len() >= m * k && b.len() >= k * n);
    let c = SharedMut(c);
    let blocks = (m / BLOCK) * (n / BLOCK);
    let run = |range: std::ops::Range<usize>| {
        // SAFETY: AMX is available (caller's contract).
        let _tiles = unsafe { Tiles::configure() };
        for block in range {
            let (mb, nb) = (block / (n / BLOCK), block % (n / BLOCK));
            // SAFETY: the block lies inside A, B and C by the caller's contract.
            unsafe { block_product(mb, nb, k, a, b, c, ldc) };
        }
    };
    if parallel && blocks > 1 {
        let per_task = blocks.div_ceil(4 * super::threads()).max(1);
        (0..blocks.div_ceil(per_task))
            .into_par_iter()
            .for_each(|task| {
                run(task * per_task..((task + 1) * per_task).min(blocks));
            });
    } else {
        run(0..blocks);
    }
}

/// One 32 × 32 block of C (see [`accumulate_block`]) over the whole depth of packed A and B.
#[inline(always)]
unsafe fn block_product(
    mb: usize,
    nb: usize,
    k: usize,
    a: &[bf16],
    b: &[bf16],
    c: SharedMut,
    ldc: usize,
) {
    let a0 = a.as_ptr().add(mb * BLOCK * k);
    let a1 = a0.add(16 * k);
    let b0 = b.as_ptr().add(nb * 2 * 16 * k);
    let b1 = b0.add(16 * k);
    zero_block();
    let mut s = 0;
    while s < k {
        // A: columns s..s+32 of 16 rows. B: rows s..s+32 = pairs s/2..s/2+16, 16 columns each.
        accumulate_block(
            [a0.add(s), a1.add(s)],
            k * 2,
            [b0.add(s * 16), b1.add(s * 16)],
            64,
        );
        s += DEPTH;
    }
    store_block(c.at(mb * BLOCK * ldc + nb * BLOCK), ldc);
}

/// Zeroes the accumulators of a 32 × 32 C block: tiles 0–3 (rows 0–15 and 16–31 by columns 0–15 and
/// 16–31).
///
/// # Safety
/// The tiles must be configured ([`Tiles`]).
#[inline(always)]
pub unsafe fn zero_block() {
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack)
    );
}

/// Adds one depth step of 32 to the accumulators: `a` are two bf16 tiles of 16 rows × 32 (C's rows 0–15
/// and 16–31; `a_stride` bytes between rows), `b` two VNNI tiles of 16 pairs of rows × 16 columns (C's
/// columns 0–15 and 16–31; `b_stride` bytes between pairs). Tiles 4–5 hold A, 6–7 B.
///
/// # Safety
/// The tiles must be configured ([`Tiles`]) and the 16 rows of 64 bytes behind each pointer readable.
#[inline(always)]
pub unsafe fn accumulate_block(
    a: [*const bf16; 2],
    a_stride: usize,
    b: [*const bf16; 2],
    b_stride: usize,
) {
    std::arch::asm!(
        "tileloadd tmm4, [{a0} + {sa}*1]",
        "tileloadd tmm5, [{a1} + {sa}*1]",
        "tileloadd tmm6, [{b0} + {sb}*1]",
        "tileloadd tmm7, [{b1} + {sb}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        a0 = in(reg) a[0],
        a1 = in(reg) a[1],
        b0 = in(reg) b[0],
        b1 = in(reg) b[1],
        sa = in(reg) a_stride,
        sb = in(reg) b_stride,
        options(nostack)
    );
}

/// Stores the accumulators as a 32 × 32 f32 block at `c` with `ldc` floats between rows.
///
/// # Safety
/// The tiles must be configured ([`Tiles`]) and the block writable.
#[inline(always)]
pub unsafe fn store_block(c: *mut f32, ldc: usize) {
    let c00 = c;
    let c01 = c00.add(16);
    let c10 = c00.add(16 * ldc);
    let c11 = c10.add(16);
    std::arch::asm!(
        "tilestored [{c00} + {sc}*1], tmm0",
        "tilestored [{c01} + {sc}*1], tmm1",
        "tilestored [{c10} + {sc}*1], tmm2",
        "tilestored [{c11} + {sc}*1], tmm3",
        c00 = in(reg) c00,
        c01 = in(reg) c01,
        c10 = in(reg) c10,
        c11 = in(reg) c11,
        sc = in(reg) ldc * 4,
        options(nostack)
    );
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A packed element by element with `half`'s rounding: the reference for `pack_a_rows`.
    fn pack_a(rows: usize, cols: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Vec<bf16> {
        let (m, k) = (pad(rows, BLOCK), pad(cols, DEPTH));
        let mut a = vec![bf16::ZERO; m * k];
        a.par_chunks_mut(k)
            .take(rows)
            .enumerate()
            .for_each(|(r, row)| {
                for (c, value) in row.iter_mut().take(cols).enumerate() {
                    *value = bf16::from_f32(at(r, c));
                }
            });
        a
    }

    #[test]
    fn amx_product_equals_f64_sum_of_bf16_inputs() {
        if !available() {
            eprintln!("no AMX on this machine: skipped");
            return;
        }
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (33, 17, 45),
            (64, 96, 320),
            (5, 70, 100),
        ] {
            let (a, b) = operands(m, n, k);
            let pa = pack_a(m, k, |r, c| a[r * k + c]);
            let pb = pack_b(k, n, |r, c| b[r * n + c]);
            // The per-call packers give the same bits, into buffers that held other values (they
            // write every element, padding included, without zeroing first).
            let stale = vec![bf16::from_f32(7.0); 1 << 16];
            let (mut fast_a, mut fast_b) = (stale.clone(), stale);
            pack_a_rows(&mut fast_a, &a, m, k, k);
            pack_b_rows(&mut fast_b, &b, k, n, n);
            assert!(fast_a == pa && fast_b == pb, "{m}x{n}x{k}: packers differ");
            let (mp, np, kp) = (pad(m, BLOCK), pad(n, BLOCK), pad(k, DEPTH));
            let mut c = vec![0f32; mp * np];
            unsafe { matmul(mp, np, kp, &pa, &pb, c.as_mut_ptr(), np, true) };
            check_product(&a, &b, (m, n, k), &c, np, 1e-3);
        }
    }

    /// Two awkward but exact-in-f32 operands, A (m × k) and B (k × n), row-major.
    pub(in crate::kernels) fn operands(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
        let a = (0..m * k)
            .map(|i| ((i * 7919) % 23) as f32 / 7.0 - 1.5)
            .collect();
        let b = (0..k * n)
            .map(|i| ((i * 104_729) % 19) as f32 / 5.0 - 1.8)
            .collect();
        (a, b)
    }

    /// Asserts that `c` (row stride `ldc`) is A · B of the bf16-rounded operands, summed in f64, within
    /// `tolerance` relative to 1 + |sum|.
    pub(in crate::kernels) fn check_product(
        a: &[f32],
        b: &[f32],
        (m, n, k): (usize, usize, usize),
        c: &[f32],
        ldc: usize,
        tolerance: f64,
    ) {
        for r in 0..m {
            for col in 0..n {
                let want: f64 = (0..k)
                    .map(|i| {
                        bf16::from_f32(a[r * k + i]).to_f64()
                            * bf16::from_f32(b[i * n + col]).to_f64()
                    })
                    .sum();
                let got = c[r * ldc + col] as f64;
                assert!(
                    (got - want).abs() < tolerance * (1.0 + want.abs()),
                    "{m}x{n}x{k} ({r},{col}): {got} vs {want}"
                );
            }
        }
    }
}
