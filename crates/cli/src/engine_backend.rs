//! The service's [`Backend`] made of the engine: the models folder, a memory-bounded cache of loaded models, and
//! the img2img / pix2pix pipelines.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use image::RgbImage;
use pictor_engine::image_io::{decode_image, encode_png_with_text};
use pictor_engine::model_store::{self, ModelFormat, ModelLocation, ModelsDir};
use pictor_engine::models::TomeSettings;
use pictor_engine::pipeline::{
    check_prompt_size, GenerateRequest, Mode, ModelKind, Progress, StableDiffusion,
};
use pictor_engine::safety::{replace_flagged, Replacement, SafetyChecker};
use pictor_engine::schedulers::{SchedulerOptions, SCHEDULER_NAMES};
use pictor_engine::{EngineError, Runtime};
use pictor_server::backend::{
    Backend, BackendError, Generated, GenerationRequest, JobControl, ModelInfo, ModelSource,
    PipelineKind, SafetyReplacement, SystemInfo,
};

/// Largest init image the engine decodes (the service checked it already; this is a second guard).
const MAX_PIXELS: u64 = 64 * 1024 * 1024;

struct Cached {
    model: Arc<StableDiffusion>,
    bytes: u64,
    last_used: u64,
}

/// Loaded models, least recently used evicted first when the byte budget is exceeded.
#[derive(Default)]
struct Cache {
    models: HashMap<String, Cached>,
    clock: u64,
}

/// The engine behind the HTTP service.
pub struct EngineBackend {
    models_dir: ModelsDir,
    runtime: Runtime,
    budget: u64,
    cache: Mutex<Cache>,
    /// Held while a model loads, so two jobs never load the same model twice at once.
    loading: Mutex<()>,
    /// `--safety-checker`: the checker every model uses (else each model's own `safety_checker/`).
    safety_checker: Option<PathBuf>,
    /// Loaded safety checkers by path.
    checkers: Mutex<HashMap<PathBuf, Arc<SafetyChecker>>>,
}

impl EngineBackend {
    /// A backend over `models_dir`, keeping at most `budget_bytes` of weights loaded (always at least one model).
    pub fn new(models_dir: ModelsDir, runtime: Runtime, budget_bytes: u64) -> Self {
        EngineBackend {
            models_dir,
            runtime,
            budget: budget_bytes,
            cache: Mutex::new(Cache::default()),
            loading: Mutex::new(()),
            safety_checker: None,
            checkers: Mutex::new(HashMap::new()),
        }
    }

    /// Uses the safety checker at `path` (a checker folder, or a model folder holding `safety_checker/`) for
    /// every model.
    pub fn with_safety_checker(mut self, path: Option<PathBuf>) -> Self {
        self.safety_checker = path;
        self
    }

    /// The safety checker for `model_id`, loaded once; `None` when there is none.
    fn checker_for(
        &self,
        model_id: Option<&str>,
    ) -> Result<Option<Arc<SafetyChecker>>, BackendError> {
        let path = match model_id {
            Some(id) => {
                let location = self.models_dir.resolve_id(id).map_err(engine_error)?;
                model_store::safety_checker_path(self.safety_checker.as_deref(), &location)
            }
            None => self.safety_checker.clone().or_else(|| {
                let models = self.models_dir.list().ok()?;
                models
                    .iter()
                    .find_map(|m| model_store::safety_checker_path(None, m))
            }),
        };
        let Some(path) = path else {
            return Ok(None);
        };
        let mut checkers = self.checkers.lock().expect("safety checkers");
        if let Some(c) = checkers.get(&path) {
            return Ok(Some(c.clone()));
        }
        let checker =
            Arc::new(SafetyChecker::load(&path, &self.runtime.device).map_err(engine_error)?);
        checkers.insert(path, checker.clone());
        Ok(Some(checker))
    }

    fn cached(&self, id: &str) -> Option<Arc<StableDiffusion>> {
        let mut cache = self.cache.lock().expect("model cache");
        cache.clock += 1;
        let now = cache.clock;
        cache.models.get_mut(id).map(|c| {
            c.last_used = now;
            c.model.clone()
        })
    }

    fn model(&self, id: &str) -> Result<Arc<StableDiffusion>, BackendError> {
        if let Some(m) = self.cached(id) {
            return Ok(m);
        }
        let _guard = self.loading.lock().expect("model loading");
        if let Some(m) = self.cached(id) {
            return Ok(m);
        }
        let location = self.models_dir.resolve_id(id).map_err(engine_error)?;
        let bytes = weight_bytes(&location);
        tracing::info!(model = id, mib = bytes >> 20, "loading model");
        let model = Arc::new(
            model_store::load(&location, &self.runtime.device, self.runtime.dtype)
                .map_err(engine_error)?,
        );
        self.insert(id.to_string(), model.clone(), bytes);
        Ok(model)
    }

    /// Caches `model` under `key`, evicting the least recently used ones beyond the budget.
    fn insert(&self, key: String, model: Arc<StableDiffusion>, bytes: u64) {
        let mut cache = self.cache.lock().expect("model cache");
        let mut used: u64 = cache.models.values().map(|c| c.bytes).sum();
        while used + bytes > self.budget && !cache.models.is_empty() {
            let oldest = cache
                .models
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| k.clone())
                .expect("non-empty");
            if let Some(evicted) = cache.models.remove(&oldest) {
                used -= evicted.bytes;
                tracing::info!(model = %oldest, "unloaded model to stay within the memory budget");
            }
        }
        cache.clock += 1;
        let last_used = cache.clock;
        cache.models.insert(
            key,
            Cached {
                model,
                bytes,
                last_used,
            },
        );
    }
}

impl EngineBackend {
    /// The model a request runs on: the loaded model itself, or a cached variant of it with the request's
    /// LoRAs merged and its VAE swapped in (made once per model, LoRA set and VAE, then reused).
    fn model_for(&self, request: &GenerationRequest) -> Result<Arc<StableDiffusion>, BackendError> {
        let base = self.model(&request.model_id)?;
        if request.loras.is_empty() && request.vae.is_none() {
            return Ok(base);
        }
        let key = variant_key(request);
        if let Some(m) = self.cached(&key) {
            return Ok(m);
        }
        let _guard = self.loading.lock().expect("model loading");
        if let Some(m) = self.cached(&key) {
            return Ok(m);
        }
        let loras: Vec<(String, f64)> = request
            .loras
            .iter()
            .map(|l| (l.name.clone(), l.strength))
            .collect();
        let model = model_store::variant(&base, &self.models_dir, &loras, request.vae.as_deref())
            .map_err(engine_error)?;
        let mut bytes = model.extra_bytes();
        if let Some(name) = &request.vae {
            bytes += files_bytes(&self.models_dir.resolve_vae(name).map_err(engine_error)?);
        }
        tracing::info!(variant = %key, mib = bytes >> 20, "made a model variant");
        let model = Arc::new(model);
        self.insert(key, model.clone(), bytes);
        Ok(model)
    }
}

/// The folder and file a new entry `id` of `dir` would take, after checking neither exists (`field` names the
/// id in the error). Creates `dir`.
fn new_entry(dir: &Path, id: &str, field: &str) -> Result<(PathBuf, PathBuf), BackendError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| BackendError::Failed(format!("{}: {e}", dir.display())))?;
    let folder = dir.join(id);
    let file = dir.join(format!("{id}.safetensors"));
    if folder.exists() || file.exists() {
        return Err(BackendError::Invalid {
            field: field.into(),
            message: format!("{id} already exists"),
        });
    }
    Ok((folder, file))
}

/// Writes `bytes` to `file` through a hidden staging file, only if `check` accepts the staged file.
fn place_checked(
    file: &Path,
    bytes: &[u8],
    check: impl FnOnce(&Path) -> Result<(), EngineError>,
) -> Result<(), BackendError> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let staging = file.with_file_name(format!(".{name}.partial"));
    std::fs::write(&staging, bytes)
        .map_err(|e| BackendError::Failed(format!("{}: {e}", staging.display())))?;
    if let Err(e) = check(&staging) {
        let _ = std::fs::remove_file(&staging);
        return Err(engine_error(e));
    }
    std::fs::rename(&staging, file)
        .map_err(|e| BackendError::Failed(format!("{}: {e}", file.display())))
}

/// The engine's replacement for the service's `safety_checker_type`.
fn replacement(kind: SafetyReplacement) -> Replacement {
    match kind {
        SafetyReplacement::Blur => Replacement::Blur,
        SafetyReplacement::Pixelate => Replacement::Pixelate,
        SafetyReplacement::Black => Replacement::Black,
        SafetyReplacement::SensitiveContentText => Replacement::SensitiveContentText,
    }
}

/// The cache key of a model with LoRAs and a VAE: `model|lora:a@0.8,b@1|vae:x`.
fn variant_key(request: &GenerationRequest) -> String {
    let loras: Vec<String> = request
        .loras
        .iter()
        .map(|l| format!("{}@{}", l.name, l.strength))
        .collect();
    format!(
        "{}|lora:{}|vae:{}",
        request.model_id,
        loras.join(","),
        request.vae.as_deref().unwrap_or("")
    )
}

/// The names in `dir`: files with one of `extensions` (without it) and, with `folders`, sub-folders; hidden
/// entries skipped; sorted.
fn names_in(dir: &Path, extensions: &[&str], folders: bool) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let path = e.path();
                    let name = e.file_name().to_string_lossy().to_string();
                    if name.starts_with('.') {
                        return None;
                    }
                    if folders && path.is_dir() {
                        return Some(name);
                    }
                    let ext = path.extension()?.to_str()?;
                    extensions
                        .contains(&ext)
                        .then(|| path.file_stem()?.to_str().map(str::to_string))
                        .flatten()
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.dedup();
    names
}

/// Bytes of weights a model holds in memory, estimated from its files on disk.
fn weight_bytes(location: &ModelLocation) -> u64 {
    files_bytes(&location.path)
}

/// Bytes of the `.safetensors` files at `path` (a file or a folder, recursively).
fn files_bytes(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && path.extension().is_some_and(|e| e == "safetensors") => m.len(),
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| files_bytes(&e.path())).sum())
            .unwrap_or(0),
        _ => 0,
    }
}

fn engine_error(e: EngineError) -> BackendError {
    match e {
        EngineError::InvalidRequest { field, message } => BackendError::Invalid {
            field: field.to_string(),
            message,
        },
        EngineError::ModelNotFound(id) => BackendError::ModelNotFound(id),
        EngineError::Cancelled => BackendError::Cancelled,
        EngineError::Unsupported(what) => {
            BackendError::Unsupported(format!("{what} is not supported yet"))
        }
        other => BackendError::Failed(other.to_string()),
    }
}

/// Relays the engine's progress to the service's job control.
struct Relay<'a>(&'a dyn JobControl);

impl Progress for Relay<'_> {
    fn on_step(&mut self, done: usize, total: usize) {
        self.0.on_step(done, total);
    }
    fn cancelled(&self) -> bool {
        self.0.cancelled()
    }
}

/// The engine's request for the service's canonical one, with its decoded init image (when its kind takes
/// one) and the embeddings loaded from the models folder.
fn engine_request(
    request: &GenerationRequest,
    init_image: Option<RgbImage>,
    models_dir: &ModelsDir,
) -> Result<GenerateRequest, BackendError> {
    let mut init_image = init_image;
    let mut init = || {
        init_image.take().ok_or_else(|| BackendError::Invalid {
            field: "init_image".into(),
            message: "this request needs an init image".into(),
        })
    };
    let mode = match request.kind {
        PipelineKind::Text2Img => Mode::Text2Img,
        PipelineKind::Img2Img => Mode::Img2Img {
            init_image: init()?,
            strength: request.strength,
        },
        PipelineKind::Pix2Pix => Mode::Pix2Pix {
            init_image: init()?,
            image_guidance_scale: request.image_guidance_scale,
        },
    };
    Ok(GenerateRequest {
        mode,
        prompt: request.prompt.clone(),
        negative_prompt: request.negative_prompt.clone(),
        width: request.width,
        height: request.height,
        samples: request.samples as usize,
        num_inference_steps: request.steps as usize,
        guidance_scale: request.guidance_scale,
        seed: Some(request.seed),
        scheduler: request.scheduler.clone(),
        scheduler_options: SchedulerOptions {
            use_karras_sigmas: Some(request.use_karras_sigmas),
            algorithm_type: request.algorithm_type.clone(),
        },
        clip_skip: request.clip_skip as usize,
        embeddings: models_dir
            .load_embeddings(&request.embeddings)
            .map_err(engine_error)?,
        tome: request.tomesd.then(TomeSettings::default),
    })
}

impl Backend for EngineBackend {
    fn models_root(&self) -> Option<std::path::PathBuf> {
        Some(self.models_dir.root().to_path_buf())
    }

    fn models(&self) -> Result<Vec<ModelInfo>, BackendError> {
        let found = self.models_dir.list().map_err(engine_error)?;
        let loaded: Vec<String> = self
            .cache
            .lock()
            .expect("model cache")
            .models
            .keys()
            .cloned()
            .collect();
        let mut models = Vec::new();
        for location in found {
            let kind = match model_store::peek_kind(&location) {
                Ok(ModelKind::Img2Img) => PipelineKind::Img2Img,
                Ok(ModelKind::Pix2Pix) => PipelineKind::Pix2Pix,
                Err(e) => {
                    tracing::debug!(model = %location.id, error = %e, "skipping a model that cannot run");
                    continue;
                }
            };
            let added_at = std::fs::metadata(&location.path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            models.push(ModelInfo {
                loaded: loaded.contains(&location.id),
                id: location.id,
                kind,
                format: match location.format {
                    ModelFormat::Diffusers => "diffusers".into(),
                    ModelFormat::SingleFile => "single_file".into(),
                },
                added_at,
            });
        }
        Ok(models)
    }

    fn schedulers(&self) -> Vec<String> {
        SCHEDULER_NAMES.iter().map(|s| s.to_string()).collect()
    }

    fn loras(&self) -> Vec<String> {
        names_in(&self.models_dir.loras(), &["safetensors"], false)
    }

    fn vaes(&self) -> Vec<String> {
        names_in(&self.models_dir.vaes(), &["safetensors"], true)
    }

    fn embeddings(&self) -> Vec<String> {
        names_in(
            &self.models_dir.embeddings(),
            &["safetensors", "pt", "bin"],
            false,
        )
    }

    fn generate(
        &self,
        request: &GenerationRequest,
        init_image: Option<&[u8]>,
        control: &dyn JobControl,
    ) -> Result<Generated, BackendError> {
        let model = self.model_for(request)?;
        let init = init_image
            .map(|bytes| decode_image(bytes, MAX_PIXELS))
            .transpose()
            .map_err(engine_error)?;
        let engine_request = engine_request(request, init, &self.models_dir)?;
        let generation = model.generate(&engine_request, &mut Relay(control));
        // The activations and the kernels' buffers are freed: their memory goes back to the kernel
        // until the next request.
        pictor_engine::kernels::release_buffers();
        crate::huge_pages::give_back_free_memory();
        let generation = generation.map_err(engine_error)?;
        let mut images = generation.images;
        let mut nsfw_content_detected = Vec::new();
        let mut notes = Vec::new();
        if let Some(kind) = request.safety_checker {
            match self.checker_for(Some(&request.model_id))? {
                Some(checker) => {
                    let flags = checker.check(&images).map_err(engine_error)?;
                    replace_flagged(&mut images, &flags, replacement(kind));
                    nsfw_content_detected = flags;
                }
                None => notes.push(
                    "no safety checker is installed (the model has no safety_checker/ folder and the server \
                     has no --safety-checker): images were not checked"
                        .to_string(),
                ),
            }
        }
        let png_images = images
            .iter()
            .map(|image| {
                encode_png_with_text(
                    image,
                    "parameters",
                    &pictor_server::infotext::format(request, &generation.meta.scheduler),
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(engine_error)?;
        Ok(Generated {
            png_images,
            scheduler: generation.meta.scheduler.clone(),
            generation_time: generation.meta.generation_time,
            nsfw_content_detected,
            notes,
        })
    }

    fn add_model(&self, model_id: &str, source: ModelSource) -> Result<(), BackendError> {
        let dir = self.models_dir.checkpoints();
        let (folder, file) = new_entry(&dir, model_id, "model_id")?;
        match source {
            ModelSource::HuggingFace { repo, revision } => {
                let staging = dir.join(format!(".pull-{model_id}"));
                let _ = std::fs::remove_dir_all(&staging);
                std::fs::create_dir_all(&staging)
                    .map_err(|e| BackendError::Failed(format!("{}: {e}", staging.display())))?;
                let pulled = pictor_engine::hub::pull(&repo, &staging, revision.as_deref());
                let result = pulled.map_err(engine_error).and_then(|path| {
                    std::fs::rename(&path, &folder)
                        .map_err(|e| BackendError::Failed(format!("{}: {e}", folder.display())))
                });
                let _ = std::fs::remove_dir_all(&staging);
                result?;
            }
            // Anything that is not a complete Stable Diffusion checkpoint is refused before it becomes a model.
            ModelSource::SingleFile { bytes } => place_checked(&file, &bytes, |staged| {
                pictor_engine::checkpoint::SingleFileCheckpoint::open(staged, model_id).map(|_| ())
            })?,
        }
        let location = self.models_dir.resolve_id(model_id).map_err(engine_error)?;
        model_store::peek_kind(&location).map_err(engine_error)?;
        Ok(())
    }

    fn check(&self, request: &GenerationRequest) -> Result<(), BackendError> {
        check_prompt_size(&request.prompt, "prompt").map_err(engine_error)?;
        check_prompt_size(&request.negative_prompt, "negative_prompt").map_err(engine_error)?;
        for lora in &request.loras {
            self.models_dir
                .resolve_lora(&lora.name)
                .map_err(engine_error)?;
        }
        if let Some(vae) = &request.vae {
            self.models_dir.resolve_vae(vae).map_err(engine_error)?;
        }
        for name in &request.embeddings {
            self.models_dir
                .resolve_embedding(name)
                .map_err(engine_error)?;
        }
        // A loaded model checks the rest now (mode, clip skip, scheduler, embeddings' architecture); loading
        // one here would hold the request for seconds, so an unloaded model's job checks them when it runs.
        if let Some(model) = self.cached(&request.model_id) {
            // validate() does not read the image: a placeholder stands in for it.
            let placeholder = request.kind.takes_image().then(|| RgbImage::new(8, 8));
            let engine_request = engine_request(request, placeholder, &self.models_dir)?;
            model.validate(&engine_request).map_err(engine_error)?;
        }
        Ok(())
    }

    fn check_image(&self, image: &[u8]) -> Result<bool, BackendError> {
        let checker = self.checker_for(None)?.ok_or_else(|| {
            BackendError::Unsupported(
                "no safety checker is installed: start the server with --safety-checker PATH or add a model \
                 with a safety_checker/ folder"
                    .into(),
            )
        })?;
        let image = decode_image(image, MAX_PIXELS).map_err(engine_error)?;
        let flags = checker.check(&[image]).map_err(engine_error)?;
        Ok(flags.first().copied().unwrap_or(false))
    }

    fn add_vae(&self, vae_id: &str, source: ModelSource) -> Result<(), BackendError> {
        let (folder, file) = new_entry(&self.models_dir.vaes(), vae_id, "vae_id")?;
        match source {
            ModelSource::HuggingFace { repo, revision } => {
                pictor_engine::hub::pull_vae(&repo, &folder, revision.as_deref())
                    .map_err(engine_error)?;
            }
            ModelSource::SingleFile { bytes } => place_checked(&file, &bytes, |staged| {
                pictor_engine::checkpoint::VaeFile::open(staged, vae_id).map(|_| ())
            })?,
        }
        Ok(())
    }

    fn delete_model(&self, model_id: &str) -> Result<(), BackendError> {
        let location = self.models_dir.resolve_id(model_id).map_err(engine_error)?;
        let variants = format!("{model_id}|");
        self.cache
            .lock()
            .expect("model cache")
            .models
            .retain(|key, _| key != model_id && !key.starts_with(&variants));
        let removed = match location.format {
            ModelFormat::Diffusers => std::fs::remove_dir_all(&location.path),
            ModelFormat::SingleFile => std::fs::remove_file(&location.path),
        };
        removed.map_err(|e| BackendError::Failed(format!("cannot delete {model_id}: {e}")))
    }

    fn clear_cache(&self) {
        self.cache.lock().expect("model cache").models.clear();
    }

    fn system(&self) -> SystemInfo {
        let cache = self.cache.lock().expect("model cache");
        let mut loaded: Vec<String> = cache.models.keys().cloned().collect();
        loaded.sort();
        SystemInfo {
            device: if self.runtime.device.is_cpu() {
                "cpu".into()
            } else {
                format!("{:?}", self.runtime.device)
            },
            dtype: format!("{:?}", self.runtime.dtype).to_lowercase(),
            loaded_models: loaded,
            model_memory_bytes: cache.models.values().map(|c| c.bytes).sum(),
            model_memory_budget_bytes: self.budget,
        }
    }
}
