//! Parity of DPMSolverMultistep, DPMSolverSinglestep, UniPCMultistep and DEISMultistep with diffusers 0.42.1
//! (fixtures written by `scripts/make_scheduler_fixtures_dpm.py`), and their config/option handling.

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::dpmsolver_singlestep::order_list;
use super::test_support::{
    compare, compare_tensors, fake_unet, fixture, hex_f32, img2img_begin, ints, tensor, with, TOL,
};
use super::{build, SchedulerOptions, SCHEDULER_NAMES};
use crate::error::EngineError;
use crate::rng::TorchGenerator;

const NAMES: [&str; 4] = [
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
];

fn options(karras: bool, algorithm: Option<&str>) -> SchedulerOptions {
    SchedulerOptions {
        use_karras_sigmas: karras.then_some(true),
        algorithm_type: algorithm.map(str::to_string),
    }
}

#[test]
fn dpm_schedules_match_diffusers() {
    let fx = fixture("dpm_schedules.json");
    let cases = fx["cases"].as_array().unwrap();
    let (mut worst, mut inexact) = (0.0f64, 0usize);
    for case in cases {
        let name = case["scheduler"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let karras = case["use_karras_sigmas"].as_bool().unwrap();
        let what = format!("{name} {} steps={steps} karras={karras}", case["config"]);
        let s = build(name, &case["config"], steps, &options(karras, None))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            s.timesteps(),
            ints(&case["timesteps"]).as_slice(),
            "{what}: timesteps"
        );
        let expected: Vec<f64> = hex_f32(case["sigmas"].as_str().unwrap())
            .iter()
            .map(|&v| v as f64)
            .collect();
        let (w, d) = compare(s.sigmas().unwrap(), &expected);
        assert!(w <= TOL, "{what}: sigmas off by {w:e}");
        worst = worst.max(w);
        inexact += d;
        assert_eq!(s.init_noise_sigma(), 1.0, "{what}");
        assert_eq!(s.order(), 1, "{what}");
    }
    eprintln!(
        "{} DPM-family schedule cases: timesteps exact, sigmas worst rel {worst:e} ({inexact} values not bit-equal)",
        cases.len()
    );
}

/// The run tolerance: DEIS at third order evaluates its coefficients with numpy's float32 `log` (not
/// correctly rounded) in expressions with heavy cancellation, so float32 last-bit differences there grow.
fn tolerance(name: &str, config: &Value) -> f64 {
    if name == "DEISMultistepScheduler" && config["solver_order"].as_u64() == Some(3) {
        if let Ok(v) = std::env::var("DPM_DEIS3_TOL") {
            return v.parse().unwrap();
        }
        return 1e-4;
    }
    TOL
}

#[test]
fn dpm_img2img_runs_match_diffusers() {
    let fx = fixture("dpm_runs.json");
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
        let algorithm = run["algorithm_type"].as_str();
        let what = format!(
            "{name} {} steps={steps} strength={strength} karras={karras} algorithm={algorithm:?}",
            run["config"]
        );
        let mut s = build(name, &run["config"], steps, &options(karras, algorithm))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let begin = img2img_begin(run, s.order(), &what);
        let timesteps = s.timesteps()[begin..].to_vec();
        assert_eq!(
            timesteps,
            ints(&run["timesteps"]),
            "{what}: sliced timesteps"
        );
        s.set_begin_index(begin);

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
            latents = s
                .step(&out, t, &latents, &mut rng)
                .unwrap_or_else(|e| panic!("{what}: step {k}: {e}"));
            let (err, _) = compare_tensors(&latents, &tensor(reference));
            if std::env::var("SCHED_DEBUG").is_ok() && err > 0.0 {
                eprintln!("  {what} step {k} t={t}: {err:e}");
            }
            assert!(
                err <= tolerance(name, &run["config"]),
                "{what}: step {k} (t = {t}) off by {err:e}"
            );
            run_worst = run_worst.max(err);
        }
        if run_worst == 0.0 {
            exact_runs += 1;
        }
        worst = worst.max(run_worst);
    }
    eprintln!(
        "{} DPM-family runs: worst rel {worst:e}; {exact_runs} bit-exact end to end",
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
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "clip_sample": false
    })
}

fn err_of(name: &str, config: &Value, opts: &SchedulerOptions) -> EngineError {
    match build(name, config, 10, opts) {
        Ok(_) => panic!("{name} with {config} should fail"),
        Err(e) => e,
    }
}

#[test]
fn dpm_names_are_registered() {
    for name in NAMES {
        assert!(SCHEDULER_NAMES.contains(&name), "{name}");
        build(name, &sd15(), 10, &SchedulerOptions::default()).unwrap();
        build(name, &Value::Null, 1, &SchedulerOptions::default()).unwrap();
    }
}

#[test]
fn algorithm_type_option_and_config() {
    let dpm = "DPMSolverMultistepScheduler";
    // The API spelling "dpmsolver+++" is the SDE variant: it draws noise, so two seeds differ.
    let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let run = |opts: &SchedulerOptions, config: &Value, seed: u64| -> Vec<f32> {
        let mut s = build(dpm, config, 3, opts).unwrap();
        let mut rng = TorchGenerator::new(seed);
        let mut latents = x.clone();
        for t in s.timesteps().to_vec() {
            latents = s.step(&x, t, &latents, &mut rng).unwrap();
        }
        latents.flatten_all().unwrap().to_vec1().unwrap()
    };
    let plain = run(&SchedulerOptions::default(), &sd15(), 1);
    assert_eq!(plain, run(&SchedulerOptions::default(), &sd15(), 2));
    let sde = options(false, Some("dpmsolver+++"));
    assert_ne!(run(&sde, &sd15(), 1), run(&sde, &sd15(), 2));
    assert_eq!(
        run(&sde, &sd15(), 1),
        run(&options(false, Some("sde-dpmsolver++")), &sd15(), 1)
    );
    // The config's algorithm_type applies when the request has none, and the request's wins over it.
    let sde_config = with(sd15(), "algorithm_type", json!("sde-dpmsolver++"));
    assert_eq!(
        run(&SchedulerOptions::default(), &sde_config, 1),
        run(&sde, &sd15(), 1)
    );
    assert_eq!(
        run(&options(false, Some("dpmsolver++")), &sde_config, 1),
        plain
    );
    // A DEIS-saved config reads as dpmsolver++, as in diffusers.
    assert_eq!(
        run(
            &SchedulerOptions::default(),
            &with(sd15(), "algorithm_type", json!("deis")),
            1
        ),
        plain
    );
    // Everything else is refused, naming the accepted values.
    for bad in ["dpmsolver", "sde-dpmsolver", "deis", "euler"] {
        let e = err_of(dpm, &sd15(), &options(false, Some(bad)));
        assert!(
            matches!(
                e,
                EngineError::InvalidRequest {
                    field: "algorithm_type",
                    ..
                }
            ),
            "{e}"
        );
        let text = e.to_string();
        assert!(
            text.contains("dpmsolver++") && text.contains("sde-dpmsolver++"),
            "{text}"
        );
    }
    let e = err_of(
        dpm,
        &with(sd15(), "algorithm_type", json!("sde-dpmsolver")),
        &SchedulerOptions::default(),
    );
    assert!(e.to_string().contains("algorithm_type"), "{e}");
}

#[test]
fn use_karras_sigmas_option_wins_over_config() {
    for name in NAMES {
        let plain = build(name, &sd15(), 10, &SchedulerOptions::default()).unwrap();
        let karras = build(name, &sd15(), 10, &options(true, None)).unwrap();
        assert_ne!(plain.sigmas(), karras.sigmas(), "{name}");
        let config_karras = with(sd15(), "use_karras_sigmas", json!(true));
        let from_file = build(name, &config_karras, 10, &SchedulerOptions::default()).unwrap();
        assert_eq!(from_file.sigmas(), karras.sigmas(), "{name}");
        let no = SchedulerOptions {
            use_karras_sigmas: Some(false),
            algorithm_type: None,
        };
        let refused = build(name, &config_karras, 10, &no).unwrap();
        assert_eq!(refused.sigmas(), plain.sigmas(), "{name}");
    }
}

#[test]
fn unsupported_options_are_refused_clearly() {
    let none = SchedulerOptions::default();
    for name in NAMES {
        let e = err_of(name, &with(sd15(), "thresholding", json!(true)), &none).to_string();
        assert!(
            e.contains(name) && e.contains("thresholding") && e.contains("not supported"),
            "{e}"
        );
        let e = err_of(name, &with(sd15(), "use_beta_sigmas", json!(true)), &none).to_string();
        assert!(e.contains("use_beta_sigmas"), "{e}");
        let e = err_of(
            name,
            &with(sd15(), "prediction_type", json!("flow_prediction")),
            &none,
        )
        .to_string();
        assert!(e.contains("flow_prediction"), "{e}");
        let e = err_of(name, &with(sd15(), "solver_order", json!(7)), &none).to_string();
        assert!(e.contains("solver_order"), "{e}");
        let e = err_of(
            name,
            &with(sd15(), "variance_type", json!("learned_range")),
            &none,
        )
        .to_string();
        assert!(e.contains("variance_type"), "{e}");
        let both = with(sd15(), "use_exponential_sigmas", json!(true));
        let e = err_of(name, &both, &options(true, None)).to_string();
        assert!(e.contains("only one of"), "{e}");
    }
    let e = err_of(
        "UniPCMultistepScheduler",
        &with(sd15(), "solver_type", json!("rk4")),
        &none,
    )
    .to_string();
    assert!(e.contains("solver_type") && e.contains("bh2"), "{e}");
    // thresholding: false and the other classes' solver types are accepted, as diffusers remaps them.
    build(
        "DPMSolverMultistepScheduler",
        &with(
            with(sd15(), "thresholding", json!(false)),
            "solver_type",
            json!("bh2"),
        ),
        10,
        &none,
    )
    .unwrap();
    build(
        "DEISMultistepScheduler",
        &with(
            with(sd15(), "algorithm_type", json!("dpmsolver++")),
            "solver_type",
            json!("midpoint"),
        ),
        10,
        &none,
    )
    .unwrap();
}

#[test]
fn singlestep_order_lists() {
    assert_eq!(order_list(6, 2, true, true), vec![1, 2, 1, 2, 1, 1]);
    assert_eq!(order_list(5, 2, true, true), vec![1, 2, 1, 2, 1]);
    assert_eq!(order_list(6, 3, true, true), vec![1, 2, 3, 1, 2, 1]);
    assert_eq!(order_list(7, 3, true, true), vec![1, 2, 3, 1, 2, 3, 1]);
    assert_eq!(order_list(8, 3, true, true), vec![1, 2, 3, 1, 2, 3, 1, 1]);
    assert_eq!(order_list(6, 3, false, false), vec![1, 2, 3, 1, 2, 3]);
    assert_eq!(order_list(1, 3, true, true), vec![1]);
}

#[test]
fn sde_noise_is_drawn_every_step_in_order() {
    let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    for name in [
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
    ] {
        let config = with(sd15(), "algorithm_type", json!("sde-dpmsolver++"));
        let mut s = build(name, &config, 3, &SchedulerOptions::default()).unwrap();
        let mut rng = TorchGenerator::new(7);
        let ts = s.timesteps().to_vec();
        for &t in &ts {
            s.step(&x, t, &x, &mut rng).unwrap();
        }
        let mut expected = TorchGenerator::new(7);
        for _ in 0..ts.len() {
            expected.randn(16);
        }
        assert_eq!(rng.randn(5), expected.randn(5), "{name}");
        assert!(
            s.step(&x, ts[ts.len() - 1], &x, &mut rng).is_err(),
            "{name}"
        );
    }
}

#[test]
fn unipc_bh1_last_step_to_zero_sigma_is_finite() {
    // diffusers multiplies B(h) = h = −∞ (the step to sigma 0) by a zero correction and returns NaN on the
    // last step; the limit of that term is 0, so Pictor's last step is the finite first-order update.
    let config = with(sd15(), "solver_type", json!("bh1"));
    let mut s = build(
        "UniPCMultistepScheduler",
        &config,
        10,
        &SchedulerOptions::default(),
    )
    .unwrap();
    let base = Tensor::ones((1, 4, 3, 5), DType::F32, &Device::Cpu).unwrap();
    let mut x = (&base * 3.0).unwrap();
    let mut rng = TorchGenerator::new(0);
    for t in s.timesteps().to_vec() {
        let out = fake_unet(&x, &base, t);
        x = s.step(&out, t, &x, &mut rng).unwrap();
    }
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
}
