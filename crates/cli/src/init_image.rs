//! Reading the init image from a file or an http(s) URL.

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pictor_engine::image_io::decode_image;

/// Largest init image download, in bytes.
const MAX_BYTES: u64 = 50 * 1024 * 1024;
/// Largest init image, in pixels (guards against decompression bombs).
pub const MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Loads `source` (a path or an http(s) URL) and decodes it to RGB.
pub fn load(source: &str) -> Result<image::RgbImage> {
    let bytes = if source.starts_with("http://") || source.starts_with("https://") {
        download(source)?
    } else {
        std::fs::read(source).with_context(|| format!("init_image: cannot read {source}"))?
    };
    Ok(decode_image(&bytes, MAX_PIXELS)?)
}

fn download(url: &str) -> Result<Vec<u8>> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .redirects(5)
        .build();
    let response = agent
        .get(url)
        .call()
        .with_context(|| format!("init_image: cannot download {url}"))?;
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("init_image: download of {url} failed"))?;
    if bytes.len() as u64 > MAX_BYTES {
        bail!("init_image: {url} is larger than {} MiB", MAX_BYTES >> 20);
    }
    Ok(bytes)
}
