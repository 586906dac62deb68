//! Element loops the kernels share (exponential, softmax, normalise-and-SiLU, sums), written so the compiler vectorises them,
//! and compiled twice: for AVX-512 (chosen at run time when the CPU has it) and for the baseline target.

/// e^x for f32 with about 1 ulp error over the range that matters (Cody–Waite range reduction to
/// [-ln2/2, ln2/2] and a degree-6 polynomial); inputs below -87.3 give ~1e-38 instead of 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
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

#[inline(always)]
fn softmax_body(row: &mut [f32], scale: f32) {
    let inv = 1.0 / exp_shifted_body(row, scale);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// Replaces x with e^(scale · (x − max x)) and returns the sum: softmax without the final division.
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

/// Defines `$name` that runs `$body` compiled for AVX-512 when the CPU has it, else for the baseline
/// (`$body` is `#[inline(always)]`, so it is built into both). An `unsafe fn` form serves kernels whose
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
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512dq")
            {
                return wide $(::<$g>)? ($($arg),*);
            }
        }
        $body($($arg),*)
    }};
}
pub(super) use dispatched;

dispatched!(
    /// Replaces a row of scores x with softmax(scale · x), in place (scale > 0).
    pub fn softmax_scaled(row: &mut [f32], scale: f32) -> () = softmax_body
);
dispatched!(
    /// Replaces a row of scores x with e^(scale · (x − max x)) and returns their sum (softmax before
    /// its division, for callers that divide a smaller product instead).
    pub fn exp_shifted(row: &mut [f32], scale: f32) -> f32 = exp_shifted_body
);
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
    /// (Σ (x − mean), Σ (x − mean)²) over `xs`: a shifted sum, so the variance stays exact when the
    /// caller passes a first estimate of the mean.
    pub fn sum_and_squares(xs: &[f32], mean: f32) -> (f32, f32) = sum_and_squares_body
);

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
    fn softmax_sums_to_one_and_keeps_order() {
        for len in [1usize, 7, 16, 77, 4097] {
            let mut row: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let original = row.clone();
            softmax_scaled(&mut row, 1.0);
            let max = original.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = original.iter().map(|x| (x - max).exp()).sum();
            for (p, x) in row.iter().zip(&original) {
                let want = (x - max).exp() / total;
                assert!((p - want).abs() < 1e-6, "len {len}: {p} vs {want}");
            }
        }
    }
}
