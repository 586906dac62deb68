//! Turns the headers of the repository's tiny fixture models into name/dtype/shape lists the structured targets
//! start from (so no weights are copied into the fuzz crate and nothing is read from disk while fuzzing).

use std::io::Read;
use std::path::Path;

const TEMPLATES: &[(&str, &str)] = &[
    ("ckpt_sd1", "models/checkpoints/sd1-tiny-single.safetensors"),
    ("ckpt_sd2", "models/checkpoints/sd2-tiny-single.safetensors"),
    (
        "ckpt_sdxl",
        "models/checkpoints/sdxl-tiny-single.safetensors",
    ),
    (
        "ckpt_sdxl_refiner",
        "models/checkpoints/sdxl-refiner-tiny-single.safetensors",
    ),
    ("vae_ldm", "models/vae/tiny-alt-ldm.safetensors"),
    (
        "vae_diffusers",
        "models/vae/tiny-alt/diffusion_pytorch_model.safetensors",
    ),
    ("lora_kohya", "models/loras/tiny-kohya.safetensors"),
    ("lora_peft", "models/loras/tiny-peft.safetensors"),
    ("lora_sd2_kohya", "models/loras/tiny-sd2-kohya.safetensors"),
    (
        "lora_sdxl_kohya",
        "models/loras/tiny-sdxl-kohya.safetensors",
    ),
    ("lora_sdxl_peft", "models/loras/tiny-sdxl-peft.safetensors"),
    (
        "net_sd1_unet",
        "models/checkpoints/sd1-tiny/unet/diffusion_pytorch_model.safetensors",
    ),
    (
        "net_sd1_text",
        "models/checkpoints/sd1-tiny/text_encoder/model.safetensors",
    ),
    (
        "net_sdxl_unet",
        "models/checkpoints/sdxl-tiny/unet/diffusion_pytorch_model.safetensors",
    ),
    (
        "net_sdxl_text",
        "models/checkpoints/sdxl-tiny/text_encoder/model.safetensors",
    ),
    (
        "net_sdxl_text_2",
        "models/checkpoints/sdxl-tiny/text_encoder_2/model.safetensors",
    ),
];

fn main() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let out = std::env::var("OUT_DIR").unwrap();
    for (name, file) in TEMPLATES {
        let path = fixtures.join(file);
        println!("cargo:rerun-if-changed={}", path.display());
        let mut f =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut len = [0u8; 8];
        f.read_exact(&mut len).unwrap();
        let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
        f.read_exact(&mut header).unwrap();
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).unwrap();
        // One line per tensor: name TAB dtype TAB dims (comma-separated); metadata as `#meta TAB key TAB value`.
        let mut text = String::new();
        for (key, value) in &header {
            if key == "__metadata__" {
                for (k, v) in value.as_object().unwrap() {
                    let v = v.as_str().unwrap().replace(['\t', '\n'], " ");
                    text.push_str(&format!("#meta\t{k}\t{v}\n"));
                }
                continue;
            }
            let dims: Vec<String> = value["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.to_string())
                .collect();
            text.push_str(&format!(
                "{key}\t{}\t{}\n",
                value["dtype"].as_str().unwrap(),
                dims.join(",")
            ));
        }
        std::fs::write(Path::new(&out).join(format!("{name}.txt")), text).unwrap();
    }
}
