//! Parity with diffusers' reference images: the fixture cases (the `cases.json` files of
//! `tests/fixtures`, written by `scripts/make_*fixtures.py` from diffusers' own pipelines on tiny random
//! models), the engine request each case describes, and how an image is compared with its reference. The
//! engine's tests and `pictor check-fixtures` (which runs the cases on a GPU) share this one
//! implementation.
//!
//! Tolerances: in float32 an image must be within [`MAX_ABS_DIFF`] of diffusers' PNG at every pixel and
//! within [`MAX_MEAN_ABS_DIFF`] on average (0–255 scale); in a reduced precision (float16 as on a GPU,
//! or the CPU's bf16 products) at [`MIN_REDUCED_PSNR_DB`] or better.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::image_io::load_image;
use crate::model_store::{self, ModelsDir};
use crate::models::TomeSettings;
use crate::pipeline::{GenerateRequest, Mode, NoProgress, StableDiffusion};
use crate::prompt_syntax::escape;
use crate::schedulers::SchedulerOptions;

/// Largest per-pixel difference from diffusers' PNG a float32 image may have (0–255 scale).
pub const MAX_ABS_DIFF: u8 = 3;
/// Largest mean per-pixel difference from diffusers' PNG a float32 image may have (0–255 scale).
pub const MAX_MEAN_ABS_DIFF: f64 = 0.5;
/// Lowest PSNR against the reference a reduced-precision image may have, in dB.
pub const MIN_REDUCED_PSNR_DB: f64 = 35.0;

/// The case files of a fixtures folder and the folder their image paths are relative to (the LoRA files
/// name their images relative to their own folder, the others relative to the fixtures folder).
pub const CASE_FILES: &[(&str, &str)] = &[
    ("cases.json", ""),
    ("txt2img/cases.json", ""),
    ("sdxl/cases.json", ""),
    ("lora_vae/cases.json", "lora_vae"),
    ("sdxl/lora_cases.json", "sdxl"),
];

fn img2img() -> String {
    "img2img".into()
}

fn one() -> usize {
    1
}

/// The generation a fixture case describes (the fields every case file shares; the LoRA files leave out
/// `pipeline`, img2img, and `clip_skip`, 1).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GenerationCase {
    /// Unique name, also the folder of its images.
    pub name: String,
    /// Model id (folder or file name under `models/checkpoints/`, `.safetensors` allowed).
    pub model: String,
    /// `img2img`, `txt2img` or `pix2pix`.
    #[serde(default = "img2img")]
    pub pipeline: String,
    /// The prompt as diffusers took it (plain text, escaped for Pictor's prompt syntax by [`request_for`]).
    pub prompt: String,
    /// The negative prompt (none = "").
    pub negative_prompt: Option<String>,
    /// The init image, relative to the fixtures folder.
    pub init_image: Option<String>,
    /// Output width.
    pub width: u32,
    /// Output height.
    pub height: u32,
    /// Images per prompt.
    pub samples: usize,
    /// Denoising steps of the full schedule.
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// img2img strength.
    #[serde(default)]
    pub strength: Option<f64>,
    /// pix2pix image guidance scale.
    #[serde(default)]
    pub image_guidance_scale: Option<f64>,
    /// Seed of the one generator of the call.
    pub seed: u64,
    /// diffusers scheduler class.
    pub scheduler: String,
    /// Karras sigmas, where the scheduler takes them.
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    /// DPMSolverMultistepScheduler's algorithm.
    #[serde(default)]
    pub algorithm_type: Option<String>,
    /// A1111's clip skip (1 = last layer).
    #[serde(default = "one")]
    pub clip_skip: usize,
    /// LoRAs (names in `models/loras`) and their strengths.
    #[serde(default)]
    pub loras: Vec<(String, f64)>,
    /// A replacement VAE (name in `models/vae`).
    #[serde(default)]
    pub vae: Option<String>,
    /// The expected images, relative to the fixtures folder once loaded by [`load_case_file`].
    #[serde(default)]
    pub images: Vec<String>,
}

/// The cases of one case file of the fixtures folder `root` (`file` and `images_under` as in
/// [`CASE_FILES`]), their image paths made relative to `root`.
pub fn load_case_file(root: &Path, file: &str, images_under: &str) -> Result<Vec<GenerationCase>> {
    let path = root.join(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| EngineError::invalid("fixtures", format!("{}: {e}", path.display())))?;
    let mut cases: Vec<GenerationCase> = serde_json::from_str(&text)
        .map_err(|e| EngineError::invalid("fixtures", format!("{}: {e}", path.display())))?;
    if !images_under.is_empty() {
        for case in &mut cases {
            for image in &mut case.images {
                *image = format!("{images_under}/{image}");
            }
        }
    }
    Ok(cases)
}

/// Every case of the fixtures folder `root`: those of each file of [`CASE_FILES`] that is there.
pub fn load_cases(root: &Path) -> Result<Vec<GenerationCase>> {
    let mut cases = Vec::new();
    for (file, images_under) in CASE_FILES {
        if root.join(file).is_file() {
            cases.extend(load_case_file(root, file, images_under)?);
        }
    }
    Ok(cases)
}

/// The engine request a fixture case describes (its prompts are plain text to diffusers, so they are escaped
/// for Pictor's prompt syntax), with token merging when `tome` is given; init images are read from `root`.
pub fn request_for(
    root: &Path,
    case: &GenerationCase,
    tome: Option<TomeSettings>,
) -> std::result::Result<GenerateRequest, String> {
    let init = || -> std::result::Result<_, String> {
        let path = case
            .init_image
            .as_deref()
            .ok_or("the case has no init image")?;
        load_image(&root.join(path), 1 << 24).map_err(|e| e.to_string())
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
        other => return Err(format!("unknown pipeline {other}")),
    };
    Ok(GenerateRequest {
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
        tome,
    })
}

/// Maximum and mean absolute difference between two RGB images of the same size (0–255 scale).
pub fn compare(a: &image::RgbImage, b: &image::RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes");
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / a.as_raw().len() as f64)
}

/// Peak signal-to-noise ratio of `b` against `a` in dB on the 0–255 scale (infinite when equal).
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let squared: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let mse = squared / a.as_raw().len() as f64;
    10.0 * (255.0 * 255.0 / mse).log10()
}

/// How one image compares with its reference.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ImageCheck {
    /// Largest per-pixel difference (0–255).
    pub max_abs_diff: u8,
    /// Mean per-pixel difference (0–255).
    pub mean_abs_diff: f64,
    /// PSNR in dB (in JSON, `null` when the images are equal).
    pub psnr_db: f64,
}

impl ImageCheck {
    /// Whether a float32 image is as close as parity asks ([`MAX_ABS_DIFF`], [`MAX_MEAN_ABS_DIFF`]).
    pub fn within_fp32_tolerance(&self) -> bool {
        self.max_abs_diff <= MAX_ABS_DIFF && self.mean_abs_diff <= MAX_MEAN_ABS_DIFF
    }

    /// Whether a reduced-precision image is as close as it must be ([`MIN_REDUCED_PSNR_DB`]).
    pub fn within_reduced_tolerance(&self) -> bool {
        self.psnr_db >= MIN_REDUCED_PSNR_DB
    }
}

/// Compares `images` with the reference PNGs of `case` (in the fixtures folder `root`): one
/// [`ImageCheck`] per image, or why they cannot be compared (count, size, unreadable reference).
pub fn check_images(
    root: &Path,
    case: &GenerationCase,
    images: &[image::RgbImage],
) -> std::result::Result<Vec<ImageCheck>, String> {
    if images.len() != case.images.len() {
        return Err(format!(
            "{} images, expected {}",
            images.len(),
            case.images.len()
        ));
    }
    let mut checks = Vec::new();
    for (i, (ours, path)) in images.iter().zip(&case.images).enumerate() {
        let theirs = load_image(&root.join(path), 1 << 24).map_err(|e| e.to_string())?;
        if ours.dimensions() != theirs.dimensions() {
            return Err(format!(
                "image {i}: {:?}, expected {:?}",
                ours.dimensions(),
                theirs.dimensions()
            ));
        }
        let (max_abs_diff, mean_abs_diff) = compare(ours, &theirs);
        checks.push(ImageCheck {
            max_abs_diff,
            mean_abs_diff,
            psnr_db: psnr(&theirs, ours),
        });
    }
    Ok(checks)
}

/// What running one case gave (`pictor check-fixtures` prints these).
#[derive(Debug, Clone, Serialize)]
pub struct CaseOutcome {
    /// The case's name.
    pub name: String,
    /// Its model id.
    pub model: String,
    /// Its pipeline.
    pub pipeline: String,
    /// Its scheduler.
    pub scheduler: String,
    /// Whether every image is within the tolerance of the precision it ran in.
    pub pass: bool,
    /// One comparison per image.
    pub images: Vec<ImageCheck>,
    /// Seconds of the generation (model loading excluded).
    pub seconds: Option<f64>,
    /// Why the case could not run or be compared.
    pub error: Option<String>,
}

impl CaseOutcome {
    /// The outcome of `case` before it ran: not passed, nothing compared; `error` says why it could not run.
    pub fn of(case: &GenerationCase, error: Option<String>) -> Self {
        CaseOutcome {
            name: case.name.clone(),
            model: case.model.clone(),
            pipeline: case.pipeline.clone(),
            scheduler: case.scheduler.clone(),
            pass: false,
            images: Vec::new(),
            seconds: None,
            error,
        }
    }
}

/// Runs `case` on `base` (a model loaded from `root`'s `models` folder, with the case's LoRAs and VAE
/// applied on top) and compares its images with the references: within the float32 tolerance when
/// `reduced` is false, else at [`MIN_REDUCED_PSNR_DB`] or better.
pub fn run_case(
    root: &Path,
    base: &StableDiffusion,
    case: &GenerationCase,
    reduced: bool,
) -> CaseOutcome {
    let mut outcome = CaseOutcome::of(case, None);
    let run = || -> std::result::Result<(Vec<ImageCheck>, f64), String> {
        let models = ModelsDir::new(root.join("models"));
        let model = if case.loras.is_empty() && case.vae.is_none() {
            base.clone()
        } else {
            model_store::variant(base, &models, &case.loras, case.vae.as_deref())
                .map_err(|e| e.to_string())?
        };
        let request = request_for(root, case, None)?;
        let start = Instant::now();
        let generation = model
            .generate(&request, &mut NoProgress)
            .map_err(|e| e.to_string())?;
        let seconds = start.elapsed().as_secs_f64();
        Ok((check_images(root, case, &generation.images)?, seconds))
    };
    match run() {
        Ok((images, seconds)) => {
            outcome.pass = images.iter().all(|c| {
                if reduced {
                    c.within_reduced_tolerance()
                } else {
                    c.within_fp32_tolerance()
                }
            });
            outcome.images = images;
            outcome.seconds = Some(seconds);
        }
        Err(e) => outcome.error = Some(e),
    }
    outcome
}

/// The model id a case names, as [`ModelsDir::resolve_id`] takes it (without `.safetensors`).
pub fn model_id(case: &GenerationCase) -> &str {
    case.model.trim_end_matches(".safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_and_compare_measure_differences() {
        let a = image::RgbImage::from_pixel(4, 4, image::Rgb([10, 20, 30]));
        let mut b = a.clone();
        assert!(psnr(&a, &b).is_infinite());
        b.put_pixel(0, 0, image::Rgb([13, 20, 30]));
        let (max, mean) = compare(&a, &b);
        assert_eq!(max, 3);
        assert!((mean - 3.0 / 48.0).abs() < 1e-12);
        // MSE = 9 / 48.
        let expected = 10.0 * (255.0f64 * 255.0 / (9.0 / 48.0)).log10();
        assert!((psnr(&a, &b) - expected).abs() < 1e-9);
    }

    #[test]
    fn the_lora_files_leave_out_pipeline_and_clip_skip() {
        let case: GenerationCase = serde_json::from_value(serde_json::json!({
            "name": "x", "model": "m", "prompt": "p", "negative_prompt": "n", "init_image": "i.png",
            "width": 64, "height": 64, "samples": 1, "num_inference_steps": 4, "guidance_scale": 7.5,
            "strength": 0.5, "seed": 1, "scheduler": "PNDMScheduler", "loras": [["l", 0.8]],
            "images": ["x/0.png"]
        }))
        .unwrap();
        assert_eq!(case.pipeline, "img2img");
        assert_eq!(case.clip_skip, 1);
        assert_eq!(case.loras, [("l".to_string(), 0.8)]);
    }
}
