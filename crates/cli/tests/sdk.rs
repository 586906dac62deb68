//! ModelsLab's own Python SDK (`modelslab_py` 0.2.3, from PyPI) pointed at the real `pictor serve`: img2img
//! through its v6 images, enterprise images, v6 realtime and enterprise realtime APIs, and its own `fetch`.
//!
//! The SDK is installed into `<workspace>/target/sdk-venv` on first use (`python3 -m venv`, then pip). Python or
//! pip failing makes the test fail: it never passes without having run the SDK.
//!
//! The SDK's calls are made by `sdk_client.py`, which writes everything the SDK got back (and every HTTP call it
//! made) to a JSON file that this test checks.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{Server, KEY};

/// The SDK release under test.
const SDK: &str = "modelslab_py==0.2.3";
/// What the SDK imports but does not declare as a dependency (0.2.3's metadata lists only pydantic).
const UNDECLARED_DEPENDENCIES: &[&str] = &["requests"];

/// One of the SDK's image APIs as the script names it, with what it must have called and produced.
struct Api {
    /// Key in the script's output.
    name: &'static str,
    /// Route the SDK posts img2img to.
    submit_path: &'static str,
    /// Route the SDK's `fetch` posts to (id appended).
    fetch_path: &'static str,
    /// Scheduler that must have run.
    scheduler: &'static str,
    /// Fixture the image must match.
    expected: &'static str,
}

/// v6 and enterprise images send the case's scheduler (DDIM); the realtime schemas have no scheduler field, so
/// the model's own (PNDM) runs, which is case `sd1-pndm-s42` — the same request otherwise.
const APIS: &[Api] = &[
    Api {
        name: "v6_images",
        submit_path: "/api/v6/images/img2img",
        fetch_path: "/api/v6/images/fetch/",
        scheduler: "DDIMScheduler",
        expected: "cases/sd1-ddim-s42/0.png",
    },
    Api {
        name: "enterprise_images",
        submit_path: "/api/v1/enterprise/images/img2img",
        fetch_path: "/api/v1/enterprise/images/fetch/",
        scheduler: "DDIMScheduler",
        expected: "cases/sd1-ddim-s42/0.png",
    },
    Api {
        name: "v6_realtime",
        submit_path: "/api/v6/realtime/img2img",
        fetch_path: "/api/v6/realtime/fetch/",
        scheduler: "PNDMScheduler",
        expected: "cases/sd1-pndm-s42/0.png",
    },
    Api {
        name: "enterprise_realtime",
        submit_path: "/api/v1/enterprise/realtime/img2img",
        fetch_path: "/api/v1/enterprise/realtime/fetch/",
        scheduler: "PNDMScheduler",
        expected: "cases/sd1-pndm-s42/0.png",
    },
];

/// The venv's Python with the SDK installed, made on first use.
fn sdk_python() -> PathBuf {
    let check = "import importlib.metadata as m, modelslab_py, requests\n\
                 assert m.version('modelslab_py') == '0.2.3', m.version('modelslab_py')";
    let mut packages = vec![SDK];
    packages.extend_from_slice(UNDECLARED_DEPENDENCIES);
    support::python_venv("sdk-venv", &packages, check)
}

/// Runs `sdk_client.py` against `server`; returns what it wrote.
fn run_sdk(python: &Path, server: &Server, dir: &Path) -> Value {
    let init = dir.join("init-64.b64");
    std::fs::write(&init, support::fixture_base64("init-64.png")).unwrap();
    let out = dir.join("sdk-out.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk_client.py");
    let output = Command::new(python)
        .arg(&script)
        .arg(&server.base)
        .arg(KEY)
        .arg(&init)
        .arg(&out)
        .output()
        .expect("the SDK script starts");
    assert!(
        output.status.success(),
        "sdk_client.py failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- server log\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
    let text = std::fs::read_to_string(&out).expect("sdk_client.py wrote its output");
    serde_json::from_str(&text).expect("sdk_client.py wrote JSON")
}

/// The single output URL of a success body.
fn output_url(body: &Value, context: &str) -> String {
    let output = body["output"]
        .as_array()
        .unwrap_or_else(|| panic!("{context}: output is not a list: {body}"));
    assert_eq!(output.len(), 1, "{context}: {body}");
    output[0]
        .as_str()
        .expect("output URLs are strings")
        .to_string()
}

/// What every SDK result must show, queued or not: the URLs the SDK called, the finished job's meta, the
/// image. Returns the statuses the SDK's `fetch` polls got.
fn check_api(server: &Server, api: &Api, entry: &Value, queued: bool) -> Vec<String> {
    let name = api.name;
    for error in ["submit_error", "fetch_error"] {
        assert!(
            entry.get(error).is_none(),
            "{name}: the SDK raised:\n{}\n--- server log\n{}",
            entry[error].as_str().unwrap_or_default(),
            server.log()
        );
    }
    let submit = &entry["submit"];
    let fetched = &entry["fetch"];
    let context = format!("{name} (queued: {queued})\nsubmit: {submit}\nfetch: {fetched}");

    let submit_calls = entry["submit_calls"].as_array().unwrap();
    assert_eq!(submit_calls.len(), 1, "{context}");
    assert_eq!(
        submit_calls[0]["url"],
        format!("{}{}", server.base, api.submit_path),
        "{context}"
    );

    let id = submit["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("{context}: no numeric id"));
    let fetch_url = format!("{}{}{id}", server.base, api.fetch_path);
    let fetch_calls = entry["fetch_calls"].as_array().unwrap();
    assert!(!fetch_calls.is_empty(), "{context}");
    for call in fetch_calls {
        assert_eq!(call["url"], fetch_url, "{context}");
    }
    let polls: Vec<String> = fetch_calls
        .iter()
        .map(|c| c["status"].as_str().unwrap_or("?").to_string())
        .collect();
    let (last, before) = polls.split_last().unwrap();
    assert_eq!(last, "success", "{context}\npolls: {polls:?}");
    assert!(
        before.iter().all(|s| s == "processing"),
        "{context}\npolls: {polls:?}"
    );

    assert_eq!(fetched["status"], "success", "{context}");
    assert_eq!(fetched["id"], id, "{context}");
    let url = output_url(fetched, &context);
    if queued {
        assert_eq!(submit["status"], "processing", "{context}");
        assert!(
            submit["fetch_result"]
                .as_str()
                .is_some_and(|u| u.ends_with(&format!("/fetch/{id}"))),
            "{context}"
        );
        assert_eq!(
            submit["future_links"],
            serde_json::json!([url]),
            "{context}"
        );
    } else {
        assert_eq!(submit["status"], "success", "{context}");
        assert_eq!(output_url(submit, &context), url, "{context}");
        assert_eq!(polls, ["success"], "{context}");
    }

    let meta = &fetched["meta"];
    assert_eq!(meta["model_id"], "sd1-tiny", "{context}");
    assert_eq!(meta["scheduler"], api.scheduler, "{context}");
    assert_eq!(meta["seed"], 42, "{context}");
    assert_eq!(meta["steps"], 10, "{context}");
    assert_eq!(meta["strength"], 0.75, "{context}");
    assert_eq!(meta["guidance_scale"], 7.5, "{context}");
    assert_eq!(
        meta["prompt"], r"a photo of a cat, \(\(cinematic lighting\)\)",
        "{context}"
    );
    assert_eq!(meta["negative_prompt"], "blurry", "{context}");

    let (status, png) = support::get(&url);
    assert_eq!(status, 200, "{context}: GET {url}");
    support::assert_image_matches(&png, api.expected);
    polls
}

/// The SDK's `text_to_image` through the same four APIs: the route it called, and the fetched image equal to
/// diffusers' text-to-image for the settings sent (DDIM on v6 / enterprise images, the model's own PNDM on the
/// realtime APIs, whose schema has no scheduler).
fn check_text2img(server: &Server, out: &Value) {
    for api in APIS {
        let name = format!("{}_text2img", api.name);
        let entry = &out["results"][&name];
        for error in ["submit_error", "fetch_error"] {
            assert!(
                entry.get(error).is_none(),
                "{name}: the SDK raised:\n{}\n--- server log\n{}",
                entry[error].as_str().unwrap_or_default(),
                server.log()
            );
        }
        let path = api.submit_path.replace("img2img", "text2img");
        assert_eq!(
            entry["submit_calls"][0]["url"],
            format!("{}{path}", server.base),
            "{name}: {entry}"
        );
        let fetched = &entry["fetch"];
        assert_eq!(fetched["status"], "success", "{name}: {entry}");
        assert!(
            fetched["meta"].get("init_image").is_none(),
            "{name}: {fetched}"
        );
        let expected = if api.scheduler == "DDIMScheduler" {
            "txt2img/cases/t2i-sd1-ddim-s42/0.png"
        } else {
            "txt2img/cases/t2i-sd1-pndm-s42/0.png"
        };
        let (status, png) = support::get(&output_url(fetched, &name));
        assert_eq!(status, 200, "{name}");
        support::assert_image_matches(&png, expected);
    }
}

#[test]
fn modelslab_python_sdk_runs_img2img_and_fetch() {
    let python = sdk_python();
    let tmp = tempfile::tempdir().unwrap();

    // A waiting server: every API answers success at once; `fetch` of the finished job answers success.
    {
        let server = Server::start(&tmp.path().join("sync"), &["--default-model", "sd1-tiny"]);
        let out = run_sdk(&python, &server, tmp.path());
        assert_eq!(out["base_url"], format!("{}/api/", server.base));
        for api in APIS {
            check_api(&server, api, &out["results"][api.name], false);
        }
        check_text2img(&server, &out);
    }

    // A queueing server: every API answers processing; the SDK's own `fetch` polls until success.
    let server = Server::start(
        &tmp.path().join("queued"),
        &["--default-model", "sd1-tiny", "--sync-timeout", "0"],
    );
    let out = run_sdk(&python, &server, tmp.path());
    let mut saw_processing = false;
    for api in APIS {
        let polls = check_api(&server, api, &out["results"][api.name], true);
        saw_processing |= polls.len() > 1;
    }
    check_text2img(&server, &out);
    assert!(
        saw_processing,
        "no fetch poll answered processing, so the SDK's retry loop was not exercised: {out}"
    );
}
