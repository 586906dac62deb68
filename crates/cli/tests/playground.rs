//! The playground in a real browser: Debian's `chromium`, driven headless over WebDriver by its
//! `chromium-driver` (both installed by scripts/test.sh), against `pictor serve` on loopback with the tiny
//! fixture models. A key and a prompt are typed, the init image is dropped on the page, and the result must be
//! diffusers' image for those settings; a long job is cancelled from the page; a field error shows beside its
//! field. Screenshots go to `target/playground-screenshots/`.

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{assert_image_matches, fixture_base64, Server, KEY};

/// The W3C name of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session through chromedriver; both are stopped when dropped.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

fn which(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

impl Browser {
    fn start() -> Browser {
        let driver_bin = which(&["chromedriver"]).expect(
            "chromedriver not found: install Debian's chromium and chromium-driver (scripts/test.sh does)",
        );
        let chromium = which(&["chromium", "chromium-browser"])
            .expect("chromium not found: install Debian's chromium (scripts/test.sh does)");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while ureq::get(&format!("{base}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium.to_str().unwrap(), "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1100"]}}}});
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
        };
        let created = browser.call("POST", "/session", caps);
        browser.session = created["sessionId"].as_str().unwrap().to_string();
        browser
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let request = ureq::request(method, &url).timeout(Duration::from_secs(120));
        let result = if method == "GET" {
            request.call()
        } else {
            request.send_json(body)
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        };
        let value: Value = response.into_json().unwrap();
        assert!(
            value["value"].get("error").is_none(),
            "WebDriver {method} {path}: {value}"
        );
        value["value"].clone()
    }

    fn open(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/click"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/clear"), json!({}));
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        );
    }

    fn run(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
    }

    /// Waits until `script` returns something truthy; returns it.
    fn wait(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = self.run(script, json!([]));
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn screenshot(&self, name: &str) {
        use base64::Engine as _;
        let png = self.call("GET", "/screenshot", Value::Null);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/playground-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Sets form fields by id (the inputs a person would fill in; typing each number adds nothing to the test).
fn set_fields(browser: &Browser, fields: Value) {
    browser.run(
        "for (const [k, v] of Object.entries(arguments[0])) { const el = document.getElementById(k); \
         if (el.type === 'checkbox') el.checked = v; else el.value = v; \
         el.dispatchEvent(new Event('change')); }",
        json!([fields]),
    );
}

#[test]
fn the_playground_generates_shows_progress_cancels_and_shows_field_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &[
            "--default-model",
            "sd1-tiny",
            "--debug-step-delay-ms",
            "200",
        ],
    );
    let browser = Browser::start();
    browser.open(&format!("{}/", server.base));
    assert_eq!(
        browser.run("return document.title", json!([])),
        "Pictor playground"
    );

    // The key, typed; the model list arrives.
    browser.type_into("#key", KEY);
    browser.run(
        "document.getElementById('key').dispatchEvent(new Event('change'))",
        json!([]),
    );
    browser.wait(
        "the model list",
        "return [...document.getElementById('model').options].some(o => o.value === 'sd1-tiny')",
    );

    // The server's lists: models by what they run, schedulers, LoRAs, VAEs.
    let lists = browser.run(
        "const values = id => [...document.getElementById(id).options].map(o => o.value); \
         return [values('scheduler'), values('loras'), values('vaes')]",
        json!([]),
    );
    assert!(
        lists[0]
            .as_array()
            .unwrap()
            .contains(&json!("DDIMScheduler")),
        "{lists}"
    );
    assert!(
        lists[1].as_array().unwrap().contains(&json!("tiny-kohya")),
        "{lists}"
    );
    assert_eq!(lists[2], json!(["tiny-alt", "tiny-alt-ldm"]), "{lists}");

    // Case sd1-ddim-s42: the prompt typed, the init image dropped on the page.
    browser.type_into("#prompt", r"a photo of a cat, \(\(cinematic lighting\)\)");
    browser.type_into("#negative_prompt", "blurry");
    set_fields(
        &browser,
        json!({"mode": "img2img", "model": "sd1-tiny", "width": "64", "height": "64",
               "num_inference_steps": "10", "guidance_scale": "7.5", "strength": "0.75", "seed": "42",
               "scheduler": "DDIMScheduler"}),
    );
    browser.run(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0)); \
         const dt = new DataTransfer(); dt.items.add(new File([bytes], 'init.png', {type: 'image/png'})); \
         document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));",
        json!([fixture_base64("init-64.png")]),
    );
    browser.wait(
        "the init image's preview",
        "return document.getElementById('init_preview').src.startsWith('data:image/png')",
    );
    browser.screenshot("1-filled-in");

    browser.click("#generate");
    // The progress bar moves: a value strictly between 0 and 1 is seen before the result appears.
    let mut saw_progress = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let state = browser.run(
            "return [document.getElementById('progress').value, \
                     document.querySelectorAll('#results img').length, document.getElementById('eta').textContent]",
            json!([]),
        );
        let value = state[0].as_f64().unwrap();
        if value > 0.0 && value < 1.0 && !saw_progress {
            saw_progress = true;
            browser.screenshot("2-progress");
        }
        if state[1].as_u64().unwrap() > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no result appeared: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(40));
    }
    assert!(saw_progress, "the progress bar never moved");
    browser.wait(
        "the result image to load",
        "const img = document.querySelector('#results img'); return img.complete && img.naturalWidth > 0",
    );
    browser.screenshot("3-result");
    let src = browser.run(
        "return document.querySelector('#results img').src",
        json!([]),
    );
    let (status, png) = support::get(src.as_str().unwrap());
    assert_eq!(status, 200);
    assert_image_matches(&png, "cases/sd1-ddim-s42/0.png");
    assert_eq!(
        browser.run(
            "return document.getElementById('seed_used').textContent",
            json!([])
        ),
        "42"
    );
    assert_eq!(
        browser.run(
            "return document.querySelectorAll('#history li').length",
            json!([])
        ),
        1
    );

    // A long job, cancelled from the page.
    set_fields(
        &browser,
        json!({"num_inference_steps": "50", "strength": "1"}),
    );
    browser.click("#generate");
    browser.wait(
        "the long job to start",
        "return document.getElementById('progress').value > 0",
    );
    browser.click("#cancel");
    browser.wait(
        "the job to be reported cancelled",
        "return document.getElementById('status').dataset.state === 'cancelled'",
    );
    assert_eq!(
        browser.run(
            "return document.getElementById('status').textContent",
            json!([])
        ),
        "Cancelled"
    );
    browser.screenshot("4-cancelled");

    // A field error, beside its field.
    set_fields(
        &browser,
        json!({"width": "5000", "num_inference_steps": "10", "strength": "0.75"}),
    );
    browser.click("#generate");
    let message = browser.wait(
        "the width error",
        "return document.getElementById('err-width').textContent",
    );
    assert!(message.as_str().unwrap().contains("1024"), "{message}");
    browser.screenshot("5-field-error");

    // Dropping a PNG that carries its parameters restores the settings it was made with.
    use base64::Engine as _;
    set_fields(
        &browser,
        json!({"seed": "", "num_inference_steps": "30", "prompt": "", "width": "512",
               "scheduler": "", "model": "sd2-tiny"}),
    );
    browser.run(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0)); \
         const dt = new DataTransfer(); dt.items.add(new File([bytes], 'result.png', {type: 'image/png'})); \
         document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));",
        json!([base64::engine::general_purpose::STANDARD.encode(&png)]),
    );
    let restored = browser.wait(
        "the settings from the dropped PNG",
        "const v = id => document.getElementById(id).value; \
         return v('seed') === '42' ? [v('prompt'), v('negative_prompt'), v('num_inference_steps'), v('width'), \
                                      v('strength'), v('guidance_scale'), v('scheduler'), v('model')] : null",
    );
    assert_eq!(
        restored,
        json!([
            r"a photo of a cat, \(\(cinematic lighting\)\)",
            "blurry",
            "10",
            "64",
            "0.75",
            "7.5",
            "DDIMScheduler",
            "sd1-tiny"
        ]),
    );

    // On a phone-sized window nothing overflows sideways.
    browser.call("POST", "/window/rect", json!({"width": 390, "height": 844}));
    let overflow = browser.run(
        "return document.documentElement.scrollWidth - window.innerWidth",
        json!([]),
    );
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "wider than the phone by {overflow} px"
    );
    browser.screenshot("6-phone");
    browser.call(
        "POST",
        "/window/rect",
        json!({"width": 1280, "height": 1100}),
    );

    // Copy as curl shows the request for the form.
    set_fields(&browser, json!({"width": "64"}));
    browser.click("#copy_curl");
    let code = browser.run(
        "return document.getElementById('code').textContent",
        json!([]),
    );
    assert!(
        code.as_str().unwrap().contains("/api/v6/images/img2img")
            && code.as_str().unwrap().contains("\"seed\":\"42\""),
        "{code}"
    );
}
