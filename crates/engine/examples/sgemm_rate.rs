//! Prints the f32 product's rate (GFLOP/s) at the active kernel tier (`PICTOR_CPU` lowers it) on the
//! shapes Stable Diffusion's UNet runs most: `cargo run --release -p pictor-engine --example sgemm_rate`.
use pictor_engine::kernels::sgemm::{gemm, PackedB, Start};
use std::time::Instant;

fn main() {
    if let Ok(Some(tier)) = pictor_engine::kernels::tier::from_env() {
        pictor_engine::kernels::tier::set(tier).unwrap();
    }
    let shapes: &[(usize, usize, usize)] = &[
        (2048, 1280, 1280),
        (8192, 320, 320),
        (8192, 2560, 320),
        (8192, 320, 2560),
        (2048, 640, 5120),
        (4096, 4096, 40),
        (4096, 40, 4096),
        (1024, 1024, 80),
        (256, 256, 160),
        (4096, 77, 40),
        (320, 320, 128),
        (640, 640, 128),
        (1280, 1280, 32),
        (2048, 320, 1280),
        (512, 640, 2560),
        (320, 320, 4096),
        (640, 640, 1024),
        (1280, 1280, 256),
        (320, 640, 4096),
        // Rows at strides a register tile crowds into few L1 sets: linear inputs of 1280, 2560 and
        // 5120 features, and 3×3 convolutions' weights over 1280 and 2560 channels on 8² and 4² maps.
        (8192, 1280, 320),
        (2048, 2560, 640),
        (1024, 5120, 1280),
        (1280, 11520, 128),
        (1280, 11520, 32),
        (1280, 23040, 32),
    ];
    for &(m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let b = PackedB::transposed(&w, n, k, k);
        let mut c = vec![0f32; m * n];
        gemm(m, &a, k, &b, &mut c, n, Start::Zero);
        let runs = 5;
        let mut best = f64::MAX;
        for _ in 0..runs {
            let t = Instant::now();
            gemm(m, &a, k, &b, &mut c, n, Start::Zero);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let flop = 2.0 * (m * n * k) as f64;
        println!(
            "{:>6} x {:>5} x {:>5} ({}): {:7.1} GFLOP/s, {:.2} ms",
            m,
            k,
            n,
            pictor_engine::kernels::tier::Tier::active().name(),
            flop / best / 1e9,
            best * 1e3
        );
    }
}
