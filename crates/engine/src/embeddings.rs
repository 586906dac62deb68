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

/// Largest pickle (`data.pkl`) an embedding archive may hold; AUTOMATIC1111's and diffusers' are a few KiB.
const MAX_PICKLE_BYTES: u64 = 1 << 20;
/// Deepest nesting of objects in it (AUTOMATIC1111's is 5 deep).
const MAX_PICKLE_DEPTH: usize = 100;
/// Most objects reading it may make, copies from its memo included (AUTOMATIC1111's makes about 50).
const MAX_PICKLE_OBJECTS: usize = 100_000;
/// Most values an embedding tensor may hold (75 vectors of 1280 are 96,000).
const MAX_EMBEDDING_VALUES: usize = 1 << 24;

/// Checks the pickles of the PyTorch archive at `path` before candle's pickle reader reads them, since it trusts
/// what they say: a string's length is allocated before the string is read (a forged 4 GiB length in a file of a
/// few bytes), objects nested 100,000 deep overflow the stack when they are dropped, memo copies of copies grow
/// exponentially, and a LONG1 of more than 8 bytes overflows a shift. Each `data.pkl` must be at most
/// [`MAX_PICKLE_BYTES`], every length it gives must fit in the bytes that follow, LONG1 at most 8 bytes, no
/// object deeper than [`MAX_PICKLE_DEPTH`] and at most [`MAX_PICKLE_OBJECTS`] made. The walk follows the
/// reader's stack opcode by opcode and stops where the reader would stop with an error of its own (an opcode it
/// does not know, a missing memo entry, an empty stack).
fn check_pickles(path: &Path) -> std::result::Result<(), String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| e.to_string())?;
        if !entry
            .name()
            .map_err(|e| e.to_string())?
            .ends_with("data.pkl")
        {
            continue;
        }
        let mut pickle = Vec::new();
        entry
            .by_ref()
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut pickle)
            .map_err(|e| e.to_string())?;
        if pickle.len() as u64 > MAX_PICKLE_BYTES {
            return Err(format!(
                "its pickle is larger than {} KiB",
                MAX_PICKLE_BYTES >> 10
            ));
        }
        walk_pickle(&pickle)?;
    }
    Ok(())
}

/// See [`check_pickles`]: one pickle's opcodes, with the depth and size of what each stack entry holds.
fn walk_pickle(p: &[u8]) -> std::result::Result<(), String> {
    /// (depth, objects) of a stack entry; a MARK is `None`.
    type Entry = Option<(usize, usize)>;
    let mut stack: Vec<Entry> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Entry> = std::collections::HashMap::new();
    let mut made = 0usize;
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let bytes = p.get(*at..at.saturating_add(n)).ok_or_else(|| {
            format!("its pickle is cut short or forged (an argument of {n} bytes at byte {at})")
        })?;
        *at += n;
        Ok(bytes)
    };
    let int = |b: &[u8]| b.iter().rev().fold(0u32, |v, &x| (v << 8) | x as u32);
    // The entries down to the last MARK (which is removed), or `None` when there is no MARK (a reader error).
    let to_mark = |stack: &mut Vec<Entry>| -> Option<Vec<Entry>> {
        let mark = stack.iter().rposition(Option::is_none)?;
        let objs = stack.split_off(mark + 1);
        stack.pop();
        Some(objs)
    };
    // An object made of `parts`: one deeper than the deepest, as many objects as they hold plus itself.
    let combine = |parts: &[Entry]| -> (usize, usize) {
        parts.iter().fold((1, 1), |(d, n), e| {
            let (pd, pn) = e.unwrap_or((0, 1));
            (d.max(pd + 1), n.saturating_add(pn))
        })
    };
    while at < p.len() {
        let op = p[at];
        at += 1;
        let mut push: Option<Entry> = None;
        match op {
            b'.' => return Ok(()),
            0x80 | b'K' => {
                take(&mut at, 1)?;
            }
            b'M' => {
                take(&mut at, 2)?;
            }
            b'J' => {
                take(&mut at, 4)?;
            }
            b'G' => {
                take(&mut at, 8)?;
            }
            0x8a => {
                let n = take(&mut at, 1)?[0] as usize;
                if n > 8 {
                    return Err(format!("its pickle has a LONG1 of {n} bytes (8 at most)"));
                }
                take(&mut at, n)?;
            }
            b'X' => {
                let n = int(take(&mut at, 4)?) as usize;
                take(&mut at, n)?;
            }
            b'c' => {
                for _ in 0..2 {
                    match p[at..].iter().position(|&b| b == b'\n') {
                        Some(end) => at += end + 1,
                        None => return Ok(()), // the reader fails at the end of the data
                    }
                }
            }
            b'q' | b'r' => {
                let id = int(take(&mut at, if op == b'q' { 1 } else { 4 })?);
                let Some(&top) = stack.last() else {
                    return Ok(());
                };
                made = made.saturating_add(top.map_or(1, |(_, n)| n));
                memo.insert(id, top);
            }
            b'h' | b'j' => {
                let id = int(take(&mut at, if op == b'h' { 1 } else { 4 })?);
                let Some(&entry) = memo.get(&id) else {
                    return Ok(());
                };
                push = Some(entry);
            }
            b'(' => push = Some(None),
            b'N' | 0x88 | 0x89 | b')' | b']' | b'}' | b'd' => push = Some(Some((1, 1))),
            0x85..=0x87 | b'Q' | b'R' | 0x81 | b'b' => {
                let n = match op {
                    0x85 | b'Q' => 1,
                    0x87 => 3,
                    _ => 2,
                };
                if stack.len() < n {
                    return Ok(());
                }
                let parts = stack.split_off(stack.len() - n);
                push = Some(Some(combine(&parts)));
            }
            b't' => {
                let Some(parts) = to_mark(&mut stack) else {
                    return Ok(());
                };
                push = Some(Some(combine(&parts)));
            }
            b'a' | b's' | b'e' | b'u' => {
                let parts = match op {
                    b'a' | b's' => {
                        let n = if op == b'a' { 1 } else { 2 };
                        if stack.len() < n {
                            return Ok(());
                        }
                        stack.split_off(stack.len() - n)
                    }
                    _ => match to_mark(&mut stack) {
                        Some(parts) => parts,
                        None => return Ok(()),
                    },
                };
                let Some(last) = stack.last_mut() else {
                    return Ok(());
                };
                let (d, n) = combine(&parts);
                let (ld, ln) = last.unwrap_or((0, 1));
                *last = Some((ld.max(d), ln.saturating_add(n)));
                if ld.max(d) > MAX_PICKLE_DEPTH {
                    return Err(format!(
                        "its pickle nests objects more than {MAX_PICKLE_DEPTH} deep"
                    ));
                }
            }
            _ => return Ok(()), // an opcode the reader refuses
        }
        if let Some(entry) = push {
            let (d, n) = entry.unwrap_or((0, 1));
            if d > MAX_PICKLE_DEPTH {
                return Err(format!(
                    "its pickle nests objects more than {MAX_PICKLE_DEPTH} deep"
                ));
            }
            made = made.saturating_add(n);
            stack.push(entry);
        }
        if made > MAX_PICKLE_OBJECTS {
            return Err(format!(
                "its pickle makes more than {MAX_PICKLE_OBJECTS} objects"
            ));
        }
    }
    Ok(())
}

/// The embedding tensor of a PyTorch zip archive, read without running the pickle (checked first, see
/// [`check_pickles`]).
fn load_pickle(path: &Path, label: &str) -> Result<Tensor> {
    use candle_core::pickle::{read_pth_tensor_info, PthTensors};
    let refuse = |why: String| {
        EngineError::model(
            label,
            format!(
                "{}: cannot read it as a PyTorch archive ({why}); convert it to .safetensors",
                path.display()
            ),
        )
    };
    let bad = |e: candle_core::Error| refuse(e.to_string());
    check_pickles(path).map_err(refuse)?;
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
    // The shape comes from the pickle: reading the tensor allocates all of it before reading its data.
    let values = archive.tensor_infos().get(&name).map(|info| {
        info.layout
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
    });
    if let Some(values) = values {
        if values.is_none_or(|n| n > MAX_EMBEDDING_VALUES) {
            return Err(refuse(format!(
                "tensor {name} claims more than {MAX_EMBEDDING_VALUES} values"
            )));
        }
    }
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

    /// A PyTorch archive at `path` holding `pickle` as `name/data.pkl`, and `data/0` when given.
    fn archive(path: &Path, pickle: &[u8], data: Option<&[u8]>) {
        use std::io::Write;
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        zip.start_file("name/data.pkl", options).unwrap();
        zip.write_all(pickle).unwrap();
        if let Some(data) = data {
            zip.start_file("name/data/0", options).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/prompts/embeddings")
            .join(name)
    }

    /// Found by the fuzz target `embedding` (fuzz/fuzz_targets/embedding.rs): a 2 KiB `.pt` whose pickle gives
    /// a string of 4 GiB made candle's pickle reader allocate 4 GiB before reading it (libFuzzer's
    /// out-of-memory). Checked alongside: the same reader's other trusts (deep nesting overflowed the stack when
    /// the objects were dropped, memo copies of copies grow exponentially, a LONG1 of 64 bytes overflowed a
    /// shift, and a tensor shape of 2⁶⁰ values is allocated before its data is read). Each is now an error
    /// naming the file; the fixtures still load.
    #[test]
    fn forged_pickles_are_refused_before_they_are_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad.pt");
        let refused = |pickle: &[u8], why: &str| {
            archive(&p, pickle, None);
            let e = TextualInversion::load(&p, "bad").unwrap_err().to_string();
            assert!(e.contains("bad.pt") && e.contains(why), "{why}: {e}");
        };
        // The fuzzer's input, minimized: BINUNICODE of 0xfffffff0 bytes in a pickle of 11.
        refused(b"\x80\x02X\xf0\xff\xff\xffabc.", "cut short or forged");
        let mut deep = b"\x80\x02N".to_vec();
        deep.extend(std::iter::repeat_n(0x85u8, 300_000)); // TUPLE1, 300,000 times
        deep.push(b'.');
        refused(&deep, "more than 100 deep");
        let mut bomb = b"\x80\x02Nq\x00".to_vec(); // None, memo 0
        for _ in 0..40 {
            bomb.extend_from_slice(b"h\x00h\x00\x86q\x00"); // (memo 0, memo 0) as memo 0
        }
        bomb.push(b'.');
        refused(&bomb, "more than 100000 objects");
        let mut long = b"\x80\x02\x8a\x40".to_vec();
        long.extend([1u8; 64]);
        long.push(b'.');
        refused(&long, "LONG1 of 64 bytes");
        // A real embedding whose tensor claims 2^30 × 2^30 values.
        let mut source =
            zip::ZipArchive::new(std::fs::File::open(fixture("sd2-style.pt")).unwrap()).unwrap();
        let mut pickle = Vec::new();
        std::io::Read::read_to_end(
            &mut source.by_name("sd2-style/data.pkl").unwrap(),
            &mut pickle,
        )
        .unwrap();
        let size = b"K\x02K@\x86";
        let at = pickle.windows(size.len()).position(|w| w == size).unwrap();
        pickle.splice(
            at..at + size.len(),
            *b"J\x00\x00\x00\x40J\x00\x00\x00\x40\x86",
        );
        refused(&pickle, "more than 16777216 values");
        // The real files pass.
        for (name, n, hidden) in [
            ("pictor-style.pt", 3, 48),
            ("sd2-style.pt", 2, 64),
            ("pictor-dot.bin", 1, 48),
        ] {
            let e = TextualInversion::load(&fixture(name), "fixture").unwrap();
            assert_eq!((e.vector_count(), e.hidden_size()), (n, hidden), "{name}");
        }
    }
}
