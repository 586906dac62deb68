//! The subcommands' work: load the model, run the pipeline with a progress bar, write the images, print
//! the result's meta as JSON.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use pictor_engine::embeddings::TextualInversion;
use pictor_engine::image_io::encode_png_with_text;
use pictor_engine::model_store::{self, ModelsDir};
use pictor_engine::models::TomeSettings;
use pictor_engine::pipeline::{GenerateRequest, Generation, Mode, Progress, StableDiffusion};
use pictor_engine::safety::{replace_flagged, Replacement, SafetyChecker};
use pictor_engine::schedulers::SchedulerOptions;
use pictor_engine::{EngineError, Runtime};
use pictor_server::backend::{GenerationRequest, LoraChoice, PipelineKind};
use pictor_server::infotext;
use pictor_server::prompt_enhance::{self, EnhancedPrompt, UnknownStyle};
use pictor_server::request::pair_loras;
use serde_json::{json, Value};

use crate::args::{CommonArgs, Img2ImgArgs, Pix2PixArgs, Txt2ImgArgs};
use crate::from_png::{self, Explicit};
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

/// The final prompt and negative prompt: `--enhance-style` and `--enhance-prompt` applied the way the HTTP
/// service applies them.
fn final_prompts(common: &CommonArgs) -> Result<EnhancedPrompt> {
    prompt_enhance::apply(
        &common.prompt,
        &common.negative_prompt,
        common.enhance_prompt,
        common.enhance_style.as_deref(),
    )
    .map_err(|e| EngineError::invalid(UnknownStyle::FIELD, e.to_string()).into())
}

/// The meta keys every generation prints about its prompts.
fn prompt_meta(common: &CommonArgs, prompts: &EnhancedPrompt) -> Value {
    json!({
        "prompt": prompts.prompt,
        "negative_prompt": prompts.negative_prompt,
        "enhance_prompt": if common.enhance_prompt { "yes" } else { "no" },
        "enhance_style": common
            .enhance_style
            .as_deref()
            .and_then(|s| prompt_enhance::resolve_style(s).ok()),
    })
}

/// The model a command runs on, with its LoRAs and VAE, and the safety checker when one is asked for.
struct Prepared {
    model: StableDiffusion,
    safety: Option<(SafetyChecker, Replacement)>,
    embeddings: Vec<TextualInversion>,
    /// The LoRAs merged in, with their strengths.
    loras: Vec<LoraChoice>,
}

fn prepare(common: &CommonArgs) -> Result<Prepared> {
    let dir = ModelsDir::new(&common.models_dir);
    let location = dir.resolve(&common.model)?;
    common.precision.apply()?;
    let runtime = Runtime::default_for_this_machine()?;
    let split = |text: &Option<String>| -> Vec<String> {
        text.iter()
            .flat_map(|t| t.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect()
    };
    let strengths = split(&common.lora_strength)
        .iter()
        .map(|t| {
            t.parse::<f64>().map_err(|_| {
                EngineError::invalid("lora_strength", format!("{t:?} is not a number"))
            })
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let choices = pair_loras(split(&common.lora_model), strengths).map_err(|e| anyhow!("{e}"))?;
    let loras: Vec<(String, f64)> = choices
        .iter()
        .map(|l| (l.name.clone(), l.strength))
        .collect();
    let base = model_store::load(&location, &runtime.device, runtime.dtype)?;
    let model = model_store::variant(&base, &dir, &loras, common.vae.as_deref())?;
    let safety = if common.safety_checker {
        let kind = Replacement::from_name(&common.safety_checker_type)?;
        let path =
            model_store::safety_checker_path(common.safety_checker_model.as_deref(), &location)
                .ok_or_else(|| {
                    anyhow!(
                    "--safety-checker yes: model {} has no safety_checker/ folder; give one with \
                     --safety-checker-model PATH",
                    location.id
                )
                })?;
        Some((SafetyChecker::load(&path, &runtime.device)?, kind))
    } else {
        None
    };
    let embeddings = dir.load_embeddings(&split(&common.embeddings_model))?;
    Ok(Prepared {
        model,
        safety,
        embeddings,
        loras: choices,
    })
}

/// Runs the safety checker (when asked for) and replaces flagged images; the flags, for the meta.
fn filter(prepared: &Prepared, generation: &mut Generation) -> Result<Option<Vec<bool>>> {
    let Some((checker, kind)) = &prepared.safety else {
        return Ok(None);
    };
    let flags = checker.check(&generation.images)?;
    replace_flagged(&mut generation.images, &flags, *kind);
    Ok(Some(flags))
}

/// The meta keys about the request's model extras.
fn extras_meta(common: &CommonArgs, flags: Option<Vec<bool>>) -> Value {
    json!({
        "lora_model": common.lora_model,
        "lora_strength": common.lora_strength,
        "vae": common.vae,
        "embeddings_model": common.embeddings_model,
        "tomesd": if common.tomesd { "yes" } else { "no" },
        "safety_checker": if common.safety_checker { "yes" } else { "no" },
        "safety_checker_type": common.safety_checker_type,
        "nsfw_content_detected": flags,
    })
}

fn scheduler_options(common: &CommonArgs) -> SchedulerOptions {
    SchedulerOptions {
        use_karras_sigmas: Some(common.use_karras_sigmas),
        algorithm_type: common.algorithm_type.clone(),
    }
}

/// Writes DIR/0.png … and returns their paths.
/// Writes the images as `DIR/<i>.png`, each carrying `parameters` (the infotext) as a PNG text chunk.
fn write_images(out: &Path, generation: &Generation, parameters: &str) -> Result<Vec<String>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut paths = Vec::new();
    for (i, image) in generation.images.iter().enumerate() {
        let path = out.join(format!("{i}.png"));
        std::fs::write(
            &path,
            encode_png_with_text(image, "parameters", parameters)?,
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
        paths.push(path.display().to_string());
    }
    Ok(paths)
}

fn print_meta(
    mut meta: Value,
    prompts: Value,
    extras: Value,
    generation: &Generation,
    outputs: Vec<String>,
) {
    let engine = serde_json::to_value(&generation.meta).expect("meta serialises");
    if let (Value::Object(m), Value::Object(p), Value::Object(x), Value::Object(e)) =
        (&mut meta, prompts, extras, engine)
    {
        m.extend(p);
        m.extend(x);
        m.extend(e);
        m.insert("output".into(), json!(outputs));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&meta).expect("meta serialises")
    );
}

/// One generation of any mode with the shared options: prepare the model, run, filter, write the images, print
/// the meta (`meta` holds the mode's own keys).
fn run(
    c: &CommonArgs,
    mode: Mode,
    (width, height): (u32, u32),
    num_inference_steps: usize,
    guidance_scale: f64,
    meta: Value,
) -> Result<()> {
    if c.model.is_empty() {
        bail!("--model is required (or --from-png with a PNG that names its model)");
    }
    if c.prompt.is_empty() && c.from_png.is_none() {
        bail!("--prompt is required (or --from-png)");
    }
    let prompts = final_prompts(c)?;
    let prepared = prepare(c)?;
    let request = GenerateRequest {
        mode,
        prompt: prompts.prompt.clone(),
        negative_prompt: prompts.negative_prompt.clone(),
        width,
        height,
        samples: c.samples,
        num_inference_steps,
        guidance_scale,
        seed: c.seed,
        scheduler: c.scheduler.clone(),
        scheduler_options: scheduler_options(c),
        clip_skip: c.clip_skip,
        embeddings: prepared.embeddings.clone(),
        tome: c.tomesd.then(TomeSettings::default),
    };
    let mut generation = prepared.model.generate(&request, &mut Bar::new())?;
    let flags = filter(&prepared, &mut generation)?;
    let parameters = infotext::format(
        &ran(c, &request, &prepared, &generation),
        &generation.meta.scheduler,
    );
    let outputs = write_images(&c.out, &generation, &parameters)?;
    let mut meta = meta;
    if let Value::Object(m) = &mut meta {
        m.insert("guidance_scale".into(), json!(guidance_scale));
        m.insert("n_samples".into(), json!(c.samples));
        m.insert("clip_skip".into(), json!(c.clip_skip));
    }
    print_meta(
        meta,
        prompt_meta(c, &prompts),
        extras_meta(c, flags),
        &generation,
        outputs,
    );
    Ok(())
}

/// What a command ran, as the service's canonical request (for the infotext its PNGs carry).
fn ran(
    c: &CommonArgs,
    request: &GenerateRequest,
    prepared: &Prepared,
    generation: &Generation,
) -> GenerationRequest {
    let (kind, strength, image_guidance_scale) = match &request.mode {
        Mode::Text2Img => (PipelineKind::Text2Img, 0.0, 0.0),
        Mode::Img2Img { strength, .. } => (PipelineKind::Img2Img, *strength, 0.0),
        Mode::Pix2Pix {
            image_guidance_scale,
            ..
        } => (PipelineKind::Pix2Pix, 0.0, *image_guidance_scale),
    };
    GenerationRequest {
        kind,
        model_id: prepared.model.id.clone(),
        prompt: request.prompt.clone(),
        negative_prompt: request.negative_prompt.clone(),
        width: request.width,
        height: request.height,
        samples: request.samples as u32,
        steps: request.num_inference_steps as u32,
        guidance_scale: request.guidance_scale,
        strength,
        image_guidance_scale,
        scheduler: Some(generation.meta.scheduler.clone()),
        use_karras_sigmas: c.use_karras_sigmas,
        algorithm_type: c.algorithm_type.clone(),
        seed: generation.meta.seed,
        clip_skip: request.clip_skip as u32,
        loras: prepared.loras.clone(),
        vae: c.vae.clone(),
        embeddings: request.embeddings.iter().map(|e| e.name.clone()).collect(),
        tomesd: c.tomesd,
        safety_checker: None,
    }
}

/// `pictor txt2img`.
pub fn txt2img(mut args: Txt2ImgArgs, explicit: Explicit) -> Result<()> {
    if let Some(path) = args.common.from_png.clone() {
        let p = from_png::read(&path)?;
        from_png::restore_common(&mut args.common, &p, explicit)?;
        from_png::restore_size(&mut args.size, &p, explicit)?;
    }
    let c = &args.common;
    let meta = json!({
        "num_inference_steps": args.size.num_inference_steps,
        "use_karras_sigmas": if c.use_karras_sigmas { "yes" } else { "no" },
        "algorithm_type": c.algorithm_type,
    });
    run(
        c,
        Mode::Text2Img,
        (args.size.width, args.size.height),
        args.size.num_inference_steps,
        args.size.guidance_scale,
        meta,
    )
}

/// `pictor img2img`.
pub fn img2img(mut args: Img2ImgArgs, explicit: Explicit) -> Result<()> {
    if let Some(path) = args.common.from_png.clone() {
        let p = from_png::read(&path)?;
        from_png::restore_common(&mut args.common, &p, explicit)?;
        from_png::restore_size(&mut args.size, &p, explicit)?;
        from_png::restore_strength(&mut args.strength, &p, explicit)?;
    }
    let c = &args.common;
    let init = init_image::load(&args.init_image)?;
    let meta = json!({
        "num_inference_steps": args.size.num_inference_steps,
        "strength": args.strength,
        "use_karras_sigmas": if c.use_karras_sigmas { "yes" } else { "no" },
        "algorithm_type": c.algorithm_type,
        "init_image": args.init_image,
    });
    let mode = Mode::Img2Img {
        init_image: init,
        strength: args.strength,
    };
    run(
        c,
        mode,
        (args.size.width, args.size.height),
        args.size.num_inference_steps,
        args.size.guidance_scale,
        meta,
    )
}

/// `pictor pix2pix`.
pub fn pix2pix(mut args: Pix2PixArgs, explicit: Explicit) -> Result<()> {
    if let Some(path) = args.common.from_png.clone() {
        let p = from_png::read(&path)?;
        from_png::restore_common(&mut args.common, &p, explicit)?;
    }
    let c = &args.common;
    let init = init_image::load(&args.init_image)?;
    let round = |v: u32| (v.min(1024) / 8 * 8).max(8);
    let width = args.width.unwrap_or_else(|| round(init.width()));
    let height = args.height.unwrap_or_else(|| round(init.height()));
    let meta = json!({
        "image_guidance_scale": args.image_guidance_scale,
        "steps": args.steps,
        "init_image": args.init_image,
    });
    let mode = Mode::Pix2Pix {
        init_image: init,
        image_guidance_scale: args.image_guidance_scale,
    };
    run(
        c,
        mode,
        (width, height),
        args.steps,
        args.guidance_scale,
        meta,
    )
}

/// `pictor styles [NAME]`: every id, one per line; or one style's texts.
pub fn styles(name: Option<&str>) -> Result<()> {
    let Some(name) = name else {
        for id in prompt_enhance::style_ids() {
            println!("{id}");
        }
        return Ok(());
    };
    let id = prompt_enhance::resolve_style(name)
        .map_err(|e| EngineError::invalid(UnknownStyle::FIELD, e.to_string()))?;
    let (positive, negative) = prompt_enhance::describe(id).expect("resolved ids exist");
    let example = prompt_enhance::apply("PROMPT", "", false, Some(id))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "id": id,
            "template": positive,
            "negative": negative,
            "example": example.prompt,
            "example_negative": example.negative_prompt,
        }))?
    );
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
