//! The Stable Diffusion safety checker (diffusers' `StableDiffusionSafetyChecker`) and what replaces the
//! images it flags.
//!
//! The checker embeds each image with a CLIP vision tower and a projection, and compares the embedding's
//! cosine similarity with 17 concept embeddings and 3 "special care" embeddings against per-concept
//! thresholds stored in the model. An image whose special-care score is above 0 gets every concept
//! threshold lowered by 0.01; it is flagged when any concept score is above 0. Scores are rounded to three
//! decimals before the comparison, in float32, as diffusers does.
//!
//! [`SafetyChecker::load`] reads a diffusers `safety_checker/` folder (`config.json` + `model.safetensors`;
//! pickled `.bin` weights are refused) with the preprocessing of its sibling
//! `feature_extractor/preprocessor_config.json`, or CLIP's defaults when there is none. The path may also
//! be a folder that contains `safety_checker/` (and `feature_extractor/`): a diffusers model folder or a
//! stand-alone checker folder.

mod preprocess;
mod replace;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use image::RgbImage;
use serde::Deserialize;

use crate::error::{EngineError, Result};
use crate::models::{ClipVisionConfig, ClipVisionModel};

pub use preprocess::{ClipImageProcessor, ResizeTo, CLIP_MEAN, CLIP_STD};
pub use replace::{replace_flagged, Replacement};

/// What the special-care adjustment adds to every concept score of an image that hits a special-care
/// concept (diffusers' `adjustment = 0.01`).
pub const SPECIAL_CARE_ADJUSTMENT: f32 = 0.01;

/// transformers' default `projection_dim`.
fn default_projection_dim() -> usize {
    512
}

/// The keys of the checker's `config.json` (a transformers `CLIPConfig`) that matter here.
#[derive(Debug, Deserialize)]
struct CheckerConfig {
    #[serde(default)]
    vision_config: Option<ClipVisionConfig>,
    /// Old transformers configs keep the vision config here (sometimes with `vision_config` null).
    #[serde(default)]
    vision_config_dict: Option<ClipVisionConfig>,
    #[serde(default = "default_projection_dim")]
    projection_dim: usize,
}

/// One image's scores, unrounded (diffusers rounds them to three decimals before comparing with 0).
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyScores {
    /// Cosine similarity minus threshold for each special-care concept (plus 0.01 once an earlier
    /// special-care concept was hit, as diffusers computes it).
    pub special_care: Vec<f32>,
    /// Cosine similarity minus threshold for each concept, plus 0.01 if any special-care concept was hit.
    pub concepts: Vec<f32>,
    /// Whether any special-care concept was hit.
    pub special_care_hit: bool,
    /// Whether the image is flagged: some concept score rounds to above 0.
    pub flagged: bool,
}

/// diffusers' comparison: `round(score, 3) > 0` in float32 (numpy rounds half to even).
fn rounded_positive(score: f32) -> bool {
    (score * 1000.0).round_ties_even() > 0.0
}

/// Rows of `x` (n, d) scaled to unit length (torch's `F.normalize`, eps 1e-12).
fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&norm)
}

/// A loaded safety checker.
#[derive(Debug)]
pub struct SafetyChecker {
    vision_model: ClipVisionModel,
    visual_projection: Linear,
    /// Unit-length concept embeddings (concepts, projection).
    concepts: Tensor,
    /// Unit-length special-care embeddings (special concepts, projection).
    special_care: Tensor,
    concept_thresholds: Vec<f32>,
    special_care_thresholds: Vec<f32>,
    processor: ClipImageProcessor,
    device: Device,
}

/// Finds the checker folder and its feature extractor folder (if any) from a user-given path.
fn locate(path: &Path, id: &str) -> Result<(PathBuf, Option<PathBuf>)> {
    let not_a_checker = || {
        EngineError::model(
            id,
            "not a safety checker: expected a diffusers safety_checker/ folder (config.json and \
             model.safetensors) or a folder containing safety_checker/",
        )
    };
    if !path.exists() {
        return Err(EngineError::model(id, "no such file or folder"));
    }
    if path.is_file() {
        let name = path.to_string_lossy().to_lowercase();
        if [".ckpt", ".pt", ".pth", ".bin", ".pkl"]
            .iter()
            .any(|e| name.ends_with(e))
        {
            return Err(EngineError::model(
                id,
                "pickled weights are refused because loading them can run arbitrary code; use a \
                 safety_checker/ folder with model.safetensors",
            ));
        }
        return Err(not_a_checker());
    }
    let feature_extractor = |dir: &Path| {
        let fe = dir.join("feature_extractor");
        fe.join("preprocessor_config.json").is_file().then_some(fe)
    };
    if path.join("config.json").is_file() {
        let parent = path.parent().and_then(feature_extractor);
        return Ok((path.to_path_buf(), parent));
    }
    let nested = path.join("safety_checker");
    if nested.join("config.json").is_file() {
        return Ok((nested, feature_extractor(path)));
    }
    if nested.is_dir() {
        return Err(EngineError::model(
            id,
            format!("{} has no config.json", nested.display()),
        ));
    }
    Err(not_a_checker())
}

impl SafetyChecker {
    /// Loads a checker from `path` (see the module docs for the layouts accepted) to run on `device` in
    /// float32.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let id = path.display().to_string();
        let (dir, fe_dir) = locate(path, &id)?;
        let config: CheckerConfig = crate::config::read_json(&id, &dir.join("config.json"))?;
        let vision_config = config
            .vision_config
            .or(config.vision_config_dict)
            .unwrap_or_default();
        vision_config
            .validate()
            .map_err(|e| EngineError::model(&id, format!("safety_checker vision_config: {e}")))?;
        let processor = match &fe_dir {
            Some(fe) => ClipImageProcessor::from_file(&id, &fe.join("preprocessor_config.json"))?,
            None => ClipImageProcessor::default(),
        };
        if let Some((w, h)) = processor.center_crop {
            let side = vision_config.image_size as u32;
            if (w, h) != (side, side) {
                return Err(EngineError::model(
                    &id,
                    format!(
                        "the feature extractor crops to {w}x{h} but the safety checker's vision model \
                         takes {side}x{side} images"
                    ),
                ));
            }
        }
        let vb = crate::model_store::component_weights(&id, &dir, DType::F32, device)?;
        Self::from_parts(vision_config, config.projection_dim, processor, vb, device)
            .map_err(|e| EngineError::model(&id, format!("safety_checker: {e}")))
    }

    fn from_parts(
        vision_config: ClipVisionConfig,
        projection_dim: usize,
        processor: ClipImageProcessor,
        vb: VarBuilder,
        device: &Device,
    ) -> candle_core::Result<Self> {
        // Checkers on the Hub nest the tower as `vision_model.vision_model.…` (transformers'
        // `CLIPVisionModel` inside the checker's `vision_model`); transformers 5 saves it flat.
        let tower = if vb.contains_tensor("vision_model.vision_model.embeddings.class_embedding") {
            vb.pp("vision_model")
        } else {
            vb.clone()
        };
        let vision_model = ClipVisionModel::new(&vision_config, tower)?;
        let visual_projection = candle_nn::linear_no_bias(
            vision_config.hidden_size,
            projection_dim,
            vb.pp("visual_projection"),
        )?;
        let embeds = |name: &str, weights: &str| -> candle_core::Result<(Tensor, Vec<f32>)> {
            let e = vb.get_unchecked(name)?;
            let (n, d) = e.dims2()?;
            if d != projection_dim {
                candle_core::bail!(
                    "{name} has shape {:?}, expected [n, {projection_dim}]",
                    e.dims()
                );
            }
            let w = vb.get(n, weights)?.to_vec1::<f32>()?;
            Ok((l2_normalize(&e)?, w))
        };
        let (concepts, concept_thresholds) = embeds("concept_embeds", "concept_embeds_weights")?;
        let (special_care, special_care_thresholds) =
            embeds("special_care_embeds", "special_care_embeds_weights")?;
        Ok(SafetyChecker {
            vision_model,
            visual_projection,
            concepts,
            special_care,
            concept_thresholds,
            special_care_thresholds,
            processor,
            device: device.clone(),
        })
    }

    /// The preprocessing this checker applies to images.
    pub fn processor(&self) -> &ClipImageProcessor {
        &self.processor
    }

    /// The vision tower's config.
    pub fn vision_config(&self) -> &ClipVisionConfig {
        self.vision_model.config()
    }

    /// Pixel values (n, 3, side, side) of `images`, as the feature extractor makes them.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        let side = self.vision_config().image_size as u32;
        for image in images {
            let size = self.processor.output_size(image.width(), image.height());
            if size != (side, side) {
                return Err(EngineError::invalid(
                    "images",
                    format!(
                        "the safety checker's feature extractor makes a {}x{} image {}x{}, but its \
                         vision model takes {side}x{side}",
                        image.width(),
                        image.height(),
                        size.0,
                        size.1
                    ),
                ));
            }
        }
        self.processor.pixel_values(images, &self.device)
    }

    /// Image embeddings (n, projection) of pixel values (n, 3, side, side): the vision tower's pooled
    /// output through `visual_projection`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pooled = self
            .vision_model
            .forward(&pixel_values.to_device(&self.device)?)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }

    /// Scores and flags of image embeddings (n, projection), as diffusers' `forward` computes them.
    pub fn scores(&self, image_embeds: &Tensor) -> Result<Vec<SafetyScores>> {
        let embeds = l2_normalize(&image_embeds.to_dtype(DType::F32)?)?;
        let cos = embeds.matmul(&self.concepts.t()?)?.to_vec2::<f32>()?;
        let special_cos = embeds.matmul(&self.special_care.t()?)?.to_vec2::<f32>()?;
        Ok(cos
            .iter()
            .zip(&special_cos)
            .map(|(cos, special_cos)| {
                let mut adjustment = 0.0f32;
                let mut special_care = Vec::with_capacity(special_cos.len());
                for (c, threshold) in special_cos.iter().zip(&self.special_care_thresholds) {
                    let score = c - threshold + adjustment;
                    special_care.push(score);
                    if rounded_positive(score) {
                        adjustment = SPECIAL_CARE_ADJUSTMENT;
                    }
                }
                let concepts: Vec<f32> = cos
                    .iter()
                    .zip(&self.concept_thresholds)
                    .map(|(c, threshold)| c - threshold + adjustment)
                    .collect();
                SafetyScores {
                    flagged: concepts.iter().any(|s| rounded_positive(*s)),
                    special_care_hit: adjustment > 0.0,
                    special_care,
                    concepts,
                }
            })
            .collect())
    }

    /// One flag per image: `true` for an image diffusers' checker would black out.
    pub fn check(&self, images: &[RgbImage]) -> Result<Vec<bool>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let embeds = self.image_embeds(&self.pixel_values(images)?)?;
        Ok(self.scores(&embeds)?.iter().map(|s| s.flagged).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_follows_numpy() {
        // round(x, 3) > 0: 0.0005 rounds (half to even) to 0.000, 0.00051 to 0.001
        assert!(!rounded_positive(0.0005));
        assert!(rounded_positive(0.000_51));
        assert!(!rounded_positive(0.0));
        assert!(!rounded_positive(-0.2));
        assert!(rounded_positive(0.0015));
    }

    #[test]
    fn normalize_gives_unit_rows_and_keeps_zero_rows() {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let n = l2_normalize(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(n, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
    }

    #[test]
    fn locate_accepts_both_layouts_and_refuses_others() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("model");
        std::fs::create_dir_all(model.join("safety_checker")).unwrap();
        std::fs::create_dir_all(model.join("feature_extractor")).unwrap();
        std::fs::write(model.join("safety_checker/config.json"), "{}").unwrap();
        std::fs::write(
            model.join("feature_extractor/preprocessor_config.json"),
            "{}",
        )
        .unwrap();
        let fe = Some(model.join("feature_extractor"));
        let checker = model.join("safety_checker");
        assert_eq!(locate(&model, "m").unwrap(), (checker.clone(), fe.clone()));
        assert_eq!(locate(&checker, "m").unwrap(), (checker.clone(), fe));
        std::fs::remove_dir_all(model.join("feature_extractor")).unwrap();
        assert_eq!(locate(&checker, "m").unwrap(), (checker, None));

        let err = |p: &Path| locate(p, "m").unwrap_err().to_string();
        assert!(err(&root.path().join("nope")).contains("no such"));
        assert!(err(root.path()).contains("not a safety checker"));
        let pickle = root.path().join("checker.bin");
        std::fs::write(&pickle, "x").unwrap();
        assert!(err(&pickle).contains("pickled"));
        std::fs::create_dir_all(root.path().join("other/safety_checker")).unwrap();
        assert!(err(&root.path().join("other")).contains("no config.json"));
    }
}
