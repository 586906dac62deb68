//! `pictor check-fixtures DIR` (hidden): runs the diffusers parity cases of a fixtures folder on a device and
//! compares every image with its reference (`pictor_engine::parity`, which the engine's parity tests use
//! too). scripts/gpu_check.sh runs it on a GPU from a packed folder, where there is no cargo.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Result};
use pictor_engine::model_store::{self, ModelsDir};
use pictor_engine::parity::{self, CaseOutcome, MIN_REDUCED_PSNR_DB};
use pictor_engine::pipeline::StableDiffusion;
use pictor_engine::Runtime;
use serde_json::json;

use crate::args::{CheckFixturesArgs, DeviceArg, DevicePrecisionArg};

/// Runs the cases `args` names and prints the outcome; an error when any case failed.
pub fn check_fixtures(args: &CheckFixturesArgs) -> Result<()> {
    let root = &args.dir;
    let mut cases = parity::load_cases(root)?;
    if cases.is_empty() {
        bail!("{}: no fixture cases found", root.display());
    }
    if !args.cases.is_empty() {
        for name in &args.cases {
            if !cases.iter().any(|c| &c.name == name) {
                bail!("{}: no case named {name}", root.display());
            }
        }
        cases.retain(|c| args.cases.contains(&c.name));
    }
    let runtime = match args.device {
        DeviceArg::Cpu => Runtime::cpu(),
        DeviceArg::Cuda => Runtime::cuda()?,
    }
    .in_f16(args.precision == DevicePrecisionArg::Fp16);
    pictor_engine::kernels::set_bf16_products(args.precision == DevicePrecisionArg::Bf16)
        .map_err(anyhow::Error::msg)?;
    let reduced = args.precision != DevicePrecisionArg::Fp32;
    let models = ModelsDir::new(root.join("models"));
    let mut loaded: HashMap<String, Result<StableDiffusion, String>> = HashMap::new();
    let mut load_seconds = serde_json::Map::new();
    let mut outcomes: Vec<CaseOutcome> = Vec::new();
    for case in &cases {
        let id = parity::model_id(case).to_string();
        let model = loaded.entry(id.clone()).or_insert_with(|| {
            let start = Instant::now();
            let model = models
                .resolve_id(&id)
                .and_then(|location| model_store::load(&location, &runtime.device, runtime.dtype))
                .map_err(|e| e.to_string());
            load_seconds.insert(id.clone(), json!(start.elapsed().as_secs_f64()));
            model
        });
        let outcome = match model {
            Ok(model) => parity::run_case(root, model, case, reduced),
            Err(e) => CaseOutcome::of(case, Some(format!("loading {id}: {e}"))),
        };
        if !args.json {
            print_outcome(&outcome, reduced);
        }
        outcomes.push(outcome);
    }
    let failed = outcomes.iter().filter(|o| !o.pass).count();
    let device = match args.device {
        DeviceArg::Cpu => "cpu",
        DeviceArg::Cuda => "cuda",
    };
    let precision = match args.precision {
        DevicePrecisionArg::Fp32 => "fp32",
        DevicePrecisionArg::Bf16 => "bf16",
        DevicePrecisionArg::Fp16 => "fp16",
    };
    if args.json {
        let tolerance = if reduced {
            json!({ "min_psnr_db": MIN_REDUCED_PSNR_DB })
        } else {
            json!({
                "max_abs_diff": parity::MAX_ABS_DIFF,
                "max_mean_abs_diff": parity::MAX_MEAN_ABS_DIFF,
            })
        };
        println!(
            "{}",
            json!({
                "device": device,
                "precision": precision,
                "tolerance": tolerance,
                "cases": outcomes,
                "passed": outcomes.len() - failed,
                "failed": failed,
                "pass": failed == 0,
                "load_seconds": load_seconds,
            })
        );
    } else {
        println!(
            "{} of {} cases passed ({device}, {precision})",
            outcomes.len() - failed,
            outcomes.len()
        );
    }
    if failed > 0 {
        bail!("{failed} of {} cases failed", outcomes.len());
    }
    Ok(())
}

/// Prints one line for `outcome`: its verdict, worst differences and time.
fn print_outcome(outcome: &CaseOutcome, reduced: bool) {
    let verdict = if outcome.pass { "ok  " } else { "FAIL" };
    let detail = match &outcome.error {
        Some(e) => e.clone(),
        None => {
            let max = outcome.images.iter().map(|c| c.max_abs_diff).max();
            let mean = outcome
                .images
                .iter()
                .map(|c| c.mean_abs_diff)
                .fold(0.0, f64::max);
            let psnr = outcome
                .images
                .iter()
                .map(|c| c.psnr_db)
                .fold(f64::INFINITY, f64::min);
            let psnr = if reduced || psnr.is_finite() {
                format!(", PSNR {psnr:.1} dB")
            } else {
                String::new()
            };
            format!(
                "max |Δ| {}, mean |Δ| {mean:.3}{psnr}, {:.2} s",
                max.unwrap_or(0),
                outcome.seconds.unwrap_or(0.0)
            )
        }
    };
    println!(
        "{verdict} {} ({}, {}, {}): {detail}",
        outcome.name, outcome.model, outcome.pipeline, outcome.scheduler
    );
}
