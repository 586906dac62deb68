//! Where and in what precision models run.

use candle_core::{DType, Device};

use crate::error::Result;

/// The device and weight precision models are loaded for.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// CPU, or a CUDA GPU when built with the `cuda` feature and one is present.
    pub device: Device,
    /// Precision of the UNet and VAE weights and activations (the text encoder always runs in float32).
    pub dtype: DType,
}

impl Runtime {
    /// The first CUDA GPU in float16 when built with `cuda` and one is present; otherwise the CPU in float32.
    pub fn default_for_this_machine() -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            if candle_core::utils::cuda_is_available() {
                return Ok(Runtime {
                    device: Device::new_cuda(0)?,
                    dtype: DType::F16,
                });
            }
        }
        Ok(Runtime::cpu())
    }

    /// The CPU in float32.
    pub fn cpu() -> Self {
        Runtime {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}
