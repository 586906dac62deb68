//! The safety checker's image preprocessing: transformers' `CLIPImageProcessor`, configured by diffusers'
//! `feature_extractor/preprocessor_config.json` (resize the shortest edge, centre crop, rescale, normalise).
//!
//! Resizing uses the `image` crate. Its `CatmullRom` filter is the same cubic kernel (a = -0.5), with the
//! same support widening when shrinking, as PIL's `BICUBIC`, which transformers uses. PIL resizes
//! horizontally first and rounds to 8 bits (clamping overshoot) before the vertical pass, while one
//! `image::imageops::resize` call goes vertical first and keeps floats in between; on noise that differs by
//! up to 20 levels. So the resize is done as two one-axis calls in PIL's order, which leaves only PIL's
//! fixed-point weights as a difference: at most 2 levels, 0.001 on average, on the safety fixtures
//! (tests/safety.rs measures it), moving the embeddings by ~2e-3.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;
use serde::Deserialize;

use crate::error::{EngineError, Result};

/// OpenAI CLIP's per-channel mean.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// How an image is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// The shorter side becomes this many pixels, the longer one keeps the aspect ratio (rounded down).
    ShortestEdge(u32),
    /// Exactly this size, whatever the aspect ratio.
    Exact {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
}

/// `CLIPImageProcessor`'s steps, each optional as in its config.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    /// The resize, if any.
    pub resize: Option<ResizeTo>,
    /// The resampling filter of the resize.
    pub filter: FilterType,
    /// The centre crop (width, height), if any; an image smaller than it is padded with black.
    pub center_crop: Option<(u32, u32)>,
    /// The factor that takes 0–255 values to 0–1, if rescaling.
    pub rescale_factor: Option<f32>,
    /// Per-channel (mean, std), if normalising.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl Default for ClipImageProcessor {
    /// `CLIPImageProcessor`'s defaults: shortest edge 224 bicubic, centre crop 224, 1/255, CLIP mean/std.
    fn default() -> Self {
        ClipImageProcessor {
            resize: Some(ResizeTo::ShortestEdge(224)),
            filter: FilterType::CatmullRom,
            center_crop: Some((224, 224)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((CLIP_MEAN, CLIP_STD)),
        }
    }
}

/// `size` / `crop_size`: a number or a dictionary, as transformers writes them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Side(u32),
    Dict {
        shortest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
    },
}

/// A per-channel value: one number for all channels, or one per channel.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PerChannel {
    All(f32),
    Each(Vec<f32>),
}

impl PerChannel {
    fn channels(&self) -> Option<[f32; 3]> {
        match self {
            PerChannel::All(v) => Some([*v; 3]),
            PerChannel::Each(v) => match v.as_slice() {
                [a] => Some([*a; 3]),
                [r, g, b] => Some([*r, *g, *b]),
                _ => None,
            },
        }
    }
}

/// The keys of `preprocessor_config.json` that matter here.
#[derive(Debug, Deserialize)]
struct RawConfig {
    do_resize: Option<bool>,
    size: Option<SizeSpec>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<SizeSpec>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f32>,
    do_normalize: Option<bool>,
    image_mean: Option<PerChannel>,
    image_std: Option<PerChannel>,
}

impl ClipImageProcessor {
    /// Reads a `preprocessor_config.json` (either the old `CLIPFeatureExtractor` form with plain numbers or
    /// the newer dictionaries); keys it lacks keep `CLIPImageProcessor`'s defaults. `model` names the
    /// model in errors.
    pub fn from_file(model: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = crate::config::read_json(model, path)?;
        let bad = |msg: String| EngineError::model(model, format!("{}: {msg}", path.display()));
        let defaults = ClipImageProcessor::default();
        let resize = match (raw.do_resize.unwrap_or(true), &raw.size) {
            (false, _) => None,
            (true, None) => defaults.resize,
            (true, Some(SizeSpec::Side(s))) => Some(ResizeTo::ShortestEdge(*s)),
            (
                true,
                Some(SizeSpec::Dict {
                    shortest_edge: Some(s),
                    ..
                }),
            ) => Some(ResizeTo::ShortestEdge(*s)),
            (
                true,
                Some(SizeSpec::Dict {
                    height: Some(height),
                    width: Some(width),
                    ..
                }),
            ) => Some(ResizeTo::Exact {
                width: *width,
                height: *height,
            }),
            (true, Some(_)) => {
                return Err(bad("size needs shortest_edge, or height and width".into()))
            }
        };
        let filter = match raw.resample.unwrap_or(3) {
            0 => FilterType::Nearest,
            1 => FilterType::Lanczos3,
            2 => FilterType::Triangle,
            3 => FilterType::CatmullRom,
            other => {
                return Err(bad(format!(
                "resample {other} is not supported (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic)"
            )))
            }
        };
        let center_crop = match (raw.do_center_crop.unwrap_or(true), &raw.crop_size) {
            (false, _) => None,
            (true, None) => defaults.center_crop,
            (true, Some(SizeSpec::Side(s))) => Some((*s, *s)),
            (
                true,
                Some(SizeSpec::Dict {
                    height: Some(height),
                    width: Some(width),
                    ..
                }),
            ) => Some((*width, *height)),
            (true, Some(_)) => return Err(bad("crop_size needs height and width".into())),
        };
        let rescale_factor = raw
            .do_rescale
            .unwrap_or(true)
            .then(|| raw.rescale_factor.unwrap_or(1.0 / 255.0));
        let normalize = if raw.do_normalize.unwrap_or(true) {
            let channels = |v: &Option<PerChannel>, default: [f32; 3], name: &str| match v {
                None => Ok(default),
                Some(v) => v
                    .channels()
                    .ok_or_else(|| bad(format!("{name} needs 1 or 3 values"))),
            };
            let mean = channels(&raw.image_mean, CLIP_MEAN, "image_mean")?;
            let std = channels(&raw.image_std, CLIP_STD, "image_std")?;
            if std.contains(&0.0) {
                return Err(bad("image_std has a zero".into()));
            }
            Some((mean, std))
        } else {
            None
        };
        if matches!(
            resize,
            Some(ResizeTo::ShortestEdge(0))
                | Some(ResizeTo::Exact { width: 0, .. })
                | Some(ResizeTo::Exact { height: 0, .. })
        ) || matches!(center_crop, Some((0, _)) | Some((_, 0)))
        {
            return Err(bad("sizes must be at least 1 pixel".into()));
        }
        Ok(ClipImageProcessor {
            resize,
            filter,
            center_crop,
            rescale_factor,
            normalize,
        })
    }

    /// The size (width, height) the resize gives an image of `width` x `height`, as transformers computes
    /// it (the longer side rounded down).
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.resize {
            None => (width, height),
            Some(ResizeTo::Exact { width, height }) => (width, height),
            Some(ResizeTo::ShortestEdge(side)) => {
                let scaled = |long: u32, short: u32| {
                    (side as u64 * long as u64 / short.max(1) as u64).max(1) as u32
                };
                if width <= height {
                    (side, scaled(height, width))
                } else {
                    (scaled(width, height), side)
                }
            }
        }
    }

    /// The size (width, height) of the pixel values made from an image of `width` x `height`.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        self.center_crop
            .unwrap_or_else(|| self.resized_size(width, height))
    }

    /// Resizes and centre-crops one image (still 8-bit), as transformers does before rescaling.
    pub fn resize_and_crop(&self, image: &RgbImage) -> RgbImage {
        let (w, h) = self.resized_size(image.width(), image.height());
        // Two one-axis resizes, horizontal first with an 8-bit result in between, as PIL does (one
        // `resize` call would go vertical first and keep floats in between). An axis whose size does not
        // change is copied, not resampled.
        let across = image::imageops::resize(image, w, image.height(), self.filter);
        let resized = image::imageops::resize(&across, w, h, self.filter);
        match self.center_crop {
            None => resized,
            Some((cw, ch)) => center_crop(&resized, cw, ch),
        }
    }

    /// Pixel values (n, 3, height, width), float32 on `device`, of images that all come out the same size.
    pub fn pixel_values(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        let mut data = Vec::new();
        let mut size = None;
        for (i, image) in images.iter().enumerate() {
            if image.width() == 0 || image.height() == 0 {
                return Err(EngineError::invalid(
                    "images",
                    format!("image {i} is empty (0 pixels)"),
                ));
            }
            let prepared = self.resize_and_crop(image);
            let dims = prepared.dimensions();
            if *size.get_or_insert(dims) != dims {
                return Err(EngineError::invalid(
                    "images",
                    "the feature extractor gives these images different sizes (it has no centre crop), \
                     so they cannot be checked together",
                ));
            }
            data.extend(self.channels_first(&prepared));
        }
        let (w, h) = size.unwrap_or((0, 0));
        Ok(Tensor::from_vec(
            data,
            (images.len(), 3, h as usize, w as usize),
            device,
        )?)
    }

    /// Rescaled and normalised values of one prepared image, channels first.
    fn channels_first(&self, image: &RgbImage) -> Vec<f32> {
        let plane = (image.width() * image.height()) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, pixel) in image.pixels().enumerate() {
            for c in 0..3 {
                let mut v = pixel[c] as f32;
                if let Some(factor) = self.rescale_factor {
                    v *= factor;
                }
                if let Some((mean, std)) = self.normalize {
                    v = (v - mean[c]) / std[c];
                }
                out[c * plane + i] = v;
            }
        }
        out
    }
}

/// Crops the centre `width` x `height` of `image` (offsets rounded down); a side shorter than the crop is
/// padded with black, the image placed at the padding's rounded-up half (transformers' `center_crop`).
fn center_crop(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = image.dimensions();
    // (source offset, destination offset, length) along one axis
    let axis = |have: u32, want: u32| {
        if have >= want {
            ((have - want) / 2, 0, want)
        } else {
            (0, (want - have).div_ceil(2), have)
        }
    };
    let (sx, dx, lx) = axis(iw, width);
    let (sy, dy, ly) = axis(ih, height);
    let mut out = RgbImage::new(width, height);
    for y in 0..ly {
        for x in 0..lx {
            out.put_pixel(dx + x, dy + y, *image.get_pixel(sx + x, sy + y));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn from_json(json: &str) -> Result<ClipImageProcessor> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preprocessor_config.json");
        std::fs::write(&path, json).unwrap();
        ClipImageProcessor::from_file("m", &path)
    }

    #[test]
    fn old_and_new_config_forms_agree() {
        let old = from_json(
            r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#,
        )
        .unwrap();
        let new = from_json(
            r#"{"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224},
                "do_rescale": true, "rescale_factor": 0.00392156862745098}"#,
        )
        .unwrap();
        assert_eq!(old, ClipImageProcessor::default());
        assert_eq!(new, ClipImageProcessor::default());
        assert_eq!(from_json("{}").unwrap(), ClipImageProcessor::default());
    }

    #[test]
    fn config_switches_and_sizes_are_read() {
        let p = from_json(
            r#"{"size": {"height": 32, "width": 48}, "do_center_crop": false, "do_rescale": false,
                "image_mean": 0.5, "image_std": [0.25], "resample": 2}"#,
        )
        .unwrap();
        assert_eq!(
            p.resize,
            Some(ResizeTo::Exact {
                width: 48,
                height: 32
            })
        );
        assert_eq!(p.filter, FilterType::Triangle);
        assert_eq!(p.center_crop, None);
        assert_eq!(p.rescale_factor, None);
        assert_eq!(p.normalize, Some(([0.5; 3], [0.25; 3])));
        assert_eq!(p.output_size(640, 480), (48, 32));
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let err = |json: &str| from_json(json).unwrap_err().to_string();
        assert!(err(r#"{"resample": 4}"#).contains("resample 4"));
        assert!(err(r#"{"size": {"longest_edge": 4}}"#).contains("shortest_edge"));
        assert!(err(r#"{"crop_size": {"height": 4}}"#).contains("crop_size"));
        assert!(err(r#"{"image_mean": [1, 2]}"#).contains("image_mean"));
        assert!(err(r#"{"image_std": [1, 0, 1]}"#).contains("zero"));
        assert!(err(r#"{"size": 0}"#).contains("at least 1"));
        assert!(err("not json").contains("invalid"));
    }

    #[test]
    fn shortest_edge_keeps_the_aspect_ratio_rounding_down() {
        let p = ClipImageProcessor::default();
        assert_eq!(p.resized_size(64, 64), (224, 224));
        // 224 * 72 / 56 = 288
        assert_eq!(p.resized_size(72, 56), (288, 224));
        // 224 * 128 / 96 = 298.67
        assert_eq!(p.resized_size(96, 128), (224, 298));
        assert_eq!(p.resized_size(400, 300), (298, 224));
        assert_eq!(p.output_size(400, 300), (224, 224));
    }

    #[test]
    fn centre_crop_takes_the_middle_and_pads_small_sides() {
        let mut img = RgbImage::new(5, 2);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = Rgb([x as u8 + 1, y as u8 + 1, 9]);
        }
        // width 5 -> 3 from offset 1; height 2 -> 4 padded: one black row above (ceil(2/2) = 1), one below
        let out = center_crop(&img, 3, 4);
        assert_eq!(out.dimensions(), (3, 4));
        assert_eq!(out.get_pixel(0, 0), &Rgb([0, 0, 0]));
        assert_eq!(out.get_pixel(0, 1), &Rgb([2, 1, 9]));
        assert_eq!(out.get_pixel(2, 2), &Rgb([4, 2, 9]));
        assert_eq!(out.get_pixel(1, 3), &Rgb([0, 0, 0]));
        // odd surplus: 4 -> 1 starts at (4 - 1) / 2 = 1
        let out = center_crop(&RgbImage::from_fn(4, 1, |x, _| Rgb([x as u8; 3])), 1, 1);
        assert_eq!(out.get_pixel(0, 0), &Rgb([1; 3]));
    }

    #[test]
    fn pixel_values_are_rescaled_and_normalised_channels_first() {
        let p = ClipImageProcessor::default();
        let img = RgbImage::from_pixel(10, 20, Rgb([255, 0, 128]));
        let t = p.pixel_values(&[img.clone(), img], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 224, 224]);
        let first = t.get(1).unwrap().to_vec3::<f32>().unwrap();
        let expect = |c: usize, value: f32| (value / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        for (c, value) in [255.0, 0.0, 128.0].into_iter().enumerate() {
            assert!((first[c][100][7] - expect(c, value)).abs() < 1e-5);
        }
        let err = p
            .pixel_values(&[RgbImage::new(0, 3)], &Device::Cpu)
            .unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
