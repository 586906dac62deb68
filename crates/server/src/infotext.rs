//! AUTOMATIC1111's "infotext": a generation's settings as one text — the prompt, `Negative prompt: …`, then
//! `Key: value` pairs. Every output PNG carries it as its `parameters` text chunk (as A1111 writes it), the A1111
//! dialect answers it, and `pictor img2img --from-png` and the playground read it back.

use crate::backend::{GenerationRequest, PipelineKind};
use crate::samplers;

/// The infotext of `r`, whose scheduler `scheduler` ran.
pub fn format(r: &GenerationRequest, scheduler: &str) -> String {
    let mut text = r.prompt.clone();
    if !r.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", r.negative_prompt));
    }
    let (sampler, schedule) =
        samplers::a1111_name_of(scheduler, r.algorithm_type.as_deref(), r.use_karras_sigmas);
    let mut pairs = vec![
        format!("Steps: {}", r.steps),
        format!("Sampler: {sampler}"),
        format!("Schedule type: {schedule}"),
        format!("CFG scale: {}", r.guidance_scale),
        format!("Seed: {}", r.seed),
        format!("Size: {}x{}", r.width, r.height),
        format!("Model: {}", r.model_id),
    ];
    match r.kind {
        PipelineKind::Img2Img => pairs.push(format!("Denoising strength: {}", r.strength)),
        PipelineKind::Pix2Pix => pairs.push(format!("Image CFG scale: {}", r.image_guidance_scale)),
        PipelineKind::Text2Img => {}
    }
    if r.clip_skip > 1 {
        pairs.push(format!("Clip skip: {}", r.clip_skip));
    }
    if !r.loras.is_empty() {
        let loras: Vec<String> = r
            .loras
            .iter()
            .map(|l| format!("{}: {}", l.name, l.strength))
            .collect();
        pairs.push(format!("Lora weights: \"{}\"", loras.join(", ")));
    }
    if let Some(vae) = &r.vae {
        pairs.push(format!("VAE: {vae}"));
    }
    pairs.push(format!("Version: pictor {}", env!("CARGO_PKG_VERSION")));
    text.push('\n');
    text.push_str(&pairs.join(", "));
    text
}

/// What an infotext says, as far as it can be used again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt ("" for none).
    pub negative_prompt: String,
    /// Every `Key: value` pair after the prompts, in order (quoted values unquoted).
    pub settings: Vec<(String, String)>,
}

impl Parsed {
    /// The value of setting `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads an infotext (Pictor's or AUTOMATIC1111's). The last line holds the settings; a line starting with
/// `Negative prompt: ` begins the negative prompt; the rest is the prompt.
pub fn parse(text: &str) -> Parsed {
    let mut lines: Vec<&str> = text.lines().collect();
    let settings_line = match lines.last() {
        Some(l) if l.starts_with("Steps: ") => lines.pop().unwrap_or_default(),
        _ => "",
    };
    let mut prompt = Vec::new();
    let mut negative: Option<Vec<&str>> = None;
    for line in lines {
        match (&mut negative, line.strip_prefix("Negative prompt: ")) {
            (None, Some(rest)) => negative = Some(vec![rest]),
            (Some(n), _) => n.push(line),
            (None, None) => prompt.push(line),
        }
    }
    Parsed {
        prompt: prompt.join("\n"),
        negative_prompt: negative.map(|n| n.join("\n")).unwrap_or_default(),
        settings: split_settings(settings_line),
    }
}

/// `Key: value, Key: "quoted, value", …` into pairs.
fn split_settings(line: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some(colon) = rest.find(": ") else { break };
        let key = rest[..colon].trim().to_string();
        let after = &rest[colon + 2..];
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (quoted[..end].to_string(), &quoted[end + 1..]),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.find(", ") {
                Some(end) => (after[..end].to_string(), &after[end..]),
                None => (after.to_string(), ""),
            }
        };
        pairs.push((key, value.trim().to_string()));
        rest = next.trim_start_matches(',').trim_start();
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LoraChoice;

    fn request() -> GenerationRequest {
        GenerationRequest {
            kind: PipelineKind::Img2Img,
            model_id: "sd15".into(),
            prompt: "a cat, (sharp:1.2)\nsecond line".into(),
            negative_prompt: "blurry".into(),
            width: 512,
            height: 768,
            samples: 1,
            steps: 30,
            guidance_scale: 7.5,
            strength: 0.7,
            image_guidance_scale: 1.5,
            scheduler: Some("DPMSolverMultistepScheduler".into()),
            use_karras_sigmas: true,
            algorithm_type: None,
            seed: 4139316548,
            clip_skip: 2,
            loras: vec![LoraChoice {
                name: "anime".into(),
                strength: 0.8,
            }],
            vae: None,
            embeddings: Vec::new(),
            tomesd: false,
            safety_checker: None,
        }
    }

    #[test]
    fn infotexts_round_trip() {
        let text = format(&request(), "DPMSolverMultistepScheduler");
        assert!(text.contains(
            "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 4139316548, Size: 512x768, \
             Model: sd15, Denoising strength: 0.7, Clip skip: 2, Lora weights: \"anime: 0.8\""
        ), "{text}");
        let parsed = parse(&text);
        assert_eq!(parsed.prompt, "a cat, (sharp:1.2)\nsecond line");
        assert_eq!(parsed.negative_prompt, "blurry");
        assert_eq!(parsed.get("Seed"), Some("4139316548"));
        assert_eq!(parsed.get("Lora weights"), Some("anime: 0.8"));
        assert_eq!(parsed.get("Size"), Some("512x768"));
        // AUTOMATIC1111's own (no negative prompt, quoted hashes).
        let a1111 = parse("a fox\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, \
                           Size: 512x512, Model hash: abc, Model: v1-5, Lora hashes: \"x: 1, y: 2\", Version: v1.10");
        assert_eq!(a1111.prompt, "a fox");
        assert_eq!(a1111.negative_prompt, "");
        assert_eq!(a1111.get("Sampler"), Some("Euler a"));
        assert_eq!(a1111.get("Lora hashes"), Some("x: 1, y: 2"));
        assert_eq!(a1111.get("Version"), Some("v1.10"));
    }
}
