//! LoRA files: `Lora::load` (safetensors header and `lora_adapter_metadata` alphas, kohya `lora_unet_` /
//! `lora_te{,1,2}_` and diffusers / PEFT key names, refused LyCORIS variants) and `lora::merged_weights`, which
//! maps each layer's module name onto a network's weights (underscored, dotted and SDXL LDM paths through
//! `ldm_unet_module`) and checks shapes before merging.
//!
//! Input: the first byte picks the mode. Even: the rest is the file. Odd: structured, a fixture LoRA's tensor
//! list (kohya, PEFT, SD 2 kohya, SDXL kohya, SDXL PEFT) mutated, its data filled from the input. Each LoRA that
//! loads is merged into the tiny SD 1 or SDXL networks (UNet and text encoders, weights zero).
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use libfuzzer_sys::fuzz_target;
use pictor_engine::config::UNetConfig;
use pictor_engine::lora::{self, Lora, LoraTarget};
use pictor_engine::weights::{NamedWeights, Recorder};
use pictor_fuzz::{templates, Model, Unstructured, NAME_FRAGMENTS};

/// One model's networks: (target, weights, UNet config for the UNet).
struct Base {
    networks: Vec<(LoraTarget, NamedWeights)>,
    unet: UNetConfig,
}

/// A network with zero weights of the template's names and shapes (text encoders under `text_model.`).
fn network(template: &str, text: bool) -> NamedWeights {
    let model = Model::parse(template);
    let mut tensors = HashMap::new();
    for e in &model.entries {
        let name =
            if text && !e.name.starts_with("text_model.") && !e.name.starts_with("text_projection")
            {
                format!("text_model.{}", e.name)
            } else {
                e.name.clone()
            };
        if name.ends_with("position_ids") {
            continue;
        }
        tensors.insert(
            name,
            Tensor::zeros(e.shape.as_slice(), DType::F32, &Device::Cpu).unwrap(),
        );
    }
    let names: Vec<String> = tensors.keys().cloned().collect();
    let (vb, handle) = Recorder::wrap(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu));
    for name in names {
        vb.get_unchecked(&name).unwrap();
    }
    handle.take()
}

fn bases() -> &'static [Base; 2] {
    static BASES: OnceLock<[Base; 2]> = OnceLock::new();
    BASES.get_or_init(|| {
        let config = |json: &str| serde_json::from_str::<UNetConfig>(json).unwrap();
        [
            Base {
                networks: vec![
                    (LoraTarget::Unet, network(templates::net_sd1_unet, false)),
                    (
                        LoraTarget::TextEncoder,
                        network(templates::net_sd1_text, true),
                    ),
                ],
                unet: config(include_str!(
                    "../../tests/fixtures/models/checkpoints/sd1-tiny/unet/config.json"
                )),
            },
            Base {
                networks: vec![
                    (LoraTarget::Unet, network(templates::net_sdxl_unet, false)),
                    (
                        LoraTarget::TextEncoder,
                        network(templates::net_sdxl_text, true),
                    ),
                    (
                        LoraTarget::TextEncoder2,
                        network(templates::net_sdxl_text_2, true),
                    ),
                ],
                unet: config(include_str!(
                    "../../tests/fixtures/models/checkpoints/sdxl-tiny/unet/config.json"
                )),
            },
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = pictor_fuzz::scratch().join("lora.safetensors");
    let mut u = Unstructured::new(rest);
    let base = &bases()[(mode / 2 % 2) as usize];
    if mode % 2 == 0 {
        std::fs::write(&path, rest).unwrap();
    } else {
        let template = match u.int_in_range(0..=4u8).unwrap_or(0) {
            0 => templates::lora_kohya,
            1 => templates::lora_peft,
            2 => templates::lora_sd2_kohya,
            3 => templates::lora_sdxl_kohya,
            _ => templates::lora_sdxl_peft,
        };
        let mut model = Model::parse(template);
        model.mutate(&mut u, NAME_FRAGMENTS, 16);
        if u.arbitrary().unwrap_or(false) {
            let metadata: String = u.arbitrary().unwrap_or_default();
            model
                .metadata
                .insert("lora_adapter_metadata".into(), metadata);
        }
        let fill = u.bytes(u.len().min(64)).unwrap_or(&[]).to_vec();
        model.write(
            &path,
            if fill.is_empty() {
                &[0, 0, 0x80, 0x3f]
            } else {
                &fill
            },
            false,
        );
    }
    let Ok(lora) = Lora::load(&path, "fuzz") else {
        return;
    };
    let _ = lora.layer_counts();
    let strength = u.int_in_range(-20..=20i8).unwrap_or(10) as f64 / 10.0;
    for (target, weights) in &base.networks {
        let unet = (*target == LoraTarget::Unet).then_some(&base.unet);
        if let Ok(merged) = lora::merged_weights(weights, *target, &[(&lora, strength)], unet) {
            for (name, tensor) in &merged {
                assert_eq!(tensor.dims(), weights.get(name).unwrap().dims(), "{name}");
            }
        }
    }
});
