//! Helpers shared by the fuzz targets: safetensors files built from the fuzzer's choices (from the tiny fixture
//! models' tensor lists, mutated), a per-process temporary folder, and bounds.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use libfuzzer_sys::arbitrary::{self, Unstructured};

/// The body size the server accepts by default (`--max-body-bytes`, 32 MiB): no target reads more.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Most elements of one generated tensor, and most bytes of tensor data the structured targets write for real
/// (checkpoints are written sparse: their data is never read in full).
pub const MAX_ELEMENTS: usize = 1 << 20;
const MAX_DATA_BYTES: usize = 8 << 20;
/// Most elements of one tensor in a sparse file (2 GiB of f64 at most, never written).
const MAX_SPARSE_ELEMENTS: usize = 1 << 28;

/// Tensor lists of the fixture models (see build.rs).
#[allow(non_upper_case_globals)]
pub mod templates {
    macro_rules! template {
        ($name:ident) => {
            pub const $name: &str =
                include_str!(concat!(env!("OUT_DIR"), "/", stringify!($name), ".txt"));
        };
    }
    template!(ckpt_sd1);
    template!(ckpt_sd2);
    template!(ckpt_sdxl);
    template!(ckpt_sdxl_refiner);
    template!(vae_ldm);
    template!(vae_diffusers);
    template!(lora_kohya);
    template!(lora_peft);
    template!(lora_sd2_kohya);
    template!(lora_sdxl_kohya);
    template!(lora_sdxl_peft);
    template!(net_sd1_unet);
    template!(net_sd1_text);
    template!(net_sdxl_unet);
    template!(net_sdxl_text);
    template!(net_sdxl_text_2);
}

/// A folder for this process's files under `$TMPDIR` (scripts/fuzz.sh points that at a folder it removes at the
/// end; libFuzzer exits without running destructors).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("pictor-fuzz-")
            .tempdir()
            .unwrap()
    })
    .path()
}

/// Writes `bytes` to `name` in the scratch folder and returns its path.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// One tensor of a generated safetensors file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// A template: tensors and `__metadata__`.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub entries: Vec<Entry>,
    pub metadata: BTreeMap<String, String>,
}

impl Model {
    /// Parses a template written by build.rs.
    pub fn parse(text: &str) -> Model {
        let mut model = Model::default();
        for line in text.lines() {
            let parts: Vec<&str> = line.split('\t').collect();
            if parts[0] == "#meta" {
                model.metadata.insert(parts[1].into(), parts[2].into());
                continue;
            }
            let shape = parts[2]
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            model.entries.push(Entry {
                name: parts[0].into(),
                dtype: parts[1].into(),
                shape,
            });
        }
        model
    }

    /// Applies up to `max_ops` mutations chosen by `u`: drop, reshape, retype, rename or add tensors, edit metadata.
    pub fn mutate(&mut self, u: &mut Unstructured, fragments: &[&str], max_ops: usize) {
        let ops = u.int_in_range(0..=max_ops).unwrap_or(0);
        for _ in 0..ops {
            if u.is_empty() {
                break;
            }
            let n = self.entries.len();
            let pick = |u: &mut Unstructured| u.choose_index(n.max(1)).unwrap_or(0);
            match u.int_in_range(0..=8u8).unwrap_or(0) {
                0 if n > 0 => {
                    let i = pick(u);
                    self.entries.remove(i);
                }
                1 if n > 0 => {
                    // Drop every tensor whose name contains a fragment (a whole block or part).
                    let f = fragment(u, fragments);
                    self.entries.retain(|e| !e.name.contains(&f));
                }
                2 if n > 0 => {
                    let i = pick(u);
                    let e = &mut self.entries[i];
                    if !e.shape.is_empty() {
                        let d = u.choose_index(e.shape.len()).unwrap_or(0);
                        e.shape[d] = dim(u);
                    }
                }
                3 if n > 0 => {
                    let i = pick(u);
                    let e = &mut self.entries[i];
                    if u.arbitrary().unwrap_or(false) || e.shape.len() >= 5 {
                        e.shape.pop();
                    } else {
                        e.shape.push(dim(u));
                    }
                }
                4 if n > 0 => {
                    let i = pick(u);
                    self.entries[i].dtype = dtype(u).into();
                }
                5 if n > 0 => {
                    // Replace one dot-separated segment of a name (keeping or duplicating the tensor).
                    let i = pick(u);
                    let mut segments: Vec<String> = self.entries[i]
                        .name
                        .split('.')
                        .map(str::to_string)
                        .collect();
                    let s = u.choose_index(segments.len()).unwrap_or(0);
                    segments[s] = fragment(u, fragments);
                    let renamed = Entry {
                        name: segments.join("."),
                        ..self.entries[i].clone()
                    };
                    if u.arbitrary().unwrap_or(false) {
                        self.entries[i] = renamed;
                    } else {
                        self.entries.push(renamed);
                    }
                }
                6 => {
                    let parts = u.int_in_range(1..=6).unwrap_or(1);
                    let name: Vec<String> = (0..parts).map(|_| fragment(u, fragments)).collect();
                    let rank = u.int_in_range(0..=4).unwrap_or(1);
                    self.entries.push(Entry {
                        name: name.join("."),
                        dtype: dtype(u).into(),
                        shape: (0..rank).map(|_| dim(u)).collect(),
                    });
                }
                7 => {
                    let key = fragment(u, fragments);
                    let value: String = u.arbitrary().unwrap_or_default();
                    self.metadata.insert(key, value);
                }
                _ => {
                    if let (Some(e), Ok(true)) = (self.entries.first_mut(), u.arbitrary::<bool>()) {
                        // Change one number in a name (another block, layer or index).
                        let mut segments: Vec<String> =
                            e.name.split('.').map(str::to_string).collect();
                        for s in segments.iter_mut() {
                            if s.parse::<usize>().is_ok() {
                                *s = u.int_in_range(0..=40u32).unwrap_or(0).to_string();
                                break;
                            }
                        }
                        e.name = segments.join(".");
                    }
                }
            }
        }
    }

    /// The file: header, then the data (`fill` repeated, or zeros when empty). Tensors over [`MAX_ELEMENTS`]
    /// (sparse: 2²⁸) are shrunk to one element per dim first. With `sparse`, only the header is written and the file is extended
    /// with zeros (a hole), so big shapes cost no disk.
    pub fn write(&mut self, path: &Path, fill: &[u8], sparse: bool) {
        let mut header = serde_json::Map::new();
        if !self.metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::json!(self.metadata));
        }
        let mut offset = 0usize;
        let mut total = 0usize;
        let mut seen = std::collections::HashSet::new();
        for e in &mut self.entries {
            if e.name == "__metadata__" || !seen.insert(e.name.clone()) {
                continue;
            }
            let elements = e
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .unwrap_or(usize::MAX);
            if elements
                > if sparse {
                    MAX_SPARSE_ELEMENTS
                } else {
                    MAX_ELEMENTS
                }
            {
                e.shape.iter_mut().for_each(|d| *d = (*d).min(1));
            }
            let elements: usize = e.shape.iter().product();
            let bytes = (elements * dtype_bits(&e.dtype)).div_ceil(8);
            if !sparse && total + bytes > MAX_DATA_BYTES {
                continue;
            }
            total += bytes;
            header.insert(
                e.name.clone(),
                serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
        let mut file = std::fs::File::create(path).unwrap();
        file.write_all(&(header.len() as u64).to_le_bytes())
            .unwrap();
        file.write_all(&header).unwrap();
        if sparse || fill.is_empty() {
            file.set_len((8 + header.len() + offset) as u64).unwrap();
        } else {
            let mut data = fill.to_vec();
            while data.len() < offset {
                data.extend_from_within(..data.len().min(offset - data.len()));
            }
            file.write_all(&data[..offset]).unwrap();
        }
    }
}

fn dtype_bits(dtype: &str) -> usize {
    match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        _ => 64,
    }
}

/// A dtype: mostly the ones weights come in, sometimes others.
pub fn dtype(u: &mut Unstructured) -> &'static str {
    *u.choose(&[
        "F32", "F16", "BF16", "F32", "F16", "F64", "I64", "I32", "U8", "I8", "BOOL", "F8_E4M3",
        "U16",
    ])
    .unwrap_or(&"F32")
}

/// A dimension: small ones mostly (including 0 and 1), sometimes large.
pub fn dim(u: &mut Unstructured) -> usize {
    match u.int_in_range(0..=5u8).unwrap_or(0) {
        0 => 0,
        1 => 1,
        2 => 3,
        3 => u.int_in_range(1..=64).unwrap_or(4),
        4 => *u
            .choose(&[8, 16, 32, 48, 64, 77, 96, 128, 256, 320, 768])
            .unwrap_or(&8),
        _ => u.int_in_range(0..=70_000).unwrap_or(0),
    }
}

/// A name fragment: from the list, a number, or arbitrary text.
pub fn fragment(u: &mut Unstructured, fragments: &[&str]) -> String {
    match u.int_in_range(0..=5u8).unwrap_or(0) {
        0..=2 if !fragments.is_empty() => u
            .choose(fragments)
            .map(|s| s.to_string())
            .unwrap_or_default(),
        3 | 4 => u.int_in_range(0..=24u32).unwrap_or(0).to_string(),
        _ => {
            let s: String = u.arbitrary().unwrap_or_default();
            s.chars().take(40).collect()
        }
    }
}

/// Name segments of LDM checkpoints, diffusers / transformers models, OpenCLIP, kohya and PEFT LoRAs.
pub const NAME_FRAGMENTS: &[&str] = &[
    "model",
    "diffusion_model",
    "first_stage_model",
    "cond_stage_model",
    "conditioner",
    "embedders",
    "transformer",
    "text_model",
    "input_blocks",
    "middle_block",
    "output_blocks",
    "time_embed",
    "label_emb",
    "out",
    "in_layers",
    "emb_layers",
    "out_layers",
    "skip_connection",
    "op",
    "conv",
    "proj_in",
    "proj_out",
    "transformer_blocks",
    "attn1",
    "attn2",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "ff",
    "net",
    "norm",
    "norm1",
    "norm2",
    "norm3",
    "weight",
    "bias",
    "encoder",
    "decoder",
    "down",
    "up",
    "mid",
    "block",
    "block_1",
    "block_2",
    "attn_1",
    "downsample",
    "upsample",
    "conv_in",
    "conv_out",
    "norm_out",
    "quant_conv",
    "post_quant_conv",
    "q",
    "k",
    "v",
    "nin_shortcut",
    "embeddings",
    "token_embedding",
    "position_embedding",
    "position_ids",
    "layers",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "mlp",
    "fc1",
    "fc2",
    "final_layer_norm",
    "resblocks",
    "attn",
    "in_proj_weight",
    "in_proj_bias",
    "ln_1",
    "ln_2",
    "c_fc",
    "c_proj",
    "ln_final",
    "text_projection",
    "positional_embedding",
    "logit_scale",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "attentions",
    "resnets",
    "downsamplers",
    "upsamplers",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    "unet",
    "text_encoder",
    "text_encoder_2",
    "lora_A",
    "lora_B",
    "lora",
    "lora_down",
    "lora_up",
    "alpha",
    "lora_linear_layer",
    "processor",
    "to_q_lora",
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    "lora_te2_text_model_encoder_layers_0_mlp_fc2",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "hada_w1_a",
    "lokr_w1",
    "lora_mid",
    "dora_scale",
    "base_model",
    "emb_params",
    "string_to_param",
    "*",
    "clip_l",
    "clip_g",
    "",
];

impl Model {
    /// The number of elements of tensor `name`, if there is one.
    pub fn elements(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.shape.iter().product())
    }
}
