//! Prompt syntax: the engine's attention brackets / BREAK parser (`prompt_syntax::parse`, `parse_field`,
//! `escape`), the size check every request's prompts go through (`pipeline::check_prompt_size`: parse, tokenize
//! with the bundled CLIP tokenizer, cut into 75-token windows) and the server's A1111 `<lora:name:weight>` tags
//! (`a1111::take_lora_tags`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pictor_engine::prompt_syntax::{self, PromptPiece};

/// Longer prompts are refused on their size before they are parsed.
const MAX_PROMPT_BYTES: usize = pictor_engine::pipeline::MAX_PROMPT_BYTES;

fuzz_target!(|prompt: &str| {
    if prompt.len() > MAX_PROMPT_BYTES {
        return;
    }
    if let Ok(pieces) = prompt_syntax::parse(prompt) {
        for piece in &pieces {
            if let PromptPiece::Text { weight, .. } = piece {
                assert!(weight.is_finite(), "{prompt:?} gave the weight {weight}");
            }
        }
    }
    let _ = prompt_syntax::parse_field(prompt, "negative_prompt");
    let _ = pictor_engine::pipeline::check_prompt_size(prompt, "prompt");

    // `escape` makes any text literal: one piece (or none) of weight 1 with the text itself, BREAK lower-cased.
    let escaped = prompt_syntax::escape(prompt);
    let pieces = prompt_syntax::parse(&escaped).expect("escaped text parses");
    let mut text = String::new();
    for piece in pieces {
        match piece {
            PromptPiece::Text { text: t, weight } => {
                assert_eq!(weight, 1.0, "escaped {prompt:?}");
                text.push_str(&t);
            }
            PromptPiece::Break => panic!("escaped {prompt:?} has a BREAK"),
        }
    }
    assert_eq!(text, prompt.replace("BREAK", "break"));

    let _ = pictor_server::a1111::take_lora_tags(prompt);
});
