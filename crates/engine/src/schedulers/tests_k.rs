//! Parity of LMS, Heun, KDPM2, KDPM2-ancestral and DDPM with diffusers 0.42.1 (fixtures written by
//! `scripts/make_scheduler_fixtures_k.py`), plus their config and step-bookkeeping behaviour.

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::lms::lms_coefficient;
use super::test_support::{
    compare_nan_equal as compare, compare_tensors_nan_equal as compare_tensors, err_text,
    fake_unet, fixture, float, img2img_begin, options, scalars, tensor, with, TOL,
};
use super::{build, SchedulerOptions};
use crate::rng::TorchGenerator;

#[test]
fn k_schedules_match_diffusers() {
    let fx = fixture("k_schedules.json");
    let cases = fx["cases"].as_array().unwrap();
    let (mut worst_t, mut worst_s, mut inexact_t, mut inexact_s) = (0.0f64, 0.0f64, 0usize, 0usize);
    for case in cases {
        let name = case["scheduler"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let karras = case["use_karras_sigmas"].as_bool().unwrap();
        let what = format!("{name} {} steps={steps} karras={karras}", case["config"]);
        let s = build(name, &case["config"], steps, &options(karras))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let (wt, dt) = compare(s.timesteps(), &scalars(&case["timesteps"]));
        assert!(
            wt <= TOL,
            "{what}: timesteps off by {wt:e}: {:?}",
            s.timesteps()
        );
        if name == "DDPMScheduler" {
            assert_eq!(dt, 0, "{what}: integer timesteps must match exactly");
        }
        worst_t = worst_t.max(wt);
        inexact_t += dt;
        match (s.sigmas(), case["sigmas"].is_null()) {
            (Some(actual), false) => {
                let (ws, ds) = compare(actual, &scalars(&case["sigmas"]));
                assert!(ws <= TOL, "{what}: sigmas off by {ws:e}");
                worst_s = worst_s.max(ws);
                inexact_s += ds;
            }
            (None, true) => {}
            (a, _) => panic!("{what}: sigmas presence differs ({:?})", a.is_some()),
        }
        let expected_ins = float(&case["init_noise_sigma"]);
        assert!(
            (s.init_noise_sigma() - expected_ins).abs() <= TOL * expected_ins,
            "{what}: init_noise_sigma {} vs {expected_ins}",
            s.init_noise_sigma()
        );
        assert_eq!(
            s.order() as u64,
            case["order"].as_u64().unwrap(),
            "{what}: order"
        );
    }
    eprintln!(
        "{} k schedule cases: timesteps worst rel {worst_t:e} ({inexact_t} values not bit-equal), \
         sigmas worst rel {worst_s:e} ({inexact_s} values not bit-equal)",
        cases.len()
    );
}

#[test]
fn lms_coefficients_match_scipy_quad() {
    let fx = fixture("k_schedules.json");
    let mut worst = 0.0f64;
    let mut count = 0;
    for set in fx["lms_coefficients"].as_array().unwrap() {
        let steps = set["steps"].as_u64().unwrap() as usize;
        let karras = set["use_karras_sigmas"].as_bool().unwrap();
        let s = build(
            "LMSDiscreteScheduler",
            &set["config"],
            steps,
            &options(karras),
        )
        .unwrap();
        let sigmas: Vec<f32> = s.sigmas().unwrap().iter().map(|&v| v as f32).collect();
        for c in set["coefficients"].as_array().unwrap() {
            let order = c[0].as_u64().unwrap() as usize;
            let t = c[1].as_u64().unwrap() as usize;
            let cur = c[2].as_u64().unwrap() as usize;
            let expected = c[3].as_f64().unwrap();
            let actual = lms_coefficient(&sigmas, order, t, cur);
            let err = (actual - expected).abs() / expected.abs().max(1e-3);
            assert!(
                err <= 1e-7,
                "LMS coefficient order={order} t={t} cur={cur}: {actual} vs scipy {expected}"
            );
            worst = worst.max(err);
            count += 1;
        }
    }
    eprintln!("{count} LMS coefficients: worst rel error vs scipy {worst:e}");
}

#[test]
fn k_img2img_runs_match_diffusers() {
    let fx = fixture("k_runs.json");
    let init = tensor(&fx["init"]);
    let noise = tensor(&fx["noise"]);
    let base = tensor(&fx["base"]);
    let runs = fx["runs"].as_array().unwrap();
    let mut worst = 0.0f64;
    let mut exact_runs = 0;
    for run in runs {
        let name = run["scheduler"].as_str().unwrap();
        let steps = run["steps"].as_u64().unwrap() as usize;
        let strength = run["strength"].as_f64().unwrap();
        let karras = run["use_karras_sigmas"].as_bool().unwrap();
        let what = format!(
            "{name} {} steps={steps} strength={strength} karras={karras}",
            run["config"]
        );
        let mut s = build(name, &run["config"], steps, &options(karras)).unwrap();

        let begin = img2img_begin(run, s.order(), &what);
        let timesteps = s.timesteps()[begin..].to_vec();
        let (err, _) = compare(&timesteps, &scalars(&run["timesteps"]));
        assert!(err <= TOL, "{what}: sliced timesteps off by {err:e}");
        s.set_begin_index(begin);
        let ins = float(&run["init_noise_sigma"]);
        assert!(
            (s.init_noise_sigma() - ins).abs() <= TOL * ins,
            "{what}: init_noise_sigma"
        );

        let mut latents = s.add_noise(&init, &noise, timesteps[0]).unwrap();
        let (err, _) = compare_tensors(&latents, &tensor(&run["noised"]));
        assert!(err <= TOL, "{what}: add_noise off by {err:e}");
        let mut run_worst = err;

        let mut rng = TorchGenerator::new(run["seed"].as_u64().unwrap_or(0));
        let trajectory = run["trajectory"].as_array().unwrap();
        assert_eq!(trajectory.len(), timesteps.len(), "{what}");
        for (k, (&t, reference)) in timesteps.iter().zip(trajectory).enumerate() {
            let scaled = s.scale_model_input(&latents, t).unwrap();
            let out = fake_unet(&scaled, &base, t);
            latents = s.step(&out, t, &latents, &mut rng).unwrap();
            let (err, _) = compare_tensors(&latents, &tensor(&reference["prev_sample"]));
            assert!(err <= TOL, "{what}: step {k} (t = {t}) off by {err:e}");
            run_worst = run_worst.max(err);
        }
        if run_worst == 0.0 {
            exact_runs += 1;
        }
        eprintln!("{what}: worst rel {run_worst:e}");
        worst = worst.max(run_worst);
    }
    eprintln!(
        "{} k runs: worst rel {worst:e}; {exact_runs} bit-exact end to end",
        runs.len()
    );
}

fn sd15() -> Value {
    json!({
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "clip_sample": false
    })
}

#[test]
fn k_config_semantics_and_refusals() {
    // Karras: the request's flag wins over the file, None keeps the file's value.
    for name in [
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
    ] {
        let plain = build(name, &sd15(), 10, &SchedulerOptions::default()).unwrap();
        let karras = build(name, &sd15(), 10, &options(true)).unwrap();
        assert_ne!(plain.sigmas(), karras.sigmas(), "{name}");
        let file = with(sd15(), "use_karras_sigmas", json!(true));
        let from_file = build(name, &file, 10, &SchedulerOptions::default()).unwrap();
        assert_eq!(from_file.sigmas(), karras.sigmas(), "{name}");
        let off = SchedulerOptions {
            use_karras_sigmas: Some(false),
            ..Default::default()
        };
        let overridden = build(name, &file, 10, &off).unwrap();
        assert_eq!(overridden.sigmas(), plain.sigmas(), "{name}");
        let e = err_text(name, &with(sd15(), "use_beta_sigmas", json!(true)), 10);
        assert!(
            e.contains("use_beta_sigmas") && e.contains("not supported"),
            "{e}"
        );
    }
    // DDPM ignores the flag.
    let a = build("DDPMScheduler", &sd15(), 10, &SchedulerOptions::default()).unwrap();
    let b = build("DDPMScheduler", &sd15(), 10, &options(true)).unwrap();
    assert_eq!(a.timesteps(), b.timesteps());
    assert_eq!(
        a.timesteps(),
        &[901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
    );

    for name in ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"] {
        let e = err_text(name, &with(sd15(), "prediction_type", json!("sample")), 10);
        assert!(e.contains("sample") && e.contains("not supported"), "{e}");
    }
    let e = err_text(
        "DDPMScheduler",
        &with(sd15(), "variance_type", json!("learned_range")),
        10,
    );
    assert!(
        e.contains("learned_range") && e.contains("not supported"),
        "{e}"
    );
    let e = err_text(
        "DDPMScheduler",
        &with(sd15(), "thresholding", json!(true)),
        10,
    );
    assert!(e.contains("thresholding"), "{e}");
    let e = err_text("DDPMScheduler", &sd15(), 1001);
    assert!(e.contains("num_inference_steps"), "{e}");
    let e = err_text(
        "HeunDiscreteScheduler",
        &with(sd15(), "beta_schedule", json!("exp")),
        10,
    );
    assert!(e.contains("`beta_schedule`"), "{e}");
}

#[test]
fn ddpm_fixed_large_log_is_finite() {
    // diffusers takes sqrt(log(beta)) here and returns NaN; this engine uses exp(log(beta) / 2).
    let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let cfg = |v: &str| with(sd15(), "variance_type", json!(v));
    let mut a = build(
        "DDPMScheduler",
        &cfg("fixed_large_log"),
        5,
        &SchedulerOptions::default(),
    )
    .unwrap();
    let mut b = build(
        "DDPMScheduler",
        &cfg("fixed_large"),
        5,
        &SchedulerOptions::default(),
    )
    .unwrap();
    let t = a.timesteps()[0];
    let ya = a.step(&x, t, &x, &mut TorchGenerator::new(3)).unwrap();
    let yb = b.step(&x, t, &x, &mut TorchGenerator::new(3)).unwrap();
    let (err, _) = compare_tensors(&ya, &yb);
    assert!(err <= 1e-6, "{err:e}");
}

#[test]
fn second_order_noise_and_bookkeeping() {
    // KDPM2A draws one model-output-sized batch of normals per full step (at the midpoint evaluation) and
    // none on the final Euler step; DDPM draws at every step with t > 0.
    let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut s = build(
        "KDPM2AncestralDiscreteScheduler",
        &sd15(),
        3,
        &SchedulerOptions::default(),
    )
    .unwrap();
    assert_eq!(s.order(), 2);
    let ts = s.timesteps().to_vec();
    assert_eq!(ts.len(), 5);
    let mut rng = TorchGenerator::new(7);
    for &t in &ts {
        let scaled = s.scale_model_input(&x, t).unwrap();
        s.step(&scaled, t, &x, &mut rng).unwrap();
    }
    let mut expected = TorchGenerator::new(7);
    for _ in 0..2 {
        expected.randn(16);
    }
    assert_eq!(rng.randn(5), expected.randn(5));
    assert!(s.step(&x, ts[ts.len() - 1], &x, &mut rng).is_err());

    for name in ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"] {
        for steps in [1, 2, 5] {
            let s = build(name, &sd15(), steps, &SchedulerOptions::default()).unwrap();
            assert_eq!(s.timesteps().len(), 2 * steps - 1, "{name} {steps}");
        }
    }
}
