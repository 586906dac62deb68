//! End-to-end tests of `pictor serve`: the real binary on loopback with the tiny fixture models, driven over
//! HTTP the way API clients drive the hosted service.

mod support;

use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use support::{
    assert_image_matches, body_for, case, copy_dir, fixture_base64, fixtures, Receiver, Server,
    ADMIN, KEY,
};

/// Downloads every output URL and compares it with the case's reference images.
fn assert_outputs_match(server: &Server, urls: &[Value], case: &Value) {
    let expected = case["images"].as_array().unwrap();
    assert_eq!(urls.len(), expected.len(), "one output per sample");
    for (url, fixture) in urls.iter().zip(expected) {
        let (status, png) = server.get(url.as_str().unwrap());
        assert_eq!(status, 200, "{url}");
        assert_image_matches(&png, fixture.as_str().unwrap());
    }
}

fn start_default(dir: &tempfile::TempDir, extra: &[&str]) -> Server {
    let mut flags = vec![
        "--default-model",
        "sd1-tiny",
        "--pix2pix-model",
        "pix2pix-tiny",
    ];
    flags.extend_from_slice(extra);
    Server::start(dir.path(), &flags)
}

/// SDXL models (a base with both text encoders and a refiner with the second alone) through the families
/// clients use, each answer's images equal to diffusers' StableDiffusionXLImg2ImgPipeline.
#[test]
fn sdxl_models_answer_every_family_with_the_reference_image() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &[]);
    for (path, name, model) in [
        ("/api/v6/images/img2img", "sdxl-euler-s42", "sdxl-tiny"),
        (
            "/api/v4/dreambooth/img2img",
            "sdxl-dpm2m-72x56-s7-n2",
            "sdxl-tiny",
        ),
        (
            "/api/v1/enterprise/img2img",
            "sdxl-euler-noneg-s0-n2",
            "sdxl-tiny",
        ),
        (
            "/api/v6/realtime/img2img",
            "sdxl-euler-clipskip2-s0",
            "sdxl-tiny",
        ),
        (
            "/api/v6/images/img2img",
            "sdxl-refiner-noneg-s3",
            "sdxl-refiner-tiny",
        ),
        (
            "/api/v1/enterprise/images/img2img",
            "sdxl-single-euler-s42",
            "sdxl-tiny-single",
        ),
        (
            "/api/v4/dreambooth/img2img",
            "sdxl-turbo-eulera-s5",
            "sdxl-turbo-tiny",
        ),
    ] {
        let reference = case(name);
        let mut body = body_for(&reference, json!({ "model_id": model }));
        if path.contains("realtime") {
            body["safety_checker"] = json!(false);
        }
        if reference["guidance_scale"] == 0.0 {
            // The API's range starts at 1; guidance 1 and 0 both turn guidance off, as in diffusers.
            body["guidance_scale"] = json!(1.0);
        }
        let (status, body) = server.post(path, &body);
        assert_eq!(status, 200, "{path} {name}: {body}");
        assert_eq!(body["status"], "success", "{path} {name}: {body}");
        assert_outputs_match(&server, body["output"].as_array().unwrap(), &reference);
    }
}

/// Text-to-image on every family that has it, each answer's images equal to diffusers' StableDiffusionPipeline /
/// StableDiffusionXLPipeline, in the family's shape (no init image in meta); a queued text2img job is fetched
/// like any other.
#[test]
fn text2img_answers_every_family_with_the_reference_image() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &[]);
    for (path, name, model) in [
        ("/api/v3/text2img", "t2i-sd1-pndm-s42", None),
        (
            "/api/v4/dreambooth",
            "t2i-sd1-eulera-80x48-s3-n2",
            Some("sd1-tiny"),
        ),
        (
            "/api/v6/images/text2img",
            "t2i-sd1-dpm2msde-karras-s11",
            Some("sd1-tiny"),
        ),
        (
            "/api/v6/realtime/text2img",
            "t2i-sd1-euler-cfg1-s0-n2",
            None,
        ),
        (
            "/api/v1/enterprise/text2img",
            "t2i-sd2-euler-72x56-s5-n2",
            Some("sd2-tiny"),
        ),
        (
            "/api/v1/enterprise/realtime/text2img",
            "t2i-sdxl-euler-noneg-s0",
            Some("sdxl-tiny"),
        ),
    ] {
        let reference = case(name);
        let mut body = body_for(&reference, json!({}));
        if let Some(model) = model {
            body["model_id"] = json!(model);
        }
        let (status, answer) = server.post(path, &body);
        assert_eq!(status, 200, "{path} {name}: {answer}");
        assert_eq!(answer["status"], "success", "{path} {name}: {answer}");
        assert!(answer["meta"].get("init_image").is_none(), "{answer}");
        assert!(answer["meta"].get("strength").is_none(), "{answer}");
        assert_eq!(answer["meta"]["seed"], reference["seed"], "{answer}");
        assert_outputs_match(&server, answer["output"].as_array().unwrap(), &reference);
    }

    // Queued, then fetched by the family's fetch route.
    let reference = case("t2i-sd1-euler-s7");
    let (status, queued) = server.post(
        "/api/v6/images/text2img",
        &body_for(&reference, json!({"instant_response": true})),
    );
    assert_eq!(status, 200, "{queued}");
    assert_eq!(queued["status"], "processing", "{queued}");
    let fetch = queued["fetch_result"].as_str().unwrap().to_string();
    let done = server.wait_for(&fetch, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}");
    assert_outputs_match(&server, done["output"].as_array().unwrap(), &reference);
    // Its PNG carries the settings as AUTOMATIC1111's `parameters` text.
    let (_, png) = server.get(done["output"][0].as_str().unwrap());
    let text = pictor_engine::image_io::png_text(&png, "parameters").expect("parameters text");
    assert!(
        text.contains("Steps: 8, Sampler: Euler, Schedule type: Uniform, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: sd1-tiny"),
        "{text}"
    );

    // Bad input in the API's shape; no text2img on v5 (pix2pix needs an image); the refiner cannot start
    // from text; an InstructPix2Pix model is not a text2img model.
    let (status, err) = server.post("/api/v6/images/text2img", &json!({"key": KEY}));
    assert_eq!(status, 200);
    assert_eq!(err["status"], "error", "{err}");
    assert_eq!(err["message"], "The prompt field is required.", "{err}");
    let (status, _) = server.post("/api/v5/text2img", &json!({"key": KEY, "prompt": "a"}));
    assert_eq!(status, 404);
    // What the hosted API has and Pictor not yet is refused by name, not a 404.
    let (status, err) = server.post(
        "/api/v7/images/inpaint",
        &json!({"key": KEY, "prompt": "a"}),
    );
    assert_eq!(status, 200);
    assert_eq!(err["status"], "error", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("inpainting"),
        "{err}"
    );
    let (_, err) = server.post(
        "/api/v6/images/text2img",
        &json!({"key": KEY, "prompt": "a", "model_id": "pix2pix-tiny", "width": 64, "height": 64}),
    );
    assert_eq!(err["status"], "error", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("pix2pix-tiny"),
        "{err}"
    );
    let (_, err) = server.post(
        "/api/v6/images/text2img",
        &json!({"key": KEY, "prompt": "a", "model_id": "sdxl-refiner-tiny", "width": 64, "height": 64,
                "num_inference_steps": 2}),
    );
    assert!(
        matches!(err["status"].as_str(), Some("error" | "failed")),
        "{err}"
    );
    assert!(err.to_string().contains("refiner"), "{err}");
}

#[test]
fn every_family_answers_in_its_shape_with_the_reference_image() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &[]);
    let ddim = case("sd1-ddim-s42");

    // v3: the default model, `meta` with H/W, the index after the uuid.
    let (status, body) = server.post(
        "/api/v3/img2img",
        &body_for(&ddim, json!({"multi_lingual": "yes"})),
    );
    assert_eq!(status, 200);
    assert_eq!(body["status"], "success", "{body}");
    assert!(body["id"].is_i64());
    assert!(body["generationTime"].as_f64().unwrap() > 0.0);
    assert_eq!(body["meta"]["W"], 64);
    assert_eq!(body["meta"]["model"], "sd1-tiny");
    assert_eq!(body["meta"]["seed"], 42);
    let prefix = body["meta"]["file_prefix"].as_str().unwrap();
    assert!(body["output"][0]
        .as_str()
        .unwrap()
        .ends_with(&format!("/generations/{prefix}-0.png")));
    assert!(body["warnings"][0]
        .as_str()
        .unwrap()
        .contains("multi_lingual"));
    assert_outputs_match(&server, body["output"].as_array().unwrap(), &ddim);

    // v4 dreambooth: model_id, two samples, the index before the uuid, `safetychecker`.
    let pndm = case("sd1-pndm-s0-n2");
    let (_, body) = server.post(
        "/api/v4/dreambooth/img2img",
        &body_for(&pndm, json!({"model_id": "sd1-tiny"})),
    );
    assert_eq!(body["status"], "success", "{body}");
    assert_eq!(body["meta"]["safetychecker"], "no");
    assert_eq!(body["meta"]["n_samples"], 2);
    let prefix = body["meta"]["file_prefix"].as_str().unwrap();
    assert!(body["output"][1]
        .as_str()
        .unwrap()
        .ends_with(&format!("/generations/1-{prefix}.png")));
    assert_outputs_match(&server, body["output"].as_array().unwrap(), &pndm);

    // v6 images: proxy_links, nsfw_content_detected, webhook_status, the full v6 meta.
    let euler = case("sd1-euler-s42");
    let (_, body) = server.post(
        "/api/v6/images/img2img",
        &body_for(&euler, json!({"model_id": "sd1-tiny"})),
    );
    assert_eq!(body["status"], "success", "{body}");
    assert_eq!(body["nsfw_content_detected"], false);
    assert_eq!(body["proxy_links"], body["output"]);
    assert_eq!(body["webhook_status"], "");
    assert_eq!(body["meta"]["scheduler"], "EulerDiscreteScheduler");
    assert_eq!(body["meta"]["use_karras_sigmas"], "no");
    assert_eq!(body["meta"]["safety_checker"], "no");
    assert_outputs_match(&server, body["output"].as_array().unwrap(), &euler);

    // Enterprise, on the path the Python SDK uses, with a single-file checkpoint.
    let single = case("sd1-single-ddim-s42");
    let single_id = single["model"]
        .as_str()
        .unwrap()
        .trim_end_matches(".safetensors");
    for path in [
        "/api/v1/enterprise/img2img",
        "/api/v1/enterprise/images/img2img",
    ] {
        let (_, body) = server.post(path, &body_for(&single, json!({"model_id": single_id})));
        assert_eq!(body["status"], "success", "{path}: {body}");
        assert_eq!(body["meta"]["model_id"], single_id);
        assert_outputs_match(&server, body["output"].as_array().unwrap(), &single);
    }

    // Realtime families: JSON booleans, width/height in meta, the default model.
    for path in [
        "/api/v6/realtime/img2img",
        "/api/v1/enterprise/realtime/img2img",
    ] {
        let (_, body) = server.post(
            path,
            &body_for(
                &ddim,
                json!({"base64": false, "safety_checker": false, "instant_response": false}),
            ),
        );
        assert_eq!(body["status"], "success", "{path}: {body}");
        assert_eq!(body["meta"]["width"], 64);
        assert_eq!(body["meta"]["base64"], "no");
        assert_eq!(body["meta"]["instant_response"], "no");
        assert_outputs_match(&server, body["output"].as_array().unwrap(), &ddim);
    }

    // v5 pix2pix: `output` is one string; `model_id`/`seed`/`scheduler` are extensions.
    let p2p = case("p2p-ddim-s3");
    let (_, body) = server.post("/api/v5/pix2pix", &body_for(&p2p, json!({})));
    assert_eq!(body["status"], "success", "{body}");
    let url = body["output"].as_str().expect("v5 output is a string");
    assert_outputs_match(&server, &[json!(url)], &p2p);
    assert!(body.get("meta").is_none());

    // img2img on the pix2pix model and pix2pix on an img2img model are refused by name.
    let (_, body) = server.post(
        "/api/v6/images/img2img",
        &body_for(&ddim, json!({"model_id": "pix2pix-tiny"})),
    );
    assert_eq!(body["status"], "error");
    assert!(body["errors"]["model_id"].is_array(), "{body}");
}

#[test]
fn queued_jobs_are_fetched_by_path_and_by_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &["--sync-timeout", "0"]);
    let ddim = case("sd1-ddim-s42");

    let (_, queued) = server.post(
        "/api/v6/images/img2img",
        &body_for(&ddim, json!({"model_id": "sd1-tiny"})),
    );
    assert_eq!(queued["status"], "processing", "{queued}");
    let id = queued["id"].as_i64().unwrap();
    let fetch = queued["fetch_result"].as_str().unwrap().to_string();
    assert_eq!(fetch, format!("{}/api/v6/images/fetch/{id}", server.base));
    assert!(queued["eta"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        queued["messege"],
        "Try to fetch request after seconds estimated"
    );
    assert_eq!(queued["meta"]["seed"], 42);
    let future = queued["future_links"].clone();

    let done = server.wait_for(&fetch, Duration::from_secs(120));
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(
        done["output"], future,
        "the outputs appear where future_links said"
    );
    assert_outputs_match(&server, done["output"].as_array().unwrap(), &ddim);

    // The same job through the body form of every family's fetch route.
    for path in [
        "/api/v6/images/fetch",
        "/api/v3/fetch",
        "/api/v4/dreambooth/fetch",
        "/api/v1/enterprise/fetch",
        "/api/v1/enterprise/fetch_queue_image",
    ] {
        let (_, again) = server.post(path, &json!({"key": KEY, "request_id": id.to_string()}));
        assert_eq!(again["status"], "success", "{path}: {again}");
        assert_eq!(again["output"], done["output"], "{path}");
    }
    // v3 jobs are fetched on the v3 route; v5 jobs through v3 too.
    let (_, v3) = server.post("/api/v3/img2img", &body_for(&ddim, json!({})));
    assert_eq!(
        v3["fetch_result"],
        format!("{}/api/v3/fetch/{}", server.base, v3["id"])
    );
    assert_eq!(v3["output"], json!([]));
    let p2p = case("p2p-ddim-s3");
    let (_, v5) = server.post("/api/v5/pix2pix", &body_for(&p2p, json!({})));
    assert_eq!(v5["output"], json!(""));
    let v5_done = server.wait_for(
        v5["fetch_result"].as_str().unwrap(),
        Duration::from_secs(120),
    );
    assert!(v5_done["output"].is_string(), "{v5_done}");

    // Another key cannot see the job; the admin key can.
    let (_, other) = server.post(&fetch, &json!({"key": "not-a-key"}));
    assert_eq!(other["message"], "Invalid Api Key");
    let (_, admin) = server.post(&fetch, &json!({"key": ADMIN}));
    assert_eq!(admin["status"], "success");
    let (_, missing) = server.post("/api/v6/images/fetch/999999", &json!({"key": KEY}));
    assert_eq!(missing["status"], "error");
    assert!(
        missing["message"].as_str().unwrap().contains("not found"),
        "{missing}"
    );
}

#[test]
fn webhooks_deliver_with_track_id_and_init_images_come_from_urls() {
    let receiver = Receiver::start();
    receiver.serve_file(
        "/init.png",
        std::fs::read(fixtures().join("init-64.png")).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(
        &dir,
        &[
            "--allow-private-urls",
            "--webhook-backoff",
            "0.1",
            "--webhook-attempts",
            "3",
        ],
    );
    let ddim = case("sd1-ddim-s42");
    let mut body = body_for(
        &ddim,
        json!({"model_id": "sd1-tiny", "webhook": format!("{}/hook", receiver.base), "track_id": "track-7"}),
    );
    body["init_image"] = json!(format!("{}/init.png", receiver.base));
    let (_, answer) = server.post("/api/v4/dreambooth/img2img", &body);
    assert_eq!(answer["status"], "success", "{answer}");
    assert_eq!(
        answer["meta"]["init_image"],
        format!("{}/init.png", receiver.base)
    );
    assert_outputs_match(&server, answer["output"].as_array().unwrap(), &ddim);

    let posts = receiver.wait_posts("/hook", 1, Duration::from_secs(30));
    let hook = &posts[0].json;
    assert_eq!(hook["status"], "success");
    assert_eq!(hook["track_id"], "track-7");
    assert_eq!(hook["id"], answer["id"]);
    assert_eq!(hook["output"], answer["output"]);

    // A receiver that keeps failing gets the bounded retries, then webhook_status says so.
    receiver.answer_with("/broken", 500);
    body["webhook"] = json!(format!("{}/broken", receiver.base));
    let (_, answer) = server.post("/api/v4/dreambooth/img2img", &body);
    receiver.wait_posts("/broken", 3, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        receiver.posts_to("/broken").len(),
        3,
        "exactly --webhook-attempts tries"
    );
    let (_, fetched) = server.post(
        "/api/v4/dreambooth/fetch",
        &json!({"key": KEY, "request_id": answer["id"]}),
    );
    assert_eq!(fetched["webhook_status"], "failed", "{fetched}");
    let (_, fetched) = server.post(
        "/api/v4/dreambooth/fetch",
        &json!({"key": KEY, "request_id": hook["id"]}),
    );
    assert_eq!(fetched["webhook_status"], "success");
}

#[test]
fn queued_jobs_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_default(&dir, &["--sync-timeout", "0"]);
    let ddim = case("sd1-ddim-s42");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, queued) = server.post(
            "/api/v6/images/img2img",
            &body_for(&ddim, json!({"model_id": "sd1-tiny"})),
        );
        assert_eq!(queued["status"], "processing", "{queued}");
        ids.push(queued["id"].as_i64().unwrap());
    }
    server.kill();

    let server = start_default(&dir, &[]);
    for id in ids {
        let done = server.wait_for(
            &format!("{}/api/v6/images/fetch/{id}", server.base),
            Duration::from_secs(180),
        );
        assert_eq!(done["status"], "success", "job {id}: {done}");
        assert_outputs_match(&server, done["output"].as_array().unwrap(), &ddim);
    }
}

/// A PNG whose header claims 100000 × 100000 pixels (with a valid CRC), as base64.
fn forged_png_base64() -> String {
    let mut bytes = std::fs::read(fixtures().join("init-64.png")).unwrap();
    bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let mut crc = 0xFFFF_FFFFu32;
    for &b in &bytes[12..29] {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    bytes[29..33].copy_from_slice(&(!crc).to_be_bytes());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn bad_inputs_get_the_api_error_shape() {
    let loopback = Receiver::start();
    loopback.serve_file(
        "/init.png",
        std::fs::read(fixtures().join("init-64.png")).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(
        &dir,
        &[
            "--max-body-mib",
            "1",
            "--max-queued-per-key",
            "1",
            "--sync-timeout",
            "0",
        ],
    );
    let good = body_for(&case("sd1-ddim-s42"), json!({"model_id": "sd1-tiny"}));
    let with = |field: &str, value: Value| {
        let mut b = good.clone();
        b[field] = value;
        b
    };
    let without = |field: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(field);
        b
    };
    // (what, body, text the message must contain)
    let cases: Vec<(&str, Value, &str)> = vec![
        ("wrong key", with("key", json!("nope")), "Invalid Api Key"),
        ("no key", without("key"), "Invalid Api Key"),
        (
            "missing init image",
            without("init_image"),
            "The init image field is required.",
        ),
        (
            "missing prompt",
            without("prompt"),
            "The prompt field is required.",
        ),
        ("width 5000", with("width", json!(5000)), "width"),
        (
            "height not a number",
            with("height", json!("tall")),
            "height",
        ),
        ("samples 9", with("samples", json!("9")), "samples"),
        (
            "steps 51",
            with("num_inference_steps", json!(51)),
            "num_inference_steps",
        ),
        (
            "guidance 0",
            with("guidance_scale", json!(0)),
            "guidance_scale",
        ),
        ("strength 2", with("strength", json!(2)), "strength"),
        (
            "garbage base64",
            with("init_image", json!("%%%not-base64%%%")),
            "init_image",
        ),
        (
            "base64 of a text",
            with("init_image", json!("aGVsbG8gd29ybGQ=")),
            "init_image",
        ),
        (
            "forged huge PNG",
            with("init_image", json!(forged_png_base64())),
            "100000×100000",
        ),
        (
            "unknown model",
            with("model_id", json!("no-such-model")),
            "Model id not found",
        ),
        (
            "unknown scheduler",
            with("scheduler", json!("FancyScheduler")),
            "scheduler",
        ),
        (
            "loopback URL",
            with("init_image", json!(format!("{}/init.png", loopback.base))),
            "loopback",
        ),
        (
            "cloud metadata URL",
            with(
                "init_image",
                json!("http://169.254.169.254/latest/meta-data/"),
            ),
            "init_image",
        ),
        (
            "webhook to loopback",
            with("webhook", json!(format!("{}/hook", loopback.base))),
            "webhook",
        ),
        ("LoRA", with("lora_model", json!("x")), "lora_model"),
        (
            "unknown style",
            with("enhance_style", json!("watercolour")),
            "enhance_style",
        ),
    ];
    for (what, body, expect) in cases {
        let (status, answer) = server.post("/api/v6/images/img2img", &body);
        assert_eq!(status, 200, "{what}: {answer}");
        assert_eq!(answer["status"], "error", "{what}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(expect),
            "{what}: {message:?} should mention {expect:?}"
        );
    }

    // Not JSON, and an oversized body.
    let url = format!("{}/api/v6/images/img2img", server.base);
    let (status, answer) = support::post_raw(&url, b"{not json".to_vec());
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("error")),
        "{answer}"
    );
    let mut huge = good.clone();
    huge["prompt"] = json!("x".repeat(2 << 20));
    let (status, answer) = server.post("/api/v6/images/img2img", &huge);
    assert_eq!(status, 200);
    assert!(
        answer["message"].as_str().unwrap().contains("larger than"),
        "{answer}"
    );

    // The key's queue holds one job: the second is refused with 429 and retry_after.
    let (_, first) = server.post("/api/v6/images/img2img", &good);
    assert_eq!(first["status"], "processing", "{first}");
    let (status, second) = server.post("/api/v6/images/img2img", &good);
    assert_eq!(status, 429, "{second}");
    assert_eq!(second["retry_after"], 30);
    // Nothing accepted was lost: the first job still completes.
    let done = server.wait_for(
        first["fetch_result"].as_str().unwrap(),
        Duration::from_secs(120),
    );
    assert_eq!(done["status"], "success");
    assert!(!server.log().contains("panicked"), "{}", server.log());
    assert!(!server.log().contains(KEY), "keys are never logged");
}

#[test]
fn temp_outputs_expire_and_base64_outputs_are_text_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &["--temp-ttl", "1", "--sweep-interval", "1"]);
    let ddim = case("sd1-ddim-s42");

    let (_, body) = server.post(
        "/api/v6/images/img2img",
        &body_for(&ddim, json!({"model_id": "sd1-tiny", "base64": "yes"})),
    );
    assert_eq!(body["status"], "success", "{body}");
    let url = body["output"][0].as_str().unwrap();
    assert!(url.ends_with(".base64"), "{url}");
    let (status, text) = server.get(url);
    assert_eq!(status, 200);
    let png = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    assert_image_matches(&png, "cases/sd1-ddim-s42/0.png");

    let (_, body) = server.post(
        "/api/v6/images/img2img",
        &body_for(&ddim, json!({"model_id": "sd1-tiny", "temp": "yes"})),
    );
    assert_eq!(body["status"], "success", "{body}");
    let url = body["output"][0].as_str().unwrap().to_string();
    assert!(url.contains("/temp/"), "{url}");
    assert_eq!(server.get(&url).0, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.get(&url).0 == 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "temp output never expired"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(server.get(&url).0, 404);
}

#[test]
fn management_routes_need_the_admin_key_and_work() {
    // A private copy of two models, since this test adds and deletes models.
    let models = tempfile::tempdir().unwrap();
    let checkpoints = models.path().join("checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    copy_dir(
        &fixtures().join("models/checkpoints/sd1-tiny"),
        &checkpoints.join("sd1-tiny"),
    );
    let receiver = Receiver::start();
    receiver.serve_file(
        "/model.safetensors",
        std::fs::read(fixtures().join("models/checkpoints/sd1-tiny-single.safetensors")).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_models(dir.path(), models.path(), &["--allow-private-urls"]);
    let manage = |name: &str, extra: Value| {
        let mut body = json!({"key": ADMIN});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        server.post(&format!("/api/v1/enterprise/{name}"), &body).1
    };

    let (_, refused) = server.post("/api/v1/enterprise/system_details", &json!({"key": KEY}));
    assert_eq!(refused["status"], "error");
    assert!(refused["message"].as_str().unwrap().contains("admin"));

    let details = manage("system_details", json!({}));
    assert_eq!(details["status"], "ok");
    assert_eq!(details["model_count"], 1);
    assert_eq!(details["device"], "cpu");
    assert_eq!(
        manage("schedulers_list", json!({}))["schedulers"]
            .as_array()
            .unwrap()
            .len(),
        18
    );
    let all = manage("get_all_models", json!({}));
    assert_eq!(all["models"][0]["model_id"], "sd1-tiny");
    assert_eq!(
        manage("verify_model", json!({"model_id": "sd1-tiny"}))["message"],
        "Model exists on server"
    );

    // load_model from a URL of a single-file checkpoint, in the background; then it generates.
    let started = manage(
        "load_model",
        json!({"model_id": "downloaded", "url": format!("{}/model.safetensors", receiver.base)}),
    );
    assert_eq!(started["message"], "model load started", "{started}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = manage("verify_model", json!({"model_id": "downloaded"}));
        if v["status"] == "success" {
            break;
        }
        assert_ne!(v["status"], "error", "{v}");
        assert!(
            std::time::Instant::now() < deadline,
            "model never loaded: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let single = case("sd1-single-ddim-s42");
    let (_, body) = server.post(
        "/api/v1/enterprise/img2img",
        &body_for(&single, json!({"model_id": "downloaded"})),
    );
    assert_eq!(body["status"], "success", "{body}");
    assert_outputs_match(&server, body["output"].as_array().unwrap(), &single);
    assert_eq!(
        manage("system_details", json!({}))["models_loaded"],
        json!(["downloaded"])
    );
    assert_eq!(
        manage("clear_cache", json!({}))["message"],
        "Cache cleared successfully"
    );
    assert_eq!(
        manage("system_details", json!({}))["models_loaded"],
        json!([])
    );

    // A pickle URL is refused before anything is downloaded.
    let pickle = manage(
        "load_model",
        json!({"model_id": "p", "url": "https://example.com/m.ckpt"}),
    );
    assert_eq!(pickle["status"], "error");

    assert_eq!(
        manage("delete_model", json!({"model_id": "downloaded"}))["message"],
        "Model deleted on server"
    );
    assert_eq!(
        manage("verify_model", json!({"model_id": "downloaded"}))["status"],
        "error"
    );
    assert!(!checkpoints.join("downloaded.safetensors").exists());

    // upload_image: base64 in, URL out, the same bytes served back.
    let uploaded = manage(
        "upload_image",
        json!({"base64_image": fixture_base64("init-64.png"), "image_type": "png"}),
    );
    assert_eq!(uploaded["status"], "success", "{uploaded}");
    let (status, bytes) = server.get(uploaded["image_url"].as_str().unwrap());
    assert_eq!(status, 200);
    assert_eq!(
        bytes,
        std::fs::read(fixtures().join("init-64.png")).unwrap()
    );

    // Calls that do not apply say so.
    for name in ["update_server", "update_s3"] {
        let answer = manage(name, json!({}));
        assert_eq!(answer["status"], "error", "{name}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().len() > 20,
            "{name}: {answer}"
        );
    }
    assert_eq!(manage("clear_queue", json!({}))["status"], "success");
}

#[test]
fn health_metrics_and_openapi() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &[]);
    let (status, body) = server.get("/health");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["status"],
        "ok"
    );
    let ddim = case("sd1-ddim-s42");
    let (_, answer) = server.post("/api/v3/img2img", &body_for(&ddim, json!({})));
    assert_eq!(answer["status"], "success");
    let (_, metrics) = server.get("/metrics");
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains(r#"pictor_http_requests_total{route="/api/v3/img2img",status="200"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"pictor_job_duration_seconds_count{outcome="success"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("pictor_step_duration_seconds_count"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"pictor_jobs{state="queued"} 0"#),
        "{metrics}"
    );
    let (_, doc) = server.get("/openapi.json");
    let doc: Value = serde_json::from_slice(&doc).unwrap();
    for path in [
        "/api/v3/img2img",
        "/api/v4/dreambooth/img2img",
        "/api/v5/pix2pix",
        "/api/v6/images/img2img",
        "/api/v6/realtime/img2img",
        "/api/v1/enterprise/img2img",
        "/api/v1/enterprise/realtime/img2img",
        "/api/v1/enterprise/images/img2img",
        "/api/v6/images/fetch/{id}",
        "/api/v1/enterprise/load_model",
    ] {
        assert!(
            doc["paths"][path]["post"].is_object(),
            "{path} missing from openapi.json"
        );
    }
    let (status, body) = server.get("/no/such/route");
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["status"],
        "error"
    );
}

#[test]
fn enhance_prompt_defaults_per_family_and_styles_are_checked() {
    use pictor_server::prompt_enhance::{DEFAULT_NEGATIVE, QUALITY_SUFFIX};

    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &["--sync-timeout", "0"]);
    let ddim = case("sd1-ddim-s42");
    let mut default_body = body_for(&ddim, json!({"model_id": "sd1-tiny"}));
    // The prompt as sent (the fixture's literal brackets escaped).
    let prompt = default_body["prompt"].as_str().unwrap().to_string();
    let negative = ddim["negative_prompt"].as_str().unwrap();
    default_body
        .as_object_mut()
        .unwrap()
        .remove("enhance_prompt");

    // v6 images enhances by default: the suffix and the default negative are in meta, and stay there once run.
    let (_, queued) = server.post("/api/v6/images/img2img", &default_body);
    assert_eq!(queued["status"], "processing", "{queued}");
    let meta = &queued["meta"];
    assert_eq!(
        meta["prompt"],
        format!("{prompt}, {QUALITY_SUFFIX}"),
        "{meta}"
    );
    assert_eq!(
        meta["negative_prompt"],
        format!("{negative}, {DEFAULT_NEGATIVE}")
    );
    assert_eq!(meta["enhance_prompt"], "yes");
    assert_eq!(meta["enhance_style"], Value::Null);
    let done = server.wait_for(
        queued["fetch_result"].as_str().unwrap(),
        Duration::from_secs(120),
    );
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(done["meta"]["prompt"], meta["prompt"]);

    // Realtime does not enhance by default; a style is applied and echoed by its canonical id.
    let mut styled = default_body.clone();
    styled["enhance_style"] = json!("Pixel-Art");
    styled.as_object_mut().unwrap().remove("model_id");
    let (_, queued) = server.post("/api/v6/realtime/img2img", &styled);
    assert_eq!(queued["status"], "processing", "{queued}");
    let meta = &queued["meta"];
    let styled_prompt = meta["prompt"].as_str().unwrap();
    assert!(styled_prompt.contains(&prompt), "{meta}");
    assert!(styled_prompt.starts_with("pixel art, "), "{meta}");
    assert!(!styled_prompt.contains(QUALITY_SUFFIX), "{meta}");
    assert_eq!(meta["enhance_prompt"], "no");
    assert_eq!(meta["enhance_style"], "pixel-art");

    // An unknown style is refused in the API's field-error shape, naming close ids.
    let mut unknown = default_body.clone();
    unknown["enhance_style"] = json!("pixl-art");
    let (status, error) = server.post("/api/v6/images/img2img", &unknown);
    assert_eq!(status, 200);
    assert_eq!(error["status"], "error", "{error}");
    let why = error["errors"]["enhance_style"][0].as_str().unwrap();
    assert!(why.contains("pixel-art"), "{error}");
    assert_eq!(error["message"], error["messege"]);
}

#[test]
fn update_s3_writes_results_into_the_keys_own_bucket() {
    let customer = pictor_testkit::S3Server::start(&["customer"]);
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &["--allow-private-urls"]);
    let update = |secret: &str| {
        let (_, answer) = server.post(
            "/api/v1/enterprise/update_s3",
            &json!({
                "key": ADMIN,
                "deploy_type": "realtime",
                "public_url": "https://cdn.example.com/generations/",
                "region_name": pictor_testkit::S3_REGION,
                "endpoint_url": customer.endpoint,
                "bucket_name": "customer",
                "aws_access_key_id": pictor_testkit::S3_ACCESS_KEY,
                "aws_secret_access_key": secret,
                "image_directory": "generations",
            }),
        );
        assert_eq!(answer["status"], "success", "{answer}");
        assert!(
            !answer.to_string().contains(secret),
            "the secret is never answered"
        );
    };
    let ddim = case("sd1-ddim-s42");
    let realtime = |key: &str| {
        let (_, body) = server.post(
            "/api/v6/realtime/img2img",
            &body_for(
                &ddim,
                json!({"key": key, "base64": false, "safety_checker": false}),
            ),
        );
        assert_eq!(body["status"], "success", "{body}");
        body
    };

    update(pictor_testkit::S3_SECRET_KEY);
    let body = realtime(ADMIN);
    let url = body["output"][0].as_str().unwrap();
    let name = url
        .strip_prefix("https://cdn.example.com/generations/")
        .unwrap_or_else(|| panic!("the answer gives the bucket's public URL: {body}"));
    let written = std::fs::read(customer.root.path().join("customer/generations").join(name))
        .expect("the image is in the customer's bucket under image_directory");
    assert_image_matches(&written, ddim["images"][0].as_str().unwrap());

    // Other keys' jobs and other deploy types keep the server's own URLs.
    let other = realtime(KEY);
    assert!(other["output"][0]
        .as_str()
        .unwrap()
        .starts_with(&server.base));
    let (_, images) = server.post(
        "/api/v6/images/img2img",
        &body_for(&ddim, json!({"key": ADMIN, "model_id": "sd1-tiny"})),
    );
    assert!(images["output"][0]
        .as_str()
        .unwrap()
        .starts_with(&server.base));

    // A bucket that refuses the write: the job still succeeds, says so, and is served from here.
    update("wrong-secret");
    let refused = realtime(ADMIN);
    assert!(refused["output"][0]
        .as_str()
        .unwrap()
        .starts_with(&server.base));
    assert!(
        refused["warnings"]
            .to_string()
            .contains("not written to your S3 bucket"),
        "{refused}"
    );
    assert_outputs_match(&server, refused["output"].as_array().unwrap(), &ddim);

    // reset_s3 removes it; unknown deploy types are refused by name.
    let (_, reset) = server.post(
        "/api/v1/enterprise/reset_s3",
        &json!({"key": ADMIN, "deploy_type": "realtime"}),
    );
    assert_eq!(reset["status"], "success", "{reset}");
    assert!(realtime(ADMIN)["output"][0]
        .as_str()
        .unwrap()
        .starts_with(&server.base));
    let (_, unknown) = server.post(
        "/api/v1/enterprise/reset_s3",
        &json!({"key": ADMIN, "deploy_type": "voice_cloning"}),
    );
    assert!(
        unknown["message"]
            .as_str()
            .unwrap()
            .contains("voice_cloning"),
        "{unknown}"
    );
}

/// A webhook still being retried when the process is killed is sent after the restart (it is a row in the job
/// store, not a task in memory), and `webhook_status` tells the truth throughout.
#[test]
fn pending_webhooks_survive_kill_9() {
    let receiver = Receiver::start();
    receiver.answer_with("/hook", 500);
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--allow-private-urls",
        "--webhook-attempts",
        "1000",
        "--webhook-backoff",
        "0.2",
    ];
    let mut server = start_default(&dir, &flags);
    let ddim = case("sd1-ddim-s42");
    let (_, body) = server.post(
        "/api/v6/images/img2img",
        &body_for(
            &ddim,
            json!({"model_id": "sd1-tiny", "webhook": format!("{}/hook", receiver.base), "track_id": "t-1"}),
        ),
    );
    assert_eq!(body["status"], "success", "{body}");
    let id = body["id"].as_i64().unwrap();
    receiver.wait_posts("/hook", 2, Duration::from_secs(30));
    let (_, fetched) = server.post(&format!("/api/v6/images/fetch/{id}"), &json!({"key": KEY}));
    assert_eq!(fetched["webhook_status"], "pending", "{fetched}");
    server.kill();

    receiver.answer_with("/hook", 200);
    let failed_before = receiver.posts_to("/hook").len();
    let server = start_default(&dir, &flags);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, fetched) = server.post(&format!("/api/v6/images/fetch/{id}"), &json!({"key": KEY}));
        if fetched["webhook_status"] == "success" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the webhook was never delivered after the restart: {fetched}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let posts = receiver.posts_to("/hook");
    assert!(posts.len() > failed_before);
    let last = posts.last().unwrap();
    assert_eq!(last.json["track_id"], "t-1");
    assert_eq!(last.json["status"], "success");
}

/// The per-key queue limit holds for requests that arrive together (it was checked before the init image was
/// read and the job stored after, so a burst got past it).
#[test]
fn the_queue_limit_holds_for_a_burst_of_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(
        &dir,
        &[
            "--sync-timeout",
            "0",
            "--max-queued-per-key",
            "5",
            "--debug-step-delay-ms",
            "2000",
        ],
    );
    let ddim = case("sd1-ddim-s42");
    let body = body_for(&ddim, json!({"model_id": "sd1-tiny"}));
    let url = format!("{}/api/v6/images/img2img", server.base);
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || support::post_json(&url, &body))
        })
        .collect();
    let mut accepted = 0;
    let mut refused = 0;
    for c in clients {
        let (status, answer) = c.join().unwrap();
        match status {
            200 => {
                assert_eq!(answer["status"], "processing", "{answer}");
                accepted += 1;
            }
            429 => {
                assert!(
                    answer["message"].as_str().unwrap().contains("5"),
                    "{answer}"
                );
                refused += 1;
            }
            other => panic!("{other}: {answer}"),
        }
    }
    assert_eq!((accepted, refused), (5, 35));
    // Refused requests leave no stored init image behind.
    let inputs = std::fs::read_dir(dir.path().join("files/inputs"))
        .unwrap()
        .count();
    assert_eq!(inputs, 5);
}

/// Three smaller defects a probe found: a 300-character file name was a 500 (now a 404), `strength: 0` was
/// accepted and failed at run time (now refused at the door, as any product of strength and steps below one
/// step), and a wrong method answered 405 with an empty body (now the API's error shape).
#[test]
fn small_defects_answer_in_the_api_shape() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &["--sync-timeout", "0"]);

    let (status, body) = server.get(&format!("/generations/{}.png", "a".repeat(300)));
    assert_eq!(status, 404);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["status"], "error");
    assert!(!server.log().contains("ERROR"), "{}", server.log());

    let ddim = case("sd1-ddim-s42");
    for (strength, steps) in [(json!(0), json!("30")), (json!(0.05), json!("10"))] {
        let (status, answer) = server.post(
            "/api/v6/images/img2img",
            &body_for(
                &ddim,
                json!({"model_id": "sd1-tiny", "strength": strength, "num_inference_steps": steps}),
            ),
        );
        assert_eq!(status, 200);
        assert_eq!(answer["status"], "error", "{answer}");
        assert!(answer["errors"]["strength"].is_array(), "{answer}");
    }
    let (_, fine) = server.post(
        "/api/v6/images/img2img",
        &body_for(
            &ddim,
            json!({"model_id": "sd1-tiny", "strength": 0.1, "num_inference_steps": "10"}),
        ),
    );
    assert_eq!(fine["status"], "processing", "one step is enough: {fine}");

    let response = ureq::get(&format!("{}/api/v6/images/img2img", server.base)).call();
    let Err(ureq::Error::Status(405, r)) = response else {
        panic!("expected 405: {response:?}");
    };
    let body: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    assert_eq!(body["status"], "error");
    assert!(
        body["message"].as_str().unwrap().contains("Method"),
        "{body}"
    );
}

/// The load and fault run's finding: with the data folder's disk full, accepted jobs could only fail ("No space
/// left on device") or wait on a locked SQLite log. Now, while a local disk the service writes to has less than
/// `--min-free-disk-mib` free, every dialect's job-making routes answer 503 in their own shape with a retry hint,
/// nothing is queued, and the rest of the service (health, reads) keeps answering.
#[test]
fn a_full_disk_refuses_new_jobs_in_every_dialect() {
    let dir = tempfile::tempdir().unwrap();
    // More free space than any disk has: the disk counts as full.
    let server = start_default(
        &dir,
        &[
            "--sync-timeout",
            "0",
            "--min-free-disk-mib",
            "1099511627776",
        ],
    );

    let (status, answer) = server.post(
        "/api/v6/images/img2img",
        &body_for(&case("sd1-ddim-s42"), json!({"model_id": "sd1-tiny"})),
    );
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["status"], "error", "{answer}");
    assert!(answer["retry_after"].as_u64().is_some(), "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("disk is full"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );

    let bearer = [("Authorization", format!("Bearer {KEY}"))];
    let (status, answer) = support::post_json_with(
        &format!("{}/sdapi/v1/txt2img", server.base),
        &json!({"prompt": "a fox", "steps": 2, "width": 64, "height": 64}),
        &bearer,
    );
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("disk is full"),
        "{answer}"
    );

    let (status, answer) = support::post_json_with(
        &format!("{}/v1/images/generations", server.base),
        &json!({"prompt": "a fox", "size": "64x64"}),
        &bearer,
    );
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disk is full"),
        "{answer}"
    );

    let (status, health) = server.get("/health");
    assert_eq!(status, 200);
    let health: Value = serde_json::from_slice(&health).unwrap();
    assert_eq!(health["queued"], 0, "nothing was queued: {health}");
    assert!(
        server.log().contains("disk nearly full"),
        "{}",
        server.log()
    );
}

/// Defect 3 of the hardening issue: prompts had no length limit (a 1 MB prompt held the only worker for 94 s
/// and 2.3 GB). Now a prompt or negative prompt over 16 KiB or 600 tokens is refused at the door, in the
/// API's error shape naming the field, and nothing is queued.
#[test]
fn oversized_prompts_are_refused_at_the_door() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &["--sync-timeout", "0"]);
    let ddim = case("sd1-ddim-s42");
    let megabyte = "a".repeat(1 << 20);
    let many_tokens = vec!["cat"; 601].join(" ");
    for (field, text, words) in [
        ("prompt", &megabyte, "bytes"),
        ("negative_prompt", &megabyte, "bytes"),
        ("prompt", &many_tokens, "600 tokens"),
    ] {
        let started = std::time::Instant::now();
        let (status, answer) = server.post(
            "/api/v6/images/img2img",
            &body_for(&ddim, json!({"model_id": "sd1-tiny", field: text})),
        );
        assert_eq!(status, 200);
        assert_eq!(answer["status"], "error", "{field}: {answer}");
        assert!(answer["errors"][field].is_array(), "{field}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(words),
            "{field}: {answer}"
        );
        assert!(answer.get("id").is_none(), "nothing is queued: {answer}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    // 600 tokens are still fine.
    let (_, fine) = server.post(
        "/api/v6/images/img2img",
        &body_for(
            &ddim,
            json!({"model_id": "sd1-tiny", "prompt": vec!["cat"; 600].join(" ")}),
        ),
    );
    assert_eq!(fine["status"], "processing", "{fine}");
}

/// Defect 6 of the hardening issue: stored init images were never deleted. A finished job's is deleted when
/// it finishes; the sweep deletes any older than the retention (those of cancelled or abandoned jobs) and
/// leaves newer ones.
#[test]
fn init_images_do_not_outlive_their_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("files/inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let stale = inputs.join("stale.png");
    let fresh = inputs.join("fresh.png");
    for path in [&stale, &fresh] {
        std::fs::write(path, b"png").unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    let server = start_default(&dir, &["--retention-hours", "1", "--sweep-interval", "1"]);
    let ddim = case("sd1-ddim-s42");
    let (_, answer) = server.post(
        "/api/v6/images/img2img",
        &body_for(&ddim, json!({"model_id": "sd1-tiny"})),
    );
    assert_eq!(answer["status"], "success", "{answer}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut left: Vec<String> = std::fs::read_dir(&inputs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        if left == ["fresh.png"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "init images left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Defect 5 of the hardening issue: a half-sent request stayed open for minutes, and 300 idle connections made
/// `/health` time out. Now a client that does not finish its headers within `--header-timeout-secs` (idle
/// keep-alive connections included) is disconnected, connections over `--max-connections` are closed at once,
/// and `/health` answers again as soon as the idle ones are gone.
#[test]
fn slow_and_idle_clients_are_disconnected() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(
        &dir,
        &[
            "--header-timeout-secs",
            "1",
            "--body-timeout-secs",
            "2",
            "--max-connections",
            "3",
        ],
    );
    let address = server.base.trim_start_matches("http://").to_string();
    let closed_within = |stream: &mut TcpStream, limit: Duration| {
        stream.set_read_timeout(Some(limit)).unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 256];
        // EOF or a reset: the server closed it (a timeout error would mean it is still open).
        match stream.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "unexpected answer: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "still open after {limit:?}"
            ),
        }
        started.elapsed()
    };
    // Half-sent headers, and a connection that sends nothing.
    let mut half = TcpStream::connect(&address).unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut idle = TcpStream::connect(&address).unwrap();
    assert!(closed_within(&mut half, Duration::from_secs(5)) < Duration::from_secs(5));
    assert!(closed_within(&mut idle, Duration::from_secs(5)) < Duration::from_secs(5));

    // Three idle connections fill the cap: a fourth is closed at once, and /health answers once they time out.
    // (On a server whose header timeout is longer, so that a busy machine's scheduling delay cannot let one of
    // the three time out before the fourth arrives.)
    let crowded_dir = tempfile::tempdir().unwrap();
    let crowded = start_default(
        &crowded_dir,
        &["--header-timeout-secs", "5", "--max-connections", "3"],
    );
    let crowded_address = crowded.base.trim_start_matches("http://").to_string();
    // The server frees the slot of the connection its readiness check used only once it has seen that close,
    // which a busy machine can delay: a crowd member closed at once means "not yet", so the crowd is made again
    // until the server holds all three open.
    let still_open = |stream: &mut TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        matches!(stream.read(&mut [0u8; 1]), Err(e) if matches!(e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    };
    let mut attempts = 0;
    let mut crowd: Vec<TcpStream> = loop {
        attempts += 1;
        assert!(
            attempts <= 20,
            "the server never held three idle connections"
        );
        let mut crowd: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(&crowded_address).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        if crowd.iter_mut().all(still_open) {
            break crowd;
        }
        drop(crowd);
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut extra = TcpStream::connect(&crowded_address).unwrap();
    let _ = extra.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(closed_within(&mut extra, Duration::from_secs(5)) < Duration::from_millis(900));
    for c in &mut crowd {
        closed_within(c, Duration::from_secs(10));
    }
    let (status, _) = crowded.get("/health");
    assert_eq!(status, 200);

    // A body that stops arriving: answered in the API's error shape once --body-timeout-secs has passed, not
    // held open.
    let mut slow = TcpStream::connect(&address).unwrap();
    slow.write_all(
        b"POST /api/v6/images/img2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"key\": ",
    )
    .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a stalled body held the connection for {:?}",
        started.elapsed()
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.contains(r#""status":"error""#) && answer.contains("body could not be read"),
        "{answer}"
    );
}

/// Reads a Server-Sent Events stream to its end: (event, data as JSON) in order.
fn read_events(url: &str) -> Vec<(String, Value)> {
    use std::io::BufRead;
    let response = ureq::get(url)
        .timeout(Duration::from_secs(120))
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(response.header("Content-Type"), Some("text/event-stream"));
    let mut events = Vec::new();
    let mut name = String::new();
    for line in std::io::BufReader::new(response.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            events.push((name.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    events
}

/// The progress stream: ordered steps of the running job, then `done` with the fetch body, then the stream
/// closes; another key gets the API's error. Per-job cancel: a queued job never runs, a running one stops
/// within a step, both then fetch as failed "Cancelled"; another key cannot cancel; the next job is still right.
#[test]
fn progress_streams_and_jobs_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start();
    let server = start_default(
        &dir,
        &[
            "--sync-timeout",
            "0",
            "--debug-step-delay-ms",
            "150",
            "--api-key",
            "other-key",
            "--allow-private-urls",
        ],
    );
    let reference = case("t2i-sd1-euler-s7");
    let body = body_for(&reference, json!({"model_id": "sd1-tiny"}));
    let (_, queued) = server.post("/api/v6/images/text2img", &body);
    let id = queued["id"].as_i64().unwrap();

    // Another key sees nothing.
    let (status, err) = support::get(&format!(
        "{}/api/v1/jobs/{id}/events?key=other-key",
        server.base
    ));
    assert_eq!(status, 200);
    let err: Value = serde_json::from_slice(&err).unwrap();
    assert_eq!(err["status"], "error", "{err}");

    let events = read_events(&format!(
        "{}/api/v1/jobs/{id}/events?key={KEY}",
        server.base
    ));
    let (last, progress) = events.split_last().unwrap();
    assert_eq!(last.0, "done", "{events:?}");
    assert_eq!(last.1["status"], "success", "{events:?}");
    assert_outputs_match(&server, last.1["output"].as_array().unwrap(), &reference);
    let steps: Vec<i64> = progress
        .iter()
        .filter(|(e, d)| e == "progress" && d["status"] == "running")
        .map(|(_, d)| d["step"].as_i64().unwrap())
        .collect();
    assert!(steps.len() >= 3, "few progress events: {events:?}");
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "steps out of order: {steps:?}"
    );
    assert!(progress
        .iter()
        .all(|(_, d)| d["steps"].as_i64().unwrap() <= 8 && d["eta"].is_number()));

    // Cancel: one running, one queued behind it.
    let (_, running) = server.post("/api/v6/images/text2img", &body);
    let mut hooked = body.clone();
    hooked["webhook"] = json!(format!("{}/cancelled", receiver.base));
    hooked["track_id"] = json!("t-1");
    let (_, waiting) = server.post("/api/v6/images/text2img", &hooked);
    let (running, waiting) = (
        running["id"].as_i64().unwrap(),
        waiting["id"].as_i64().unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, f) = server.post(
            &format!("/api/v6/images/fetch/{running}"),
            &json!({"key": KEY}),
        );
        if f["step"].as_i64().unwrap_or(0) >= 1 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, refused) = server.post(
        &format!("/api/v1/jobs/{waiting}/cancel"),
        &json!({"key": "other-key"}),
    );
    assert_eq!(refused["status"], "error", "{refused}");
    let (_, c) = server.post(
        &format!("/api/v1/jobs/{waiting}/cancel"),
        &json!({"key": KEY}),
    );
    assert_eq!(
        (c["status"].as_str(), c["state"].as_str()),
        (Some("success"), Some("dequeued")),
        "{c}"
    );
    let (_, c) = server.post(
        &format!("/api/v1/jobs/{running}/cancel"),
        &json!({"key": KEY}),
    );
    assert_eq!(c["state"], "stopping", "{c}");
    for id in [running, waiting] {
        let done = server.wait_for(
            &format!("{}/api/v6/images/fetch/{id}", server.base),
            Duration::from_secs(60),
        );
        assert_eq!(done["status"], "failed", "{done}");
        assert_eq!(done["message"], "Cancelled", "{done}");
    }
    // The cancelled job's webhook says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while receiver.posts_to("/cancelled").is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let hook = &receiver.posts_to("/cancelled")[0].json;
    assert_eq!(
        (&hook["status"], &hook["message"], &hook["track_id"]),
        (&json!("failed"), &json!("Cancelled"), &json!("t-1")),
        "{hook}"
    );
    let (_, again) = server.post(
        &format!("/api/v1/jobs/{running}/cancel"),
        &json!({"key": KEY}),
    );
    assert_eq!(again["state"], "finished", "{again}");
    let (_, metrics) = server.get("/metrics");
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains(r#"pictor_job_cancels_total{result="dequeued"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"pictor_job_cancels_total{result="stopping"} 1"#),
        "{metrics}"
    );

    // The next job runs and is right.
    let (_, next) = server.post("/api/v6/images/text2img", &body);
    let done = server.wait_for(
        next["fetch_result"].as_str().unwrap(),
        Duration::from_secs(60),
    );
    assert_eq!(done["status"], "success", "{done}");
    assert_outputs_match(&server, done["output"].as_array().unwrap(), &reference);
}

/// A client that lost the answer and sends its request again gets the first job, not a second one: with an
/// `Idempotency-Key` header, or with the same body (same `track_id`); the same track_id on another body is a new
/// request. The queue limit does not refuse a retry.
#[test]
fn retries_answer_the_first_job() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &["--sync-timeout", "0", "--max-queued-per-key", "2"]);
    let reference = case("t2i-sd1-euler-s7");
    let body = body_for(&reference, json!({"model_id": "sd1-tiny"}));
    let url = format!("{}/api/v6/images/text2img", server.base);
    let with_key =
        |key: &str| support::post_json_with(&url, &body, &[("Idempotency-Key", key.to_string())]).1;
    let first = with_key("order-17");
    let again = with_key("order-17");
    assert_eq!(first["status"], "processing", "{first}");
    assert_eq!(again["id"], first["id"], "{again}");
    assert_eq!(again["meta"]["file_prefix"], first["meta"]["file_prefix"]);
    let other = with_key("order-18");
    assert_ne!(other["id"], first["id"]);
    // The queue (limit 2) is full now, but a retry is still answered with its job.
    assert_eq!(with_key("order-18")["id"], other["id"]);
    let (status, full) =
        support::post_json_with(&url, &body, &[("Idempotency-Key", "order-19".into())]);
    assert_eq!(status, 429, "{full}");

    // The same body with a track_id, sent twice; then the same track_id with another prompt.
    for id in [&first["id"], &other["id"]] {
        let done = server.wait_for(
            &format!("{}/api/v6/images/fetch/{id}", server.base),
            Duration::from_secs(60),
        );
        assert_eq!(done["status"], "success", "{done}");
    }
    let mut tracked = body.clone();
    tracked["track_id"] = json!("t-9");
    let (_, a) = server.post("/api/v6/images/text2img", &tracked);
    let (_, b) = server.post("/api/v6/images/text2img", &tracked);
    assert_eq!(a["id"], b["id"], "{a} {b}");
    tracked["prompt"] = json!("a dog");
    let (_, c) = server.post("/api/v6/images/text2img", &tracked);
    assert_ne!(c["id"], a["id"], "{c}");
    let (status, bad) =
        support::post_json_with(&url, &body, &[("Idempotency-Key", "x".repeat(300))]);
    assert_eq!(status, 200);
    assert_eq!(bad["status"], "error", "{bad}");
}

/// Found while hardening against the OpenAPI document (scripts/schema_check.sh): axum's own extractors answered
/// a path id that is not UTF-8 text and a `?key=` given twice with a plain-text 400, and an OpenAI edit over the
/// body limit with "Error parsing `multipart/form-data` request". Each now answers in its dialect's error shape
/// with words a client can act on. The over-limit edit is 16 MiB, far beyond what socket buffers hold: the
/// server drains it before answering, so the client reads the 400 instead of a broken pipe.
#[test]
fn unreadable_ids_queries_and_forms_answer_in_the_api_shape() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_default(&dir, &["--sync-timeout", "0", "--max-body-mib", "1"]);
    let as_json = |bytes: Vec<u8>| -> Value {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&bytes)))
    };

    for path in [
        format!("/api/v1/options?key={KEY}&key=other"),
        format!("/api/v1/jobs/1/events?key={KEY}&key=other"),
    ] {
        let (status, body) = server.get(&path);
        let body = as_json(body);
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["status"], "error", "{path}: {body}");
        assert!(body["errors"]["key"].is_array(), "{path}: {body}");
    }

    let (status, body) = server.get("/api/v1/jobs/%FF/events");
    let body = as_json(body);
    assert_eq!((status, &body["status"]), (200, &json!("error")), "{body}");
    assert!(body["errors"]["id"].is_array(), "{body}");
    for (path, field) in [
        ("/api/v1/jobs/%FF/cancel", "id"),
        ("/api/v3/fetch/%FF", "request_id"),
        ("/api/v6/images/fetch/%C3%28", "request_id"),
    ] {
        let (status, body) = server.post(path, &json!({"key": KEY}));
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["status"], "error", "{path}: {body}");
        assert!(body["errors"][field].is_array(), "{path}: {body}");
    }

    let edit = |body: Vec<u8>| -> (u16, Value) {
        let result = ureq::post(&format!("{}/v1/images/edits", server.base))
            .set("Authorization", &format!("Bearer {KEY}"))
            .set("Content-Type", "multipart/form-data; boundary=XYZ")
            .timeout(Duration::from_secs(60))
            .send_bytes(&body);
        let response = match result {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let status = response.status();
        (
            status,
            serde_json::from_str(&response.into_string().unwrap()).unwrap(),
        )
    };
    let mut big =
        b"--XYZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
            .to_vec();
    big.extend(std::iter::repeat_n(b'x', 16 << 20));
    big.extend(b"\r\n--XYZ--\r\n");
    let (status, body) = edit(big);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 MiB limit"),
        "{body}"
    );
    let (status, body) =
        edit(b"--XYZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nabc".to_vec());
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("incomplete"), "{body}");
    assert!(!server.log().contains("ERROR"), "{}", server.log());
}
