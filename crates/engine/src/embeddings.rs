//! Textual-inversion embeddings: named sets of token vectors that a prompt can call up by name.
//!
//! Files as AUTOMATIC1111 and diffusers write them:
//! - `.safetensors`: AUTOMATIC1111's `emb_params`, a flattened `string_to_param.*`, or diffusers' single
//!   tensor under any key (such as `<cat-toy>`);
//! - `.pt` / `.bin` (PyTorch zip archives): AUTOMATIC1111's dict `{'string_to_param': {'*': tensor}, …}` or
//!   diffusers' `{'<token>': tensor}`. They are read with candle's pickle reader, which only interprets the
//!   pickle's data and never runs code from it.
//!
//! The tensor is one vector (hidden) or several (n, hidden). SDXL embeddings hold two, `clip_l` (n, 768) for
//! CLIP-L and `clip_g` (n, 1280) for ViT-bigG, one row per token in both. In a prompt, the embedding's name (its file
//! name without extension) is matched token for token, as AUTOMATIC1111 does, and replaced by its n vectors.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

/// A textual-inversion embedding: its trigger name and its vectors.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    /// The word that calls it up in a prompt (the file name without extension).
    pub name: String,
    /// The vectors (n, hidden), float32 on the CPU; an SDXL embedding's `clip_l` half.
    pub vectors: Tensor,
    /// An SDXL embedding's `clip_g` half (n, 1280) for the second text encoder.
    pub vectors_g: Option<Tensor>,
}

/// The Stable Diffusion family whose text encoder has this hidden size, for error messages.
pub fn family_of_hidden_size(hidden: usize) -> &'static str {
    match hidden {
        768 => "SD 1.x",
        1024 => "SD 2.x",
        1280 => "SDXL",
        _ => "another architecture",
    }
}

impl TextualInversion {
    /// Loads the embedding in `path` (`.safetensors`, `.pt` or `.bin`) under the trigger `name`.
    pub fn load(path: &Path, name: &str) -> Result<Self> {
        let label = format!("embedding {name}");
        let lower = path.to_string_lossy().to_lowercase();
        let tensor = if lower.ends_with(".safetensors") {
            match load_safetensors(path, &label)? {
                Loaded::One(t) => t,
                Loaded::Sdxl { clip_l, clip_g } => {
                    return Self::sdxl_from_tensors(name, clip_l, clip_g).map_err(|e| {
                        EngineError::model(
                            format!("embedding {name}"),
                            format!("{}: {e}", path.display()),
                        )
                    })
                }
            }
        } else if lower.ends_with(".pt") || lower.ends_with(".bin") {
            load_pickle(path, &label)?
        } else {
            return Err(EngineError::model(
                label,
                format!("{}: not a .safetensors, .pt or .bin file", path.display()),
            ));
        };
        Self::from_tensor(name, tensor).map_err(|e| {
            EngineError::model(
                format!("embedding {name}"),
                format!("{}: {e}", path.display()),
            )
        })
    }

    /// An SDXL embedding from its `clip_l` and `clip_g` halves (each one vector or a matrix, the same count).
    pub fn sdxl_from_tensors(name: &str, clip_l: Tensor, clip_g: Tensor) -> Result<Self> {
        let l = Self::from_tensor(name, clip_l)?;
        let g = Self::from_tensor(name, clip_g)?;
        if l.vector_count() != g.vector_count() {
            return Err(EngineError::model(
                format!("embedding {name}"),
                format!(
                    "clip_l holds {} vectors and clip_g {}; an SDXL embedding has as many in both",
                    l.vector_count(),
                    g.vector_count()
                ),
            ));
        }
        Ok(TextualInversion {
            vectors_g: Some(g.vectors),
            ..l
        })
    }

    /// Whether it is an SDXL embedding (`clip_l` and `clip_g`).
    pub fn is_sdxl(&self) -> bool {
        self.vectors_g.is_some()
    }

    /// An embedding from a tensor of one vector (hidden) or several (n, hidden).
    pub fn from_tensor(name: &str, tensor: Tensor) -> Result<Self> {
        let vectors = match tensor.rank() {
            1 => tensor.unsqueeze(0)?,
            2 => tensor,
            _ => {
                return Err(EngineError::model(
                    format!("embedding {name}"),
                    format!(
                        "expected one vector or a matrix of vectors, got a tensor of shape {:?}",
                        tensor.dims()
                    ),
                ))
            }
        };
        let (n, hidden) = vectors.dims2()?;
        if n == 0 || hidden == 0 {
            return Err(EngineError::model(
                format!("embedding {name}"),
                format!("holds no vectors (shape {n} × {hidden})"),
            ));
        }
        let vectors = vectors.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        Ok(TextualInversion {
            name: name.to_string(),
            vectors,
            vectors_g: None,
        })
    }

    /// How many token vectors it stands for.
    pub fn vector_count(&self) -> usize {
        self.vectors.dims()[0]
    }

    /// The width of its vectors (the text encoder's hidden size it was made for).
    pub fn hidden_size(&self) -> usize {
        self.vectors.dims()[1]
    }
}

/// What an embedding safetensors file holds.
enum Loaded {
    /// One tensor (SD 1/2).
    One(Tensor),
    /// SDXL's two halves.
    Sdxl { clip_l: Tensor, clip_g: Tensor },
}

/// The embedding tensor(s) of a safetensors file.
fn load_safetensors(path: &Path, label: &str) -> Result<Loaded> {
    crate::checkpoint::check_safetensors_header(label, path)?;
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| EngineError::model(label, format!("{}: {e}", path.display())))?;
    for key in ["emb_params", "string_to_param.*"] {
        if let Some(t) = tensors.remove(key) {
            return Ok(Loaded::One(t));
        }
    }
    match (tensors.remove("clip_l"), tensors.remove("clip_g")) {
        (Some(clip_l), Some(clip_g)) => return Ok(Loaded::Sdxl { clip_l, clip_g }),
        (None, None) => {}
        _ => {
            return Err(EngineError::model(
                label,
                format!(
                    "{}: an SDXL embedding needs both clip_l and clip_g; this file has one",
                    path.display()
                ),
            ))
        }
    }
    single_tensor(tensors.into_iter().collect(), path, label).map(Loaded::One)
}

/// The one tensor of a file, or an error listing what it holds.
fn single_tensor(mut tensors: Vec<(String, Tensor)>, path: &Path, label: &str) -> Result<Tensor> {
    if tensors.len() == 1 {
        return Ok(tensors.remove(0).1);
    }
    let mut keys: Vec<String> = tensors.into_iter().map(|(k, _)| k).collect();
    keys.sort();
    Err(EngineError::model(
        label,
        format!(
            "{}: cannot tell which tensor is the embedding (expected emb_params, string_to_param \
             or a single tensor; found {keys:?})",
            path.display()
        ),
    ))
}

/// The embedding tensor of a PyTorch zip archive, read without running the pickle.
fn load_pickle(path: &Path, label: &str) -> Result<Tensor> {
    use candle_core::pickle::{read_pth_tensor_info, PthTensors};
    let bad = |e: candle_core::Error| {
        EngineError::model(
            label,
            format!(
                "{}: cannot read it as a PyTorch archive ({e}); convert it to .safetensors",
                path.display()
            ),
        )
    };
    // diffusers: {'<token>': tensor} at the top; AUTOMATIC1111: tensors under 'string_to_param'.
    let top = read_pth_tensor_info(path, false, None).map_err(bad)?;
    let key = if top.is_empty() {
        Some("string_to_param")
    } else {
        None
    };
    let archive = PthTensors::new(path, key).map_err(bad)?;
    let mut names: Vec<String> = archive.tensor_infos().keys().cloned().collect();
    names.sort();
    let name = if names.iter().any(|n| n == "*") {
        "*".to_string()
    } else if names.len() == 1 {
        names.remove(0)
    } else {
        return Err(EngineError::model(
            label,
            format!(
                "{}: cannot tell which tensor is the embedding (expected string_to_param['*'] or a \
                 single tensor; found {names:?})",
                path.display()
            ),
        ));
    };
    archive.get(&name).map_err(bad)?.ok_or_else(|| {
        EngineError::model(
            label,
            format!("{}: tensor {name} is missing", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_keys_are_recognised() {
        let d = tempfile::tempdir().unwrap();
        let v = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        for key in ["emb_params", "string_to_param.*", "<cat-toy>"] {
            let p = d.path().join("e.safetensors");
            candle_core::safetensors::save(&[(key, v.clone())].into_iter().collect(), &p).unwrap();
            let e = TextualInversion::load(&p, "e").unwrap();
            assert_eq!((e.vector_count(), e.hidden_size()), (3, 4), "{key}");
            assert_eq!(
                e.vectors.to_vec2::<f32>().unwrap(),
                v.to_vec2::<f32>().unwrap()
            );
        }
        // One vector (hidden,) is one token.
        let p = d.path().join("one.safetensors");
        let one = Tensor::ones(4, DType::F16, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&[("tok", one)].into_iter().collect(), &p).unwrap();
        let e = TextualInversion::load(&p, "one").unwrap();
        assert_eq!((e.vector_count(), e.hidden_size()), (1, 4));
        assert_eq!(e.vectors.dtype(), DType::F32);
    }

    #[test]
    fn sdxl_embeddings_keep_both_halves() {
        let d = tempfile::tempdir().unwrap();
        let l = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        let g = Tensor::zeros((2, 6), DType::F16, &Device::Cpu).unwrap();
        let p = d.path().join("xl.safetensors");
        candle_core::safetensors::save(&[("clip_l", l), ("clip_g", g)].into_iter().collect(), &p)
            .unwrap();
        let e = TextualInversion::load(&p, "xl").unwrap();
        assert!(e.is_sdxl());
        assert_eq!((e.vector_count(), e.hidden_size()), (2, 4));
        assert_eq!(e.vectors_g.unwrap().dims(), &[2, 6]);
    }

    #[test]
    fn unusable_files_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let v = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let p = d.path().join("two.safetensors");
        candle_core::safetensors::save(
            &[("a", v.clone()), ("b", v.clone())].into_iter().collect(),
            &p,
        )
        .unwrap();
        let e = TextualInversion::load(&p, "two").unwrap_err().to_string();
        assert!(
            e.contains("cannot tell which tensor") && e.contains("\"a\""),
            "{e}"
        );
        let p = d.path().join("xl.safetensors");
        candle_core::safetensors::save(&[("clip_l", v.clone())].into_iter().collect(), &p).unwrap();
        let e = TextualInversion::load(&p, "xl").unwrap_err().to_string();
        assert!(e.contains("needs both clip_l and clip_g"), "{e}");
        let three = Tensor::zeros((3, 6), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &[("clip_l", v.clone()), ("clip_g", three)]
                .into_iter()
                .collect(),
            &p,
        )
        .unwrap();
        let e = TextualInversion::load(&p, "xl").unwrap_err().to_string();
        assert!(e.contains("as many in both"), "{e}");
        let p = d.path().join("junk.pt");
        std::fs::write(&p, b"not a zip").unwrap();
        let e = TextualInversion::load(&p, "junk").unwrap_err().to_string();
        assert!(e.contains("PyTorch archive"), "{e}");
        let p = d.path().join("x.txt");
        std::fs::write(&p, b"x").unwrap();
        assert!(TextualInversion::load(&p, "x").is_err());
        let cube = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(TextualInversion::from_tensor("c", cube).is_err());
    }
}
