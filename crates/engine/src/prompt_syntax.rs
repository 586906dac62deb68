//! Prompt syntax: AUTOMATIC1111's attention (emphasis) brackets and `BREAK`.
//!
//! A prompt is plain text with a few marks that change how much each part counts:
//!
//! | you write | meaning |
//! |---|---|
//! | `(text)` | `text` counts 1.1 × as much |
//! | `((text))` | 1.1 × 1.1 = 1.21 ×; every further pair multiplies by 1.1 again |
//! | `[text]` | `text` counts 1 / 1.1 as much (≈ 0.909 ×); `[[text]]` ≈ 0.826 × |
//! | `(text:1.3)` | `text` counts exactly 1.3 × (any number: `(text:0.5)`, `(text:-1)`, `(text: 2 )`) |
//! | `((text):1.5)` | weights multiply: 1.1 × 1.5 = 1.65 × |
//! | `\(` `\)` `\[` `\]` `\\` | a literal `(`, `)`, `[`, `]` or `\` (it takes the weight of the brackets around it) |
//! | `BREAK` | starts a new 75-token chunk (see below) |
//!
//! The exact rules:
//!
//! - Brackets must be balanced and properly nested: a `)` or `]` without its opening bracket, an
//!   opening bracket never closed, or a `)` closing a `[` (and the reverse) is an error naming the
//!   character position (counted from 1). AUTOMATIC1111 silently tolerates these; Pictor refuses them so a
//!   typo does not quietly change the weights. Write `\(` etc. for literal brackets, or use [`escape`].
//! - The explicit weight is `:` followed by a number (optional sign, digits and `.`, spaces allowed
//!   around it) directly before the closing `)`. It replaces that pair's 1.1. Any other `:` is ordinary
//!   text, and so is `:1.3` inside square brackets.
//! - A weight must stay a finite number: an explicit weight too large for a 64-bit float (`(a:1` followed by
//!   400 zeros`)`), or brackets nested so deep that their product overflows (about 7,500 round pairs), is an
//!   error naming the character position; it would otherwise make the conditioning NaN.
//! - A backslash before any other character is kept as a literal backslash (AUTOMATIC1111 drops it).
//! - `BREAK` counts only in capitals and as a word of its own (`BREAKING`, `break` and `aBREAK` are
//!   ordinary text); the spaces around it are removed. It works inside brackets too (where
//!   AUTOMATIC1111 turns it into ordinary text by accident). `BREAK` at the very end adds nothing;
//!   at the very start, or twice in a row, it yields a chunk with no words (as in AUTOMATIC1111).
//! - Neighbouring pieces that end up with the same weight are joined before tokenizing, so
//!   `a \(b\) c` is tokenized exactly like the literal text `a (b) c`.
//! - Prompt editing (`[from:to:when]`) and alternation (`[a|b]`) are not implemented: such text is read
//!   with the rules above (square brackets lower the weight, `:` and `|` stay as text).
//!
//! How the weighted text becomes conditioning (in `pipeline::prompt`), as AUTOMATIC1111 does it:
//! each piece is tokenized on its own; the tokens are cut into chunks of 75; each chunk is encoded
//! by the text encoder as `<start>` + 75 tokens + `<end>`, padded to 77 with the model's pad token, so
//! a prompt of at most 75 tokens without weights gives exactly diffusers' conditioning. When a chunk is
//! full and a comma is among its last 20 tokens, the words after that comma move to the next chunk
//! (AUTOMATIC1111's default "prompt word wrap length limit" of 20). A textual-inversion embedding is
//! never split across chunks. Each encoded token's vector is multiplied by its weight, then the whole
//! chunk is rescaled so its mean equals the unweighted mean. The chunks are concatenated (77 × k
//! tokens); the prompt and negative prompt are brought to the same number of chunks by appending the
//! empty prompt's encoding.

use crate::error::{EngineError, Result};

/// How much one pair of round brackets multiplies a weight; square brackets divide by it.
pub const BRACKET_FACTOR: f64 = 1.1;

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPiece {
    /// Text with the weight its brackets give it (1.0 outside brackets).
    Text {
        /// The text, with escapes resolved.
        text: String,
        /// Its attention weight.
        weight: f64,
    },
    /// `BREAK`: the next piece starts a new chunk.
    Break,
}

/// Which kind of bracket is open.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bracket {
    Round,
    Square,
}

impl Bracket {
    fn open(self) -> char {
        match self {
            Bracket::Round => '(',
            Bracket::Square => '[',
        }
    }
}

/// Characters that end a run of ordinary text.
fn is_special(c: char) -> bool {
    matches!(c, '\\' | '(' | ')' | '[' | ']' | ':')
}

/// A word character in the sense of Python's `\w` (which AUTOMATIC1111's `\bBREAK\b` uses).
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Parses `prompt` into weighted pieces (see the module documentation for the rules); errors name the
/// field `prompt`.
pub fn parse(prompt: &str) -> Result<Vec<PromptPiece>> {
    parse_field(prompt, "prompt")
}

/// [`parse`] with errors naming `field` (e.g. `negative_prompt`).
pub fn parse_field(prompt: &str, field: &'static str) -> Result<Vec<PromptPiece>> {
    let chars: Vec<char> = prompt.chars().collect();
    // (text, weight) pieces, `None` text for BREAK; weights are multiplied in place when a bracket closes.
    let mut pieces: Vec<(Option<String>, f64)> = Vec::new();
    // Open brackets: kind, index of the first piece inside, character position (1-based).
    let mut open: Vec<(Bracket, usize, usize)> = Vec::new();
    // Multiplies the weights from piece `from` on by `factor` for the bracket closed at `pos`, refusing a weight
    // that overflows to infinity (a huge explicit weight, or thousands of nested brackets): it would turn the
    // conditioning into NaN.
    let multiply = |pieces: &mut Vec<(Option<String>, f64)>,
                    from: usize,
                    factor: f64,
                    pos: usize| {
        for p in &mut pieces[from..] {
            p.1 *= factor;
            if !p.1.is_finite() {
                return Err(EngineError::invalid(
                    field,
                    format!(
                        "the brackets closed at character {pos} give a weight too large to compute ({factor} × \
                         the weights around them)"
                    ),
                ));
            }
        }
        Ok(())
    };
    let close = |open: &mut Vec<(Bracket, usize, usize)>, kind: Bracket, pos: usize| {
        let closer = if kind == Bracket::Round { ')' } else { ']' };
        match open.pop() {
            Some((k, start, _)) if k == kind => Ok(start),
            Some((k, _, at)) => Err(EngineError::invalid(
                field,
                format!(
                    "unbalanced brackets: '{closer}' at character {pos} closes the '{}' at character {at} \
                     (write \\{closer} for a literal '{closer}')",
                    k.open()
                ),
            )),
            None => Err(EngineError::invalid(
                field,
                format!(
                    "unbalanced brackets: '{closer}' at character {pos} has no opening '{}' \
                     (write \\{closer} for a literal '{closer}')",
                    kind.open()
                ),
            )),
        }
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        match c {
            '\\' => match chars.get(i + 1) {
                Some(&next @ ('(' | ')' | '[' | ']' | '\\')) => {
                    pieces.push((Some(next.to_string()), 1.0));
                    i += 2;
                }
                _ => {
                    pieces.push((Some("\\".to_string()), 1.0));
                    i += 1;
                }
            },
            '(' => {
                open.push((Bracket::Round, pieces.len(), pos));
                i += 1;
            }
            '[' => {
                open.push((Bracket::Square, pieces.len(), pos));
                i += 1;
            }
            ')' => {
                let start = close(&mut open, Bracket::Round, pos)?;
                multiply(&mut pieces, start, BRACKET_FACTOR, pos)?;
                i += 1;
            }
            ']' => {
                let start = close(&mut open, Bracket::Square, pos)?;
                multiply(&mut pieces, start, 1.0 / BRACKET_FACTOR, pos)?;
                i += 1;
            }
            ':' => match explicit_weight(&chars, i) {
                Some((number, end)) if matches!(open.last(), Some((Bracket::Round, _, _))) => {
                    let weight: f64 = number.parse().map_err(|_| {
                        EngineError::invalid(
                            field,
                            format!("weight {number:?} at character {} is not a number", pos + 1),
                        )
                    })?;
                    if !weight.is_finite() {
                        return Err(EngineError::invalid(
                            field,
                            format!("weight {number:?} at character {} is too large", pos + 1),
                        ));
                    }
                    let start = close(&mut open, Bracket::Round, end + 1)?;
                    multiply(&mut pieces, start, weight, end + 1)?;
                    i = end + 1;
                }
                _ => {
                    pieces.push((Some(":".to_string()), 1.0));
                    i += 1;
                }
            },
            _ => {
                let start = i;
                while i < chars.len() && !is_special(chars[i]) {
                    i += 1;
                }
                let run: String = chars[start..i].iter().collect();
                for (k, part) in split_breaks(&run).into_iter().enumerate() {
                    if k > 0 {
                        pieces.push((None, 1.0));
                    }
                    pieces.push((Some(part), 1.0));
                }
            }
        }
    }
    if let Some((kind, _, at)) = open.first() {
        let closer = if *kind == Bracket::Round { ')' } else { ']' };
        return Err(EngineError::invalid(
            field,
            format!(
                "unbalanced brackets: the '{}' at character {at} is never closed \
                 (add '{closer}', or write \\{} for a literal '{}')",
                kind.open(),
                kind.open(),
                kind.open()
            ),
        ));
    }
    // Join neighbouring texts of equal weight; BREAKs stay on their own.
    let mut out: Vec<PromptPiece> = Vec::new();
    for (text, weight) in pieces {
        match (text, out.last_mut()) {
            (None, _) => out.push(PromptPiece::Break),
            (Some(t), Some(PromptPiece::Text { text, weight: w })) if *w == weight => {
                text.push_str(&t)
            }
            (Some(t), _) => out.push(PromptPiece::Text { text: t, weight }),
        }
    }
    Ok(out)
}

/// At `chars[at] == ':'`: an explicit weight `:\s*[+-]?[.0-9]+\s*\)`. Returns the number's text and the
/// index of the closing `)`.
fn explicit_weight(chars: &[char], at: usize) -> Option<(String, usize)> {
    let mut i = at + 1;
    while chars.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    let start = i;
    if matches!(chars.get(i), Some('+' | '-')) {
        i += 1;
    }
    let digits = i;
    while chars
        .get(i)
        .is_some_and(|c| c.is_ascii_digit() || *c == '.')
    {
        i += 1;
    }
    if i == digits {
        return None;
    }
    let number: String = chars[start..i].iter().collect();
    while chars.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    (chars.get(i) == Some(&')')).then_some((number, i))
}

/// Splits a run of ordinary text at each `BREAK` word, dropping the whitespace around it.
fn split_breaks(run: &str) -> Vec<String> {
    let chars: Vec<char> = run.chars().collect();
    let mut parts = Vec::new();
    let mut current_start = 0;
    let mut i = 0;
    while i + 5 <= chars.len() {
        let is_break = chars[i..i + 5].iter().copied().eq("BREAK".chars())
            && (i == 0 || !is_word(chars[i - 1]))
            && chars.get(i + 5).is_none_or(|c| !is_word(*c));
        if !is_break {
            i += 1;
            continue;
        }
        let mut end = i;
        while end > current_start && chars[end - 1].is_whitespace() {
            end -= 1;
        }
        parts.push(chars[current_start..end].iter().collect());
        i += 5;
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        current_start = i;
    }
    parts.push(chars[current_start..].iter().collect());
    parts
}

/// Makes any text literal: brackets and backslashes are escaped, and the word `BREAK` is written in
/// lower case (the tokenizer lower-cases everything, so the model sees exactly the same tokens).
/// `parse(&escape(t))` is a single piece of weight 1 whose tokens are those of `t`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if matches!(c, '\\' | '(' | ')' | '[' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out.replace("BREAK", "break")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str, weight: f64) -> PromptPiece {
        PromptPiece::Text {
            text: t.to_string(),
            weight,
        }
    }

    fn weights(prompt: &str) -> Vec<(String, f64)> {
        parse(prompt)
            .unwrap()
            .into_iter()
            .map(|p| match p {
                PromptPiece::Text { text, weight } => (text, weight),
                PromptPiece::Break => ("BREAK".to_string(), -1.0),
            })
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn plain_text_is_one_piece() {
        assert_eq!(
            parse("a photo: of a cat").unwrap(),
            vec![text("a photo: of a cat", 1.0)]
        );
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn brackets_multiply_and_divide() {
        let w = weights("a (b) ((c)) [d] [[e]] f");
        let expect = [
            ("a ", 1.0),
            ("b", 1.1),
            (" ", 1.0),
            ("c", 1.1 * 1.1),
            (" ", 1.0),
            ("d", 1.0 / 1.1),
            (" ", 1.0),
            ("e", 1.0 / 1.1 / 1.1),
            (" f", 1.0),
        ];
        assert_eq!(w.len(), expect.len(), "{w:?}");
        for ((t, x), (et, ex)) in w.iter().zip(expect) {
            assert_eq!(t, et);
            assert!(close(*x, ex), "{t}: {x} vs {ex}");
        }
    }

    #[test]
    fn explicit_weights_replace_the_pair_factor_and_nest() {
        let w = weights("(cat:1.3) (dog: 0.5 ) ((fox):1.5) (x:-1) [y:1.3]");
        assert_eq!(w[0].0, "cat");
        assert!(close(w[0].1, 1.3));
        assert_eq!(w[2].0, "dog");
        assert!(close(w[2].1, 0.5));
        assert_eq!(w[4].0, "fox");
        assert!(close(w[4].1, 1.1 * 1.5));
        assert_eq!(w[6].0, "x");
        assert!(close(w[6].1, -1.0));
        // In square brackets the weight is text; the whole thing is divided by 1.1.
        assert_eq!(w[8].0, "y:1.3");
        assert!(close(w[8].1, 1.0 / 1.1));
        // A colon that is not a weight stays text.
        assert_eq!(weights("(a:b)"), vec![("a:b".to_string(), 1.1)]);
        let e = parse("(a:1.2.3)").unwrap_err().to_string();
        assert!(e.contains("not a number"), "{e}");
    }

    #[test]
    fn escapes_are_literal_and_merge_with_neighbours() {
        assert_eq!(
            parse(r"a \(b\) \[c\] \\ d\e").unwrap(),
            vec![text(r"a (b) [c] \ d\e", 1.0)]
        );
        assert_eq!(weights(r"(a \(b\))"), vec![("a (b)".to_string(), 1.1)]);
    }

    #[test]
    fn break_splits_only_as_its_own_capital_word() {
        assert_eq!(
            parse("a cat BREAK a dog").unwrap(),
            vec![text("a cat", 1.0), PromptPiece::Break, text("a dog", 1.0)]
        );
        assert_eq!(
            parse("BREAKING break aBREAK BREAK_x").unwrap(),
            vec![text("BREAKING break aBREAK BREAK_x", 1.0)]
        );
        assert_eq!(
            parse("x,BREAK,y").unwrap(),
            vec![text("x,", 1.0), PromptPiece::Break, text(",y", 1.0)]
        );
        let w = weights("(a BREAK b)");
        assert_eq!(w.len(), 3);
        assert_eq!(w[1].0, "BREAK");
        assert!(close(w[0].1, 1.1) && close(w[2].1, 1.1));
    }

    #[test]
    fn unbalanced_brackets_name_the_position() {
        let cases = [
            ("a (b", "'(' at character 3 is never closed"),
            ("a b)", "')' at character 4 has no opening"),
            ("[a", "'[' at character 1 is never closed"),
            ("a]", "']' at character 2 has no opening"),
            ("([a)]", "')' at character 4 closes the '[' at character 2"),
            ("é (", "'(' at character 3"),
        ];
        for (prompt, want) in cases {
            let e = parse(prompt).unwrap_err();
            assert!(
                matches!(
                    e,
                    EngineError::InvalidRequest {
                        field: "prompt",
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains(want), "{prompt:?}: {e}");
        }
        let e = parse_field("x)", "negative_prompt").unwrap_err();
        assert!(
            matches!(
                e,
                EngineError::InvalidRequest {
                    field: "negative_prompt",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn escape_makes_any_text_literal() {
        for t in [
            "a photo of a cat, ((cinematic lighting))",
            r"weird \ ( [ ] ) \\( stuff (x:1.5) BREAK BREAKING",
            "",
            "plain",
        ] {
            let parsed = parse(&escape(t)).unwrap();
            let expected = t.replace("BREAK", "break");
            if t.is_empty() {
                assert!(parsed.is_empty());
            } else {
                assert_eq!(parsed, vec![text(&expected, 1.0)], "{t:?}");
            }
        }
        assert_eq!(escape("(a)"), r"\(a\)");
    }

    /// Found by the fuzz target `prompt_syntax` (fuzz/fuzz_targets/prompt_syntax.rs), which requires every weight
    /// to be finite: `(a:` + 400 nines + `)` parsed to an infinite weight, and so did deep nesting.
    #[test]
    fn weights_that_overflow_are_refused() {
        let huge = format!("(a:{})", "9".repeat(400));
        let e = parse(&huge).unwrap_err().to_string();
        assert!(e.contains("at character 4 is too large"), "{e}");
        let nested = format!(
            "{}a:99999999{}",
            "(".repeat(40),
            ":99999999)".repeat(39) + ")"
        );
        let e = parse_field(&nested, "negative_prompt")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("negative_prompt") && e.contains("too large to compute"),
            "{e}"
        );
        let deep = format!("{}a{}", "(".repeat(7_500), ")".repeat(7_500));
        assert!(parse(&deep)
            .unwrap_err()
            .to_string()
            .contains("too large to compute"));
        // Large finite weights, and weights that shrink towards zero, still parse.
        assert_eq!(parse("(a:1e3)").unwrap(), vec![text("a:1e3", 1.1)]); // `e` is not part of a weight
        assert_eq!(parse("(a:1000000)").unwrap(), vec![text("a", 1e6)]);
        let small = format!("{}a{}", "[".repeat(8_000), "]".repeat(8_000));
        assert!(parse(&small).is_ok());
    }
}
