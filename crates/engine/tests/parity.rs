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
use pictor_engine::pipeline::{GenerateRequest, Mode, NoProgress, StableDiffusion};
use pictor_engine::prompt_syntax::escape;
use pictor_engine::schedulers::SchedulerOptions;
use pictor_engine::Runtime;
use serde::Deserialize;
use support::{compare, fixtures};

#[derive(Debug, Clone, Deserialize)]
struct Case {
    name: String,
    model: String,
    pipeline: String,
    prompt: String,
    negative_prompt: Option<String>,
    init_image: Option<String>,
    width: u32,
    height: u32,
    samples: usize,
    num_inference_steps: usize,
    guidance_scale: f64,
    strength: Option<f64>,
    image_guidance_scale: Option<f64>,
    seed: u64,
    scheduler: String,
    #[serde(default)]
    use_karras_sigmas: Option<bool>,
    #[serde(default)]
    algorithm_type: Option<String>,
    clip_skip: usize,
    images: Vec<String>,
}

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
    let init = || -> Result<_, Failed> {
        let path = case
            .init_image
            .as_deref()
            .ok_or("the case has no init image")?;
        Ok(load_image(&fixtures().join(path), 1 << 24)?)
    };
    let mode = match case.pipeline.as_str() {
        "txt2img" => Mode::Text2Img,
        "img2img" => Mode::Img2Img {
            init_image: init()?,
            strength: case.strength.ok_or("img2img case without a strength")?,
        },
        "pix2pix" => Mode::Pix2Pix {
            init_image: init()?,
            image_guidance_scale: case
                .image_guidance_scale
                .ok_or("pix2pix case without an image guidance scale")?,
        },
        other => return Err(format!("unknown pipeline {other}").into()),
    };
    // The fixtures' prompts are literal text to diffusers (e.g. "((cinematic lighting))"); in Pictor's
    // prompt syntax literal text is escaped text.
    let generation = model.generate(
        &GenerateRequest {
            mode,
            prompt: escape(&case.prompt),
            negative_prompt: escape(case.negative_prompt.as_deref().unwrap_or_default()),
            width: case.width,
            height: case.height,
            samples: case.samples,
            num_inference_steps: case.num_inference_steps,
            guidance_scale: case.guidance_scale,
            seed: Some(case.seed),
            scheduler: Some(case.scheduler.clone()),
            scheduler_options: SchedulerOptions {
                use_karras_sigmas: case.use_karras_sigmas,
                algorithm_type: case.algorithm_type.clone(),
            },
            clip_skip: case.clip_skip,
            embeddings: Vec::new(),
            tome: None,
        },
        &mut NoProgress,
    )?;
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
