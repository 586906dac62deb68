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

/// The polynomial of 2^f on [-½, ½]: 2^f ≈ 1 + f · Q(f), Q's coefficients from the highest degree down
/// (fitted for relative error: below 1e-7 in f32, about one ulp; every tier's [`exp2_below`] uses
/// these).
const EXP2_POLY: [f32; 6] = [
    1.535_335_3e-4,
    1.339_887_5e-3,
    9.618_438e-3,
    5.550_332_4e-2,
    2.402_264_8e-1,
    6.931_472e-1,
];

/// The lowest exponent [`exp2_below`] computes (smaller ones give 2^-125 instead of less): 2^f · 2ⁿ
/// stays a normal float for n ≥ −125, so every tier builds 2ⁿ in the exponent bits.
const EXP2_MIN: f32 = -125.0;

/// 2^t for t ≤ 0 (t below [`EXP2_MIN`] gives 2^EXP2_MIN): 2^round(t) in the exponent bits times the
/// polynomial of the remainder.
#[inline(always)]
fn exp2_nonpositive(t: f32) -> f32 {
    let t = if t > EXP2_MIN { t } else { EXP2_MIN };
    let n = (t + 0.5).floor();
    let f = t - n;
    let mut p = EXP2_POLY[0];
    for c in &EXP2_POLY[1..] {
        p = p * f + c;
    }
    let y = p * f + 1.0;
    // SAFETY: n is an integer in [-125, 0] after the clamp.
    let n = unsafe { n.to_int_unchecked::<i32>() };
    f32::from_bits((y.to_bits() as i32 + (n << 23)) as u32)
}

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

/// Replaces every x with 2^(x − max) and returns the sum (the portable form of [`exp2_below`]).
#[inline(always)]
fn exp2_below_body(row: &mut [f32], max: f32) -> f32 {
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk.iter_mut()) {
            *x = exp2_nonpositive(*x - max);
            *s += *x;
        }
    }
    let mut sum: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = exp2_nonpositive(*x - max);
        sum += *x;
    }
    sum + sums.iter().sum::<f32>()
}

/// The largest value of a row (the portable form of [`row_max`]).
#[inline(always)]
fn row_max_body(row: &[f32]) -> f32 {
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
    max
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
    match Tier::active() {
        // SAFETY: the active tier is never above what the CPU has; the pointer is valid for the row.
        Tier::Avx512 => return unsafe { avx512::row_max(row.as_ptr(), row.len()) },
        Tier::Avx2 => return unsafe { avx2::row_max(row) },
        Tier::Portable => {}
    }
    row_max_body(row)
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

/// Replaces every score x with 2^(x − max) and returns their sum, for a `max` at least the row's largest
/// value: the softmax's exponentials for scores already multiplied by log₂e (the f32 attention scales its
/// keys so): no multiplication by log₂e and no two-part ln 2 reduction, six multiply-adds per vector
/// where e^x took twelve (the 4096-token attention 11 % faster at AVX2). Relative error about 1e-7;
/// differences below −125 give 2^-125 (about 2e-38) instead of less.
pub fn exp2_below(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match Tier::active() {
        // SAFETY: the active tier is never above what the CPU has.
        Tier::Avx512 => return unsafe { avx512::exp2_below(row, max) },
        Tier::Avx2 => return unsafe { avx2::exp2_below(row, max) },
        Tier::Portable => {}
    }
    exp2_below_body(row, max)
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

/// The softmax exponentials in AVX-512 intrinsics: the portable forms compiled for AVX-512 still
/// multiply and add separately (Rust does not contract them into FMAs, and `f32::mul_add` would be a
/// libm call in the baseline build), and convert and shift to build 2ⁿ. Here every step is one
/// instruction: FMAs, `vrndscaleps` for n and `vscalefps` for p · 2ⁿ (which also gives 0 below the
/// range instead of needing a clamp), about half the instructions per element.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

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

    /// [`super::exp2_below`] on AVX-512: `vscalefps` for 2ⁿ (0 far below the range, no clamp).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp2_below(row: &mut [f32], max: f32) -> f32 {
        let ptr = row.as_mut_ptr();
        let max = _mm512_set1_ps(max);
        let exp2 = |x: __m512| {
            let t = _mm512_sub_ps(x, max);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let f = _mm512_sub_ps(t, n);
            let mut p = _mm512_set1_ps(super::EXP2_POLY[0]);
            for &c in &super::EXP2_POLY[1..] {
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
            }
            _mm512_scalef_ps(_mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0)), n)
        };
        exp_pass(ptr, row.len(), exp2, |i, e, lanes| {
            // SAFETY: elements i.. of the selected lanes lie inside the row, already read.
            unsafe { _mm512_mask_storeu_ps(ptr.add(i), lanes, e) }
        })
    }
}

/// The softmax exponentials in AVX2 + FMA intrinsics (8 lanes): as [`avx512`], FMAs for the polynomial;
/// 2ⁿ is added to the exponent bits (AVX2 has no `vscalefps`), so inputs are clamped to the range where
/// that is exact, as the portable form clamps them.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::row_max`] on AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn row_max(row: &[f32]) -> f32 {
        let (len, ptr) = (row.len(), row.as_ptr());
        let mut maxes = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
        let mut i = 0;
        while i + 16 <= len {
            maxes[0] = _mm256_max_ps(maxes[0], _mm256_loadu_ps(ptr.add(i)));
            maxes[1] = _mm256_max_ps(maxes[1], _mm256_loadu_ps(ptr.add(i + 8)));
            i += 16;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_max_ps(maxes[0], maxes[1]));
        row[i..]
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }

    /// [`super::exp2_below`] on AVX2: six FMAs per 8 scores, 2ⁿ added to the exponent bits.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp2_below(row: &mut [f32], max: f32) -> f32 {
        let (len, ptr) = (row.len(), row.as_mut_ptr());
        let (maxv, low) = (_mm256_set1_ps(max), _mm256_set1_ps(super::EXP2_MIN));
        let mut sums = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= len {
            let t = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(i)), maxv), low);
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let f = _mm256_sub_ps(t, n);
            let mut p = _mm256_set1_ps(super::EXP2_POLY[0]);
            for &c in &super::EXP2_POLY[1..] {
                p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
            }
            let y = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
            // n in [-125, 0]: y · 2ⁿ is y with n added to its exponent, still a normal float.
            let e = _mm256_castsi256_ps(_mm256_add_epi32(
                _mm256_castps_si256(y),
                _mm256_slli_epi32::<23>(_mm256_cvtps_epi32(n)),
            ));
            _mm256_storeu_ps(ptr.add(i), e);
            sums = _mm256_add_ps(sums, e);
            i += 8;
        }
        let mut sum = 0f32;
        for x in &mut row[i..] {
            *x = super::exp2_nonpositive(*x - max);
            sum += *x;
        }
        let mut lanes = [0f32; 8];
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
    fn base_two_exponentials_match_std_at_every_tier() {
        for tier in Tier::supported() {
            // Scores in log₂ units over the whole range, including below 2^-125, and row lengths
            // around the lane widths (tails).
            for len in [1usize, 7, 8, 9, 15, 16, 17, 100, 4099] {
                let row: Vec<f32> = (0..len)
                    .map(|i| ((i * 7919) % 1009) as f32 * -0.131 + 3.0)
                    .collect();
                let max = row_max_body(&row);
                let mut fast = row.clone();
                let sum = super::super::tier::run_at(tier, || exp2_below(&mut fast, max)).unwrap();
                let mut want_sum = 0f64;
                for (&got, &x) in fast.iter().zip(&row) {
                    let t = (x - max) as f64;
                    let want = t.exp2();
                    want_sum += want;
                    if t >= -125.0 {
                        let rel = (got as f64 - want).abs() / want;
                        assert!(rel < 2.5e-7, "{tier} 2^{t}: {got} vs {want} ({rel})");
                    } else {
                        assert!(got <= 3e-38, "{tier} 2^{t}: {got}");
                    }
                }
                assert!(
                    (sum as f64 - want_sum).abs() <= 1e-6 * want_sum,
                    "{tier} len {len}: sum {sum} vs {want_sum}"
                );
            }
        }
    }

    #[test]
    fn row_maxima_agree_at_every_tier() {
        for tier in Tier::supported() {
            for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 33, 4099] {
                // The largest value at every position in turn (first, tails, middle).
                for at in [0, len / 2, len.saturating_sub(1)] {
                    let mut row: Vec<f32> = (0..len).map(|i| -(((i * 13) % 29) as f32)).collect();
                    if len > 0 {
                        row[at] = 5.5;
                    }
                    let want = if len == 0 { f32::NEG_INFINITY } else { 5.5 };
                    let got = super::super::tier::run_at(tier, || row_max(&row)).unwrap();
                    assert_eq!(got, want, "{tier} len {len} at {at}");
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
    fn base_two_exponentials_over_their_sum_are_the_softmax() {
        for len in [1usize, 7, 16, 77, 4097] {
            let original: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            // Scores in log₂ units, as the f32 attention's scaled keys give them.
            let mut row: Vec<f32> = original
                .iter()
                .map(|x| x * std::f32::consts::LOG2_E)
                .collect();
            let max = row_max(&row);
            let inv = 1.0 / exp2_below(&mut row, max);
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
