//! The models folder (ComfyUI-like) and loading a model from it.
//!
//! ```text
//! ROOT/checkpoints/<model_id>/               diffusers layout: model_index.json, unet/, vae/, text_encoder/,
//!                                            tokenizer/, scheduler/ (safety_checker/ optional)
//! ROOT/checkpoints/<model_id>.safetensors    single-file checkpoint with the original LDM tensor names
//! ROOT/embeddings/<name>.safetensors|.pt|.bin  textual-inversion embeddings (see crate::embeddings)
//! ROOT/loras/, ROOT/vae/                     used by later features
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::checkpoint::SingleFileCheckpoint;
use crate::config::{read_json, ClipTextConfig, ModelIndex, UNetConfig, VaeConfig};
use crate::error::{EngineError, Result};
use crate::lora::Lora;
use crate::models::{AutoencoderKl, ClipTextModel, UNet};
use crate::pipeline::{ModelKind, SdxlSettings, StableDiffusion};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{NamedWeights, Recorder};

/// How a model is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    /// A diffusers pipeline folder.
    Diffusers,
    /// One `.safetensors` file with LDM tensor names.
    SingleFile,
}

/// A model found on disk, not yet loaded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelLocation {
    /// The model id: folder name, or file name without `.safetensors`.
    pub id: String,
    /// Where it is.
    pub path: PathBuf,
    /// How it is stored.
    pub format: ModelFormat,
}

/// File endings of pickled checkpoints, which are never loaded (unpickling runs code).
const PICKLE_ENDINGS: &[&str] = &[".ckpt", ".pt", ".pth", ".bin", ".pkl"];

/// File endings of textual-inversion embeddings, in the order they are looked for. Pickled ones are read
/// with a reader that never runs code (see [`crate::embeddings`]).
const EMBEDDING_ENDINGS: &[&str] = &[".safetensors", ".pt", ".bin"];

fn pickle_error(name: &str) -> EngineError {
    EngineError::model(
        name,
        "pickled checkpoints (.ckpt/.pt/.bin) are refused because loading them can run arbitrary code; \
         convert the file to .safetensors",
    )
}

/// The models folder: `ROOT/checkpoints`, `ROOT/loras`, `ROOT/embeddings`, `ROOT/vae`.
#[derive(Debug, Clone)]
pub struct ModelsDir {
    root: PathBuf,
}

impl ModelsDir {
    /// A models folder at `root` (it need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ModelsDir { root: root.into() }
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ROOT/checkpoints`, where models live.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// `ROOT/loras`, where LoRA files live.
    pub fn loras(&self) -> PathBuf {
        self.root.join("loras")
    }

    /// `ROOT/vae`, where replacement VAEs live.
    pub fn vaes(&self) -> PathBuf {
        self.root.join("vae")
    }

    /// The LoRA called `name`: `ROOT/loras/<name>.safetensors`. Errors name the `lora_model` field.
    pub fn resolve_lora(&self, name: &str) -> Result<PathBuf> {
        check_name("lora_model", name)?;
        let dir = self.loras();
        let file = dir.join(format!("{name}.safetensors"));
        if file.is_file() {
            return Ok(file);
        }
        if PICKLE_ENDINGS
            .iter()
            .any(|ext| dir.join(format!("{name}{ext}")).is_file())
        {
            return Err(EngineError::invalid(
                "lora_model",
                format!("LoRA {name} is a pickled file, which is refused because loading it can run code; convert it to .safetensors"),
            ));
        }
        Err(EngineError::invalid(
            "lora_model",
            format!("no LoRA named {name} (looked for {})", file.display()),
        ))
    }

    /// The VAE called `name`: `ROOT/vae/<name>.safetensors` or the diffusers folder `ROOT/vae/<name>/`.
    /// Errors name the `vae` field.
    pub fn resolve_vae(&self, name: &str) -> Result<PathBuf> {
        check_name("vae", name)?;
        let dir = self.vaes();
        let folder = dir.join(name);
        if folder.join("config.json").is_file() {
            return Ok(folder);
        }
        let file = dir.join(format!("{name}.safetensors"));
        if file.is_file() {
            return Ok(file);
        }
        Err(EngineError::invalid(
            "vae",
            format!(
                "no VAE named {name} (looked for {} and {}/config.json)",
                file.display(),
                folder.display()
            ),
        ))
    }

    /// `ROOT/embeddings`, where textual-inversion embeddings live.
    pub fn embeddings(&self) -> PathBuf {
        self.root.join("embeddings")
    }

    /// The file of the embedding `name` in `ROOT/embeddings`: `<name>.safetensors`, `.pt` or `.bin`, tried in
    /// that order. Names only (no paths, no leading `.`), as they come from requests.
    pub fn resolve_embedding(&self, name: &str) -> Result<PathBuf> {
        check_name("embeddings_model", name)?;
        let dir = self.embeddings();
        EMBEDDING_ENDINGS
            .iter()
            .map(|ext| dir.join(format!("{name}{ext}")))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                EngineError::invalid(
                    "embeddings_model",
                    format!(
                        "no embedding {name} in {} (looked for {name}.safetensors, {name}.pt and {name}.bin)",
                        dir.display()
                    ),
                )
            })
    }

    /// Loads the embeddings `names` (see [`Self::resolve_embedding`]) in order.
    pub fn load_embeddings(
        &self,
        names: &[String],
    ) -> Result<Vec<crate::embeddings::TextualInversion>> {
        names
            .iter()
            .map(|name| {
                crate::embeddings::TextualInversion::load(&self.resolve_embedding(name)?, name)
            })
            .collect()
    }

    /// Every model in `ROOT/checkpoints`, sorted by id.
    pub fn list(&self) -> Result<Vec<ModelLocation>> {
        let dir = self.checkpoints();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(EngineError::io(dir, e)),
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() && path.join("model_index.json").is_file() {
                found.push(ModelLocation {
                    id: name,
                    path,
                    format: ModelFormat::Diffusers,
                });
            } else if let Some(id) = name.strip_suffix(".safetensors") {
                found.push(ModelLocation {
                    id: id.to_string(),
                    path,
                    format: ModelFormat::SingleFile,
                });
            }
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    /// Finds a model by id only (for requests from the network: no paths, no `..`).
    pub fn resolve_id(&self, id: &str) -> Result<ModelLocation> {
        if id.is_empty() || id.contains(['/', '\\']) || id.starts_with('.') {
            return Err(EngineError::ModelNotFound(id.to_string()));
        }
        let dir = self.checkpoints();
        let folder = dir.join(id);
        if folder.is_dir() {
            return location_of(&folder, id);
        }
        let file = dir.join(format!("{id}.safetensors"));
        if file.is_file() {
            return location_of(&file, id);
        }
        if PICKLE_ENDINGS
            .iter()
            .any(|ext| dir.join(format!("{id}{ext}")).is_file())
        {
            return Err(pickle_error(id));
        }
        Err(EngineError::ModelNotFound(format!(
            "{id} (looked for {}/{id}/ and {id}.safetensors)",
            dir.display()
        )))
    }

    /// Finds a model by id, or takes `id_or_path` as a path to a model folder or checkpoint file (CLI use).
    pub fn resolve(&self, id_or_path: &str) -> Result<ModelLocation> {
        let path = Path::new(id_or_path);
        if path.exists()
            && (id_or_path.contains(['/', '\\']) || !self.checkpoints().join(path).exists())
        {
            let id = path
                .file_name()
                .map(|n| {
                    n.to_string_lossy()
                        .trim_end_matches(".safetensors")
                        .to_string()
                })
                .unwrap_or_else(|| id_or_path.to_string());
            return location_of(path, &id);
        }
        self.resolve_id(id_or_path)
    }
}

/// Refuses names that are not plain file names (requests come from the network: no paths, no `..`).
fn check_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(EngineError::invalid(
            field,
            format!("{name:?} is not a valid name (plain file names only)"),
        ));
    }
    Ok(())
}

/// `base` with the LoRAs `loras` (names in `ROOT/loras`, with strengths) merged in and the VAE `vae` (a name
/// in `ROOT/vae`) swapped in: what a request with `lora_model` / `vae` runs on. Without either, a cheap
/// copy of `base` (the networks are shared).
pub fn variant(
    base: &StableDiffusion,
    dir: &ModelsDir,
    loras: &[(String, f64)],
    vae: Option<&str>,
) -> Result<StableDiffusion> {
    let files = loras
        .iter()
        .map(|(name, strength)| Ok((Lora::load(&dir.resolve_lora(name)?, name)?, *strength)))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<(&Lora, f64)> = files.iter().map(|(l, s)| (l, *s)).collect();
    let mut model = base.with_loras(&refs)?;
    if let Some(name) = vae {
        let path = dir.resolve_vae(name)?;
        let scaling_factor = base.vae_config().scaling_factor;
        model = model.with_vae(load_vae(
            &path,
            name,
            scaling_factor,
            &base.device,
            base.dtype,
            base.sdxl().is_some(),
        )?)?;
    }
    Ok(model)
}

/// The safety checker a model uses: `global` (`--safety-checker`) when given, else the model's own
/// `safety_checker/` folder (diffusers folders only), else none.
pub fn safety_checker_path(global: Option<&Path>, model: &ModelLocation) -> Option<PathBuf> {
    if let Some(path) = global {
        return Some(path.to_path_buf());
    }
    let own = model.path.join("safety_checker");
    (model.format == ModelFormat::Diffusers && own.join("config.json").is_file())
        .then_some(model.path.clone())
}

/// Loads a replacement VAE found by [`ModelsDir::resolve_vae`] (a diffusers folder or a single file). A
/// single file says nothing of its scaling factor, so it takes `scaling_factor`, the model's own (SDXL's
/// 0.13025 for `sdxl_vae.safetensors` or the fp16-fix VAE), as AUTOMATIC1111 does; a folder's config.json
/// gives its own. For an SDXL model (`sdxl`) running in float16, a VAE that says `force_upcast` (a single
/// file always does) is loaded in float32.
pub fn load_vae(
    path: &Path,
    name: &str,
    scaling_factor: f64,
    device: &Device,
    dtype: DType,
    sdxl: bool,
) -> Result<AutoencoderKl> {
    let dtype_for = |cfg: &VaeConfig| {
        if sdxl {
            sdxl_vae_dtype(cfg, dtype)
        } else {
            dtype
        }
    };
    if path.is_dir() {
        let cfg: VaeConfig = read_json(name, &path.join("config.json"))?;
        let vb = component_weights(name, path, dtype_for(&cfg), device)?;
        return AutoencoderKl::new(&cfg, vb).map_err(component_error(name, "vae"));
    }
    let file = crate::checkpoint::VaeFile::open(path, name)?;
    let config = VaeConfig {
        scaling_factor,
        ..file.config.clone()
    };
    AutoencoderKl::new(&config, file.var_builder(dtype_for(&config), device))
        .map_err(component_error(name, "vae"))
}

/// Classifies an existing path as a model, refusing pickles and anything else.
fn location_of(path: &Path, id: &str) -> Result<ModelLocation> {
    let name = path.to_string_lossy().to_string();
    if path.is_dir() {
        if !path.join("model_index.json").is_file() {
            return Err(EngineError::model(
                id,
                format!("{name} has no model_index.json: not a diffusers model folder"),
            ));
        }
        return Ok(ModelLocation {
            id: id.to_string(),
            path: path.to_path_buf(),
            format: ModelFormat::Diffusers,
        });
    }
    let lower = name.to_lowercase();
    if PICKLE_ENDINGS.iter().any(|ext| lower.ends_with(ext)) {
        return Err(pickle_error(id));
    }
    if lower.ends_with(".safetensors") {
        return Ok(ModelLocation {
            id: id.to_string(),
            path: path.to_path_buf(),
            format: ModelFormat::SingleFile,
        });
    }
    Err(EngineError::model(
        id,
        format!("{name} is neither a diffusers folder nor a .safetensors checkpoint"),
    ))
}

/// What a model is for, from its UNet's input channels, without loading its weights (reads the UNet config, or
/// a single file's header).
pub fn peek_kind(location: &ModelLocation) -> Result<ModelKind> {
    let in_channels = match location.format {
        ModelFormat::Diffusers => {
            let cfg: UNetConfig = read_json(&location.id, &location.path.join("unet/config.json"))?;
            if cfg.is_sdxl() && cfg.in_channels != 4 {
                return Err(EngineError::model(
                    &location.id,
                    format!(
                        "an SDXL UNet with {} input channels (InstructPix2Pix or inpainting) is not \
                         supported; SDXL models run img2img",
                        cfg.in_channels
                    ),
                ));
            }
            cfg.in_channels
        }
        ModelFormat::SingleFile => {
            SingleFileCheckpoint::open(&location.path, &location.id)?
                .unet
                .in_channels
        }
    };
    match in_channels {
        4 => Ok(ModelKind::Img2Img),
        8 => Ok(ModelKind::Pix2Pix),
        n => Err(EngineError::model(
            &location.id,
            format!(
                "a UNet with {n} input channels is not supported (4: img2img, 8: InstructPix2Pix)"
            ),
        )),
    }
}

/// Loads a model for running on `device` with weights cast to `dtype` (memory-mapped, whatever their
/// stored precision: fp32, fp16 or bf16).
pub fn load(location: &ModelLocation, device: &Device, dtype: DType) -> Result<StableDiffusion> {
    match location.format {
        ModelFormat::Diffusers => load_diffusers(&location.path, &location.id, device, dtype),
        ModelFormat::SingleFile => load_single_file(&location.path, &location.id, device, dtype),
    }
}

/// The safetensors weight files of one component folder, preferring full precision over `.fp16` variants.
fn weight_files(id: &str, dir: &Path) -> Result<Vec<PathBuf>> {
    let component = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let entries = std::fs::read_dir(dir)
        .map_err(|_| EngineError::model(id, format!("missing component folder {component}/")))?;
    let mut safetensors = Vec::new();
    let mut pickles = false;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".safetensors") {
            safetensors.push(entry.path());
        } else if PICKLE_ENDINGS.iter().any(|ext| name.ends_with(ext)) {
            pickles = true;
        }
    }
    // diffusers names variants `<base>.<variant>.safetensors` (sharded: `<base>.<variant>-0000N-of-0000M…`):
    // take the full-precision files, else fp16, else bf16; never mix variants (e.g. `non_ema` beside the
    // plain file).
    let variant = |p: &PathBuf| -> String {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let stem = name.trim_end_matches(".safetensors");
        let stem = stem.split('-').next().unwrap_or(stem);
        stem.split_once('.')
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    };
    let mut chosen: Vec<PathBuf> = ["", "fp16", "bf16"]
        .iter()
        .map(|want| {
            safetensors
                .iter()
                .filter(|p| variant(p) == *want)
                .cloned()
                .collect::<Vec<_>>()
        })
        .find(|group| !group.is_empty())
        .unwrap_or_default();
    chosen.sort();
    if chosen.is_empty() {
        let why = if pickles {
            "has only pickled weights (.bin); they are refused because loading them can run code — \
             convert them to .safetensors"
        } else {
            "has no usable .safetensors weights (full precision, fp16 or bf16)"
        };
        return Err(EngineError::model(id, format!("{component}/ {why}")));
    }
    Ok(chosen)
}

/// Memory-maps the weights of one component folder.
pub(crate) fn component_weights(
    id: &str,
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let files = weight_files(id, dir)?;
    for f in &files {
        crate::checkpoint::check_safetensors_header(id, f)?;
    }
    // SAFETY: the files are memory-mapped read-only; like every mmap user we rely on them not being
    // truncated while the model is loaded.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| {
        EngineError::model(id, format!("cannot read weights in {}: {e}", dir.display()))
    })
}

fn component_error<'a>(
    id: &'a str,
    component: &'a str,
) -> impl Fn(candle_core::Error) -> EngineError + 'a {
    move |e| EngineError::model(id, format!("{component}: {e}"))
}

/// Refuses a diffusers folder that lacks one of `components`, naming it.
fn require_folders(dir: &Path, id: &str, components: &[&str]) -> Result<()> {
    match components.iter().find(|c| !dir.join(c).is_dir()) {
        Some(missing) => Err(EngineError::model(
            id,
            format!("missing component folder {missing}/ in {}", dir.display()),
        )),
        None => Ok(()),
    }
}

/// A diffusers folder's `unet/config.json`, checked to describe a UNet the engine can build.
fn unet_config(dir: &Path, id: &str) -> Result<UNetConfig> {
    let config: UNetConfig = read_json(id, &dir.join("unet/config.json"))?;
    config
        .validate()
        .map_err(|e| EngineError::model(id, format!("unet: {e}")))?;
    Ok(config)
}

/// Loads a diffusers-layout folder.
fn load_diffusers(dir: &Path, id: &str, device: &Device, dtype: DType) -> Result<StableDiffusion> {
    let index: ModelIndex = read_json(id, &dir.join("model_index.json"))?;
    if dir.join("text_encoder_2").is_dir() {
        return load_sdxl_diffusers(dir, id, &index, device, dtype);
    }
    require_folders(
        dir,
        id,
        &["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
    )?;
    tracing::debug!(model = id, class = %index.class_name, "loading diffusers folder");
    let unet_cfg = unet_config(dir, id)?;
    if unet_cfg.is_sdxl() {
        return Err(EngineError::model(
            id,
            "the UNet is SDXL's (addition_embed_type text_time) but the folder has no text_encoder_2/",
        ));
    }
    let vae_cfg: VaeConfig = read_json(id, &dir.join("vae/config.json"))?;
    let scheduler_path = dir.join("scheduler/scheduler_config.json");
    let scheduler_config: serde_json::Value = read_json(id, &scheduler_path)?;
    let ((tokenizer, text_encoder), text_weights) =
        load_text_tower(dir, id, "text_encoder", "tokenizer", device)?;
    let (unet_vb, unet_record) =
        Recorder::wrap_for_bf16_layers(component_weights(id, &dir.join("unet"), dtype, device)?);
    let unet = UNet::new(&unet_cfg, unet_vb).map_err(component_error(id, "unet"))?;
    let vae = AutoencoderKl::new(
        &vae_cfg,
        component_weights(id, &dir.join("vae"), dtype, device)?,
    )
    .map_err(component_error(id, "vae"))?;
    check_compatible(id, &unet_cfg, &vae_cfg, text_encoder.config())?;
    Ok(StableDiffusion::from_parts(
        id.to_string(),
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler_config,
        device.clone(),
        dtype,
    )
    .with_base_weights(unet_record.take(), vec![text_weights]))
}

/// One text encoder folder (`text_encoder/` or `text_encoder_2/`) with its tokenizer folder, the encoder in
/// float32 as every text encoder runs, and the tensors it was built from (for LoRAs).
fn load_text_tower(
    dir: &Path,
    id: &str,
    encoder: &str,
    tokenizer: &str,
    device: &Device,
) -> Result<((ClipTokenizer, ClipTextModel), NamedWeights)> {
    let cfg: ClipTextConfig = read_json(id, &dir.join(encoder).join("config.json"))?;
    cfg.validate()
        .map_err(|e| EngineError::model(id, format!("{encoder}: {e}")))?;
    let tok = ClipTokenizer::from_dir(&dir.join(tokenizer), id)?;
    let files = weight_files(id, &dir.join(encoder))?;
    let (vb, record) = Recorder::wrap(crate::checkpoint::hf_clip_text_vb(
        id,
        &files,
        DType::F32,
        device,
    )?);
    let model = ClipTextModel::new(&cfg, vb).map_err(component_error(id, encoder))?;
    Ok(((tok, model), record.take()))
}

/// Loads an SDXL diffusers folder: base (`text_encoder/` + `text_encoder_2/`) or refiner (`text_encoder_2/`
/// alone). What the micro-conditioning holds is read from the UNet's add embedding, not assumed.
fn load_sdxl_diffusers(
    dir: &Path,
    id: &str,
    index: &ModelIndex,
    device: &Device,
    dtype: DType,
) -> Result<StableDiffusion> {
    require_folders(dir, id, &["unet", "vae", "tokenizer_2", "scheduler"])?;
    tracing::debug!(model = id, class = %index.class_name, "loading SDXL diffusers folder");
    let unet_cfg = unet_config(dir, id)?;
    let vae_cfg: VaeConfig = read_json(id, &dir.join("vae/config.json"))?;
    let scheduler_config: serde_json::Value =
        read_json(id, &dir.join("scheduler/scheduler_config.json"))?;
    let mut towers = Vec::new();
    if dir.join("text_encoder").is_dir() {
        towers.push(load_text_tower(
            dir,
            id,
            "text_encoder",
            "tokenizer",
            device,
        )?);
    }
    towers.push(load_text_tower(
        dir,
        id,
        "text_encoder_2",
        "tokenizer_2",
        device,
    )?);
    let (encoders, text_weights): (Vec<_>, Vec<_>) = towers.into_iter().unzip();
    let texts: Vec<&ClipTextConfig> = encoders.iter().map(|(_, m)| m.config()).collect();
    let requires_aesthetics_score = check_sdxl_compatible(id, &unet_cfg, &vae_cfg, &texts)?;
    if !encoders.last().is_some_and(|(_, m)| m.has_projection()) {
        return Err(EngineError::model(
            id,
            "text_encoder_2 has no text_projection (an SDXL second encoder is a \
             CLIPTextModelWithProjection)",
        ));
    }
    let settings = SdxlSettings {
        force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true),
        requires_aesthetics_score,
    };
    if index
        .requires_aesthetics_score
        .is_some_and(|r| r != requires_aesthetics_score)
    {
        tracing::warn!(
            model = id,
            "model_index.json's requires_aesthetics_score disagrees with the UNet's add embedding; \
             following the UNet"
        );
    }
    let (unet_vb, unet_record) =
        Recorder::wrap_for_bf16_layers(component_weights(id, &dir.join("unet"), dtype, device)?);
    let unet = UNet::new(&unet_cfg, unet_vb).map_err(component_error(id, "unet"))?;
    let vae = AutoencoderKl::new(
        &vae_cfg,
        component_weights(
            id,
            &dir.join("vae"),
            sdxl_vae_dtype(&vae_cfg, dtype),
            device,
        )?,
    )
    .map_err(component_error(id, "vae"))?;
    Ok(StableDiffusion::sdxl_from_parts(
        id.to_string(),
        encoders,
        unet,
        vae,
        scheduler_config,
        settings,
        device.clone(),
        dtype,
    )
    .with_base_weights(unet_record.take(), text_weights))
}

/// Checks that the parts of an SDXL model fit together: the cross-attention reads the encoders' hidden
/// states side by side, the add embedding reads the last encoder's projection and 5 or 6 time ids.
/// Returns whether the ids end in an aesthetic score (5 ids: a refiner).
pub(crate) fn check_sdxl_compatible(
    id: &str,
    unet: &UNetConfig,
    vae: &VaeConfig,
    texts: &[&ClipTextConfig],
) -> Result<bool> {
    if !unet.is_sdxl() {
        return Err(EngineError::model(
            id,
            "has a second text encoder but its UNet has no SDXL add embedding (addition_embed_type text_time)",
        ));
    }
    if unet.in_channels != vae.latent_channels || unet.out_channels != vae.latent_channels {
        return Err(EngineError::model(
            id,
            format!(
                "unet in/out channels {}/{} do not fit the VAE's {} latent channels (SDXL InstructPix2Pix and \
                 inpainting models are not supported)",
                unet.in_channels, unet.out_channels, vae.latent_channels
            ),
        ));
    }
    let width: usize = texts.iter().map(|t| t.hidden_size).sum();
    if unet.cross_attention_dim != width {
        return Err(EngineError::model(
            id,
            format!(
                "unet cross_attention_dim {} does not match the text encoders' hidden sizes (together {width})",
                unet.cross_attention_dim
            ),
        ));
    }
    let projection = texts.last().and_then(|t| t.projection_dim).unwrap_or(0);
    let time = unet.addition_time_embed_dim.unwrap_or(0);
    let input = unet.projection_class_embeddings_input_dim.unwrap_or(0);
    match input.checked_sub(projection) {
        Some(rest) if time > 0 && rest == 5 * time => Ok(true),
        Some(rest) if time > 0 && rest == 6 * time => Ok(false),
        _ => Err(EngineError::model(
            id,
            format!(
                "the UNet's add embedding reads {input} values, which is not the text projection ({projection}) \
                 plus 5 or 6 time ids of {time}"
            ),
        )),
    }
}

/// Checks that the components of one model fit together.
pub(crate) fn check_compatible(
    id: &str,
    unet: &UNetConfig,
    vae: &VaeConfig,
    text: &ClipTextConfig,
) -> Result<()> {
    if unet.cross_attention_dim != text.hidden_size {
        return Err(EngineError::model(
            id,
            format!(
                "unet cross_attention_dim {} does not match the text encoder's hidden size {}",
                unet.cross_attention_dim, text.hidden_size
            ),
        ));
    }
    let image_channels = unet.in_channels.checked_sub(vae.latent_channels);
    if !matches!(image_channels, Some(0) | Some(4)) || unet.out_channels != vae.latent_channels {
        return Err(EngineError::model(
            id,
            format!(
                "unet in/out channels {}/{} do not fit the VAE's {} latent channels",
                unet.in_channels, unet.out_channels, vae.latent_channels
            ),
        ));
    }
    Ok(())
}

/// Loads a single-file LDM checkpoint: architecture inferred from its tensor shapes, CLIP's bundled
/// tokenizer, the family's standard scheduler config (see [`crate::checkpoint`]).
fn load_single_file(
    path: &Path,
    id: &str,
    device: &Device,
    dtype: DType,
) -> Result<StableDiffusion> {
    let ck = SingleFileCheckpoint::open(path, id)?;
    if ck.family == crate::checkpoint::Family::Sdxl {
        return load_sdxl_single_file(&ck, id, device, dtype);
    }
    check_compatible(id, &ck.unet, &ck.vae, &ck.text)?;
    let tokenizer = ClipTokenizer::bundled(ck.pad_token)?;
    let (text_vb, text_record) = Recorder::wrap(ck.text_encoder_vb(DType::F32, device)?);
    let text_encoder =
        ClipTextModel::new(&ck.text, text_vb).map_err(component_error(id, "text encoder"))?;
    let (unet_vb, unet_record) = Recorder::wrap_for_bf16_layers(ck.unet_vb(dtype, device)?);
    let unet = UNet::new(&ck.unet, unet_vb).map_err(component_error(id, "unet"))?;
    let vae = AutoencoderKl::new(&ck.vae, ck.vae_vb(dtype, device)?)
        .map_err(component_error(id, "vae"))?;
    Ok(StableDiffusion::from_parts(
        id.to_string(),
        tokenizer,
        text_encoder,
        unet,
        vae,
        ck.scheduler_config.clone(),
        device.clone(),
        dtype,
    )
    .with_base_weights(unet_record.take(), vec![text_record.take()]))
}

/// The dtype an SDXL model's VAE runs in: float32 when the model runs in float16 and the VAE says
/// `force_upcast` (SDXL's VAE overflows in float16; diffusers' SDXL pipelines upcast it the same way).
fn sdxl_vae_dtype(vae: &VaeConfig, dtype: DType) -> DType {
    if dtype == DType::F16 && vae.force_upcast {
        DType::F32
    } else {
        dtype
    }
}

/// Loads an SDXL single-file checkpoint (base or refiner): CLIP's bundled tokenizer for each text encoder
/// (pad `<|endoftext|>` for CLIP-L, `!` for ViT-bigG), SDXL's scheduler config; a refiner (5 time ids)
/// encodes a missing negative prompt as "" as the released refiner's pipeline config says.
fn load_sdxl_single_file(
    ck: &SingleFileCheckpoint,
    id: &str,
    device: &Device,
    dtype: DType,
) -> Result<StableDiffusion> {
    let mut configs = vec![&ck.text];
    configs.extend(ck.text_2.as_ref());
    let requires_aesthetics_score = check_sdxl_compatible(id, &ck.unet, &ck.vae, &configs)?;
    let (vb, record) = Recorder::wrap(ck.text_encoder_vb(DType::F32, device)?);
    let mut encoders = vec![(
        ClipTokenizer::bundled(ck.pad_token)?,
        ClipTextModel::new(&ck.text, vb).map_err(component_error(id, "text encoder"))?,
    )];
    let mut text_weights = vec![record.take()];
    if let Some(text_2) = &ck.text_2 {
        let (vb, record) = Recorder::wrap(ck.text_encoder_2_vb(DType::F32, device)?);
        encoders.push((
            ClipTokenizer::bundled("!")?,
            ClipTextModel::new(text_2, vb).map_err(component_error(id, "text encoder 2"))?,
        ));
        text_weights.push(record.take());
    }
    let (unet_vb, unet_record) = Recorder::wrap_for_bf16_layers(ck.unet_vb(dtype, device)?);
    let unet = UNet::new(&ck.unet, unet_vb).map_err(component_error(id, "unet"))?;
    let vae_dtype = sdxl_vae_dtype(&ck.vae, dtype);
    let vae = AutoencoderKl::new(&ck.vae, ck.vae_vb(vae_dtype, device)?)
        .map_err(component_error(id, "vae"))?;
    Ok(StableDiffusion::sdxl_from_parts(
        id.to_string(),
        encoders,
        unet,
        vae,
        ck.scheduler_config.clone(),
        SdxlSettings {
            force_zeros_for_empty_prompt: !requires_aesthetics_score,
            requires_aesthetics_score,
        },
        device.clone(),
        dtype,
    )
    .with_base_weights(unet_record.take(), text_weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder_with(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let unet = dir.path().join("unet");
        std::fs::create_dir(&unet).unwrap();
        for f in files {
            std::fs::write(unet.join(f), b"").unwrap();
        }
        dir
    }

    fn chosen(files: &[&str]) -> Vec<String> {
        let dir = folder_with(files);
        weight_files("m", &dir.path().join("unet"))
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect()
    }

    #[test]
    fn embeddings_resolve_by_name_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = ModelsDir::new(root.path());
        std::fs::create_dir(dir.embeddings()).unwrap();
        std::fs::write(dir.embeddings().join("style.pt"), b"").unwrap();
        std::fs::write(dir.embeddings().join("both.bin"), b"").unwrap();
        std::fs::write(dir.embeddings().join("both.safetensors"), b"").unwrap();
        assert_eq!(
            dir.resolve_embedding("style").unwrap(),
            dir.embeddings().join("style.pt")
        );
        assert_eq!(
            dir.resolve_embedding("both").unwrap(),
            dir.embeddings().join("both.safetensors")
        );
        let e = dir.resolve_embedding("nope").unwrap_err().to_string();
        assert!(
            e.contains("no embedding nope") && e.contains("nope.bin"),
            "{e}"
        );
        for bad in ["", "../style", "a/b", "a\\b", ".hidden"] {
            let e = dir.resolve_embedding(bad).unwrap_err();
            assert!(e.to_string().contains("not a valid name"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn weight_files_prefer_full_precision_and_never_mix_variants() {
        let plain = "diffusion_pytorch_model.safetensors";
        let fp16 = "diffusion_pytorch_model.fp16.safetensors";
        let non_ema = "diffusion_pytorch_model.non_ema.safetensors";
        assert_eq!(chosen(&[plain, fp16, non_ema]), vec![plain]);
        assert_eq!(chosen(&[fp16, non_ema]), vec![fp16]);
        let shards = [
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            "diffusion_pytorch_model-00002-of-00002.safetensors",
            "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        ];
        assert_eq!(chosen(&shards), shards[..2].to_vec());
        let dir = folder_with(&[non_ema, "diffusion_pytorch_model.bin"]);
        let err = weight_files("m", &dir.path().join("unet"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pickled"), "{err}");
    }
}
