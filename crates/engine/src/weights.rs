//! The loaded tensors of one network, kept by name so that variants of a model (with LoRAs merged in) can
//! be built from them without reading the files again and without copying what they do not change.
//!
//! A network is built through a [`Recorder`]: a candle backend that reads from the real source (a memory
//! map, a renamed checkpoint) and remembers every tensor it hands out. The remembered [`NamedWeights`]
//! share storage with the network itself (candle tensors are reference counted), so keeping them costs no
//! memory — except for a UNet loaded while bf16 products are on, whose layers keep only bf16 copies:
//! its matrices are remembered in bf16 ([`Recorder::wrap_for_bf16_layers`]), half their f32 size. A
//! variant is then built from a [`VarBuilder`] over the same tensors with some replaced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// The tensors a network was built from, by their diffusers / transformers names.
#[derive(Debug, Clone, Default)]
pub struct NamedWeights {
    tensors: HashMap<String, Tensor>,
}

impl NamedWeights {
    /// The tensor called `name`, if the network has one.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Every name, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// How many tensors there are.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// A builder that serves these tensors, with the ones in `replaced` taking the place of the originals
    /// (shapes are checked by the network as it is built).
    pub fn var_builder_with(
        &self,
        replaced: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let mut tensors = self.tensors.clone();
        tensors.extend(replaced);
        VarBuilder::from_tensors(tensors, dtype, device)
    }
}

/// A candle backend that serves tensors from another builder and remembers each one it hands out.
pub struct Recorder {
    source: VarBuilder<'static>,
    seen: Arc<Mutex<HashMap<String, Tensor>>>,
    /// Remember f32 CPU matrices (rank ≥ 2) as bf16 (see [`Recorder::wrap_for_bf16_layers`]).
    matrices_in_bf16: bool,
}

impl Recorder {
    /// Wraps `source`; returns the recording builder and a handle to read what it saw once the network is
    /// built (see [`RecordHandle::take`]).
    pub fn wrap(source: VarBuilder<'static>) -> (VarBuilder<'static>, RecordHandle) {
        Recorder::wrap_with(source, false)
    }

    /// Like [`Recorder::wrap`], for a network whose convolutions and linear layers keep only a bf16
    /// copy of their weights when bf16 products are on (the UNet): then f32 CPU matrices and kernels
    /// (rank ≥ 2) are remembered in bf16, half the memory, and the f32 values are not kept at all. A
    /// variant built from them packs the same bf16 weights again; a LoRA merged into them is rounded
    /// to bf16 twice instead of once. Vectors (biases, norms) are remembered as they are.
    pub fn wrap_for_bf16_layers(
        source: VarBuilder<'static>,
    ) -> (VarBuilder<'static>, RecordHandle) {
        Recorder::wrap_with(source, crate::kernels::bf16_products())
    }

    fn wrap_with(
        source: VarBuilder<'static>,
        matrices_in_bf16: bool,
    ) -> (VarBuilder<'static>, RecordHandle) {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let dtype = source.dtype();
        let device = source.device().clone();
        let recorder = Recorder {
            source,
            seen: seen.clone(),
            matrices_in_bf16,
        };
        (
            VarBuilder::from_backend(Box::new(recorder), dtype, device),
            RecordHandle(seen),
        )
    }

    fn remember(&self, name: &str, tensor: &Tensor) -> candle_core::Result<()> {
        let kept = if self.matrices_in_bf16 && tensor.rank() >= 2 && crate::kernels::accepts(tensor)
        {
            tensor.to_dtype(DType::BF16)?
        } else {
            tensor.clone()
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(name.to_string(), kept);
        Ok(())
    }
}

/// Where a [`Recorder`]'s tensors are collected.
pub struct RecordHandle(Arc<Mutex<HashMap<String, Tensor>>>);

impl RecordHandle {
    /// The tensors handed out so far.
    pub fn take(self) -> NamedWeights {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        NamedWeights {
            tensors: std::mem::take(&mut *seen),
        }
    }
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        hints: candle_nn::Init,
        dtype: DType,
        _device: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self
            .source
            .get_with_hints_dtype(shape, name, hints, dtype)?;
        self.remember(name, &t)?;
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _device: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.source.get_unchecked_dtype(name, dtype)?;
        self.remember(name, &t)?;
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_tensors_are_shared_and_replacements_take_their_place() {
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        map.insert(
            "a.weight".to_string(),
            Tensor::ones((2, 3), DType::F32, &dev).unwrap(),
        );
        map.insert(
            "b.weight".to_string(),
            Tensor::zeros(4, DType::F32, &dev).unwrap(),
        );
        let (vb, handle) = Recorder::wrap(VarBuilder::from_tensors(map, DType::F32, &dev));
        let a = vb.pp("a").get((2, 3), "weight").unwrap();
        assert!(
            vb.pp("a").get((3, 2), "weight").is_err(),
            "shape is checked"
        );
        let weights = handle.take();
        assert_eq!(weights.len(), 1, "only what was read is kept");
        let kept = weights.get("a.weight").unwrap();
        assert_eq!(
            kept.id(),
            a.id(),
            "kept tensors are the network's own, not copies"
        );

        let mut replaced = HashMap::new();
        replaced.insert("a.weight".to_string(), (kept * 2.0).unwrap());
        let vb = weights.var_builder_with(replaced, DType::F32, &dev);
        let got = vb.get((2, 3), "a.weight").unwrap();
        assert_eq!(got.sum_all().unwrap().to_scalar::<f32>().unwrap(), 12.0);
        assert!(!vb.contains_tensor("b.weight"));
    }
}
