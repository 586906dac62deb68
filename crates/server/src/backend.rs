//! The seam between the service and whatever generates images: the canonical request the dialects produce,
//! and the [`Backend`] trait the `pictor` binary implements with the engine. Nothing here knows about HTTP.

use serde::{Deserialize, Serialize};

/// Which pipeline a request runs (and, for a model, which pipelines it serves: a 4-channel model is listed as
/// `Img2Img` and also serves text-to-image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipelineKind {
    /// Stable Diffusion text-to-image (4-channel UNet).
    #[serde(rename = "txt2img")]
    Text2Img,
    /// Stable Diffusion img2img (4-channel UNet).
    #[serde(rename = "img2img")]
    Img2Img,
    /// InstructPix2Pix (8-channel UNet).
    #[serde(rename = "pix2pix")]
    Pix2Pix,
}

impl PipelineKind {
    /// The kind of model that runs it: text-to-image runs on img2img (4-channel) models.
    pub fn model_kind(self) -> PipelineKind {
        match self {
            PipelineKind::Text2Img => PipelineKind::Img2Img,
            other => other,
        }
    }

    /// Whether it starts from an init image.
    pub fn takes_image(self) -> bool {
        self != PipelineKind::Text2Img
    }
}

/// One generation, fully resolved: every default applied, the seed chosen, the model picked. This is what the job
/// store keeps, so a job re-run after a restart gives the same images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    /// txt2img, img2img or pix2pix.
    pub kind: PipelineKind,
    /// The model id in the models folder.
    pub model_id: String,
    /// The prompt.
    pub prompt: String,
    /// The negative prompt ("" for none).
    pub negative_prompt: String,
    /// Output width in pixels (a multiple of 8).
    pub width: u32,
    /// Output height in pixels (a multiple of 8).
    pub height: u32,
    /// Number of images.
    pub samples: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// img2img strength (0–1); unused by pix2pix.
    pub strength: f64,
    /// pix2pix image guidance scale; unused by img2img.
    pub image_guidance_scale: f64,
    /// Scheduler name as the API spells it; `None` = the model's own.
    pub scheduler: Option<String>,
    /// Karras sigmas for the schedulers that support them.
    pub use_karras_sigmas: bool,
    /// DPM-Solver algorithm type, when given.
    pub algorithm_type: Option<String>,
    /// The seed (a random one was drawn at accept time when the request had none).
    pub seed: u64,
    /// CLIP skip, AUTOMATIC1111 convention (1 = last layer).
    pub clip_skip: u32,
    /// LoRAs merged into the model for this request, in order.
    #[serde(default)]
    pub loras: Vec<LoraChoice>,
    /// A VAE from the models folder replacing the model's own.
    #[serde(default)]
    pub vae: Option<String>,
    /// Textual-inversion embeddings (names in the models folder) the prompts may use.
    #[serde(default)]
    pub embeddings: Vec<String>,
    /// Token merging (ToMe) in the UNet's self-attention.
    #[serde(default)]
    pub tomesd: bool,
    /// How flagged images are replaced when the safety checker runs; `None` = no check asked for.
    #[serde(default)]
    pub safety_checker: Option<SafetyReplacement>,
}

/// One LoRA of a request and its strength.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraChoice {
    /// The file name in the models folder's `loras/`, without `.safetensors`.
    pub name: String,
    /// How strongly it applies (1 = as trained).
    pub strength: f64,
}

/// What replaces an image the safety checker flags (`safety_checker_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafetyReplacement {
    /// Blurred beyond recognition.
    Blur,
    /// Coarse blocks of colour.
    Pixelate,
    /// An all-black image.
    Black,
    /// Blurred, with a readable "sensitive content" notice.
    SensitiveContentText,
}

impl SafetyReplacement {
    /// Every replacement, by its API name.
    pub const ALL: [(&'static str, SafetyReplacement); 4] = [
        ("blur", SafetyReplacement::Blur),
        ("pixelate", SafetyReplacement::Pixelate),
        ("black", SafetyReplacement::Black),
        (
            "sensitive_content_text",
            SafetyReplacement::SensitiveContentText,
        ),
    ];

    /// The replacement an API name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
            .map(|(_, r)| *r)
    }

    /// Its API name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, r)| *r == self)
            .map(|(n, _)| *n)
            .expect("every replacement is listed")
    }
}

/// What a backend produced for one request.
#[derive(Debug, Clone)]
pub struct Generated {
    /// One PNG file per sample.
    pub png_images: Vec<Vec<u8>>,
    /// The scheduler that ran.
    pub scheduler: String,
    /// Seconds spent generating.
    pub generation_time: f64,
    /// Per image, whether the safety checker flagged it (and it was replaced); empty when no check ran.
    pub nsfw_content_detected: Vec<bool>,
    /// Facts the requester should know about how the request was served (e.g. no safety checker installed).
    pub notes: Vec<String>,
}

/// Why a backend call failed. `Invalid` and `ModelNotFound` are the requester's fault.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// A request value the backend cannot honour (the field is named).
    #[error("{field}: {message}")]
    Invalid {
        /// The API field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// No such model.
    #[error("Model id not found: {0}")]
    ModelNotFound(String),
    /// The job was cancelled (queue cleared).
    #[error("cancelled")]
    Cancelled,
    /// A capability not available in this build.
    #[error("{0}")]
    Unsupported(String),
    /// Anything else; the message is shown to the user.
    #[error("{0}")]
    Failed(String),
}

/// A model the backend can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// The id requests use.
    pub id: String,
    /// Which pipeline it serves.
    pub kind: PipelineKind,
    /// "diffusers" or "single_file".
    pub format: String,
    /// Whether it is in memory now.
    pub loaded: bool,
    /// When it arrived in the models folder (seconds since the Unix epoch), if known.
    pub added_at: Option<u64>,
}

/// Where `load_model` takes a model from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face repo id (`owner/name`) in diffusers layout.
    HuggingFace {
        /// The repo id.
        repo: String,
        /// Branch or revision (`fp16` and friends).
        revision: Option<String>,
    },
    /// Bytes of a single-file `.safetensors` checkpoint the service downloaded itself (the server does the
    /// download so the address rules apply).
    SingleFile {
        /// The checkpoint file's bytes.
        bytes: Vec<u8>,
    },
}

/// Facts for `system_details`.
#[derive(Debug, Clone, Serialize)]
pub struct SystemInfo {
    /// "cpu", "cuda:0", …
    pub device: String,
    /// "f32", "f16", …
    pub dtype: String,
    /// Ids of the models in memory.
    pub loaded_models: Vec<String>,
    /// Bytes of model weights in memory (estimate).
    pub model_memory_bytes: u64,
    /// The budget for loaded models, in bytes.
    pub model_memory_budget_bytes: u64,
}

/// What a running generation reports and asks.
pub trait JobControl: Send + Sync {
    /// A denoising step finished (`done` of `total`).
    fn on_step(&self, done: usize, total: usize);
    /// True when the job should stop.
    fn cancelled(&self) -> bool;
}

/// The image generator behind the service. Every method may block for a long time (model loads, generation);
/// the service calls them from blocking threads only.
pub trait Backend: Send + Sync + 'static {
    /// Every model in the models folder.
    fn models(&self) -> Result<Vec<ModelInfo>, BackendError>;
    /// The models folder, when the backend reads its models from one (deployments share it through the file
    /// storage: see [`crate::shared_models`]).
    fn models_root(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// The scheduler names accepted in `scheduler`.
    fn schedulers(&self) -> Vec<String>;
    /// The LoRAs requests may name (`lora_model`), by name. The default lists none.
    fn loras(&self) -> Vec<String> {
        Vec::new()
    }
    /// The VAEs requests may name (`vae`). The default lists none.
    fn vaes(&self) -> Vec<String> {
        Vec::new()
    }
    /// The textual-inversion embeddings requests may name (`embeddings_model`). The default lists none.
    fn embeddings(&self) -> Vec<String> {
        Vec::new()
    }
    /// Runs one request, on `init_image` (the encoded image file as received) when its kind takes one.
    fn generate(
        &self,
        request: &GenerationRequest,
        init_image: Option<&[u8]>,
        control: &dyn JobControl,
    ) -> Result<Generated, BackendError>;
    /// Adds a model to the models folder under `model_id`, replacing nothing: an existing id is an error.
    fn add_model(&self, model_id: &str, source: ModelSource) -> Result<(), BackendError>;
    /// Removes a model from memory and from the models folder.
    fn delete_model(&self, model_id: &str) -> Result<(), BackendError>;
    /// Checks, before a request is queued, what can be checked cheaply: that its LoRAs, embeddings and VAE
    /// exist. The default accepts everything.
    fn check(&self, _request: &GenerationRequest) -> Result<(), BackendError> {
        Ok(())
    }
    /// Adds a VAE to the models folder under `vae_id` (an existing id is an error).
    fn add_vae(&self, vae_id: &str, _source: ModelSource) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(format!(
            "this backend cannot add VAEs ({vae_id})"
        )))
    }
    /// Runs the safety checker on one image file: whether it is flagged.
    fn check_image(&self, _image: &[u8]) -> Result<bool, BackendError> {
        Err(BackendError::Unsupported(
            "no safety checker is available on this server".into(),
        ))
    }
    /// Unloads every model from memory.
    fn clear_cache(&self);
    /// Device and memory facts.
    fn system(&self) -> SystemInfo;
}
