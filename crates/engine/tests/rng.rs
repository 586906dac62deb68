//! The seeded generator draws exactly what torch's CPU generator draws (tests/fixtures/rng.json, written by
//! scripts/make_fixtures.py from torch itself): several seeds, including ones past 2³¹ and 2³², sizes on
//! both of torch's paths (scalar below 16, vectorised from 16, with its tail redraw when the size is not a
//! multiple of 16), and one generator drawing several times in a row.

use std::path::Path;

use pictor_engine::rng::TorchGenerator;
use serde_json::Value;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/rng.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("rng.json"))
        .expect("rng.json parses")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a list of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

fn assert_close(ours: &[f32], torch: &[f32], what: &str) {
    assert_eq!(ours.len(), torch.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(torch).enumerate() {
        // torch's vectorised path uses SIMD log/sin/cos, a few ulps from libm's.
        assert!(
            (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
            "{what}: element {i}: ours {a}, torch {b}"
        );
    }
}

#[test]
fn randn_equals_torch_for_every_seed_and_size() {
    let f = fixture();
    let cases = f["randn"].as_array().expect("randn cases");
    assert!(cases.len() >= 40, "fixture has {} cases", cases.len());
    for case in cases {
        let seed = case["seed"].as_u64().expect("seed");
        let size = case["size"].as_u64().expect("size") as usize;
        let ours = TorchGenerator::new(seed).randn(size);
        assert_close(
            &ours,
            &floats(&case["values"]),
            &format!("seed {seed} size {size}"),
        );
    }
}

#[test]
fn successive_draws_from_one_generator_equal_torch() {
    let f = fixture();
    let seq = &f["sequence"];
    let mut rng = TorchGenerator::new(seq["seed"].as_u64().expect("seed"));
    for (i, draw) in seq["draws"].as_array().expect("draws").iter().enumerate() {
        let torch = floats(&draw["values"]);
        let ours = rng.randn(torch.len());
        assert_close(&ours, &torch, &format!("draw {i}"));
    }
}

#[test]
fn shaped_draw_equals_torch() {
    let f = fixture();
    let shaped = &f["shaped"];
    let shape: Vec<usize> = shaped["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let mut rng = TorchGenerator::new(shaped["seed"].as_u64().expect("seed"));
    let t = rng
        .randn_tensor(
            shape.as_slice(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .expect("tensor");
    let ours: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    assert_close(&ours, &floats(&shaped["values"]), "shaped draw");
}
