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
    /// The first CUDA GPU in float16 when built with `cuda` and one can be opened; otherwise the CPU in
    /// float32. A `cuda` build on a machine whose driver reports no usable GPU logs why and falls back to
    /// the CPU rather than refusing to start.
    pub fn default_for_this_machine() -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            match Device::new_cuda(0) {
                Ok(device) => {
                    tracing::info!("running on CUDA GPU 0 in float16");
                    return Ok(Runtime {
                        device,
                        dtype: DType::F16,
                    });
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "built with CUDA but GPU 0 could not be opened: running on the CPU instead"
                ),
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
