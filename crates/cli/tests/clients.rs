//! Clients nobody here wrote, installed from PyPI, pointed at the real `pictor serve`: `webuiapi` (the
//! AUTOMATIC1111 API client) and the official `openai` SDK (the OpenAI Images API). Each is installed into `<workspace>/target/<name>-venv` on first use; Python or pip
//! failing makes the test fail, it never passes without having run the client.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use support::{assert_image_matches, body_for, case, fixtures, Server, KEY};

/// Runs `script` with `python` against `server`; returns what it wrote to `out/out.json`.
fn run_client(python: &Path, script: &str, server: &Server, args: &[&str], out: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let output = Command::new(python)
        .arg(&script)
        .arg(&server.base)
        .arg(KEY)
        .args(args)
        .arg(out)
        .output()
        .expect("the client script starts");
    assert!(
        output.status.success(),
        "{} failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- server log\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
    let text = std::fs::read_to_string(out.join("out.json")).expect("the script wrote out.json");
    serde_json::from_str(&text).expect("out.json is JSON")
}

/// A server on the fixture models (`--default-model default_model`) and what `script` (run with a venv holding
/// `package`, checked by `check`) wrote against it, given the init image's path; the temporary folder lives as
/// long as the server.
fn run_python_client(
    venv: &str,
    package: &str,
    check: &str,
    script: &str,
    default_model: &str,
) -> (Server, Value, tempfile::TempDir) {
    let python = support::python_venv(venv, &[package], check);
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &["--default-model", default_model],
    );
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let init = fixtures().join("init-64.png");
    let out = run_client(
        &python,
        script,
        &server,
        &[init.to_str().unwrap()],
        &out_dir,
    );
    no_errors(&out, &server);
    (server, out, tmp)
}

fn no_errors(out: &Value, server: &Server) {
    for (k, v) in out.as_object().unwrap() {
        assert!(
            !k.ends_with("_error"),
            "{k}:\n{}\n--- server log\n{}",
            v.as_str().unwrap_or_default(),
            server.log()
        );
    }
}

fn image_at(out: &Value, name: &str, i: usize) -> Vec<u8> {
    let path = out[name]["images"][i]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: no image {i}: {out}"));
    std::fs::read(path).unwrap()
}

/// webuiapi 0.9.17: Basic auth with the key, model listing and switching through options, txt2img and img2img
/// equal to diffusers for the same settings (so equal to the ModelsLab routes, checked here too), a batch with
/// A1111's seed-per-image rule, progress, interrupt, and a sampler Pictor lacks refused in FastAPI's shape.
#[test]
fn webuiapi_drives_the_automatic1111_api() {
    let (server, out, _tmp) = run_python_client(
        "webuiapi-venv",
        "webuiapi==0.9.17",
        "import importlib.metadata as m, webuiapi\nassert m.version('webuiapi') == '0.9.17'",
        "webuiapi_client.py",
        "sd2-tiny",
    );

    let models = out["models"].as_array().unwrap();
    assert!(
        models.contains(&json!("sd1-tiny")) && models.contains(&json!("sdxl-tiny")),
        "{out}"
    );
    assert_eq!(out["current_model"], "sd1-tiny");
    assert_eq!(out["switched_model"], "sd2-tiny");
    let samplers = out["samplers"].as_array().unwrap();
    for name in ["Euler a", "DPM++ 2M", "DDIM", "UniPC"] {
        assert!(samplers.contains(&json!(name)), "{name}: {samplers:?}");
    }
    assert!(out["schedulers"]
        .as_array()
        .unwrap()
        .contains(&json!("karras")));
    assert!(
        out["loras"]
            .as_array()
            .unwrap()
            .contains(&json!("tiny-kohya")),
        "{out}"
    );

    // txt2img (Euler, uniform) and img2img (DDIM) equal diffusers' images for those settings.
    assert_image_matches(
        &image_at(&out, "txt2img", 0),
        "txt2img/cases/t2i-sd1-euler-s7/0.png",
    );
    assert_image_matches(&image_at(&out, "img2img", 0), "cases/sd1-ddim-s42/0.png");
    assert_image_matches(
        &image_at(&out, "sd2", 0),
        "txt2img/cases/t2i-sd2-ddim-s5/0.png",
    );
    let info = &out["txt2img"]["info"];
    assert_eq!(info["seed"], 7, "{info}");
    assert_eq!(info["sampler_name"], "Euler", "{info}");
    assert_eq!(info["sd_model_name"], "sd1-tiny", "{info}");
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(
        infotext.contains("Negative prompt: blurry")
            && infotext.contains("Steps: 8, Sampler: Euler, Schedule type: Uniform, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: sd1-tiny"),
        "{infotext}"
    );
    assert_eq!(out["img2img"]["info"]["denoising_strength"], 0.75);

    // A batch of two: A1111 gives image i the seed + i; the first is the single image above.
    assert_eq!(out["batch"]["info"]["all_seeds"], json!([7, 8]));
    assert_eq!(
        image_at(&out, "batch", 0),
        image_at(&out, "txt2img", 0),
        "the first image of the batch is seed 7's"
    );
    assert_ne!(image_at(&out, "batch", 1), image_at(&out, "batch", 0));

    // The same settings on the ModelsLab route give the same image.
    let reference = case("t2i-sd1-euler-s7");
    let (status, answer) = server.post(
        "/api/v6/images/text2img",
        &body_for(&reference, json!({"model_id": "sd1-tiny"})),
    );
    assert_eq!(status, 200, "{answer}");
    let (_, png) = server.get(answer["output"][0].as_str().unwrap());
    assert_eq!(
        image::load_from_memory(&png).unwrap().to_rgb8(),
        image::load_from_memory(&image_at(&out, "txt2img", 0))
            .unwrap()
            .to_rgb8(),
        "webuiapi's txt2img and the ModelsLab text2img route differ"
    );

    assert_eq!(out["progress"]["state"]["job_count"], 0, "{out}");
    assert_eq!(out["bad_sampler"]["status"], 422, "{out}");
    let detail = &out["bad_sampler"]["body"]["detail"][0];
    assert_eq!(detail["loc"], json!(["body", "sampler_name"]), "{out}");
    assert!(
        detail["msg"].as_str().unwrap().contains("DPM++ 2S a"),
        "{out}"
    );
}

/// Without the key the A1111 routes answer 401 with `WWW-Authenticate: Basic`, as A1111's `--api-auth` does;
/// bad bodies get FastAPI's 422 shape, also when the fault shows only when the job runs.
#[test]
fn automatic1111_api_refuses_in_its_own_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &["--default-model", "sd1-tiny"]);
    let (status, body) = support::post_json(
        &format!("{}/sdapi/v1/txt2img", server.base),
        &json!({"prompt": "a cat"}),
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["detail"], "Incorrect username or password");
    let (status, body) = server.post("/sdapi/v1/txt2img", &json!({"key": KEY, "prompt": "a"}));
    assert_eq!(
        status, 401,
        "the key goes in Authorization, not the body: {body}"
    );

    let bearer = |path: &str, body: Value| {
        support::post_json_with(
            &format!("{}{path}", server.base),
            &body,
            &[("Authorization", format!("Bearer {KEY}"))],
        )
    };
    for (body, field) in [
        (json!({"prompt": "a", "width": 5000}), "width"),
        (json!({"prompt": "a", "steps": 0}), "steps"),
        (json!({"prompt": "a", "enable_hr": true}), "enable_hr"),
        (
            json!({"prompt": "a", "override_settings": {"sd_model_checkpoint": "nope"}}),
            "sd_model_checkpoint",
        ),
    ] {
        let (status, answer) = bearer("/sdapi/v1/txt2img", body.clone());
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(answer["detail"][0]["loc"][1], field, "{body}: {answer}");
    }
    let (status, answer) = bearer("/sdapi/v1/img2img", json!({"prompt": "a"}));
    assert_eq!(
        (status, &answer["detail"][0]["loc"][1]),
        (422, &json!("init_images")),
        "{answer}"
    );
    let (status, answer) = bearer("/sdapi/v1/options", json!({"sd_model_checkpoint": "nope"}));
    assert_eq!(status, 422, "{answer}");
    // Found only when the job runs (the refiner was not loaded when the request came): still the requester's
    // fault, in the dialect's shape, never a 500. OpenAI's shape likewise.
    let refiner = json!({"prompt": "a", "width": 64, "height": 64, "steps": 2,
                         "override_settings": {"sd_model_checkpoint": "sdxl-refiner-tiny"}});
    let (status, answer) = bearer("/sdapi/v1/txt2img", refiner);
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["detail"][0]["loc"][1], "model_id", "{answer}");
    assert!(
        answer["detail"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("refiner"),
        "{answer}"
    );
    let (status, answer) = bearer(
        "/v1/images/generations",
        json!({"prompt": "a", "model": "sdxl-refiner-tiny", "size": "64x64", "num_inference_steps": 2}),
    );
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "model_id", "{answer}");
}

/// The official `openai` SDK 3.63: `images.generate` (both response formats) equal to diffusers' text-to-image,
/// `images.edit` as img2img and, with an InstructPix2Pix model, as pix2pix, `models.list`, and the SDK's own
/// exceptions for a mask, a bad size and a wrong key (OpenAI's error shape).
#[test]
fn openai_sdk_drives_the_images_api() {
    let (server, out, _tmp) = run_python_client(
        "openai-venv",
        "openai==3.63.0",
        "import importlib.metadata as m, openai\nassert m.version('openai') == '3.63.0'",
        "openai_client.py",
        "sd1-tiny",
    );

    let models = out["models"].as_array().unwrap();
    assert!(
        models.contains(&json!("sd1-tiny")) && models.contains(&json!("pix2pix-tiny")),
        "{out}"
    );
    for name in ["generate_b64", "generate_url"] {
        assert_image_matches(
            &image_at(&out, name, 0),
            "txt2img/cases/t2i-sd1-pndm-s42/0.png",
        );
        assert_eq!(out[name]["size"], "64x64", "{out}");
        assert!(
            out[name]["created"].as_i64().unwrap() > 1_700_000_000,
            "{out}"
        );
    }
    assert!(out["generate_url"]["urls"][0]
        .as_str()
        .unwrap()
        .starts_with(&server.base));
    assert_image_matches(&image_at(&out, "edit_b64", 0), "cases/sd1-pndm-s42/0.png");
    assert_image_matches(
        &image_at(&out, "edit_pix2pix", 0),
        "cases/p2p-eulera-s3/0.png",
    );

    assert_eq!(out["mask"]["status"], 400, "{out}");
    assert_eq!(out["mask"]["class"], "BadRequestError", "{out}");
    assert_eq!(out["mask"]["body"]["param"], "mask", "{out}");
    assert_eq!(out["bad_size"]["status"], 400, "{out}");
    assert_eq!(out["bad_size"]["body"]["param"], "size", "{out}");
    assert_eq!(out["wrong_key"]["status"], 401, "{out}");
    assert_eq!(out["wrong_key"]["class"], "AuthenticationError", "{out}");
    assert_eq!(out["wrong_key"]["body"]["code"], "invalid_api_key", "{out}");
}

/// Runs ModelsLab's own CLI (`modelslab`, from the `modelslab-cli` wheel) against `server` with `args`; its
/// JSON output.
fn modelslab(cli: &Path, server: &Server, home: &Path, args: &[&str]) -> Value {
    let output = Command::new(cli)
        .env("HOME", home)
        .current_dir(home)
        .args([
            "--base-url",
            &server.base,
            "--api-key",
            KEY,
            "--no-update-check",
            "-o",
            "json",
        ])
        .args(args)
        .output()
        .expect("modelslab starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "modelslab {args:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}\n--- server log\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
    // The JSON object is printed first; download notes may follow.
    let start = stdout
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from modelslab {args:?}: {stdout}"));
    let mut values = serde_json::Deserializer::from_str(&stdout[start..]).into_iter::<Value>();
    values
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no JSON from modelslab {args:?}: {stdout}"))
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The PNG files `modelslab` downloaded into `dir`.
fn downloads(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// ModelsLab's own CLI, `modelslab-cli` 0.2.2, on the v7 routes: `generate image` (text-to-image equal to
/// diffusers), waiting and with `--no-wait` then `generate fetch`, on a server that queues every job; and
/// `generate image-to-image` of that image by its URL.
#[test]
fn modelslab_cli_generates_on_the_v7_routes() {
    let python = support::python_venv(
        "modelslab-cli-venv",
        &["modelslab-cli==0.2.2"],
        "import importlib.metadata as m\nassert m.version('modelslab-cli') == '0.2.2'",
    );
    let cli = python.parent().unwrap().join("modelslab");
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &[
            "--default-model",
            "sd1-tiny",
            "--sync-timeout",
            "0",
            "--allow-private-urls",
        ],
    );
    // Case t2i-sd1-ddim-s42 (DDIM ignores the Karras default).
    let prompt = r"a photo of a cat, \(\(cinematic lighting\)\)";
    let image_args = |dir: &str| -> Vec<String> {
        [
            "generate",
            "image",
            "--prompt",
            prompt,
            "--negative-prompt",
            "blurry",
            "--model",
            "sd1-tiny",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "42",
            "--steps",
            "8",
            "--guidance",
            "7.5",
            "--scheduler",
            "DDIMScheduler",
            "--output-dir",
            dir,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // Waiting: the CLI polls /api/v7/images/fetch/{id} until success, then downloads.
    let waited_dir = home.join("waited");
    let args = image_args(waited_dir.to_str().unwrap());
    let done = modelslab(&cli, &server, &home, &strs(&args));
    assert_eq!(done["status"], "success", "{done}");
    let pngs = downloads(&waited_dir);
    assert_eq!(pngs.len(), 1, "{done}");
    assert_image_matches(&pngs[0], "txt2img/cases/t2i-sd1-ddim-s42/0.png");
    let url = done["output"][0].as_str().unwrap().to_string();
    assert!(url.starts_with(&server.base), "{done}");

    // --no-wait: processing with the id; `generate fetch --id` until it is done.
    let mut args = image_args(home.join("later").to_str().unwrap());
    args.push("--no-wait".into());
    let queued = modelslab(&cli, &server, &home, &strs(&args));
    assert_eq!(queued["status"], "processing", "{queued}");
    let id = queued["id"].to_string();
    let fetched_dir = home.join("fetched");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let fetched = loop {
        let f = modelslab(
            &cli,
            &server,
            &home,
            &[
                "generate",
                "fetch",
                "--id",
                &id,
                "--output-dir",
                fetched_dir.to_str().unwrap(),
            ],
        );
        if f["status"] != "processing" || std::time::Instant::now() > deadline {
            break f;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    assert_eq!(fetched["status"], "success", "{fetched}");
    assert_image_matches(
        &downloads(&fetched_dir)[0],
        "txt2img/cases/t2i-sd1-ddim-s42/0.png",
    );

    // image-to-image of the generated image, by its URL.
    let i2i_dir = home.join("i2i");
    let result = modelslab(
        &cli,
        &server,
        &home,
        &[
            "generate",
            "image-to-image",
            "--prompt",
            "a painting of a cat",
            "--model",
            "sd1-tiny",
            "--init-image",
            &url,
            "--strength",
            "0.5",
            "--output-dir",
            i2i_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(result["status"], "success", "{result}");
    assert_eq!(result["meta"]["init_image"], url, "{result}");
    let png = &downloads(&i2i_dir)[0];
    let image = image::load_from_memory(png).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64));
}
