//! Fixture loading and comparison helpers shared by the scheduler test modules (`tests`, `tests_k`,
//! `tests_dpm`, `tests_extra`).

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::{build, SchedulerOptions};

/// Relative tolerance (to the largest magnitude of the reference) for tensors and schedules.
pub(super) const TOL: f64 = 1e-5;

/// Reads `tests/fixtures/schedulers/<name>` as JSON.
pub(super) fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../../tests/fixtures/schedulers/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    hex.as_bytes()
        .chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
        .collect()
}

/// Float32 values from little-endian hex.
pub(super) fn hex_f32(hex: &str) -> Vec<f32> {
    hex_bytes(hex)
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// A scalar list stored as float32 or float64 hex.
pub(super) fn scalars(v: &Value) -> Vec<f64> {
    if let Some(h) = v.get("f64le").and_then(Value::as_str) {
        hex_bytes(h)
            .chunks(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    } else {
        hex_f32(v["f32le"].as_str().unwrap())
            .iter()
            .map(|&x| x as f64)
            .collect()
    }
}

/// A fixture tensor: `shape` plus float32 (or float64) little-endian hex data.
pub(super) fn tensor(v: &Value) -> Tensor {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let data: Vec<f32> = scalars(v).iter().map(|&x| x as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// A fixture list of float32 values (written as exact decimals; serde_json's default parser may miss the
/// last f64 bit of a 17-digit decimal, which rounding to f32 undoes).
pub(super) fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32 as f64)
        .collect()
}

/// One fixture float32 value (see [`floats`]).
pub(super) fn float(v: &Value) -> f64 {
    v.as_f64().unwrap() as f32 as f64
}

/// A fixture list of integers, as f64.
pub(super) fn ints(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as f64)
        .collect()
}

/// All elements of a float32 tensor, flattened.
pub(super) fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Largest |a - b| relative to the largest |b| (or 1e-6), and the number of elements that differ at all.
pub(super) fn compare(actual: &[f64], expected: &[f64]) -> (f64, usize) {
    assert_eq!(actual.len(), expected.len(), "length differs");
    let scale = expected.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    let mut differing = 0;
    for (a, b) in actual.iter().zip(expected) {
        if a != b {
            differing += 1;
        }
        worst = worst.max((a - b).abs() / scale);
    }
    (worst, differing)
}

/// [`compare`], but NaN in the same place on both sides counts as equal (diffusers' unused NaN entries), the
/// scale ignores non-finite values, and NaN anywhere else makes the error infinite.
pub(super) fn compare_nan_equal(actual: &[f64], expected: &[f64]) -> (f64, usize) {
    assert_eq!(actual.len(), expected.len(), "length differs");
    let scale = expected
        .iter()
        .filter(|v| v.is_finite())
        .fold(1e-6f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    let mut differing = 0;
    for (a, b) in actual.iter().zip(expected) {
        if a == b || (a.is_nan() && b.is_nan()) {
            continue;
        }
        differing += 1;
        let d = (a - b).abs() / scale;
        worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
    }
    (worst, differing)
}

fn flat(t: &Tensor) -> Vec<f64> {
    values(t).iter().map(|&v| v as f64).collect()
}

/// [`compare`] for two tensors of the same shape.
pub(super) fn compare_tensors(actual: &Tensor, expected: &Tensor) -> (f64, usize) {
    assert_eq!(actual.dims(), expected.dims());
    compare(&flat(actual), &flat(expected))
}

/// [`compare_nan_equal`] for two tensors of the same shape.
pub(super) fn compare_tensors_nan_equal(actual: &Tensor, expected: &Tensor) -> (f64, usize) {
    assert_eq!(actual.dims(), expected.dims());
    compare_nan_equal(&flat(actual), &flat(expected))
}

/// Options with only `use_karras_sigmas` set (to `true` when `karras`, else left to the config).
pub(super) fn options(karras: bool) -> SchedulerOptions {
    SchedulerOptions {
        use_karras_sigmas: karras.then_some(true),
        ..Default::default()
    }
}

/// The fixture's stand-in for the UNet: `x * 0.1 + base * (t / 1000)`, with torch's float32 rounding.
pub(super) fn fake_unet(x: &Tensor, base: &Tensor, t: f64) -> Tensor {
    (x.affine(0.1f32 as f64, 0.0).unwrap() + base.affine((t / 1000.0) as f32 as f64, 0.0).unwrap())
        .unwrap()
}

/// `StableDiffusionImg2ImgPipeline.get_timesteps` for a fixture run: checks the run's `t_start` for its
/// `steps` and `strength` and returns the begin index (`t_start * order`).
pub(super) fn img2img_begin(run: &Value, order: usize, what: &str) -> usize {
    let steps = run["steps"].as_u64().unwrap() as usize;
    let strength = run["strength"].as_f64().unwrap();
    let init_timestep = ((steps as f64 * strength).floor() as usize).min(steps);
    let t_start = steps - init_timestep;
    assert_eq!(
        t_start as u64,
        run["t_start"].as_u64().unwrap(),
        "{what}: t_start"
    );
    t_start * order
}

/// `config` with `key` set to `value`.
pub(super) fn with(mut config: Value, key: &str, value: Value) -> Value {
    config[key] = value;
    config
}

/// The error message of building `name` from `config`, which must fail.
pub(super) fn err_text(name: &str, config: &Value, steps: usize) -> String {
    match build(name, config, steps, &SchedulerOptions::default()) {
        Ok(_) => panic!("{name} with {config} should fail"),
        Err(e) => e.to_string(),
    }
}
