//! Prints the f32 attention's rate (GFLOP/s of its two products) at the active kernel tier on SD 1.5's
//! self-attention shapes: `cargo run --release -p pictor-engine --example attention_rate`.
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    if let Ok(Some(tier)) = pictor_engine::kernels::tier::from_env() {
        pictor_engine::kernels::tier::set(tier).unwrap();
    }
    for &(tokens, inner) in &[(4096usize, 320usize), (1024, 640), (256, 1280)] {
        let q = Tensor::randn(0f32, 1.0, (2, tokens, inner), &Device::Cpu)?;
        let k = Tensor::randn(0f32, 1.0, (2, tokens, inner), &Device::Cpu)?;
        let v = Tensor::randn(0f32, 1.0, (2, tokens, inner), &Device::Cpu)?;
        pictor_engine::kernels::attention::attention(&q, &k, &v, 8)?;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            pictor_engine::kernels::attention::attention(&q, &k, &v, 8)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        let flop = 2.0 * 2.0 * 2.0 * (tokens * tokens * inner) as f64;
        println!(
            "{tokens} tokens x {inner} ({}): {:.1} GFLOP/s, {:.1} ms",
            pictor_engine::kernels::tier::Tier::active().name(),
            flop / best / 1e9,
            best * 1e3
        );
    }
    Ok(())
}
