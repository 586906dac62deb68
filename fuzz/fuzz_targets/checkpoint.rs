//! Single-file checkpoints (CivitAI / A1111 `.safetensors`): `SingleFileCheckpoint::open` infers the family and
//! every architecture from tensor names and shapes and maps LDM names to diffusers names, reading the YAML
//! sidecar (`<name>.yaml`, `parameterization: "v"`) when there is one; then `tensor_names` / `source_name`,
//! `ldm_unet_module` on every UNet module, and a few tensors read through the renaming builders (squeezed,
//! split q/k/v, transposed). Also `VaeFile::open` (a VAE file) on the same file.
//!
//! Input: structured. A fixture checkpoint's tensor list (SD 1, SD 2, SDXL, SDXL refiner, or an LDM / diffusers
//! VAE) is mutated (tensors dropped, reshaped, retyped, renamed, added), written as a sparse file (a valid
//! header; the data is a hole of zeros), with an optional YAML sidecar.
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use pictor_engine::checkpoint::{self, Component, SingleFileCheckpoint, VaeFile};
use pictor_fuzz::{templates, Model, Unstructured, NAME_FRAGMENTS};

const YAMLS: &[&str] = &[
    "model:\n  params:\n    parameterization: \"v\"\n",
    "model:\n  params:\n    parameterization: 'v'\n",
    "parameterization: v # v-prediction\n",
    "model:\n  params:\n    parameterization: \"eps\"\n",
    "# parameterization: \"v\"\n",
    "",
];

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let choice = u.int_in_range(0..=5u8).unwrap_or(0);
    let template = match choice {
        0 => templates::ckpt_sd1,
        1 => templates::ckpt_sd2,
        2 => templates::ckpt_sdxl,
        3 => templates::ckpt_sdxl_refiner,
        4 => templates::vae_ldm,
        _ => templates::vae_diffusers,
    };
    let mut model = Model::parse(template);
    model.mutate(&mut u, NAME_FRAGMENTS, 24);

    let dir = pictor_fuzz::scratch();
    let path = dir.join("model.safetensors");
    let yaml = dir.join("model.yaml");
    let _ = std::fs::remove_file(&yaml);
    match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => {}
        1 => std::fs::write(&yaml, *u.choose(YAMLS).unwrap_or(&"")).unwrap(),
        _ => {
            let text: String = u.arbitrary().unwrap_or_default();
            std::fs::write(&yaml, text).unwrap()
        }
    }
    model.write(&path, &[], true);

    if let Ok(ckpt) = SingleFileCheckpoint::open(&path, "fuzz") {
        let _ = format!("{ckpt:?}");
        for component in [
            Component::Unet,
            Component::Vae,
            Component::TextEncoder,
            Component::TextEncoder2,
        ] {
            let names = ckpt.tensor_names(component);
            for name in &names {
                assert!(ckpt.source_name(component, name).is_some(), "{name}");
                if component == Component::Unet {
                    if let Some(module) = name.strip_suffix(".weight") {
                        let _ = checkpoint::ldm_unet_module(module, &ckpt.unet);
                    }
                }
            }
            // Read a few tensors through the renaming (zeros; only those small enough to read quickly).
            let vb = ckpt
                .var_builder(component, DType::F32, &Device::Cpu)
                .unwrap();
            for _ in 0..u.int_in_range(0..=3u8).unwrap_or(0) {
                if let Ok(name) = u.choose(&names) {
                    let stored = ckpt
                        .source_name(component, name)
                        .and_then(|n| model.elements(n));
                    if stored.is_some_and(|n| n <= pictor_fuzz::MAX_ELEMENTS) {
                        let _ = vb.get_unchecked_dtype(name, DType::F32);
                    }
                }
            }
        }
    }
    // (A VAE file may also be a whole checkpoint; not every time, as each open reads the header again.)
    if choice >= 4 || u.ratio(1, 4).unwrap_or(false) {
        vae_file(&path, &model);
    }
});

fn vae_file(path: &std::path::Path, model: &Model) {
    if let Ok(vae) = VaeFile::open(path, "fuzz") {
        // Read two tensors, when what they are read from is small enough to read quickly.
        let small = |part: &str| {
            model
                .entries
                .iter()
                .filter(|e| e.name.contains(part))
                .all(|e| e.shape.iter().product::<usize>() <= pictor_fuzz::MAX_ELEMENTS)
        };
        if !small("encoder.conv_in") || !small("encoder.mid") {
            return;
        }
        let vb = vae.var_builder(DType::F32, &Device::Cpu);
        let _ = vb.get_unchecked_dtype("encoder.conv_in.weight", DType::F32);
        let _ = vb.get_unchecked_dtype("encoder.mid_block.attentions.0.to_q.weight", DType::F32);
    }
}
