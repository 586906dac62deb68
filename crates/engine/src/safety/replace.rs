//! What a flagged image is replaced with (the API's `safety_checker_type`): a strong blur, big pixels, black,
//! or a blur with a "SENSITIVE CONTENT" notice. Every strength is relative to the image's size, so a 64 px
//! and a 1024 px image are equally unrecognisable.

use image::imageops::FilterType;
use image::{GrayImage, Luma, Rgb, RgbImage};

use crate::error::{EngineError, Result};

/// How a flagged image is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacement {
    /// A Gaussian blur with a standard deviation of 1/12 of the longer side (at least 2 px).
    Blur,
    /// Blocks of constant colour (each block's mean), at most 12 along the longer side.
    Pixelate,
    /// All black (what diffusers returns).
    Black,
    /// [`Replacement::Blur`] with a white "SENSITIVE CONTENT" notice on a dark plate, centred and scaled
    /// to the image's width.
    SensitiveContentText,
}

/// The notice drawn by [`Replacement::SensitiveContentText`].
const NOTICE: &str = "SENSITIVE CONTENT";
/// The notice on two lines, for narrow images.
const NOTICE_LINES: [&str; 2] = ["SENSITIVE", "CONTENT"];
/// Glyph cell side of the bitmap font, in font pixels.
const GLYPH: u32 = 8;
/// Gap between two lines of the notice, in font pixels.
const LINE_GAP: u32 = 4;
/// Margin of the dark plate around the text, in font pixels.
const PLATE_MARGIN: f32 = 4.0;
/// How much of the underlying (blurred) colour the plate keeps.
const PLATE_BRIGHTNESS: f32 = 0.3;
/// Share of the image width the notice may take, and of its height.
const NOTICE_WIDTH: f32 = 0.8;
const NOTICE_HEIGHT: f32 = 0.5;
/// Blocks along the longer side of a pixelated image.
const PIXEL_BLOCKS: u32 = 12;
/// The blur's standard deviation is the longer side divided by this.
const BLUR_DIVISOR: f32 = 12.0;

impl Replacement {
    /// The API names, in the order of the variants.
    pub const NAMES: [&'static str; 4] = ["blur", "pixelate", "black", "sensitive_content_text"];

    /// Parses an API name (`blur`, `pixelate`, `black`, `sensitive_content_text`; case and surrounding
    /// spaces ignored); anything else is an [`EngineError::InvalidRequest`] on `safety_checker_type`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "blur" => Ok(Replacement::Blur),
            "pixelate" => Ok(Replacement::Pixelate),
            "black" => Ok(Replacement::Black),
            "sensitive_content_text" => Ok(Replacement::SensitiveContentText),
            _ => Err(EngineError::invalid(
                "safety_checker_type",
                format!(
                    "unknown replacement {name:?}; valid: {}",
                    Self::NAMES.join(", ")
                ),
            )),
        }
    }

    /// The API name.
    pub fn name(self) -> &'static str {
        match self {
            Replacement::Blur => Self::NAMES[0],
            Replacement::Pixelate => Self::NAMES[1],
            Replacement::Black => Self::NAMES[2],
            Replacement::SensitiveContentText => Self::NAMES[3],
        }
    }

    /// The replacement of `image` (same size).
    pub fn apply(self, image: &RgbImage) -> RgbImage {
        match self {
            Replacement::Blur => blur(image),
            Replacement::Pixelate => pixelate(image),
            Replacement::Black => RgbImage::new(image.width(), image.height()),
            Replacement::SensitiveContentText => {
                let mut out = blur(image);
                draw_notice(&mut out);
                out
            }
        }
    }
}

/// Replaces each image whose flag is set with `replacement`; the others (and any image past the end of
/// `flags`) are left as they are.
pub fn replace_flagged(images: &mut [RgbImage], flags: &[bool], replacement: Replacement) {
    for (image, _) in images.iter_mut().zip(flags).filter(|(_, f)| **f) {
        *image = replacement.apply(image);
    }
}

/// A strong Gaussian blur (image's box-filter approximation, edges replicated).
fn blur(image: &RgbImage) -> RgbImage {
    let sigma = (image.width().max(image.height()) as f32 / BLUR_DIVISOR).max(2.0);
    image::imageops::fast_blur(image, sigma)
}

/// Square blocks from the top-left corner (the last row and column may be narrower), each filled with the
/// rounded mean colour of its pixels.
fn pixelate(image: &RgbImage) -> RgbImage {
    let (w, h) = image.dimensions();
    let block = w.max(h).div_ceil(PIXEL_BLOCKS).max(1);
    let mut out = RgbImage::new(w, h);
    for by in (0..h).step_by(block as usize) {
        for bx in (0..w).step_by(block as usize) {
            let (bw, bh) = (block.min(w - bx), block.min(h - by));
            let mut sum = [0u64; 3];
            for y in by..by + bh {
                for x in bx..bx + bw {
                    let p = image.get_pixel(x, y);
                    for c in 0..3 {
                        sum[c] += p[c] as u64;
                    }
                }
            }
            let n = (bw * bh) as u64;
            let mean = Rgb(sum.map(|s| ((s + n / 2) / n) as u8));
            for y in by..by + bh {
                for x in bx..bx + bw {
                    out.put_pixel(x, y, mean);
                }
            }
        }
    }
    out
}

/// Where the notice goes on an image: the plate rectangle and the text's coverage.
#[derive(Debug)]
struct NoticeLayout {
    /// Plate rectangle: left, top, right (exclusive), bottom (exclusive).
    plate: (u32, u32, u32, u32),
    /// Top-left corner of `text` on the image.
    text_origin: (u32, u32),
    /// Coverage of the text (255 = fully white).
    text: GrayImage,
}

/// The notice's lines drawn with the 8x8 bitmap font at one font pixel per image pixel.
fn render_lines(lines: &[&str]) -> GrayImage {
    let cols = lines.iter().map(|l| l.len()).max().unwrap_or(0) as u32;
    let rows = lines.len() as u32;
    let mut mask = GrayImage::new(cols * GLYPH, rows * GLYPH + (rows - 1) * LINE_GAP);
    for (row, line) in lines.iter().enumerate() {
        // centre each line horizontally
        let x0 = (cols - line.len() as u32) * GLYPH / 2;
        let y0 = row as u32 * (GLYPH + LINE_GAP);
        for (i, ch) in line.bytes().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[(ch & 0x7f) as usize];
            for (gy, bits) in glyph.iter().enumerate() {
                for gx in 0..GLYPH {
                    // bit 0 is the leftmost pixel
                    if bits & (1 << gx) != 0 {
                        mask.put_pixel(x0 + i as u32 * GLYPH + gx, y0 + gy as u32, Luma([255]));
                    }
                }
            }
        }
    }
    mask
}

/// Lays the notice out on a `width` x `height` image: on one line when that allows font pixels of at least
/// 2 image pixels, else on two lines; as wide as [`NOTICE_WIDTH`] of the image (and at most
/// [`NOTICE_HEIGHT`] of its height) with whole-pixel scaling when the scale is at least 1, smoothly
/// shrunk below that.
fn notice_layout(width: u32, height: u32) -> NoticeLayout {
    let one = [NOTICE];
    let scale_for = |lines: &[&str]| {
        let mask = render_lines(lines);
        let s = (NOTICE_WIDTH * width as f32 / mask.width() as f32)
            .min(NOTICE_HEIGHT * height as f32 / mask.height() as f32);
        (mask, s)
    };
    let (mask, scale) = match scale_for(&one) {
        (mask, s) if s >= 2.0 => (mask, s),
        _ => scale_for(&NOTICE_LINES),
    };
    let (text, pixel) = if scale >= 1.0 {
        let k = scale.floor() as u32;
        let big = GrayImage::from_fn(mask.width() * k, mask.height() * k, |x, y| {
            *mask.get_pixel(x / k, y / k)
        });
        (big, k as f32)
    } else {
        let w = ((mask.width() as f32 * scale).round() as u32).max(1);
        let h = ((mask.height() as f32 * scale).round() as u32).max(1);
        (
            image::imageops::resize(&mask, w, h, FilterType::Triangle),
            scale,
        )
    };
    let x0 = width.saturating_sub(text.width()) / 2;
    let y0 = height.saturating_sub(text.height()) / 2;
    let margin = (PLATE_MARGIN * pixel).round().max(1.0) as u32;
    let plate = (
        x0.saturating_sub(margin),
        y0.saturating_sub(margin),
        (x0 + text.width() + margin).min(width),
        (y0 + text.height() + margin).min(height),
    );
    NoticeLayout {
        plate,
        text_origin: (x0, y0),
        text,
    }
}

/// Darkens the plate and draws the notice in white on `image`.
fn draw_notice(image: &mut RgbImage) {
    let layout = notice_layout(image.width(), image.height());
    let (left, top, right, bottom) = layout.plate;
    for y in top..bottom {
        for x in left..right {
            let p = image.get_pixel_mut(x, y);
            *p = Rgb(p.0.map(|v| (v as f32 * PLATE_BRIGHTNESS).round() as u8));
        }
    }
    let (ox, oy) = layout.text_origin;
    for (x, y, coverage) in layout.text.enumerate_pixels() {
        let (ix, iy) = (ox + x, oy + y);
        if coverage[0] == 0 || ix >= image.width() || iy >= image.height() {
            continue;
        }
        let a = coverage[0] as f32 / 255.0;
        let p = image.get_pixel_mut(ix, iy);
        *p = Rgb(p
            .0
            .map(|v| (v as f32 + (255.0 - v as f32) * a).round() as u8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic detailed image: fine stripes and noise-like texture.
    fn busy(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(97) >> 3;
            Rgb([
                (v & 0xff) as u8,
                if (x / 2 + y) % 2 == 0 { 230 } else { 20 },
                ((x * 7 + y * 3) % 256) as u8,
            ])
        })
    }

    /// Sum of squared differences between neighbouring pixels: the image's high-frequency energy.
    fn detail(image: &RgbImage) -> f64 {
        let mut e = 0.0;
        for (x, y, p) in image.enumerate_pixels() {
            for (nx, ny) in [(x + 1, y), (x, y + 1)] {
                if nx < image.width() && ny < image.height() {
                    let q = image.get_pixel(nx, ny);
                    for c in 0..3 {
                        e += (p[c] as f64 - q[c] as f64).powi(2);
                    }
                }
            }
        }
        e
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_valid_ones() {
        for name in Replacement::NAMES {
            assert_eq!(Replacement::from_name(name).unwrap().name(), name);
        }
        assert_eq!(
            Replacement::from_name(" Pixelate ").unwrap(),
            Replacement::Pixelate
        );
        let err = Replacement::from_name("sepia").unwrap_err();
        assert!(
            matches!(
                &err,
                EngineError::InvalidRequest {
                    field: "safety_checker_type",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        for name in Replacement::NAMES {
            assert!(msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn black_is_all_zero() {
        let out = Replacement::Black.apply(&busy(40, 30));
        assert_eq!(out.dimensions(), (40, 30));
        assert!(out.as_raw().iter().all(|v| *v == 0));
    }

    #[test]
    fn blur_removes_almost_all_detail_at_any_size() {
        for (w, h) in [(64, 64), (72, 56), (512, 384), (1024, 1024)] {
            let img = busy(w, h);
            let out = Replacement::Blur.apply(&img);
            assert_eq!(out.dimensions(), (w, h));
            let ratio = detail(&out) / detail(&img);
            assert!(ratio < 0.01, "{w}x{h}: detail kept {ratio}");
        }
    }

    #[test]
    fn pixelate_gives_constant_blocks_of_the_mean_colour() {
        for (w, h) in [(64, 64), (1024, 768), (50, 7)] {
            let img = busy(w, h);
            let out = Replacement::Pixelate.apply(&img);
            let block = w.max(h).div_ceil(PIXEL_BLOCKS);
            assert!(w.div_ceil(block) <= PIXEL_BLOCKS && h.div_ceil(block) <= PIXEL_BLOCKS);
            for (x, y, p) in out.enumerate_pixels() {
                let corner = out.get_pixel(x / block * block, y / block * block);
                assert_eq!(p, corner, "{w}x{h}: ({x}, {y}) differs from its block");
            }
            // the first block's colour is its pixels' mean
            let n = (block.min(w) * block.min(h)) as f64;
            let mean: f64 = (0..block.min(h))
                .flat_map(|y| (0..block.min(w)).map(move |x| (x, y)))
                .map(|(x, y)| img.get_pixel(x, y)[0] as f64)
                .sum::<f64>()
                / n;
            assert!((out.get_pixel(0, 0)[0] as f64 - mean).abs() <= 0.5);
            assert!(detail(&out) < 0.1 * detail(&img));
        }
    }

    #[test]
    fn notice_is_blurred_background_plate_and_white_text() {
        for (w, h) in [(64, 64), (72, 56), (256, 256), (512, 512), (1024, 640)] {
            let img = busy(w, h);
            let out = Replacement::SensitiveContentText.apply(&img);
            let blurred = Replacement::Blur.apply(&img);
            let layout = notice_layout(w, h);
            let (left, top, right, bottom) = layout.plate;
            assert!(right > left && bottom > top);
            // the text is centred and as wide as the layout rules say
            let tw = layout.text.width();
            assert!(tw as f32 <= NOTICE_WIDTH * w as f32 + 1.0, "{w}x{h}: {tw}");
            assert!(
                tw as f32 >= 0.3 * w as f32,
                "{w}x{h}: text only {tw} px wide"
            );
            let (ox, oy) = layout.text_origin;
            assert!((ox as i64 * 2 + tw as i64 - w as i64).abs() <= 1);
            assert!((oy as i64 * 2 + layout.text.height() as i64 - h as i64).abs() <= 1);
            let mut bright = 0;
            for (x, y, p) in out.enumerate_pixels() {
                let in_plate = (left..right).contains(&x) && (top..bottom).contains(&y);
                let b = blurred.get_pixel(x, y);
                let coverage = if x >= ox && y >= oy && x - ox < tw && y - oy < layout.text.height()
                {
                    layout.text.get_pixel(x - ox, y - oy)[0]
                } else {
                    0
                };
                if !in_plate {
                    assert_eq!(
                        p, b,
                        "{w}x{h}: ({x}, {y}) outside the plate is not the blur"
                    );
                } else {
                    for c in 0..3 {
                        let dark = (b[c] as f32 * PLATE_BRIGHTNESS).round() as u8;
                        match coverage {
                            0 => assert_eq!(p[c], dark),
                            255 => assert_eq!(p[c], 255),
                            _ => assert!(p[c] >= dark),
                        }
                    }
                    if coverage >= 192 {
                        bright += 1;
                    }
                }
            }
            // the text's strokes are there: a good share of the text box is (nearly) white
            let area = tw * layout.text.height();
            assert!(
                bright * 8 > area,
                "{w}x{h}: only {bright} of {area} text pixels lit"
            );
        }
    }

    #[test]
    fn notice_uses_one_line_on_wide_images_and_two_on_narrow_ones() {
        let glyph_rows = |w, h| notice_layout(w, h).text.height();
        // one line of 8 font pixels at scale 3 on 512 px; two lines on 256 px
        assert_eq!(glyph_rows(512, 512), 8 * 3);
        assert_eq!(glyph_rows(256, 256), (2 * 8 + LINE_GAP) * 2);
        // every lit font pixel is drawn once: no glyph is cut off or overlaps another
        let lit: u32 = NOTICE
            .bytes()
            .map(|c| {
                font8x8::legacy::BASIC_LEGACY[c as usize]
                    .iter()
                    .map(|row| row.count_ones())
                    .sum::<u32>()
            })
            .sum();
        assert!(lit > 100);
        for lines in [&[NOTICE][..], &NOTICE_LINES[..]] {
            let mask = render_lines(lines);
            assert_eq!(mask.pixels().filter(|p| p[0] == 255).count() as u32, lit);
            assert_eq!(
                mask.pixels().filter(|p| p[0] != 0 && p[0] != 255).count(),
                0
            );
        }
    }

    #[test]
    fn replacements_survive_tiny_and_thin_images() {
        for (w, h) in [(1, 1), (1, 300), (300, 2), (3, 3)] {
            let img = busy(w, h);
            for name in Replacement::NAMES {
                let out = Replacement::from_name(name).unwrap().apply(&img);
                assert_eq!(out.dimensions(), (w, h), "{name} {w}x{h}");
            }
        }
    }

    #[test]
    fn only_flagged_images_are_replaced() {
        let originals = vec![busy(20, 20), busy(30, 10), busy(8, 8)];
        let mut images = originals.clone();
        replace_flagged(&mut images, &[false, true], Replacement::Black);
        assert_eq!(images[0], originals[0]);
        assert!(images[1].as_raw().iter().all(|v| *v == 0));
        assert_eq!(images[2], originals[2], "no flag: left alone");
    }
}
