//! Downloading diffusers-layout Stable Diffusion models from the Hugging Face Hub.
//!
//! `pull("stabilityai/stable-diffusion-2-1", dir, None)` creates `dir/stabilityai--stable-diffusion-2-1/`,
//! an ordinary diffusers folder holding only what Pictor needs: `model_index.json` and, for each
//! pipeline component it lists (unet, vae, text_encoder, tokenizer, scheduler, safety_checker,
//! feature_extractor), its small config / vocabulary files and its `.safetensors` weights
//! (full precision when the repository has them, else the `.fp16` variant, else `.bf16`).
//! Pickled weights (`.bin`, `.ckpt`, …) are never downloaded; other variants (`.non_ema`, …),
//! ONNX / Flax files and everything outside those folders are skipped.
//!
//! Files go through the usual Hugging Face cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`)
//! and are hard-linked (or copied, across file systems) into the model folder. `HF_ENDPOINT`
//! (mirror URL) and `HF_TOKEN` (gated / private repositories; else the token saved by
//! `huggingface-cli login`) are honoured. The model is assembled in a hidden sibling folder
//! `.<name>.partial-<pid>` and renamed into place only when complete, so a failed download never
//! leaves a half model behind.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};
use serde_json::Value;

use crate::error::{EngineError, Result};

/// The Hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Pipeline components Pictor downloads, with whether each one has weights.
const COMPONENTS: &[(&str, bool)] = &[
    ("unet", true),
    ("vae", true),
    ("text_encoder", true),
    ("tokenizer", false),
    ("text_encoder_2", true),
    ("tokenizer_2", false),
    ("scheduler", false),
    ("safety_checker", true),
    ("feature_extractor", false),
];

/// Components a pipeline can do without: skipped (and set to `[null, null]` in
/// `model_index.json`) when the repository has no usable files for them.
const OPTIONAL: &[&str] = &["safety_checker", "feature_extractor"];

/// Weight variants in order of preference (`None` = full precision, no variant suffix).
const VARIANTS: &[Option<&str>] = &[None, Some("fp16"), Some("bf16")];

const PICKLE_ENDINGS: &[&str] = &[".bin", ".ckpt", ".pt", ".pth", ".pkl"];

/// The folder name a repository id is stored under: `owner/name` becomes `owner--name`.
pub fn folder_name(repo_id: &str) -> String {
    repo_id.replace('/', "--")
}

/// Downloads the diffusers-layout Stable Diffusion repository `repo_id` (e.g.
/// `runwayml/stable-diffusion-v1-5`) at `revision` (branch, tag or commit; default `main`) into
/// `checkpoints_dir/<owner--name>` and returns that path. See the module documentation for which
/// files are fetched. Fails with [`EngineError::Download`] if the folder already exists, the Hub
/// cannot be reached, the repository is not a diffusers pipeline or has no `.safetensors`
/// weights; nothing is left behind on failure.
pub fn pull(repo_id: &str, checkpoints_dir: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let endpoint = std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    pull_from(&endpoint, repo_id, checkpoints_dir, revision)
}

fn download_err(msg: impl Into<String>) -> EngineError {
    EngineError::Download(msg.into())
}

fn pull_from(
    endpoint: &str,
    repo_id: &str,
    checkpoints_dir: &Path,
    revision: Option<&str>,
) -> Result<PathBuf> {
    validate_repo_id(repo_id)?;
    let revision = revision.unwrap_or("main");
    if revision.is_empty() || revision.contains("..") || revision.chars().any(char::is_whitespace) {
        return Err(download_err(format!("invalid revision {revision:?}")));
    }
    let name = folder_name(repo_id);
    let target = checkpoints_dir.join(&name);
    if target.exists() {
        return Err(download_err(format!(
            "{} already exists; delete it to download {repo_id} again",
            target.display()
        )));
    }

    let endpoint = endpoint.trim_end_matches('/').to_string();
    let repo = hub_repo(&endpoint, repo_id, revision)?;
    let explain = |what: &str, e: ApiError| describe(&endpoint, repo_id, revision, what, e);

    // Everything that needs the network and can fail early happens before anything is written.
    let info = repo.info().map_err(|e| explain("repository listing", e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    if !files.iter().any(|f| f == "model_index.json") {
        return Err(download_err(format!(
            "{repo_id} is not a diffusers pipeline (no model_index.json); for a single-file \
             checkpoint download the .safetensors file into {} instead",
            checkpoints_dir.display()
        )));
    }
    let index_path = repo
        .get("model_index.json")
        .map_err(|e| explain("model_index.json", e))?;
    let index_text =
        std::fs::read_to_string(&index_path).map_err(|e| EngineError::io(&index_path, e))?;
    let mut index: Value = serde_json::from_str(&index_text).map_err(|e| {
        download_err(format!(
            "{repo_id}: model_index.json is not valid JSON: {e}"
        ))
    })?;
    let plan = plan_files(repo_id, &files, &index)?;
    for skipped in &plan.skipped {
        tracing::warn!(
            "{repo_id}: no usable files for optional component {skipped}; leaving it out"
        );
        index[skipped.as_str()] = serde_json::json!([null, null]);
    }

    std::fs::create_dir_all(checkpoints_dir).map_err(|e| EngineError::io(checkpoints_dir, e))?;
    let partial =
        PartialDir(checkpoints_dir.join(format!(".{name}.partial-{}", std::process::id())));
    if partial.0.exists() {
        std::fs::remove_dir_all(&partial.0).map_err(|e| EngineError::io(&partial.0, e))?;
    }
    std::fs::create_dir_all(&partial.0).map_err(|e| EngineError::io(&partial.0, e))?;
    for file in &plan.files {
        tracing::info!("{repo_id}: fetching {file}");
        let cached = repo.get(file).map_err(|e| explain(file, e))?;
        place(&cached, &partial.0.join(file))?;
    }
    // model_index.json last: a folder is only recognised as a model once it has it.
    let index_out = partial.0.join("model_index.json");
    let text = serde_json::to_string_pretty(&index).unwrap_or(index_text);
    std::fs::write(&index_out, text + "\n").map_err(|e| EngineError::io(&index_out, e))?;
    std::fs::rename(&partial.0, &target).map_err(|e| EngineError::io(&target, e))?;
    std::mem::forget(partial);
    Ok(target)
}

/// A client for one repository at one revision on `endpoint`, with `HF_TOKEN` when set.
fn hub_repo(endpoint: &str, repo_id: &str, revision: &str) -> Result<hf_hub::api::sync::ApiRepo> {
    let mut builder = ApiBuilder::from_env()
        .with_endpoint(endpoint.to_string())
        .with_progress(std::io::stderr().is_terminal())
        .with_retries(2);
    if let Some(token) = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        builder = builder.with_token(Some(token.trim().to_string()));
    }
    let api = builder
        .build()
        .map_err(|e| download_err(format!("cannot set up the Hub client: {e}")))?;
    Ok(api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    )))
}

/// Downloads a diffusers `AutoencoderKL` repository (e.g. `stabilityai/sd-vae-ft-mse`: `config.json` and
/// `diffusion_pytorch_model.safetensors` at the top, or in a `vae/` folder of a pipeline repository) into the
/// new folder `dest` (which must not exist). Only `.safetensors` weights are taken.
pub fn pull_vae(repo_id: &str, dest: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let endpoint = std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    pull_vae_from(&endpoint, repo_id, dest, revision)
}

fn pull_vae_from(
    endpoint: &str,
    repo_id: &str,
    dest: &Path,
    revision: Option<&str>,
) -> Result<PathBuf> {
    validate_repo_id(repo_id)?;
    let revision = revision.unwrap_or("main");
    if dest.exists() {
        return Err(download_err(format!("{} already exists", dest.display())));
    }
    let endpoint = endpoint.trim_end_matches('/').to_string();
    let repo = hub_repo(&endpoint, repo_id, revision)?;
    let explain = |what: &str, e: ApiError| describe(&endpoint, repo_id, revision, what, e);
    let info = repo.info().map_err(|e| explain("repository listing", e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let folder = ["", "vae/"]
        .into_iter()
        .find(|f| files.iter().any(|x| *x == format!("{f}config.json")))
        .ok_or_else(|| {
            download_err(format!(
                "{repo_id} is not a diffusers VAE (no config.json at the top or in vae/)"
            ))
        })?;
    let weights = VARIANTS
        .iter()
        .map(|v| match v {
            None => format!("{folder}diffusion_pytorch_model.safetensors"),
            Some(v) => format!("{folder}diffusion_pytorch_model.{v}.safetensors"),
        })
        .find(|w| files.contains(w))
        .ok_or_else(|| {
            download_err(format!(
                "{repo_id} has no .safetensors VAE weights (pickled .bin files are refused)"
            ))
        })?;
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
    let partial = PartialDir(parent.join(format!(".vae.partial-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&partial.0);
    std::fs::create_dir_all(&partial.0).map_err(|e| EngineError::io(&partial.0, e))?;
    for (file, name) in [
        (weights.clone(), "diffusion_pytorch_model.safetensors"),
        (format!("{folder}config.json"), "config.json"),
    ] {
        tracing::info!("{repo_id}: fetching {file}");
        let cached = repo.get(&file).map_err(|e| explain(&file, e))?;
        place(&cached, &partial.0.join(name))?;
    }
    std::fs::rename(&partial.0, dest).map_err(|e| EngineError::io(dest, e))?;
    std::mem::forget(partial);
    Ok(dest.to_path_buf())
}

/// A folder being filled; removed on drop unless forgotten after the final rename.
struct PartialDir(PathBuf);

impl Drop for PartialDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Hard-links (else copies) a file of the Hub cache to `dest`.
fn place(cached: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
    }
    // The cache holds symlinks into blobs/: link the blob itself, not the (relative) symlink.
    let src = std::fs::canonicalize(cached).map_err(|e| EngineError::io(cached, e))?;
    if std::fs::hard_link(&src, dest).is_err() {
        std::fs::copy(&src, dest).map_err(|e| EngineError::io(dest, e))?;
    }
    Ok(())
}

fn validate_repo_id(repo_id: &str) -> Result<()> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    let ok_part = |p: &&str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if parts.len() > 2 || !parts.iter().all(ok_part) || repo_id.len() > 200 {
        return Err(download_err(format!(
            "invalid repository id {repo_id:?} (expected owner/name, e.g. runwayml/stable-diffusion-v1-5)"
        )));
    }
    Ok(())
}

/// Turns a Hub client error into a message for the user.
fn describe(endpoint: &str, repo_id: &str, revision: &str, what: &str, e: ApiError) -> EngineError {
    let text = e.to_string();
    let status = text
        .split("status code ")
        .nth(1)
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok());
    let msg = match (&e, status) {
        (ApiError::RequestError(_), Some(401)) => format!(
            "{repo_id}: repository not found on {endpoint}, or it is private/gated \
             (set HF_TOKEN to a token with access)"
        ),
        (ApiError::RequestError(_), Some(403)) => format!(
            "{repo_id}: access denied by {endpoint} (gated model: accept its licence on the \
             website and set HF_TOKEN)"
        ),
        (ApiError::RequestError(_), Some(404)) => format!(
            "{repo_id}: {what} not found on {endpoint} (check the repository id and revision {revision:?})"
        ),
        (ApiError::RequestError(_), Some(code)) => {
            format!("{repo_id}: {endpoint} answered HTTP {code} for {what}")
        }
        (ApiError::RequestError(_), None) => format!("cannot reach {endpoint}: {text}"),
        (ApiError::TooManyRetries(_), _) => {
            format!("{repo_id}: downloading {what} kept failing: {text}")
        }
        _ => format!("{repo_id}: {what}: {text}"),
    };
    download_err(msg)
}

/// What to download from a repository.
#[derive(Debug, PartialEq)]
struct Plan {
    /// Repository paths, excluding `model_index.json`.
    files: Vec<String>,
    /// Optional components left out (no usable files).
    skipped: Vec<String>,
}

/// Chooses the files of each pipeline component listed in `model_index.json` from the repository
/// file list.
fn plan_files(repo_id: &str, files: &[String], index: &Value) -> Result<Plan> {
    let mut plan = Plan {
        files: Vec::new(),
        skipped: Vec::new(),
    };
    for &(component, has_weights) in COMPONENTS {
        // A component is used when model_index.json says ["library", "Class"] with a library.
        let used = index
            .get(component)
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .is_some_and(|lib| !lib.is_null());
        if !used {
            continue;
        }
        match component_files(component, has_weights, files) {
            Ok(chosen) => plan.files.extend(chosen),
            Err(_) if OPTIONAL.contains(&component) => plan.skipped.push(component.to_string()),
            Err(why) => return Err(download_err(format!("{repo_id}: {component}/ {why}"))),
        }
    }
    for required in ["unet", "vae", "scheduler"] {
        if index.get(required).is_none() {
            return Err(download_err(format!(
                "{repo_id}: model_index.json lists no {required}; not a Stable Diffusion pipeline"
            )));
        }
    }
    // SD 1/2 and the SDXL base have text_encoder/ + tokenizer/; an SDXL refiner text_encoder_2/ alone.
    let has = |c: &str| plan.files.iter().any(|f| f.starts_with(&format!("{c}/")));
    if !(has("text_encoder") && has("tokenizer") || has("text_encoder_2") && has("tokenizer_2")) {
        return Err(download_err(format!(
            "{repo_id}: model_index.json lists no text encoder with its tokenizer; not a Stable Diffusion \
             pipeline"
        )));
    }
    Ok(plan)
}

/// Variant of a weights file name: `x.safetensors` → None, `x.fp16.safetensors` → "fp16",
/// `x.safetensors.index.fp16.json` → "fp16".
fn variant_of(name: &str) -> Option<&str> {
    let stem = if let Some(rest) = name.strip_suffix(".json") {
        let after = rest.split(".safetensors.index").nth(1)?;
        return after.strip_prefix('.');
    } else {
        name.strip_suffix(".safetensors")?
    };
    stem.rsplit_once('.').map(|(_, v)| v)
}

/// The files of one component folder: configs / vocabularies and the preferred weights.
fn component_files(
    component: &str,
    has_weights: bool,
    files: &[String],
) -> std::result::Result<Vec<String>, String> {
    let prefix = format!("{component}/");
    let children: Vec<&str> = files
        .iter()
        .filter_map(|f| f.strip_prefix(&prefix))
        .filter(|n| !n.contains('/'))
        .collect();
    let mut out: Vec<String> = children
        .iter()
        .filter(|n| {
            (n.ends_with(".json") && !n.contains(".safetensors.index")) || n.ends_with(".txt")
        })
        .map(|n| format!("{prefix}{n}"))
        .collect();
    if out.is_empty() {
        return Err("has no configuration files in the repository".into());
    }
    if has_weights {
        let weights = VARIANTS.iter().find_map(|v| {
            let w: Vec<&str> = children
                .iter()
                .copied()
                .filter(|n| n.ends_with(".safetensors") && variant_of(n) == *v)
                .collect();
            (!w.is_empty()).then_some((v, w))
        });
        let Some((variant, weights)) = weights else {
            let pickles = children
                .iter()
                .any(|n| PICKLE_ENDINGS.iter().any(|e| n.ends_with(e)));
            return Err(if pickles {
                "has only pickled weights (.bin/.ckpt), which Pictor never downloads or loads \
                 (loading them can run code); no .safetensors weights"
                    .into()
            } else {
                "has no .safetensors weights".into()
            });
        };
        if weights.len() > 1 {
            // Sharded weights: also take the matching index file.
            out.extend(
                children
                    .iter()
                    .filter(|n| n.contains(".safetensors.index") && variant_of(n) == *variant)
                    .map(|n| format!("{prefix}{n}")),
            );
        }
        out.extend(weights.iter().map(|n| format!("{prefix}{n}")));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn sd15_index() -> Value {
        serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
    }

    /// The file list of runwayml/stable-diffusion-v1-5 (abridged).
    fn sd15_files() -> Vec<String> {
        strings(&[
            ".gitattributes",
            "README.md",
            "model_index.json",
            "v1-5-pruned-emaonly.ckpt",
            "v1-5-pruned-emaonly.safetensors",
            "feature_extractor/preprocessor_config.json",
            "safety_checker/config.json",
            "safety_checker/model.fp16.safetensors",
            "safety_checker/model.safetensors",
            "safety_checker/pytorch_model.bin",
            "safety_checker/pytorch_model.fp16.bin",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/model.safetensors",
            "text_encoder/pytorch_model.bin",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.non_ema.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/flax/diffusion_flax_model.msgpack",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "onnx/unet/model.onnx",
        ])
    }

    #[test]
    fn hub_plan_prefers_full_precision_safetensors() {
        let plan = plan_files("r", &sd15_files(), &sd15_index()).unwrap();
        assert_eq!(
            plan.files,
            strings(&[
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "tokenizer/merges.txt",
                "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json",
                "tokenizer/vocab.json",
                "scheduler/scheduler_config.json",
                "safety_checker/config.json",
                "safety_checker/model.safetensors",
                "feature_extractor/preprocessor_config.json",
            ])
        );
        assert!(plan.skipped.is_empty());
    }

    /// stabilityai/stable-diffusion-xl-refiner-1.0's layout: the second text encoder alone, fp16 variants
    /// beside full precision (and the base's two encoders, as a variant of the SD 1.5 layout).
    #[test]
    fn hub_plan_takes_sdxl_text_encoders() {
        let index = serde_json::json!({
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "force_zeros_for_empty_prompt": false,
            "requires_aesthetics_score": true,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": [null, null],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": [null, null],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        });
        let files = strings(&[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors",
            "text_encoder_2/model.fp16.safetensors",
            "tokenizer_2/merges.txt",
            "tokenizer_2/special_tokens_map.json",
            "tokenizer_2/tokenizer_config.json",
            "tokenizer_2/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "sd_xl_refiner_1.0.safetensors",
        ]);
        let plan = plan_files("r", &files, &index).unwrap();
        assert_eq!(
            plan.files,
            strings(&[
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "text_encoder_2/config.json",
                "text_encoder_2/model.safetensors",
                "tokenizer_2/merges.txt",
                "tokenizer_2/special_tokens_map.json",
                "tokenizer_2/tokenizer_config.json",
                "tokenizer_2/vocab.json",
                "scheduler/scheduler_config.json",
            ])
        );
        // Without any text encoder it is not a pipeline Pictor can run.
        let mut no_text = index.clone();
        no_text["text_encoder_2"] = serde_json::json!([null, null]);
        let e = plan_files("r", &files, &no_text).err().unwrap().to_string();
        assert!(e.contains("no text encoder"), "{e}");
    }

    #[test]
    fn hub_plan_falls_back_to_fp16_and_shards() {
        let files: Vec<String> = sd15_files()
            .into_iter()
            .filter(|f| !f.ends_with("model.safetensors") || f.contains(".fp16."))
            .chain(strings(&[
                "unet/diffusion_pytorch_model.safetensors.index.json",
                "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
            ]))
            .collect();
        let plan = plan_files("r", &files, &sd15_index()).unwrap();
        assert!(plan
            .files
            .contains(&"vae/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(plan
            .files
            .contains(&"text_encoder/model.fp16.safetensors".to_string()));
        let unet: Vec<&String> = plan
            .files
            .iter()
            .filter(|f| f.starts_with("unet/"))
            .collect();
        assert_eq!(
            unet,
            [
                "unet/config.json",
                "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
                "unet/diffusion_pytorch_model.safetensors.index.json",
            ]
        );
        assert!(plan
            .files
            .iter()
            .all(|f| !f.ends_with(".bin") && !f.contains("non_ema")));
    }

    #[test]
    fn hub_plan_refuses_pickle_only_and_skips_optional() {
        let mut files: Vec<String> = sd15_files()
            .into_iter()
            .filter(|f| !(f.starts_with("unet/") && f.ends_with(".safetensors")))
            .collect();
        let e = plan_files("r", &files, &sd15_index()).unwrap_err();
        assert!(matches!(e, EngineError::Download(_)));
        assert!(
            e.to_string().contains("unet/ has only pickled weights"),
            "{e}"
        );

        files = sd15_files()
            .into_iter()
            .filter(|f| !(f.starts_with("safety_checker/") && f.ends_with(".safetensors")))
            .collect();
        let plan = plan_files("r", &files, &sd15_index()).unwrap();
        assert_eq!(plan.skipped, vec!["safety_checker".to_string()]);
        assert!(plan.files.iter().all(|f| !f.starts_with("safety_checker/")));

        // Components set to [null, null] are not fetched.
        let mut index = sd15_index();
        index["safety_checker"] = serde_json::json!([null, null]);
        index["feature_extractor"] = serde_json::json!([null, null]);
        let plan = plan_files("r", &sd15_files(), &index).unwrap();
        assert!(plan
            .files
            .iter()
            .all(|f| !f.starts_with("safety_checker/") && !f.starts_with("feature_extractor/")));

        let mut index = sd15_index();
        index.as_object_mut().unwrap().remove("unet");
        assert!(plan_files("r", &sd15_files(), &index).is_err());
    }

    #[test]
    fn hub_variant_names() {
        assert_eq!(variant_of("model.safetensors"), None);
        assert_eq!(variant_of("model.fp16.safetensors"), Some("fp16"));
        assert_eq!(
            variant_of("diffusion_pytorch_model.non_ema.safetensors"),
            Some("non_ema")
        );
        assert_eq!(
            variant_of("diffusion_pytorch_model-00001-of-00002.fp16.safetensors"),
            Some("fp16")
        );
        assert_eq!(
            variant_of("diffusion_pytorch_model.safetensors.index.json"),
            None
        );
        assert_eq!(
            variant_of("diffusion_pytorch_model.safetensors.index.fp16.json"),
            Some("fp16")
        );
        assert_eq!(
            folder_name("runwayml/stable-diffusion-v1-5"),
            "runwayml--stable-diffusion-v1-5"
        );
    }

    #[test]
    fn hub_rejects_bad_ids_and_existing_targets() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["", "/x", "a/b/c", "../x", "a/..", "a b/c", "a/.hidden"] {
            let e = pull_from("http://127.0.0.1:9", bad, d.path(), None).unwrap_err();
            assert!(matches!(e, EngineError::Download(_)), "{bad}: {e}");
        }
        std::fs::create_dir(d.path().join("a--b")).unwrap();
        let e = pull_from("http://127.0.0.1:9", "a/b", d.path(), None).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }

    fn assert_clean_failure(result: Result<PathBuf>, dir: &Path, started: std::time::Instant) {
        let e = result.unwrap_err();
        assert!(matches!(e, EngineError::Download(_)), "{e}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "took {:?}",
            started.elapsed()
        );
        let left: Vec<_> = std::fs::read_dir(dir)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn hub_pull_fails_cleanly_when_hub_unreachable() {
        // A closed local port: refused at once, whatever the machine's network.
        let d = tempfile::tempdir().unwrap();
        let ck = d.path().join("checkpoints");
        let t = std::time::Instant::now();
        let r = pull_from("http://127.0.0.1:9", "pictor-test/no-such-model", &ck, None);
        let msg = r.as_ref().unwrap_err().to_string();
        assert!(msg.contains("cannot reach http://127.0.0.1:9"), "{msg}");
        assert_clean_failure(r, &ck, t);
        assert!(!ck.exists());
    }

    #[test]
    fn vae_pull_fails_cleanly_and_checks_its_arguments() {
        let d = tempfile::tempdir().unwrap();
        let vae = d.path().join("vae");
        std::fs::create_dir_all(&vae).unwrap();
        let t = std::time::Instant::now();
        let r = pull_vae_from(
            "http://127.0.0.1:9",
            "pictor-test/vae",
            &vae.join("x"),
            None,
        );
        let msg = r.as_ref().unwrap_err().to_string();
        assert!(msg.contains("cannot reach http://127.0.0.1:9"), "{msg}");
        assert_clean_failure(r, &vae, t);
        let r = pull_vae_from("http://127.0.0.1:9", "../etc", &vae.join("y"), None);
        assert!(r.unwrap_err().to_string().contains("invalid repository id"));
        std::fs::create_dir_all(vae.join("taken")).unwrap();
        let r = pull_vae_from("http://127.0.0.1:9", "a/b", &vae.join("taken"), None);
        assert!(r.unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    fn hub_pull_default_endpoint_fails_cleanly() {
        // No network here (DNS fails); with network the repository does not exist. Either way: a
        // clean Download error and nothing on disk.
        if std::env::var("HF_ENDPOINT").is_ok() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        let r = pull(
            "pictor-test/definitely-not-a-model-4f1c",
            d.path(),
            Some("main"),
        );
        assert_clean_failure(r, d.path(), t);
    }
}
