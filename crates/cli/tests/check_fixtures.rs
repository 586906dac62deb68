//! `pictor check-fixtures` (hidden; what scripts/gpu_check.sh runs on a GPU from its packed folder) on the
//! CPU: cases of tests/fixtures pass within parity's float32 tolerance, a wrong reference fails with the
//! JSON still printed, and a GPU asked of a build or machine without one is refused cleanly.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::{fixtures, BIN};

fn pictor(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("PICTOR_LOG")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .expect("pictor runs")
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// Exit status 1 with an `error:` line: a refusal, not a panic.
fn assert_refused(o: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("error:") && stderr.contains(needle) && !stderr.contains("panicked"),
        "expected an error naming {needle:?}, got:\n{stderr}"
    );
}

#[test]
fn fixture_cases_pass_on_the_cpu_in_fp32() {
    let dir = fixtures();
    let o = pictor(&[
        "check-fixtures",
        dir.to_str().unwrap(),
        "--case",
        "sd1-ddim-s42",
        "--case",
        "kohya-0.8",
        "--json",
    ]);
    let report = json_of(&o);
    assert!(o.status.success(), "{report:#}");
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["precision"], "fp32");
    assert_eq!(report["pass"], true);
    assert_eq!(report["passed"], 2);
    let cases = report["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["sd1-ddim-s42", "kohya-0.8"]);
    for case in cases {
        assert_eq!(case["pass"], true, "{case:#}");
        let image = &case["images"][0];
        assert!(image["max_abs_diff"].as_u64().unwrap() <= 3, "{case:#}");
        assert!(image["mean_abs_diff"].as_f64().unwrap() <= 0.5, "{case:#}");
    }
}

/// A folder of the same layout whose one case names a reference that is not what the model draws (the
/// init image): the case fails, the JSON says so, and the exit status is 1.
#[test]
fn a_wrong_reference_fails_the_check() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    let mut case = cases
        .into_iter()
        .find(|c| c["name"] == "sd1-ddim-s42")
        .unwrap();
    case["images"] = serde_json::json!(["init-64.png"]);
    std::fs::write(
        root.join("cases.json"),
        serde_json::to_string(&[case]).unwrap(),
    )
    .unwrap();
    std::os::unix::fs::symlink(fixtures().join("models"), root.join("models")).unwrap();
    std::fs::copy(fixtures().join("init-64.png"), root.join("init-64.png")).unwrap();

    let o = pictor(&["check-fixtures", root.to_str().unwrap(), "--json"]);
    assert_refused(&o, "1 of 1 cases failed");
    let report = json_of(&o);
    assert_eq!(report["pass"], false);
    assert_eq!(report["failed"], 1);
    let image = &report["cases"][0]["images"][0];
    assert!(image["max_abs_diff"].as_u64().unwrap() > 3, "{report:#}");
    assert!(image["psnr_db"].as_f64().unwrap() < 35.0, "{report:#}");
}

#[test]
fn unknown_cases_and_folders_are_refused() {
    let dir = fixtures();
    let o = pictor(&["check-fixtures", dir.to_str().unwrap(), "--case", "nope"]);
    assert_refused(&o, "no case named nope");
    let o = pictor(&["check-fixtures", "/nonexistent-fixtures"]);
    assert_refused(&o, "no fixture cases found");
    assert!(!Path::new("/nonexistent-fixtures").exists());
}

/// Without the `cuda` feature, `--device cuda` says the build has no CUDA; it never falls back to the CPU.
#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "a cuda build's answer depends on the machine's GPU"
)]
fn a_gpu_that_is_not_there_is_refused() {
    let needle = "built without CUDA";
    let dir = fixtures();
    let o = pictor(&[
        "check-fixtures",
        dir.to_str().unwrap(),
        "--case",
        "sd1-ddim-s42",
        "--device",
        "cuda",
    ]);
    assert_refused(&o, needle);
    let o = pictor(&["bench", "--device", "cuda", "--precision", "fp16", "--json"]);
    assert_refused(&o, needle);
}
