//! `--from-png FILE`: the settings a PNG's `parameters` text carries (Pictor's outputs and AUTOMATIC1111's
//! write it; see `pictor_server::infotext`) restored into a command's options, except the options given on the
//! command line.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use pictor_engine::image_io::png_text;
use pictor_engine::schedulers::SCHEDULER_NAMES;
use pictor_server::infotext::{self, Parsed};
use pictor_server::samplers;

use crate::args::{CommonArgs, SizeAndSteps};

/// Whether an option (by its clap id) was given on the command line.
pub type Explicit<'a> = &'a dyn Fn(&str) -> bool;

/// The settings in the `parameters` text of the PNG at `path`.
pub fn read(path: &Path) -> Result<Parsed> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("--from-png: cannot read {}", path.display()))?;
    let text = png_text(&bytes, "parameters").ok_or_else(|| {
        anyhow!(
            "--from-png: {} has no parameters text (Pictor and AUTOMATIC1111 write one into their PNGs)",
            path.display()
        )
    })?;
    Ok(infotext::parse(&text))
}

/// Parses setting `key` of `p` into `target` unless the option `id` was given.
fn restore<T: std::str::FromStr>(
    target: &mut T,
    p: &Parsed,
    key: &str,
    id: &str,
    explicit: Explicit,
) -> Result<()> {
    if explicit(id) {
        return Ok(());
    }
    if let Some(value) = p.get(key) {
        *target = value
            .trim()
            .parse()
            .map_err(|_| anyhow!("--from-png: {key} {value:?} is not a valid {id}"))?;
    }
    Ok(())
}

/// The shared options: prompts, seed, sampler (A1111 names mapped through Pictor's sampler table, or a scheduler
/// class as Pictor writes it for the ones A1111 lacks), clip skip and model.
pub fn restore_common(c: &mut CommonArgs, p: &Parsed, explicit: Explicit) -> Result<()> {
    if !explicit("prompt") {
        c.prompt = p.prompt.clone();
    }
    if !explicit("negative_prompt") {
        c.negative_prompt = p.negative_prompt.clone();
    }
    if !explicit("seed") {
        if let Some(seed) = p.get("Seed") {
            c.seed = Some(
                seed.parse()
                    .map_err(|_| anyhow!("--from-png: Seed {seed:?} is not a number"))?,
            );
        }
    }
    restore(&mut c.clip_skip, p, "Clip skip", "clip_skip", explicit)?;
    if !explicit("model") {
        if let Some(model) = p.get("Model") {
            c.model = model.to_string();
        }
    }
    if let (Some(sampler), false) = (p.get("Sampler"), explicit("scheduler")) {
        let karras = p.get("Schedule type") == Some("Karras");
        if SCHEDULER_NAMES.contains(&sampler) {
            c.scheduler = Some(sampler.to_string());
            if !explicit("use_karras_sigmas") {
                c.use_karras_sigmas = karras;
            }
        } else {
            let choice = samplers::from_a1111(sampler, p.get("Schedule type"))
                .map_err(|e| anyhow!("--from-png: {e}"))?;
            c.scheduler = Some(choice.scheduler.to_string());
            if !explicit("use_karras_sigmas") {
                c.use_karras_sigmas = choice.use_karras_sigmas;
            }
            if !explicit("algorithm_type") {
                c.algorithm_type = choice.algorithm_type.map(str::to_string);
            }
        }
    }
    Ok(())
}

/// Size, steps and guidance.
pub fn restore_size(s: &mut SizeAndSteps, p: &Parsed, explicit: Explicit) -> Result<()> {
    if let Some((w, h)) = p.get("Size").and_then(|v| v.split_once('x')) {
        let side = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| anyhow!("--from-png: Size {v:?}"))
        };
        if !explicit("width") {
            s.width = side(w)?;
        }
        if !explicit("height") {
            s.height = side(h)?;
        }
    }
    restore(
        &mut s.num_inference_steps,
        p,
        "Steps",
        "num_inference_steps",
        explicit,
    )?;
    restore(
        &mut s.guidance_scale,
        p,
        "CFG scale",
        "guidance_scale",
        explicit,
    )
}

/// img2img's strength.
pub fn restore_strength(strength: &mut f64, p: &Parsed, explicit: Explicit) -> Result<()> {
    restore(strength, p, "Denoising strength", "strength", explicit)
}
