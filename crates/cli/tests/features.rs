//! End-to-end tests of the generation features over HTTP: LoRAs, replacement VAEs, the safety checker,
//! `load_vae` and `nsfw_image_check`, each against the diffusers references in tests/fixtures.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{assert_image_matches, fixture_base64, fixtures, Receiver, Server, ADMIN, KEY};

/// One case of `tests/fixtures/lora_vae/cases.json` (all on sd1-tiny, PNDM, 64 × 64).
fn lora_case(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("lora_vae/cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    cases
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// A v6 images body reproducing `case` (a lora_vae case or a cases.json case), plus `extra`.
fn body(case: &Value, extra: Value) -> Value {
    let mut body = json!({
        "key": KEY,
        "model_id": case["model"],
        "prompt": case["prompt"],
        "negative_prompt": case["negative_prompt"],
        "init_image": fixture_base64(case["init_image"].as_str().unwrap()),
        "width": case["width"],
        "height": case["height"],
        "samples": case["samples"],
        "num_inference_steps": case["num_inference_steps"],
        "guidance_scale": case["guidance_scale"],
        "strength": case["strength"],
        "scheduler": case["scheduler"],
        "seed": case["seed"],
        "use_karras_sigmas": "no",
        "enhance_prompt": "no",
        "tomesd": "no",
        "safety_checker": "no",
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn png_of(server: &Server, answer: &Value) -> Vec<u8> {
    assert_eq!(answer["status"], "success", "{answer}");
    let (status, png) = server.get(answer["output"][0].as_str().unwrap());
    assert_eq!(status, 200);
    png
}

#[test]
fn loras_and_vaes_over_http_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    for (name, extra) in [
        (
            "kohya-0.8",
            json!({"lora_model": "tiny-kohya", "lora_strength": "0.8"}),
        ),
        (
            "kohya-0.6-peft-1.0",
            json!({"lora_model": "tiny-kohya,tiny-peft", "lora_strength": "0.6,1.0"}),
        ),
        ("vae-tiny-alt", json!({"vae": "tiny-alt"})),
        ("vae-tiny-alt", json!({"vae": "tiny-alt-ldm"})),
    ] {
        let case = lora_case(name);
        let (_, answer) = server.post("/api/v6/images/img2img", &body(&case, extra.clone()));
        let png = png_of(&server, &answer);
        assert_image_matches(
            &png,
            &format!("lora_vae/{}", case["images"][0].as_str().unwrap()),
        );
        if let Some(loras) = extra.get("lora_model") {
            assert_eq!(&answer["meta"]["lora"], loras, "{answer}");
        }
        if let Some(vae) = extra.get("vae") {
            assert_eq!(&answer["meta"]["vae"], vae, "{answer}");
        }
    }
    // The plain model is unchanged by the variants made before.
    let plain = lora_case("kohya-0.8");
    let (_, answer) = server.post("/api/v6/images/img2img", &body(&plain, json!({})));
    let png = png_of(&server, &answer);
    let ours = image::load_from_memory(&png).unwrap().to_rgb8();
    let lora = image::open(fixtures().join("lora_vae/kohya-0.8/0.png"))
        .unwrap()
        .to_rgb8();
    let max = ours
        .as_raw()
        .iter()
        .zip(lora.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(max > 20, "without lora_model the LoRA must not apply");
}

/// SDXL LoRAs (sd-scripts' kohya naming with lora_te1_/lora_te2_ and LDM UNet paths, and diffusers/PEFT
/// naming with text_encoder_2.) over HTTP, against diffusers' images; LoRAs of the other architecture are
/// refused by name.
#[test]
fn sdxl_loras_over_http_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let text = std::fs::read_to_string(fixtures().join("sdxl/lora_cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    for case in cases.iter().take(2) {
        let (name, strength) = (&case["loras"][0][0], &case["loras"][0][1]);
        let extra = json!({"lora_model": name, "lora_strength": strength.to_string()});
        let (_, answer) = server.post("/api/v6/images/img2img", &body(case, extra));
        let png = png_of(&server, &answer);
        assert_image_matches(
            &png,
            &format!("sdxl/{}", case["images"][0].as_str().unwrap()),
        );
    }
    for (model, lora, words) in [
        ("sd1-tiny", "tiny-sdxl-kohya", "is it an SDXL LoRA"),
        ("sdxl-tiny", "tiny-kohya", "another architecture"),
    ] {
        let plain = json!({"model_id": model, "lora_model": lora});
        let (status, answer) =
            server.post("/api/v6/images/img2img", &body(&cases[0], plain.clone()));
        // Accepted (the file exists) and failed with the reason, as for SD 1/2 (see below).
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["status"], "failed", "{model} + {lora}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains("lora_model") && message.contains(words),
            "{model} + {lora}: {message}"
        );
    }
}

/// An SDXL textual-inversion embedding (clip_l + clip_g) from the models folder over HTTP, against diffusers.
#[test]
fn sdxl_embedding_over_http_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    support::copy_dir(
        &fixtures().join("models/checkpoints/sdxl-tiny"),
        &models.path().join("checkpoints/sdxl-tiny"),
    );
    std::fs::create_dir_all(models.path().join("embeddings")).unwrap();
    std::fs::copy(
        fixtures().join("sdxl/embeddings/sdxlstyle.safetensors"),
        models.path().join("embeddings/sdxlstyle.safetensors"),
    )
    .unwrap();
    let server = Server::start_with_models(dir.path(), models.path(), &[]);
    let text = std::fs::read_to_string(fixtures().join("sdxl/embedding_cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    let case = &cases[0];
    assert_eq!(case["model"], "sdxl-tiny");
    let (_, answer) = server.post(
        "/api/v6/images/img2img",
        &body(case, json!({"embeddings_model": "sdxlstyle"})),
    );
    let png = png_of(&server, &answer);
    assert_image_matches(&png, case["images"][0].as_str().unwrap());
}

#[test]
fn bad_feature_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let case = lora_case("kohya-0.8");
    for (extra, field, words) in [
        (
            json!({"lora_model": "missing"}),
            "lora_model",
            "no LoRA named missing",
        ),
        (
            json!({"lora_model": "tiny-kohya", "lora_strength": "0.5,0.6"}),
            "lora_strength",
            "2 strengths for 1 LoRAs",
        ),
        (
            json!({"lora_model": "../vae/x"}),
            "lora_model",
            "not a valid name",
        ),
        (json!({"vae": "missing"}), "vae", "no VAE named missing"),
        (
            json!({"safety_checker": "yes", "safety_checker_type": "sepia"}),
            "safety_checker_type",
            "unknown type",
        ),
    ] {
        let (status, answer) = server.post("/api/v6/images/img2img", &body(&case, extra.clone()));
        assert_eq!(status, 200, "{extra}");
        assert_eq!(answer["status"], "error", "{extra}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(words), "{extra}: {answer}");
        assert!(answer["errors"][field].is_array(), "{extra}: {answer}");
    }
    // A LoRA made for another architecture is accepted (the file exists) and fails with the reason.
    let (_, answer) = server.post(
        "/api/v6/images/img2img",
        &body(&case, json!({"lora_model": "tiny-sd2-kohya"})),
    );
    assert_eq!(answer["status"], "failed", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("another architecture"),
        "{answer}"
    );
}

/// A cases.json case by name.
fn case(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    let mut case = cases.into_iter().find(|c| c["name"] == name).unwrap();
    // cases.json prompts are literal text for diffusers; the API parses A1111 weighting syntax.
    let literal = case["prompt"]
        .as_str()
        .unwrap()
        .replace('(', "\\(")
        .replace(')', "\\)");
    case["prompt"] = json!(literal);
    case["negative_prompt"] = json!(case["negative_prompt"].as_str().unwrap_or(""));
    case
}

#[test]
fn the_safety_checker_replaces_flagged_images_and_checks_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let checker = fixtures().join("safety");
    let server = Server::start(dir.path(), &["--safety-checker", checker.to_str().unwrap()]);
    // sd1-pndm-s42's image is one the tiny checker flags (tests/fixtures/safety/expected.json).
    let flagged = case("sd1-pndm-s42");
    let (_, off) = server.post("/api/v6/images/img2img", &body(&flagged, json!({})));
    assert_image_matches(&png_of(&server, &off), "cases/sd1-pndm-s42/0.png");
    assert_eq!(off["nsfw_content_detected"], false);

    let (_, black) = server.post(
        "/api/v6/images/img2img",
        &body(
            &flagged,
            json!({"safety_checker": "yes", "safety_checker_type": "black"}),
        ),
    );
    let png = png_of(&server, &black);
    assert_eq!(black["nsfw_content_detected"], true, "{black}");
    assert_eq!(black["meta"]["safety_checker"], "yes");
    assert_eq!(black["meta"]["safety_checker_type"], "black");
    let image = image::load_from_memory(&png).unwrap().to_rgb8();
    assert!(
        image.as_raw().iter().all(|v| *v == 0),
        "a flagged image is black"
    );

    let (_, pixelated) = server.post(
        "/api/v6/images/img2img",
        &body(
            &flagged,
            json!({"safety_checker": true, "safety_checker_type": "pixelate"}),
        ),
    );
    let image = image::load_from_memory(&png_of(&server, &pixelated))
        .unwrap()
        .to_rgb8();
    let colours: std::collections::HashSet<_> = image.pixels().collect();
    assert!(
        colours.len() <= 144,
        "pixelated: at most 12 × 12 blocks of one colour, got {} colours",
        colours.len()
    );

    // nsfw_image_check on an upload: the init image is not flagged, the generated one is.
    let check = |b64: String| {
        server
            .post(
                "/api/v1/enterprise/nsfw_image_check",
                &json!({"key": ADMIN, "init_image": b64}),
            )
            .1
    };
    assert_eq!(
        check(fixture_base64("init-64.png"))["has_nsfw_concept"],
        json!([false])
    );
    let answer = check(fixture_base64("cases/sd1-pndm-s42/0.png"));
    assert_eq!(answer["has_nsfw_concept"], json!([true]), "{answer}");
}

#[test]
fn embeddings_no_checker_and_load_vae() {
    let dir = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    support::copy_dir(
        &fixtures().join("models/checkpoints/sd1-tiny"),
        &models.path().join("checkpoints/sd1-tiny"),
    );
    std::fs::create_dir_all(models.path().join("embeddings")).unwrap();
    std::fs::copy(
        fixtures().join("prompts/embeddings/pictor-style.pt"),
        models.path().join("embeddings/pictor-style.pt"),
    )
    .unwrap();
    let receiver = Receiver::start();
    receiver.serve_file(
        "/vae.safetensors",
        std::fs::read(fixtures().join("models/vae/tiny-alt-ldm.safetensors")).unwrap(),
    );
    receiver.serve_file(
        "/not-a-vae.safetensors",
        std::fs::read(fixtures().join("models/loras/tiny-peft.safetensors")).unwrap(),
    );
    let server = Server::start_with_models(dir.path(), models.path(), &["--allow-private-urls"]);
    let case = lora_case("vae-tiny-alt");
    let (_, answer) = server.post(
        "/api/v6/images/img2img",
        &body(&case, json!({"safety_checker": "yes"})),
    );
    assert_eq!(answer["status"], "success", "{answer}");
    assert_eq!(answer["nsfw_content_detected"], false);
    let warnings = answer["warnings"].to_string();
    assert!(
        warnings.contains("no safety checker is installed"),
        "{answer}"
    );
    assert_eq!(answer["meta"]["safety_checker"], "unavailable", "{answer}");
    let (_, answer) = server.post(
        "/api/v1/enterprise/nsfw_image_check",
        &json!({"key": ADMIN, "init_image": fixture_base64("init-64.png")}),
    );
    assert_eq!(answer["status"], "error", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("no safety checker"),
        "{answer}"
    );

    // A textual-inversion embedding (A1111 .pt) used in the prompt, against diffusers' load_textual_inversion.
    let prompts: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("prompts/prompts.json")).unwrap(),
    )
    .unwrap();
    let ti = &prompts["ti_img2img"];
    let ti_body = |extra: Value| {
        let mut b = body(
            &json!({
                "model": ti["model"], "prompt": ti["prompt"], "negative_prompt": ti["negative_prompt"],
                "init_image": ti["init_image"], "width": 64, "height": 64, "samples": 1,
                "num_inference_steps": ti["num_inference_steps"], "guidance_scale": ti["guidance_scale"],
                "strength": ti["strength"], "scheduler": "PNDMScheduler", "seed": ti["seed"],
            }),
            json!({"embeddings_model": "pictor-style"}),
        );
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (_, answer) = server.post("/api/v6/images/img2img", &ti_body(json!({})));
    assert_image_matches(&png_of(&server, &answer), ti["image"].as_str().unwrap());
    assert_eq!(answer["meta"]["embeddings"], "pictor-style", "{answer}");
    for (extra, field) in [
        (json!({"embeddings_model": "nope"}), "embeddings_model"),
        (json!({"prompt": "a ((cat)"}), "prompt"),
        (json!({"negative_prompt": "blurry]"}), "negative_prompt"),
    ] {
        let (_, answer) = server.post("/api/v6/images/img2img", &ti_body(extra.clone()));
        assert_eq!(answer["status"], "error", "{extra}: {answer}");
        assert!(answer["errors"][field].is_array(), "{extra}: {answer}");
    }

    let manage = |extra: Value| {
        let mut body = json!({"key": ADMIN});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        server.post("/api/v1/enterprise/load_vae", &body).1
    };
    let refused =
        manage(json!({"vae_id": "x", "vae_url": "https://example.com/v.pt", "vae_type": "pt"}));
    assert_eq!(refused["status"], "error", "{refused}");
    let started = manage(
        json!({"vae_id": "downloaded", "vae_url": format!("{}/vae.safetensors", receiver.base)}),
    );
    assert_eq!(started["message"], "VAE load started", "{started}");
    let bad = manage(
        json!({"vae_id": "bad", "vae_url": format!("{}/not-a-vae.safetensors", receiver.base)}),
    );
    assert_eq!(bad["status"], "success", "{bad}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let vae_file = models.path().join("vae/downloaded.safetensors");
    while !vae_file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the VAE never arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, answer) = server.post(
        "/api/v6/images/img2img",
        &body(&case, json!({"vae": "downloaded"})),
    );
    assert_image_matches(
        &png_of(&server, &answer),
        &format!("lora_vae/{}", case["images"][0].as_str().unwrap()),
    );
    // The file that is no VAE never became one.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!models.path().join("vae/bad.safetensors").exists());
}
