//! Safetensors files as bytes: `checkpoint::check_safetensors_header` (the up-front check every weight file
//! gets), then the readers behind it on the same file: `checkpoint::SingleFileCheckpoint::open`,
//! `checkpoint::VaeFile::open` and `checkpoint::hf_clip_text_vb` (a diffusers folder's text encoder).
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use pictor_engine::checkpoint::{self, SingleFileCheckpoint, VaeFile};

fuzz_target!(|bytes: &[u8]| {
    if bytes.len() > pictor_fuzz::MAX_BODY_BYTES {
        return;
    }
    let path = pictor_fuzz::scratch_file("raw.safetensors", bytes);
    let checked = checkpoint::check_safetensors_header("fuzz", &path);
    if checked.is_ok() {
        // What the check lets through, the safetensors reader itself must accept.
        if let Err(e) = safetensors::SafeTensors::deserialize(bytes) {
            if !matches!(
                e,
                safetensors::SafeTensorError::InvalidHeaderDeserialization(_)
            ) {
                panic!("the header check passed a file safetensors refuses: {e:?}");
            }
        }
    }
    let _ = SingleFileCheckpoint::open(&path, "fuzz");
    let _ = VaeFile::open(&path, "fuzz");
    if let Ok(vb) = checkpoint::hf_clip_text_vb("fuzz", &[path], DType::F32, &Device::Cpu) {
        let _ = vb.contains_tensor("text_model.embeddings.token_embedding.weight");
    }
});
