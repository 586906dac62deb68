//! Command-line arguments. Every generation option is named after the API body field it mirrors and takes
//! the same values, with the same defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Pictor: a self-hosted Stable Diffusion image-to-image engine and service.
#[derive(Parser, Debug)]
#[command(name = "pictor", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Make an image from a prompt (the API's text2img).
    Txt2img(Txt2ImgArgs),
    /// Transform an image guided by a prompt (the API's img2img).
    Img2img(Img2ImgArgs),
    /// Edit an image by instruction with an InstructPix2Pix model (the API's v5 pix2pix).
    Pix2pix(Pix2PixArgs),
    /// Run the HTTP service (the ModelsLab / Stable Diffusion API img2img routes).
    Serve(Box<ServeArgs>),
    /// List the enhance_style ids, or show what one adds to the prompts.
    Styles {
        /// A style id to show.
        name: Option<String>,
    },
    /// List or download models.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Time the full-size SD 1.5 networks with random weights (no model files needed).
    Bench(BenchArgs),
    /// Run the diffusers parity cases of a fixtures folder (tests/fixtures, or a folder packed by
    /// scripts/gpu_check.sh) and compare the images with the references; for checking a device.
    #[command(hide = true)]
    CheckFixtures(CheckFixturesArgs),
    /// Write a tiny random model in diffusers layout (e.g. to ROOT/checkpoints/demo) to try Pictor with no
    /// download. It draws noise-like pictures.
    MakeDemoModel {
        /// The folder to create.
        path: PathBuf,
        /// Make an InstructPix2Pix (8-channel) model instead of an img2img one.
        #[arg(long)]
        pix2pix: bool,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// `pictor models …`
#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// List the models in ROOT/checkpoints.
    List {
        /// The models folder.
        #[arg(long, default_value = "models")]
        models_dir: PathBuf,
    },
    /// Download a diffusers-layout model from the Hugging Face Hub into ROOT/checkpoints/<owner>--<name>.
    Pull {
        /// The models folder.
        #[arg(long, default_value = "models")]
        models_dir: PathBuf,
        /// Repository id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
        repo_id: String,
        /// Branch, tag or commit.
        #[arg(long)]
        revision: Option<String>,
    },
}

/// Parses the API's yes/no flags (also true/false, 1/0).
pub fn yes_no(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "yes" | "true" | "1" => Ok(true),
        "no" | "false" | "0" => Ok(false),
        _ => Err(format!("expected yes or no, got {s:?}")),
    }
}

/// Options shared by the generation commands.
#[derive(Args, Debug)]
pub struct CommonArgs {
    /// The models folder (ROOT/checkpoints/<model_id>/ or <model_id>.safetensors).
    #[arg(long, default_value = "models")]
    pub models_dir: PathBuf,
    /// Arithmetic precision: fp32, or bf16 products on CPUs with AMX or AVX-512 BF16 (faster, close to fp32
    /// but not equal).
    #[arg(long, value_enum, default_value = "fp32", env = "PICTOR_PRECISION")]
    pub precision: PrecisionArg,
    /// Model id in ROOT/checkpoints, or a path to a model folder or .safetensors checkpoint (required unless
    /// --from-png names one).
    #[arg(long, default_value = "")]
    pub model: String,
    /// What the result should show (required unless --from-png gives it).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Take the settings from a PNG's `parameters` text (Pictor's outputs and AUTOMATIC1111's carry it): prompt,
    /// negative prompt, seed, steps, guidance, size, sampler, strength, clip skip and model. Options given on
    /// the command line win.
    #[arg(long)]
    pub from_png: Option<PathBuf>,
    /// What it should not show.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Seed; omitted = random (reported in the printed meta).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images, 1–4.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Scheduler class name as the API spells it (default: the model's own scheduler).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Use Karras sigmas where the scheduler supports them (yes/no).
    #[arg(long, default_value = "yes", value_parser = yes_no, action = clap::ArgAction::Set)]
    pub use_karras_sigmas: bool,
    /// DPMSolverMultistepScheduler algorithm (dpmsolver++ or sde-dpmsolver++; the API's dpmsolver+++).
    #[arg(long)]
    pub algorithm_type: Option<String>,
    /// CLIP layers to skip, A1111 style: 1 = last layer, 2 = penultimate (1–8).
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Append Pictor's quality suffix to the prompt and its default negative prompt (yes/no; the API's
    /// enhance_prompt, which is on by default on most API routes but off here).
    #[arg(long, default_value = "no", value_parser = yes_no, action = clap::ArgAction::Set)]
    pub enhance_prompt: bool,
    /// Wrap the prompt in a style (the API's enhance_style; `pictor styles` lists them).
    #[arg(long)]
    pub enhance_style: Option<String>,
    /// LoRAs from MODELS/loras, comma-separated names (files without .safetensors).
    #[arg(long)]
    pub lora_model: Option<String>,
    /// LoRA strengths, comma-separated: one per LoRA, or one for all (default 1).
    #[arg(long)]
    pub lora_strength: Option<String>,
    /// A VAE from MODELS/vae replacing the model's own.
    #[arg(long)]
    pub vae: Option<String>,
    /// Textual-inversion embeddings from MODELS/embeddings, comma-separated; each file name is its trigger word.
    #[arg(long)]
    pub embeddings_model: Option<String>,
    /// Token merging (ToMe, ratio 0.5) in the UNet's self-attention: faster, slightly different (yes/no).
    #[arg(long, default_value = "no", value_parser = yes_no, action = clap::ArgAction::Set)]
    pub tomesd: bool,
    /// Run the Stable Diffusion safety checker and replace flagged images (yes/no).
    #[arg(long, default_value = "no", value_parser = yes_no, action = clap::ArgAction::Set)]
    pub safety_checker: bool,
    /// How flagged images are replaced: blur, pixelate, black or sensitive_content_text.
    #[arg(long, default_value = "sensitive_content_text")]
    pub safety_checker_type: String,
    /// The safety checker to use (a safety_checker/ folder or a model folder holding one); default: the
    /// model's own.
    #[arg(long)]
    pub safety_checker_model: Option<PathBuf>,
    /// Folder for the images: DIR/0.png … DIR/<samples−1>.png.
    #[arg(long)]
    pub out: PathBuf,
}

/// The size, steps and guidance of text-to-image and img2img.
#[derive(Args, Debug)]
pub struct SizeAndSteps {
    /// Output width, a multiple of 8 up to 1024.
    #[arg(long, default_value_t = 512)]
    pub width: u32,
    /// Output height, a multiple of 8 up to 1024.
    #[arg(long, default_value_t = 512)]
    pub height: u32,
    /// Denoising steps of the full schedule, 1–50 (img2img runs steps × strength of them).
    #[arg(long, default_value_t = 30)]
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale, 1–20 (≤ 1 turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
}

/// `pictor txt2img …`
#[derive(Args, Debug)]
pub struct Txt2ImgArgs {
    #[command(flatten)]
    /// Shared options.
    pub common: CommonArgs,
    #[command(flatten)]
    /// Size, steps and guidance.
    pub size: SizeAndSteps,
}

/// `pictor img2img …`
#[derive(Args, Debug)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    /// Shared options.
    pub common: CommonArgs,
    /// The starting image: a file path or an http(s) URL (PNG, JPEG or WebP).
    #[arg(long)]
    pub init_image: String,
    #[command(flatten)]
    /// Size, steps and guidance.
    pub size: SizeAndSteps,
    /// How much of the init image to replace, 0–1 (1 = all of it).
    #[arg(long, default_value_t = 0.7)]
    pub strength: f64,
}

/// `pictor pix2pix …`
#[derive(Args, Debug)]
pub struct Pix2PixArgs {
    #[command(flatten)]
    /// Shared options.
    pub common: CommonArgs,
    /// The image to edit: a file path or an http(s) URL (PNG, JPEG or WebP).
    #[arg(long)]
    pub init_image: String,
    /// Output width (default: the init image's, rounded down to a multiple of 8, at most 1024).
    #[arg(long)]
    pub width: Option<u32>,
    /// Output height (default: the init image's, rounded down to a multiple of 8, at most 1024).
    #[arg(long)]
    pub height: Option<u32>,
    /// Denoising steps, 1–50 (the v5 API's `steps`).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Text guidance scale, 1–20.
    #[arg(long, default_value_t = 7.0)]
    pub guidance_scale: f64,
    /// How strongly to keep the input image (≥ 1 enables image guidance).
    #[arg(long, default_value_t = 1.5)]
    pub image_guidance_scale: f64,
}

/// `pictor serve`: every flag has a default that works on a fresh machine.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "PICTOR_LISTEN")]
    pub listen: std::net::SocketAddr,
    /// Base of the URLs handed out (output links, fetch_result); default http://<listen>.
    #[arg(long, env = "PICTOR_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// The models folder (ROOT/checkpoints/<model_id>/ or <model_id>.safetensors).
    #[arg(long, default_value = "models", env = "PICTOR_MODELS_DIR")]
    pub models_dir: PathBuf,
    /// Arithmetic precision of every job: fp32, or bf16 products on CPUs with AMX or AVX-512 BF16 (faster,
    /// close to fp32 but not equal).
    #[arg(long, value_enum, default_value = "fp32", env = "PICTOR_PRECISION")]
    pub precision: PrecisionArg,
    /// A Stable Diffusion safety checker (a diffusers safety_checker/ folder, or a model folder holding one)
    /// used for every model; without it, a model's own safety_checker/ folder is used when it has one.
    #[arg(long, env = "PICTOR_SAFETY_CHECKER")]
    pub safety_checker: Option<PathBuf>,
    /// Where jobs (SQLite), keys and output files are kept.
    #[arg(long, default_value = "pictor-data", env = "PICTOR_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Model for requests that name none (v3, realtime); default: the only img2img model, if there is one.
    #[arg(long)]
    pub default_model: Option<String>,
    /// Model for v5 pix2pix requests that name none; default: the only InstructPix2Pix model.
    #[arg(long)]
    pub pix2pix_model: Option<String>,
    /// Seconds a request waits for its images before answering "processing" (0: always queue).
    #[arg(long, default_value_t = 60.0)]
    pub sync_timeout: f64,
    /// An accepted API key (repeatable). Also PICTOR_API_KEYS (comma-separated) and --keys-file.
    #[arg(long = "api-key")]
    pub api_keys: Vec<String>,
    /// A file with one API key per line.
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
    /// A key for the enterprise management routes (repeatable); it can also generate.
    #[arg(long = "admin-key", env = "PICTOR_ADMIN_KEY")]
    pub admin_keys: Vec<String>,
    /// Most jobs one key may have queued or running (more get HTTP 429).
    #[arg(long, default_value_t = 10)]
    pub max_queued_per_key: usize,
    /// Let init_image and webhook URLs reach loopback and private networks (cloud metadata stays refused).
    #[arg(long)]
    pub allow_private_urls: bool,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 32)]
    pub max_body_mib: usize,
    /// Megapixels (2²⁰ pixels) of init images decoded at once across requests; more wait (up to 30 s, then
    /// 503). Never below the 64-megapixel image limit.
    #[arg(long, default_value_t = 128)]
    pub decode_budget_mpx: u64,
    /// MiB that must stay free on the data folder's disk (and the SQLite file's and the file storage's, when
    /// local) for new jobs to be accepted and started; below it job-making routes answer 503 and workers leave
    /// queued jobs waiting until there is room. 0 turns the check off.
    #[arg(long, default_value_t = 64)]
    pub min_free_disk_mib: u64,
    /// Seconds a client may take to send a request's headers; also how long an idle keep-alive connection
    /// is kept.
    #[arg(long, default_value_t = 30)]
    pub header_timeout_secs: u64,
    /// Seconds a client may take to send a request's body.
    #[arg(long, default_value_t = 120)]
    pub body_timeout_secs: u64,
    /// Most client connections open at once (keep it below the file-descriptor limit, `ulimit -n`); more are
    /// closed as they arrive.
    #[arg(long, default_value_t = 1000)]
    pub max_connections: usize,
    /// Seconds `temp: yes` outputs live.
    #[arg(long, default_value_t = 86_400)]
    pub temp_ttl: u64,
    /// Hours finished jobs stay fetchable.
    #[arg(long, default_value_t = 168)]
    pub retention_hours: u64,
    /// Seconds between sweeps of expired temp files, old jobs and init images older than the retention.
    #[arg(long, default_value_t = 600)]
    pub sweep_interval: u64,
    /// Webhook attempts, the first included.
    #[arg(long, default_value_t = 4)]
    pub webhook_attempts: u32,
    /// Seconds before the first webhook retry (doubling after).
    #[arg(long, default_value_t = 2.0)]
    pub webhook_backoff: f64,
    /// Generations run at once.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// What this process does: `all` (API and workers, one machine), `api` (HTTP front end only) or `worker`
    /// (generations only; listens for /health and /metrics). `api` and `worker` need a PostgreSQL job store.
    #[arg(long, value_enum, default_value = "all", env = "PICTOR_ROLE")]
    pub role: RoleArg,
    /// The job store: `sqlite:PATH` (default: DATA_DIR/jobs.db) or `postgres://USER:PASSWORD@HOST/DB`, shared by
    /// every node of a deployment.
    #[arg(long, env = "PICTOR_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Where images live: a folder (default: DATA_DIR/files) or `s3://BUCKET[/PREFIX]` on any S3-compatible
    /// store, endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION
    /// (and AWS_ALLOW_HTTP=true for a plain-http endpoint).
    #[arg(long, env = "PICTOR_STORAGE")]
    pub storage: Option<String>,
    /// This node's group: keys bound to it run here (and unbound keys anywhere); also names it in
    /// system_details.
    #[arg(long, env = "PICTOR_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Seconds a worker holds a job without a heartbeat (it beats every third of it); a job whose worker
    /// vanished is queued again after this long.
    #[arg(long, default_value_t = 15.0)]
    pub lease_seconds: f64,
    /// Times a job is tried when its worker keeps dying before it is failed as abandoned.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Fault injection for tests: milliseconds to pause after each denoising step.
    #[arg(long, default_value_t = 0, hide = true)]
    pub debug_step_delay_ms: u64,
    /// Memory for loaded models, in MiB (least recently used models are unloaded beyond it).
    #[arg(long, default_value_t = 8192)]
    pub model_cache_mib: u64,
    /// Do not create the random demo model when the models folder is empty.
    #[arg(long)]
    pub no_demo: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

/// `--role`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleArg {
    /// API and workers in one process.
    All,
    /// HTTP API only.
    Api,
    /// Workers only.
    Worker,
}

/// The architecture `pictor bench` times.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchArg {
    /// Stable Diffusion 1.5.
    Sd15,
    /// SDXL base.
    Sdxl,
}

/// The network `pictor bench` times.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchComponentArg {
    /// One UNet call (batch 2 = one guided step of one image).
    Unet,
    /// The VAE encoder.
    VaeEncode,
    /// The VAE decoder.
    VaeDecode,
    /// The CLIP-L text encoder.
    TextEncoder,
    /// A whole img2img request (strength 0.75, guidance 7.5).
    Img2img,
}

/// Arithmetic precision of the CPU engine.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionArg {
    /// 32-bit floats throughout (the reference results).
    Fp32,
    /// Convolutions, linear layers and attention multiply in bfloat16 with f32 accumulation, on AMX (Intel
    /// Xeon Sapphire Rapids or later) or AVX-512 BF16 (AMD Zen 4 or later, Intel Cooper Lake); weights are
    /// kept in bf16, everything else stays f32. Refused on CPUs with neither. CPU only: a GPU runs in fp16.
    Bf16,
}

impl PrecisionArg {
    /// Turns the engine's bf16 products on or off for this process, or says why they cannot be used.
    pub fn apply(self) -> anyhow::Result<()> {
        pictor_engine::kernels::set_bf16_products(self == PrecisionArg::Bf16)
            .map_err(anyhow::Error::msg)
    }
}

/// The precision `pictor bench` and `pictor check-fixtures` run in.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevicePrecisionArg {
    /// 32-bit floats throughout.
    Fp32,
    /// The CPU's bf16 products (see `PrecisionArg::Bf16`).
    Bf16,
    /// UNet and VAE in float16, the text encoder in float32 (a GPU's precision; on the CPU, slow).
    Fp16,
}

/// Where `pictor bench` and `pictor check-fixtures` run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// The CPU.
    Cpu,
    /// CUDA GPU 0 (no fallback to the CPU).
    Cuda,
}

/// `pictor check-fixtures …`
#[derive(Args, Debug)]
pub struct CheckFixturesArgs {
    /// The fixtures folder: its case files (cases.json, txt2img/cases.json, sdxl/cases.json,
    /// lora_vae/cases.json, sdxl/lora_cases.json, those present), models/ and reference images.
    pub dir: PathBuf,
    /// Run only this case (repeatable); default: every case of the folder.
    #[arg(long = "case")]
    pub cases: Vec<String>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// fp32 must match the references within max |Δ| ≤ 3 and mean |Δ| ≤ 0.5; fp16 and bf16 at 35 dB PSNR or
    /// better.
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: DevicePrecisionArg,
    /// Print one JSON object instead of a line per case.
    #[arg(long)]
    pub json: bool,
}

/// `pictor bench …`
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Which model's full-size networks: sd15 or sdxl (base; its UNet step is best timed at 1024).
    #[arg(long, value_enum, default_value = "sd15")]
    pub arch: ArchArg,
    /// What to time.
    #[arg(long, value_enum, default_value = "unet")]
    pub component: BenchComponentArg,
    /// Image side in pixels (latents are an eighth of it).
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Batch size (img2img: images per request).
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub iterations: usize,
    /// Arithmetic precision (bf16: products on AMX or AVX-512 BF16, see `pictor serve --help`; fp16: UNet and
    /// VAE in float16, as on a GPU).
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: DevicePrecisionArg,
    /// Where to run: cpu, or cuda (GPU 0 of a `--features cuda` build; an error without one).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Token merging (tomesd defaults) in the UNet.
    #[arg(long)]
    pub tomesd: bool,
    /// img2img: steps of the full schedule (strength 0.75 runs three quarters of them).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Instead of timing, run one UNet call with and without token merging on the same weights and inputs
    /// and report how close the outputs are (relative L2, cosine similarity) and both times.
    #[arg(long)]
    pub compare_tome: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}
