//! Prints the time of a Winograd 3×3 convolution (best of five) at the active kernel tier on SD's
//! large-channel layers, and of `conv2d` on its 1×1 and 8² and 4² 3×3 layers: `cargo run --release -p
//! pictor-engine --example conv_rate`. glibc is told to keep its heap, as the `pictor` binary does, so
//! that fresh buffers are not faulted in on every call.
use candle_core::{Device, Tensor};
use pictor_engine::kernels::conv::{conv2d, ConvWeights};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: plain settings of glibc's malloc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    if let Ok(Some(tier)) = pictor_engine::kernels::tier::from_env() {
        pictor_engine::kernels::tier::set(tier).unwrap();
    }
    for &(b, c_in, c_out, side) in &[
        (2usize, 1280usize, 1280usize, 16usize),
        (2, 2560, 1280, 16),
        (2, 1280, 1280, 32),
        (2, 1920, 640, 32),
    ] {
        let xs = Tensor::randn(0f32, 1.0, (b, c_in, side, side), &Device::Cpu)?;
        let weight = Tensor::randn(0f32, 0.1, (c_out, c_in, 3, 3), &Device::Cpu)?;
        let bias = Tensor::randn(0f32, 0.1, c_out, &Device::Cpu)?;
        let best = best_of_five(|| {
            pictor_engine::kernels::winograd::conv3x3(&xs, &weight, &bias, 1).map(drop)
        })?;
        println!(
            "{b} x {c_in} x {side}² -> {c_out} ({}): {:.1} ms",
            pictor_engine::kernels::tier::Tier::active().name(),
            best * 1e3
        );
    }
    for &(b, c_in, c_out, side, kernel) in &[
        (2usize, 320usize, 320usize, 64usize, 1usize),
        (2, 640, 640, 32, 1),
        (2, 1280, 1280, 16, 1),
        (2, 1280, 1280, 8, 3),
        (2, 2560, 1280, 8, 3),
        (2, 1280, 1280, 4, 3),
        (2, 2560, 1280, 4, 3),
    ] {
        let xs = Tensor::randn(0f32, 1.0, (b, c_in, side, side), &Device::Cpu)?;
        let weight = Tensor::randn(0f32, 0.1, (c_out, c_in, kernel, kernel), &Device::Cpu)?;
        let bias = Tensor::randn(0f32, 0.1, c_out, &Device::Cpu)?;
        let padding = kernel / 2;
        let best =
            best_of_five(|| conv2d(&xs, ConvWeights::F32(&weight), &bias, padding, 1).map(drop))?;
        println!(
            "conv2d {kernel}×{kernel}: {b} x {c_in} x {side}² -> {c_out} ({}): {:.1} ms",
            pictor_engine::kernels::tier::Tier::active().name(),
            best * 1e3
        );
    }
    Ok(())
}

/// The shortest of five timed runs of `run` (seconds), after one untimed run.
fn best_of_five(run: impl Fn() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    run()?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        run()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}
