//! The OpenAI Images API dialect (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`): its request
//! fields translated into the canonical [`Submission`], and its error shape
//! (`{"error": {"message", "type", "param", "code"}}`).
//!
//! `model` is a Pictor model id; OpenAI's own model names (`dall-e-*`, `gpt-image-*`), which clients written
//! for OpenAI send by default, run on the server's default model. Stable Diffusion's own settings may be added
//! as extra fields (`negative_prompt`, `seed`, `num_inference_steps`, `guidance_scale`, `strength`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::backend::PipelineKind;
use crate::params::Body;
use crate::request::{check_denoising_steps, Submission, MAX_SAMPLES, MAX_SIDE, MAX_STEPS};
use crate::responses::ApiError;

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let message = match &self.0 {
            // OpenAI's messages do not repeat the field; `param` names it.
            ApiError::Field { message, .. } => message.clone(),
            other => other.to_string(),
        };
        let (status, kind, param, code) = match &self.0 {
            ApiError::Field { field, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some(field.clone()),
                None,
            ),
            ApiError::Message(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", None, None),
            ApiError::InvalidKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "invalid_request_error", None, None),
            ApiError::QueueFull { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                None,
                Some("rate_limit_exceeded"),
            ),
            ApiError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", None, None)
            }
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
        };
        (
            status,
            Json(
                json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
            ),
        )
            .into_response()
    }
}

/// How the images come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    /// A URL of the stored PNG (OpenAI's default for its classic models).
    Url,
    /// The PNG as base64.
    B64Json,
}

/// An OpenAI images request, read and checked.
#[derive(Debug, Clone)]
pub struct OpenAiRequest {
    /// The generation.
    pub submission: Submission,
    /// `url` or `b64_json`.
    pub response_format: ResponseFormat,
}

/// Whether `model` is one of OpenAI's own image models (run on the server's default model).
fn is_openai_model(model: &str) -> bool {
    model.starts_with("dall-e") || model.starts_with("gpt-image")
}

/// `size`: `"WxH"` (multiples of 8 up to 1024, rounded down), or `"auto"` / absent (`None`: 512 × 512 for a
/// generation, the image's size for an edit).
fn size(body: &Body) -> Result<Option<(u32, u32)>, ApiError> {
    let Some(text) = body.string(&["size"])? else {
        return Ok(None);
    };
    if text == "auto" {
        return Ok(None);
    }
    let bad = || {
        ApiError::field(
            "size",
            format!(
                "{text:?} is not a size: use \"WIDTHxHEIGHT\" (each 8 to {MAX_SIDE}) or \"auto\""
            ),
        )
    };
    let (w, h) = text.split_once('x').ok_or_else(bad)?;
    let side = |v: &str| -> Result<u32, ApiError> {
        let v: u32 = v.trim().parse().map_err(|_| bad())?;
        if !(8..=MAX_SIDE).contains(&v) {
            return Err(bad());
        }
        Ok(v / 8 * 8)
    };
    Ok(Some((side(w)?, side(h)?)))
}

/// Reads a generation (`kind` Text2Img, JSON) or edit (Img2Img or Pix2Pix as the model is, form fields) body;
/// `image` is the edit's image as base64.
pub fn parse(
    kind: PipelineKind,
    body: &Body,
    image: Option<String>,
) -> Result<OpenAiRequest, ApiError> {
    let prompt = body
        .string(&["prompt"])?
        .ok_or_else(|| ApiError::field("prompt", "prompt is required"))?;
    if body.get(&["mask"]).is_some() {
        return Err(ApiError::field(
            "mask",
            "inpainting (a mask) is not supported yet",
        ));
    }
    if body.string(&["background"])?.as_deref() == Some("transparent") {
        return Err(ApiError::field(
            "background",
            "transparent backgrounds are not supported",
        ));
    }
    if let Some(format) = body.string(&["output_format"])? {
        if format != "png" {
            return Err(ApiError::field(
                "output_format",
                format!("only png is supported, got {format:?}"),
            ));
        }
    }
    if body.flag(&["stream"])?.unwrap_or(false) {
        return Err(ApiError::field("stream", "streaming is not supported"));
    }
    let response_format = match body.string(&["response_format"])?.as_deref() {
        None | Some("url") => ResponseFormat::Url,
        Some("b64_json") => ResponseFormat::B64Json,
        Some(other) => {
            return Err(ApiError::field(
                "response_format",
                format!("{other:?} is not one of url, b64_json"),
            ))
        }
    };
    let model_id = body.string(&["model"])?.filter(|m| !is_openai_model(m));
    let (width, height) = match size(body)? {
        Some((w, h)) => (Some(w), Some(h)),
        None if kind == PipelineKind::Text2Img => (Some(512), Some(512)),
        None => (None, None),
    };
    let steps = body
        .integer_in(&["num_inference_steps", "steps"], 1, MAX_STEPS)?
        .unwrap_or(30) as u32;
    let strength = body.float_in(&["strength"], 0.0, 1.0)?.unwrap_or(0.75);
    if kind == PipelineKind::Img2Img {
        check_denoising_steps(("strength", strength), ("num_inference_steps", steps))?;
    }
    Ok(OpenAiRequest {
        submission: Submission {
            model_id,
            negative_prompt: body.string(&["negative_prompt"])?.unwrap_or_default(),
            init_image: image,
            width,
            height,
            samples: body.integer_in(&["n"], 1, MAX_SAMPLES)?.unwrap_or(1) as u32,
            steps,
            guidance_scale: body
                .float_in(&["guidance_scale"], 0.0, 30.0)?
                .unwrap_or(7.5),
            strength,
            seed: body.unsigned(&["seed"])?,
            ..Submission::plain(kind, prompt)
        },
        response_format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn body(v: Value) -> Body {
        Body::parse(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn fields_map_and_what_cannot_run_is_refused() {
        let r = parse(
            PipelineKind::Text2Img,
            &body(
                json!({"prompt": "a cat", "model": "dall-e-3", "n": 2, "size": "1024x768",
                         "response_format": "b64_json", "quality": "hd", "seed": 3}),
            ),
            None,
        )
        .unwrap();
        let s = &r.submission;
        assert_eq!(
            s.model_id, None,
            "OpenAI's model names run on the default model"
        );
        assert_eq!(
            (s.width, s.height, s.samples, s.seed),
            (Some(1024), Some(768), 2, Some(3))
        );
        assert_eq!(r.response_format, ResponseFormat::B64Json);
        let r = parse(
            PipelineKind::Text2Img,
            &body(json!({"prompt": "a", "model": "sd1-tiny"})),
            None,
        )
        .unwrap();
        assert_eq!(r.submission.model_id.as_deref(), Some("sd1-tiny"));
        assert_eq!(r.response_format, ResponseFormat::Url);
        assert_eq!(
            (r.submission.width, r.submission.height),
            (Some(512), Some(512))
        );
        for (field, value) in [
            ("size", json!("big")),
            ("size", json!("4096x4096")),
            ("n", json!(11)),
            ("response_format", json!("jpeg")),
            ("output_format", json!("webp")),
            ("background", json!("transparent")),
            ("mask", json!("x")),
        ] {
            let mut b = json!({"prompt": "a"});
            b[field] = value;
            let err = parse(PipelineKind::Text2Img, &body(b), None).unwrap_err();
            assert_eq!(err.field_name(), Some(field), "{err}");
        }
        let err = parse(PipelineKind::Text2Img, &body(json!({})), None).unwrap_err();
        assert_eq!(err.field_name(), Some("prompt"));
        // An edit without a size keeps the image's.
        let r = parse(
            PipelineKind::Img2Img,
            &body(json!({"prompt": "a"})),
            Some("aGk=".into()),
        )
        .unwrap();
        assert_eq!((r.submission.width, r.submission.height), (None, None));
    }
}
