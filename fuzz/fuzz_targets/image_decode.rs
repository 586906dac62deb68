//! Image bytes as the engine and the CLI read them: `image_io::decode_image` (format sniffing, the pixel limit
//! checked from the header, EXIF orientation), `image_io::png_text` (the `parameters` text chunk
//! `pictor from-png` reads) and `infotext::parse` on what it finds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pictor_engine::image_io;

/// A smaller pixel limit than the server's default (64 Mpx) so that runs explore the decoders rather than
/// spend their time filling huge images; the limit is enforced the same way at any value.
const MAX_PIXELS: u64 = 1 << 22;

fuzz_target!(|bytes: &[u8]| {
    if bytes.len() > pictor_fuzz::MAX_BODY_BYTES {
        return;
    }
    if let Ok(img) = image_io::decode_image(bytes, MAX_PIXELS) {
        assert!(img.width() as u64 * img.height() as u64 <= MAX_PIXELS);
        assert!(img.width() > 0 && img.height() > 0);
    }
    if let Some(text) = image_io::png_text(bytes, "parameters") {
        let parsed = pictor_server::infotext::parse(&text);
        let _ = parsed.get("Steps");
    }
});
