//! Shared helpers for the model integration tests: fixture and asset paths (with skip logic),
//! golden readers, comparisons.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};

/// A golden tensor: F32 values or I64 ids, with its shape.
#[derive(Clone, Debug)]
pub struct Golden {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

/// Reads every F32 / I64 tensor of a safetensors file.
pub fn read_golden(path: &Path) -> BTreeMap<String, Golden> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.iter()
        .map(|(k, v)| {
            let mut g = Golden {
                shape: v.shape().to_vec(),
                f32: Vec::new(),
                i64: Vec::new(),
            };
            match v.dtype() {
                safetensors::Dtype::F32 => {
                    g.f32 = v
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect()
                }
                safetensors::Dtype::I64 => {
                    g.i64 = v
                        .data()
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect()
                }
                other => panic!("{}: {k} has dtype {other:?}", path.display()),
            }
            (k.to_string(), g)
        })
        .collect()
}

/// The shared fixture directory (`$DISHA_FIXTURES`, else `../shared/fixtures` beside the
/// project). `None` (reason printed) when absent, unless `DISHA_REQUIRE_FIXTURES=1` (CI).
pub fn fixtures_root() -> Option<PathBuf> {
    shared_dir(
        "DISHA_FIXTURES",
        "fixtures",
        "llama_tiny",
        "DISHA_REQUIRE_FIXTURES",
    )
}

/// The shared assets directory (`$DISHA_ASSETS`, else `../shared/assets`). `None` (reason
/// printed) when absent, unless `DISHA_REQUIRE_ASSETS=1` (CI).
pub fn assets_root() -> Option<PathBuf> {
    shared_dir(
        "DISHA_ASSETS",
        "assets",
        "smollm2-135m-instruct",
        "DISHA_REQUIRE_ASSETS",
    )
}

fn shared_dir(var: &str, default: &str, probe: &str, require: &str) -> Option<PathBuf> {
    let root = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../../shared/{default}"))
    });
    if root.join(probe).exists() {
        return Some(root);
    }
    let reason = format!(
        "{} not found at {} (set {var} to the shared {default} directory)",
        default,
        root.display()
    );
    if std::env::var(require).is_ok_and(|v| v == "1") {
        panic!("{reason}");
    }
    eprintln!("SKIPPED: {reason}");
    None
}

/// The bundled copy of the tiny divisible Llama.
pub fn bundled_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny_div")
}

/// Token ids as a `[batch, seq]` Int tensor.
pub fn ids_tensor(g: &Golden, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(
        TensorData::new(g.i64.clone(), [g.shape[0], g.shape[1]]),
        device,
    )
}

pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec_as::<f32>().unwrap()
}

/// Largest absolute difference; panics on a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts `|actual - expected| <= tol` elementwise, naming `what`.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], tol: f32) -> f32 {
    let d = max_abs_diff(actual, expected);
    assert!(d <= tol, "{what}: max |diff| {d:e} > {tol:e}");
    d
}
