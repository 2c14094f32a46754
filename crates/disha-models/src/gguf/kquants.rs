//! ggml's K-quant formats: super-blocks of 256 weights split into sub-blocks of 16 or 32, each
//! sub-block with its own quantized scale (and minimum), the super-block with one or two `f16`
//! factors for those (`Q8_K`: one `f32`). Layouts are ggml's `block_q*_K` structs
//! (`ggml-common.h`); values are computed as ggml's `dequantize_row_q*_K` computes them — the same
//! `f32` operations in the same order, so the same bits (the tests hold them to the `gguf`
//! package's numpy dequantizers bit for bit).
//!
//! Every function takes whole blocks (`data.len()` a multiple of the block size; the caller's
//! chunks are) and appends 256 weights per block to `out`. Any bit pattern is a block: nothing
//! here can fail.

use half::f16;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 2-bit field of weight `e` (0..256) when four fields share a byte: 32-byte groups of
/// 128 weights, the shift selecting the 32-weight quarter (`Q2_K`, `Q3_K` low bits, and
/// `Q6_K`'s high bits within each 128-weight half).
fn crumb(bytes: &[u8], e: usize) -> u8 {
    (bytes[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3
}

/// `Q2_K` (84 bytes): `scales[16]` (low nibble scale, high nibble minimum, per 16 weights),
/// `qs[64]` (2 bits per weight), `d`, `dmin` (f16). `w = d·sc · q − dmin·m`.
pub(super) fn q2_k(data: &[u8], out: &mut Vec<f32>) {
    for b in data.chunks_exact(84) {
        let (scales, qs) = (&b[..16], &b[16..80]);
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        for (j, &sc) in scales.iter().enumerate() {
            let dl = d * f32::from(sc & 0xF);
            let ml = dmin * f32::from(sc >> 4);
            out.extend((16 * j..16 * (j + 1)).map(|e| dl * f32::from(crumb(qs, e)) - ml));
        }
    }
}

/// `Q3_K` (110 bytes): `hmask[32]` (the third bit; set means no −4 offset), `qs[64]` (low 2
/// bits), `scales[12]` (16 six-bit scales, offset by 32), `d` (f16). `w = d·(s − 32) · q`.
pub(super) fn q3_k(data: &[u8], out: &mut Vec<f32>) {
    for b in data.chunks_exact(110) {
        let (hmask, qs, scales) = (&b[..32], &b[32..96], &b[96..108]);
        let d = f16_at(b, 108);
        for j in 0..16 {
            let low = (scales[j % 8] >> (4 * (j / 8))) & 0xF;
            let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
            let dl = d * f32::from((low | (high << 4)) as i8 - 32);
            out.extend((16 * j..16 * (j + 1)).map(|e| {
                let offset = if (hmask[e % 32] >> (e / 32)) & 1 == 1 {
                    0
                } else {
                    4
                };
                dl * f32::from(crumb(qs, e) as i8 - offset)
            }));
        }
    }
}

/// Scale and minimum of sub-block `j` (0..8) of `Q4_K` / `Q5_K`: 6 bits each, packed in 12
/// bytes (ggml's `get_scale_min_k4`).
fn scale_min_k4(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// `Q4_K` (144 bytes): `d`, `dmin` (f16), `scales[12]`, `qs[128]` (4 bits per weight; sub-block
/// `j` of 32 is nibble `j % 2` of bytes `32·(j/2)..`). `w = d·sc · q − dmin·m`.
pub(super) fn q4_k(data: &[u8], out: &mut Vec<f32>) {
    for b in data.chunks_exact(144) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(scales, j);
            let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
            let shift = 4 * (j % 2);
            let bytes = &qs[32 * (j / 2)..32 * (j / 2 + 1)];
            out.extend(
                bytes
                    .iter()
                    .map(|&x| d1 * f32::from((x >> shift) & 0xF) - m1),
            );
        }
    }
}

/// `Q5_K` (176 bytes): as `Q4_K` plus `qh[32]` (the fifth bit: bit `j` of byte `l` for weight `l`
/// of sub-block `j`), between the scales and `qs[128]`.
pub(super) fn q5_k(data: &[u8], out: &mut Vec<f32>) {
    for b in data.chunks_exact(176) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(scales, j);
            let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
            let shift = 4 * (j % 2);
            let bytes = &qs[32 * (j / 2)..32 * (j / 2 + 1)];
            out.extend(bytes.iter().zip(qh).map(|(&x, &h)| {
                let q = ((x >> shift) & 0xF) | (((h >> j) & 1) << 4);
                d1 * f32::from(q) - m1
            }));
        }
    }
}

/// `Q6_K` (210 bytes): `ql[128]` (low 4 bits), `qh[64]` (high 2 bits), `scales[16]` (i8, per
/// 16 weights), `d` (f16). `w = d·s · (q − 32)`; each 128-weight half reads 64 bytes of `ql`
/// (nibble by 64-weight quarter pair) and 32 of `qh`.
pub(super) fn q6_k(data: &[u8], out: &mut Vec<f32>) {
    for b in data.chunks_exact(210) {
        let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208);
        for (j, &s) in scales.iter().enumerate() {
            let dl = d * f32::from(s as i8);
            out.extend((16 * j..16 * (j + 1)).map(|e| {
                let (half, r) = (e / 128, e % 128);
                let low = (ql[64 * half + r % 64] >> (4 * (r / 64))) & 0xF;
                let high = crumb(qh, e);
                dl * f32::from((low | (high << 4)) as i8 - 32)
            }));
        }
    }
}

/// `Q8_K` (292 bytes): `d` (f32), `qs[256]` (i8), `bsums[16]` (i16 sums for ggml's dot
/// products; not needed here). `w = d · q`.
pub(super) fn q8_k(data: &[u8], out: &mut Vec<f32>) {
    for b in data.chunks_exact(292) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        out.extend(b[4..260].iter().map(|&q| d * f32::from(q as i8)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::dequantize_blocks;
    use std::path::Path;

    /// Every K-quant type against the `gguf` package's numpy dequantizer (ggml's formulas), bit
    /// for bit: three blocks of random bytes each with finite scales
    /// (`tests/fixtures/gguf_kquants/generate.py`).
    #[test]
    fn k_quants_match_ggml_bit_for_bit() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_kquants/kquants.json");
        let text = std::fs::read_to_string(&path).expect("the bundled K-quant fixture");
        let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let types = json["types"].as_object().expect("a `types` map");
        assert_eq!(types.len(), 6, "Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K");
        for (name, case) in types {
            let type_id = case["type_id"].as_u64().unwrap() as u32;
            let hex = case["bytes"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            let expected: Vec<u32> = case["value_bits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let ours: Vec<u32> = dequantize_blocks(type_id, &bytes)
                .into_iter()
                .map(f32::to_bits)
                .collect();
            assert_eq!(ours.len(), expected.len(), "{name}: weight count");
            if let Some(i) = (0..ours.len()).find(|&i| ours[i] != expected[i]) {
                panic!(
                    "{name}: weight {i} is {} where ggml gives {}",
                    f32::from_bits(ours[i]),
                    f32::from_bits(expected[i])
                );
            }
        }
    }
}
