//! The Stable Diffusion networks, owned here on candle-nn so that clip skip, the VAE's mode, token merging,
//! LoRA merging and fused CPU kernels can reach inside them. Weight names are diffusers' (the single-file
//! loader renames LDM checkpoints to them); every size comes from the model's config.

mod attention;
pub mod clip;
pub mod clip_vision;
mod layers;
mod resnet;
pub mod tome;
pub mod unet;
pub mod vae;

pub use clip::ClipTextModel;
pub use clip_vision::{ClipVisionConfig, ClipVisionModel};
pub use tome::{TokenMerging, TomeSettings};
pub use unet::{AddedConditions, UNet, UNetOptions};
pub use vae::{AutoencoderKl, LatentDistribution};
