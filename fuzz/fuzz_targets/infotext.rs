//! Infotexts (the generation parameters in a PNG's `parameters` chunk, Pictor's or AUTOMATIC1111's) as
//! `pictor from-png` reads them: `infotext::parse`; and A1111 checkpoint titles (`a1111::model_id_of_title`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pictor_server::{a1111, infotext};

fuzz_target!(|text: &str| {
    let parsed = infotext::parse(text);
    for key in [
        "Steps",
        "Sampler",
        "CFG scale",
        "Seed",
        "Size",
        "Model",
        "Denoising strength",
        "Lora hashes",
    ] {
        let _ = parsed.get(key);
    }
    for (key, value) in &parsed.settings {
        assert_eq!(key.trim(), key);
        assert_eq!(value.trim(), value);
    }
    let _ = a1111::model_id_of_title(text);
});
