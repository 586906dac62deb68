//! The API families (v3, v4 dreambooth, v5 pix2pix, v6 images, v6 realtime, v1 enterprise, enterprise realtime):
//! what differs between them is only defaults, where their results are fetched, how output files are named and
//! which keys their `meta` carries. Everything else is shared.

use serde::{Deserialize, Serialize};

use crate::backend::PipelineKind;

/// One dialect of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// `/api/v3/img2img`.
    V3,
    /// `/api/v4/dreambooth/img2img`.
    V4Dreambooth,
    /// `/api/v5/pix2pix`.
    V5Pix2Pix,
    /// `/api/v6/images/img2img`.
    V6Images,
    /// `/api/v6/realtime/img2img`.
    V6Realtime,
    /// `/api/v1/enterprise/img2img` and `/api/v1/enterprise/images/img2img`.
    Enterprise,
    /// `/api/v1/enterprise/realtime/img2img`.
    EnterpriseRealtime,
    /// `/api/v7/images/text-to-image` and `/api/v7/images/image-to-image` (the current API, and
    /// `modelslab-cli`'s): the v6 fields, key in a `key` header or the body.
    V7,
}

impl Family {
    /// Every family, for route tables.
    pub const ALL: [Family; 8] = [
        Family::V3,
        Family::V4Dreambooth,
        Family::V5Pix2Pix,
        Family::V6Images,
        Family::V6Realtime,
        Family::Enterprise,
        Family::EnterpriseRealtime,
        Family::V7,
    ];

    /// The pipeline its image-to-image route runs (img2img, or pix2pix on v5).
    pub fn image_pipeline(self) -> PipelineKind {
        match self {
            Family::V5Pix2Pix => PipelineKind::Pix2Pix,
            _ => PipelineKind::Img2Img,
        }
    }

    /// The routes that create jobs of `kind` in this family (none where the family has no such route).
    pub fn generation_paths(self, kind: PipelineKind) -> &'static [&'static str] {
        if kind == PipelineKind::Text2Img {
            return match self {
                Family::V3 => &["/api/v3/text2img"],
                Family::V4Dreambooth => &["/api/v4/dreambooth"],
                Family::V5Pix2Pix => &[],
                Family::V6Images => &["/api/v6/images/text2img"],
                Family::V6Realtime => &["/api/v6/realtime/text2img"],
                Family::Enterprise => &[
                    "/api/v1/enterprise/text2img",
                    "/api/v1/enterprise/images/text2img",
                ],
                Family::EnterpriseRealtime => &["/api/v1/enterprise/realtime/text2img"],
                Family::V7 => &["/api/v7/images/text-to-image"],
            };
        }
        if kind != self.image_pipeline() {
            return &[];
        }
        match self {
            Family::V3 => &["/api/v3/img2img"],
            Family::V4Dreambooth => &["/api/v4/dreambooth/img2img"],
            Family::V5Pix2Pix => &["/api/v5/pix2pix"],
            Family::V6Images => &["/api/v6/images/img2img"],
            Family::V6Realtime => &["/api/v6/realtime/img2img"],
            Family::Enterprise => &[
                "/api/v1/enterprise/img2img",
                "/api/v1/enterprise/images/img2img",
            ],
            Family::EnterpriseRealtime => &["/api/v1/enterprise/realtime/img2img"],
            Family::V7 => &["/api/v7/images/image-to-image"],
        }
    }

    /// The fetch route the hosted API names in `fetch_result` for this family (id appended).
    pub fn fetch_path(self) -> &'static str {
        match self {
            Family::V3 | Family::V5Pix2Pix => "/api/v3/fetch/",
            Family::V4Dreambooth => "/api/v3/dreambooth/fetch/",
            Family::V6Images => "/api/v6/images/fetch/",
            Family::V6Realtime => "/api/v6/realtime/fetch/",
            Family::Enterprise => "/api/v1/enterprise/fetch/",
            Family::EnterpriseRealtime => "/api/v1/enterprise/realtime/fetch/",
            Family::V7 => "/api/v7/images/fetch/",
        }
    }

    /// Realtime families take JSON booleans and have no model choice.
    pub fn is_realtime(self) -> bool {
        matches!(self, Family::V6Realtime | Family::EnterpriseRealtime)
    }

    /// Whether `enhance_prompt`, `tomesd` and `safety_checker` are on when a request does not say: yes on v3, v4
    /// dreambooth, v6 images and enterprise img2img (the hosted API's documented defaults), no on the realtime
    /// families (their schema defaults them off) and v5 pix2pix (it documents none of them; an edit instruction
    /// is not a picture description).
    pub fn options_on_by_default(self) -> bool {
        matches!(
            self,
            Family::V3 | Family::V4Dreambooth | Family::V6Images | Family::Enterprise
        )
    }

    /// Success and processing bodies carry `webhook_status` (all but the 2023 v3/v5 shapes).
    pub fn has_webhook_status(self) -> bool {
        !matches!(self, Family::V3 | Family::V5Pix2Pix)
    }

    /// Bodies carry `proxy_links` (and success bodies `nsfw_content_detected`): v6 and the realtime families.
    pub fn has_proxy_links(self) -> bool {
        self.is_v6() || self.is_realtime()
    }

    /// v5 answers `output` as one string instead of a list.
    pub fn output_is_string(self) -> bool {
        matches!(self, Family::V5Pix2Pix)
    }

    /// v6 success bodies carry `proxy_links`, `nsfw_content_detected`, `webhook_status` and a `tip`.
    pub fn is_v6(self) -> bool {
        matches!(self, Family::V6Images | Family::V6Realtime)
    }

    /// File name of output `index` (without extension): the hosted API puts the index after the uuid on v3, v5
    /// and realtime, and before it on v4, v6 images and enterprise.
    pub fn output_name(self, file_prefix: &str, index: usize) -> String {
        match self {
            Family::V4Dreambooth | Family::V6Images | Family::Enterprise => {
                format!("{index}-{file_prefix}")
            }
            _ => format!("{file_prefix}-{index}"),
        }
    }

    /// The processing body's message, spelt as the family spells it.
    pub fn processing_message(self) -> &'static str {
        match self {
            Family::V3 | Family::V5Pix2Pix => "Try to fetch request after given estimated time",
            _ => "Try to fetch request after seconds estimated",
        }
    }

    /// The `tip` on processing bodies.
    pub fn processing_tip(self, fetch_url: &str) -> String {
        match self {
            Family::V3 | Family::V5Pix2Pix => "for faster speed, keep resolution upto 512x512".into(),
            _ => format!(
                "Your image is processing in background, you can get this image using fetch API: {fetch_url}"
            ),
        }
    }

    /// Name used in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Family::V3 => "v3",
            Family::V4Dreambooth => "v4_dreambooth",
            Family::V5Pix2Pix => "v5_pix2pix",
            Family::V6Images => "v6_images",
            Family::V6Realtime => "v6_realtime",
            Family::Enterprise => "enterprise",
            Family::EnterpriseRealtime => "enterprise_realtime",
            Family::V7 => "v7",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_follow_the_hosted_api() {
        assert_eq!(Family::V3.output_name("u", 1), "u-1");
        assert_eq!(Family::V6Images.output_name("u", 0), "0-u");
        assert_eq!(Family::V4Dreambooth.output_name("u", 2), "2-u");
        assert_eq!(Family::V6Realtime.output_name("u", 0), "u-0");
        assert_eq!(Family::V5Pix2Pix.fetch_path(), "/api/v3/fetch/");
    }

    #[test]
    fn every_family_has_routes() {
        for f in Family::ALL {
            assert!(!f.generation_paths(f.image_pipeline()).is_empty());
            assert_eq!(
                f.generation_paths(PipelineKind::Text2Img).is_empty(),
                f == Family::V5Pix2Pix
            );
            assert!(f.fetch_path().ends_with("/fetch/"));
        }
    }
}
