//! The API's `enhance_prompt` and `enhance_style` options: pure text work on the prompt and negative prompt,
//! done before generation, so that what is generated is exactly what `meta` echoes.
//!
//! How the final texts are built (see [`apply`]):
//! 1. The prompt and negative prompt are trimmed of surrounding whitespace and of leading/trailing commas.
//! 2. A style (`enhance_style`, one of [`style_ids`], matched case-insensitively) wraps the prompt: its positive
//!    template's `{prompt}` element is replaced by the prompt (an empty prompt drops that element), and its
//!    negative text is appended to the negative prompt.
//! 3. `enhance_prompt` then appends [`QUALITY_SUFFIX`] to the (styled) prompt and [`DEFAULT_NEGATIVE`] to the
//!    negative prompt — after a negative the user sent, as the hosted API does.
//!
//! Parts are joined with `", "`; empty parts are skipped, so an empty prompt never yields a dangling comma.
//!
//! Special style ids: `enhance` means "the enhance_prompt additions" (the same as `enhance_prompt: yes`, never
//! applied twice); `negative` adds only [`DEFAULT_NEGATIVE`]. The ids `nude`, `nsfw` and `sex` are on the hosted
//! API's list; Pictor accepts them and adds nothing ([`adds_nothing`] tells them apart so callers can say so).
//! The style texts live in `styles.tsv` next to this file.

use std::collections::BTreeMap;
use std::sync::LazyLock;

/// What `enhance_prompt` appends to the prompt.
pub const QUALITY_SUFFIX: &str =
    "highly detailed, sharp focus, ((soft natural lighting)), rich color, \
balanced composition, professional quality, 8k";

/// What `enhance_prompt` (and the `negative` style) appends to the negative prompt.
pub const DEFAULT_NEGATIVE: &str = "((blurry)), ((low quality)), lowres, jpeg artifacts, out of frame, cropped, \
deformed, disfigured, bad anatomy, extra limbs, poorly drawn hands, poorly drawn face, watermark, signature, text";

/// The placeholder a style's positive template holds once, as a whole comma-separated element.
const PLACEHOLDER: &str = "{prompt}";
/// The style that stands for the enhance_prompt additions.
const ENHANCE_ID: &str = "enhance";
/// The style that adds only the default negative prompt.
const NEGATIVE_ID: &str = "negative";

/// The style table as shipped.
const STYLES_TSV: &str = include_str!("styles.tsv");

/// The final prompt texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnhancedPrompt {
    /// The prompt to generate with (and echo in `meta.prompt`).
    pub prompt: String,
    /// The negative prompt to generate with (and echo in `meta.negative_prompt`).
    pub negative_prompt: String,
}

/// An `enhance_style` that is not one of [`style_ids`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown style {id:?}; closest: {}; {count} styles exist (`pictor styles` lists them)", closest.join(", "))]
pub struct UnknownStyle {
    /// The id as sent.
    pub id: String,
    /// The known ids nearest to it, best first.
    pub closest: Vec<String>,
    /// How many styles exist.
    pub count: usize,
}

impl UnknownStyle {
    /// The API field this error is about.
    pub const FIELD: &'static str = "enhance_style";
}

/// One style's texts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Style {
    positive: &'static str,
    negative: &'static str,
}

/// The parsed table, in file order (ids unique).
struct Table {
    order: Vec<&'static str>,
    by_id: BTreeMap<&'static str, Style>,
}

/// Parses `styles.tsv`: `id<TAB>positive<TAB>negative`, `#` comments, blank lines.
fn parse_table(text: &'static str) -> Result<Table, String> {
    let mut table = Table {
        order: Vec::new(),
        by_id: BTreeMap::new(),
    };
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        let [id, positive, negative] = cols[..] else {
            return Err(format!("line {}: expected 3 tab-separated columns", n + 1));
        };
        let elements = positive.split(',').map(str::trim);
        if elements.filter(|e| *e == PLACEHOLDER).count() != 1
            || positive.matches(PLACEHOLDER).count() != 1
        {
            return Err(format!(
                "line {}: {id}: the positive template needs {PLACEHOLDER} once, as its own element",
                n + 1
            ));
        }
        let style = Style {
            positive: positive.trim(),
            negative: negative.trim(),
        };
        if table.by_id.insert(id, style).is_some() {
            return Err(format!("line {}: {id} appears twice", n + 1));
        }
        table.order.push(id);
    }
    Ok(table)
}

static TABLE: LazyLock<Table> =
    LazyLock::new(|| parse_table(STYLES_TSV).expect("styles.tsv is checked by the unit tests"));

/// Every style id, in the table's order (the special ids first, then the hosted API's order).
pub fn style_ids() -> impl Iterator<Item = &'static str> {
    TABLE.order.iter().copied()
}

/// Whether `id` is a style that is accepted and adds nothing (`nude`, `nsfw`, `sex`). Unknown ids: false.
pub fn adds_nothing(id: &str) -> bool {
    let id = id.trim().to_ascii_lowercase();
    if id == ENHANCE_ID || id == NEGATIVE_ID {
        return false;
    }
    TABLE
        .by_id
        .get(id.as_str())
        .is_some_and(|s| s.positive == PLACEHOLDER && s.negative.is_empty())
}

/// The positive and negative texts of one style as a user would read them (`{prompt}` left in).
pub fn describe(id: &str) -> Option<(&'static str, &'static str)> {
    let id = id.trim().to_ascii_lowercase();
    TABLE
        .by_id
        .get(id.as_str())
        .map(|s| (s.positive, s.negative))
}

/// Checks an `enhance_style` value; returns the canonical id.
pub fn resolve_style(id: &str) -> Result<&'static str, UnknownStyle> {
    let wanted = id.trim().to_ascii_lowercase();
    if let Some((known, _)) = TABLE.by_id.get_key_value(wanted.as_str()) {
        return Ok(known);
    }
    let mut scored: Vec<(f64, &'static str)> = TABLE
        .order
        .iter()
        .map(|known| {
            let mut score = strsim::jaro_winkler(&wanted, known);
            if !wanted.is_empty() && (known.contains(&wanted) || wanted.contains(known)) {
                score += 1.0;
            }
            (score, *known)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    Err(UnknownStyle {
        id: id.to_string(),
        closest: scored.iter().take(3).map(|(_, k)| k.to_string()).collect(),
        count: TABLE.order.len(),
    })
}

/// Trims whitespace and stray commas off both ends.
fn tidy(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || c == ',')
}

/// Joins the non-empty parts with `", "`.
fn join(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| tidy(p))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Puts `prompt` into a template's `{prompt}` element (dropping the element when `prompt` is empty).
fn fill(template: &str, prompt: &str) -> String {
    let parts: Vec<&str> = template
        .split(',')
        .map(str::trim)
        .map(|e| if e == PLACEHOLDER { prompt } else { e })
        .collect();
    join(&parts)
}

/// The final prompt and negative prompt for `prompt` / `negative` with the two options (see the module doc for
/// the order and separators). With neither option both texts come back only trimmed.
pub fn apply(
    prompt: &str,
    negative: &str,
    enhance_prompt: bool,
    style: Option<&str>,
) -> Result<EnhancedPrompt, UnknownStyle> {
    let style = style.map(resolve_style).transpose()?;
    let mut prompt = tidy(prompt).to_string();
    let mut negatives = vec![tidy(negative)];
    let mut enhance = enhance_prompt;
    let mut default_negative = false;
    match style {
        Some(ENHANCE_ID) => enhance = true,
        Some(NEGATIVE_ID) => default_negative = true,
        Some(id) => {
            let s = &TABLE.by_id[id];
            prompt = fill(s.positive, &prompt);
            negatives.push(s.negative);
        }
        None => {}
    }
    if enhance {
        prompt = join(&[&prompt, QUALITY_SUFFIX]);
        default_negative = true;
    }
    if default_negative {
        negatives.push(DEFAULT_NEGATIVE);
    }
    Ok(EnhancedPrompt {
        prompt,
        negative_prompt: join(&negatives),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hosted API's `enhance_style` list as published (with its repeats).
    const API_STYLE_LIST: &str = "enhance,cinematic-diva,nude,nsfw,sex,abstract-expressionism,academia,\
action-figure,adorable-3d-character,adorable-kawaii,art-deco,art-nouveau,astral-aura,avant-garde,baroque,\
bauhaus-style-poster,blueprint-schematic-drawing,caricature,cel-shaded-art,character-design-sheet,classicism-art,\
color-field-painting,colored-pencil-art,conceptual-art,constructivism,cubism,dadaism,dark-fantasy,\
dark-moody-atmosphere,dmt-art,doodle-art,double-exposure,dripping-paint-splatter,expressionism,\
faded-polaroid-photo,fauvism,flat-2d,fortnite-style,futurism,glitchcore,glo-fi,googie-style,graffiti-art,\
harlem-renaissance-art,high-fashion,idyllic,impressionism,infographic-drawing,ink-dripping-drawing,\
japanese-ink-drawing,knolling-photography,light-cheery-atmosphere,logo-design,luxurious-elegance,\
macro-photography,mandola-art,marker-drawing,medievalism,minimalism,neo-baroque,neo-byzantine,neo-futurism,\
neo-impressionism,neo-rococo,neoclassicism,op-art,ornate-and-intricate,pencil-sketch-drawing,pop-art-2,rococo,\
silhouette-art,simple-vector-art,sketchup,steampunk-2,surrealism,suprematism,terragen,\
tranquil-relaxing-atmosphere,sticker-designs,vibrant-rim-light,volumetric-lighting,watercolor,\
whimsical-and-playful,sharp,masterpiece,photograph,negative,cinematic,ads-advertising,ads-automotive,\
ads-corporate,ads-fashion-editorial,ads-food-photography,ads-gourmet-food-photography,ads-luxury,\
ads-real-estate,ads-retail,abstract,abstract-expressionism,art-deco,art-nouveau,constructivist,cubist,\
expressionist,graffiti,hyperrealism,impressionist,pointillism,pop-art,psychedelic,renaissance,steampunk,\
surrealist,typography,watercolor,futuristic-biomechanical,futuristic-biomechanical-cyberpunk,\
futuristic-cybernetic,futuristic-cybernetic-robot,futuristic-cyberpunk-cityscape,futuristic-futuristic,\
futuristic-retro-cyberpunk,futuristic-retro,futuristic-sci-fi,futuristic-vaporwave,game-bubble,game-cyberpunk,\
game-fighting,game-gta,game-mario,game-minecraft,game-pokemon,game-retro-arcade,game-retro,game-rpg-fantasy,\
game-strategy,game-streetfighter,game-zelda,misc-architectural,misc-disco,misc-dreamscape,misc-dystopian,\
misc-fairy-tale,misc-gothic,misc-grunge,misc-horror,misc-kawaii,misc-lovecraftian,misc-macabre,misc-manga,\
misc-metropolis,misc-minimalist,misc-monochrome,misc-nautical,misc-space,misc-stained-glass,\
misc-techwear-fashion,misc-tribal,misc-zentangle,papercraft-collage,papercraft-flat-papercut,\
papercraft-kirigami,papercraft-paper-mache,papercraft-paper-quilling,papercraft-papercut-collage,\
papercraft-papercut-shadow-box,papercraft-stacked-papercut,papercraft-thick-layered-papercut,photo-alien,\
photo-film-noir,photo-glamour,photo-hdr,photo-iphone-photographic,photo-long-exposure,photo-neon-noir,\
photo-silhouette,photo-tilt-shift,3d-model,analog-film,anime,cinematic,comic-book,craft-clay,digital-art,\
fantasy-art,isometric,line-art,lowpoly,neonpunk,origami,photographic,pixel-art,texture";

    #[test]
    fn the_table_parses_and_covers_exactly_the_api_list() {
        let table = parse_table(STYLES_TSV).unwrap();
        let mut api: Vec<&str> = Vec::new();
        for id in API_STYLE_LIST.split(',') {
            if !api.contains(&id) {
                api.push(id);
            }
        }
        assert_eq!(api.len(), 188);
        let ours: std::collections::BTreeSet<&str> = table.order.iter().copied().collect();
        let theirs: std::collections::BTreeSet<&str> = api.into_iter().collect();
        assert_eq!(ours, theirs, "styles.tsv holds exactly the API's ids");
        assert_eq!(table.order.len(), 188);
    }

    #[test]
    fn every_real_style_changes_the_prompt_and_is_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for id in style_ids() {
            let (positive, negative) = describe(id).unwrap();
            if adds_nothing(id) || id == ENHANCE_ID || id == NEGATIVE_ID {
                continue;
            }
            let words = positive.split_whitespace().count();
            assert!((5..=35).contains(&words), "{id}: {words} words");
            assert!(!negative.is_empty(), "{id} has no negative");
            assert!(seen.insert(positive), "{id} repeats another style");
            let out = apply("a cat", "", false, Some(id)).unwrap();
            assert!(
                out.prompt.contains("a cat") && out.prompt.len() > "a cat".len() + 10,
                "{id}"
            );
            assert_eq!(out.negative_prompt, negative, "{id}");
        }
        let no_ops: Vec<&str> = style_ids().filter(|id| adds_nothing(id)).collect();
        assert_eq!(no_ops, ["nude", "nsfw", "sex"]);
    }

    #[test]
    fn style_first_then_suffix_and_negatives_in_order() {
        let out = apply("  a red fox, ", " blurry ", true, Some("Watercolor")).unwrap();
        let (_, style_negative) = describe("watercolor").unwrap();
        assert!(out
            .prompt
            .starts_with("watercolor painting, a red fox, soft translucent washes"));
        assert!(
            out.prompt.ends_with(&format!(", {QUALITY_SUFFIX}")),
            "{}",
            out.prompt
        );
        assert_eq!(
            out.negative_prompt,
            format!("blurry, {style_negative}, {DEFAULT_NEGATIVE}")
        );
    }

    #[test]
    fn options_off_only_trim() {
        let out = apply(
            " a cat, ((cinematic lighting)) ",
            "\tbad hands\n",
            false,
            None,
        )
        .unwrap();
        assert_eq!(out.prompt, "a cat, ((cinematic lighting))");
        assert_eq!(out.negative_prompt, "bad hands");
    }

    #[test]
    fn enhance_prompt_alone() {
        let out = apply("a cat", "", true, None).unwrap();
        assert_eq!(out.prompt, format!("a cat, {QUALITY_SUFFIX}"));
        assert_eq!(out.negative_prompt, DEFAULT_NEGATIVE);
    }

    #[test]
    fn empty_prompt_leaves_no_dangling_separators() {
        let out = apply("", "", false, Some("anime")).unwrap();
        assert!(
            out.prompt.starts_with("anime artwork, vivid cel colors"),
            "{}",
            out.prompt
        );
        assert!(!out.prompt.contains(", ,") && !out.prompt.ends_with(','));
        assert_eq!(apply(" ", "", true, None).unwrap().prompt, QUALITY_SUFFIX);
        assert_eq!(apply("", "", false, None).unwrap().prompt, "");
    }

    #[test]
    fn special_ids() {
        let both = apply("a cat", "x", true, Some("enhance")).unwrap();
        assert_eq!(
            both,
            apply("a cat", "x", true, None).unwrap(),
            "never twice"
        );
        assert_eq!(both, apply("a cat", "x", false, Some("enhance")).unwrap());
        let neg = apply("a cat", "x", false, Some("negative")).unwrap();
        assert_eq!(neg.prompt, "a cat");
        assert_eq!(neg.negative_prompt, format!("x, {DEFAULT_NEGATIVE}"));
        for id in ["nude", "nsfw", "sex"] {
            assert_eq!(
                apply("a cat", "x", false, Some(id)).unwrap(),
                apply("a cat", "x", false, None).unwrap()
            );
        }
    }

    #[test]
    fn unknown_styles_name_the_closest() {
        let err = apply("a cat", "", false, Some("watercolour")).unwrap_err();
        assert_eq!(err.closest[0], "watercolor");
        assert_eq!(err.closest.len(), 3);
        let text = err.to_string();
        assert!(
            text.contains("\"watercolour\"") && text.contains("188 styles"),
            "{text}"
        );
        assert_eq!(resolve_style("pixel").unwrap_err().closest[0], "pixel-art");
        assert_eq!(resolve_style(" ANIME ").unwrap(), "anime");
    }

    #[test]
    fn malformed_tables_are_refused() {
        assert!(parse_table("a\tb").is_err());
        assert!(parse_table("a\tno placeholder\tx").is_err());
        assert!(parse_table("a\tstyle of {prompt}\tx").is_err());
        assert!(parse_table("a\t{prompt}\t\na\t{prompt}\t").is_err());
        assert!(parse_table("# c\n\na\tx, {prompt}\ty").is_ok());
    }
}
