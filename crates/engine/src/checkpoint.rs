//! Single-file Stable Diffusion checkpoints, as CivitAI / AUTOMATIC1111 users have them: one `.safetensors`
//! with the original LDM (CompVis / Stability) tensor names, read in place (memory-mapped) and presented to
//! the networks under diffusers / transformers names.
//!
//! A checkpoint holds three parts, each under its own prefix:
//! - `model.diffusion_model.`: the UNet (`time_embed`, `input_blocks.N.M`, `middle_block.N`,
//!   `output_blocks.N.M`, `out`);
//! - `first_stage_model.`: the VAE (`encoder.down.N`, `decoder.up.N` numbered from full resolution, i.e. in
//!   reverse order to diffusers' `up_blocks`, `mid.block_1/attn_1/block_2`, 1×1-conv attention weights);
//! - the text encoder: `cond_stage_model.transformer.` (SD 1.x: Hugging Face CLIP names, with or without
//!   the `text_model.` segment) or `cond_stage_model.model.` (SD 2.x: OpenCLIP names, q/k/v stacked in
//!   `attn.in_proj_*`); SDXL: `conditioner.embedders.0.transformer.` (CLIP ViT-L, Hugging Face names) and
//!   `conditioner.embedders.1.model.` (OpenCLIP ViT-bigG, every layer, `text_projection` stored for `x @ P`,
//!   i.e. transposed), or, in a refiner, `conditioner.embedders.0.model.` alone. An SDXL UNet's add embedding
//!   is `label_emb.0.0` / `label_emb.0.2`.
//!
//! Nothing is copied or converted up front: [`SingleFileCheckpoint`] builds a table from each diffusers name
//! to the LDM tensor it comes from (and how: as is, squeezed from a 1×1 convolution, or one third of
//! OpenCLIP's stacked q/k/v projection), and its [`VarBuilder`]s read through that table on demand.
//!
//! # Architecture
//!
//! Every size comes from the tensors' names and shapes, never from SD 1.5 constants: UNet block channels,
//! layers per block, which blocks have attention, transformer depth, in/out channels (4, 8 for
//! InstructPix2Pix, 9 for inpainting), cross-attention width, linear or 1×1-conv projections; VAE block
//! channels, layers per block, latent channels; text encoder width, depth, MLP width, vocabulary and
//! positions. What the file cannot say is taken from the family's LDM config:
//!
//! | | SD 1.x (HF CLIP text encoder) | SD 2.x (OpenCLIP text encoder) | SDXL (`conditioner.embedders.`) |
//! |---|---|---|---|
//! | UNet attention heads | 8 per block (`num_heads: 8`) | channels / 64 per block (`num_head_channels: 64`) | channels / 64 |
//! | UNet upcast attention | no | yes | no |
//! | text encoder | 12 heads, `quick_gelu` | 16 heads, `gelu`, last resblock dropped (SD 2 uses the penultimate layer) | CLIP-L: 12 heads, `quick_gelu`; bigG: 20 heads, `gelu`, every layer, projection |
//! | tokenizer pad token | `<|endoftext|>` | `!` | `<|endoftext|>` / `!` |
//! | VAE scaling factor | 0.18215 | 0.18215 | 0.13025 |
//! | add embedding time ids | — | — | 256 wide; 6 (base) or 5 (refiner: aesthetic score) from `label_emb`'s width |
//!
//! # Prediction type and scheduler
//!
//! Without a sidecar config, SD 1.x predicts epsilon and gets the `PNDMScheduler` config SD 1.5 ships;
//! SD 2.x predicts v (as SD 2.0-v / 2.1 at 768 px do) and gets the `DDIMScheduler` config of
//! stable-diffusion-2-1. A1111 users keep the LDM config next to a checkpoint as `<name>.yaml`; when that
//! file exists it decides: `parameterization: "v"` (or `'v'`, or bare `v`) means v-prediction, anything
//! else (no such line) means epsilon — so an SD 2 *base* (512 px, epsilon) checkpoint is recognised by its
//! yaml. v-prediction SD 2 uses the DDIM config of stable-diffusion-2-1; every epsilon model uses the PNDM
//! config (what SD 1.5 and stable-diffusion-2-1-base ship), and an SD 1 model whose yaml says v keeps PNDM
//! with `prediction_type: v_prediction`. SDXL gets the `EulerDiscreteScheduler` config
//! stable-diffusion-xl-base-1.0 ships (with v-prediction when its yaml says so).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::json;

use crate::config::{ClipTextConfig, PerBlock, UNetConfig, VaeConfig};
use crate::error::{EngineError, Result};

/// Prefix of the UNet's tensors.
const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the VAE's tensors.
const VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of an SD 1.x (Hugging Face CLIP) text encoder.
const HF_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of an SD 2.x (OpenCLIP) text encoder.
const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// Prefix of SDXL's text encoders (`<n>.transformer.` or `<n>.model.`).
const SDXL_EMBEDDERS: &str = "conditioner.embedders.";

/// The largest header the safetensors format allows (100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

// ---------------------------------------------------------------------------------------------------------
// Header check
// ---------------------------------------------------------------------------------------------------------

/// Bits per element of each safetensors dtype.
fn dtype_bits(dtype: &str) -> Option<u128> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        _ => return None,
    })
}

/// Checks, reading only its header, that `path` is a well-formed and complete safetensors file: the 8-byte
/// header length is plausible, the header is a JSON object, every tensor has a known dtype and a data range
/// that matches its shape, and the ranges tile the data section, which the file holds in full. Any problem
/// is an [`EngineError::InvalidModel`] for `model` naming the file ("not a safetensors file", "truncated",
/// …), so a half-downloaded or mislabelled file never reaches the memory map.
pub fn check_safetensors_header(model: &str, path: &Path) -> Result<()> {
    let fail =
        |message: String| EngineError::model(model, format!("{}: {message}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let size = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
    if size < 8 {
        return Err(fail(format!(
            "not a safetensors file (only {size} bytes; a safetensors file starts with an 8-byte header length)"
        )));
    }
    let mut first = [0u8; 8];
    file.read_exact(&mut first)
        .map_err(|e| EngineError::io(path, e))?;
    if first.starts_with(b"PK\x03\x04") {
        return Err(fail(
            "not a safetensors file (it is a zip archive, like a PyTorch .ckpt/.pt pickle; \
             convert it to .safetensors)"
                .into(),
        ));
    }
    let header_len = u64::from_le_bytes(first);
    if !(2..=MAX_HEADER_BYTES).contains(&header_len) {
        return Err(fail(format!(
            "not a safetensors file (its first 8 bytes give an impossible header length of {header_len} bytes)"
        )));
    }
    if header_len > size - 8 {
        return Err(fail(format!(
            "truncated: its header alone needs {} bytes but the file has only {size}; download it again",
            header_len + 8
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| EngineError::io(path, e))?;
    let text = std::str::from_utf8(&header)
        .map_err(|_| fail("not a safetensors file (its header is not UTF-8 text)".into()))?;
    if !text.trim_start().starts_with('{') {
        return Err(fail(
            "not a safetensors file (its header is not a JSON object)".into(),
        ));
    }
    let entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| {
            fail(format!(
                "not a safetensors file (its header is not valid JSON: {e})"
            ))
        })?;

    let data_len = size - 8 - header_len;
    let mut ranges: Vec<(u64, u64, &str)> = Vec::with_capacity(entries.len());
    for (name, entry) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let malformed = || {
            fail(format!(
                "corrupt safetensors header: bad entry for tensor {name}"
            ))
        };
        let entry = entry.as_object().ok_or_else(malformed)?;
        let dtype = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(malformed)?;
        let bits = dtype_bits(dtype)
            .ok_or_else(|| fail(format!("tensor {name} has unknown dtype {dtype}")))?;
        let shape = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(malformed)?
            .iter()
            .map(|d| d.as_u64())
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(malformed)?;
        let offsets = entry
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .ok_or_else(malformed)?;
        let (begin, end) = match offsets.as_slice() {
            [b, e] => (
                b.as_u64().ok_or_else(malformed)?,
                e.as_u64().ok_or_else(malformed)?,
            ),
            _ => return Err(malformed()),
        };
        if end < begin {
            return Err(malformed());
        }
        let elements = shape
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))
            .ok_or_else(malformed)?;
        if elements * bits % 8 != 0 {
            // (The safetensors reader refuses such a sub-byte tensor, so it must not pass here.)
            return Err(fail(format!(
                "corrupt safetensors header: tensor {name} ({dtype} {shape:?}) does not fill a whole number of bytes"
            )));
        }
        let needed = elements * bits / 8;
        if (end - begin) as u128 != needed {
            return Err(fail(format!(
                "corrupt safetensors header: tensor {name} ({dtype} {shape:?}) needs {needed} bytes but is given {}",
                end - begin
            )));
        }
        if end > data_len {
            return Err(fail(format!(
                "truncated: tensor {name} needs bytes up to {} but the file has {data_len} bytes of tensor \
                 data (file size {size}); download it again",
                end
            )));
        }
        ranges.push((begin, end, name));
    }
    ranges.sort();
    let mut covered = 0u64;
    for (begin, end, name) in &ranges {
        if *begin != covered {
            return Err(fail(format!(
                "corrupt safetensors header: the data of tensor {name} does not start where the previous \
                 tensor's ends (overlap or gap)"
            )));
        }
        covered = *end;
    }
    if covered != data_len {
        return Err(fail(format!(
            "not a well-formed safetensors file: {} bytes after the last tensor's data",
            data_len - covered
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Renaming backend
// ---------------------------------------------------------------------------------------------------------

/// Where one diffusers-named tensor comes from in the checkpoint, and how to get it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// The tensor as stored.
    Plain(String),
    /// A 1×1 convolution kernel `[out, in, 1, 1]` presented as a linear weight `[out, in]`.
    Squeeze(String),
    /// Part `index` (0 = q, 1 = k, 2 = v) of OpenCLIP's stacked `in_proj` along dim 0.
    Third(String, usize),
    /// A matrix stored transposed (OpenCLIP's `text_projection`, applied as `x @ P`).
    Transposed(String),
}

impl Source {
    fn ldm_name(&self) -> &str {
        match self {
            Source::Plain(n) | Source::Squeeze(n) | Source::Third(n, _) | Source::Transposed(n) => {
                n
            }
        }
    }

    /// The presented shape, given the stored one.
    fn shape(&self, stored: &[usize]) -> Vec<usize> {
        match self {
            Source::Plain(_) => stored.to_vec(),
            Source::Squeeze(_) => match stored {
                [o, i, 1, 1] => vec![*o, *i],
                other => other.to_vec(),
            },
            Source::Third(_, _) => {
                let mut s = stored.to_vec();
                if let Some(d) = s.first_mut() {
                    *d /= 3;
                }
                s
            }
            Source::Transposed(_) => stored.iter().rev().copied().collect(),
        }
    }

    fn load(&self, file: &MmapedSafetensors, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Source::Plain(n) => file.load(n, device),
            Source::Squeeze(n) => {
                let t = file.load(n, device)?;
                match t.dims() {
                    &[o, i, 1, 1] => t.reshape((o, i)),
                    _ => Ok(t),
                }
            }
            Source::Third(n, index) => {
                let t = file.load(n, device)?;
                let rows = t.dim(0)?;
                if rows % 3 != 0 {
                    candle_core::bail!("{n}: {rows} rows cannot be split in q, k and v");
                }
                t.narrow(0, index * rows / 3, rows / 3)?.contiguous()
            }
            Source::Transposed(n) => file.load(n, device)?.t()?.contiguous(),
        }
    }
}

/// A candle backend that answers diffusers names from a memory-mapped file with other names.
struct RenamedTensors {
    file: Arc<MmapedSafetensors>,
    names: Arc<HashMap<String, Source>>,
}

impl SimpleBackend for RenamedTensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            let source = self.names.get(name).map(Source::ldm_name).unwrap_or(name);
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name} (stored as {source})"),
                expected: shape,
                got: tensor.shape().clone(),
            }
            .bt())?
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let source = self.names.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        source.load(&self.file, device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }
}

fn renamed_vb(
    file: &Arc<MmapedSafetensors>,
    names: &Arc<HashMap<String, Source>>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = RenamedTensors {
        file: file.clone(),
        names: names.clone(),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// Memory-maps the weight files of a transformers `CLIPTextModel` (a diffusers `text_encoder/` folder)
/// and presents them under the `text_model.`-prefixed names [`crate::models::ClipTextModel`] reads, whether
/// the files were saved with that prefix (transformers 4) or without it (transformers 5). Each file's
/// header is checked first.
pub fn hf_clip_text_vb(
    model: &str,
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    for f in files {
        check_safetensors_header(model, f)?;
    }
    // SAFETY: the files are memory-mapped read-only; like every mmap user we rely on them not being
    // truncated while the model is loaded.
    let st = unsafe { MmapedSafetensors::multi(files) }
        .map_err(|e| EngineError::model(model, format!("cannot read text encoder weights: {e}")))?;
    let mut names = HashMap::new();
    for (name, _) in st.tensors() {
        if name.ends_with("position_ids") {
            continue;
        }
        // `text_projection.weight` (CLIPTextModelWithProjection) sits beside `text_model.`.
        let key = if name.starts_with("text_model.") || name.starts_with("text_projection.") {
            name.clone()
        } else {
            format!("text_model.{name}")
        };
        names.insert(key, Source::Plain(name));
    }
    Ok(renamed_vb(&Arc::new(st), &Arc::new(names), dtype, device))
}

// ---------------------------------------------------------------------------------------------------------
// Name helpers
// ---------------------------------------------------------------------------------------------------------

/// Stored shapes of the tensors under one prefix, keyed by the name with the prefix removed.
type Shapes = BTreeMap<String, Vec<usize>>;

fn under(all: &Shapes, prefix: &str) -> Shapes {
    range_from(all, prefix)
        .map(|(k, v)| (k[prefix.len()..].to_string(), v.clone()))
        .collect()
}

fn range_from<'a>(
    map: &'a Shapes,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a Vec<usize>)> + 'a {
    map.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

fn has_prefix(map: &Shapes, prefix: &str) -> bool {
    range_from(map, prefix).next().is_some()
}

/// The distinct numbers `N` of the names `prefix` + `N.` + ….
fn indices(map: &Shapes, prefix: &str) -> BTreeSet<usize> {
    range_from(map, prefix)
        .filter_map(|(k, _)| k[prefix.len()..].split('.').next()?.parse().ok())
        .collect()
}

/// The shape of tensor `name`, which must have at least `rank` dimensions (the callers index into it).
fn shape<'a>(
    map: &'a Shapes,
    name: &str,
    rank: usize,
    what: &str,
    model: &str,
) -> Result<&'a [usize]> {
    let shape = map.get(name).map(Vec::as_slice).ok_or_else(|| {
        EngineError::model(
            model,
            format!("cannot determine the {what}: tensor {name} is missing from the checkpoint"),
        )
    })?;
    if shape.len() < rank {
        return Err(EngineError::model(
            model,
            format!(
                "cannot determine the {what}: tensor {name} has the shape {shape:?}, not {rank} dimensions"
            ),
        ));
    }
    Ok(shape)
}

/// `[a, b, c]` → `"a.b.c"`, the remainder of a split name.
fn join(parts: &[&str]) -> String {
    parts.join(".")
}

/// One value for every block when they agree, else one per block.
fn per_block(values: Vec<usize>) -> PerBlock {
    match values.first() {
        Some(&v) if values.iter().all(|&x| x == v) => PerBlock::One(v),
        _ => PerBlock::Each(values),
    }
}

// ---------------------------------------------------------------------------------------------------------
// UNet
// ---------------------------------------------------------------------------------------------------------

/// A ResNet block's LDM sub-module → diffusers name.
fn unet_resnet_part(ldm: &[&str]) -> Option<String> {
    let (head, rest) = match ldm {
        ["in_layers", "0", rest @ ..] => ("norm1", rest),
        ["in_layers", "2", rest @ ..] => ("conv1", rest),
        ["emb_layers", "1", rest @ ..] => ("time_emb_proj", rest),
        ["out_layers", "0", rest @ ..] => ("norm2", rest),
        ["out_layers", "3", rest @ ..] => ("conv2", rest),
        ["skip_connection", rest @ ..] => ("conv_shortcut", rest),
        _ => return None,
    };
    Some(format!("{head}.{}", join(rest)))
}

/// What one `input_blocks` slot holds.
#[derive(Debug, Clone, Copy)]
enum InputSlot {
    /// ResNet `index` of down block `block` (with its attention in sub-module 1, if any).
    Resnet { block: usize, index: usize },
    /// The down-sampler closing down block `block`.
    Down { block: usize },
}

/// How the LDM UNet's numbered slots map onto diffusers blocks.
struct UNetLayout {
    input: HashMap<usize, InputSlot>,
    /// `output_blocks` slot → (up block, index within it).
    output: HashMap<usize, (usize, usize)>,
}

impl UNetLayout {
    /// The diffusers name of the UNet tensor `ldm` (prefix removed), or `None` for tensors the UNet does not
    /// use.
    fn diffusers_name(&self, ldm: &str) -> Option<String> {
        let p: Vec<&str> = ldm.split('.').collect();
        let slot = |s: &str| s.parse::<usize>().ok();
        Some(match p.as_slice() {
            ["time_embed", "0", rest @ ..] => format!("time_embedding.linear_1.{}", join(rest)),
            ["time_embed", "2", rest @ ..] => format!("time_embedding.linear_2.{}", join(rest)),
            ["label_emb", "0", "0", rest @ ..] => format!("add_embedding.linear_1.{}", join(rest)),
            ["label_emb", "0", "2", rest @ ..] => format!("add_embedding.linear_2.{}", join(rest)),
            ["out", "0", rest @ ..] => format!("conv_norm_out.{}", join(rest)),
            ["out", "2", rest @ ..] => format!("conv_out.{}", join(rest)),
            ["input_blocks", "0", "0", rest @ ..] => format!("conv_in.{}", join(rest)),
            ["input_blocks", s, m, rest @ ..] => match (self.input.get(&slot(s)?)?, *m) {
                (InputSlot::Resnet { block, index }, "0") => {
                    format!(
                        "down_blocks.{block}.resnets.{index}.{}",
                        unet_resnet_part(rest)?
                    )
                }
                (InputSlot::Resnet { block, index }, "1") => {
                    format!("down_blocks.{block}.attentions.{index}.{}", join(rest))
                }
                (InputSlot::Down { block }, "0") => match rest {
                    ["op", tail @ ..] => {
                        format!("down_blocks.{block}.downsamplers.0.conv.{}", join(tail))
                    }
                    _ => return None,
                },
                _ => return None,
            },
            ["middle_block", "0", rest @ ..] => {
                format!("mid_block.resnets.0.{}", unet_resnet_part(rest)?)
            }
            ["middle_block", "1", rest @ ..] => format!("mid_block.attentions.0.{}", join(rest)),
            ["middle_block", "2", rest @ ..] => {
                format!("mid_block.resnets.1.{}", unet_resnet_part(rest)?)
            }
            ["output_blocks", s, m, rest @ ..] => {
                let (block, index) = *self.output.get(&slot(s)?)?;
                match (*m, rest) {
                    ("0", _) => format!(
                        "up_blocks.{block}.resnets.{index}.{}",
                        unet_resnet_part(rest)?
                    ),
                    ("1" | "2", ["conv", tail @ ..]) => {
                        format!("up_blocks.{block}.upsamplers.0.conv.{}", join(tail))
                    }
                    ("1", _) => format!("up_blocks.{block}.attentions.{index}.{}", join(rest)),
                    _ => return None,
                }
            }
            _ => return None,
        })
    }
}

/// The LDM (SGM) path of a diffusers UNet module (`down_blocks.1.attentions.0.proj_in` →
/// `input_blocks.4.1.proj_in` in SDXL), laid out by `config`: how kohya's SDXL LoRAs name modules. `None`
/// for a path the layout does not have.
pub fn ldm_unet_module(module: &str, config: &UNetConfig) -> Option<String> {
    let n = config.block_out_channels.len();
    let layers = config.layers_per_block.expand(n);
    let p: Vec<&str> = module.split('.').collect();
    let num = |s: &str| s.parse::<usize>().ok();
    let resnet = |rest: &[&str]| -> Option<String> {
        let (head, tail) = rest.split_first()?;
        let ldm = match *head {
            "norm1" => "in_layers.0",
            "conv1" => "in_layers.2",
            "time_emb_proj" => "emb_layers.1",
            "norm2" => "out_layers.0",
            "conv2" => "out_layers.3",
            "conv_shortcut" => "skip_connection",
            _ => return None,
        };
        Some(join(&[ldm, &join(tail)]))
    };
    // First input slot of down block i: conv_in, then each earlier block's ResNets and down-sampler.
    let down_slot = |i: usize| 1 + (0..i).map(|k| layers[k] + 1).sum::<usize>();
    // First output slot of up block i: each earlier up block's ResNets (one more than its down block).
    let up_slot = |i: usize| (0..i).map(|k| layers[n - 1 - k] + 1).sum::<usize>();
    let name = match p.as_slice() {
        ["conv_in", rest @ ..] => join(&["input_blocks.0.0", &join(rest)]),
        ["time_embedding", "linear_1", rest @ ..] => join(&["time_embed.0", &join(rest)]),
        ["time_embedding", "linear_2", rest @ ..] => join(&["time_embed.2", &join(rest)]),
        ["add_embedding", "linear_1", rest @ ..] => join(&["label_emb.0.0", &join(rest)]),
        ["add_embedding", "linear_2", rest @ ..] => join(&["label_emb.0.2", &join(rest)]),
        ["conv_norm_out", rest @ ..] => join(&["out.0", &join(rest)]),
        ["conv_out", rest @ ..] => join(&["out.2", &join(rest)]),
        ["down_blocks", i, kind, j, rest @ ..] => {
            let (i, j) = (num(i)?, num(j)?);
            if i >= n {
                return None;
            }
            let slot = down_slot(i);
            match *kind {
                "resnets" => format!("input_blocks.{}.0.{}", slot + j, resnet(rest)?),
                "attentions" => join(&[&format!("input_blocks.{}.1", slot + j), &join(rest)]),
                "downsamplers" => match rest {
                    ["conv", tail @ ..] => join(&[
                        &format!("input_blocks.{}.0.op", slot + layers[i]),
                        &join(tail),
                    ]),
                    _ => return None,
                },
                _ => return None,
            }
        }
        ["mid_block", "resnets", j, rest @ ..] => {
            format!("middle_block.{}.{}", 2 * num(j)?, resnet(rest)?)
        }
        ["mid_block", "attentions", "0", rest @ ..] => join(&["middle_block.1", &join(rest)]),
        ["up_blocks", i, kind, j, rest @ ..] => {
            let (i, j) = (num(i)?, num(j)?);
            if i >= n {
                return None;
            }
            let slot = up_slot(i);
            match *kind {
                "resnets" => format!("output_blocks.{}.0.{}", slot + j, resnet(rest)?),
                "attentions" => join(&[&format!("output_blocks.{}.1", slot + j), &join(rest)]),
                "upsamplers" => match rest {
                    ["conv", tail @ ..] => {
                        let cross = config.up_block_types[i] == "CrossAttnUpBlock2D";
                        join(&[
                            &format!(
                                "output_blocks.{}.{}.conv",
                                slot + layers[n - 1 - i],
                                if cross { 2 } else { 1 }
                            ),
                            &join(tail),
                        ])
                    }
                    _ => return None,
                },
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(name.trim_end_matches('.').to_string())
}

/// Infers the UNet config and its name table from the tensors under `model.diffusion_model.`.
fn infer_unet(
    all: &Shapes,
    family: Family,
    v_prediction: bool,
    text_hidden: usize,
    projection: Option<usize>,
    model: &str,
) -> Result<(UNetConfig, HashMap<String, Source>)> {
    let u = under(all, UNET_PREFIX);
    let bad = |message: String| EngineError::model(model, format!("unet: {message}"));
    let conv_in = shape(
        &u,
        "input_blocks.0.0.weight",
        4,
        "UNet input channels",
        model,
    )?;
    let conv_out = shape(&u, "out.2.weight", 4, "UNet output channels", model)?;
    if conv_in.len() != 4 || conv_out.len() != 4 {
        return Err(bad("conv_in / conv_out are not convolutions".into()));
    }

    // Walk input_blocks: ResNet slots (with optional attention) grouped into blocks by the down-samplers.
    #[derive(Default)]
    struct Down {
        channels: usize,
        resnets: usize,
        attention: bool,
        depth: Option<usize>,
    }
    let mut input = HashMap::new();
    let mut blocks = vec![Down::default()];
    let last_input = indices(&u, "input_blocks.").into_iter().max().unwrap_or(0);
    for s in 1..=last_input {
        let cur = blocks.len() - 1;
        if has_prefix(&u, &format!("input_blocks.{s}.0.op.")) {
            if blocks[cur].resnets == 0 {
                return Err(bad(format!(
                    "input_blocks.{s} down-samples a block without ResNets"
                )));
            }
            input.insert(s, InputSlot::Down { block: cur });
            blocks.push(Down::default());
        } else if has_prefix(&u, &format!("input_blocks.{s}.0.in_layers.")) {
            let block = &mut blocks[cur];
            if block.resnets == 0 {
                let w = format!("input_blocks.{s}.0.in_layers.2.weight");
                block.channels = shape(&u, &w, 4, "UNet block channels", model)?[0];
            }
            input.insert(
                s,
                InputSlot::Resnet {
                    block: cur,
                    index: block.resnets,
                },
            );
            block.resnets += 1;
            let attn = format!("input_blocks.{s}.1.");
            if has_prefix(&u, &attn) {
                block.attention = true;
                let depth = indices(&u, &format!("{attn}transformer_blocks.")).len();
                block.depth.get_or_insert(depth);
            }
        } else {
            return Err(bad(format!(
                "input_blocks.{s} is neither a ResNet block nor a down-sampler"
            )));
        }
    }
    let n = blocks.len();
    if blocks[n - 1].resnets == 0 {
        return Err(bad("the last down block has no ResNets".into()));
    }
    let channels: Vec<usize> = blocks.iter().map(|b| b.channels).collect();
    let layers: Vec<usize> = blocks.iter().map(|b| b.resnets).collect();

    // Up blocks mirror the down blocks, each with one more ResNet.
    let mut output = HashMap::new();
    let mut up_attention = vec![false; n];
    let mut slot = 0;
    for (i, has_attention) in up_attention.iter_mut().enumerate() {
        for j in 0..=layers[n - 1 - i] {
            if !has_prefix(&u, &format!("output_blocks.{slot}.0.in_layers.")) {
                return Err(bad(format!(
                    "output_blocks.{slot} is missing: expected {} up-block ResNets",
                    layers.iter().map(|l| l + 1).sum::<usize>()
                )));
            }
            *has_attention |= has_prefix(&u, &format!("output_blocks.{slot}.1.proj_in."));
            output.insert(slot, (i, j));
            slot += 1;
        }
    }
    if has_prefix(&u, &format!("output_blocks.{slot}.")) {
        return Err(bad(format!(
            "output_blocks.{slot} is more than the {slot} up-block ResNets the down blocks imply"
        )));
    }

    let mid = has_prefix(&u, "middle_block.");
    let mid_depth = indices(&u, "middle_block.1.transformer_blocks.").len();
    let mut depth: Vec<usize> = blocks.iter().map(|b| b.depth.unwrap_or(1)).collect();
    if mid && blocks[n - 1].depth.is_none() && mid_depth > 0 {
        // diffusers' mid block uses the last block's transformer depth.
        depth[n - 1] = mid_depth;
    }

    let find = |suffix: &str| u.iter().find(|(k, _)| k.ends_with(suffix)).map(|(_, s)| s);
    let cross_attention_dim = match u.iter().find(|(k, _)| k.ends_with(".attn2.to_k.weight")) {
        None => text_hidden,
        Some((_, s)) if s.len() == 2 => s[1],
        Some((k, s)) => {
            return Err(bad(format!(
                "the cross-attention key projection {k} has the shape {s:?}, not a matrix"
            )))
        }
    };
    let use_linear_projection = find(".proj_in.weight").is_some_and(|s| s.len() == 2);
    let heads = match family {
        Family::Sd1 => PerBlock::One(8),
        Family::Sd2 | Family::Sdxl => per_block(channels.iter().map(|c| (c / 64).max(1)).collect()),
    };
    // SDXL's add embedding: the pooled projection and 6 (base) or 5 (refiner) time ids, 256 wide in every
    // released model; the width that divides what is left decides for others.
    let (addition_time_embed_dim, projection_class_embeddings_input_dim) =
        match u.get("label_emb.0.0.weight") {
            Some(s) if s.len() == 2 => {
                let rest = s[1].saturating_sub(projection.unwrap_or(0));
                let time = if rest == 6 * 256 || rest == 5 * 256 {
                    256
                } else if rest % 6 == 0 && rest > 0 {
                    rest / 6
                } else if rest % 5 == 0 && rest > 0 {
                    rest / 5
                } else {
                    return Err(bad(format!(
                    "label_emb reads {} values: not a text projection of {} plus 5 or 6 time ids",
                    s[1],
                    projection.unwrap_or(0)
                )));
                };
                (Some(time), Some(s[1]))
            }
            _ => (None, None),
        };

    let config = UNetConfig {
        in_channels: conv_in[1],
        out_channels: conv_out[0],
        block_out_channels: channels,
        down_block_types: blocks
            .iter()
            .map(|b| {
                if b.attention {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
                .to_string()
            })
            .collect(),
        up_block_types: up_attention
            .iter()
            .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string())
            .collect(),
        mid_block_type: mid.then(|| "UNetMidBlock2DCrossAttn".to_string()),
        layers_per_block: per_block(layers),
        attention_head_dim: heads,
        num_attention_heads: None,
        transformer_layers_per_block: per_block(depth),
        cross_attention_dim,
        use_linear_projection,
        upcast_attention: family == Family::Sd2,
        norm_num_groups: 32,
        norm_eps: 1e-5,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        downsample_padding: 1,
        act_fn: "silu".into(),
        conv_in_kernel: conv_in[2],
        conv_out_kernel: conv_out[2],
        sample_size: Some(match family {
            Family::Sdxl => 128,
            Family::Sd2 if v_prediction => 96,
            _ => 64,
        }),
        center_input_sample: false,
        only_cross_attention: false,
        resnet_time_scale_shift: Some("default".into()),
        addition_embed_type: addition_time_embed_dim.map(|_| "text_time".to_string()),
        addition_time_embed_dim,
        projection_class_embeddings_input_dim,
        class_embed_type: None,
    };

    let layout = UNetLayout { input, output };
    let mut names = HashMap::new();
    let mut unused = Vec::new();
    for ldm in u.keys() {
        match layout.diffusers_name(ldm) {
            Some(name) => {
                names.insert(name, Source::Plain(format!("{UNET_PREFIX}{ldm}")));
            }
            None => unused.push(ldm.as_str()),
        }
    }
    if !unused.is_empty() {
        tracing::debug!(
            model,
            ?unused,
            "UNet tensors the diffusers UNet does not use"
        );
    }
    Ok((config, names))
}

// ---------------------------------------------------------------------------------------------------------
// VAE
// ---------------------------------------------------------------------------------------------------------

/// A VAE ResNet block's LDM sub-module → diffusers name.
fn vae_resnet_part(ldm: &[&str]) -> String {
    match ldm {
        ["nin_shortcut", rest @ ..] => format!("conv_shortcut.{}", join(rest)),
        other => join(other),
    }
}

/// The diffusers name (and source kind) of the VAE tensor `ldm` (prefix removed); `levels` is the number of
/// decoder levels, whose LDM numbering runs opposite to diffusers'.
fn vae_name(ldm: &str, levels: usize) -> Option<(String, bool)> {
    let p: Vec<&str> = ldm.split('.').collect();
    let up = |k: &str| -> Option<usize> { levels.checked_sub(1 + k.parse::<usize>().ok()?) };
    let (part, rest) = match p.as_slice() {
        ["quant_conv" | "post_quant_conv", ..] => return Some((ldm.to_string(), false)),
        [part @ ("encoder" | "decoder"), rest @ ..] => (*part, rest),
        _ => return None,
    };
    let (name, squeeze) = match rest {
        ["conv_in" | "conv_out", ..] => (join(rest), false),
        ["norm_out", tail @ ..] => (format!("conv_norm_out.{}", join(tail)), false),
        ["down", i, "block", j, tail @ ..] => (
            format!("down_blocks.{i}.resnets.{j}.{}", vae_resnet_part(tail)),
            false,
        ),
        ["down", i, "downsample", "conv", tail @ ..] => (
            format!("down_blocks.{i}.downsamplers.0.conv.{}", join(tail)),
            false,
        ),
        ["up", k, "block", j, tail @ ..] => (
            format!("up_blocks.{}.resnets.{j}.{}", up(k)?, vae_resnet_part(tail)),
            false,
        ),
        ["up", k, "upsample", "conv", tail @ ..] => (
            format!("up_blocks.{}.upsamplers.0.conv.{}", up(k)?, join(tail)),
            false,
        ),
        ["mid", "block_1", tail @ ..] => (
            format!("mid_block.resnets.0.{}", vae_resnet_part(tail)),
            false,
        ),
        ["mid", "block_2", tail @ ..] => (
            format!("mid_block.resnets.1.{}", vae_resnet_part(tail)),
            false,
        ),
        ["mid", "attn_1", which, tail @ ..] => {
            let target = match *which {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            let squeeze = target != "group_norm" && tail == ["weight"];
            (
                format!("mid_block.attentions.0.{target}.{}", join(tail)),
                squeeze,
            )
        }
        _ => return None,
    };
    Some((format!("{part}.{name}"), squeeze))
}

/// Infers the VAE config and its name table from the LDM-named tensors under `prefix`
/// (`first_stage_model.` in a checkpoint, nothing in a standalone VAE file).
fn infer_vae(
    all: &Shapes,
    prefix: &str,
    model: &str,
) -> Result<(VaeConfig, HashMap<String, Source>)> {
    let v = under(all, prefix);
    let levels = indices(&v, "encoder.down.").len();
    let decoder_levels = indices(&v, "decoder.up.").len();
    if levels == 0 || levels != decoder_levels {
        return Err(EngineError::model(
            model,
            format!(
                "vae: the encoder has {levels} levels and the decoder {decoder_levels}; expected the same, \
                 at least one"
            ),
        ));
    }
    let channels = (0..levels)
        .map(|i| {
            let w = format!("encoder.down.{i}.block.0.conv1.weight");
            Ok(shape(&v, &w, 4, "VAE block channels", model)?[0])
        })
        .collect::<Result<Vec<_>>>()?;
    let layers = indices(&v, "encoder.down.0.block.").len();
    let conv_in = shape(&v, "encoder.conv_in.weight", 4, "VAE input channels", model)?;
    let conv_out = shape(
        &v,
        "decoder.conv_out.weight",
        4,
        "VAE output channels",
        model,
    )?;
    let latent = shape(
        &v,
        "decoder.conv_in.weight",
        4,
        "VAE latent channels",
        model,
    )?;
    let config = VaeConfig {
        in_channels: conv_in[1],
        out_channels: conv_out[0],
        block_out_channels: channels,
        layers_per_block: layers,
        latent_channels: latent[1],
        norm_num_groups: 32,
        scaling_factor: 0.18215,
        shift_factor: None,
        use_quant_conv: v.contains_key("quant_conv.weight"),
        use_post_quant_conv: v.contains_key("post_quant_conv.weight"),
        force_upcast: true,
        mid_block_add_attention: has_prefix(&v, "encoder.mid.attn_1."),
        act_fn: "silu".into(),
    };
    let mut names = HashMap::new();
    let mut unused = Vec::new();
    for ldm in v.keys() {
        match vae_name(ldm, levels) {
            Some((name, squeeze)) => {
                let full = format!("{prefix}{ldm}");
                let source = if squeeze {
                    Source::Squeeze(full)
                } else {
                    Source::Plain(full)
                };
                names.insert(name, source);
            }
            None => unused.push(ldm.as_str()),
        }
    }
    if !unused.is_empty() {
        tracing::debug!(model, ?unused, "VAE tensors the diffusers VAE does not use");
    }
    Ok((config, names))
}

/// Infers the config of a VAE stored under diffusers names (`encoder.down_blocks.N…`) and presents its
/// tensors as they are (attention projections stored as 1×1 convolutions are squeezed).
fn infer_diffusers_vae(v: &Shapes, model: &str) -> Result<(VaeConfig, HashMap<String, Source>)> {
    let levels = indices(v, "encoder.down_blocks.").len();
    let channels = (0..levels)
        .map(|i| {
            let w = format!("encoder.down_blocks.{i}.resnets.0.conv1.weight");
            Ok(shape(v, &w, 4, "VAE block channels", model)?[0])
        })
        .collect::<Result<Vec<_>>>()?;
    let conv_in = shape(v, "encoder.conv_in.weight", 4, "VAE input channels", model)?;
    let conv_out = shape(
        v,
        "decoder.conv_out.weight",
        4,
        "VAE output channels",
        model,
    )?;
    let latent = shape(v, "decoder.conv_in.weight", 4, "VAE latent channels", model)?;
    let config = VaeConfig {
        in_channels: conv_in[1],
        out_channels: conv_out[0],
        block_out_channels: channels,
        layers_per_block: indices(v, "encoder.down_blocks.0.resnets.").len(),
        latent_channels: latent[1],
        norm_num_groups: 32,
        scaling_factor: 0.18215,
        shift_factor: None,
        use_quant_conv: v.contains_key("quant_conv.weight"),
        use_post_quant_conv: v.contains_key("post_quant_conv.weight"),
        force_upcast: true,
        mid_block_add_attention: has_prefix(v, "encoder.mid_block.attentions.0."),
        act_fn: "silu".into(),
    };
    let names = v
        .keys()
        .map(|k| {
            let projection = [
                ".to_q.weight",
                ".to_k.weight",
                ".to_v.weight",
                ".to_out.0.weight",
            ]
            .iter()
            .any(|p| k.ends_with(p));
            let source = if projection {
                Source::Squeeze(k.clone())
            } else {
                Source::Plain(k.clone())
            };
            (k.clone(), source)
        })
        .collect();
    Ok((config, names))
}

/// Checks the header of the `.safetensors` file at `path`, memory-maps it and lists its tensors' shapes.
/// `model` names it in errors.
fn map_file(path: &Path, model: &str) -> Result<(MmapedSafetensors, Shapes)> {
    check_safetensors_header(model, path)?;
    // SAFETY: the file is memory-mapped read-only; like every mmap user we rely on it not being
    // truncated while it is in use.
    let file = unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| EngineError::model(model, format!("cannot read {}: {e}", path.display())))?;
    let shapes: Shapes = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    Ok((file, shapes))
}

/// A VAE in one `.safetensors` file, as A1111 users keep them in `models/VAE/` (e.g.
/// `vae-ft-mse-840000-ema-pruned.safetensors`): original LDM names with or without the
/// `first_stage_model.` prefix (so a whole checkpoint works too), or diffusers names. The architecture is
/// inferred from the tensors; the scaling factor is SD's 0.18215.
pub struct VaeFile {
    /// The VAE's architecture.
    pub config: VaeConfig,
    file: Arc<MmapedSafetensors>,
    names: Arc<HashMap<String, Source>>,
}

impl VaeFile {
    /// Checks and memory-maps `path` and works out its naming and architecture. `name` names it in errors.
    pub fn open(path: &Path, name: &str) -> Result<Self> {
        let (file, shapes) = map_file(path, name)?;
        let (config, names) = if has_prefix(&shapes, &format!("{VAE_PREFIX}encoder.down.")) {
            infer_vae(&shapes, VAE_PREFIX, name)?
        } else if has_prefix(&shapes, "encoder.down.") {
            infer_vae(&shapes, "", name)?
        } else if has_prefix(&shapes, "encoder.down_blocks.") {
            infer_diffusers_vae(&shapes, name)?
        } else {
            return Err(EngineError::model(
                name,
                format!(
                    "{} holds no VAE (looked for LDM encoder.down.* or diffusers encoder.down_blocks.* tensors)",
                    path.display()
                ),
            ));
        };
        Ok(VaeFile {
            config,
            file: Arc::new(file),
            names: Arc::new(names),
        })
    }

    /// The VAE's weights under diffusers names, read on demand.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        renamed_vb(&self.file, &self.names, dtype, device)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Text encoder
// ---------------------------------------------------------------------------------------------------------

/// Hugging Face CLIP names under `prefix` (SD 1.x: `cond_stage_model.transformer.`; SDXL's CLIP-L), with or
/// without `text_model.`.
fn hf_clip_names(all: &Shapes, prefix: &str) -> HashMap<String, Source> {
    let mut names = HashMap::new();
    for (full, _) in range_from(all, prefix) {
        let rest = &full[prefix.len()..];
        let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
        if rest.ends_with("position_ids") {
            continue; // a buffer, not a weight
        }
        names.insert(format!("text_model.{rest}"), Source::Plain(full.clone()));
    }
    names
}

/// OpenCLIP names under `prefix`: SD 2.x (`cond_stage_model.model.`) uses all resblocks but the last and no
/// projection; SDXL's ViT-bigG (`sdxl`) every resblock and the text projection.
fn open_clip_names(
    all: &Shapes,
    prefix: &str,
    sdxl: bool,
    model: &str,
) -> Result<HashMap<String, Source>> {
    let resblocks = indices(all, &format!("{prefix}transformer.resblocks.")).len();
    if resblocks < 2 && !sdxl {
        return Err(EngineError::model(
            model,
            format!(
                "text encoder: the OpenCLIP text tower has {resblocks} layers; SD 2 uses the penultimate one, \
                 so it needs at least 2"
            ),
        ));
    }
    let keep = if sdxl { resblocks } else { resblocks - 1 };
    let mut names = HashMap::new();
    for (full, _) in range_from(all, prefix) {
        let p: Vec<&str> = full[prefix.len()..].split('.').collect();
        let plain = |name: String| vec![(name, Source::Plain(full.clone()))];
        let entries = match p.as_slice() {
            ["token_embedding", "weight"] => {
                plain("text_model.embeddings.token_embedding.weight".into())
            }
            ["positional_embedding"] => {
                plain("text_model.embeddings.position_embedding.weight".into())
            }
            ["ln_final", wb] => plain(format!("text_model.final_layer_norm.{wb}")),
            ["text_projection"] if sdxl => vec![(
                "text_projection.weight".to_string(),
                Source::Transposed(full.clone()),
            )],
            ["transformer", "resblocks", n, rest @ ..] => {
                if n.parse::<usize>().map_or(true, |n| n >= keep) {
                    continue;
                }
                let layer = format!("text_model.encoder.layers.{n}");
                match rest {
                    ["ln_1", wb] => plain(format!("{layer}.layer_norm1.{wb}")),
                    ["ln_2", wb] => plain(format!("{layer}.layer_norm2.{wb}")),
                    ["attn", "out_proj", wb] => plain(format!("{layer}.self_attn.out_proj.{wb}")),
                    ["mlp", "c_fc", wb] => plain(format!("{layer}.mlp.fc1.{wb}")),
                    ["mlp", "c_proj", wb] => plain(format!("{layer}.mlp.fc2.{wb}")),
                    ["attn", in_proj] => {
                        let wb = match *in_proj {
                            "in_proj_weight" => "weight",
                            "in_proj_bias" => "bias",
                            _ => continue,
                        };
                        ["q", "k", "v"]
                            .iter()
                            .enumerate()
                            .map(|(i, x)| {
                                (
                                    format!("{layer}.self_attn.{x}_proj.{wb}"),
                                    Source::Third(full.clone(), i),
                                )
                            })
                            .collect()
                    }
                    _ => continue,
                }
            }
            _ => continue, // logit_scale, attn_mask (and SD 2's text_projection): not used
        };
        names.extend(entries);
    }
    Ok(names)
}

/// Infers the text encoder config from the (already renamed) tensors; `heads` and the activation are what the
/// file cannot say (see the module docs).
fn infer_text(
    all: &Shapes,
    names: &HashMap<String, Source>,
    (heads, act): (usize, &str),
    model: &str,
) -> Result<ClipTextConfig> {
    let presented = |name: &str, what: &str| -> Result<Vec<usize>> {
        let source = names.get(name).ok_or_else(|| {
            EngineError::model(
                model,
                format!("cannot determine the {what}: the text encoder has no {name}"),
            )
        })?;
        Ok(source.shape(shape(all, source.ldm_name(), 2, what, model)?))
    };
    let token = presented(
        "text_model.embeddings.token_embedding.weight",
        "text encoder width",
    )?;
    let positions = presented(
        "text_model.embeddings.position_embedding.weight",
        "text encoder positions",
    )?;
    let fc1 = presented(
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "text encoder MLP width",
    )?;
    let layers = names
        .keys()
        .filter_map(|k| {
            k.strip_prefix("text_model.encoder.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .collect::<BTreeSet<_>>()
        .len();
    let projection_dim = match names.get("text_projection.weight") {
        Some(source) => {
            Some(source.shape(shape(all, source.ldm_name(), 2, "text projection", model)?)[0])
        }
        None => None,
    };
    Ok(ClipTextConfig {
        vocab_size: token[0],
        hidden_size: token[1],
        intermediate_size: fc1[0],
        num_hidden_layers: layers,
        num_attention_heads: heads,
        max_position_embeddings: positions[0],
        hidden_act: act.into(),
        layer_norm_eps: 1e-5,
        pad_token_id: 1,
        eos_token_id: 49407,
        projection_dim,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Scheduler
// ---------------------------------------------------------------------------------------------------------

/// One text encoder of a checkpoint: its config, its name table and its tokenizer's pad token.
type TextPart = (ClipTextConfig, HashMap<String, Source>, &'static str);

/// The text encoders of a checkpoint in concatenation order (SD 1/2: one; SDXL: CLIP-L and ViT-bigG, or
/// bigG alone in a refiner), each with the head count and activation the family's configs give it.
fn text_encoders(all: &Shapes, family: Family, model: &str) -> Result<Vec<TextPart>> {
    const CLIP_L: (usize, &str) = (12, "quick_gelu");
    const EOT: &str = "<|endoftext|>";
    let part = |names: HashMap<String, Source>, kind, pad| -> Result<TextPart> {
        Ok((infer_text(all, &names, kind, model)?, names, pad))
    };
    match family {
        Family::Sd1 => Ok(vec![part(hf_clip_names(all, HF_CLIP_PREFIX), CLIP_L, EOT)?]),
        Family::Sd2 => Ok(vec![part(
            open_clip_names(all, OPEN_CLIP_PREFIX, false, model)?,
            (16, "gelu"),
            "!",
        )?]),
        Family::Sdxl => {
            let mut parts = Vec::new();
            for i in indices(all, SDXL_EMBEDDERS) {
                let hf = format!("{SDXL_EMBEDDERS}{i}.transformer.");
                let open = format!("{SDXL_EMBEDDERS}{i}.model.");
                if has_prefix(all, &hf) {
                    parts.push(part(hf_clip_names(all, &hf), CLIP_L, EOT)?);
                } else if has_prefix(all, &open) {
                    parts.push(part(
                        open_clip_names(all, &open, true, model)?,
                        (20, "gelu"),
                        "!",
                    )?);
                } else {
                    return Err(EngineError::model(
                        model,
                        format!(
                            "{SDXL_EMBEDDERS}{i} is neither a CLIP ({hf}*) nor an OpenCLIP ({open}*) text encoder"
                        ),
                    ));
                }
            }
            let projected = parts
                .last()
                .is_some_and(|(c, _, _)| c.projection_dim.is_some());
            if !(1..=2).contains(&parts.len()) || !projected {
                return Err(EngineError::model(
                    model,
                    format!(
                        "an SDXL checkpoint has one or two text encoders, the last an OpenCLIP ViT-bigG with its \
                         text_projection; this one has {} ({})",
                        parts.len(),
                        if projected { "projection found" } else { "no projection" }
                    ),
                ));
            }
            Ok(parts)
        }
    }
}

/// Whether an LDM yaml config says `parameterization: "v"`.
fn yaml_says_v(yaml: &str) -> bool {
    yaml.lines().any(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        line.strip_prefix("parameterization:")
            .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'') == "v")
            .unwrap_or(false)
    })
}

/// The LDM config A1111 keeps next to a checkpoint: `<name>.yaml` (or `.yml`).
fn sidecar_yaml(path: &Path) -> Option<PathBuf> {
    ["yaml", "yml"]
        .iter()
        .map(|ext| path.with_extension(ext))
        .find(|p| p.is_file())
}

/// The scheduler config diffusers ships for the family and prediction type (see the module docs).
fn scheduler_config(family: Family, v_prediction: bool) -> serde_json::Value {
    let prediction = if v_prediction {
        "v_prediction"
    } else {
        "epsilon"
    };
    if family == Family::Sdxl {
        return json!({
            "_class_name": "EulerDiscreteScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": prediction,
            "sample_max_value": 1.0,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": null,
            "use_karras_sigmas": false
        });
    }
    if family == Family::Sd2 && v_prediction {
        json!({
            "_class_name": "DDIMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "num_train_timesteps": 1000,
            "prediction_type": prediction,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": null
        })
    } else {
        json!({
            "_class_name": "PNDMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "num_train_timesteps": 1000,
            "prediction_type": prediction,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "trained_betas": null
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// The checkpoint
// ---------------------------------------------------------------------------------------------------------

/// Which Stable Diffusion generation a checkpoint belongs to, from its text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: OpenAI CLIP ViT-L text encoder (`cond_stage_model.transformer.`).
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder (`cond_stage_model.model.`).
    Sd2,
    /// SDXL: CLIP ViT-L and OpenCLIP ViT-bigG (`conditioner.embedders.`), or bigG alone (refiner).
    Sdxl,
}

/// One of the three networks in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The UNet (`model.diffusion_model.`).
    Unet,
    /// The VAE (`first_stage_model.`).
    Vae,
    /// The (first) text encoder (`cond_stage_model.`; SDXL: `conditioner.embedders.0.`).
    TextEncoder,
    /// SDXL base: the second text encoder (`conditioner.embedders.1.`).
    TextEncoder2,
}

/// A memory-mapped single-file checkpoint with the configs inferred from it and the diffusers names of its
/// tensors. Opening it reads only the header; weights are read when a network is built.
pub struct SingleFileCheckpoint {
    /// SD 1.x, SD 2.x or SDXL.
    pub family: Family,
    /// The UNet's architecture, from the tensor shapes.
    pub unet: UNetConfig,
    /// The VAE's architecture, from the tensor shapes.
    pub vae: VaeConfig,
    /// The (first) text encoder's architecture, from the tensor shapes (an SDXL refiner's only one is ViT-bigG).
    pub text: ClipTextConfig,
    /// SDXL base: the second text encoder (ViT-bigG with its projection).
    pub text_2: Option<ClipTextConfig>,
    /// A diffusers `scheduler_config.json` for the model (with `_class_name`), see the module docs.
    pub scheduler_config: serde_json::Value,
    /// The (first) tokenizer's pad token: `<|endoftext|>` (SD 1, SDXL's CLIP-L) or `!` (OpenCLIP).
    pub pad_token: &'static str,
    /// The file.
    pub path: PathBuf,
    model: String,
    file: Arc<MmapedSafetensors>,
    unet_names: Arc<HashMap<String, Source>>,
    vae_names: Arc<HashMap<String, Source>>,
    text_names: Arc<HashMap<String, Source>>,
    text_2_names: Arc<HashMap<String, Source>>,
}

impl std::fmt::Debug for SingleFileCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFileCheckpoint")
            .field("model", &self.model)
            .field("path", &self.path)
            .field("family", &self.family)
            .field("unet", &self.unet)
            .field("vae", &self.vae)
            .field("text", &self.text)
            .field("text_2", &self.text_2)
            .field("scheduler_config", &self.scheduler_config)
            .finish_non_exhaustive()
    }
}

impl SingleFileCheckpoint {
    /// Checks the file's header, memory-maps it and infers everything the model needs from its tensor
    /// names and shapes (and the sidecar `<name>.yaml`, if any). Refuses files without a UNet, VAE or text
    /// encoder, naming what is missing. `model` names the model in errors.
    pub fn open(path: &Path, model: &str) -> Result<Self> {
        let (file, shapes) = map_file(path, model)?;

        let family = if has_prefix(&shapes, SDXL_EMBEDDERS) {
            Some(Family::Sdxl)
        } else if has_prefix(&shapes, OPEN_CLIP_PREFIX) {
            Some(Family::Sd2)
        } else if has_prefix(&shapes, HF_CLIP_PREFIX) {
            Some(Family::Sd1)
        } else {
            None
        };
        let mut missing = Vec::new();
        if !has_prefix(&shapes, UNET_PREFIX) {
            missing.push(format!("UNet ({UNET_PREFIX}*)"));
        }
        if !has_prefix(&shapes, VAE_PREFIX) {
            missing.push(format!("VAE ({VAE_PREFIX}*)"));
        }
        if family.is_none() {
            missing.push(format!(
                "text encoder ({HF_CLIP_PREFIX}*, {OPEN_CLIP_PREFIX}* or {SDXL_EMBEDDERS}*)"
            ));
        }
        let family = match family {
            Some(f) if missing.is_empty() => f,
            _ => {
                let mut message = format!(
                    "{} is not a complete Stable Diffusion 1.x/2.x/XL checkpoint: it has no {}",
                    path.display(),
                    missing.join(", no ")
                );
                if missing.len() == 3 {
                    message.push_str(
                        " (single-file checkpoints use the original LDM tensor names; a diffusers model is a \
                         folder with model_index.json)",
                    );
                } else if !has_prefix(&shapes, VAE_PREFIX) {
                    message.push_str(" (checkpoints saved without their VAE cannot be loaded yet)");
                }
                return Err(EngineError::model(model, message));
            }
        };

        let yaml = sidecar_yaml(path);
        let v_prediction = match &yaml {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| EngineError::io(p, e))?;
                yaml_says_v(&text)
            }
            None => family == Family::Sd2,
        };
        tracing::debug!(
            model,
            ?family,
            ?yaml,
            v_prediction,
            "single-file checkpoint"
        );

        let mut texts = text_encoders(&shapes, family, model)?;
        for (config, _, _) in &texts {
            config
                .validate()
                .map_err(|e| EngineError::model(model, format!("text encoder: {e}")))?;
        }
        let width: usize = texts.iter().map(|(c, _, _)| c.hidden_size).sum();
        let projection = texts.last().and_then(|(c, _, _)| c.projection_dim);
        let (unet, unet_names) =
            infer_unet(&shapes, family, v_prediction, width, projection, model)?;
        unet.validate()
            .map_err(|e| EngineError::model(model, format!("unet: {e}")))?;
        let (mut vae, vae_names) = infer_vae(&shapes, VAE_PREFIX, model)?;
        if family == Family::Sdxl {
            vae.scaling_factor = 0.13025;
        }
        if unet.cross_attention_dim != width {
            return Err(EngineError::model(
                model,
                format!(
                    "the UNet's cross-attention width {} does not match the text encoders' width {width}",
                    unet.cross_attention_dim
                ),
            ));
        }
        let second = (texts.len() == 2).then(|| texts.pop()).flatten();
        let (text, text_names, pad_token) = texts.pop().expect("one text encoder at least");

        Ok(SingleFileCheckpoint {
            family,
            unet,
            vae,
            text,
            text_2: second.as_ref().map(|(c, _, _)| c.clone()),
            scheduler_config: scheduler_config(family, v_prediction),
            pad_token,
            path: path.to_path_buf(),
            model: model.to_string(),
            file: Arc::new(file),
            unet_names: Arc::new(unet_names),
            vae_names: Arc::new(vae_names),
            text_names: Arc::new(text_names),
            text_2_names: Arc::new(second.map(|(_, n, _)| n).unwrap_or_default()),
        })
    }

    fn names(&self, component: Component) -> &Arc<HashMap<String, Source>> {
        match component {
            Component::Unet => &self.unet_names,
            Component::Vae => &self.vae_names,
            Component::TextEncoder => &self.text_names,
            Component::TextEncoder2 => &self.text_2_names,
        }
    }

    /// The weights of one network under diffusers / transformers names, read from the memory map on
    /// demand and cast to `dtype` on `device`.
    pub fn var_builder(
        &self,
        component: Component,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        Ok(renamed_vb(&self.file, self.names(component), dtype, device))
    }

    /// The UNet's weights under diffusers names (for [`crate::models::UNet::new`]).
    pub fn unet_vb(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        self.var_builder(Component::Unet, dtype, device)
    }

    /// The VAE's weights under diffusers names (for [`crate::models::AutoencoderKl::new`]).
    pub fn vae_vb(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        self.var_builder(Component::Vae, dtype, device)
    }

    /// The text encoder's weights under transformers names with the `text_model.` prefix (for
    /// [`crate::models::ClipTextModel::new`]).
    pub fn text_encoder_vb(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        self.var_builder(Component::TextEncoder, dtype, device)
    }

    /// SDXL base: the second text encoder's weights (ViT-bigG, `text_model.` and `text_projection.`).
    pub fn text_encoder_2_vb(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        self.var_builder(Component::TextEncoder2, dtype, device)
    }

    /// The diffusers names one network's weights are presented under, sorted.
    pub fn tensor_names(&self, component: Component) -> Vec<&str> {
        let mut names: Vec<&str> = self.names(component).keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The LDM name a presented tensor is read from.
    pub fn source_name(&self, component: Component, name: &str) -> Option<&str> {
        self.names(component).get(name).map(Source::ldm_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::read_json;
    use crate::models::{AutoencoderKl, ClipTextModel, UNet};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/checkpoints")
    }

    /// The folder model `name` and the single file holding the same weights.
    struct Pair {
        folder: PathBuf,
        single: SingleFileCheckpoint,
    }

    fn pair(name: &str) -> Pair {
        let folder = fixtures().join(name);
        let path = fixtures().join(format!("{name}-single.safetensors"));
        let single = SingleFileCheckpoint::open(&path, name).unwrap();
        Pair { folder, single }
    }

    fn weight_file(folder: &Path, component: Component) -> PathBuf {
        match component {
            Component::Unet => folder.join("unet/diffusion_pytorch_model.safetensors"),
            Component::Vae => folder.join("vae/diffusion_pytorch_model.safetensors"),
            Component::TextEncoder => folder.join("text_encoder/model.safetensors"),
            Component::TextEncoder2 => folder.join("text_encoder_2/model.safetensors"),
        }
    }

    /// The folder's weights as the models read them (text encoder names with `text_model.`).
    fn folder_vb(folder: &Path, component: Component) -> VarBuilder<'static> {
        let file = weight_file(folder, component);
        match component {
            Component::TextEncoder => {
                hf_clip_text_vb("folder", &[file], DType::F32, &Device::Cpu).unwrap()
            }
            _ => unsafe {
                VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &Device::Cpu).unwrap()
            },
        }
    }

    fn assert_unet_configs_match(single: &UNetConfig, folder: &UNetConfig) {
        let n = folder.block_out_channels.len();
        assert_eq!(single.in_channels, folder.in_channels, "in_channels");
        assert_eq!(single.out_channels, folder.out_channels, "out_channels");
        assert_eq!(single.block_out_channels, folder.block_out_channels);
        assert_eq!(single.down_block_types, folder.down_block_types);
        assert_eq!(single.up_block_types, folder.up_block_types);
        assert_eq!(single.mid_block_type, folder.mid_block_type);
        assert_eq!(
            single.layers_per_block.expand(n),
            folder.layers_per_block.expand(n),
            "layers_per_block"
        );
        assert_eq!(single.heads(), folder.heads(), "attention heads");
        assert_eq!(
            single.transformer_layers_per_block.expand(n),
            folder.transformer_layers_per_block.expand(n),
            "transformer_layers_per_block"
        );
        assert_eq!(single.cross_attention_dim, folder.cross_attention_dim);
        assert_eq!(single.use_linear_projection, folder.use_linear_projection);
        assert_eq!(single.upcast_attention, folder.upcast_attention);
        assert_eq!(single.norm_num_groups, folder.norm_num_groups);
        assert_eq!(single.norm_eps, folder.norm_eps);
        assert_eq!(single.flip_sin_to_cos, folder.flip_sin_to_cos);
        assert_eq!(single.freq_shift, folder.freq_shift);
        assert_eq!(single.downsample_padding, folder.downsample_padding);
        assert_eq!(single.act_fn, folder.act_fn);
        assert_eq!(single.conv_in_kernel, folder.conv_in_kernel);
        assert_eq!(single.conv_out_kernel, folder.conv_out_kernel);
        assert_eq!(single.center_input_sample, folder.center_input_sample);
        assert_eq!(single.only_cross_attention, folder.only_cross_attention);
        assert_eq!(
            single
                .resnet_time_scale_shift
                .as_deref()
                .unwrap_or("default"),
            folder
                .resnet_time_scale_shift
                .as_deref()
                .unwrap_or("default")
        );
        assert_eq!(single.addition_embed_type, folder.addition_embed_type);
        assert_eq!(single.class_embed_type, folder.class_embed_type);
    }

    fn assert_vae_configs_match(single: &VaeConfig, folder: &VaeConfig) {
        assert_eq!(single.in_channels, folder.in_channels);
        assert_eq!(single.out_channels, folder.out_channels);
        assert_eq!(single.block_out_channels, folder.block_out_channels);
        assert_eq!(single.layers_per_block, folder.layers_per_block);
        assert_eq!(single.latent_channels, folder.latent_channels);
        assert_eq!(single.norm_num_groups, folder.norm_num_groups);
        assert_eq!(single.scaling_factor, folder.scaling_factor);
        assert_eq!(single.shift_factor, folder.shift_factor);
        assert_eq!(single.use_quant_conv, folder.use_quant_conv);
        assert_eq!(single.use_post_quant_conv, folder.use_post_quant_conv);
        assert_eq!(
            single.mid_block_add_attention,
            folder.mid_block_add_attention
        );
        assert_eq!(single.act_fn, folder.act_fn);
        assert_eq!(single.scale_factor(), folder.scale_factor());
    }

    fn assert_text_configs_match(single: &ClipTextConfig, folder: &ClipTextConfig) {
        assert_eq!(single.vocab_size, folder.vocab_size);
        assert_eq!(single.hidden_size, folder.hidden_size);
        assert_eq!(single.intermediate_size, folder.intermediate_size);
        assert_eq!(single.num_hidden_layers, folder.num_hidden_layers);
        assert_eq!(single.num_attention_heads, folder.num_attention_heads);
        assert_eq!(
            single.max_position_embeddings,
            folder.max_position_embeddings
        );
        assert_eq!(single.hidden_act, folder.hidden_act);
        assert_eq!(single.layer_norm_eps, folder.layer_norm_eps);
    }

    fn check_configs(name: &str, family: Family, pad: &str) {
        let Pair { folder, single } = pair(name);
        assert_eq!(single.family, family);
        assert_eq!(single.pad_token, pad);
        let unet: UNetConfig = read_json(name, &folder.join("unet/config.json")).unwrap();
        let vae: VaeConfig = read_json(name, &folder.join("vae/config.json")).unwrap();
        let text: ClipTextConfig =
            read_json(name, &folder.join("text_encoder/config.json")).unwrap();
        assert_unet_configs_match(&single.unet, &unet);
        assert_vae_configs_match(&single.vae, &vae);
        assert_text_configs_match(&single.text, &text);

        // The scheduler config is the one the folder ships (the folder's tiny models follow the real ones).
        let scheduler: serde_json::Value =
            read_json(name, &folder.join("scheduler/scheduler_config.json")).unwrap();
        let ours = single.scheduler_config.as_object().unwrap();
        for (key, value) in scheduler.as_object().unwrap() {
            if key == "_diffusers_version" {
                continue;
            }
            assert_eq!(ours.get(key), Some(value), "scheduler config {key}");
        }
        let prediction = scheduler
            .get("prediction_type")
            .and_then(|p| p.as_str())
            .unwrap_or("epsilon");
        assert_eq!(ours["prediction_type"], prediction);
    }

    #[test]
    fn checkpoint_sd1_configs_match_folder() {
        check_configs("sd1-tiny", Family::Sd1, "<|endoftext|>");
    }

    #[test]
    fn checkpoint_sd2_configs_match_folder() {
        check_configs("sd2-tiny", Family::Sd2, "!");
    }

    /// Every tensor of the folder comes out of the single file with the same name, shape and value (compared
    /// at the folder's storage precision), and the single file presents no tensor the folder lacks.
    fn check_tensors(name: &str) {
        let Pair { folder, single } = pair(name);
        let parts = [Component::Unet, Component::Vae, Component::TextEncoder]
            .map(|c| (c, weight_file(&folder, c)));
        check_tensors_of(name, &single, &parts);
    }

    /// [`check_tensors`] for the given components, each compared with the folder file given beside it.
    fn check_tensors_of(name: &str, single: &SingleFileCheckpoint, parts: &[(Component, PathBuf)]) {
        for (component, file) in parts.iter().cloned() {
            let st = unsafe { MmapedSafetensors::new(&file) }.unwrap();
            let vb = single
                .var_builder(component, DType::F32, &Device::Cpu)
                .unwrap();
            let mut folder_names = Vec::new();
            for (stored, _) in st.tensors() {
                let expected = st.load(&stored, &Device::Cpu).unwrap();
                let text = matches!(component, Component::TextEncoder | Component::TextEncoder2);
                let presented = if text
                    && !stored.starts_with("text_model.")
                    && !stored.starts_with("text_projection.")
                {
                    format!("text_model.{stored}")
                } else {
                    stored.clone()
                };
                assert!(
                    vb.contains_tensor(&presented),
                    "{name} {component:?}: single file lacks {presented}"
                );
                let got = vb
                    .get(expected.shape(), &presented)
                    .unwrap_or_else(|e| panic!("{name} {component:?} {presented}: {e}"));
                let got = got
                    .to_dtype(expected.dtype())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let expected = expected.to_dtype(DType::F32).unwrap();
                let a = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let b = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(a == b, "{name} {component:?}: {presented} differs");
                folder_names.push(presented);
            }
            folder_names.sort();
            assert_eq!(
                single.tensor_names(component),
                folder_names,
                "{name} {component:?}: the single file presents other tensors than the folder holds"
            );
        }
    }

    /// An SDXL single file (base: CLIP-L + bigG; refiner: bigG alone) gives the folder's architecture and
    /// every one of its tensors.
    fn check_sdxl(name: &str, encoders: &[&str]) {
        let Pair { folder, single } = pair(name);
        assert_eq!(single.family, Family::Sdxl);
        let unet: UNetConfig = read_json(name, &folder.join("unet/config.json")).unwrap();
        let vae: VaeConfig = read_json(name, &folder.join("vae/config.json")).unwrap();
        assert_unet_configs_match(&single.unet, &unet);
        assert!(single.unet.is_sdxl());
        assert_eq!(
            single.unet.addition_time_embed_dim,
            unet.addition_time_embed_dim
        );
        assert_eq!(
            single.unet.projection_class_embeddings_input_dim,
            unet.projection_class_embeddings_input_dim
        );
        assert_eq!(
            single.unet.use_linear_projection,
            unet.use_linear_projection
        );
        assert!(!single.unet.upcast_attention);
        assert_vae_configs_match(&single.vae, &vae);
        assert_eq!(single.vae.scaling_factor, 0.13025);
        let texts: Vec<&ClipTextConfig> = std::iter::once(&single.text)
            .chain(single.text_2.as_ref())
            .collect();
        assert_eq!(texts.len(), encoders.len());
        let mut parts = vec![
            (Component::Unet, weight_file(&folder, Component::Unet)),
            (Component::Vae, weight_file(&folder, Component::Vae)),
        ];
        for (i, (ours, dir)) in texts.iter().zip(encoders).enumerate() {
            let theirs: ClipTextConfig =
                read_json(name, &folder.join(dir).join("config.json")).unwrap();
            assert_text_configs_match(ours, &theirs);
            if i + 1 == encoders.len() {
                // The projected encoder's width; a CLIPTextModel's config carries an unused default.
                assert_eq!(ours.projection_dim, theirs.projection_dim, "{dir}");
            }
            let component = [Component::TextEncoder, Component::TextEncoder2][i];
            parts.push((component, folder.join(dir).join("model.safetensors")));
        }
        assert_eq!(
            single.pad_token,
            if encoders.len() == 2 {
                "<|endoftext|>"
            } else {
                "!"
            }
        );
        assert_eq!(
            single.scheduler_config["_class_name"],
            "EulerDiscreteScheduler"
        );
        check_tensors_of(name, &single, &parts);
    }

    #[test]
    fn checkpoint_sdxl_base_matches_folder() {
        check_sdxl("sdxl-tiny", &["text_encoder", "text_encoder_2"]);
    }

    #[test]
    fn checkpoint_sdxl_refiner_matches_folder() {
        check_sdxl("sdxl-refiner-tiny", &["text_encoder_2"]);
    }

    /// `ldm_unet_module` is the inverse of the single-file reader's naming on every UNet tensor of the SD 1,
    /// SD 2 and SDXL files (3 and 4 levels, attention in the first level or not).
    #[test]
    fn ldm_unet_names_invert_the_single_file_naming() {
        for name in ["sd1-tiny", "sd2-tiny", "sdxl-tiny"] {
            let Pair { single, .. } = pair(name);
            let mut checked = 0;
            for diffusers in single.tensor_names(Component::Unet) {
                let ldm = single.source_name(Component::Unet, diffusers).unwrap();
                let ldm = ldm.strip_prefix(UNET_PREFIX).unwrap();
                let (module, suffix) = diffusers.rsplit_once('.').unwrap();
                let ours = ldm_unet_module(module, &single.unet)
                    .unwrap_or_else(|| panic!("{name}: no LDM name for {module}"));
                assert_eq!(format!("{ours}.{suffix}"), ldm, "{name}: {diffusers}");
                checked += 1;
            }
            assert!(checked > 50, "{name}: {checked}");
        }
    }

    #[test]
    fn checkpoint_sd1_tensors_match_folder() {
        check_tensors("sd1-tiny");
    }

    #[test]
    fn checkpoint_sd2_tensors_match_folder() {
        check_tensors("sd2-tiny");
    }

    /// A fixed, non-trivial input of the given shape.
    fn input(shape: &[usize], phase: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| ((i as f64 * 0.731 + phase).sin() * 0.9) as f32)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff == 0.0, "{what}: outputs differ by up to {diff}");
    }

    /// The three networks built from either source compute the same outputs.
    fn check_forward(name: &str) {
        let Pair { folder, single } = pair(name);
        let dev = Device::Cpu;

        let text_cfg: ClipTextConfig =
            read_json(name, &folder.join("text_encoder/config.json")).unwrap();
        let a = ClipTextModel::new(&text_cfg, folder_vb(&folder, Component::TextEncoder)).unwrap();
        let b = ClipTextModel::new(
            &single.text,
            single.text_encoder_vb(DType::F32, &dev).unwrap(),
        )
        .unwrap();
        let ids = Tensor::new(&[[49406u32, 320, 1125, 539, 1929, 49407, 49407, 0]], &dev).unwrap();
        for clip_skip in [1, 2] {
            assert_same(
                &a.forward(&ids, clip_skip).unwrap(),
                &b.forward(&ids, clip_skip).unwrap(),
                &format!("{name} text encoder, clip skip {clip_skip}"),
            );
        }
        let context = b.forward(&ids, 1).unwrap();

        let unet_cfg: UNetConfig = read_json(name, &folder.join("unet/config.json")).unwrap();
        let a = UNet::new(&unet_cfg, folder_vb(&folder, Component::Unet)).unwrap();
        let b = UNet::new(&single.unet, single.unet_vb(DType::F32, &dev).unwrap()).unwrap();
        let latents = input(&[1, unet_cfg.in_channels, 8, 8], 0.3);
        assert_same(
            &a.forward(&latents, 321.0, &context).unwrap(),
            &b.forward(&latents, 321.0, &context).unwrap(),
            &format!("{name} unet"),
        );

        let vae_cfg: VaeConfig = read_json(name, &folder.join("vae/config.json")).unwrap();
        let a = AutoencoderKl::new(&vae_cfg, folder_vb(&folder, Component::Vae)).unwrap();
        let b = AutoencoderKl::new(&single.vae, single.vae_vb(DType::F32, &dev).unwrap()).unwrap();
        let image = input(&[1, 3, 16, 16], 1.1);
        let (da, db) = (a.encode(&image).unwrap(), b.encode(&image).unwrap());
        assert_same(&da.mean, &db.mean, &format!("{name} vae encode mean"));
        assert_same(&da.std, &db.std, &format!("{name} vae encode std"));
        let side = 16 / vae_cfg.scale_factor();
        let latent = input(&[1, vae_cfg.latent_channels, side, side], 2.0);
        assert_same(
            &a.decode(&latent).unwrap(),
            &b.decode(&latent).unwrap(),
            &format!("{name} vae decode"),
        );
    }

    #[test]
    fn checkpoint_sd1_forward_matches_folder() {
        check_forward("sd1-tiny");
    }

    #[test]
    fn checkpoint_sd2_forward_matches_folder() {
        check_forward("sd2-tiny");
    }

    fn error_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn checkpoint_header_check() {
        let dir = tempfile::tempdir().unwrap();
        // Every fixture weight file passes.
        for name in ["sd1-tiny", "sd2-tiny"] {
            for component in [Component::Unet, Component::Vae, Component::TextEncoder] {
                check_safetensors_header(name, &weight_file(&fixtures().join(name), component))
                    .unwrap();
            }
            let single = fixtures().join(format!("{name}-single.safetensors"));
            check_safetensors_header(name, &single).unwrap();
        }

        let source = fixtures().join("sd1-tiny-single.safetensors");
        let bytes = std::fs::read(&source).unwrap();

        // Cut inside the tensor data, as an interrupted download leaves it.
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
        let message = error_text(check_safetensors_header("cut", &cut));
        assert!(message.contains("truncated"), "{message}");
        assert!(message.contains("cut.safetensors"), "{message}");
        // Opening it as a checkpoint gives the same clear error rather than a failed memory map.
        let message = error_text(SingleFileCheckpoint::open(&cut, "cut"));
        assert!(message.contains("truncated"), "{message}");

        // Cut inside the header.
        let short = dir.path().join("short.safetensors");
        std::fs::write(&short, &bytes[..100]).unwrap();
        let message = error_text(check_safetensors_header("short", &short));
        assert!(message.contains("truncated"), "{message}");

        // Not a safetensors file at all.
        let text = dir.path().join("notes.safetensors");
        std::fs::write(&text, "These are not the weights you are looking for.\n").unwrap();
        let message = error_text(check_safetensors_header("notes", &text));
        assert!(message.contains("not a safetensors file"), "{message}");
        assert!(message.contains("notes.safetensors"), "{message}");

        let zip = dir.path().join("model.safetensors");
        std::fs::write(
            &zip,
            b"PK\x03\x04\x14\x00\x00\x00\x08\x00 pickled torch checkpoint",
        )
        .unwrap();
        let message = error_text(check_safetensors_header("zip", &zip));
        assert!(message.contains("not a safetensors file"), "{message}");

        let tiny = dir.path().join("tiny.safetensors");
        std::fs::write(&tiny, b"{}").unwrap();
        let message = error_text(check_safetensors_header("tiny", &tiny));
        assert!(message.contains("not a safetensors file"), "{message}");

        // A header that is not JSON.
        let mut garbage = 16u64.to_le_bytes().to_vec();
        garbage.extend_from_slice(b"{not json at all");
        let bad = dir.path().join("bad.safetensors");
        std::fs::write(&bad, &garbage).unwrap();
        let message = error_text(check_safetensors_header("bad", &bad));
        assert!(message.contains("not a safetensors file"), "{message}");

        // An unknown dtype.
        let header = br#"{"x":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#;
        let mut odd = (header.len() as u64).to_le_bytes().to_vec();
        odd.extend_from_slice(header);
        odd.push(0);
        let odd_path = dir.path().join("odd.safetensors");
        std::fs::write(&odd_path, &odd).unwrap();
        let message = error_text(check_safetensors_header("odd", &odd_path));
        assert!(message.contains("unknown dtype Q7"), "{message}");
    }

    /// Found with the fuzz target `safetensors_header` (fuzz/fuzz_targets/safetensors_header.rs), which requires
    /// the safetensors reader to accept whatever the check passes: three 4-bit values in 2 bytes passed the check
    /// and then failed in the reader ("misaligned slice"). Whole bytes of sub-byte values still pass.
    #[test]
    fn checkpoint_header_check_refuses_partial_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, header: &str, data: usize| {
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.resize(bytes.len() + data, 0);
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let odd = file(
            "f4.safetensors",
            r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
            2,
        );
        let message = error_text(check_safetensors_header("f4", &odd));
        assert!(message.contains("whole number of bytes"), "{message}");
        let even = file(
            "f4-even.safetensors",
            r#"{"a":{"dtype":"F4","shape":[2,2],"data_offsets":[0,2]}}"#,
            2,
        );
        check_safetensors_header("f4-even", &even).unwrap();
    }

    /// Writes the tensors of `source` whose names do not start with `drop` to `target`.
    fn copy_without(source: &Path, target: &Path, drop: &str) {
        let st = unsafe { MmapedSafetensors::new(source) }.unwrap();
        let kept: HashMap<String, Tensor> = st
            .tensors()
            .into_iter()
            .filter(|(name, _)| !name.starts_with(drop))
            .map(|(name, _)| {
                let t = st.load(&name, &Device::Cpu).unwrap();
                (name, t)
            })
            .collect();
        candle_core::safetensors::save(&kept, target).unwrap();
    }

    #[test]
    fn checkpoint_missing_parts_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let source = fixtures().join("sd1-tiny-single.safetensors");
        for (drop, part) in [
            (VAE_PREFIX, "VAE"),
            (UNET_PREFIX, "UNet"),
            ("cond_stage_model.", "text encoder"),
        ] {
            let target = dir.path().join(format!("no-{part}.safetensors"));
            copy_without(&source, &target, drop);
            let message = error_text(SingleFileCheckpoint::open(&target, "partial"));
            assert!(message.contains(&format!("no {part}")), "{message}");
            assert!(message.contains(drop), "{message}");
        }
    }

    /// Found by the fuzz target `checkpoint` (fuzz/fuzz_targets/checkpoint.rs): a token embedding stored as a
    /// vector (`[49408]` instead of `[49408, 48]`) made `open` index past its shape and panic. Every tensor whose
    /// dimensions the inference reads now has its rank checked; each of these is an error naming the tensor.
    #[test]
    fn checkpoint_tensors_of_the_wrong_rank_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let source = fixtures().join("sd1-tiny-single.safetensors");
        let st = unsafe { MmapedSafetensors::new(&source) }.unwrap();
        let all: HashMap<String, Tensor> = st
            .tensors()
            .into_iter()
            .map(|(name, _)| {
                let t = st.load(&name, &Device::Cpu).unwrap();
                (name, t)
            })
            .collect();
        for name in [
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
            "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
            "model.diffusion_model.input_blocks.0.0.weight",
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "first_stage_model.encoder.down.0.block.0.conv1.weight",
            "first_stage_model.decoder.conv_in.weight",
        ] {
            let mut tensors = all.clone();
            let flat = tensors[name].flatten_all().unwrap();
            tensors.insert(name.to_string(), flat);
            let target = dir.path().join("flat.safetensors");
            candle_core::safetensors::save(&tensors, &target).unwrap();
            let message = error_text(SingleFileCheckpoint::open(&target, "flat"));
            let short = name
                .rsplit_once(".weight")
                .unwrap()
                .0
                .rsplit('.')
                .next()
                .unwrap();
            assert!(message.contains(short), "{name}: {message}");
            if !name.starts_with(VAE_PREFIX) {
                continue;
            }
            let message = error_text(VaeFile::open(&target, "flat").map(|v| v.config));
            assert!(message.contains(short), "{name}: {message}");
        }
    }

    /// Some SD 1 files store the CLIP weights without the `text_model.` segment
    /// (`cond_stage_model.transformer.encoder.layers.0…`); they load the same.
    #[test]
    fn checkpoint_sd1_without_text_model_segment() {
        let dir = tempfile::tempdir().unwrap();
        let source = fixtures().join("sd1-tiny-single.safetensors");
        let st = unsafe { MmapedSafetensors::new(&source) }.unwrap();
        let renamed: HashMap<String, Tensor> = st
            .tensors()
            .into_iter()
            .map(|(name, _)| {
                let t = st.load(&name, &Device::Cpu).unwrap();
                let short = name.replace(
                    "cond_stage_model.transformer.text_model.",
                    "cond_stage_model.transformer.",
                );
                (short, t)
            })
            .collect();
        assert!(renamed.keys().all(|k| !k.contains("text_model.")));
        let path = dir.path().join("short-names.safetensors");
        candle_core::safetensors::save(&renamed, &path).unwrap();
        let short = SingleFileCheckpoint::open(&path, "short-names").unwrap();
        let Pair { single, .. } = pair("sd1-tiny");
        assert_eq!(short.family, Family::Sd1);
        assert_text_configs_match(&short.text, &single.text);
        assert_eq!(
            short.tensor_names(Component::TextEncoder),
            single.tensor_names(Component::TextEncoder)
        );
        let a = ClipTextModel::new(
            &short.text,
            short.text_encoder_vb(DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let b = ClipTextModel::new(
            &single.text,
            single.text_encoder_vb(DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let ids = Tensor::new(&[[49406u32, 320, 1125, 49407]], &Device::Cpu).unwrap();
        assert_same(
            &a.forward(&ids, 1).unwrap(),
            &b.forward(&ids, 1).unwrap(),
            "short names",
        );
    }

    #[test]
    fn checkpoint_sidecar_yaml_decides_prediction_type() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["sd1-tiny", "sd2-tiny"] {
            let source = fixtures().join(format!("{name}-single.safetensors"));
            let path = dir.path().join(format!("{name}.safetensors"));
            std::fs::copy(&source, &path).unwrap();
            let yaml = path.with_extension("yaml");
            let cases: [(Option<&str>, &str, &str); 4] = [
                (
                    None,
                    if name == "sd2-tiny" {
                        "v_prediction"
                    } else {
                        "epsilon"
                    },
                    if name == "sd2-tiny" {
                        "DDIMScheduler"
                    } else {
                        "PNDMScheduler"
                    },
                ),
                (
                    Some("model:\n  params:\n    parameterization: \"v\"\n"),
                    "v_prediction",
                    if name == "sd2-tiny" {
                        "DDIMScheduler"
                    } else {
                        "PNDMScheduler"
                    },
                ),
                (
                    Some("model:\n  params:\n    parameterization: 'v' # v-objective\n"),
                    "v_prediction",
                    if name == "sd2-tiny" {
                        "DDIMScheduler"
                    } else {
                        "PNDMScheduler"
                    },
                ),
                (
                    Some("model:\n  params:\n    linear_start: 0.00085\n"),
                    "epsilon",
                    "PNDMScheduler",
                ),
            ];
            for (content, prediction, class) in cases {
                match content {
                    Some(text) => std::fs::write(&yaml, text).unwrap(),
                    None => {
                        let _ = std::fs::remove_file(&yaml);
                    }
                }
                let ckpt = SingleFileCheckpoint::open(&path, name).unwrap();
                assert_eq!(
                    ckpt.scheduler_config["prediction_type"], prediction,
                    "{name} with yaml {content:?}"
                );
                assert_eq!(
                    ckpt.scheduler_config["_class_name"], class,
                    "{name} {content:?}"
                );
            }
        }
    }

    #[test]
    fn checkpoint_sd2_drops_last_openclip_layer() {
        let Pair { single, .. } = pair("sd2-tiny");
        let resblocks = single
            .file
            .tensors()
            .into_iter()
            .filter_map(|(n, _)| {
                n.strip_prefix("cond_stage_model.model.transformer.resblocks.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .collect::<BTreeSet<_>>()
            .len();
        assert_eq!(single.text.num_hidden_layers, resblocks - 1);
        let last = format!("text_model.encoder.layers.{}.", resblocks - 1);
        assert!(single
            .tensor_names(Component::TextEncoder)
            .iter()
            .all(|n| !n.starts_with(&last)));
        assert_eq!(
            single.source_name(
                Component::TextEncoder,
                "text_model.encoder.layers.0.self_attn.k_proj.weight"
            ),
            Some("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
        );
    }
}
