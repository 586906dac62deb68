//! Getting the `init_image` a request names: an http(s) URL (through the address guard) or base64 (raw or a data
//! URI), checked to be a PNG, JPEG or WebP of acceptable size before the job is accepted.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

use crate::net_guard::{self, Limits, NetError, UrlPolicy};
use crate::responses::ApiError;

/// An init image that decoded cleanly.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// The file as received.
    pub bytes: Vec<u8>,
    /// Its width in pixels.
    pub width: u32,
    /// Its height in pixels.
    pub height: u32,
    /// `png`, `jpeg` or `webp`.
    pub format: &'static str,
}

/// Decodes base64 text, with or without a `data:image/...;base64,` prefix and line breaks.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let payload = match text.strip_prefix("data:") {
        Some(rest) => rest.split_once(',')?.1,
        None => text,
    };
    let cleaned: String = payload.chars().filter(|c| !c.is_whitespace()).collect();
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines.iter().find_map(|e| e.decode(&cleaned).ok())
}

/// How many pixels this process decodes at once, across all requests: a small file whose header claims a big
/// image costs its full size in memory while it decodes, so concurrent decodes wait for their share of the
/// budget (in units of 2²⁰ pixels) instead of adding up, and give up with a 503 after `wait`.
#[derive(Clone)]
pub struct DecodeBudget {
    units: Arc<tokio::sync::Semaphore>,
    total: u32,
    wait: Duration,
}

/// Pixels per unit of the decode budget.
const UNIT: u64 = 1 << 20;

impl DecodeBudget {
    /// A budget of `pixels` decoded at once (at least one unit); a decode waits at most `wait` for its share.
    pub fn new(pixels: u64, wait: Duration) -> Self {
        let total = pixels.div_ceil(UNIT).clamp(1, u32::MAX as u64 / 2) as u32;
        DecodeBudget {
            units: Arc::new(tokio::sync::Semaphore::new(total as usize)),
            total,
            wait,
        }
    }

    /// Checks and decodes `bytes` (see [`check_image`]) once the budget has room for its pixels.
    pub async fn decode(&self, bytes: Vec<u8>, max_pixels: u64) -> Result<InitImage, ApiError> {
        let (_, width, height) = inspect(&bytes, max_pixels)?;
        let units = (width as u64 * height as u64)
            .div_ceil(UNIT)
            .clamp(1, self.total as u64) as u32;
        let permit = tokio::time::timeout(self.wait, self.units.clone().acquire_many_owned(units))
            .await
            .map_err(|_| {
                ApiError::Unavailable(
                    "the server is busy decoding other images; try again shortly".into(),
                )
            })?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let checked = tokio::task::spawn_blocking(move || check_image(bytes, max_pixels))
            .await
            .map_err(|e| ApiError::Internal(format!("image check panicked: {e}")))?;
        drop(permit);
        checked
    }
}

/// The format and size `bytes` claim in their header, refused when not PNG/JPEG/WebP, empty or over
/// `max_pixels`; nothing is decoded.
fn inspect(bytes: &[u8], max_pixels: u64) -> Result<(&'static str, u32, u32), ApiError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::field("init_image", format!("cannot read the image: {e}")))?;
    let format = match reader.format() {
        Some(image::ImageFormat::Png) => "png",
        Some(image::ImageFormat::Jpeg) => "jpeg",
        Some(image::ImageFormat::WebP) => "webp",
        _ => {
            return Err(ApiError::field(
                "init_image",
                "is not a PNG, JPEG or WebP image",
            ))
        }
    };
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| ApiError::field("init_image", format!("cannot read the image: {e}")))?;
    if width == 0 || height == 0 {
        return Err(ApiError::field("init_image", "the image is empty"));
    }
    if width as u64 * height as u64 > max_pixels {
        return Err(ApiError::field(
            "init_image",
            format!(
                "Reduce init_image resolution: {width}×{height} is more than the {max_pixels}-pixel limit"
            ),
        ));
    }
    Ok((format, width, height))
}

/// Checks that `bytes` are an image we can use, without letting a forged header allocate more than
/// `max_pixels`.
pub fn check_image(bytes: Vec<u8>, max_pixels: u64) -> Result<InitImage, ApiError> {
    let (format, width, height) = inspect(&bytes, max_pixels)?;
    let mut reader = image::ImageReader::new(Cursor::new(&bytes));
    reader.set_format(image::ImageFormat::from_extension(format).expect("known format"));
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| ApiError::field("init_image", format!("the image does not decode: {e}")))?;
    Ok(InitImage {
        bytes,
        width,
        height,
        format,
    })
}

/// Fetches or decodes `source` and checks it within the decode `budget`.
pub async fn resolve(
    source: &str,
    policy: UrlPolicy,
    limits: Limits,
    max_pixels: u64,
    budget: &DecodeBudget,
) -> Result<InitImage, ApiError> {
    let source = source.trim();
    let bytes = if source.starts_with("http://") || source.starts_with("https://") {
        net_guard::get_bytes(source, policy, limits)
            .await
            .map_err(|e| match e {
                NetError::Refused(why) => ApiError::field("init_image", why),
                other => ApiError::field(
                    "init_image",
                    format!("Unable to fetch image from provided URL: {other}"),
                ),
            })?
    } else {
        decode_base64(source).ok_or_else(|| {
            ApiError::field(
                "init_image",
                "is neither an http(s) URL nor valid base64 image data",
            )
        })?
    };
    budget.decode(bytes, max_pixels).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn base64_forms() {
        let bytes = png(4, 4);
        let raw = base64::engine::general_purpose::STANDARD.encode(&bytes);
        assert_eq!(decode_base64(&raw).unwrap(), bytes);
        let uri = format!("data:image/png;base64,{raw}");
        assert_eq!(decode_base64(&uri).unwrap(), bytes);
        assert!(decode_base64("not base64 at all!!").is_none());
    }

    /// PNG's CRC-32, so the forged header passes the chunk check and only the size guard can stop it.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Hardening defect 2: decodes share one budget of pixels. With the budget taken, a decode waits, then
    /// answers 503 (retry) instead of adding its pixels; once the budget is free it goes through, and the
    /// budget is whole again afterwards.
    #[tokio::test]
    async fn decodes_wait_for_the_pixel_budget() {
        let budget = DecodeBudget::new(2 << 20, Duration::from_millis(200));
        let image = png(64, 64);
        let held = budget.units.clone().acquire_many_owned(2).await.unwrap();
        let started = std::time::Instant::now();
        let busy = budget.decode(image.clone(), 1 << 26).await.unwrap_err();
        assert!(matches!(busy, ApiError::Unavailable(_)), "{busy:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(held);
        let ok = budget.decode(image, 1 << 26).await.unwrap();
        assert_eq!((ok.width, ok.height), (64, 64));
        assert_eq!(budget.units.available_permits(), 2);
        // A header over the size limit is refused before it waits for anything.
        let _all = budget.units.clone().acquire_many_owned(2).await.unwrap();
        let e = budget.decode(png(64, 64), 100).await.unwrap_err();
        assert!(matches!(e, ApiError::Field { .. }), "{e:?}");
    }

    #[test]
    fn forged_header_is_refused_before_decoding() {
        let mut bytes = png(4, 4);
        // IHDR width and height live at bytes 16..24.
        bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = check_image(bytes, 64 << 20).unwrap_err();
        assert_eq!(err.field_name(), Some("init_image"));
        assert!(err.to_string().contains("100000×100000"), "{err}");
    }

    #[test]
    fn good_and_garbage() {
        let ok = check_image(png(12, 8), 1 << 20).unwrap();
        assert_eq!((ok.width, ok.height, ok.format), (12, 8, "png"));
        assert!(check_image(b"GIF89a....".to_vec(), 1 << 20).is_err());
        assert!(check_image(vec![0x89, b'P', b'N', b'G'], 1 << 20).is_err());
    }
}
