//! The server's `init_image` / `init_images` / `image` readers: `init_image::decode_base64` (raw base64 in any
//! of the four alphabets, or a `data:` URI, with line breaks) and `init_image::check_image` (PNG/JPEG/WebP
//! sniffing, the pixel limit from the header, a bounded decode).
//!
//! Input: the first byte picks the mode (even: the rest is the request's text, decoded then checked; odd: the
//! rest is the file itself).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pictor_server::init_image;

/// Smaller than the server's default `--max-image-pixels` (64 Mpx) so runs explore the decoders; see
/// image_decode.rs.
const MAX_PIXELS: u64 = 1 << 22;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if rest.len() > pictor_fuzz::MAX_BODY_BYTES {
        return;
    }
    let bytes = if mode % 2 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        match init_image::decode_base64(text) {
            Some(bytes) => bytes,
            None => return,
        }
    } else {
        rest.to_vec()
    };
    if let Ok(img) = init_image::check_image(bytes, MAX_PIXELS) {
        assert!(img.width > 0 && img.height > 0);
        assert!(img.width as u64 * img.height as u64 <= MAX_PIXELS);
        assert!(matches!(img.format, "png" | "jpeg" | "webp"));
    }
});
