//! Shared pieces of the service tests: starting the real `pictor serve` binary on loopback, a JSON client, a
//! tiny HTTP server that serves files and records what is POSTed to it (init image URLs, webhooks, model
//! downloads), and the image comparison the parity tests use.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use pictor_engine::prompt_syntax::escape;
use serde_json::{json, Value};

/// The `pictor` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pictor");
/// The ordinary key every test server accepts.
pub const KEY: &str = "test-key";
/// The admin key every test server accepts.
pub const ADMIN: &str = "test-admin";

/// The repository's `tests/fixtures` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .canonicalize()
        .expect("tests/fixtures exists")
}

/// A fixture file as base64.
pub fn fixture_base64(name: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(fixtures().join(name)).unwrap())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One reference case from `tests/fixtures/cases.json`, `sdxl/cases.json` or `txt2img/cases.json`.
pub fn case(name: &str) -> Value {
    ["cases.json", "sdxl/cases.json", "txt2img/cases.json"]
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(fixtures().join(file)).unwrap();
            serde_json::from_str::<Vec<Value>>(&text).unwrap()
        })
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// The API body that asks for `case` (init image as base64), merged with `extra`.
pub fn body_for(case: &Value, extra: Value) -> Value {
    let mut body = json!({
        "key": KEY,
        // diffusers took the fixture prompts literally; literal text is escaped text in Pictor's syntax.
        "prompt": escape(case["prompt"].as_str().unwrap()),
        "negative_prompt": case["negative_prompt"].as_str().map(escape),
        "width": case["width"].to_string(),
        "height": case["height"].to_string(),
        "samples": case["samples"].to_string(),
        "guidance_scale": case["guidance_scale"],
        "scheduler": case["scheduler"],
        "seed": case["seed"],
        "clip_skip": case["clip_skip"],
        "use_karras_sigmas": if case["use_karras_sigmas"] == true { "yes" } else { "no" },
        "enhance_prompt": "no",
        "tomesd": "no",
        "safety_checker": "no",
    });
    if let Some(image) = case["init_image"].as_str() {
        body["init_image"] = json!(fixture_base64(image));
    }
    if let Some(algorithm) = case["algorithm_type"].as_str() {
        body["algorithm_type"] = json!(algorithm);
    }
    match case["pipeline"].as_str().unwrap() {
        "pix2pix" => {
            body["steps"] = case["num_inference_steps"].clone();
            body["image_guidance_scale"] = case["image_guidance_scale"].clone();
        }
        "img2img" => {
            body["num_inference_steps"] = json!(case["num_inference_steps"].to_string());
            body["strength"] = case["strength"].clone();
        }
        _ => body["num_inference_steps"] = json!(case["num_inference_steps"].to_string()),
    }
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A running `pictor serve`; killed (SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The data folder (kept across restarts when reused).
    pub data_dir: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts `pictor serve` on a free port with the fixtures' models, keys [`KEY`] and [`ADMIN`], and `extra`
    /// flags; waits until `/health` answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_with_models(data_dir, &fixtures().join("models"), extra)
    }

    /// Like [`Server::start`] with another models folder.
    pub fn start_with_models(data_dir: &Path, models: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(data_dir, models, extra, &[])
    }

    /// Like [`Server::start_with_models`] with extra environment variables.
    pub fn start_with_env(
        data_dir: &Path,
        models: &Path,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Server {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        std::fs::create_dir_all(data_dir).unwrap();
        let log = data_dir.join(format!("server-{port}.log"));
        let child = Command::new(BIN)
            .args(["serve", "--listen", &listen, "--no-demo"])
            .arg("--models-dir")
            .arg(models)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--api-key", KEY, "--admin-key", ADMIN])
            .args(extra)
            .env_remove("PICTOR_API_KEYS")
            .env_remove("PICTOR_ADMIN_KEY")
            .env("PICTOR_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("pictor serve starts");
        let server = Server {
            child: Some(child),
            base: format!("http://{listen}"),
            data_dir: data_dir.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = ureq::get(&format!("{}/health", server.base)).call() {
                if r.status() == 200 {
                    return server;
                }
            }
            assert!(
                Instant::now() < deadline,
                "server did not become healthy:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// POSTs JSON to `path` (absolute URLs are used as they are).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        post_json(&url, body)
    }

    /// GETs `url` (absolute, or a path on this server).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        get(&url)
    }

    /// Polls a fetch URL until the job is no longer processing; returns the final body.
    pub fn wait_for(&self, fetch_url: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.post(fetch_url, &serde_json::json!({"key": KEY}));
            assert_eq!(status, 200, "{body}");
            if body["status"] != "processing" {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "job still processing after {timeout:?}: {body}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// POSTs a JSON body; returns the status and the parsed answer (`Value::Null` if not JSON).
pub fn post_json(url: &str, body: &Value) -> (u16, Value) {
    post_raw(url, body.to_string().into_bytes())
}

/// POSTs raw bytes as JSON.
pub fn post_raw(url: &str, body: Vec<u8>) -> (u16, Value) {
    post_raw_with(url, body, &[])
}

/// POSTs a JSON body with extra headers.
pub fn post_json_with(url: &str, body: &Value, headers: &[(&str, String)]) -> (u16, Value) {
    post_raw_with(url, body.to_string().into_bytes(), headers)
}

fn post_raw_with(url: &str, body: Vec<u8>, headers: &[(&str, String)]) -> (u16, Value) {
    let mut request = ureq::post(url)
        .set("Content-Type", "application/json")
        .timeout(Duration::from_secs(300));
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let result = request.send_bytes(&body);
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {url}: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// GETs a URL; returns the status and body.
pub fn get(url: &str) -> (u16, Vec<u8>) {
    let response = match ureq::get(url).timeout(Duration::from_secs(60)).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let status = response.status();
    let mut bytes = Vec::new();
    response.into_reader().read_to_end(&mut bytes).unwrap();
    (status, bytes)
}

/// A request the [`Receiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request path.
    pub path: String,
    /// Body as JSON (Null if not JSON).
    pub json: Value,
}

/// A tiny HTTP server on loopback: GET serves the registered files, POST records the body and answers with
/// the status registered for that path (200 by default).
#[derive(Clone)]
pub struct Receiver {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    statuses: Arc<Mutex<HashMap<String, u16>>>,
    /// Every POST so far.
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    /// Starts the server on a background thread.
    pub fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let receiver = Receiver {
            base: format!("http://{}", listener.local_addr().unwrap()),
            files: Default::default(),
            statuses: Default::default(),
            received: Default::default(),
        };
        let r = receiver.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let r = r.clone();
                std::thread::spawn(move || r.answer(stream));
            }
        });
        receiver
    }

    /// Serves `bytes` at `path`.
    pub fn serve_file(&self, path: &str, bytes: Vec<u8>) {
        self.files.lock().unwrap().insert(path.to_string(), bytes);
    }

    /// Answers POSTs to `path` with `status`.
    pub fn answer_with(&self, path: &str, status: u16) {
        self.statuses
            .lock()
            .unwrap()
            .insert(path.to_string(), status);
    }

    /// POSTs to `path` so far.
    pub fn posts_to(&self, path: &str) -> Vec<Received> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `n` POSTs reached `path`.
    pub fn wait_posts(&self, path: &str, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.posts_to(path);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "only {} POSTs to {path}",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn answer(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        let _ = reader.read_exact(&mut body);
        let (status, payload) = if method == "POST" {
            self.received.lock().unwrap().push(Received {
                path: path.clone(),
                json: serde_json::from_slice(&body).unwrap_or(Value::Null),
            });
            let status = *self.statuses.lock().unwrap().get(&path).unwrap_or(&200);
            (status, b"{}".to_vec())
        } else {
            match self.files.lock().unwrap().get(&path) {
                Some(b) => (200, b.clone()),
                None => (404, b"not found".to_vec()),
            }
        };
        let mut stream = stream;
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            payload.len()
        );
        let _ = stream.write_all(&payload);
    }
}

/// Asserts a PNG equals a fixture image within the parity tolerance (max |Δ| ≤ 3, mean |Δ| ≤ 0.5 per channel).
pub fn assert_image_matches(png: &[u8], fixture: &str) {
    let actual = image::load_from_memory(png)
        .expect("output is an image")
        .to_rgb8();
    let expected = image::open(fixtures().join(fixture)).unwrap().to_rgb8();
    assert_eq!(
        actual.dimensions(),
        expected.dimensions(),
        "{fixture}: size"
    );
    let mut max = 0i32;
    let mut sum = 0f64;
    for (a, b) in actual.as_raw().iter().zip(expected.as_raw()) {
        let d = (*a as i32 - *b as i32).abs();
        max = max.max(d);
        sum += d as f64;
    }
    let mean = sum / actual.as_raw().len() as f64;
    assert!(
        max <= 3 && mean <= 0.5,
        "{fixture}: max |Δ| {max}, mean {mean:.3}"
    );
}

/// Copies a folder tree (e.g. a fixture model into a test's own models folder).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A Python venv under `<workspace>/target/NAME` with `packages` installed from PyPI, made on first use (when
/// `check`, a Python snippet, does not run). Python or pip failing makes the calling test fail: a client test
/// never passes without having run the client.
pub fn python_venv(name: &str, packages: &[&str], check: &str) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root exists");
    let venv = workspace.join("target").join(name);
    let python = venv.join("bin").join("python");
    let works = |python: &Path| {
        python.exists()
            && Command::new(python)
                .args(["-c", check])
                .output()
                .is_ok_and(|o| o.status.success())
    };
    if works(&python) {
        return python;
    }
    let run = |command: &mut Command, what: &str| {
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("{what}: could not start it: {e}"));
        assert!(
            output.status.success(),
            "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        &format!(
            "`python3 -m venv target/{name}` (this test needs Python 3.9+ with the venv module)"
        ),
    );
    run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(packages),
        &format!(
            "`pip install {}` into target/{name} (this test needs PyPI)",
            packages.join(" ")
        ),
    );
    assert!(
        works(&python),
        "{} were installed into {} but do not import",
        packages.join(" "),
        venv.display()
    );
    python
}
