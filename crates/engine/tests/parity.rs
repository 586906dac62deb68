//! Image-for-image parity with diffusers: every case in tests/fixtures/cases.json (written by
//! scripts/make_fixtures.py from diffusers' own pipelines on tiny random models) and in
//! tests/fixtures/sdxl/cases.json (scripts/make_sdxl_fixtures.py, StableDiffusionXLImg2ImgPipeline) and
//! tests/fixtures/txt2img/cases.json (scripts/make_txt2img_fixtures.py, StableDiffusion(XL)Pipeline) is run
//! through the engine and must match diffusers' PNGs within max |Δ| ≤ 3 and mean |Δ| ≤ 0.5 on the 0–255
//! scale (`pictor_engine::parity`'s float32 tolerance).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libtest_mimic::{Arguments, Failed, Trial};
use pictor_engine::kernels::tier::{run_at, Tier};
use pictor_engine::model_store::{self, ModelsDir};
use pictor_engine::parity::{self, ImageCheck};
use pictor_engine::pipeline::{NoProgress, StableDiffusion};
use pictor_engine::Runtime;
use support::fixtures;

type Case = support::GenerationCase;

type ModelCache = Arc<Mutex<HashMap<String, Arc<StableDiffusion>>>>;

fn model(cache: &ModelCache, name: &str) -> Result<Arc<StableDiffusion>, Failed> {
    let mut cache = cache.lock().unwrap();
    if let Some(m) = cache.get(name) {
        return Ok(m.clone());
    }
    let dir = ModelsDir::new(fixtures().join("models"));
    let location = dir.resolve_id(name.trim_end_matches(".safetensors"))?;
    let rt = Runtime::cpu();
    let m = Arc::new(model_store::load(&location, &rt.device, rt.dtype)?);
    cache.insert(name.to_string(), m.clone());
    Ok(m)
}

fn run_case(case: &Case, cache: &ModelCache) -> Result<(), Failed> {
    let model = model(cache, &case.model)?;
    let generation = model.generate(&support::request_for(case, None)?, &mut NoProgress)?;
    if std::env::var_os("PICTOR_DUMP").is_some() {
        for (i, ours) in generation.images.iter().enumerate() {
            let out = std::env::temp_dir().join(format!("pictor-{}-{i}.png", case.name));
            ours.save(&out).ok();
        }
    }
    let checks = parity::check_images(&fixtures(), case, &generation.images)?;
    if checks.iter().all(ImageCheck::within_fp32_tolerance) {
        Ok(())
    } else {
        let report: Vec<String> = checks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "image {i}: max |Δ| {}, mean |Δ| {:.3}",
                    c.max_abs_diff, c.mean_abs_diff
                )
            })
            .collect();
        Err(report.join("; ").into())
    }
}

fn main() {
    let args = Arguments::from_args();
    let mut cases = Vec::new();
    for file in ["cases.json", "sdxl/cases.json", "txt2img/cases.json"] {
        cases.extend(parity::load_case_file(&fixtures(), file, "").expect(file));
    }
    let cache: ModelCache = Arc::default();
    // Every case at the CPU's best tier, and again at each lower tier it can run (the AVX-512 machine
    // proves the AVX2 and portable kernels too), named `case@tier`.
    let best = Tier::best();
    let mut trials = Vec::new();
    for tier in Tier::supported().into_iter().rev() {
        for case in &cases {
            let (case, cache) = (case.clone(), cache.clone());
            trials.push(if tier == best {
                Trial::test(case.name.clone(), move || run_case(&case, &cache))
            } else {
                Trial::test(format!("{}@{tier}", case.name), move || {
                    run_at(tier, || run_case(&case, &cache)).map_err(Failed::from)?
                })
            });
        }
    }
    libtest_mimic::run(&args, trials).exit();
}
