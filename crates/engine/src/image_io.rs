//! Decoding and encoding of images, and the conversions between images and the pixel tensors the
//! VAE works on (the same arithmetic as diffusers' `VaeImageProcessor`).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::{EngineError, Result};

/// Smallest accepted width / height in pixels (one latent pixel at the usual VAE scale factor 8).
pub const MIN_SIDE: u32 = 8;
/// Width and height must be multiples of this (the VAE scale factor of every Stable Diffusion model).
pub const SIZE_MULTIPLE: u32 = 8;

/// Decodes a PNG, JPEG or WebP image (the format is recognised from the bytes) to 8-bit RGB.
///
/// - The header is read first and any image claiming more than `max_pixels` pixels
///   (width × height) is refused before its pixels are decoded or allocated.
/// - Every colour type is converted to RGB8: grey is replicated, 16-bit channels are scaled to
///   8 bits, and an alpha channel is **dropped** (not composited), exactly as diffusers'
///   `load_image` does with PIL's `convert("RGB")`.
/// - The EXIF orientation, when present, is applied (as diffusers' `load_image` does with
///   `ImageOps.exif_transpose`).
///
/// Errors: [`EngineError::BadImage`] for unknown formats, truncated or corrupt data and images
/// over the limit.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    let bad = |msg: String| EngineError::BadImage(msg);
    if bytes.is_empty() {
        return Err(bad("empty image data".into()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read image data: {e}")))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Some(other) => {
            return Err(bad(format!(
                "unsupported image format {other:?} (PNG, JPEG and WebP are accepted)"
            )))
        }
        None => {
            return Err(bad(
                "not a PNG, JPEG or WebP image (unrecognised data)".into()
            ))
        }
    };
    let side_limit = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    let mut limits = Limits::default();
    limits.max_image_width = Some(side_limit);
    limits.max_image_height = Some(side_limit);
    // Room for the decoded pixels at up to 16 bytes per pixel (RGBA f32) plus decoder state.
    limits.max_alloc = Some(max_pixels.saturating_mul(16).saturating_add(64 << 20));
    reader.limits(limits);
    let name = format_name(format);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| bad(describe(name, &e, max_pixels)))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(bad(format!("{name} image has zero size ({w}x{h})")));
    }
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(bad(format!(
            "image is {w}x{h} = {} pixels, more than the limit of {max_pixels}",
            u64::from(w) * u64::from(h)
        )));
    }
    // A broken EXIF block is not worth refusing the image for: treat it as "no rotation".
    let orientation = decoder.orientation().ok();
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| bad(describe(name, &e, max_pixels)))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        _ => "image",
    }
}

fn describe(name: &str, e: &image::ImageError, max_pixels: u64) -> String {
    match e {
        image::ImageError::Limits(_) => {
            format!("{name} image is too large to decode (limit {max_pixels} pixels): {e}")
        }
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("{name} data is truncated")
        }
        _ => format!("invalid {name} data: {e}"),
    }
}

/// Reads and decodes an image file; see [`decode_image`].
pub fn load_image(path: &Path, max_pixels: u64) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
    decode_image(&bytes, max_pixels).map_err(|e| match e {
        EngineError::BadImage(m) => EngineError::BadImage(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Resizes `img` to exactly `width` × `height`.
///
/// Policy: when the aspect ratio differs, the image is scaled (preserving its aspect ratio) to
/// the smallest size that covers the target and the overflow is cut off equally on both sides
/// (centre crop), so nothing is distorted; this is AUTOMATIC1111's "crop and resize" mode, with
/// its integer arithmetic. Resampling uses a Lanczos3 filter (diffusers' `VaeImageProcessor`
/// resamples with Lanczos by default). When the size already matches, the image is returned
/// unchanged (bit-exact). A zero target size gives an empty image, and an empty source gives a
/// black one.
pub fn fit_to_size(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (sw, sh) = img.dimensions();
    if (sw, sh) == (width, height) {
        return img.clone();
    }
    if width == 0 || height == 0 || sw == 0 || sh == 0 {
        return RgbImage::new(width, height);
    }
    let (w, h, sw64, sh64) = (
        u64::from(width),
        u64::from(height),
        u64::from(sw),
        u64::from(sh),
    );
    // width/height > sw/sh  <=>  width*sh > sw*height: the target is wider, fit the width.
    let (rw, rh) = if w * sh64 > sw64 * h {
        (w, sh64 * w / sw64)
    } else {
        (sw64 * h / sh64, h)
    };
    let (rw, rh) = (rw.max(w) as u32, rh.max(h) as u32);
    let resized = if (rw, rh) == (sw, sh) {
        img.clone()
    } else {
        image::imageops::resize(img, rw, rh, FilterType::Lanczos3)
    };
    let x = (rw - width) / 2;
    let y = (rh - height) / 2;
    image::imageops::crop_imm(&resized, x, y, width, height).to_image()
}

/// Checks a requested output size: both sides multiples of 8, between [`MIN_SIDE`] and
/// `max_side` pixels. The error names the `width` or `height` field.
pub fn validate_size(width: u32, height: u32, max_side: u32) -> Result<()> {
    for (field, v) in [("width", width), ("height", height)] {
        if v < MIN_SIDE || v > max_side {
            return Err(EngineError::invalid(
                field,
                format!("{v} is out of range: must be between {MIN_SIDE} and {max_side}"),
            ));
        }
        if v % SIZE_MULTIPLE != 0 {
            return Err(EngineError::invalid(
                field,
                format!(
                    "{v} is not a multiple of {SIZE_MULTIPLE} (try {})",
                    (v / SIZE_MULTIPLE * SIZE_MULTIPLE).max(MIN_SIDE)
                ),
            ));
        }
    }
    Ok(())
}

/// Converts an RGB image to a `(1, 3, H, W)` f32 tensor in [-1, 1] on `device`, computed in f32
/// as diffusers does: `x / 255` then `2 * x - 1`.
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let plane = w * h;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            let x = f32::from(px.0[c]) / 255.0f32;
            data[c * plane + i] = 2.0f32 * x - 1.0f32;
        }
    }
    Tensor::from_vec(data, (1, 3, h, w), device)
}

/// Converts decoder output `(B, 3, H, W)` (any float dtype, any device) to `B` RGB images, as
/// diffusers' `postprocess` + `numpy_to_pil` do, in f32: `(x / 2 + 0.5).clamp(0, 1)`, then
/// `(x * 255).round()` with numpy's rounding (halves to even), then `u8`.
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = t.dims4()?;
    if c != 3 {
        return Err(candle_core::Error::Msg(format!(
            "expected 3 colour channels in the decoded image tensor, got shape {:?}",
            t.dims()
        ))
        .into());
    }
    let (wu, hu) = match (u32::try_from(w), u32::try_from(h)) {
        (Ok(wu), Ok(hu)) => (wu, hu),
        _ => {
            return Err(
                candle_core::Error::Msg(format!("image tensor too large: {:?}", t.dims())).into(),
            )
        }
    };
    let data: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let plane = h * w;
    let mut out = Vec::with_capacity(b);
    for n in 0..b {
        let base = n * 3 * plane;
        let mut buf = Vec::with_capacity(3 * plane);
        for i in 0..plane {
            for ch in 0..3 {
                buf.push(to_u8(data[base + ch * plane + i]));
            }
        }
        let img = RgbImage::from_raw(wu, hu, buf).ok_or_else(|| {
            EngineError::Tensor(candle_core::Error::Msg("image buffer size mismatch".into()))
        })?;
        out.push(img);
    }
    Ok(out)
}

/// One decoder output value to a pixel byte (see [`tensor_to_images`]). NaN becomes 0.
fn to_u8(x: f32) -> u8 {
    let v = (x * 0.5f32 + 0.5f32).clamp(0.0, 1.0);
    (v * 255.0f32).round_ties_even() as u8
}

/// Encodes an RGB image as PNG.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .map_err(|e| {
            EngineError::io(
                PathBuf::from("<PNG encoder>"),
                std::io::Error::other(e.to_string()),
            )
        })?;
    Ok(out)
}

/// Encodes an RGB image as PNG with one text chunk `keyword` = `text` (tEXt when the text is Latin-1, else
/// UTF-8 iTXt, as AUTOMATIC1111 writes its `parameters`).
pub fn encode_png_with_text(img: &RgbImage, keyword: &str, text: &str) -> Result<Vec<u8>> {
    let failed = |e: png::EncodingError| {
        EngineError::io(
            PathBuf::from("<PNG encoder>"),
            std::io::Error::other(e.to_string()),
        )
    };
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, img.width(), img.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if text.chars().all(|c| (c as u32) < 256) {
            encoder
                .add_text_chunk(keyword.to_string(), text.to_string())
                .map_err(failed)?;
        } else {
            encoder
                .add_itxt_chunk(keyword.to_string(), text.to_string())
                .map_err(failed)?;
        }
        let mut writer = encoder.write_header().map_err(failed)?;
        writer.write_image_data(img.as_raw()).map_err(failed)?;
        writer.finish().map_err(failed)?;
    }
    Ok(out)
}

/// The text chunk `keyword` of a PNG file (tEXt, zTXt or iTXt), if it has one.
pub fn png_text(bytes: &[u8], keyword: &str) -> Option<String> {
    let reader = png::Decoder::new(Cursor::new(bytes)).read_info().ok()?;
    let info = reader.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == keyword)
    {
        return Some(t.text.clone());
    }
    if let Some(t) = info
        .compressed_latin1_text
        .iter()
        .find(|t| t.keyword == keyword)
    {
        return t.get_text().ok();
    }
    info.utf8_text
        .iter()
        .find(|t| t.keyword == keyword)
        .and_then(|t| t.get_text().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_text_chunks_round_trip() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        for text in ["a cat\nSteps: 20, Seed: 1", "a café, 猫\nSteps: 2"] {
            let png = encode_png_with_text(&img, "parameters", text).unwrap();
            assert_eq!(png_text(&png, "parameters").as_deref(), Some(text));
            assert_eq!(png_text(&png, "other"), None);
            let back = image::load_from_memory(&png).unwrap().to_rgb8();
            assert_eq!(back, img);
        }
        assert_eq!(png_text(&encode_png(&img).unwrap(), "parameters"), None);
        assert_eq!(png_text(b"not a png", "parameters"), None);
    }
    use image::{GrayImage, Rgb, Rgba, RgbaImage};

    const MAX: u64 = 4096 * 4096;

    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x + y) * 3 % 256) as u8,
            ])
        })
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
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

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    }

    #[test]
    fn png_round_trip_is_exact() {
        let img = pattern(37, 21);
        let png = encode_png(&img).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let back = decode_image(&png, MAX).unwrap();
        assert_eq!(back, img);
    }

    #[test]
    fn crc_helper_is_right() {
        // The IEND chunk's well-known CRC.
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn png_pixel_bomb_is_refused_fast() {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(
            &mut png,
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        );
        chunk(&mut png, b"IEND", &[]);
        let start = std::time::Instant::now();
        let e = decode_image(&png, MAX).unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        let msg = e.to_string();
        assert!(matches!(e, EngineError::BadImage(_)), "{msg}");
        assert!(msg.contains("100000x100000"), "{msg}");
        // Also with a limit above u32::MAX pixels, the check still happens before decoding.
        let e = decode_image(&png, 1 << 33).unwrap_err();
        assert!(matches!(e, EngineError::BadImage(_)), "{e}");
    }

    #[test]
    fn limit_is_width_times_height() {
        let png = encode_png(&pattern(100, 50)).unwrap();
        assert!(decode_image(&png, 5000).is_ok());
        let e = decode_image(&png, 4999).unwrap_err();
        assert!(e.to_string().contains("100x50"), "{e}");
    }

    #[test]
    fn truncated_and_garbage_input_are_bad_images() {
        let png = encode_png(&pattern(64, 64)).unwrap();
        for cut in [png.len() / 2, 40, 20, 8, 4] {
            let e = decode_image(&png[..cut], MAX).unwrap_err();
            assert!(matches!(e, EngineError::BadImage(_)), "cut {cut}: {e}");
        }
        for junk in [
            &b""[..],
            b"hello world, not an image",
            &[0u8; 64],
            b"GIF89a\x01\x00\x01\x00",
        ] {
            let e = decode_image(junk, MAX).unwrap_err();
            assert!(matches!(e, EngineError::BadImage(_)), "{e}");
            assert!(e.to_string().starts_with("init_image: "), "{e}");
        }
        let mut corrupt = png.clone();
        let n = corrupt.len();
        for b in &mut corrupt[60..n - 20] {
            *b ^= 0x5a;
        }
        assert!(matches!(
            decode_image(&corrupt, MAX),
            Err(EngineError::BadImage(_))
        ));
    }

    #[test]
    fn jpeg_and_webp_decode() {
        let img = RgbImage::from_pixel(32, 24, Rgb([200, 100, 50]));
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        let back = decode_image(&jpeg, MAX).unwrap();
        assert_eq!(back.dimensions(), (32, 24));
        let p = back.get_pixel(10, 10).0;
        assert!(
            p.iter()
                .zip([200u8, 100, 50])
                .all(|(&a, b)| a.abs_diff(b) <= 4),
            "{p:?}"
        );

        let img = pattern(30, 20);
        let mut webp = Vec::new();
        img.write_to(&mut Cursor::new(&mut webp), ImageFormat::WebP)
            .unwrap(); // lossless
        assert_eq!(decode_image(&webp, MAX).unwrap(), img);
        assert!(decode_image(&webp, 599).is_err());
        assert!(matches!(
            decode_image(&webp[..webp.len() - 10], MAX),
            Err(EngineError::BadImage(_))
        ));
    }

    #[test]
    fn alpha_is_dropped_and_grey_expanded() {
        let rgba = RgbaImage::from_fn(4, 4, |x, _| Rgba([10, 20, 30, (x * 60) as u8]));
        let mut png = Vec::new();
        rgba.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let rgb = decode_image(&png, MAX).unwrap();
        assert!(rgb.pixels().all(|p| p.0 == [10, 20, 30]));

        let grey = GrayImage::from_fn(3, 2, |x, y| image::Luma([(x * 40 + y) as u8]));
        let mut png = Vec::new();
        grey.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let rgb = decode_image(&png, MAX).unwrap();
        assert_eq!(rgb.get_pixel(2, 1).0, [81, 81, 81]);
    }

    #[test]
    fn load_image_reads_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.png");
        std::fs::write(&p, encode_png(&pattern(9, 8)).unwrap()).unwrap();
        assert_eq!(load_image(&p, MAX).unwrap(), pattern(9, 8));
        assert!(matches!(
            load_image(&d.path().join("missing.png"), MAX),
            Err(EngineError::Io { .. })
        ));
        std::fs::write(&p, b"nope").unwrap();
        let e = load_image(&p, MAX).unwrap_err();
        assert!(e.to_string().contains("a.png"), "{e}");
    }

    #[test]
    fn fit_to_size_policy() {
        let img = pattern(64, 48);
        assert_eq!(fit_to_size(&img, 64, 48), img);
        for (w, h) in [(32, 32), (64, 64), (128, 48), (16, 40), (100, 30), (8, 8)] {
            assert_eq!(fit_to_size(&img, w, h).dimensions(), (w, h));
        }
        // Centre crop without distortion: a wide image with a red centre square and blue sides
        // fitted to a square keeps only the (undistorted) red middle.
        let wide = RgbImage::from_fn(96, 32, |x, _| {
            if (32..64).contains(&x) {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        let sq = fit_to_size(&wide, 32, 32);
        assert!(
            sq.pixels().all(|p| p.0 == [255, 0, 0]),
            "{:?}",
            sq.get_pixel(0, 0)
        );
        // Same aspect ratio: plain resize of a flat image stays flat.
        let flat = RgbImage::from_pixel(40, 20, Rgb([7, 8, 9]));
        assert!(fit_to_size(&flat, 80, 40)
            .pixels()
            .all(|p| p.0 == [7, 8, 9]));
        assert_eq!(fit_to_size(&RgbImage::new(0, 0), 8, 8).dimensions(), (8, 8));
        assert_eq!(fit_to_size(&img, 0, 5).dimensions(), (0, 5));
    }

    #[test]
    fn validate_size_rules() {
        assert!(validate_size(512, 512, 1024).is_ok());
        assert!(validate_size(72, 56, 1024).is_ok());
        assert!(validate_size(8, 1024, 1024).is_ok());
        let field = |r: Result<()>| match r {
            Err(EngineError::InvalidRequest { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(validate_size(513, 512, 1024)), "width");
        assert_eq!(field(validate_size(512, 500, 1024)), "height");
        assert_eq!(field(validate_size(0, 512, 1024)), "width");
        assert_eq!(field(validate_size(512, 1032, 1024)), "height");
        assert_eq!(field(validate_size(2048, 512, 1024)), "width");
    }

    #[test]
    fn tensor_conversion_matches_diffusers_arithmetic() {
        let img = RgbImage::from_fn(3, 2, |x, y| Rgb([0, 255, (x * 50 + y * 100) as u8]));
        let t = image_to_tensor(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 2, 3]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v[..6].iter().all(|&x| x == -1.0));
        assert!(v[6..12].iter().all(|&x| x == 1.0));
        let b = img.get_pixel(1, 1).0[2];
        assert_eq!(v[12 + 4], 2.0f32 * (f32::from(b) / 255.0f32) - 1.0f32);
        // Round trip through the decoder-output conversion is lossless.
        let back = tensor_to_images(&t).unwrap();
        assert_eq!(back, vec![img]);
    }

    #[test]
    fn rounding_is_half_to_even_like_numpy() {
        // Find decoder outputs x for which (x * 0.5 + 0.5) * 255 is exactly k + 0.5 in f32: numpy's
        // round() sends those to the even neighbour (0.5 -> 0, 1.5 -> 2, 2.5 -> 2, ...).
        let exact_half = |k: u32| {
            let target = k as f32 + 0.5;
            let mut x = (target / 255.0) * 2.0 - 1.0;
            for _ in 0..64 {
                let p = (x * 0.5 + 0.5) * 255.0;
                if p == target {
                    return Some(x);
                }
                x = if p < target {
                    x.next_up()
                } else {
                    x.next_down()
                };
            }
            None
        };
        let mut checked = 0;
        for k in 0..255u32 {
            if let Some(x) = exact_half(k) {
                let even = if k % 2 == 0 { k } else { k + 1 };
                assert_eq!(u32::from(to_u8(x)), even, "k = {k}");
                checked += 1;
            }
        }
        assert!(checked > 100, "only {checked} exact halves found");
        assert_eq!(to_u8(-1.0), 0);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(0.0), 128); // 127.5 -> 128
        assert_eq!(to_u8(-3.0), 0);
        assert_eq!(to_u8(3.0), 255);
        assert_eq!(to_u8(f32::NAN), 0);
    }

    #[test]
    fn tensor_to_images_shapes() {
        let t = Tensor::zeros((2, 3, 4, 5), DType::F32, &Device::Cpu).unwrap();
        let imgs = tensor_to_images(&t).unwrap();
        assert_eq!(imgs.len(), 2);
        assert_eq!(imgs[0].dimensions(), (5, 4));
        assert!(imgs[0].pixels().all(|p| p.0 == [128, 128, 128])); // 127.5 -> 128 (even)
        let bad = Tensor::zeros((1, 4, 4, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(tensor_to_images(&bad).is_err());
        let bad = Tensor::zeros((3, 4, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(tensor_to_images(&bad).is_err());
        let half = Tensor::zeros((1, 3, 2, 2), DType::F16, &Device::Cpu).unwrap();
        assert_eq!(tensor_to_images(&half).unwrap().len(), 1);
    }
}
