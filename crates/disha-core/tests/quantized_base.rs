//! ggml Q8_0 / Q4_0 / Q4_1 parity of [`QuantizedMatrix`]: the quantizer against the blocks llama.cpp's
//! `gguf` Python package writes (bit-exact with ggml's reference quantizers), and both
//! dequantization routes (the tensor-op reference and Flex's blocked product) against its
//! dequantizer. Every comparison is exact: the quantizers round the same f32 values the same
//! way, and a dequantized weight is one f32 product `d · q`.
//!
//! The fixture and the script that wrote it are in `tests/fixtures/ggml_quant/`.

use burn::tensor::{Device, Tensor, TensorData};
use disha_core::{QuantFormat, QuantizedMatrix};
use half::f16;
use serde_json::Value;

struct Golden {
    rows: usize,
    cols: usize,
    input: Vec<f32>,
    /// `(format, GGUF blocks, dequantized values)`.
    formats: Vec<(QuantFormat, Vec<u8>, Vec<f32>)>,
}

fn bits(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of bit patterns")
        .iter()
        .map(|b| f32::from_bits(b.as_u64().expect("u32 bits") as u32))
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn golden() -> Golden {
    let text = include_str!("fixtures/ggml_quant/ggml_quant.json");
    let json: Value = serde_json::from_str(text).expect("fixture JSON");
    let formats = [
        ("q8_0", QuantFormat::Q8),
        ("q4_0", QuantFormat::Q4),
        ("q4_1", QuantFormat::Q4_1),
    ]
    .into_iter()
    .map(|(name, format)| {
        let f = &json["formats"][name];
        (
            format,
            hex(f["blocks"].as_str().expect("hex blocks")),
            bits(&f["value_bits"]),
        )
    })
    .collect();
    Golden {
        rows: json["rows"].as_u64().unwrap() as usize,
        cols: json["cols"].as_u64().unwrap() as usize,
        input: bits(&json["input_bits"]),
        formats,
    }
}

/// The matrix's codes and scales in GGUF's block layout (scale and offset bytes, then codes).
fn ggml_blocks(m: &QuantizedMatrix) -> Vec<u8> {
    let layout = m.layout();
    let codes: Vec<u8> = match layout.format {
        QuantFormat::Q8 => m
            .codes
            .val()
            .into_data()
            .iter::<i64>()
            .map(|c| c as i8 as u8)
            .collect(),
        QuantFormat::Q4 | QuantFormat::Q4_1 => m
            .codes
            .val()
            .into_data()
            .iter::<i64>()
            .map(|c| c as u8)
            .collect(),
    };
    let scales = m.scales.val().into_data().convert::<f16>();
    let scales = scales.as_slice::<f16>().unwrap();
    let (per, params) = (layout.format.code_bytes(), layout.format.block_params());
    let mut out = Vec::new();
    for (b, block_params) in scales.chunks_exact(params).enumerate() {
        for p in block_params {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out.extend_from_slice(&codes[b * per..(b + 1) * per]);
    }
    out
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn quantizer_writes_ggmls_blocks() {
    let g = golden();
    let device = Device::default();
    for (format, blocks, _) in &g.formats {
        let m =
            QuantizedMatrix::quantize(&g.input, [g.rows, g.cols], *format, "w", &device).unwrap();
        let ours = ggml_blocks(&m);
        assert_eq!(ours.len(), blocks.len(), "{format:?}");
        let first = ours.iter().zip(blocks).position(|(a, b)| a != b);
        assert_eq!(first, None, "{format:?}: first differing byte");
        assert_eq!(m.size_bytes(), blocks.len());
        // The blocks map back in unchanged.
        let mapped =
            QuantizedMatrix::from_ggml_blocks(blocks, [g.rows, g.cols], *format, "w", &device)
                .unwrap();
        assert_eq!(ggml_blocks(&mapped), *blocks, "{format:?}: mapped blocks");
    }
}

#[test]
fn both_dequantization_routes_give_ggmls_values() {
    let g = golden();
    let device = Device::default();
    for (format, blocks, expected) in &g.formats {
        let m = QuantizedMatrix::from_ggml_blocks(blocks, [g.rows, g.cols], *format, "w", &device)
            .unwrap();
        // The reference: tensor ops over the whole matrix.
        let dense = values(m.dequantize());
        let differing = dense
            .iter()
            .zip(expected)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differing, 0, "{format:?}: reference dequantization");
        // The product route: `I · Mᵀ` is `Mᵀ` exactly (one product by 1 per output, the other
        // terms exact zeros).
        let identity = Tensor::<2>::from_data(
            TensorData::new(
                (0..g.cols * g.cols)
                    .map(|i| f32::from(u8::from(i / g.cols == i % g.cols)))
                    .collect::<Vec<f32>>(),
                [g.cols, g.cols],
            ),
            &device,
        );
        let product = values(m.matmul_transposed(identity).transpose());
        let max = product
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert_eq!(max, 0.0, "{format:?}: blocked product");
    }
}
