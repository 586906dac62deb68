//! Turning prompts into the text embeddings the UNet attends to, batched for classifier-free guidance.

use candle_core::Tensor;

use super::StableDiffusion;
use crate::error::Result;

impl StableDiffusion {
    /// Embeds one prompt: tokens padded to 77, through the text encoder with `clip_skip`; (1, 77, hidden).
    pub(crate) fn embed_prompt(&self, text: &str, clip_skip: usize) -> Result<Tensor> {
        let ids = self.tokenizer.encode_padded(text)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self
            .text_encoder
            .forward(&ids, clip_skip)?
            .to_dtype(self.dtype)?)
    }

    /// The embeddings of `parts` (prompt or negative, each repeated `samples` times) concatenated along the
    /// batch in the given order, as diffusers builds the guidance batch.
    pub(crate) fn guidance_batch(&self, parts: &[&Tensor], samples: usize) -> Result<Tensor> {
        let repeated = parts
            .iter()
            .map(|t| t.repeat((samples, 1, 1)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&repeated, 0)?)
    }
}

/// Splits a batched UNet output into `n` equal chunks along the batch (the guidance branches).
pub(crate) fn split_batch(t: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    Ok(t.chunk(n, 0)?)
}
