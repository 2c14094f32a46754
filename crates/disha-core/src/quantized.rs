//! Block-quantized frozen weights (a QLoRA-style base): [`QuantizedMatrix`] keeps a frozen
//! matrix in ggml's Q8_0, Q4_0 or Q4_1 blocks and multiplies by it without ever keeping a dense
//! copy.
//!
//! Each row is cut into blocks of [`QUANT_BLOCK`] values along its columns (the input features of
//! a linear layer stored `[out, in]`, as checkpoints store it); a block has one f16 scale `d`
//! (Q4_1 also an f16 offset `m`) and one code per value:
//!
//! | format | bytes per block | code | value |
//! |---|---|---|---|
//! | [`QuantFormat::Q8`] (ggml `Q8_0`) | 2 + 32 | `q` ∈ [−127, 127] (i8) | `d · q` |
//! | [`QuantFormat::Q4`] (ggml `Q4_0`) | 2 + 16 | `q` ∈ [0, 15], two per byte | `d · (q − 8)` |
//! | [`QuantFormat::Q4_1`] (ggml `Q4_1`) | 2 + 2 + 16 | `q` ∈ [0, 15], two per byte | `d · q + m` |
//!
//! The 4-bit formats pack value `j` of a block in the low nibble of byte `j` and value `j + 16`
//! in its high nibble (ggml's order, so a GGUF `Q8_0`, `Q4_0` or `Q4_1` tensor's blocks map in
//! unchanged). The quantizers are ggml's reference ones, bit for bit: Q8 takes
//! `d = max|x| / 127` and rounds `x / d` half away from zero; Q4 takes `d = v / −8` for the value
//! `v` of largest magnitude and truncates `x / d + 8.5` into `[0, 15]`; Q4_1 takes the block's
//! minimum `m` and `d = (max − m) / 15` and truncates `(x − m) / d + 0.5` into `[0, 15]` (an
//! offset per block: a better fit for weights that are not centred on zero, at 5 bits per
//! weight). A row whose length is not a multiple of 32 has its last block padded with zeros.
//!
//! The products go through [`FusedTrainingOps::quantized_matmul`](crate::fused::FusedTrainingOps::quantized_matmul):
//! the reference dequantizes the whole matrix with tensor ops for the one product, Flex
//! dequantizes a block of rows at a time in parallel, and the autodiff node keeps only the codes
//! and scales, dequantizing again for the input gradient.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use half::f16;

use crate::error::{DishaError, Result};

/// Values per quantization block (ggml's `QK8_0` / `QK4_0`).
pub const QUANT_BLOCK: usize = 32;

/// A block format of [`QuantizedMatrix`] (module docs).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum QuantFormat {
    /// ggml `Q8_0`: an f16 scale and 32 signed 8-bit codes per block (8.5 bits per weight).
    #[default]
    Q8,
    /// ggml `Q4_0`: an f16 scale and 32 4-bit codes per block (4.5 bits per weight).
    Q4,
    /// ggml `Q4_1`: an f16 scale, an f16 offset and 32 4-bit codes per block (5 bits per
    /// weight).
    #[allow(non_camel_case_types)]
    #[serde(rename = "q4_1")]
    #[cfg_attr(feature = "clap", value(name = "q4_1"))]
    Q4_1,
}

impl QuantFormat {
    /// Bytes of codes per block (32 for Q8, 16 for the 4-bit formats).
    pub fn code_bytes(self) -> usize {
        match self {
            Self::Q8 => QUANT_BLOCK,
            Self::Q4 | Self::Q4_1 => QUANT_BLOCK / 2,
        }
    }

    /// f16 parameters per block: the scale, and Q4_1's offset.
    pub fn block_params(self) -> usize {
        match self {
            Self::Q4_1 => 2,
            Self::Q8 | Self::Q4 => 1,
        }
    }

    /// The GGML type id of the format (GGUF's tensor type).
    pub fn ggml_type(self) -> u32 {
        match self {
            Self::Q8 => 8,
            Self::Q4 => 2,
            Self::Q4_1 => 3,
        }
    }

    /// ggml's name of the format (`Q8_0`, `Q4_0`).
    pub fn ggml_name(self) -> &'static str {
        match self {
            Self::Q8 => "Q8_0",
            Self::Q4 => "Q4_0",
            Self::Q4_1 => "Q4_1",
        }
    }

    /// Bytes one `[rows, cols]` matrix takes in this format (codes and scales).
    pub fn bytes(self, rows: usize, cols: usize) -> usize {
        rows * cols.div_ceil(QUANT_BLOCK) * self.block_bytes()
    }

    /// Bytes of one ggml block (parameters and codes).
    pub fn block_bytes(self) -> usize {
        2 * self.block_params() + self.code_bytes()
    }

    /// The Burn integer dtype of the codes (i8 for Q8, packed u8 for the 4-bit formats).
    fn code_dtype(self) -> DType {
        match self {
            Self::Q8 => DType::I8,
            Self::Q4 | Self::Q4_1 => DType::U8,
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Q8 => "q8",
            Self::Q4 => "q4",
            Self::Q4_1 => "q4_1",
        })
    }
}

/// The shape of a [`QuantizedMatrix`]'s codes: its format and the number of columns of the
/// matrix it stands for (the codes' own width is a whole number of blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QuantLayout {
    /// The block format.
    pub format: QuantFormat,
    /// Columns of the dense matrix (values per row before padding).
    pub cols: usize,
}

impl QuantLayout {
    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.cols.div_ceil(QUANT_BLOCK)
    }

    /// Code bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.blocks() * self.format.code_bytes()
    }
}

/// A frozen matrix `[rows, cols]` kept block-quantized (module docs).
///
/// # Shapes
/// - `codes`: `[rows, blocks · code_bytes]` (i8 for Q8, u8 for the 4-bit formats)
/// - `scales`: `[rows, blocks · block_params]` (f16; Q4_1 holds each block's scale, then its
///   offset)
#[derive(Module, Debug)]
pub struct QuantizedMatrix {
    /// The codes, row by row, block by block.
    pub codes: Param<Tensor<2, Int>>,
    /// One f16 scale per block (and Q4_1's offset after it).
    pub scales: Param<Tensor<2>>,
    #[module(skip)]
    layout: QuantLayout,
}

impl QuantizedMatrix {
    /// Quantizes the row-major `values` of a `[rows, cols]` matrix with ggml's reference
    /// quantizer of `format`, onto `device`.
    ///
    /// # Errors
    /// A NaN or infinite value (`name` says which tensor), or a length that is not
    /// `rows · cols`.
    pub fn quantize(
        values: &[f32],
        [rows, cols]: [usize; 2],
        format: QuantFormat,
        name: &str,
        device: &Device,
    ) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(DishaError::Quantize {
                tensor: name.to_string(),
                message: format!("{} values for a [{rows}, {cols}] matrix", values.len()),
            });
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(DishaError::Quantize {
                tensor: name.to_string(),
                message: format!(
                    "value {} at [{}, {}] cannot be quantized",
                    values[i],
                    i / cols.max(1),
                    i % cols.max(1)
                ),
            });
        }
        let layout = QuantLayout { format, cols };
        let mut codes = vec![0u8; rows * layout.row_bytes()];
        let params = format.block_params();
        let mut scales = vec![f16::ZERO; rows * layout.blocks() * params];
        let mut block = [0.0f32; QUANT_BLOCK];
        for r in 0..rows {
            let row = &values[r * cols..(r + 1) * cols];
            for b in 0..layout.blocks() {
                let part = &row[b * QUANT_BLOCK..((b + 1) * QUANT_BLOCK).min(cols)];
                block.fill(0.0);
                block[..part.len()].copy_from_slice(part);
                let at = r * layout.row_bytes() + b * format.code_bytes();
                let k = (r * layout.blocks() + b) * params;
                quantize_block(
                    format,
                    &block,
                    &mut codes[at..at + format.code_bytes()],
                    &mut scales[k..k + params],
                );
            }
        }
        Ok(Self::from_parts(codes, scales, rows, layout, device))
    }

    /// A matrix from ggml blocks as GGUF stores them (each block: the f16 scale — and Q4_1's
    /// f16 offset — as little-endian bytes, then the codes), `cols` values per row; a `Q8_0`,
    /// `Q4_0` or `Q4_1` tensor maps in without requantizing.
    ///
    /// # Errors
    /// A byte length that is not `rows` rows of whole blocks, or a non-finite scale.
    pub fn from_ggml_blocks(
        blocks: &[u8],
        [rows, cols]: [usize; 2],
        format: QuantFormat,
        name: &str,
        device: &Device,
    ) -> Result<Self> {
        let layout = QuantLayout { format, cols };
        let (block_bytes, params) = (format.block_bytes(), format.block_params());
        if blocks.len() != rows * layout.blocks() * block_bytes {
            return Err(DishaError::Quantize {
                tensor: name.to_string(),
                message: format!(
                    "{} bytes of {} blocks for a [{rows}, {cols}] matrix (expected {})",
                    blocks.len(),
                    format.ggml_name(),
                    rows * layout.blocks() * block_bytes
                ),
            });
        }
        let mut codes = Vec::with_capacity(rows * layout.row_bytes());
        let mut scales = Vec::with_capacity(rows * layout.blocks() * params);
        for (i, block) in blocks.chunks_exact(block_bytes).enumerate() {
            for p in 0..params {
                let d = f16::from_le_bytes([block[2 * p], block[2 * p + 1]]);
                if !d.is_finite() {
                    return Err(DishaError::Quantize {
                        tensor: name.to_string(),
                        message: format!("block {i} has the non-finite scale {d}"),
                    });
                }
                scales.push(d);
            }
            codes.extend_from_slice(&block[2 * params..]);
        }
        Ok(Self::from_parts(codes, scales, rows, layout, device))
    }

    fn from_parts(
        codes: Vec<u8>,
        scales: Vec<f16>,
        rows: usize,
        layout: QuantLayout,
        device: &Device,
    ) -> Self {
        let format = layout.format;
        let codes = match format {
            QuantFormat::Q8 => TensorData::new(
                codes.into_iter().map(|c| c as i8).collect::<Vec<i8>>(),
                [rows, layout.row_bytes()],
            ),
            QuantFormat::Q4 | QuantFormat::Q4_1 => {
                TensorData::new(codes, [rows, layout.row_bytes()])
            }
        };
        let codes = Tensor::<2, Int>::from_data(codes, (device, format.code_dtype()));
        let scales = Tensor::<2>::from_data(
            TensorData::new(scales, [rows, layout.blocks() * format.block_params()]),
            (device, DType::F16),
        );
        Self {
            codes: Param::initialized(ParamId::new(), codes),
            scales: Param::from_tensor(scales).set_require_grad(false),
            layout,
        }
    }

    /// `[rows, cols]` of the dense matrix.
    pub fn dims(&self) -> [usize; 2] {
        [self.codes.dims()[0], self.layout.cols]
    }

    /// The format and width of the codes.
    pub fn layout(&self) -> QuantLayout {
        self.layout
    }

    /// Bytes held (codes and scales).
    pub fn size_bytes(&self) -> usize {
        let [rows, cols] = self.dims();
        self.layout.format.bytes(rows, cols)
    }

    /// The device the codes are on.
    pub fn device(&self) -> Device {
        self.codes.device()
    }

    /// The dense matrix `[rows, cols]` in f32 (a full-size copy: for merging, exporting and
    /// tests; products go through [`matmul_transposed`](Self::matmul_transposed)).
    pub fn dequantize(&self) -> Tensor<2> {
        Tensor::from_dispatch(crate::fused::dequantize(
            self.codes.val().into_dispatch(),
            self.scales.val().into_dispatch(),
            self.layout,
        ))
    }

    /// `x · Mᵀ` for this matrix `M` `[rows, cols]` (a linear layer stored `[out, in]`),
    /// differentiable in `x`; the backward dequantizes again (`δx = δy · M`), so no dense copy
    /// outlives the product.
    ///
    /// # Shapes
    /// - `x`: `[..., cols]`; output: `[..., rows]`, in `x`'s dtype
    pub fn matmul_transposed<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::fused::quantized_matmul(x, self.codes.val(), self.scales.val(), self.layout)
    }
}

/// Quantizes one block of 32 values into `codes` (32 or 16 bytes) and `params` (its scale,
/// and Q4_1's offset): ggml's `quantize_row_q8_0_ref` / `_q4_0_ref` / `_q4_1_ref`.
fn quantize_block(
    format: QuantFormat,
    x: &[f32; QUANT_BLOCK],
    codes: &mut [u8],
    params: &mut [f16],
) {
    let half = QUANT_BLOCK / 2;
    let pack = |codes: &mut [u8], code: &dyn Fn(f32) -> u8| {
        for (j, c) in codes.iter_mut().enumerate() {
            *c = code(x[j]) | (code(x[j + half]) << 4);
        }
    };
    match format {
        QuantFormat::Q8 => {
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (c, v) in codes.iter_mut().zip(x) {
                *c = (v * id).round() as i8 as u8;
            }
            params[0] = f16::from_f32(d);
        }
        QuantFormat::Q4 => {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for &v in x {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            pack(codes, &|v| ((v * id + 8.5) as i8).min(15) as u8);
            params[0] = f16::from_f32(d);
        }
        QuantFormat::Q4_1 => {
            let min = x.iter().copied().fold(f32::MAX, f32::min);
            let max = x.iter().copied().fold(-f32::MAX, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            pack(codes, &|v| (((v - min) * id + 0.5) as i8).min(15) as u8);
            params[0] = f16::from_f32(d);
            params[1] = f16::from_f32(min);
        }
    }
}

/// Dequantizes `out.len() / 32` whole blocks of one row: `codes` holds their codes, `params`
/// their scales (and Q4_1's offsets), from the first of these blocks on (ggml's
/// `dequantize_row_q8_0` / `_q4_0` / `_q4_1`). The caller cuts the padding of a ragged last
/// block. Inlined, so that it vectorizes for the caller's target features (the Flex kernels
/// run it under run-time AVX2 / AVX-512 dispatch).
#[inline(always)]
pub(crate) fn dequantize_blocks(
    format: QuantFormat,
    codes: &[u8],
    params: &[f16],
    out: &mut [f32],
) {
    let (per, code_bytes) = (format.block_params(), format.code_bytes());
    let blocks = out
        .chunks_exact_mut(QUANT_BLOCK)
        .zip(codes.chunks_exact(code_bytes))
        .zip(params.chunks_exact(per));
    // One loop per format, iterators only (no indexing), and the 4-bit codes unpacked into a
    // block of bytes first, so that each block's conversion is one loop over 32 lanes that
    // vectorizes.
    let unpack = |codes: &[u8], nibbles: &mut [u8; QUANT_BLOCK]| {
        let (low, high) = nibbles.split_at_mut(QUANT_BLOCK / 2);
        for ((l, h), &c) in low.iter_mut().zip(high).zip(codes) {
            *l = c & 0x0F;
            *h = c >> 4;
        }
    };
    let mut nibbles = [0u8; QUANT_BLOCK];
    match format {
        QuantFormat::Q8 => {
            for ((out, codes), params) in blocks {
                let d = params[0].to_f32();
                for (o, &c) in out.iter_mut().zip(codes) {
                    *o = f32::from(c as i8) * d;
                }
            }
        }
        QuantFormat::Q4 => {
            for ((out, codes), params) in blocks {
                let d = params[0].to_f32();
                unpack(codes, &mut nibbles);
                for (o, &q) in out.iter_mut().zip(&nibbles) {
                    *o = f32::from(q as i8 - 8) * d;
                }
            }
        }
        QuantFormat::Q4_1 => {
            for ((out, codes), params) in blocks {
                let (d, m) = (params[0].to_f32(), params[1].to_f32());
                unpack(codes, &mut nibbles);
                for (o, &q) in out.iter_mut().zip(&nibbles) {
                    *o = f32::from(q) * d + m;
                }
            }
        }
    }
}

/// Dequantizes `out.len()` values of one row starting at column `col0` (a multiple of 32):
/// `codes` and `params` are the whole row's; a ragged end takes the front of its block.
#[inline(always)]
pub(crate) fn dequantize_span(
    format: QuantFormat,
    codes: &[u8],
    params: &[f16],
    col0: usize,
    out: &mut [f32],
) {
    debug_assert_eq!(col0 % QUANT_BLOCK, 0, "spans start on a block");
    let first = col0 / QUANT_BLOCK;
    let whole = out.len() / QUANT_BLOCK;
    let (code_bytes, per) = (format.code_bytes(), format.block_params());
    let (head, tail) = out.split_at_mut(whole * QUANT_BLOCK);
    dequantize_blocks(
        format,
        &codes[first * code_bytes..],
        &params[first * per..],
        head,
    );
    if !tail.is_empty() {
        let mut block = [0.0f32; QUANT_BLOCK];
        let at = first + whole;
        dequantize_blocks(
            format,
            &codes[at * code_bytes..],
            &params[at * per..(at + 1) * per],
            &mut block,
        );
        tail.copy_from_slice(&block[..tail.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::device;

    /// ggml's quantizers on hand-made blocks: Q8's halfway codes round away from zero, Q4's
    /// scale follows the sign of the largest magnitude, an all-zero block has scale 0.
    #[test]
    fn block_quantizers_follow_ggml() {
        let mut x = [0.0f32; QUANT_BLOCK];
        x[0] = 1.27;
        x[1] = 0.005; // 0.5 · d with d = 0.01: rounds away from zero to 1
        x[2] = -0.005;
        let mut codes = [0u8; 32];
        let mut d = [f16::ZERO; 2];
        quantize_block(QuantFormat::Q8, &x, &mut codes, &mut d[..1]);
        assert_eq!(d[0], f16::from_f32(0.01));
        assert_eq!(
            [
                codes[0] as i8,
                codes[1] as i8,
                codes[2] as i8,
                codes[3] as i8
            ],
            [127, 1, -1, 0]
        );

        x[5] = -1.6; // the largest magnitude, negative: d = 0.2
        quantize_block(QuantFormat::Q4, &x, &mut codes[..16], &mut d[..1]);
        assert_eq!(d[0], f16::from_f32(0.2));
        // 1.27 / 0.2 + 8.5 = 14.85 → 14; −1.6 → 0; 0 → 8 (value 0).
        assert_eq!(codes[0] & 0x0F, 14);
        assert_eq!(codes[5] & 0x0F, 0);
        assert_eq!(codes[3], 8 | (8 << 4));

        quantize_block(
            QuantFormat::Q4,
            &[0.0; QUANT_BLOCK],
            &mut codes[..16],
            &mut d[..1],
        );
        assert_eq!(d[0], f16::ZERO);
        let mut out = [1.0f32; QUANT_BLOCK];
        dequantize_blocks(QuantFormat::Q4, &codes[..16], &d[..1], &mut out);
        assert!(out.iter().all(|&v| v == 0.0));

        // Q4_1: offset = the minimum (−1.6), d = (1.27 + 1.6) / 15; the minimum codes 0.
        quantize_block(QuantFormat::Q4_1, &x, &mut codes[..16], &mut d);
        assert_eq!(d, [f16::from_f32(2.87 / 15.0), f16::from_f32(-1.6)]);
        assert_eq!(codes[5] & 0x0F, 0);
        assert_eq!(codes[0] & 0x0F, 15);
    }

    /// Ragged rows: the padded block quantizes like a zero-padded one and the dequantized
    /// matrix has the original width; bad input is an error naming the tensor.
    #[test]
    fn ragged_rows_and_bad_values() {
        let device = device();
        let values: Vec<f32> = (0..2 * 40).map(|i| (i as f32 - 40.0) / 64.0).collect();
        for format in [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::Q4_1] {
            let q = QuantizedMatrix::quantize(&values, [2, 40], format, "w", &device).unwrap();
            assert_eq!(q.dims(), [2, 40]);
            assert_eq!(q.layout().blocks(), 2);
            assert_eq!(q.size_bytes(), format.bytes(2, 40));
            let dense = q.dequantize().into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(dense.len(), 80);
            // The quantization error of a block is at most half a step, d / 2 ≤ amax / 14.
            for (a, b) in dense.iter().zip(&values) {
                assert!((a - b).abs() <= 40.0 / 64.0 / 14.0, "{a} vs {b}");
            }
        }
        let mut bad = values.clone();
        bad[43] = f32::NAN;
        let err = QuantizedMatrix::quantize(&bad, [2, 40], QuantFormat::Q4, "layers.0.q", &device)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layers.0.q") && err.contains("[1, 3]"),
            "{err}"
        );
        let err =
            QuantizedMatrix::from_ggml_blocks(&[0; 35], [1, 32], QuantFormat::Q8, "t", &device)
                .unwrap_err()
                .to_string();
        assert!(err.contains("35 bytes") && err.contains("Q8_0"), "{err}");
    }
}
