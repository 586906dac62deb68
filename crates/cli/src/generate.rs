//! The subcommands' work: load the model, run the pipeline with a progress bar, write the images, print
//! the result's meta as JSON.

use std::path::Path;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use pictor_engine::image_io::encode_png;
use pictor_engine::model_store::{self, ModelsDir};
use pictor_engine::pipeline::{
    Generation, Img2ImgRequest, Pix2PixRequest, Progress, StableDiffusion,
};
use pictor_engine::schedulers::SchedulerOptions;
use pictor_engine::{EngineError, Runtime};
use serde_json::{json, Value};

use crate::args::{CommonArgs, Img2ImgArgs, Pix2PixArgs};
use crate::init_image;

/// A terminal progress bar, one tick per denoising step (hidden when stderr is not a terminal).
struct Bar(ProgressBar);

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} step {pos}/{len} [{bar:30}] {elapsed} (eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Bar(bar)
    }
}

impl Progress for Bar {
    fn on_step(&mut self, done: usize, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
    }
}

/// Refuses options whose capability is not built yet, instead of silently ignoring them.
fn refuse_unsupported(args: &Img2ImgArgs) -> Result<()> {
    let asked = [
        ("--tomesd yes (token merging)", args.tomesd),
        (
            "--enhance-prompt yes (prompt enhancement)",
            args.enhance_prompt,
        ),
        ("--safety-checker yes", args.safety_checker),
        (
            "--lora-model / --lora-strength (LoRA)",
            args.lora_model.is_some() || args.lora_strength.is_some(),
        ),
        (
            "--embeddings-model (textual inversion)",
            args.embeddings_model.is_some(),
        ),
    ];
    for (what, on) in asked {
        if on {
            return Err(EngineError::Unsupported(what.to_string()).into());
        }
    }
    Ok(())
}

fn load_model(common: &CommonArgs) -> Result<StableDiffusion> {
    let dir = ModelsDir::new(&common.models_dir);
    let location = dir.resolve(&common.model)?;
    let runtime = Runtime::default_for_this_machine()?;
    Ok(model_store::load(
        &location,
        &runtime.device,
        runtime.dtype,
    )?)
}

fn scheduler_options(common: &CommonArgs) -> SchedulerOptions {
    SchedulerOptions {
        use_karras_sigmas: Some(common.use_karras_sigmas),
        algorithm_type: common.algorithm_type.clone(),
    }
}

/// Writes DIR/0.png … and returns their paths.
fn write_images(out: &Path, generation: &Generation) -> Result<Vec<String>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut paths = Vec::new();
    for (i, image) in generation.images.iter().enumerate() {
        let path = out.join(format!("{i}.png"));
        std::fs::write(&path, encode_png(image)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        paths.push(path.display().to_string());
    }
    Ok(paths)
}

fn print_meta(mut meta: Value, generation: &Generation, outputs: Vec<String>) {
    let engine = serde_json::to_value(&generation.meta).expect("meta serialises");
    if let (Value::Object(m), Value::Object(e)) = (&mut meta, engine) {
        m.extend(e);
        m.insert("output".into(), json!(outputs));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&meta).expect("meta serialises")
    );
}

/// `pictor img2img`.
pub fn img2img(args: Img2ImgArgs) -> Result<()> {
    refuse_unsupported(&args)?;
    let c = &args.common;
    let init = init_image::load(&c.init_image)?;
    let model = load_model(c)?;
    let request = Img2ImgRequest {
        prompt: c.prompt.clone(),
        negative_prompt: c.negative_prompt.clone(),
        init_image: init,
        width: args.width,
        height: args.height,
        samples: c.samples,
        num_inference_steps: args.num_inference_steps,
        guidance_scale: args.guidance_scale,
        strength: args.strength,
        seed: c.seed,
        scheduler: c.scheduler.clone(),
        scheduler_options: scheduler_options(c),
        clip_skip: c.clip_skip,
        tome: None,
    };
    let generation = model.img2img(&request, &mut Bar::new())?;
    let outputs = write_images(&c.out, &generation)?;
    let meta = json!({
        "prompt": c.prompt,
        "negative_prompt": c.negative_prompt,
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.num_inference_steps,
        "strength": args.strength,
        "n_samples": c.samples,
        "clip_skip": c.clip_skip,
        "use_karras_sigmas": if c.use_karras_sigmas { "yes" } else { "no" },
        "algorithm_type": c.algorithm_type,
        "init_image": c.init_image,
    });
    print_meta(meta, &generation, outputs);
    Ok(())
}

/// `pictor pix2pix`.
pub fn pix2pix(args: Pix2PixArgs) -> Result<()> {
    let c = &args.common;
    let init = init_image::load(&c.init_image)?;
    let round = |v: u32| (v.min(1024) / 8 * 8).max(8);
    let width = args.width.unwrap_or_else(|| round(init.width()));
    let height = args.height.unwrap_or_else(|| round(init.height()));
    let model = load_model(c)?;
    let request = Pix2PixRequest {
        prompt: c.prompt.clone(),
        negative_prompt: c.negative_prompt.clone(),
        init_image: init,
        width,
        height,
        samples: c.samples,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        image_guidance_scale: args.image_guidance_scale,
        seed: c.seed,
        scheduler: c.scheduler.clone(),
        scheduler_options: scheduler_options(c),
        clip_skip: c.clip_skip,
        tome: None,
    };
    let generation = model.pix2pix(&request, &mut Bar::new())?;
    let outputs = write_images(&c.out, &generation)?;
    let meta = json!({
        "prompt": c.prompt,
        "negative_prompt": c.negative_prompt,
        "guidance_scale": args.guidance_scale,
        "image_guidance_scale": args.image_guidance_scale,
        "steps": args.steps,
        "n_samples": c.samples,
        "clip_skip": c.clip_skip,
        "init_image": c.init_image,
    });
    print_meta(meta, &generation, outputs);
    Ok(())
}

/// `pictor models list`.
pub fn list_models(models_dir: &Path) -> Result<()> {
    let models = ModelsDir::new(models_dir).list()?;
    println!("{}", serde_json::to_string_pretty(&models)?);
    Ok(())
}

/// `pictor models pull`.
pub fn pull(models_dir: &Path, repo_id: &str, revision: Option<&str>) -> Result<()> {
    let dir = ModelsDir::new(models_dir);
    let path = pictor_engine::hub::pull(repo_id, &dir.checkpoints(), revision)?;
    println!("{}", path.display());
    Ok(())
}

/// `pictor make-demo-model`.
pub fn make_demo(path: &Path, pix2pix: bool, seed: u64) -> Result<()> {
    if path.as_os_str().is_empty() {
        bail!("give the folder to create, e.g. models/checkpoints/demo");
    }
    pictor_engine::demo::make_demo_model(path, pix2pix, seed)?;
    eprintln!(
        "wrote a random demo model to {} (random weights: it draws noise-like pictures)",
        path.display()
    );
    Ok(())
}
