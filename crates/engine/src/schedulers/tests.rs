//! Parity with diffusers 0.42.1 (fixtures written by `scripts/make_scheduler_fixtures.py`) and the
//! `from_config` / error behaviour of [`super::build`].

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::config::BetaConfig;
use super::schedule::NoiseSchedule;
use super::test_support::{
    compare, compare_tensors, err_text, fake_unet, fixture, float, floats, img2img_begin, options,
    tensor, with, TOL,
};
use super::{build, Scheduler, SchedulerOptions, SCHEDULER_NAMES};
use crate::error::EngineError;
use crate::rng::TorchGenerator;

fn make(name: &str, config: &Value, steps: usize) -> Box<dyn Scheduler> {
    build(name, config, steps, &SchedulerOptions::default()).unwrap()
}

#[test]
fn alphas_cumprod_match_torch_bit_for_bit() {
    let fx = fixture("schedules.json");
    for case in fx["alphas_cumprod"].as_array().unwrap() {
        let class = case["scheduler"].as_str().unwrap();
        let config = &case["config"];
        let reader = super::config::ConfigReader::new("DDIMScheduler", config).unwrap();
        let beta = BetaConfig::read(&reader, &BetaConfig::DIFFUSERS_DEFAULT, true).unwrap();
        let mut ac = NoiseSchedule::new(&beta).unwrap().alphas_cumprod;
        if class == "EulerDiscreteScheduler" && beta.rescale_betas_zero_snr {
            *ac.last_mut().unwrap() = 2f32.powi(-24);
        }
        let actual: Vec<f64> = ac.iter().map(|&v| v as f64).collect();
        let (worst, differing) = compare(&actual, &floats(&case["alphas_cumprod"]));
        eprintln!("alphas_cumprod {class} {config}: {differing} differ, worst rel {worst:e}");
        if beta.rescale_betas_zero_snr {
            // torch's vectorised `sqrt` (MKL on x86) is not always correctly rounded: 1-ulp differences.
            assert!(
                worst <= 1e-6,
                "alphas_cumprod off by {worst:e} for {config}"
            );
        } else {
            assert_eq!(differing, 0, "alphas_cumprod differ for {config}");
        }
    }
}

#[test]
fn schedules_match_diffusers() {
    let fx = fixture("schedules.json");
    let cases = fx["cases"].as_array().unwrap();
    let (mut worst_t, mut worst_s, mut inexact_t, mut inexact_s) = (0.0f64, 0.0f64, 0usize, 0usize);
    for case in cases {
        let name = case["scheduler"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let karras = case["use_karras_sigmas"].as_bool().unwrap();
        let what = format!("{name} {} steps={steps} karras={karras}", case["config"]);
        let s = build(name, &case["config"], steps, &options(karras))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let (wt, dt) = compare(s.timesteps(), &floats(&case["timesteps"]));
        assert!(
            wt <= TOL,
            "{what}: timesteps off by {wt:e}: {:?}",
            s.timesteps()
        );
        if !name.starts_with("Euler") {
            assert_eq!(dt, 0, "{what}: integer timesteps must match exactly");
        }
        worst_t = worst_t.max(wt);
        inexact_t += dt;
        match (s.sigmas(), case["sigmas"].as_array()) {
            (Some(actual), Some(_)) => {
                let (ws, ds) = compare(actual, &floats(&case["sigmas"]));
                assert!(ws <= TOL, "{what}: sigmas off by {ws:e}");
                worst_s = worst_s.max(ws);
                inexact_s += ds;
            }
            (None, None) => {}
            (a, b) => panic!(
                "{what}: sigmas presence differs ({:?} vs {:?})",
                a.is_some(),
                b.is_some()
            ),
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
        "{} schedule cases: timesteps worst rel {worst_t:e} ({inexact_t} values not bit-equal), \
         sigmas worst rel {worst_s:e} ({inexact_s} values not bit-equal)",
        cases.len()
    );
}

#[test]
fn img2img_runs_match_diffusers() {
    let fx = fixture("runs.json");
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
        let (err, _) = compare(&timesteps, &floats(&run["timesteps"]));
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
        assert_eq!(trajectory.len(), timesteps.len());
        for (k, (&t, reference)) in timesteps.iter().zip(trajectory).enumerate() {
            let (err, _) = compare(&[t], &[float(&reference["t"])]);
            assert!(err <= TOL, "{what}: timestep {k} off by {err:e}");
            let scaled = s.scale_model_input(&latents, t).unwrap();
            if let Some(expected) = reference.get("scaled") {
                let (err, _) = compare_tensors(&scaled, &tensor(expected));
                assert!(
                    err <= TOL,
                    "{what}: scale_model_input at step {k} off by {err:e}"
                );
                run_worst = run_worst.max(err);
            }
            let out = fake_unet(&scaled, &base, t);
            latents = s.step(&out, t, &latents, &mut rng).unwrap();
            let (err, _) = compare_tensors(&latents, &tensor(&reference["prev_sample"]));
            assert!(err <= TOL, "{what}: step {k} (t = {t}) off by {err:e}");
            if err > 0.0 && std::env::var("SCHED_DEBUG").is_ok() {
                eprintln!("  {what} step {k} t={t}: {err:e}");
            }
            run_worst = run_worst.max(err);
        }
        if run_worst == 0.0 {
            exact_runs += 1;
        }
        eprintln!("{what}: worst rel {run_worst:e}");
        worst = worst.max(run_worst);
    }
    eprintln!(
        "{} runs: worst rel {worst:e}; {exact_runs} bit-exact end to end",
        runs.len()
    );
}

fn sd15() -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
        "clip_sample": false
    })
}

#[test]
fn names_are_listed_and_unknown_names_rejected() {
    // Every scheduler name the API documents is implemented, and nothing else is listed.
    let api = [
        "DDPMScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "DPMSolverSinglestepScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "UniPCMultistepScheduler",
        "DDIMInverseScheduler",
        "DEISMultistepScheduler",
        "IPNDMScheduler",
        "KarrasVeScheduler",
        "ScoreSdeVeScheduler",
        "LCMScheduler",
    ];
    let mut listed: Vec<&str> = SCHEDULER_NAMES.to_vec();
    listed.sort_unstable();
    let mut expected = api.to_vec();
    expected.sort_unstable();
    assert_eq!(listed, expected);
    for name in SCHEDULER_NAMES {
        make(name, &sd15(), 10);
    }
    let e = build("FooScheduler", &sd15(), 10, &SchedulerOptions::default())
        .err()
        .unwrap();
    assert!(matches!(
        e,
        EngineError::InvalidRequest {
            field: "scheduler",
            ..
        }
    ));
    let text = e.to_string();
    assert!(
        text.contains("\"FooScheduler\"") && text.contains("EulerDiscreteScheduler"),
        "{text}"
    );
    let e = err_text("DDIMScheduler", &sd15(), 0);
    assert!(e.contains("num_inference_steps"), "{e}");
}

#[test]
fn bad_configs_name_the_problem() {
    let e = err_text("DDIMScheduler", &json!([1, 2]), 10);
    assert!(
        e.contains("DDIMScheduler") && e.contains("JSON object"),
        "{e}"
    );
    let e = err_text(
        "DDIMScheduler",
        &with(sd15(), "beta_schedule", json!("cosine")),
        10,
    );
    assert!(
        e.contains("`beta_schedule`") && e.contains("\"cosine\"") && e.contains("scaled_linear"),
        "{e}"
    );
    let e = err_text(
        "EulerDiscreteScheduler",
        &with(sd15(), "beta_start", json!("0.1")),
        10,
    );
    assert!(
        e.contains("EulerDiscreteScheduler") && e.contains("`beta_start` must be a number"),
        "{e}"
    );
    let e = err_text(
        "PNDMScheduler",
        &with(sd15(), "steps_offset", json!(1.5)),
        10,
    );
    assert!(e.contains("`steps_offset` must be a whole number"), "{e}");
    let e = err_text(
        "DDIMScheduler",
        &with(sd15(), "timestep_spacing", json!("sometimes")),
        10,
    );
    assert!(
        e.contains("`timestep_spacing`") && e.contains("trailing"),
        "{e}"
    );
    let e = err_text(
        "DDIMScheduler",
        &with(sd15(), "trained_betas", json!([0.1, 0.2])),
        10,
    );
    assert!(e.contains("`trained_betas` has 2 values"), "{e}");
    let e = err_text(
        "PNDMScheduler",
        &with(sd15(), "prediction_type", json!("sample")),
        10,
    );
    assert!(
        e.contains("`prediction_type`") && e.contains("v_prediction"),
        "{e}"
    );
    let e = err_text(
        "EulerDiscreteScheduler",
        &with(sd15(), "interpolation_type", json!("cubic")),
        10,
    );
    assert!(e.contains("`interpolation_type`"), "{e}");

    // Options diffusers has and this engine does not: a clear "not supported", never silently ignored.
    let e = err_text(
        "DDIMScheduler",
        &with(sd15(), "thresholding", json!(true)),
        10,
    );
    assert!(
        e.contains("DDIMScheduler with `thresholding: true` is not supported"),
        "{e}"
    );
    let e = err_text(
        "EulerDiscreteScheduler",
        &with(sd15(), "use_beta_sigmas", json!(true)),
        10,
    );
    assert!(
        e.contains("use_beta_sigmas") && e.contains("not supported"),
        "{e}"
    );
    let e = err_text(
        "EulerAncestralDiscreteScheduler",
        &with(sd15(), "prediction_type", json!("sample")),
        10,
    );
    assert!(e.contains("sample") && e.contains("not supported"), "{e}");
    // thresholding is a DDIM option: other classes ignore the key like any unknown one.
    make(
        "EulerDiscreteScheduler",
        &with(sd15(), "thresholding", json!(true)),
        10,
    );

    let both = with(sd15(), "use_exponential_sigmas", json!(true));
    let e = build("EulerDiscreteScheduler", &both, 10, &options(true))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("only one of use_karras_sigmas"), "{e}");

    // Step counts a sampler cannot run.
    let e = err_text("DDIMScheduler", &sd15(), 1001);
    assert!(
        e.contains("num_inference_steps") && e.contains("1000"),
        "{e}"
    );
    let e = err_text(
        "PNDMScheduler",
        &with(sd15(), "skip_prk_steps", json!(false)),
        3,
    );
    assert!(e.contains("at least 4 steps"), "{e}");
}

#[test]
fn from_config_semantics() {
    // A value in the file beats the class default (DDIM's default spacing is leading, offset 0).
    let s = make("DDIMScheduler", &json!({"steps_offset": 1}), 4);
    assert_eq!(s.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    let s = make("DDIMScheduler", &json!({"timestep_spacing": "trailing"}), 4);
    assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
    // Missing and null both mean the default.
    for config in [
        json!({}),
        json!({"steps_offset": null, "timestep_spacing": null}),
        Value::Null,
    ] {
        assert_eq!(
            make("DDIMScheduler", &config, 4).timesteps(),
            &[750.0, 500.0, 250.0, 0.0]
        );
    }
    // Each class has its own defaults: Euler's spacing is linspace, so no offset and init sigma = max sigma.
    let e = make("EulerDiscreteScheduler", &sd15(), 4);
    assert_eq!(e.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
    assert_eq!(e.init_noise_sigma(), e.sigmas().unwrap()[0]);
    // Unknown keys are ignored, whatever their value.
    let noisy = with(
        with(sd15(), "some_future_option", json!({"x": [1, 2]})),
        "_class_name",
        json!(42),
    );
    for name in SCHEDULER_NAMES {
        assert_eq!(
            make(name, &noisy, 10).timesteps(),
            make(name, &sd15(), 10).timesteps(),
            "{name}"
        );
    }
    // `_use_default_values` lists keys that were defaults when saved: the reading class's default applies.
    let saved = with(
        with(sd15(), "timestep_spacing", json!("leading")),
        "_use_default_values",
        json!(["timestep_spacing"]),
    );
    assert_eq!(
        make("EulerDiscreteScheduler", &saved, 4).timesteps(),
        &[999.0, 666.0, 333.0, 0.0]
    );
    assert_eq!(
        make("DDIMScheduler", &saved, 4).timesteps(),
        &[751.0, 501.0, 251.0, 1.0]
    );

    // The request's use_karras_sigmas turns Karras sigmas on where supported and is ignored elsewhere.
    let plain = make("EulerDiscreteScheduler", &sd15(), 10);
    let karras = build("EulerDiscreteScheduler", &sd15(), 10, &options(true)).unwrap();
    assert_ne!(plain.sigmas(), karras.sigmas());
    let from_file = make(
        "EulerDiscreteScheduler",
        &with(sd15(), "use_karras_sigmas", json!(true)),
        10,
    );
    assert_eq!(from_file.sigmas(), karras.sigmas());
    // A request's explicit "no" wins over a config that turns Karras sigmas on.
    let refused = SchedulerOptions {
        use_karras_sigmas: Some(false),
        algorithm_type: None,
    };
    let overridden = build(
        "EulerDiscreteScheduler",
        &with(sd15(), "use_karras_sigmas", json!(true)),
        10,
        &refused,
    )
    .unwrap();
    assert_eq!(overridden.sigmas(), plain.sigmas());
    for name in [
        "DDIMScheduler",
        "PNDMScheduler",
        "EulerAncestralDiscreteScheduler",
    ] {
        let a = make(name, &sd15(), 10);
        let b = build(name, &sd15(), 10, &options(true)).unwrap();
        assert_eq!(a.timesteps(), b.timesteps(), "{name}");
        assert_eq!(a.sigmas(), b.sigmas(), "{name}");
    }
}

#[test]
fn ancestral_noise_is_drawn_every_step_in_order() {
    // Two runs from the same seed agree; the generator is consumed by one model-output-sized draw per step.
    let config = sd15();
    let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut s = make("EulerAncestralDiscreteScheduler", &config, 3);
    let mut rng = TorchGenerator::new(7);
    let ts = s.timesteps().to_vec();
    for &t in &ts {
        s.step(&x, t, &x, &mut rng).unwrap();
    }
    let mut expected = TorchGenerator::new(7);
    for _ in 0..ts.len() {
        expected.randn(16);
    }
    assert_eq!(rng.randn(5), expected.randn(5));
    // One step too many is an error, not a panic.
    assert!(s.step(&x, ts[ts.len() - 1], &x, &mut rng).is_err());
}
