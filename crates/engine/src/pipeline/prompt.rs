//! Turning prompts into the text embeddings the UNet attends to, batched for classifier-free guidance.
//!
//! Prompts use AUTOMATIC1111's syntax ([`crate::prompt_syntax`]); their chunks ([`super::prompt_chunks`]) go
//! through the text encoder one by one, are re-weighted as AUTOMATIC1111 does, and are concatenated.

use candle_core::{DType, Tensor};

use super::prompt_chunks::{chunk_prompt, Chunk, Slot, Trigger};
use super::StableDiffusion;
use super::{AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE};
use crate::embeddings::{family_of_hidden_size, TextualInversion};
use crate::error::{EngineError, Result};
use crate::lora::LoraTarget;
use crate::models::AddedConditions;
use crate::prompt_syntax::parse;

/// One prompt's conditioning: the text embeddings the cross-attention reads (1, 77·k, width) and, for SDXL,
/// the last encoder's pooled, projected embedding (1, projection width).
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    /// The hidden states of every encoder, concatenated along the width.
    pub context: Tensor,
    /// SDXL only: the pooled embedding of the prompt's first window.
    pub pooled: Option<Tensor>,
}

impl PromptEmbedding {
    /// The same shapes filled with zeros: SDXL's unconditional embedding for a missing negative prompt.
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(PromptEmbedding {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }
}

impl StableDiffusion {
    /// Encodes each `(prompt, clip_skip)` to its conditioning, all with the same number k of 77-token
    /// windows: shorter ones are extended with the empty prompt's encoding (at their own clip skip), as
    /// AUTOMATIC1111 does. Every text encoder reads the same prompt (SDXL: both), each through its own
    /// tokenizer. `embeddings` are the textual inversions the prompts may name.
    pub fn encode_prompts(
        &self,
        prompts: &[(&str, usize)],
        embeddings: &[TextualInversion],
    ) -> Result<Vec<PromptEmbedding>> {
        self.check_embeddings(embeddings)?;
        let parsed = prompts
            .iter()
            .map(|(text, _)| parse(text))
            .collect::<Result<Vec<_>>>()?;
        // chunks[tower][prompt]
        let mut chunks = Vec::with_capacity(self.towers.len());
        for tower in &self.towers {
            let triggers = embeddings
                .iter()
                .map(|e| {
                    Ok(Trigger {
                        ids: tower.tokenizer.content_ids(&e.name)?,
                        vectors: e.vector_count(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            chunks.push(
                parsed
                    .iter()
                    .map(|pieces| chunk_prompt(&tower.tokenizer, pieces, &triggers))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        let longest = chunks.iter().flatten().map(Vec::len).max().unwrap_or(1);
        let last = self.towers.len() - 1;
        let mut out = Vec::with_capacity(prompts.len());
        for (p, &(_, clip_skip)) in prompts.iter().enumerate() {
            let mut widths = Vec::with_capacity(self.towers.len());
            let mut pooled = None;
            for (k, tower) in self.towers.iter().enumerate() {
                let mut tensors = Vec::with_capacity(longest);
                for (i, chunk) in chunks[k][p].iter().enumerate() {
                    let (z, chunk_pooled) = self.encode_chunk(k, chunk, embeddings, clip_skip)?;
                    if k == last && i == 0 {
                        pooled = chunk_pooled;
                    }
                    tensors.push(z);
                }
                if tensors.len() < longest {
                    let empty = chunk_prompt(&tower.tokenizer, &[], &[])?;
                    let (empty, _) = self.encode_chunk(k, &empty[0], &[], clip_skip)?;
                    tensors.resize(longest, empty);
                }
                widths.push(Tensor::cat(&tensors, 1)?);
            }
            out.push(PromptEmbedding {
                context: Tensor::cat(&widths, 2)?.to_dtype(self.dtype)?,
                pooled,
            });
        }
        Ok(out)
    }

    /// The vectors of `e` that text tower `k` reads: SDXL's `clip_g` half for ViT-bigG, else `vectors`.
    fn tower_vectors<'a>(&self, e: &'a TextualInversion, k: usize) -> Option<&'a Tensor> {
        match self.tower_targets()[k] {
            LoraTarget::TextEncoder2 => e.vectors_g.as_ref(),
            _ => Some(&e.vectors),
        }
    }

    /// Refuses embeddings that do not fit this model's text encoders.
    pub(crate) fn check_embeddings(&self, embeddings: &[TextualInversion]) -> Result<()> {
        if self.sdxl.is_some() {
            for e in embeddings {
                let fits = (0..self.towers.len()).all(|k| {
                    self.tower_vectors(e, k)
                        .is_some_and(|v| v.dims()[1] == self.towers[k].encoder.config().hidden_size)
                });
                if !fits {
                    let made_for = if e.is_sdxl() {
                        "another SDXL-like model (its clip_l / clip_g widths differ)".to_string()
                    } else {
                        format!(
                            "{} ({}-wide vectors)",
                            family_of_hidden_size(e.hidden_size()),
                            e.hidden_size()
                        )
                    };
                    return Err(EngineError::invalid(
                        "embeddings_model",
                        format!(
                            "embedding {} was made for {made_for} and does not fit model {}, which is SDXL \
                             (an SDXL embedding has clip_l and clip_g vectors)",
                            e.name, self.id
                        ),
                    ));
                }
            }
            return Ok(());
        }
        let hidden = self.text_encoder().config().hidden_size;
        for e in embeddings {
            if e.is_sdxl() {
                return Err(EngineError::invalid(
                    "embeddings_model",
                    format!(
                        "embedding {} is an SDXL embedding (clip_l / clip_g) and does not fit model {}, which \
                         is {}",
                        e.name,
                        self.id,
                        family_of_hidden_size(hidden)
                    ),
                ));
            }
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
        }
        Ok(())
    }

    /// One chunk through one text encoder (1, 77, hidden) in float32, re-weighted when it has weights: every
    /// token's vector times its weight, then the whole chunk scaled back to its unweighted mean. SD 1/2: the
    /// chosen layer with the final layer norm; SDXL: the layer `clip_skip` before the last, without it, and
    /// the pooled embedding when the encoder has its projection.
    fn encode_chunk(
        &self,
        k: usize,
        chunk: &Chunk,
        embeddings: &[TextualInversion],
        clip_skip: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let tower = &self.towers[k];
        let encoder = &tower.encoder;
        let placeholder = tower.tokenizer.pad_id();
        let ids: Vec<u32> = chunk
            .slots
            .iter()
            .map(|s| match s {
                Slot::Token(id) => *id,
                Slot::Vector { .. } => placeholder,
            })
            .collect();
        let device = &self.device;
        let eos_position = pooled_position(
            chunk,
            tower.tokenizer.eos_id(),
            encoder.config(),
            embeddings,
        );
        let ids = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
        let tokens = encoder.embed_tokens(&ids)?;
        let has_vectors = chunk.slots.iter().any(|s| matches!(s, Slot::Vector { .. }));
        let tokens = if has_vectors {
            let rows = chunk
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    Slot::Token(_) => tokens.narrow(1, i, 1),
                    Slot::Vector { embedding, row } => self
                        .tower_vectors(&embeddings[*embedding], k)
                        .expect("checked by check_embeddings")
                        .narrow(0, *row, 1)?
                        .to_device(device)?
                        .to_dtype(tokens.dtype())?
                        .unsqueeze(0),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&rows, 1)?
        } else {
            tokens
        };
        let (z, pooled) = match self.sdxl {
            Some(_) => encoder.forward_sdxl(&tokens, clip_skip, eos_position)?,
            None => (encoder.forward_embeds(&tokens, clip_skip)?, None),
        };
        if chunk.unweighted() {
            return Ok((z, pooled));
        }
        let z = z.to_dtype(DType::F32)?;
        let n = chunk.weights.len();
        let weights = Tensor::new(chunk.weights.as_slice(), device)?.reshape((1, n, 1))?;
        let original_mean = z.mean_all()?;
        let weighted = z.broadcast_mul(&weights)?;
        let new_mean = weighted.mean_all()?;
        Ok((
            weighted.broadcast_mul(&(original_mean / new_mean)?)?,
            pooled,
        ))
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

/// Where transformers' CLIP takes the pooled output of `chunk`. With the legacy `eos_token_id: 2` in the
/// config (what SDXL's ViT-bigG ships) it is the position of the *largest* token id, which is the end-of-text
/// token unless textual-inversion tokens were added to the vocabulary: diffusers adds an embedding's vectors
/// as new tokens (ids from `vocab_size` on, in loading order), so the pooled output then comes from the
/// embedding's last vector. Pictor numbers its embedding vectors the same way, in the request's order, and
/// so pools where diffusers pools. Otherwise it is the first end-of-text token.
fn pooled_position(
    chunk: &Chunk,
    eos: u32,
    config: &crate::config::ClipTextConfig,
    embeddings: &[TextualInversion],
) -> usize {
    let last = chunk.slots.len().saturating_sub(1);
    if config.eos_token_id != 2 {
        return chunk
            .slots
            .iter()
            .position(|s| *s == Slot::Token(eos))
            .unwrap_or(last);
    }
    let mut offsets = Vec::with_capacity(embeddings.len());
    let mut next = config.vocab_size;
    for e in embeddings {
        offsets.push(next);
        next += e.vector_count();
    }
    let id = |s: &Slot| match *s {
        Slot::Token(id) => id as usize,
        Slot::Vector { embedding, row } => offsets[embedding] + row,
    };
    // The first occurrence of the largest id, as torch's argmax.
    let mut best = 0;
    for (i, slot) in chunk.slots.iter().enumerate() {
        if id(slot) > id(&chunk.slots[best]) {
            best = i;
        }
    }
    best
}

impl StableDiffusion {
    /// SDXL's added conditions for a batch made of `parts` (each a prompt's pooled embedding and time ids,
    /// repeated `samples` times) in the given order; `None` for SD 1/2 models.
    pub(crate) fn added_conditions(
        &self,
        parts: &[(&PromptEmbedding, &[f64])],
        samples: usize,
    ) -> Result<Option<AddedConditions>> {
        if self.sdxl.is_none() {
            return Ok(None);
        }
        let mut pooled = Vec::with_capacity(parts.len());
        let mut time_ids = Vec::with_capacity(parts.len() * samples);
        for (embedding, ids) in parts {
            let p = embedding.pooled.as_ref().ok_or_else(|| {
                EngineError::model(&self.id, "the SDXL text encoder gave no pooled embedding")
            })?;
            pooled.push(p.repeat((samples, 1))?);
            time_ids.extend(std::iter::repeat_n(ids.to_vec(), samples));
        }
        Ok(Some(AddedConditions {
            text_embeds: Tensor::cat(&pooled, 0)?,
            time_ids,
        }))
    }

    /// SDXL's micro-conditioning for an output of `width` × `height`: the prompt's and the negative's time
    /// ids (original size, crop top-left (0, 0), then target size, or the refiner's aesthetic scores).
    pub(crate) fn time_ids(&self, width: u32, height: u32) -> (Vec<f64>, Vec<f64>) {
        let (h, w) = (height as f64, width as f64);
        match self.sdxl {
            Some(s) if s.requires_aesthetics_score => (
                vec![h, w, 0.0, 0.0, AESTHETIC_SCORE],
                vec![h, w, 0.0, 0.0, NEGATIVE_AESTHETIC_SCORE],
            ),
            _ => (vec![h, w, 0.0, 0.0, h, w], vec![h, w, 0.0, 0.0, h, w]),
        }
    }
}

/// Splits a batched UNet output into `n` equal chunks along the batch (the guidance branches).
pub(crate) fn split_batch(t: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    Ok(t.chunk(n, 0)?)
}
