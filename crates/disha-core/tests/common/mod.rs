//! Shared helpers for the integration tests: host reference math (f64, PyTorch `[out, in]`
//! layout, written from method.md independently of the crate's tensor code), fixture lookup,
//! and a tiny Llama "linears only" model over the golden fixtures.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use disha_core::{AdaptableModel, AdaptedLinear, HostTensor, LinearSite, read_safetensors};

pub fn device() -> Device {
    Device::default()
}

/// A dense row-major f64 matrix for reference computations.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub v: Vec<f64>,
}

impl Mat {
    pub fn new(rows: usize, cols: usize, v: Vec<f64>) -> Self {
        assert_eq!(v.len(), rows * cols);
        Self { rows, cols, v }
    }
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self::new(rows, cols, vec![0.0; rows * cols])
    }
    pub fn from_fn(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f64) -> Self {
        Self::new(
            rows,
            cols,
            (0..rows * cols).map(|k| f(k / cols, k % cols)).collect(),
        )
    }
    pub fn from_rows(rows: &[&[f64]]) -> Self {
        Self::from_fn(rows.len(), rows[0].len(), |i, j| rows[i][j])
    }
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.v[i * self.cols + j]
    }
    pub fn set(&mut self, i: usize, j: usize, x: f64) {
        self.v[i * self.cols + j] = x;
    }
    pub fn t(&self) -> Mat {
        Mat::from_fn(self.cols, self.rows, |i, j| self.at(j, i))
    }
    pub fn matmul(&self, o: &Mat) -> Mat {
        assert_eq!(self.cols, o.rows);
        Mat::from_fn(self.rows, o.cols, |i, j| {
            (0..self.cols).map(|k| self.at(i, k) * o.at(k, j)).sum()
        })
    }
    pub fn add(&self, o: &Mat) -> Mat {
        Mat::from_fn(self.rows, self.cols, |i, j| self.at(i, j) + o.at(i, j))
    }
    pub fn sub(&self, o: &Mat) -> Mat {
        Mat::from_fn(self.rows, self.cols, |i, j| self.at(i, j) - o.at(i, j))
    }
    pub fn scale(&self, s: f64) -> Mat {
        Mat::from_fn(self.rows, self.cols, |i, j| s * self.at(i, j))
    }
    /// The `r x r` block `(a, b)`.
    pub fn block(&self, a: usize, b: usize, r: usize) -> Mat {
        Mat::from_fn(r, r, |p, q| self.at(a * r + p, b * r + q))
    }
    pub fn max_abs_diff(&self, o: &Mat) -> f64 {
        assert_eq!((self.rows, self.cols), (o.rows, o.cols), "shape");
        self.v
            .iter()
            .zip(&o.v)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    }
    pub fn max_abs(&self) -> f64 {
        self.v.iter().map(|a| a.abs()).fold(0.0, f64::max)
    }
    pub fn identity(r: usize) -> Mat {
        Mat::from_fn(r, r, |i, j| if i == j { 1.0 } else { 0.0 })
    }
}

pub fn to_mat(t: Tensor<2>) -> Mat {
    let [r, c] = t.dims();
    let v = t.into_data().try_to_vec_as::<f32>().unwrap();
    Mat::new(r, c, v.into_iter().map(f64::from).collect())
}

pub fn to_tensor(m: &Mat) -> Tensor<2> {
    let v: Vec<f32> = m.v.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, [m.rows, m.cols]), &device())
}

pub fn to_tensor3(blocks: &[Mat]) -> Tensor<3> {
    let r = blocks[0].rows;
    let c = blocks[0].cols;
    let v: Vec<f32> = blocks
        .iter()
        .flat_map(|m| m.v.iter().map(|&x| x as f32))
        .collect();
    Tensor::from_data(TensorData::new(v, [blocks.len(), r, c]), &device())
}

pub fn host_to_tensor3(t: &HostTensor, device: &Device) -> Tensor<3> {
    let dims = match t.shape.len() {
        3 => [t.shape[0], t.shape[1], t.shape[2]],
        _ => [1, t.shape[0], t.shape[1]],
    };
    Tensor::from_data(TensorData::new(t.values.clone(), dims), device)
}

pub fn host_to_mat(t: &HostTensor) -> Mat {
    assert_eq!(t.shape.len(), 2);
    Mat::new(
        t.shape[0],
        t.shape[1],
        t.values.iter().map(|&x| f64::from(x)).collect(),
    )
}

/// Seeded N(0, std²) matrix from a local generator (SplitMix64 + Box–Muller): tests run in
/// parallel threads, so Burn's process-global RNG would make their values racy.
pub fn randn(rows: usize, cols: usize, std: f64, seed: u64) -> Mat {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let v = (0..rows * cols)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            let z = std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            // Rounded to f32 so that values survive a round trip through f32 tensors exactly.
            f64::from(z as f32)
        })
        .collect();
    Mat::new(rows, cols, v)
}

// ---------------------------------------------------------------------------------------------
// Reference math, PyTorch layout (method.md §2–§4, §8).

/// Bone ΔW[o, i] = B[i mod r, o] (B: [r, out]); mini passes the tiled block.
pub fn bone_delta(block: &Mat, d_input: usize, d_output: usize) -> Mat {
    let r = block.rows;
    let c = block.cols;
    Mat::from_fn(d_output, d_input, |o, i| block.at(i % r, o % c))
}

/// BAT merge W'_ab = W_ab (I + D_k) + D_k, k = a (PEFT) or b (RWKV-PEFT).
pub fn bat_merge(w: &Mat, d: &[Mat], rwkv: bool) -> Mat {
    let r = d[0].rows;
    let mut out = w.clone();
    for a in 0..w.rows / r {
        for b in 0..w.cols / r {
            let dk = &d[if rwkv { b } else { a }];
            let blk = w.block(a, b, r);
            let new = blk.matmul(&Mat::identity(r).add(dk)).add(dk);
            for p in 0..r {
                for q in 0..r {
                    out.set(a * r + p, b * r + q, new.at(p, q));
                }
            }
        }
    }
    out
}

/// S(x̃): the shard sum of zero-padded rows of x ([M, in] → [M, r]).
pub fn shard_sum(x: &Mat, r: usize) -> Mat {
    Mat::from_fn(x.rows, r, |m, j| {
        (0..x.cols).filter(|i| i % r == j).map(|i| x.at(m, i)).sum()
    })
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// The shared fixture directory (`$DISHA_FIXTURES`, else `../shared/fixtures` beside the
/// project). `None` (with the reason printed) when absent, unless `DISHA_REQUIRE_FIXTURES=1`,
/// which CI sets so that a missing directory fails instead of skipping.
pub fn fixtures_root() -> Option<PathBuf> {
    let root = std::env::var_os("DISHA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"));
    if root.join("llama_tiny").is_dir() {
        return Some(root);
    }
    let reason = format!(
        "golden fixtures not found at {} (set DISHA_FIXTURES to the shared fixtures directory)",
        root.display()
    );
    if std::env::var("DISHA_REQUIRE_FIXTURES").is_ok_and(|v| v == "1") {
        panic!("{reason}");
    }
    eprintln!("SKIPPED: {reason}");
    None
}

/// The fixture adapter directories copied into this repository (always available).
pub fn bundled_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

pub const MODULES: [(&str, &str); 7] = [
    ("q_proj", "self_attn"),
    ("k_proj", "self_attn"),
    ("v_proj", "self_attn"),
    ("o_proj", "self_attn"),
    ("gate_proj", "mlp"),
    ("up_proj", "mlp"),
    ("down_proj", "mlp"),
];

/// The seven projections of one decoder layer.
#[derive(Module, Debug)]
pub struct TinyLayer {
    pub projections: Vec<AdaptedLinear>,
}

/// The linear layers of the tiny golden Llama (2 layers x 7 projections + `lm_head`), with HF
/// module names: enough to exercise every adapter path without attention code.
#[derive(Module, Debug)]
pub struct TinyLlamaLinears {
    pub layers: Vec<TinyLayer>,
    pub lm_head: AdaptedLinear,
}

pub fn hf_name(layer: usize, module: usize) -> String {
    let (m, group) = MODULES[module];
    format!("model.layers.{layer}.{group}.{m}")
}

fn linear_from_pytorch(weight: &HostTensor, label: &str, device: &Device) -> AdaptedLinear {
    let t = Tensor::<2>::from_data(
        TensorData::new(weight.values.clone(), [weight.shape[0], weight.shape[1]]),
        device,
    );
    AdaptedLinear::from_weights(t.transpose(), None).with_label(label)
}

impl TinyLlamaLinears {
    /// Loads `base/model.safetensors` of a fixture config.
    pub fn load(config_dir: &Path, device: &Device) -> Self {
        let weights = read_safetensors(&config_dir.join("base/model.safetensors")).unwrap();
        let layers = (0..2)
            .map(|l| TinyLayer {
                projections: (0..7)
                    .map(|m| {
                        let name = hf_name(l, m);
                        linear_from_pytorch(&weights[&format!("{name}.weight")], &name, device)
                    })
                    .collect(),
            })
            .collect();
        Self {
            layers,
            lm_head: linear_from_pytorch(&weights["lm_head.weight"], "lm_head", device),
        }
    }

    /// The same architecture with zero weights (hidden 64, 4 heads / 2 KV heads of 16), for tests
    /// that need shapes but no values.
    pub fn zeros(intermediate: usize, device: &Device) -> Self {
        let dims = |m: usize| match MODULES[m].0 {
            "q_proj" | "o_proj" => (64, 64),
            "k_proj" | "v_proj" => (64, 32),
            "gate_proj" | "up_proj" => (64, intermediate),
            _ => (intermediate, 64),
        };
        let layers = (0..2)
            .map(|l| TinyLayer {
                projections: (0..7)
                    .map(|m| {
                        let (i, o) = dims(m);
                        AdaptedLinear::from_weights(Tensor::zeros([i, o], device), None)
                            .with_label(hf_name(l, m))
                    })
                    .collect(),
            })
            .collect();
        Self {
            layers,
            lm_head: AdaptedLinear::from_weights(Tensor::zeros([64, 128], device), None)
                .with_label("lm_head"),
        }
    }

    /// Layer-0 projection by HF short name (`q_proj`, ...).
    pub fn layer0(&self, module: &str) -> &AdaptedLinear {
        let i = MODULES.iter().position(|(m, _)| *m == module).unwrap();
        &self.layers[0].projections[i]
    }
}

impl AdaptableModel for TinyLlamaLinears {
    fn visit_linears(&self, f: &mut dyn FnMut(&LinearSite, &AdaptedLinear)) {
        for (l, layer) in self.layers.iter().enumerate() {
            for (m, linear) in layer.projections.iter().enumerate() {
                f(
                    &LinearSite::hidden(hf_name(l, m), format!("layers.{l}.projections.{m}")),
                    linear,
                );
            }
        }
        f(
            &LinearSite::output_head("lm_head", "lm_head"),
            &self.lm_head,
        );
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&LinearSite, &mut AdaptedLinear)) {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (m, linear) in layer.projections.iter_mut().enumerate() {
                f(
                    &LinearSite::hidden(hf_name(l, m), format!("layers.{l}.projections.{m}")),
                    linear,
                );
            }
        }
        f(
            &LinearSite::output_head("lm_head", "lm_head"),
            &mut self.lm_head,
        );
    }

    fn default_target_modules(&self) -> Option<Vec<String>> {
        Some(vec!["q_proj".into(), "v_proj".into()])
    }
}

/// The F32 tensors of a fixture `golden.safetensors` (its I64 `input_ids` are skipped).
pub fn golden(variant_dir: &Path) -> BTreeMap<String, HostTensor> {
    let bytes = std::fs::read(variant_dir.join("golden.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(k, v)| {
            let values = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (k.to_string(), HostTensor::new(v.shape().to_vec(), values))
        })
        .collect()
}

/// Every variant directory of a fixture config that has a PEFT `adapter/` directory.
pub fn adapter_variants(config_dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(config_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("adapter").is_dir())
        .collect();
    dirs.sort();
    dirs
}
