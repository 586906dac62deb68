//! Weighted prompt pieces to the text encoder's 77-token windows, laid out as AUTOMATIC1111 does (see
//! [`crate::prompt_syntax`] for the rules as users read them).

use crate::error::{EngineError, Result};
use crate::prompt_syntax::PromptPiece;
use crate::tokenizer::ClipTokenizer;

/// When a chunk fills up and a comma is among its last this many tokens, the tokens after the comma move
/// to the next chunk (AUTOMATIC1111's default "prompt word wrap length limit").
pub(crate) const COMMA_BACKTRACK: usize = 20;

/// What one position of a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// A vocabulary token.
    Token(u32),
    /// Row `row` of the textual-inversion embedding number `embedding`.
    Vector { embedding: usize, row: usize },
}

/// One full window for the text encoder: `max_length` slots with their weights.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Chunk {
    /// bos, up to `max_length - 2` content slots, eos, then padding.
    pub slots: Vec<Slot>,
    /// The attention weight of each slot (1 for bos, eos and padding).
    pub weights: Vec<f32>,
}

impl Chunk {
    /// Whether every weight is 1 (nothing to re-weight).
    pub fn unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// A textual-inversion trigger: its name's token ids and how many vectors replace them.
#[derive(Debug, Clone)]
pub(crate) struct Trigger {
    pub ids: Vec<u32>,
    pub vectors: usize,
}

/// Builds the chunks of one prompt.
struct Chunker<'a> {
    tokenizer: &'a ClipTokenizer,
    content: usize,
    chunks: Vec<Chunk>,
    slots: Vec<Slot>,
    weights: Vec<f32>,
    last_comma: Option<usize>,
}

impl Chunker<'_> {
    /// Closes the current chunk: bos + content + eos, padded with the pad token.
    fn next_chunk(&mut self) {
        let t = self.tokenizer;
        let len = t.max_length();
        let mut slots = Vec::with_capacity(len);
        let mut weights = Vec::with_capacity(len);
        slots.push(Slot::Token(t.bos_id()));
        weights.push(1.0);
        slots.append(&mut self.slots);
        weights.append(&mut self.weights);
        slots.push(Slot::Token(t.eos_id()));
        weights.push(1.0);
        slots.resize(len, Slot::Token(t.pad_id()));
        weights.resize(len, 1.0);
        self.chunks.push(Chunk { slots, weights });
        self.last_comma = None;
    }
}

/// The trigger (index, its token count) whose name's tokens start at `tokens[at]`, longest first.
fn trigger_at(triggers: &[Trigger], tokens: &[u32], at: usize) -> Option<(usize, usize)> {
    triggers
        .iter()
        .enumerate()
        .filter(|(_, t)| !t.ids.is_empty() && tokens[at..].starts_with(&t.ids))
        .max_by_key(|(i, t)| (t.ids.len(), std::cmp::Reverse(*i)))
        .map(|(i, t)| (i, t.ids.len()))
}

/// Lays out `pieces` in chunks of `max_length - 2` content tokens (75 for CLIP), each piece tokenized on its
/// own, with AUTOMATIC1111's comma backtracking; the tokens of a trigger's name become its vectors, which are
/// never split across chunks. Always at least one chunk.
pub(crate) fn chunk_prompt(
    tokenizer: &ClipTokenizer,
    pieces: &[PromptPiece],
    triggers: &[Trigger],
) -> Result<Vec<Chunk>> {
    let content = tokenizer.max_length().saturating_sub(2).max(1);
    if let Some(t) = triggers.iter().find(|t| t.vectors > content) {
        return Err(EngineError::invalid(
            "embeddings_model",
            format!(
                "an embedding of {} vectors does not fit in one {content}-token chunk",
                t.vectors
            ),
        ));
    }
    let comma = tokenizer.token_id(",</w>");
    let mut c = Chunker {
        tokenizer,
        content,
        chunks: Vec::new(),
        slots: Vec::new(),
        weights: Vec::new(),
        last_comma: None,
    };
    for piece in pieces {
        let (text, weight) = match piece {
            PromptPiece::Break => {
                c.next_chunk();
                continue;
            }
            PromptPiece::Text { text, weight } => (text, *weight as f32),
        };
        let tokens = tokenizer.content_ids(text)?;
        let mut at = 0;
        while at < tokens.len() {
            let token = tokens[at];
            if Some(token) == comma {
                c.last_comma = Some(c.slots.len());
            } else if let Some(last) = c.last_comma.filter(|&last| {
                COMMA_BACKTRACK > 0
                    && c.slots.len() == c.content
                    && c.slots.len() - last <= COMMA_BACKTRACK
            }) {
                let moved = c.slots.split_off(last + 1);
                let moved_weights = c.weights.split_off(last + 1);
                c.next_chunk();
                c.slots = moved;
                c.weights = moved_weights;
            }
            if c.slots.len() == c.content {
                c.next_chunk();
            }
            match trigger_at(triggers, &tokens, at) {
                None => {
                    c.slots.push(Slot::Token(token));
                    c.weights.push(weight);
                    at += 1;
                }
                Some((embedding, name_tokens)) => {
                    let n = triggers[embedding].vectors;
                    if c.slots.len() + n > c.content {
                        c.next_chunk();
                    }
                    c.slots
                        .extend((0..n).map(|row| Slot::Vector { embedding, row }));
                    c.weights.extend(std::iter::repeat_n(weight, n));
                    at += name_tokens;
                }
            }
        }
    }
    if !c.slots.is_empty() || c.chunks.is_empty() {
        c.next_chunk();
    }
    Ok(c.chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt_syntax::{escape, parse};
    use std::path::Path;

    fn sd1() -> ClipTokenizer {
        let a = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip-tokenizer");
        ClipTokenizer::from_files(
            &a.join("vocab.json"),
            &a.join("merges.txt"),
            "<|endoftext|>",
        )
        .unwrap()
    }

    fn sd2() -> ClipTokenizer {
        let a = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip-tokenizer");
        ClipTokenizer::from_files(&a.join("vocab.json"), &a.join("merges.txt"), "!").unwrap()
    }

    fn chunks(t: &ClipTokenizer, prompt: &str, triggers: &[Trigger]) -> Vec<Chunk> {
        chunk_prompt(t, &parse(prompt).unwrap(), triggers).unwrap()
    }

    /// The content (between bos and eos) of a chunk as token ids; vectors as `1_000_000 + 1000·e + row`.
    fn content(t: &ClipTokenizer, c: &Chunk) -> Vec<u32> {
        assert_eq!(c.slots.len(), 77);
        assert_eq!(c.slots[0], Slot::Token(t.bos_id()));
        let eos = 1 + c.slots[1..]
            .iter()
            .position(|s| *s == Slot::Token(t.eos_id()))
            .unwrap();
        assert!(c.slots[eos + 1..]
            .iter()
            .all(|s| *s == Slot::Token(t.pad_id())));
        c.slots[1..eos]
            .iter()
            .map(|s| match s {
                Slot::Token(id) => *id,
                Slot::Vector { embedding, row } => {
                    1_000_000 + 1000 * *embedding as u32 + *row as u32
                }
            })
            .collect()
    }

    fn ids(t: &ClipTokenizer, text: &str) -> Vec<u32> {
        t.content_ids(text).unwrap()
    }

    #[test]
    fn short_unweighted_prompts_give_diffusers_ids() {
        for t in [sd1(), sd2()] {
            for p in [
                "a photo of a cat, ((cinematic lighting))",
                "",
                "it's a Café!!",
            ] {
                let c = chunks(&t, &escape(p), &[]);
                assert_eq!(c.len(), 1);
                let slots: Vec<Slot> = t
                    .encode_padded(p)
                    .unwrap()
                    .into_iter()
                    .map(Slot::Token)
                    .collect();
                assert_eq!(c[0].slots, slots, "{p:?}");
                assert!(c[0].unweighted());
            }
        }
    }

    #[test]
    fn weights_follow_the_tokens_of_each_piece() {
        let t = sd1();
        let c = chunks(&t, "a (red:1.5) [cat]", &[]);
        let a = ids(&t, "a")[0];
        let red = ids(&t, "red")[0];
        let cat = ids(&t, "cat")[0];
        assert_eq!(content(&t, &c[0]), vec![a, red, cat]);
        assert_eq!(
            &c[0].weights[..5],
            &[1.0, 1.0, 1.5, (1.0 / 1.1) as f32, 1.0]
        );
        assert!(c[0].weights[5..].iter().all(|&w| w == 1.0));
        assert!(!c[0].unweighted());
    }

    #[test]
    fn chunks_hold_75_tokens() {
        let t = sd1();
        let cat = ids(&t, "cat")[0];
        let c = chunks(&t, &"cat ".repeat(75), &[]);
        assert_eq!(c.len(), 1);
        assert_eq!(content(&t, &c[0]), vec![cat; 75]);
        assert_eq!(c[0].slots[76], Slot::Token(t.eos_id()));
        let c = chunks(&t, &"cat ".repeat(76), &[]);
        assert_eq!(c.len(), 2);
        assert_eq!(content(&t, &c[0]), vec![cat; 75]);
        assert_eq!(content(&t, &c[1]), vec![cat]);
        let c = chunks(&t, &"cat ".repeat(151), &[]);
        assert_eq!(
            c.iter().map(|c| content(&t, c).len()).collect::<Vec<_>>(),
            [75, 75, 1]
        );
    }

    #[test]
    fn break_starts_a_new_chunk() {
        let t = sd1();
        let c = chunks(&t, "a cat BREAK a dog", &[]);
        assert_eq!(c.len(), 2);
        assert_eq!(content(&t, &c[0]), ids(&t, "a cat"));
        assert_eq!(content(&t, &c[1]), ids(&t, "a dog"));
        // Trailing BREAK adds nothing; a leading one an empty chunk.
        assert_eq!(chunks(&t, "a cat BREAK", &[]).len(), 1);
        let c = chunks(&t, "BREAK a cat", &[]);
        assert_eq!(c.len(), 2);
        assert!(content(&t, &c[0]).is_empty());
    }

    #[test]
    fn comma_backtrack_moves_the_tail_to_the_next_chunk() {
        let t = sd1();
        let cat = ids(&t, "cat")[0];
        let dog = ids(&t, "dog")[0];
        let comma = t.token_id(",</w>").unwrap();
        // 60 cats, a comma (61 tokens), 14 dogs fill the chunk (75); the 76th token: the comma is 15 back.
        let prompt = format!("{}, {} fox", "cat ".repeat(60), "dog ".repeat(14));
        let c = chunks(&t, &prompt, &[]);
        assert_eq!(c.len(), 2);
        let mut first = vec![cat; 60];
        first.push(comma);
        assert_eq!(content(&t, &c[0]), first);
        let mut second = vec![dog; 14];
        second.extend(ids(&t, "fox"));
        assert_eq!(content(&t, &c[1]), second);
        // The comma 21 tokens back: no backtracking, a plain cut at 75.
        let prompt = format!("{}, {} fox", "cat ".repeat(54), "dog ".repeat(20));
        let c = chunks(&t, &prompt, &[]);
        assert_eq!(content(&t, &c[0]).len(), 75);
        assert_eq!(content(&t, &c[1]), ids(&t, "fox"));
        // Exactly 20 back: backtracks.
        let prompt = format!("{}, {} fox", "cat ".repeat(55), "dog ".repeat(19));
        let c = chunks(&t, &prompt, &[]);
        assert_eq!(content(&t, &c[0]).len(), 56);
        assert_eq!(content(&t, &c[1]).len(), 20);
    }

    #[test]
    fn embeddings_replace_their_name_and_are_never_split() {
        let t = sd1();
        let cat = ids(&t, "cat")[0];
        let triggers = [
            Trigger {
                ids: ids(&t, "pictor-style"),
                vectors: 3,
            },
            Trigger {
                ids: ids(&t, "pictor"),
                vectors: 1,
            },
        ];
        assert!(triggers[0].ids.len() > 1);
        let c = chunks(&t, "cat (pictor-style) pictor cat", &triggers);
        let v = |e: u32, r: u32| 1_000_000 + 1000 * e + r;
        assert_eq!(
            content(&t, &c[0]),
            vec![cat, v(0, 0), v(0, 1), v(0, 2), v(1, 0), cat]
        );
        assert_eq!(&c[0].weights[1..7], &[1.0, 1.1, 1.1, 1.1, 1.0, 1.0]);
        // 73 cats then the 3 vectors: they do not fit (76 > 75) and move whole to the next chunk.
        let c = chunks(
            &t,
            &format!("{} pictor-style", "cat ".repeat(73)),
            &triggers,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(content(&t, &c[0]), vec![cat; 73]);
        assert_eq!(content(&t, &c[1]), vec![v(0, 0), v(0, 1), v(0, 2)]);
        // 72 cats: they fit exactly.
        let c = chunks(
            &t,
            &format!("{} pictor-style", "cat ".repeat(72)),
            &triggers,
        );
        assert_eq!(c.len(), 1);
        // Too many vectors for a chunk is refused.
        let big = [Trigger {
            ids: ids(&t, "big"),
            vectors: 76,
        }];
        assert!(chunk_prompt(&t, &parse("big").unwrap(), &big).is_err());
    }
}
