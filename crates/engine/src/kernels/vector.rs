//! Element loops the kernels share (exponential, softmax, normalise-and-SiLU, sums), written so the compiler vectorises them,
//! and compiled three times: for AVX-512, for AVX2 + FMA and for the baseline target, the one that runs
//! chosen by the active [`Tier`]. The softmax's exponentials have intrinsics of their own per tier.

use super::tier::Tier;

/// ln 2 split in two for Cody–Waite range reduction: `LN2_HI` has few enough bits that n · LN2_HI is
/// exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// The polynomial of e^r on [-ln2/2, ln2/2] after `1 + r`: e^r ≈ 1 + r + r² · P(r), P's coefficients
/// from the highest degree down (every tier's exponential uses these).
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// e^x for f32 with about 1 ulp error over the range that matters (Cody–Waite range reduction to
/// [-ln2/2, ln2/2] and a degree-6 polynomial); inputs below -87.3 give ~1e-38 instead of 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let y = p * z + r + 1.0;
    // SAFETY: n is an integer in [-126, 128] after the clamp, so the conversion cannot overflow (and,
    // unlike `as`, needs no saturation checks, which keeps the loop vectorised).
    let n = unsafe { n.to_int_unchecked::<i32>() };
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    y * scale
}

/// erf(x) for f32 (Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7), vectorisable.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// f32 → bf16 rounding to nearest even (NaNs are not preserved; the networks have none), vectorisable.
#[inline(always)]
pub fn to_bf16(x: f32) -> half::bf16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    half::bf16::from_bits((rounded >> 16) as u16)
}

#[inline(always)]
fn bf16_row_body(src: &[f32], dst: &mut [half::bf16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16(s);
    }
}

#[inline(always)]
fn bf16_pairs_body(first: &[f32], second: &[f32], dst: &mut [half::bf16]) {
    for ((pair, &a), &b) in dst.chunks_exact_mut(2).zip(first).zip(second) {
        pair[0] = to_bf16(a);
        pair[1] = to_bf16(b);
    }
}

/// Lanes the reductions below keep side by side (one AVX-512 register of f32).
const LANES: usize = 16;

/// Replaces x with e^(scale · (x − max x)) and returns the sum: softmax without the final division
/// (the portable form of [`avx512::exp_shifted`]).
#[inline(always)]
fn exp_shifted_body(row: &mut [f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for &m in &lanes {
        max = if m > max { m } else { max };
    }
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk.iter_mut()) {
            *x = exp((*x - max) * scale);
            *s += *x;
        }
    }
    let mut sum: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = exp((*x - max) * scale);
        sum += *x;
    }
    sum + sums.iter().sum::<f32>()
}

#[inline(always)]
fn normalize_body(src: &[f32], dst: &mut [f32], mul: f32, add: f32, silu: bool) {
    if silu {
        for (d, &s) in dst.iter_mut().zip(src) {
            let y = s * mul + add;
            *d = y / (1.0 + exp(-y));
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s * mul + add;
        }
    }
}

#[inline(always)]
fn geglu_body(value: &[f32], gate: &[f32], dst: &mut [f32]) {
    for ((d, &v), &g) in dst.iter_mut().zip(value).zip(gate) {
        *d = v * 0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn quick_gelu_body(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = x / (1.0 + exp(-1.702 * x));
    }
}

#[inline(always)]
fn gelu_body(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = x * 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn sum_and_squares_body(xs: &[f32], mean: f32) -> (f32, f32) {
    let mut sums = [0f32; LANES];
    let mut squares = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for ((s, q), &x) in sums.iter_mut().zip(squares.iter_mut()).zip(chunk) {
            let d = x - mean;
            *s += d;
            *q += d * d;
        }
    }
    let (mut sum, mut square) = (0f32, 0f32);
    for &x in chunks.remainder() {
        let d = x - mean;
        sum += d;
        square += d * d;
    }
    (
        sum + sums.iter().sum::<f32>(),
        square + squares.iter().sum::<f32>(),
    )
}

/// Defines `$name` that runs `$body` compiled for the active [`Tier`]: AVX-512, AVX2 + FMA or the
/// baseline (`$body` is `#[inline(always)]`, so it is built into all three). An `unsafe fn` form serves kernels whose
/// bodies write through raw pointers; it carries the body's safety contract, and may take one type
/// parameter (`$body` then names the instance, e.g. `body::<T>`).
macro_rules! dispatched {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:expr) => {
        $(#[$doc])*
        #[allow(unused_unsafe)]
        $vis fn $name($($arg: $ty),*) -> $ret {
            // SAFETY: `$body` is a safe fn; the block only calls `wide` on a CPU that has its features.
            unsafe { dispatched!(@pick [] $body; ($($arg: $ty),*) -> $ret) }
        }
    };
    ($(#[$doc:meta])* $vis:vis unsafe fn $name:ident $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),*)
        -> $ret:ty = $body:expr) => {
        $(#[$doc])*
        #[allow(unused_unsafe)]
        $vis unsafe fn $name $(<$g: $bound>)? ($($arg: $ty),*) -> $ret {
            // SAFETY: the caller keeps `$body`'s contract; `wide` only runs on a CPU with its features.
            unsafe { dispatched!(@pick [$($g: $bound)?] $body; ($($arg: $ty),*) -> $ret) }
        }
    };
    (@pick [$($g:ident: $bound:path)?] $body:expr; ($($arg:ident: $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[allow(unused_unsafe)]
            #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
            unsafe fn wide $(<$g: $bound>)? ($($arg: $ty),*) -> $ret {
                unsafe { $body($($arg),*) }
            }
            #[allow(unused_unsafe)]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2 $(<$g: $bound>)? ($($arg: $ty),*) -> $ret {
                unsafe { $body($($arg),*) }
            }
            // The active tier is never above what the CPU has (see `tier`).
            match $crate::kernels::tier::Tier::active() {
                $crate::kernels::tier::Tier::Avx512 => return wide $(::<$g>)? ($($arg),*),
                $crate::kernels::tier::Tier::Avx2 => return avx2 $(::<$g>)? ($($arg),*),
                $crate::kernels::tier::Tier::Portable => {}
            }
        }
        $body($($arg),*)
    }};
}
pub(super) use dispatched;

/// The largest value of a row (−∞ for an empty row).
pub fn row_max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if Tier::active() == Tier::Avx512 {
        // SAFETY: the CPU has AVX-512F; the pointer is valid for the row's length.
        return unsafe { avx512::row_max(row.as_ptr(), row.len()) };
    }
    row.iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// e^(scale · (x − max)) of every score x, rounded to bf16 into `dst`; returns the sum of the unrounded
/// exponentials. For probabilities that are rounded to bf16 anyway (the bf16 attention): 2^f on the
/// reduced range comes from a degree-4 polynomial, relative error below 5·10⁻⁵, nearly eighty times finer
/// than bf16's half step (2⁻⁸), at about half the work of the full-precision [`exp`].
pub fn exp_below_bf16(row: &[f32], scale: f32, max: f32, dst: &mut [half::bf16]) -> f32 {
    assert_eq!(row.len(), dst.len(), "exp_below_bf16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if Tier::active() == Tier::Avx512 {
        // SAFETY: the CPU has AVX-512F; the lengths are equal.
        return unsafe { avx512::exp_below_bf16(row, scale, max, dst) };
    }
    let mut sum = 0.0;
    for (&x, out) in row.iter().zip(dst) {
        let e = exp(scale * (x - max));
        sum += e;
        *out = to_bf16(e);
    }
    sum
}

/// Replaces a row of scores x with e^(scale · (x − max x)) and returns their sum (softmax before
/// its division, for callers that divide a smaller product instead).
pub fn exp_shifted(row: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match Tier::active() {
        // SAFETY: the active tier is never above what the CPU has.
        Tier::Avx512 => return unsafe { avx512::exp_shifted(row, scale) },
        Tier::Avx2 => return unsafe { avx2::exp_shifted(row, scale) },
        Tier::Portable => {}
    }
    exp_shifted_body(row, scale)
}
dispatched!(
    /// dst = src · mul + add, followed by SiLU when `silu` is set.
    pub fn normalize(src: &[f32], dst: &mut [f32], mul: f32, add: f32, silu: bool) -> () = normalize_body
);
dispatched!(
    /// dst[i] = bf16(src[i]).
    pub fn bf16_row(src: &[f32], dst: &mut [half::bf16]) -> () = bf16_row_body
);
dispatched!(
    /// dst[2i] = bf16(first[i]), dst[2i + 1] = bf16(second[i]): two rows interleaved as AMX reads B.
    pub fn bf16_pairs(first: &[f32], second: &[f32], dst: &mut [half::bf16]) -> () = bf16_pairs_body
);
dispatched!(
    /// dst = value · GELU(gate), GELU in its exact erf form.
    pub fn geglu(value: &[f32], gate: &[f32], dst: &mut [f32]) -> () = geglu_body
);
dispatched!(
    /// dst = src · σ(1.702 · src) (quick GELU).
    pub fn quick_gelu(src: &[f32], dst: &mut [f32]) -> () = quick_gelu_body
);
dispatched!(
    /// dst = GELU(src), in its exact erf form.
    pub fn gelu(src: &[f32], dst: &mut [f32]) -> () = gelu_body
);
dispatched!(
    /// (Σ (x − mean), Σ (x − mean)²) over `xs`: a shifted sum, so the variance stays exact when the
    /// caller passes a first estimate of the mean.
    pub fn sum_and_squares(xs: &[f32], mean: f32) -> (f32, f32) = sum_and_squares_body
);

/// The softmax exponentials in AVX-512 intrinsics: the portable [`exp`] compiled for AVX-512 still
/// multiplies and adds separately (Rust does not contract them into FMAs, and `f32::mul_add` would be a
/// libm call in the baseline build), and converts and shifts to build 2ⁿ. Here every step is one
/// instruction: FMAs, `vrndscaleps` for n and `vscalefps` for p · 2ⁿ (which also gives 0 below the
/// range instead of needing a clamp), about half the instructions per element.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// e^x on 16 lanes, the same reduction and polynomial as [`super::exp`] (about 1 ulp).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn exp16(x: __m512) -> __m512 {
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_LO), r);
        let mut p = _mm512_set1_ps(super::EXP_POLY[0]);
        for &c in &super::EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        _mm512_scalef_ps(y, n)
    }

    /// The largest of `len` floats from `ptr` (−∞ for none).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `ptr` must be valid for `len` reads.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn row_max(ptr: *const f32, len: usize) -> f32 {
        let tail = (1u32 << (len % 16)) as u16 - 1;
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 16 <= len {
            max = _mm512_max_ps(max, _mm512_loadu_ps(ptr.add(i)));
            i += 16;
        }
        max = _mm512_mask_max_ps(max, tail, max, _mm512_maskz_loadu_ps(tail, ptr.add(i)));
        _mm512_reduce_max_ps(max)
    }

    /// f32 → bf16 of 16 lanes, rounding to nearest even (as [`super::to_bf16`]): the bf16 bits in the
    /// low half of each 32-bit lane, for `vpmovdw` to narrow and store.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn bf16_lanes(x: __m512) -> __m512i {
        let bits = _mm512_castps_si512(x);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
        _mm512_srli_epi32::<16>(rounded)
    }

    /// `exp(x)` of every one of `len` floats from `src`, handed to `store(i, e, lanes)` for elements i..
    /// (`lanes`: which of the 16 belong to the row); returns the sum of the results. The loop both
    /// softmax forms share, each with its own exponential.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `src` must be valid for `len` reads.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_pass(
        src: *const f32,
        len: usize,
        exp: impl Fn(__m512) -> __m512,
        mut store: impl FnMut(usize, __m512, __mmask16),
    ) -> f32 {
        let mut sums = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= len {
            let e = exp(_mm512_loadu_ps(src.add(i)));
            store(i, e, 0xffff);
            sums = _mm512_add_ps(sums, e);
            i += 16;
        }
        if i < len {
            let tail = (1u32 << (len - i)) as u16 - 1;
            let e = exp(_mm512_maskz_loadu_ps(tail, src.add(i)));
            store(i, e, tail);
            sums = _mm512_mask_add_ps(sums, tail, sums, e);
        }
        _mm512_reduce_add_ps(sums)
    }

    /// The coefficients of 2^f ≈ 1 + c₁f + c₂f² + c₃f³ + c₄f⁴ for |f| ≤ ½ (Taylor's: (ln 2)ⁱ / i!).
    const EXP2_DEGREE4: [f32; 4] = [
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
    ];

    /// [`super::exp_below_bf16`] on AVX-512: t = scale · log₂e · (x − max) in one FMA, 2^t as
    /// 2^round(t) (by `vscalefps`) times the polynomial of the remainder.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and `dst` must be as long as `row`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_below_bf16(row: &[f32], scale: f32, max: f32, dst: &mut [half::bf16]) -> f32 {
        let k = scale * std::f32::consts::LOG2_E;
        let (kv, offset) = (_mm512_set1_ps(k), _mm512_set1_ps(-max * k));
        let [c1, c2, c3, c4] = EXP2_DEGREE4.map(|c| _mm512_set1_ps(c));
        let one = _mm512_set1_ps(1.0);
        let exp2 = |x: __m512| {
            let t = _mm512_fmadd_ps(x, kv, offset);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let f = _mm512_sub_ps(t, n);
            let p = _mm512_fmadd_ps(c4, f, c3);
            let p = _mm512_fmadd_ps(p, f, c2);
            let p = _mm512_fmadd_ps(p, f, c1);
            _mm512_scalef_ps(_mm512_fmadd_ps(p, f, one), n)
        };
        let out = dst.as_mut_ptr().cast::<i16>();
        exp_pass(row.as_ptr(), row.len(), exp2, |i, e, lanes| {
            // SAFETY: elements i.. of the selected lanes lie inside `dst`, as long as the row.
            unsafe { _mm512_mask_cvtepi32_storeu_epi16(out.add(i), lanes, bf16_lanes(e)) }
        })
    }

    /// [`super::exp_shifted`] on AVX-512.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted(row: &mut [f32], scale: f32) -> f32 {
        let ptr = row.as_mut_ptr();
        let max = _mm512_set1_ps(row_max(ptr, row.len()));
        let mul = _mm512_set1_ps(scale);
        let exp = |x: __m512| exp16(_mm512_mul_ps(_mm512_sub_ps(x, max), mul));
        exp_pass(ptr, row.len(), exp, |i, e, lanes| {
            // SAFETY: elements i.. of the selected lanes lie inside the row, already read.
            unsafe { _mm512_mask_storeu_ps(ptr.add(i), lanes, e) }
        })
    }
}

/// The softmax exponentials in AVX2 + FMA intrinsics (8 lanes): as [`avx512`], FMAs for the reduction and
/// the polynomial; 2ⁿ is built in the exponent bits (AVX2 has no `vscalefps`), so inputs are clamped to
/// the range where that is exact, as the portable [`exp`] clamps them.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// e^x on 8 lanes, the same reduction and polynomial as [`super::exp`] (about 1 ulp).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.3),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_LO), r);
        let mut p = _mm256_set1_ps(super::EXP_POLY[0]);
        for &c in &super::EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        // n is an integer in [-126, 127] after the clamp: 2ⁿ is the float with exponent bits n + 127.
        let bits = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
    }

    /// [`super::exp_shifted`] on AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(row: &mut [f32], scale: f32) -> f32 {
        let (len, ptr) = (row.len(), row.as_mut_ptr());
        let mut maxes = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= len {
            maxes = _mm256_max_ps(maxes, _mm256_loadu_ps(ptr.add(i)));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), maxes);
        let max = row[i..]
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        let (maxv, mul) = (_mm256_set1_ps(max), _mm256_set1_ps(scale));
        let mut sums = _mm256_setzero_ps();
        i = 0;
        while i + 8 <= len {
            let x = _mm256_loadu_ps(ptr.add(i));
            let e = exp8(_mm256_mul_ps(_mm256_sub_ps(x, maxv), mul));
            _mm256_storeu_ps(ptr.add(i), e);
            sums = _mm256_add_ps(sums, e);
            i += 8;
        }
        let mut sum = 0f32;
        for x in &mut row[i..] {
            *x = super::exp((*x - max) * scale);
            sum += *x;
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
        sum + lanes.iter().sum::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_over_the_softmax_range() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -87.0 + i as f32 * (87.0 + 88.0) / 200_000.0;
            let want = x.exp();
            let rel = ((exp(x) - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37);
    }

    #[test]
    fn bf16_probabilities_are_the_exponentials_rounded_to_bf16() {
        // Lengths around the 16-lane width (tails), scores spread over the softmax's whole range.
        for len in [1usize, 15, 16, 17, 100, 1024] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 997) as f32 * 0.37 - 180.0)
                .collect();
            let (scale, max) = (0.158, row_max(&row));
            assert_eq!(max, row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let mut dst = vec![half::bf16::ZERO; len];
            let sum = exp_below_bf16(&row, scale, max, &mut dst);
            let mut want_sum = 0f64;
            for (&x, got) in row.iter().zip(&dst) {
                let want = (f64::from(scale) * f64::from(x - max)).exp();
                want_sum += want;
                // bf16 keeps 8 significant bits: within half a step (2⁻⁸ relative) plus the
                // polynomial's error.
                let err = (f64::from(got.to_f32()) - want).abs();
                assert!(
                    err <= want * 3.95e-3 + 1e-30,
                    "len {len}: e^{x} gave {got} for {want}"
                );
            }
            let rel = (f64::from(sum) - want_sum).abs() / want_sum;
            assert!(rel < 1e-4, "len {len}: sum {sum} for {want_sum}");
        }
        assert_eq!(row_max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn avx512_exponentials_equal_the_portable_ones() {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::arch::is_x86_feature_detected!("avx512f") {
                eprintln!("no AVX-512 on this machine: skipped");
                return;
            }
            use std::arch::x86_64::*;
            let mut worst = 0f32;
            for i in 0..20_000 {
                let x = -100.0 + i as f32 * (100.0 + 88.0) / 20_000.0;
                // SAFETY: the CPU has AVX-512F (checked above).
                let got = unsafe {
                    let mut lanes = [0f32; 16];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), avx512::exp16(_mm512_set1_ps(x)));
                    lanes[7]
                };
                let want = (x as f64).exp() as f32;
                if want > f32::MIN_POSITIVE {
                    worst = worst.max(((got - want) / want).abs());
                } else {
                    assert!(got <= f32::MIN_POSITIVE, "exp({x}) = {got}");
                }
            }
            assert!(worst < 4e-7, "worst relative error {worst}");
            for len in [1usize, 5, 15, 16, 17, 77, 4096, 4099] {
                let row: Vec<f32> = (0..len)
                    .map(|i| ((i * 37) % 101) as f32 * 0.7 - 30.0)
                    .collect();
                let (mut fast, mut plain) = (row.clone(), row);
                // SAFETY: as above.
                let fast_sum = unsafe { avx512::exp_shifted(&mut fast, 0.3) };
                let plain_sum = exp_shifted_body(&mut plain, 0.3);
                assert!(
                    (fast_sum - plain_sum).abs() <= 1e-6 * plain_sum,
                    "len {len}: sums"
                );
                for (a, b) in fast.iter().zip(&plain) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1e-30),
                        "len {len}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn avx2_exponential_is_as_close_as_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        {
            if Tier::best() < Tier::Avx2 {
                eprintln!("no AVX2 + FMA on this machine: skipped");
                return;
            }
            use std::arch::x86_64::*;
            let mut worst = 0f32;
            for i in 0..20_000 {
                let x = -100.0 + i as f32 * (100.0 + 88.0) / 20_000.0;
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                let got = unsafe {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), avx2::exp8(_mm256_set1_ps(x)));
                    lanes[5]
                };
                let want = (x as f64).exp() as f32;
                if x >= -87.3 {
                    worst = worst.max(((got - want) / want).abs());
                } else {
                    assert!(got <= 1e-37, "exp({x}) = {got}");
                }
            }
            assert!(worst < 4e-7, "worst relative error {worst}");
        }
    }

    #[test]
    fn softmax_exponentials_agree_at_every_tier() {
        for tier in Tier::supported() {
            for len in [1usize, 5, 7, 8, 9, 15, 16, 17, 77, 4096, 4099] {
                let row: Vec<f32> = (0..len)
                    .map(|i| ((i * 37) % 101) as f32 * 0.7 - 30.0)
                    .collect();
                let (mut fast, mut plain) = (row.clone(), row);
                let fast_sum =
                    super::super::tier::run_at(tier, || exp_shifted(&mut fast, 0.3)).unwrap();
                let plain_sum = exp_shifted_body(&mut plain, 0.3);
                assert!(
                    (fast_sum - plain_sum).abs() <= 1e-6 * plain_sum,
                    "{tier} len {len}: sums {fast_sum} vs {plain_sum}"
                );
                for (a, b) in fast.iter().zip(&plain) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1e-30),
                        "{tier} len {len}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn erf_matches_the_series_closely() {
        // erf by its Taylor series in f64 (converges quickly for |x| ≤ 3; erf(±3) is 1 to 2e-5).
        let series = |x: f64| {
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        for i in -3000..=3000 {
            let x = i as f64 / 1000.0;
            let diff = (erf(x as f32) as f64 - series(x)).abs();
            assert!(diff < 5e-7, "erf({x}): off by {diff}");
        }
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn shifted_exponentials_over_their_sum_are_the_softmax() {
        for len in [1usize, 7, 16, 77, 4097] {
            let mut row: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let original = row.clone();
            let inv = 1.0 / exp_shifted(&mut row, 1.0);
            row.iter_mut().for_each(|p| *p *= inv);
            let max = original.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = original.iter().map(|x| (x - max).exp()).sum();
            for (p, x) in row.iter().zip(&original) {
                let want = (x - max).exp() / total;
                assert!((p - want).abs() < 1e-6, "len {len}: {p} vs {want}");
            }
        }
    }
}
