//! The customer's own S3 bucket (`update_s3` / `reset_s3`): where a key's results are also written, under
//! `image_directory`, and the URLs its answers then give (`public_url` + file name). Set per key and deploy type
//! (`text_to_image` for the img2img families, `realtime` for the realtime ones) and kept in the job store, so that
//! every worker writes there. A write that fails is recorded on the job as a warning and its answer keeps the
//! service's own URLs: nothing is lost silently.

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::family::Family;
use crate::net_guard::{self, UrlPolicy};
use crate::params::Body;
use crate::responses::ApiError;
use crate::storage::valid_key;

/// The deploy types `update_s3` accepts on this server, and which families each covers.
pub const DEPLOY_TYPES: &[&str] = &["text_to_image", "realtime"];

/// The deploy type whose destination a family's results go to.
pub fn deploy_type_of(family: Family) -> &'static str {
    if family.is_realtime() {
        "realtime"
    } else {
        "text_to_image"
    }
}

/// One `update_s3` setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Destination {
    /// Base of the URLs answers give (`public_url/<file>`).
    pub public_url: String,
    /// Region the requests are signed for.
    pub region_name: String,
    /// The S3 endpoint; with no `bucket_name`, the bucket is the first label of its host (virtual-hosted style,
    /// as in `https://BUCKET.s3.amazonaws.com`).
    pub endpoint_url: String,
    /// Access key id.
    pub aws_access_key_id: String,
    /// Secret key (stored in the job database; never answered or logged).
    pub aws_secret_access_key: String,
    /// Folder of the bucket the images go to.
    pub image_directory: String,
    /// The bucket, when the endpoint does not name it (a Pictor extension for path-style stores).
    pub bucket_name: Option<String>,
}

impl S3Destination {
    /// Reads and checks an `update_s3` body; returns the deploy type and the destination.
    pub async fn from_body(body: &Body, policy: UrlPolicy) -> Result<(String, Self), ApiError> {
        let deploy = deploy_type(body)?;
        let required = |name: &'static str| -> Result<String, ApiError> {
            body.string(&[name])?
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ApiError::required(name))
        };
        let public_url = required("public_url")?;
        net_guard::parse_url(&public_url)
            .map_err(|e| ApiError::field("public_url", e.to_string()))?;
        let endpoint_url = required("endpoint_url")?;
        let endpoint = net_guard::parse_url(&endpoint_url)
            .map_err(|e| ApiError::field("endpoint_url", e.to_string()))?;
        net_guard::resolve_checked(&endpoint, policy)
            .await
            .map_err(|e| ApiError::field("endpoint_url", e.to_string()))?;
        let image_directory = body
            .string(&["image_directory"])?
            .unwrap_or_default()
            .trim_matches('/')
            .to_string();
        if !image_directory.is_empty() && !valid_key(&image_directory) {
            return Err(ApiError::field(
                "image_directory",
                "may only contain letters, digits, '-', '_', '.' and '/'",
            ));
        }
        let bucket_name = body
            .string(&["bucket_name", "bucket"])?
            .map(|b| b.trim().to_string())
            .filter(|b| !b.is_empty());
        if bucket_name.is_none() && endpoint.host_str().and_then(bucket_of_host).is_none() {
            return Err(ApiError::field(
                "endpoint_url",
                "does not name a bucket (https://BUCKET.s3.REGION.amazonaws.com); give bucket_name",
            ));
        }
        Ok((
            deploy,
            S3Destination {
                public_url,
                region_name: required("region_name")?,
                endpoint_url,
                aws_access_key_id: required("aws_access_key_id")?,
                aws_secret_access_key: required("aws_secret_access_key")?,
                image_directory,
                bucket_name,
            },
        ))
    }

    fn client(&self) -> Result<impl ObjectStore, String> {
        let (bucket, virtual_hosted) = match &self.bucket_name {
            Some(b) => (b.clone(), false),
            None => (
                url::Url::parse(&self.endpoint_url)
                    .ok()
                    .and_then(|u| u.host_str().and_then(bucket_of_host))
                    .ok_or("the endpoint names no bucket")?,
                true,
            ),
        };
        AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&self.region_name)
            .with_endpoint(&self.endpoint_url)
            .with_virtual_hosted_style_request(virtual_hosted)
            .with_allow_http(self.endpoint_url.starts_with("http://"))
            .with_access_key_id(&self.aws_access_key_id)
            .with_secret_access_key(&self.aws_secret_access_key)
            .build()
            .map_err(|e| e.to_string())
    }

    /// Writes each `(name, bytes)` as `image_directory/name` (one client for them all); returns their public
    /// URLs, or the first error.
    pub async fn write_all(&self, files: Vec<(&str, Vec<u8>)>) -> Result<Vec<String>, String> {
        let client = self.client()?;
        let mut urls = Vec::with_capacity(files.len());
        for (name, bytes) in files {
            let key = if self.image_directory.is_empty() {
                name.to_string()
            } else {
                format!("{}/{name}", self.image_directory)
            };
            client
                .put(&ObjectPath::from(key), bytes.into())
                .await
                .map_err(|e| e.to_string())?;
            urls.push(format!("{}/{name}", self.public_url.trim_end_matches('/')));
        }
        Ok(urls)
    }
}

/// `deploy_type`, defaulting to `text_to_image`; types this server does not run are refused by name.
pub fn deploy_type(body: &Body) -> Result<String, ApiError> {
    let deploy = body
        .string(&["deploy_type"])?
        .map(|d| d.trim().to_string())
        .unwrap_or_else(|| "text_to_image".into());
    if DEPLOY_TYPES.contains(&deploy.as_str()) {
        Ok(deploy)
    } else {
        Err(ApiError::field(
            "deploy_type",
            format!(
                "{deploy:?} is not served by this server; one of: {}",
                DEPLOY_TYPES.join(", ")
            ),
        ))
    }
}

/// The bucket of a virtual-hosted-style host (`BUCKET.s3.amazonaws.com`, `BUCKET.s3.REGION.amazonaws.com`,
/// `BUCKET.ACCOUNT.r2.cloudflarestorage.com`-like hosts with an `s3`-style label after the bucket).
fn bucket_of_host(host: &str) -> Option<String> {
    let labels: Vec<&str> = host.split('.').collect();
    let second = labels.get(1)?;
    (labels.len() >= 3 && (second.starts_with("s3") || host.ends_with(".r2.cloudflarestorage.com")))
        .then(|| labels[0].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: serde_json::Value) -> Body {
        Body::parse(v.to_string().as_bytes()).unwrap()
    }

    fn full() -> serde_json::Value {
        serde_json::json!({
            "key": "k",
            "deploy_type": "realtime",
            "public_url": "https://cdn.example.com/generations/",
            "region_name": "us-east-1",
            "endpoint_url": "https://my-bucket.s3.amazonaws.com",
            "aws_access_key_id": "id",
            "aws_secret_access_key": "secret",
            "image_directory": "generations",
        })
    }

    #[test]
    fn buckets_from_hosts() {
        assert_eq!(
            bucket_of_host("my-bucket.s3.amazonaws.com").as_deref(),
            Some("my-bucket")
        );
        assert_eq!(
            bucket_of_host("b.s3.eu-west-1.amazonaws.com").as_deref(),
            Some("b")
        );
        assert_eq!(bucket_of_host("storage.googleapis.com"), None);
        assert_eq!(bucket_of_host("localhost"), None);
    }

    #[tokio::test]
    async fn update_s3_bodies() {
        let policy = UrlPolicy {
            allow_private: false,
        };
        // Resolving a public host needs a network; the checks before it do not.
        let mut no_bucket = full();
        no_bucket["endpoint_url"] = "http://127.0.0.1:9".into();
        let err = S3Destination::from_body(&body(no_bucket), policy)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("endpoint_url"), "{err}");
        let mut bad_type = full();
        bad_type["deploy_type"] = "voice_cloning".into();
        let err = S3Destination::from_body(&body(bad_type), policy)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("voice_cloning"), "{err}");
        let mut missing = full();
        missing
            .as_object_mut()
            .unwrap()
            .remove("aws_secret_access_key");
        missing["endpoint_url"] = "http://127.0.0.1:9".into();
        missing["bucket_name"] = "b".into();
        let allow = UrlPolicy {
            allow_private: true,
        };
        let err = S3Destination::from_body(&body(missing), allow)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("aws secret access key"), "{err}");
        let mut escape = full();
        escape["image_directory"] = "../x".into();
        escape["endpoint_url"] = "http://127.0.0.1:9".into();
        escape["bucket_name"] = "b".into();
        assert!(S3Destination::from_body(&body(escape), allow)
            .await
            .is_err());
    }
}
