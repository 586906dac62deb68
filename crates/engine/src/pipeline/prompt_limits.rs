//! How long a prompt may be: a bound on what one request can cost before any network runs (a 1 MB prompt once
//! held a worker for 94 s and 2.3 GB). Checked when a request arrives (the HTTP service's submit check) and
//! again by the pipelines, for every caller.

use std::sync::OnceLock;

use super::prompt_chunks::chunk_prompt;
use crate::error::{EngineError, Result};
use crate::prompt_syntax::parse_field;
use crate::tokenizer::ClipTokenizer;

/// Longest prompt (and negative prompt) accepted, in bytes of UTF-8.
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;
/// Most 77-token windows a prompt may fill (75 tokens of content each: 600 tokens), counted the way the
/// text encoders read it (weights, BREAK and AUTOMATIC1111's comma wrapping included).
pub const MAX_PROMPT_WINDOWS: usize = 8;

/// CLIP's tokenizer as carried in the binary, made once (every SD model's tokenizer counts the same).
fn tokenizer() -> Result<&'static ClipTokenizer> {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    if let Some(t) = TOKENIZER.get() {
        return Ok(t);
    }
    let made = ClipTokenizer::bundled(crate::tokenizer::DEFAULT_EOS)?;
    Ok(TOKENIZER.get_or_init(|| made))
}

/// Refuses `text` (the request field `field`) when it is longer than [`MAX_PROMPT_BYTES`] or takes more than
/// [`MAX_PROMPT_WINDOWS`] windows of the text encoder, or when its syntax is wrong.
pub fn check_prompt_size(text: &str, field: &'static str) -> Result<()> {
    if text.len() > MAX_PROMPT_BYTES {
        return Err(EngineError::invalid(
            field,
            format!(
                "{} bytes; at most {MAX_PROMPT_BYTES} are accepted",
                text.len()
            ),
        ));
    }
    let pieces = parse_field(text, field)?;
    let windows = chunk_prompt(tokenizer()?, &pieces, &[])?.len();
    if windows > MAX_PROMPT_WINDOWS {
        return Err(EngineError::invalid(
            field,
            format!(
                "takes {windows} windows of 75 tokens; at most {MAX_PROMPT_WINDOWS} ({} tokens) are accepted",
                MAX_PROMPT_WINDOWS * 75
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: EngineError) -> (&'static str, String) {
        match e {
            EngineError::InvalidRequest { field, message } => (field, message),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn prompts_are_bounded_in_bytes_and_tokens() {
        // 8 windows of 75 one-token words pass; one token more does not.
        let fits = vec!["cat"; MAX_PROMPT_WINDOWS * 75].join(" ");
        check_prompt_size(&fits, "prompt").unwrap();
        let over = format!("{fits} cat");
        let (field, message) = field_of(check_prompt_size(&over, "negative_prompt").unwrap_err());
        assert_eq!(field, "negative_prompt");
        assert!(
            message.contains("9 windows") && message.contains("600 tokens"),
            "{message}"
        );
        // A megabyte is refused on its size, before any tokenizing.
        let huge = "a".repeat(1 << 20);
        let (field, message) = field_of(check_prompt_size(&huge, "prompt").unwrap_err());
        assert_eq!(field, "prompt");
        assert!(message.contains("1048576 bytes"), "{message}");
        // BREAK starts a window: 9 short windows are too many as well.
        let breaks = ["cat"; 9].join(" BREAK ");
        assert!(check_prompt_size(&breaks, "prompt").is_err());
        // Syntax errors name the field, as before.
        let (field, _) = field_of(check_prompt_size("a (cat", "prompt").unwrap_err());
        assert_eq!(field, "prompt");
    }
}
