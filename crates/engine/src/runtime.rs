//! Where and in what precision models run.

use candle_core::{DType, Device};

use crate::error::{EngineError, Result};

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

    /// CUDA GPU 0 in float16, or why it cannot be opened (no fallback to the CPU: for the commands that are
    /// asked for the GPU by name, `pictor bench --device cuda` and `pictor check-fixtures --device cuda`).
    pub fn cuda() -> Result<Self> {
        match Device::new_cuda(0) {
            Ok(device) => Ok(Runtime {
                device,
                dtype: DType::F16,
            }),
            Err(e) => Err(EngineError::invalid(
                "device",
                if cfg!(feature = "cuda") {
                    format!("CUDA GPU 0 could not be opened: {e}")
                } else {
                    "this pictor was built without CUDA (cargo build --features cuda)".to_string()
                },
            )),
        }
    }

    /// This device with the UNet and VAE in float16 (`true`, as on a GPU) or float32 (`false`).
    pub fn in_f16(self, f16: bool) -> Self {
        Runtime {
            dtype: if f16 { DType::F16 } else { DType::F32 },
            ..self
        }
    }

    /// The CPU in float32.
    pub fn cpu() -> Self {
        Runtime {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}
