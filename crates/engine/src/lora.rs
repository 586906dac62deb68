//! LoRA files and merging them into a model's UNet and text encoder.
//!
//! # Formats read (`.safetensors` only; pickles are refused because loading them can run code)
//!
//! - **kohya / AUTOMATIC1111** (what CivitAI users have): `lora_unet_<module>.lora_down.weight`,
//!   `.lora_up.weight` and an optional scalar `.alpha`; `lora_te_<module>…` for the text encoder. `<module>`
//!   is the network's own module path with `.` written as `_` (`down_blocks_0_attentions_0_proj_in`,
//!   `text_model_encoder_layers_0_self_attn_q_proj`); it is matched against the model's real module names, so
//!   linear layers, 1×1 projections and (LoCon) 3×3 convolutions all work. SDXL files (sd-scripts) name the
//!   two text encoders `lora_te1_` / `lora_te2_` and the UNet's modules by their LDM (SGM) paths
//!   (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), which are matched through the UNet's
//!   layout ([`crate::checkpoint::ldm_unet_module`]).
//! - **diffusers / PEFT**: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also the older
//!   `.lora.down/.up`, `.lora_linear_layer.down/.up` and `attn1.processor.to_q_lora.down/.up` spellings),
//!   `text_encoder.<module>…` (SDXL: `text_encoder_2.<module>…` for the second one); alphas from `.alpha` tensors or from the `lora_adapter_metadata` JSON that
//!   diffusers writes into the file header (`unet.lora_alpha`, `unet.r`, `…alpha_pattern`).
//!
//! # Maths
//!
//! Each layer's weight becomes `W + Σ strength × alpha / rank × (up · down)` (the product reshaped to the
//! weight's shape; `alpha` defaults to the rank, i.e. scale = strength, as kohya and diffusers do). The sum
//! is taken in float32 and cast back to the weight's type.
//!
//! Files for another architecture are refused with the reason: an SDXL LoRA (layers for a second text
//! encoder) on SD 1.x/2.x, layers the model does not have, or shapes that do not fit (e.g. an SD 2 LoRA on
//! SD 1.5, an SD 1.5 LoRA on SDXL). LyCORIS variants other than plain LoRA/LoCon (LoHa, LoKr, Tucker `lora_mid`, DoRA) are refused
//! by name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::UNetConfig;
use crate::error::{EngineError, Result};
use crate::weights::NamedWeights;

/// The field requests name LoRAs in (errors point at it).
const FIELD: &str = "lora_model";

/// Which network a LoRA layer patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraTarget {
    /// The UNet.
    Unet,
    /// The (first) CLIP text encoder (SDXL: CLIP-L).
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG).
    TextEncoder2,
}

impl LoraTarget {
    /// The network's name in messages.
    fn network(self) -> &'static str {
        match self {
            LoraTarget::Unet => "UNet",
            LoraTarget::TextEncoder => "text encoder",
            LoraTarget::TextEncoder2 => "second text encoder",
        }
    }
}

/// How a layer's module is spelt in the file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum ModuleName {
    /// kohya: the module path with dots written as underscores.
    Underscored(String),
    /// diffusers / PEFT: the module path itself.
    Dotted(String),
}

impl std::fmt::Display for ModuleName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleName::Underscored(s) | ModuleName::Dotted(s) => f.write_str(s),
        }
    }
}

/// One patched layer: `up · down`, scaled by `alpha / rank`.
#[derive(Debug, Clone)]
struct LoraLayer {
    target: LoraTarget,
    module: ModuleName,
    down: Tensor,
    up: Tensor,
    alpha: Option<f64>,
}

/// A LoRA read from a file, ready to be merged into models of the architecture it was trained for.
#[derive(Debug, Clone)]
pub struct Lora {
    /// Its name (the file name without `.safetensors`).
    pub name: String,
    layers: Vec<LoraLayer>,
}

/// The parts of one layer as they are collected from the file.
#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

fn bad(name: &str, why: impl std::fmt::Display) -> EngineError {
    EngineError::invalid(FIELD, format!("LoRA {name}: {why}"))
}

/// Splits a kohya key into (target, module, part), or explains why the key cannot be used.
fn kohya_key(key: &str) -> Result<Option<(LoraTarget, ModuleName, String)>> {
    let Some((module, part)) = key.split_once('.') else {
        return Ok(None);
    };
    let (target, rest) = if let Some(rest) = module.strip_prefix("lora_unet_") {
        (LoraTarget::Unet, rest)
    } else if let Some(rest) = module.strip_prefix("lora_te_") {
        (LoraTarget::TextEncoder, rest)
    } else if let Some(rest) = module.strip_prefix("lora_te1_") {
        (LoraTarget::TextEncoder, rest)
    } else if let Some(rest) = module.strip_prefix("lora_te2_") {
        (LoraTarget::TextEncoder2, rest)
    } else {
        return Ok(None);
    };
    Ok(Some((
        target,
        ModuleName::Underscored(rest.to_string()),
        part.to_string(),
    )))
}

/// Splits a diffusers / PEFT key into (target, module, part).
fn diffusers_key(key: &str) -> Result<Option<(LoraTarget, ModuleName, String)>> {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    let (target, rest) = if let Some(rest) = key.strip_prefix("unet.") {
        (LoraTarget::Unet, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder_2.") {
        (LoraTarget::TextEncoder2, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder.") {
        (LoraTarget::TextEncoder, rest)
    } else {
        return Ok(None);
    };
    const PARTS: &[(&str, &str)] = &[
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".lora_linear_layer.down.weight", "down"),
        (".lora_linear_layer.up.weight", "up"),
        ("_lora.down.weight", "down"),
        ("_lora.up.weight", "up"),
        (".alpha", "alpha"),
    ];
    for (suffix, part) in PARTS {
        if let Some(module) = rest.strip_suffix(suffix) {
            // Old attention-processor spelling: `attn1.processor.to_q_lora` is `attn1.to_q`.
            let module = module.replace(".processor.", ".");
            let module = if module.ends_with(".to_out") {
                format!("{module}.0")
            } else {
                module
            };
            return Ok(Some((target, ModuleName::Dotted(module), part.to_string())));
        }
    }
    Ok(Some((
        target,
        ModuleName::Dotted(rest.to_string()),
        rest.to_string(),
    )))
}

/// What a kohya/LyCORIS part name is, or why it is refused.
fn part_kind(lora: &str, part: &str) -> Result<Option<&'static str>> {
    Ok(match part {
        "lora_down.weight" | "down" => Some("down"),
        "lora_up.weight" | "up" => Some("up"),
        "alpha" => Some("alpha"),
        p if p.starts_with("hada_") => {
            return Err(bad(lora, "LoHa (LyCORIS) layers are not supported"))
        }
        p if p.starts_with("lokr_") => {
            return Err(bad(lora, "LoKr (LyCORIS) layers are not supported"))
        }
        p if p.starts_with("lora_mid") => {
            return Err(bad(
                lora,
                "LoCon layers with a Tucker core (lora_mid) are not supported",
            ))
        }
        p if p.contains("dora_scale") || p.contains("magnitude") => {
            return Err(bad(lora, "DoRA layers are not supported"))
        }
        _ => None,
    })
}

/// The alphas diffusers writes into the header: `(target, default alpha / rank)` and per-module patterns.
#[derive(Debug, Default)]
struct HeaderAlphas {
    scale: HashMap<LoraTarget, f64>,
    patterns: Vec<(LoraTarget, String, f64)>,
}

impl HeaderAlphas {
    fn parse(metadata: Option<&HashMap<String, String>>) -> HeaderAlphas {
        let mut out = HeaderAlphas::default();
        let Some(json) = metadata.and_then(|m| m.get("lora_adapter_metadata")) else {
            return out;
        };
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(json)
        else {
            return out;
        };
        for (prefix, target) in [
            ("unet", LoraTarget::Unet),
            ("text_encoder", LoraTarget::TextEncoder),
            ("text_encoder_2", LoraTarget::TextEncoder2),
        ] {
            let get = |k: &str| map.get(&format!("{prefix}.{k}")).and_then(|v| v.as_f64());
            if let (Some(alpha), Some(r)) = (get("lora_alpha"), get("r")) {
                if r > 0.0 {
                    out.scale.insert(target, alpha / r);
                }
            }
            if let Some(serde_json::Value::Object(p)) = map.get(&format!("{prefix}.alpha_pattern"))
            {
                for (pattern, alpha) in p {
                    if let Some(a) = alpha.as_f64() {
                        out.patterns.push((target, pattern.clone(), a));
                    }
                }
            }
        }
        out
    }
}

impl Lora {
    /// Reads a LoRA file. `name` is what errors call it.
    pub fn load(path: &Path, name: &str) -> Result<Lora> {
        let lower = path.to_string_lossy().to_lowercase();
        if !lower.ends_with(".safetensors") {
            return Err(bad(
                name,
                "only .safetensors LoRA files are read (pickled .pt/.ckpt files can run code)",
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(name, format!("not a readable safetensors file: {e}")))?;
        let alphas = HeaderAlphas::parse(header.metadata().as_ref());
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(name, format!("cannot read its tensors: {e}")))?;
        Self::from_tensors(name, tensors, &alphas)
    }

    fn from_tensors(
        name: &str,
        tensors: HashMap<String, Tensor>,
        alphas: &HeaderAlphas,
    ) -> Result<Lora> {
        let mut parts: BTreeMap<(LoraTarget, ModuleName), Parts> = BTreeMap::new();
        let mut unknown = Vec::new();
        for (key, tensor) in tensors {
            let split = match kohya_key(&key)? {
                Some(s) => Some(s),
                None => diffusers_key(&key)?,
            };
            let Some((target, module, part)) = split else {
                unknown.push(key);
                continue;
            };
            let Some(kind) = part_kind(name, &part)? else {
                unknown.push(key);
                continue;
            };
            let entry = parts.entry((target, module)).or_default();
            let tensor = tensor
                .to_dtype(DType::F32)
                .map_err(|e| bad(name, format!("{key}: {e}")))?;
            match kind {
                "down" => entry.down = Some(tensor),
                "up" => entry.up = Some(tensor),
                _ => {
                    let value = tensor
                        .flatten_all()
                        .and_then(|t| t.get(0))
                        .and_then(|t| t.to_scalar::<f32>())
                        .map_err(|e| bad(name, format!("{key} is not a scalar alpha: {e}")))?;
                    entry.alpha = Some(value as f64);
                }
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(bad(
                name,
                format!(
                    "{} tensors are neither kohya (lora_unet_/lora_te_) nor diffusers/PEFT (unet./text_encoder.) \
                     LoRA weights, e.g. {}",
                    unknown.len(),
                    unknown[..unknown.len().min(3)].join(", ")
                ),
            ));
        }
        let mut layers = Vec::new();
        for ((target, module), p) in parts {
            let (Some(down), Some(up)) = (p.down, p.up) else {
                return Err(bad(
                    name,
                    format!("layer {module} lacks its up or down matrix"),
                ));
            };
            let header_alpha = || {
                let rank = down.dim(0).ok()? as f64;
                let dotted = module.to_string();
                alphas
                    .patterns
                    .iter()
                    .find(|(t, pattern, _)| *t == target && dotted.ends_with(pattern.as_str()))
                    .map(|(_, _, a)| *a)
                    .or_else(|| alphas.scale.get(&target).map(|s| s * rank))
            };
            let alpha = p.alpha.or_else(header_alpha);
            layers.push(LoraLayer {
                target,
                module,
                down,
                up,
                alpha,
            });
        }
        if layers.is_empty() {
            return Err(bad(name, "the file holds no LoRA layers"));
        }
        Ok(Lora {
            name: name.to_string(),
            layers,
        })
    }

    /// Whether it has layers for `target`.
    pub fn patches(&self, target: LoraTarget) -> bool {
        self.layers.iter().any(|l| l.target == target)
    }

    /// How many layers it patches in each network.
    pub fn layer_counts(&self) -> (usize, usize) {
        let unet = self
            .layers
            .iter()
            .filter(|l| l.target == LoraTarget::Unet)
            .count();
        (unet, self.layers.len() - unet)
    }
}

/// Module path → weight name of every weight in a network, under both spellings (`a.b_c` and `a_b_c`).
struct ModuleIndex {
    dotted: HashMap<String, String>,
    underscored: HashMap<String, String>,
}

impl ModuleIndex {
    /// The index of `weights`; with a UNet's config, its modules are also found under their LDM paths.
    fn new(weights: &NamedWeights, unet: Option<&UNetConfig>) -> Self {
        let mut dotted = HashMap::new();
        let mut underscored = HashMap::new();
        for name in weights.names() {
            if let Some(module) = name.strip_suffix(".weight") {
                dotted.insert(module.to_string(), name.to_string());
                underscored.insert(module.replace('.', "_"), name.to_string());
                if let Some(ldm) = unet.and_then(|c| crate::checkpoint::ldm_unet_module(module, c))
                {
                    underscored.insert(ldm.replace('.', "_"), name.to_string());
                }
            }
        }
        ModuleIndex {
            dotted,
            underscored,
        }
    }

    fn find(&self, module: &ModuleName, target: LoraTarget) -> Option<&String> {
        match module {
            ModuleName::Underscored(m) => self.underscored.get(m).or_else(|| match target {
                LoraTarget::TextEncoder | LoraTarget::TextEncoder2 => {
                    self.underscored.get(&format!("text_model_{m}"))
                }
                LoraTarget::Unet => None,
            }),
            ModuleName::Dotted(m) => self.dotted.get(m).or_else(|| match target {
                // transformers 4 saved the text encoder with `text_model.`, PEFT files may omit it.
                LoraTarget::TextEncoder | LoraTarget::TextEncoder2 => {
                    self.dotted.get(&format!("text_model.{m}"))
                }
                LoraTarget::Unet => None,
            }),
        }
    }
}

/// `up · down` for one layer, shaped like a weight of `shape`, or why it does not fit.
fn layer_delta(layer: &LoraLayer, shape: &[usize]) -> std::result::Result<Tensor, String> {
    let (down, up) = (&layer.down, &layer.up);
    let rank = down.dim(0).map_err(|e| e.to_string())?;
    let out = up.dim(0).map_err(|e| e.to_string())?;
    let up_rank = up.elem_count() / out.max(1);
    if up_rank != rank {
        return Err(format!(
            "its up matrix {:?} and down matrix {:?} disagree on the rank",
            up.dims(),
            down.dims()
        ));
    }
    let fan_in = down.elem_count() / rank.max(1);
    let base_out = shape.first().copied().unwrap_or(0);
    let base_in: usize = shape.iter().skip(1).product();
    if out != base_out || fan_in != base_in {
        return Err(format!(
            "the layer's weight is {shape:?}, the LoRA gives {out} × {fan_in} (up {:?}, down {:?})",
            up.dims(),
            down.dims()
        ));
    }
    let product = up
        .reshape((out, rank))
        .and_then(|u| u.matmul(&down.reshape((rank, fan_in))?))
        .and_then(|d| d.reshape(shape))
        .map_err(|e| e.to_string())?;
    let scale = layer.alpha.map(|a| a / rank as f64).unwrap_or(1.0);
    (product * scale).map_err(|e| e.to_string())
}

/// The weights `loras` (each with its strength) change in a network whose tensors are `weights`: name →
/// merged tensor in the original's dtype and device. Every layer of every LoRA for `target` must exist in
/// the network and fit its shape, or the whole merge is refused naming the first that does not. `unet` is
/// the UNet's config when `target` is the UNet (its modules' LDM paths are accepted too).
pub fn merged_weights(
    weights: &NamedWeights,
    target: LoraTarget,
    loras: &[(&Lora, f64)],
    unet: Option<&UNetConfig>,
) -> Result<HashMap<String, Tensor>> {
    let index = ModuleIndex::new(weights, unet);
    let network = target.network();
    let mut sums: HashMap<String, Tensor> = HashMap::new();
    for (lora, strength) in loras {
        let mut missing = Vec::new();
        for layer in lora.layers.iter().filter(|l| l.target == target) {
            let Some(weight_name) = index.find(&layer.module, target) else {
                missing.push(layer.module.to_string());
                continue;
            };
            let base = weights.get(weight_name).expect("indexed names exist");
            let delta = layer_delta(layer, base.dims()).map_err(|why| {
                bad(
                    &lora.name,
                    format!(
                        "it does not fit this model's {network} at {}: {why} (a LoRA for another \
                         architecture?)",
                        layer.module
                    ),
                )
            })?;
            let delta = (delta * *strength)?;
            let sum = match sums.remove(weight_name) {
                Some(prev) => (prev + delta)?,
                None => delta,
            };
            sums.insert(weight_name.clone(), sum);
        }
        if !missing.is_empty() {
            missing.sort();
            return Err(bad(
                &lora.name,
                format!(
                    "{} of its layers are not in this model's {network} (e.g. {}): it was made for another \
                     architecture",
                    missing.len(),
                    missing[..missing.len().min(3)].join(", ")
                ),
            ));
        }
    }
    let mut merged = HashMap::with_capacity(sums.len());
    for (name, delta) in sums {
        let base = weights.get(&name).expect("indexed names exist");
        let sum = (base.to_dtype(DType::F32)? + delta.to_device(base.device())?)?;
        merged.insert(name, sum.to_dtype(base.dtype())?);
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Recorder;
    use candle_nn::VarBuilder;

    fn network() -> NamedWeights {
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        let ramp = |n: usize, shape: &[usize]| {
            Tensor::arange(0f32, n as f32, &dev)
                .unwrap()
                .reshape(shape)
                .unwrap()
        };
        map.insert("blocks.0.to_q.weight".into(), ramp(12, &[3, 4]));
        map.insert(
            "blocks.0.conv1.weight".into(),
            ramp(2 * 3 * 9, &[2, 3, 3, 3]),
        );
        map.insert("blocks.0.conv1.bias".into(), ramp(2, &[2]));
        let (vb, handle) = Recorder::wrap(VarBuilder::from_tensors(map.clone(), DType::F32, &dev));
        for (name, t) in &map {
            vb.get(t.dims(), name).unwrap();
        }
        handle.take()
    }

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
    }

    fn lora(tensors: Vec<(&str, Tensor)>) -> Result<Lora> {
        let map = tensors
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Lora::from_tensors("test", map, &HeaderAlphas::default())
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn kohya_linear_and_conv_layers_merge_with_alpha_over_rank() {
        let w = network();
        let l = lora(vec![
            (
                "lora_unet_blocks_0_to_q.lora_down.weight",
                t(&[1., 0., 0., 1.], &[1, 4]),
            ),
            (
                "lora_unet_blocks_0_to_q.lora_up.weight",
                t(&[1., 2., 3.], &[3, 1]),
            ),
            ("lora_unet_blocks_0_to_q.alpha", t(&[0.5], &[])),
            (
                "lora_unet_blocks_0_conv1.lora_down.weight",
                Tensor::ones((1, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "lora_unet_blocks_0_conv1.lora_up.weight",
                t(&[1., -1.], &[2, 1, 1, 1]),
            ),
        ])
        .unwrap();
        assert_eq!(l.layer_counts(), (2, 0));
        let merged = merged_weights(&w, LoraTarget::Unet, &[(&l, 2.0)], None).unwrap();
        assert_eq!(merged.len(), 2);
        // to_q: base + 2 × 0.5/1 × up·down.
        let q = values(&merged["blocks.0.to_q.weight"]);
        let base = values(w.get("blocks.0.to_q.weight").unwrap());
        let up = [1., 2., 3.];
        let down = [1., 0., 0., 1.];
        for (i, v) in q.iter().enumerate() {
            let expected = base[i] + up[i / 4] * down[i % 4];
            assert_eq!(*v, expected, "element {i}");
        }
        // conv: no alpha → scale = strength; the 3×3 kernel is patched as a whole.
        let c = values(&merged["blocks.0.conv1.weight"]);
        let base = values(w.get("blocks.0.conv1.weight").unwrap());
        for (i, v) in c.iter().enumerate() {
            let sign = if i < 27 { 1.0 } else { -1.0 };
            assert_eq!(*v, base[i] + 2.0 * sign, "element {i}");
        }
    }

    #[test]
    fn two_loras_add_and_peft_names_work() {
        let w = network();
        let a = lora(vec![
            (
                "lora_unet_blocks_0_to_q.lora_down.weight",
                t(&[1., 1., 1., 1.], &[1, 4]),
            ),
            (
                "lora_unet_blocks_0_to_q.lora_up.weight",
                t(&[1., 1., 1.], &[3, 1]),
            ),
        ])
        .unwrap();
        let b = lora(vec![
            (
                "unet.blocks.0.to_q.lora_A.weight",
                t(&[1., 1., 1., 1.], &[1, 4]),
            ),
            (
                "unet.blocks.0.to_q.lora_B.weight",
                t(&[1., 1., 1.], &[3, 1]),
            ),
        ])
        .unwrap();
        let merged = merged_weights(&w, LoraTarget::Unet, &[(&a, 0.5), (&b, 0.25)], None).unwrap();
        let q = values(&merged["blocks.0.to_q.weight"]);
        let base = values(w.get("blocks.0.to_q.weight").unwrap());
        for (v, b) in q.iter().zip(base) {
            assert_eq!(*v, b + 0.75);
        }
        assert!(
            merged_weights(&w, LoraTarget::TextEncoder, &[(&a, 1.0)], None)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn unfit_files_are_refused_with_the_reason() {
        let w = network();
        let wrong_shape = lora(vec![
            (
                "lora_unet_blocks_0_to_q.lora_down.weight",
                t(&[1., 1., 1., 1., 1.], &[1, 5]),
            ),
            (
                "lora_unet_blocks_0_to_q.lora_up.weight",
                t(&[1., 1., 1.], &[3, 1]),
            ),
        ])
        .unwrap();
        let e = merged_weights(&w, LoraTarget::Unet, &[(&wrong_shape, 1.0)], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("another architecture") && e.contains("[3, 4]"),
            "{e}"
        );
        let missing = lora(vec![
            (
                "lora_unet_input_blocks_1_1_proj_in.lora_down.weight",
                t(&[1.], &[1, 1]),
            ),
            (
                "lora_unet_input_blocks_1_1_proj_in.lora_up.weight",
                t(&[1.], &[1, 1]),
            ),
        ])
        .unwrap();
        let e = merged_weights(&w, LoraTarget::Unet, &[(&missing, 1.0)], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not in this model's UNet") && e.contains("input_blocks_1_1_proj_in"),
            "{e}"
        );
        let loha = lora(vec![(
            "lora_unet_blocks_0_to_q.hada_w1_a",
            t(&[1.], &[1, 1]),
        )])
        .unwrap_err();
        assert!(loha.to_string().contains("LoHa"), "{loha}");
        let half = lora(vec![(
            "lora_unet_blocks_0_to_q.lora_down.weight",
            t(&[1.], &[1, 1]),
        )])
        .unwrap_err();
        assert!(half.to_string().contains("lacks its up or down"), "{half}");
        let junk = lora(vec![("model.weight", t(&[1.], &[1]))]).unwrap_err();
        assert!(junk.to_string().contains("neither kohya"), "{junk}");
    }

    #[test]
    fn header_alphas_scale_peft_layers() {
        let mut meta = HashMap::new();
        meta.insert(
            "lora_adapter_metadata".to_string(),
            r#"{"unet.lora_alpha": 8, "unet.r": 4, "unet.alpha_pattern": {"to_k": 2}}"#.to_string(),
        );
        let alphas = HeaderAlphas::parse(Some(&meta));
        let tensors = [
            (
                "unet.blocks.0.to_q.lora_A.weight",
                t(&[1., 1., 1., 1.], &[1, 4]),
            ),
            (
                "unet.blocks.0.to_q.lora_B.weight",
                t(&[1., 1., 1.], &[3, 1]),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let l = Lora::from_tensors("p", tensors, &alphas).unwrap();
        // alpha / r = 2 → alpha for rank 1 is 2.
        assert_eq!(l.layers[0].alpha, Some(2.0));
    }
}
