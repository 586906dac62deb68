//! A random generator that draws exactly what PyTorch's CPU generator draws.
//!
//! `torch.Generator("cpu").manual_seed(s)` is a 32-bit Mersenne Twister (mt19937). `torch.randn` on a
//! contiguous float tensor of 16 or more elements fills it with uniforms and turns each block of 16 into
//! normals by Box–Muller (element j pairs with j + 8); when the size is not a multiple of 16 the last 16
//! elements are drawn again and transformed once more. Smaller tensors use the scalar path: a double-precision
//! Box–Muller that caches its second value in the generator. Reproducing this bit for bit is what lets a seed
//! give the same image as diffusers.

use candle_core::{DType, Device, Shape, Tensor};

const N: usize = 624;
const M: usize = 397;

/// The 32-bit Mersenne Twister, seeded as `std::mt19937` / `at::mt19937` are.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; N],
    index: usize,
}

impl Mt19937 {
    /// A twister seeded with the low 32 bits of `seed`, as torch's `manual_seed` does.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 { state, index: N }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut next = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// PyTorch's CPU generator: the twister plus the cached second normal of the scalar path.
#[derive(Clone)]
pub struct TorchGenerator {
    mt: Mt19937,
    seed: u64,
    cached_normal: Option<f64>,
}

impl TorchGenerator {
    /// Same state as `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        TorchGenerator {
            mt: Mt19937::new(seed),
            seed,
            cached_normal: None,
        }
    }

    /// The seed this generator was created with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next 32 random bits, as torch's `random()`; `torch.randint(n)` (n < 2³²) draws this modulo n.
    pub fn random_u32(&mut self) -> u32 {
        self.mt.next_u32()
    }

    /// A float uniform in [0, 1) from 24 random bits (torch's `uniform_real_distribution<float>`).
    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A double uniform in [0, 1) from 53 random bits (two draws, the first one high).
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.mt.next_u32() as u64;
        let lo = self.mt.next_u32() as u64;
        let bits = ((hi << 32) | lo) & ((1u64 << 53) - 1);
        bits as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// torch's scalar `normal_distribution<double>` with mean 0 and std 1.
    fn scalar_normal(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// Box–Muller over one block of 16 uniforms, in place.
    fn normal_fill_16(block: &mut [f32]) {
        for j in 0..8 {
            let u1 = 1.0 - block[j];
            let u2 = block[j + 8];
            let radius = (-2.0 * u1.ln()).sqrt();
            let theta = 2.0 * std::f32::consts::PI * u2;
            block[j] = radius * theta.cos();
            block[j + 8] = radius * theta.sin();
        }
    }

    /// `n` standard normals, exactly as `torch.randn(n, generator=g)` (float32) draws them.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.scalar_normal() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for start in (0..n - 15).step_by(16) {
            Self::normal_fill_16(&mut data[start..start + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            Self::normal_fill_16(tail);
        }
        data
    }

    /// A tensor of standard normals of `shape` (drawn in float32, then cast to `dtype`) on `device`.
    pub fn randn_tensor<S: Into<Shape>>(
        &mut self,
        shape: S,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape: Shape = shape.into();
        let values = self.randn(shape.elem_count());
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_standard_reference() {
        // The C++ standard requires the 10000th output of a default-seeded mt19937 to be 4123659995.
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn randn_matches_torch_for_seed_zero() {
        // torch.randn(5, generator=torch.Generator('cpu').manual_seed(0))
        let v = TorchGenerator::new(0).randn(5);
        let expected = [1.5410f32, -0.2934, -2.1788, 0.5684, -1.0845];
        for (a, b) in v.iter().zip(expected) {
            assert!((a - b).abs() < 1e-4, "{v:?}");
        }
        // torch.randn(20, ...)[:5]
        let v = TorchGenerator::new(0).randn(20);
        let expected = [-1.1258f32, -1.1524, -0.2506, -0.4339, 0.5988];
        for (a, b) in v.iter().zip(expected) {
            assert!((a - b).abs() < 1e-4, "{v:?}");
        }
    }
}
