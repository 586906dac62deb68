//! `pictor bench`: times the full-size SD 1.5 or SDXL networks with random weights, or compares the UNet's output
//! with and without token merging.

use anyhow::Result;
use pictor_engine::bench::{
    compare_tome, run_bench, BenchArch, BenchComponent, BenchDevice, BenchOptions, BenchPrecision,
};

use crate::args::{ArchArg, BenchArgs, BenchComponentArg, DeviceArg, DevicePrecisionArg};

/// Runs the benchmark `args` describes and prints its result.
pub fn bench(args: &BenchArgs) -> Result<()> {
    let precision = match args.precision {
        DevicePrecisionArg::Fp32 => BenchPrecision::Fp32,
        DevicePrecisionArg::Bf16 => BenchPrecision::Bf16,
        DevicePrecisionArg::Fp16 => BenchPrecision::Fp16,
    };
    let device = match args.device {
        DeviceArg::Cpu => BenchDevice::Cpu,
        DeviceArg::Cuda => BenchDevice::Cuda,
    };
    if args.compare_tome {
        if device != BenchDevice::Cpu {
            anyhow::bail!("--compare-tome runs on the CPU only");
        }
        let c = compare_tome(args.resolution, args.batch, precision)?;
        if args.json {
            println!("{}", serde_json::to_string(&c)?);
        } else {
            println!(
                "UNet {0}×{0}, batch {1}: with tomesd vs without: relative L2 {2:.4}, cosine {3:.5}, max |Δ| {4:.4}; \
                 {5:.2} s without, {6:.2} s with",
                c.resolution, c.batch, c.relative_l2, c.cosine, c.max_abs_diff, c.full_s, c.merged_s
            );
        }
        return Ok(());
    }
    let component = match args.component {
        BenchComponentArg::Unet => BenchComponent::Unet,
        BenchComponentArg::VaeEncode => BenchComponent::VaeEncode,
        BenchComponentArg::VaeDecode => BenchComponent::VaeDecode,
        BenchComponentArg::TextEncoder => BenchComponent::TextEncoder,
        BenchComponentArg::Img2img => BenchComponent::Img2img,
    };
    let arch = match args.arch {
        ArchArg::Sd15 => BenchArch::Sd15,
        ArchArg::Sdxl => BenchArch::Sdxl,
    };
    let report = run_bench(&BenchOptions {
        arch,
        component,
        resolution: args.resolution,
        batch: args.batch,
        iterations: args.iterations,
        precision,
        tome: args.tomesd,
        steps: args.steps,
        device,
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let peak = report
            .peak_rss_mib
            .map(|m| format!("{m:.0} MiB"))
            .unwrap_or_else(|| "unknown".into());
        let place = match report.device {
            BenchDevice::Cpu => format!("on CPU tier {}", report.cpu_tier),
            BenchDevice::Cuda => "on CUDA GPU 0".to_string(),
        };
        println!(
            "{:?} {:?} {}×{} batch {} {:?}{} {place}: median {:.3} s over {} runs ({:?}); peak memory {peak}",
            arch,
            component,
            report.resolution,
            report.resolution,
            report.batch,
            report.precision,
            if report.tomesd { " tomesd" } else { "" },
            report.median_s,
            report.times_s.len(),
            report
                .times_s
                .iter()
                .map(|t| (t * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>(),
        );
    }
    Ok(())
}
