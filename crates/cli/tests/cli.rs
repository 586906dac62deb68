//! End-to-end tests of the `pictor` command as a user runs it: the real binary, real files, real exit
//! codes and messages. Models are the tiny random demo model (made by the CLI itself) and the committed
//! reference fixtures in `tests/fixtures`.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pictor_engine::prompt_syntax::escape;
use serde_json::Value;
use support::{assert_image_matches, copy_dir, fixtures, BIN};

/// A `pictor` command with a quiet, predictable environment.
fn pictor_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("PICTOR_LOG")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null());
    cmd
}

/// Runs `pictor` to completion.
fn pictor<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    pictor_cmd(args).output().expect("pictor runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Panics with the command's output unless it succeeded.
fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: expected success, got {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Checks that a failed run failed cleanly (an exit code of 1 or 2, not a panic or a signal) and returns
/// its stderr, or describes what is wrong.
fn clean_failure(o: &Output) -> Result<String, String> {
    let err = stderr(o);
    match o.status.code() {
        Some(0) => Err(format!(
            "succeeded but should have failed\nstdout:\n{}",
            stdout(o)
        )),
        Some(1) | Some(2) => {
            if err.contains("panicked") {
                Err(format!("panicked:\n{err}"))
            } else {
                Ok(err)
            }
        }
        other => Err(format!(
            "exit code {other:?} (panic or signal?)\nstderr:\n{err}"
        )),
    }
}

/// Parses the JSON meta `pictor img2img`/`pix2pix` print on stdout.
fn meta(o: &Output) -> Value {
    serde_json::from_str(&stdout(o))
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", stdout(o)))
}

/// `pictor make-demo-model [--pix2pix] ROOT/checkpoints/NAME`; returns the folder.
fn make_demo(root: &Path, name: &str, pix2pix: bool) -> PathBuf {
    let dir = root.join("checkpoints").join(name);
    let mut args = vec!["make-demo-model".to_string()];
    if pix2pix {
        args.push("--pix2pix".into());
    }
    args.push(dir.display().to_string());
    assert_ok(&pictor(&args), "make-demo-model");
    dir
}

fn read_rgb(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn read_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Names of the entries of a folder (empty if it does not exist).
fn entries(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// The img2img command line of test 2 (64×64, 4 steps, strength 0.5), with `extra` appended.
fn demo_img2img_args(root: &Path, model: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let init = fixtures().join("init-64.png");
    let mut args: Vec<String> = [
        "img2img",
        "--models-dir",
        &root.display().to_string(),
        "--model",
        model,
        "--init-image",
        &init.display().to_string(),
        "--prompt",
        "a red fox",
        "--width",
        "64",
        "--height",
        "64",
        "--num-inference-steps",
        "4",
        "--strength",
        "0.5",
        "--samples",
        "2",
        "--out",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

// ---------------------------------------------------------------------------------------------------
// 1. make-demo-model
// ---------------------------------------------------------------------------------------------------

#[test]
fn make_demo_model_writes_a_diffusers_folder_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoints/demo");
    let o = pictor(["make-demo-model", dir.to_str().unwrap()]);
    assert_ok(&o, "make-demo-model");

    assert!(dir.join("model_index.json").is_file());
    for component in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        assert!(dir.join(component).is_dir(), "missing {component}/");
    }
    assert!(dir.join("unet/config.json").is_file());
    assert!(dir.join("vae/config.json").is_file());
    assert!(dir.join("text_encoder/config.json").is_file());
    assert!(dir.join("scheduler/scheduler_config.json").is_file());
    assert!(dir.join("tokenizer/vocab.json").is_file());
    assert!(dir.join("tokenizer/merges.txt").is_file());
    for component in ["unet", "vae", "text_encoder"] {
        let weights: Vec<_> = entries(&dir.join(component))
            .into_iter()
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        assert!(!weights.is_empty(), "{component}/ has no .safetensors");
    }
    let index: Value = serde_json::from_slice(&read_bytes(&dir.join("model_index.json"))).unwrap();
    assert_eq!(index["_class_name"], "StableDiffusionPipeline", "{index}");
    // No leftover temporary folder next to it.
    assert_eq!(
        entries(&tmp.path().join("checkpoints")),
        BTreeSet::from(["demo".to_string()])
    );

    let before = read_bytes(&dir.join("unet/diffusion_pytorch_model.safetensors"));
    let again = pictor(["make-demo-model", dir.to_str().unwrap()]);
    let err = clean_failure(&again).unwrap_or_else(|e| panic!("second make-demo-model: {e}"));
    assert!(err.contains("already exists"), "unclear message: {err}");
    assert!(
        err.contains(dir.to_str().unwrap()),
        "message does not name the folder: {err}"
    );
    // The existing model is untouched.
    assert_eq!(
        before,
        read_bytes(&dir.join("unet/diffusion_pytorch_model.safetensors"))
    );
}

// ---------------------------------------------------------------------------------------------------
// 2. img2img with the demo model: outputs, meta, seeds, model given by path
// ---------------------------------------------------------------------------------------------------

#[test]
fn img2img_demo_writes_images_and_meta_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model_dir = make_demo(root, "demo", false);

    // Seeded run.
    let out_a = root.join("out-a");
    let o = pictor(demo_img2img_args(root, "demo", &out_a, &["--seed", "5"]));
    assert_ok(&o, "img2img --seed 5");
    let m = meta(&o);
    assert_eq!(m["seed"], 5, "{m}");
    assert_eq!(m["n_samples"], 2, "{m}");
    assert_eq!(m["W"], 64, "{m}");
    assert_eq!(m["H"], 64, "{m}");
    assert_eq!(m["model_id"], "demo", "{m}");
    assert_eq!(m["prompt"], "a red fox", "{m}");
    assert_eq!(m["steps_run"], 2, "4 steps × strength 0.5: {m}");
    let outputs: Vec<PathBuf> = m["output"]
        .as_array()
        .unwrap_or_else(|| panic!("meta has no output list: {m}"))
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    assert_eq!(outputs, vec![out_a.join("0.png"), out_a.join("1.png")]);
    assert_eq!(
        entries(&out_a),
        BTreeSet::from(["0.png".to_string(), "1.png".to_string()])
    );
    for i in 0..2 {
        let img = read_rgb(&out_a.join(format!("{i}.png")));
        assert_eq!(img.dimensions(), (64, 64), "{i}.png");
    }
    assert_ne!(
        read_bytes(&out_a.join("0.png")),
        read_bytes(&out_a.join("1.png")),
        "the two samples should differ (each gets its own noise)"
    );

    // Same seed, same images, byte for byte.
    let out_b = root.join("out-b");
    let o = pictor(demo_img2img_args(root, "demo", &out_b, &["--seed", "5"]));
    assert_ok(&o, "img2img --seed 5 again");
    for i in 0..2 {
        let name = format!("{i}.png");
        assert_eq!(
            read_bytes(&out_a.join(&name)),
            read_bytes(&out_b.join(&name)),
            "{name} differs between two runs with seed 5"
        );
    }

    // A different seed gives different images.
    let out_c = root.join("out-c");
    let o = pictor(demo_img2img_args(root, "demo", &out_c, &["--seed", "6"]));
    assert_ok(&o, "img2img --seed 6");
    assert_ne!(
        read_bytes(&out_a.join("0.png")),
        read_bytes(&out_c.join("0.png")),
        "seeds 5 and 6 gave the same image"
    );

    // The model given as a path to its folder gives the same result as its id.
    let out_p = root.join("out-path");
    let o = pictor(demo_img2img_args(
        root,
        model_dir.to_str().unwrap(),
        &out_p,
        &["--seed", "5"],
    ));
    assert_ok(&o, "img2img --model <folder path>");
    assert_eq!(meta(&o)["model_id"], "demo");
    for i in 0..2 {
        let name = format!("{i}.png");
        assert_eq!(
            read_bytes(&out_a.join(&name)),
            read_bytes(&out_p.join(&name)),
            "{name}: --model <path> differs from --model demo"
        );
    }
}

#[test]
fn enhance_options_change_the_prompt_that_runs_and_styles_are_listed() {
    use pictor_server::prompt_enhance;

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_demo(root, "demo", false);

    let out_plain = root.join("out-plain");
    let o = pictor(demo_img2img_args(
        root,
        "demo",
        &out_plain,
        &["--seed", "5"],
    ));
    assert_ok(&o, "img2img plain");
    let m = meta(&o);
    assert_eq!(
        (&m["prompt"], &m["enhance_prompt"], &m["enhance_style"]),
        (&Value::from("a red fox"), &Value::from("no"), &Value::Null),
        "the CLI does not enhance by default: {m}"
    );

    let out_styled = root.join("out-styled");
    let o = pictor(demo_img2img_args(
        root,
        "demo",
        &out_styled,
        &[
            "--seed",
            "5",
            "--negative-prompt",
            "blurry",
            "--enhance-prompt",
            "yes",
            "--enhance-style",
            "Anime",
        ],
    ));
    assert_ok(&o, "img2img --enhance-prompt yes --enhance-style Anime");
    let m = meta(&o);
    let expected = prompt_enhance::apply("a red fox", "blurry", true, Some("anime")).unwrap();
    assert_eq!(m["prompt"], expected.prompt, "{m}");
    assert_eq!(m["negative_prompt"], expected.negative_prompt, "{m}");
    assert!(m["prompt"]
        .as_str()
        .unwrap()
        .ends_with(prompt_enhance::QUALITY_SUFFIX));
    assert_eq!(m["enhance_prompt"], "yes");
    assert_eq!(m["enhance_style"], "anime");
    assert_ne!(
        read_bytes(&out_plain.join("0.png")),
        read_bytes(&out_styled.join("0.png")),
        "the enhanced prompt is what ran, so the picture changes"
    );

    let o = pictor(["styles"]);
    assert_ok(&o, "styles");
    let ids: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 188);
    assert!(ids.iter().any(|i| i == "pixel-art"));
    let o = pictor(["styles", "pixel-art"]);
    assert_ok(&o, "styles pixel-art");
    let shown = meta(&o);
    assert_eq!(shown["id"], "pixel-art");
    assert!(shown["template"].as_str().unwrap().contains("{prompt}"));
    assert!(shown["example"].as_str().unwrap().contains("PROMPT"));
    let err = clean_failure(&pictor(["styles", "pixl-art"])).unwrap();
    assert!(err.contains("pixel-art"), "{err}");
}

#[test]
fn precision_bf16_runs_close_to_fp32_where_the_cpu_has_it_or_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_demo(root, "demo", false);
    let (fp32_out, bf16_out) = (root.join("fp32"), root.join("bf16"));
    let o = pictor(demo_img2img_args(root, "demo", &fp32_out, &["--seed", "3"]));
    assert_ok(&o, "img2img fp32");
    let o = pictor(demo_img2img_args(
        root,
        "demo",
        &bf16_out,
        &["--seed", "3", "--precision", "bf16"],
    ));
    if o.status.success() {
        // This CPU has AMX or AVX-512 BF16: the same images up to bf16 rounding.
        for i in 0..2 {
            let (a, b) = (
                read_rgb(&fp32_out.join(format!("{i}.png"))),
                read_rgb(&bf16_out.join(format!("{i}.png"))),
            );
            assert_eq!(a.dimensions(), b.dimensions());
            let mean = a
                .as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(&x, &y)| (x as f64 - y as f64).abs())
                .sum::<f64>()
                / a.as_raw().len() as f64;
            assert!(
                mean < 2.0,
                "{i}.png: bf16 is {mean:.2} levels from fp32 on average"
            );
        }
    } else {
        let err = clean_failure(&o).unwrap();
        assert!(err.contains("AMX"), "refusal names what is missing: {err}");
    }
    let o = pictor(demo_img2img_args(
        root,
        "demo",
        &bf16_out,
        &["--precision", "fp16"],
    ));
    let err = clean_failure(&o).unwrap();
    assert!(
        err.contains("fp32") && err.contains("bf16"),
        "lists the choices: {err}"
    );
}

#[test]
fn img2img_without_seed_reports_a_seed_that_reproduces_the_images() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_demo(root, "demo", false);

    let out_r = root.join("out-random");
    let o = pictor(demo_img2img_args(root, "demo", &out_r, &[]));
    assert_ok(&o, "img2img without --seed");
    let m = meta(&o);
    let seed = m["seed"]
        .as_u64()
        .unwrap_or_else(|| panic!("meta.seed is not an unsigned integer: {m}"));
    assert!(seed < 1 << 32, "seed {seed} is not below 2^32");

    let out_s = root.join("out-seeded");
    let seed_arg = seed.to_string();
    let o = pictor(demo_img2img_args(
        root,
        "demo",
        &out_s,
        &["--seed", &seed_arg],
    ));
    assert_ok(&o, "img2img with the reported seed");
    assert_eq!(meta(&o)["seed"].as_u64(), Some(seed));
    for i in 0..2 {
        let name = format!("{i}.png");
        assert_eq!(
            read_bytes(&out_r.join(&name)),
            read_bytes(&out_s.join(&name)),
            "{name}: rerunning with the reported seed {seed} gave a different image"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// 3. pix2pix
// ---------------------------------------------------------------------------------------------------

fn pix2pix_args(root: &Path, model: &str, init: &Path, out: &Path) -> Vec<String> {
    [
        "pix2pix",
        "--models-dir",
        root.to_str().unwrap(),
        "--model",
        model,
        "--init-image",
        init.to_str().unwrap(),
        "--prompt",
        "make it blue",
        "--steps",
        "3",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn pix2pix_demo_keeps_the_init_size_rounded_to_8() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let p2p = make_demo(root, "p2p", true);
    let index: Value = serde_json::from_slice(&read_bytes(&p2p.join("model_index.json"))).unwrap();
    assert_eq!(
        index["_class_name"], "StableDiffusionInstructPix2PixPipeline",
        "{index}"
    );

    // 72×56: already multiples of 8.
    let out = root.join("out");
    let init = fixtures().join("init-72x56.png");
    let o = pictor(pix2pix_args(root, "p2p", &init, &out));
    assert_ok(&o, "pix2pix");
    let m = meta(&o);
    assert_eq!(
        (m["W"].clone(), m["H"].clone()),
        (72.into(), 56.into()),
        "{m}"
    );
    assert_eq!(m["seed"], 1, "{m}");
    assert_eq!(m["steps_run"], 3, "{m}");
    assert_eq!(entries(&out), BTreeSet::from(["0.png".to_string()]));
    assert_eq!(read_rgb(&out.join("0.png")).dimensions(), (72, 56));

    // 77×61 is rounded down to 72×56.
    let odd = root.join("init-77x61.png");
    image::imageops::resize(
        &read_rgb(&init),
        77,
        61,
        image::imageops::FilterType::Triangle,
    )
    .save(&odd)
    .unwrap();
    let out_odd = root.join("out-odd");
    let o = pictor(pix2pix_args(root, "p2p", &odd, &out_odd));
    assert_ok(&o, "pix2pix with a 77×61 init image");
    let m = meta(&o);
    assert_eq!(
        (m["W"].clone(), m["H"].clone()),
        (72.into(), 56.into()),
        "{m}"
    );
    assert_eq!(read_rgb(&out_odd.join("0.png")).dimensions(), (72, 56));
}

#[test]
fn pix2pix_and_img2img_refuse_the_other_kind_of_model() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_demo(root, "demo", false);
    make_demo(root, "p2p", true);

    let out = root.join("out-1");
    let o = pictor(pix2pix_args(
        root,
        "demo",
        &fixtures().join("init-72x56.png"),
        &out,
    ));
    let err = clean_failure(&o).unwrap_or_else(|e| panic!("pix2pix with an img2img model: {e}"));
    assert!(
        err.contains("demo") && err.contains("not an InstructPix2Pix model"),
        "pix2pix with the img2img model: message should say it is not an InstructPix2Pix model: {err}"
    );
    assert!(entries(&out).is_empty(), "images were written");

    let out = root.join("out-2");
    let o = pictor(demo_img2img_args(root, "p2p", &out, &["--seed", "1"]));
    let err = clean_failure(&o).unwrap_or_else(|e| panic!("img2img with a pix2pix model: {e}"));
    assert!(
        err.contains("p2p") && err.contains("is an InstructPix2Pix model"),
        "img2img with the pix2pix model: message should say it is an InstructPix2Pix model: {err}"
    );
    assert!(entries(&out).is_empty(), "images were written");
}

// ---------------------------------------------------------------------------------------------------
// 4. Parity with diffusers through the CLI
// ---------------------------------------------------------------------------------------------------

/// Runs the reference case `name` of tests/fixtures/cases.json, sdxl/cases.json or txt2img/cases.json through
/// `pictor img2img` or `pictor txt2img` (Karras sigmas and algorithm as the case says) and compares with the
/// committed images: max |Δ| ≤ 3, mean |Δ| ≤ 0.5.
fn cli_parity(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    cli_parity_into(name, &tmp.path().join("out"));
}

/// [`cli_parity`], writing the images into `out`.
fn cli_parity_into(name: &str, out: &Path) {
    let fx = fixtures();
    let case = support::case(name);
    let pipeline = case["pipeline"].as_str().unwrap();
    assert!(matches!(pipeline, "img2img" | "txt2img"), "{pipeline}");
    let s = |k: &str| match &case[k] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    };
    let mut args: Vec<String> = vec![
        pipeline.into(),
        "--models-dir".into(),
        fx.join("models").display().to_string(),
        "--model".into(),
        s("model").trim_end_matches(".safetensors").to_string(),
        // diffusers took the fixture prompts literally; literal text is escaped text in Pictor's syntax.
        "--prompt".into(),
        escape(&s("prompt")),
        "--negative-prompt".into(),
        escape(&s("negative_prompt")),
        "--width".into(),
        s("width"),
        "--height".into(),
        s("height"),
        "--samples".into(),
        s("samples"),
        "--num-inference-steps".into(),
        s("num_inference_steps"),
        "--guidance-scale".into(),
        s("guidance_scale"),
        "--seed".into(),
        s("seed"),
        "--scheduler".into(),
        s("scheduler"),
        "--clip-skip".into(),
        s("clip_skip"),
        "--use-karras-sigmas".into(),
        if case["use_karras_sigmas"] == true {
            "yes"
        } else {
            "no"
        }
        .into(),
        "--out".into(),
        out.display().to_string(),
    ];
    if pipeline == "img2img" {
        args.extend([
            "--init-image".into(),
            fx.join(s("init_image")).display().to_string(),
            "--strength".into(),
            s("strength"),
        ]);
    }
    if let Some(algorithm) = case["algorithm_type"].as_str() {
        args.extend(["--algorithm-type".into(), algorithm.into()]);
    }
    let o = pictor(&args);
    assert_ok(&o, &format!("parity case {name}"));
    let m = meta(&o);
    assert_eq!(m["seed"], case["seed"], "{m}");
    assert_eq!(m["scheduler"], case["scheduler"], "{m}");
    assert_eq!(
        m["steps_run"].as_u64(),
        Some(case["timesteps"].as_array().unwrap().len() as u64),
        "{m}"
    );
    let images = case["images"].as_array().unwrap();
    for (i, expected) in images.iter().enumerate() {
        assert_image_matches(
            &read_bytes(&out.join(format!("{i}.png"))),
            expected.as_str().unwrap(),
        );
    }
}

/// `pictor img2img` with LoRAs or a VAE from the models folder reproduces the lora_vae fixtures.
#[test]
fn img2img_with_loras_and_a_vae_matches_diffusers() {
    let fx = fixtures();
    for (name, extra) in [
        (
            "kohya-0.6-peft-1.0",
            vec![
                "--lora-model",
                "tiny-kohya,tiny-peft",
                "--lora-strength",
                "0.6,1",
            ],
        ),
        ("vae-tiny-alt", vec!["--vae", "tiny-alt-ldm"]),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut args: Vec<String> = [
            "img2img",
            "--models-dir",
            fx.join("models").to_str().unwrap(),
            "--model",
            "sd1-tiny",
            "--init-image",
            fx.join("init-64.png").to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--negative-prompt",
            "blurry",
            "--width",
            "64",
            "--height",
            "64",
            "--num-inference-steps",
            "10",
            "--strength",
            "0.75",
            "--seed",
            "42",
            "--scheduler",
            "PNDMScheduler",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = pictor(&args);
        assert_ok(&o, name);
        let m = meta(&o);
        assert_eq!(m["nsfw_content_detected"], Value::Null, "{m}");
        assert_image_matches(
            &read_bytes(&out.join("0.png")),
            &format!("lora_vae/{name}/0.png"),
        );
    }
}

#[test]
fn img2img_matches_diffusers_sd1_ddim() {
    cli_parity("sd1-ddim-s42");
}

/// Euler is where `--use-karras-sigmas no` matters: the reference was made without Karras sigmas while the
/// CLI's default is yes.
#[test]
fn img2img_matches_diffusers_sd1_euler_without_karras() {
    cli_parity("sd1-euler-s42");
}

/// SDXL base: two text encoders, DPM++ 2M Karras, two samples of a non-square size.
#[test]
fn img2img_matches_diffusers_sdxl_base() {
    cli_parity("sdxl-dpm2m-karras-s42");
    cli_parity("sdxl-dpm2m-72x56-s7-n2");
}

/// SDXL without a negative prompt (zero unconditional embedding) and with clip skip 2 on both encoders.
#[test]
fn img2img_matches_diffusers_sdxl_without_negative_prompt_and_with_clip_skip() {
    cli_parity("sdxl-euler-noneg-s0-n2");
    cli_parity("sdxl-euler-clipskip2-s0");
}

/// The SDXL refiner: the second text encoder alone and aesthetic-score time ids.
#[test]
fn img2img_matches_diffusers_sdxl_refiner() {
    cli_parity("sdxl-refiner-euler-s3");
}

/// SDXL-Turbo's recipe (trailing timesteps, 2 steps at strength 0.5, guidance 0) and LCM sampling.
#[test]
fn img2img_matches_diffusers_sdxl_turbo_and_lcm() {
    cli_parity("sdxl-turbo-eulera-s5");
    cli_parity("sdxl-turbo-lcm-s5");
}

/// `pictor txt2img` equals diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline: SD 1 with DPM++ 2M SDE
/// Karras (through --algorithm-type), two samples of a non-square size, clip skip, SD 2 v-prediction, SDXL
/// without a negative prompt and SDXL-Turbo's one step.
#[test]
fn txt2img_matches_diffusers() {
    for name in [
        "t2i-sd1-dpm2msde-karras-s11",
        "t2i-sd1-eulera-80x48-s3-n2",
        "t2i-sd1-euler-clipskip2-s0",
        "t2i-sd2-euler-72x56-s5-n2",
        "t2i-sdxl-euler-noneg-s0",
        "t2i-sdxl-turbo-eulera-s5",
    ] {
        cli_parity(name);
    }
}

/// SDXL single-file checkpoints as CivitAI ships them (`conditioner.embedders.*`), base and refiner.
#[test]
fn img2img_matches_diffusers_sdxl_single_files() {
    cli_parity("sdxl-single-euler-s42");
    cli_parity("sdxl-single-refiner-euler-s3");
}

// ---------------------------------------------------------------------------------------------------
// 5. Bad inputs
// ---------------------------------------------------------------------------------------------------

/// One bad invocation: options replacing or adding to the valid base command, and the words the error
/// must contain (case-insensitively).
struct Bad {
    what: &'static str,
    set: Vec<(&'static str, String)>,
    expect: Vec<&'static str>,
    /// Exit code 2 and clap's own "invalid value" error expected.
    clap: bool,
}

fn bad(what: &'static str, set: &[(&'static str, &str)], expect: &[&'static str]) -> Bad {
    Bad {
        what,
        set: set.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        expect: expect.to_vec(),
        clap: false,
    }
}

#[test]
fn bad_inputs_fail_cleanly_with_a_message_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let demo = make_demo(root, "demo", false);
    let ck = root.join("checkpoints");

    // A pickled checkpoint.
    std::fs::write(ck.join("x.ckpt"), b"").unwrap();
    // A model without vae/.
    copy_dir(&demo, &ck.join("novae"));
    std::fs::remove_dir_all(ck.join("novae/vae")).unwrap();
    // A model whose unet weights are cut in half.
    copy_dir(&demo, &ck.join("halfunet"));
    let unet = ck.join("halfunet/unet/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&unet).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&unet)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    // A model without unet weights.
    copy_dir(&demo, &ck.join("nounet"));
    for name in entries(&ck.join("nounet/unet")) {
        if name.ends_with(".safetensors") {
            std::fs::remove_file(ck.join("nounet/unet").join(name)).unwrap();
        }
    }
    // Init images that are not images.
    let text = root.join("notes.txt");
    std::fs::write(&text, "this is not an image\n").unwrap();
    let png = read_bytes(&fixtures().join("init-64.png"));
    let cut = root.join("cut.png");
    std::fs::write(&cut, &png[..100]).unwrap();
    let missing = root.join("no-such-image.png");

    let ckpt_path = ck.join("x.ckpt").display().to_string();
    let text_s = text.display().to_string();
    let cut_s = cut.display().to_string();
    let missing_s = missing.display().to_string();
    let mut table = vec![
        bad(
            "width 60",
            &[("--width", "60")],
            &["width", "multiple of 8"],
        ),
        bad("width 2048", &[("--width", "2048")], &["width", "1024"]),
        bad("height 60", &[("--height", "60")], &["height"]),
        bad("samples 9", &[("--samples", "9")], &["samples"]),
        bad("strength 1.5", &[("--strength", "1.5")], &["strength"]),
        bad("clip_skip 0", &[("--clip-skip", "0")], &["clip_skip"]),
        bad(
            "unknown scheduler",
            &[("--scheduler", "FooScheduler")],
            &[
                "FooScheduler",
                "DDIMScheduler",
                "PNDMScheduler",
                "EulerDiscreteScheduler",
                "EulerAncestralDiscreteScheduler",
            ],
        ),
        bad(
            "unknown model id",
            &[("--model", "no-such-model")],
            &["not found", "no-such-model"],
        ),
        bad(
            ".ckpt by id",
            &[("--model", "x")],
            &["pickle", "safetensors"],
        ),
        bad(
            ".ckpt by path",
            &[("--model", &ckpt_path)],
            &["pickle", "safetensors"],
        ),
        bad("model without vae/", &[("--model", "novae")], &["vae"]),
        bad(
            "truncated unet weights",
            &[("--model", "halfunet")],
            &["unet", "truncated"],
        ),
        bad(
            "no unet weights",
            &[("--model", "nounet")],
            &["unet", "no usable .safetensors weights"],
        ),
        bad(
            "init image is a text file",
            &[("--init-image", &text_s)],
            &["init_image"],
        ),
        bad(
            "init image is a truncated PNG",
            &[("--init-image", &cut_s)],
            &["init_image"],
        ),
        bad(
            "init image does not exist",
            &[("--init-image", &missing_s)],
            &["init_image", "no-such-image.png"],
        ),
        bad(
            "--enhance-style unknown",
            &[("--enhance-style", "watercolour")],
            &["enhance_style", "watercolour", "closest: watercolor"],
        ),
        bad(
            "--safety-checker yes on a model without one",
            &[("--safety-checker", "yes")],
            &["safety_checker/", "--safety-checker-model"],
        ),
        bad(
            "--safety-checker-type sepia",
            &[
                ("--safety-checker", "yes"),
                ("--safety-checker-type", "sepia"),
            ],
            &["safety_checker_type", "sepia"],
        ),
        bad(
            "--lora-model x",
            &[("--lora-model", "x")],
            &["lora_model", "no LoRA named x"],
        ),
        bad(
            "more LoRA strengths than LoRAs",
            &[("--lora-model", "x"), ("--lora-strength", "0.5,0.6")],
            &["lora_strength", "2 strengths for 1 LoRAs"],
        ),
        bad("--vae x", &[("--vae", "x")], &["vae", "no VAE named x"]),
        bad(
            "--embeddings-model x",
            &[("--embeddings-model", "x")],
            &["embeddings_model", "no embedding x"],
        ),
    ];
    table.push(Bad {
        clap: true,
        ..bad(
            "--use-karras-sigmas maybe",
            &[("--use-karras-sigmas", "maybe")],
            &["--use-karras-sigmas", "maybe", "yes or no"],
        )
    });

    let init = fixtures().join("init-64.png").display().to_string();
    let mut failures = Vec::new();
    for case in &table {
        let out = root
            .join("out")
            .join(case.what.replace([' ', '/', '-'], "_"));
        let mut opts: Vec<(&str, String)> = vec![
            ("--models-dir", root.display().to_string()),
            ("--model", "demo".into()),
            ("--init-image", init.clone()),
            ("--prompt", "a red fox".into()),
            ("--width", "64".into()),
            ("--height", "64".into()),
            ("--num-inference-steps", "2".into()),
            ("--strength", "0.5".into()),
            ("--seed", "1".into()),
            ("--out", out.display().to_string()),
        ];
        for (k, v) in &case.set {
            match opts.iter_mut().find(|(name, _)| name == k) {
                Some(slot) => slot.1 = v.clone(),
                None => opts.push((k, v.clone())),
            }
        }
        let mut args = vec!["img2img".to_string()];
        for (k, v) in opts {
            args.push(k.to_string());
            args.push(v);
        }
        let o = pictor(&args);
        let err = match clean_failure(&o) {
            Ok(err) => err,
            Err(e) => {
                failures.push(format!("[{}] {e}", case.what));
                continue;
            }
        };
        let lower = err.to_lowercase();
        let missing_words: Vec<_> = case
            .expect
            .iter()
            .filter(|w| !lower.contains(&w.to_lowercase()))
            .collect();
        if !missing_words.is_empty() {
            failures.push(format!(
                "[{}] exit {:?}; stderr lacks {missing_words:?}:\n{}",
                case.what,
                o.status.code(),
                err.trim_end()
            ));
            continue;
        }
        if case.clap {
            if o.status.code() != Some(2) || !lower.contains("invalid value") {
                failures.push(format!(
                    "[{}] expected clap's invalid-value error (exit 2), got exit {:?}:\n{}",
                    case.what,
                    o.status.code(),
                    err.trim_end()
                ));
            }
        } else if o.status.code() != Some(1) {
            failures.push(format!(
                "[{}] expected pictor's own error (exit 1), got exit {:?}:\n{}",
                case.what,
                o.status.code(),
                err.trim_end()
            ));
        } else if !entries(&out).is_empty() {
            failures.push(format!(
                "[{}] images were written to {}",
                case.what,
                out.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs were not handled as expected:\n\n{}",
        failures.len(),
        table.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------------
// 6. models list / pull
// ---------------------------------------------------------------------------------------------------

#[test]
fn models_list_shows_the_models_with_their_format() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_demo(root, "demo", false);
    make_demo(root, "p2p", true);
    let ck = root.join("checkpoints");
    std::fs::copy(
        fixtures().join("models/checkpoints/sd1-tiny-single.safetensors"),
        ck.join("single.safetensors"),
    )
    .unwrap();
    // Neither of these is a model.
    std::fs::write(ck.join("x.ckpt"), b"").unwrap();
    std::fs::create_dir_all(ck.join("not-a-model/unet")).unwrap();

    let o = pictor(["models", "list", "--models-dir", root.to_str().unwrap()]);
    assert_ok(&o, "models list");
    let list: Value = serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("models list did not print JSON ({e}):\n{}", stdout(&o)));
    let list = list.as_array().expect("a JSON array");
    let summary: Vec<(String, String)> = list
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default().to_string(),
                m["format"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("demo".to_string(), "diffusers".to_string()),
            ("p2p".to_string(), "diffusers".to_string()),
            ("single".to_string(), "single_file".to_string()),
        ],
        "{list:?}"
    );
    let demo_path = PathBuf::from(list[0]["path"].as_str().expect("a path"));
    assert!(
        demo_path.join("model_index.json").is_file(),
        "{demo_path:?}"
    );

    // An empty or absent models folder lists nothing (and does not fail).
    let empty = tempfile::tempdir().unwrap();
    let o = pictor([
        "models",
        "list",
        "--models-dir",
        empty.path().to_str().unwrap(),
    ]);
    assert_ok(&o, "models list on an empty folder");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        Value::Array(vec![])
    );
}

#[test]
fn models_pull_fails_cleanly_without_network() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_demo(root, "demo", false);
    let hf_home = root.join("hf-home");

    let started = Instant::now();
    let mut child = pictor_cmd(["models", "pull", "some/repo", "--models-dir"])
        .arg(root)
        .env("HF_HOME", &hf_home)
        .env_remove("HF_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pictor starts");
    let limit = Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("models pull still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    eprintln!("models pull failed after {:?}", started.elapsed());
    let err = clean_failure(&o).unwrap_or_else(|e| panic!("models pull: {e}"));
    assert!(
        err.contains("download failed"),
        "no download error message: {err}"
    );
    assert!(
        err.contains("some/repo"),
        "message does not name the repo: {err}"
    );
    assert_eq!(
        entries(&root.join("checkpoints")),
        BTreeSet::from(["demo".to_string()]),
        "models pull left something in checkpoints/"
    );
}

/// Every PNG carries its settings as AUTOMATIC1111's `parameters` text, and `--from-png` restores them: the
/// same image again without repeating a single option; options given on the command line win; an A1111 PNG's
/// sampler names map through the sampler table ("DPM++ 2M" + "Karras").
#[test]
fn pngs_carry_their_parameters_and_from_png_restores_them() {
    use pictor_engine::image_io::{encode_png_with_text, png_text};
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let models = fx.join("models").display().to_string();
    let init = fx.join("init-64.png").display().to_string();
    let first = tmp.path().join("first");
    cli_parity_into("sd1-ddim-s42", &first);
    let png = std::fs::read(first.join("0.png")).unwrap();
    let text = png_text(&png, "parameters").expect("the PNG carries its parameters");
    assert!(
        text.starts_with(r"a photo of a cat, \(\(cinematic lighting\)\)")
            && text.contains("\nNegative prompt: blurry\n")
            && text.contains("Steps: 10, Sampler: DDIM, Schedule type: Uniform, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: sd1-tiny, Denoising strength: 0.75"),
        "{text}"
    );

    // `pictor img2img --from-png PNG [more…]` into a fresh folder.
    let from_png = |png: &str, more: &[&str], out: &Path| {
        let mut args = vec![
            "img2img".to_string(),
            "--models-dir".into(),
            models.clone(),
            "--init-image".into(),
            init.clone(),
            "--from-png".into(),
            png.to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        args.extend(more.iter().map(|a| a.to_string()));
        pictor(args)
    };

    // Again from the PNG alone (model, prompts, seed, steps, sampler, size, strength all from it).
    let again = tmp.path().join("again");
    let from = first.join("0.png").display().to_string();
    let o = from_png(&from, &[], &again);
    assert_ok(&o, "img2img --from-png");
    assert_eq!(meta(&o)["seed"], 42);
    assert_image_matches(
        &std::fs::read(again.join("0.png")).unwrap(),
        "cases/sd1-ddim-s42/0.png",
    );

    // The command line wins over the PNG.
    let o = from_png(&from, &["--seed", "43"], &tmp.path().join("other"));
    assert_ok(&o, "img2img --from-png --seed 43");
    assert_eq!(meta(&o)["seed"], 43);

    // AUTOMATIC1111's own infotext: DPM++ 2M with the Karras schedule is case sd1-dpm2m-karras-s11.
    let a1111 = tmp.path().join("a1111.png");
    let infotext = "a photo of a cat, \\(\\(cinematic lighting\\)\\)\nNegative prompt: blurry\nSteps: 6, Sampler: \
                    DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 11, Size: 64x64, Model hash: 6ce0161689, \
                    Model: sd1-tiny, Denoising strength: 0.75, Version: v1.10.1";
    let blank = image::RgbImage::new(64, 64);
    std::fs::write(
        &a1111,
        encode_png_with_text(&blank, "parameters", infotext).unwrap(),
    )
    .unwrap();
    let out = tmp.path().join("from-a1111");
    let o = from_png(a1111.to_str().unwrap(), &[], &out);
    assert_ok(&o, "img2img --from-png (AUTOMATIC1111)");
    let m = meta(&o);
    assert_eq!(m["scheduler"], "DPMSolverMultistepScheduler", "{m}");
    assert_eq!(m["use_karras_sigmas"], "yes", "{m}");
    assert_image_matches(
        &std::fs::read(out.join("0.png")).unwrap(),
        "cases/sd1-dpm2m-karras-s11/0.png",
    );

    // A PNG without parameters is refused clearly.
    let o = from_png(&init, &[], &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no parameters text"),
        "{err}"
    );
}
