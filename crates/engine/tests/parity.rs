//! Image-for-image parity with diffusers: every case in tests/fixtures/cases.json (written by
//! scripts/make_fixtures.py from diffusers' own pipelines on tiny random models) and in
//! tests/fixtures/sdxl/cases.json (scripts/make_sdxl_fixtures.py, StableDiffusionXLImg2ImgPipeline) and
//! tests/fixtures/txt2img/cases.json (scripts/make_txt2img_fixtures.py, StableDiffusion(XL)Pipeline) is run
//! through the engine and must match diffusers' PNGs within max |Δ| ≤ 3 and mean |Δ| ≤ 0.5 on the 0–255
//! scale.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libtest_mimic::{Arguments, Failed, Trial};
use pictor_engine::image_io::load_image;
use pictor_engine::kernels::tier::{run_at, Tier};
use pictor_engine::model_store::{self, ModelsDir};
use pictor_engine::pipeline::{NoProgress, StableDiffusion};
use pictor_engine::Runtime;
use support::{compare, fixtures};

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
    if generation.images.len() != case.images.len() {
        return Err(format!(
            "{} images, expected {}",
            generation.images.len(),
            case.images.len()
        )
        .into());
    }
    let mut report = Vec::new();
    let mut ok = true;
    for (i, (ours, path)) in generation.images.iter().zip(&case.images).enumerate() {
        let theirs = load_image(&fixtures().join(path), 1 << 24)?;
        if ours.dimensions() != theirs.dimensions() {
            return Err(format!(
                "image {i}: {:?}, expected {:?}",
                ours.dimensions(),
                theirs.dimensions()
            )
            .into());
        }
        let (max, mean) = compare(ours, &theirs);
        report.push(format!("image {i}: max |Δ| {max}, mean |Δ| {mean:.3}"));
        ok &= max <= 3 && mean <= 0.5;
        if std::env::var_os("PICTOR_DUMP").is_some() {
            let out = std::env::temp_dir().join(format!("pictor-{}-{i}.png", case.name));
            ours.save(&out).ok();
        }
    }
    if ok {
        Ok(())
    } else {
        Err(report.join("; ").into())
    }
}

fn main() {
    let args = Arguments::from_args();
    let mut cases = Vec::new();
    for file in ["cases.json", "sdxl/cases.json", "txt2img/cases.json"] {
        let text = std::fs::read_to_string(fixtures().join(file)).expect(file);
        let more: Vec<Case> = serde_json::from_str(&text).expect(file);
        cases.extend(more);
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
