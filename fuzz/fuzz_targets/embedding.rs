//! Textual-inversion embeddings: `TextualInversion::load` on `.safetensors` (A1111 `emb_params`,
//! `string_to_param.*`, diffusers' single tensor, SDXL `clip_l` + `clip_g`) and on PyTorch `.pt` / `.bin` zip
//! archives (candle's pickle reader, which never runs code), which picks the tensor by key name.
//!
//! Input: the first byte picks the mode. 0, 1, 2: the rest is a `.safetensors`, `.pt` or `.bin` file. Otherwise
//! structured: a safetensors file whose tensors are named from the keys embeddings use (and others), with small
//! shapes and data from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pictor_engine::embeddings::TextualInversion;
use pictor_fuzz::{dim, dtype, Entry, Model, Unstructured};

const KEYS: &[&str] = &[
    "emb_params",
    "string_to_param.*",
    "clip_l",
    "clip_g",
    "<cat-toy>",
    "*",
    "other",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = pictor_fuzz::scratch();
    let path = match mode % 4 {
        0 => dir.join("emb.safetensors"),
        1 => dir.join("emb.pt"),
        2 => dir.join("emb.bin"),
        _ => dir.join("emb-structured.safetensors"),
    };
    if mode % 4 < 3 {
        std::fs::write(&path, rest).unwrap();
    } else {
        let mut u = Unstructured::new(rest);
        let mut model = Model::default();
        for _ in 0..u.int_in_range(0..=3u8).unwrap_or(1) {
            let name = u.choose(KEYS).map(|k| k.to_string()).unwrap_or_default();
            let rank = u.int_in_range(0..=3u8).unwrap_or(2);
            let shape = (0..rank)
                .map(|_| {
                    if u.arbitrary().unwrap_or(true) {
                        dim(&mut u)
                    } else {
                        768
                    }
                })
                .collect();
            model.entries.push(Entry {
                name,
                dtype: dtype(&mut u).into(),
                shape,
            });
        }
        let fill = u.bytes(u.len().min(64)).unwrap_or(&[]).to_vec();
        model.write(&path, &fill, false);
    }
    if let Ok(emb) = TextualInversion::load(&path, "fuzz") {
        assert!(emb.vector_count() > 0 && emb.hidden_size() > 0);
        if let Some(g) = &emb.vectors_g {
            assert_eq!(g.dims()[0], emb.vector_count());
        }
    }
});
