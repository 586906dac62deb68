//! Turning prompts into the text embeddings the UNet attends to, batched for classifier-free guidance.
//!
//! Prompts use AUTOMATIC1111's syntax ([`crate::prompt_syntax`]); their chunks ([`super::prompt_chunks`]) go
//! through the text encoder one by one, are re-weighted as AUTOMATIC1111 does, and are concatenated.

use candle_core::{DType, Tensor};

use super::prompt_chunks::{chunk_prompt, Chunk, Slot, Trigger};
use super::StableDiffusion;
use crate::embeddings::{family_of_hidden_size, TextualInversion};
use crate::error::{EngineError, Result};
use crate::prompt_syntax::parse;

impl StableDiffusion {
    /// Encodes each `(prompt, clip_skip)` to its conditioning (1, 77·k, hidden), all with the same k: shorter
    /// ones are extended with the empty prompt's encoding (at their own clip skip), as AUTOMATIC1111 does.
    /// `embeddings` are the textual inversions the prompts may name.
    pub fn encode_prompts(
        &self,
        prompts: &[(&str, usize)],
        embeddings: &[TextualInversion],
    ) -> Result<Vec<Tensor>> {
        let hidden = self.text_encoder.config().hidden_size;
        let mut triggers = Vec::with_capacity(embeddings.len());
        for e in embeddings {
            if e.hidden_size() != hidden {
                return Err(EngineError::invalid(
                    "embeddings_model",
                    format!(
                        "embedding {} was made for {} ({}-wide vectors) and does not fit model {}, which is \
                         {} (text encoder {hidden} wide)",
                        e.name,
                        family_of_hidden_size(e.hidden_size()),
                        e.hidden_size(),
                        self.id,
                        family_of_hidden_size(hidden),
                    ),
                ));
            }
            triggers.push(Trigger {
                ids: self.tokenizer.content_ids(&e.name)?,
                vectors: e.vector_count(),
            });
        }
        let mut encoded: Vec<(Vec<Tensor>, usize)> = Vec::with_capacity(prompts.len());
        for &(text, clip_skip) in prompts {
            let chunks = chunk_prompt(&self.tokenizer, &parse(text)?, &triggers)?;
            let tensors = chunks
                .iter()
                .map(|c| self.encode_chunk(c, embeddings, clip_skip))
                .collect::<Result<Vec<_>>>()?;
            encoded.push((tensors, clip_skip));
        }
        let longest = encoded.iter().map(|(t, _)| t.len()).max().unwrap_or(1);
        encoded
            .into_iter()
            .map(|(mut tensors, clip_skip)| {
                if tensors.len() < longest {
                    let empty = chunk_prompt(&self.tokenizer, &[], &[])?;
                    let empty = self.encode_chunk(&empty[0], &[], clip_skip)?;
                    tensors.resize(longest, empty);
                }
                Ok(Tensor::cat(&tensors, 1)?.to_dtype(self.dtype)?)
            })
            .collect()
    }

    /// One chunk through the text encoder (1, 77, hidden) in float32, re-weighted when it has weights: every
    /// token's vector times its weight, then the whole chunk scaled back to its unweighted mean.
    fn encode_chunk(
        &self,
        chunk: &Chunk,
        embeddings: &[TextualInversion],
        clip_skip: usize,
    ) -> Result<Tensor> {
        let placeholder = self.tokenizer.pad_id();
        let ids: Vec<u32> = chunk
            .slots
            .iter()
            .map(|s| match s {
                Slot::Token(id) => *id,
                Slot::Vector { .. } => placeholder,
            })
            .collect();
        let device = &self.device;
        let ids = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
        let has_vectors = chunk.slots.iter().any(|s| matches!(s, Slot::Vector { .. }));
        let z = if has_vectors {
            let tokens = self.text_encoder.embed_tokens(&ids)?;
            let rows = chunk
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    Slot::Token(_) => tokens.narrow(1, i, 1),
                    Slot::Vector { embedding, row } => embeddings[*embedding]
                        .vectors
                        .narrow(0, *row, 1)?
                        .to_device(device)?
                        .to_dtype(tokens.dtype())?
                        .unsqueeze(0),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            self.text_encoder
                .forward_embeds(&Tensor::cat(&rows, 1)?, clip_skip)?
        } else {
            self.text_encoder.forward(&ids, clip_skip)?
        };
        if chunk.unweighted() {
            return Ok(z);
        }
        let z = z.to_dtype(DType::F32)?;
        let n = chunk.weights.len();
        let weights = Tensor::new(chunk.weights.as_slice(), device)?.reshape((1, n, 1))?;
        let original_mean = z.mean_all()?;
        let weighted = z.broadcast_mul(&weights)?;
        let new_mean = weighted.mean_all()?;
        Ok(weighted.broadcast_mul(&(original_mean / new_mean)?)?)
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
