//! Files the engine carries inside the binary: CLIP's BPE vocabulary, for single-file checkpoints (which
//! ship no tokenizer) and for the demo model. Built by `scripts/make_clip_vocab.py` from OpenAI's original
//! merge list; identical to the tokenizer files of Stable Diffusion repositories.

/// `vocab.json` of the CLIP tokenizer (49408 entries).
pub const CLIP_VOCAB_JSON: &str = include_str!("../../../assets/clip-tokenizer/vocab.json");

/// `merges.txt` of the CLIP tokenizer.
pub const CLIP_MERGES_TXT: &str = include_str!("../../../assets/clip-tokenizer/merges.txt");
