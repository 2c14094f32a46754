//! GGUF v2/v3 (llama.cpp) reader: metadata, tensor directory, and dequantization of F32, F16,
//! BF16, Q8_0, Q4_0 and Q4_1 into f32.
//!
//! Layout (llama.cpp `gguf.h`): magic `GGUF`, version, tensor count, metadata count, the
//! metadata key/values, the tensor infos (name, dims fastest-first, type, offset), then the data
//! section at the next multiple of `general.alignment` (default 32). All integers little-endian.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::{ModelError, Result};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// `f32` or `f64`.
    F64(f64),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U64(v) => Some(v),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F64(v) => Some(v),
            Self::U64(v) => Some(v as f64),
            Self::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// GGML tensor types this reader knows by name (ids from `ggml.h`).
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16..=23 => "IQ*",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        _ => "unknown",
    }
}

/// `(block elements, block bytes)` of the supported types.
fn block_layout(id: u32) -> Option<(usize, usize)> {
    match id {
        0 => Some((1, 4)),
        1 | 30 => Some((1, 2)),
        2 => Some((32, 18)),
        3 => Some((32, 20)),
        8 => Some((32, 34)),
        _ => None,
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    /// Dimensions in GGUF order (fastest-varying first).
    pub dims: Vec<usize>,
    /// GGML type id.
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The PyTorch-order shape (GGUF dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    /// GGML type name (`Q4_1`, ...).
    pub fn type_name(&self) -> &'static str {
        ggml_type_name(self.type_id)
    }
}

/// A parsed GGUF file held in memory.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor directory by name.
    pub tensors: BTreeMap<String, GgufTensorInfo>,
    data_start: usize,
}

/// A cursor over the file bytes with errors carrying the offset.
struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn error(&self, message: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                self.error(format!(
                    "file truncated: need {n} more bytes, {} left",
                    self.bytes.len() - self.pos
                ))
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        // No length can exceed the file; this turns garbage into an error instead of an
        // allocation failure.
        if n > self.bytes.len() as u64 {
            return Err(self.error(format!("{what} length {n} exceeds the file size")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len("string")?;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.error("string is not UTF-8"))
    }

    fn value(&mut self, type_id: u32, depth: usize) -> Result<GgufValue> {
        Ok(match type_id {
            0 => GgufValue::U64(u8::from_le_bytes(self.array()?) as u64),
            1 => GgufValue::I64(i8::from_le_bytes(self.array()?) as i64),
            2 => GgufValue::U64(u16::from_le_bytes(self.array()?) as u64),
            3 => GgufValue::I64(i16::from_le_bytes(self.array()?) as i64),
            4 => GgufValue::U64(self.u32()? as u64),
            5 => GgufValue::I64(i32::from_le_bytes(self.array()?) as i64),
            // The shortest decimal that round-trips the f32 (1e-5, not 9.99999974e-6), as the
            // HF config the GGUF was converted from states it.
            6 => {
                let v = f32::from_le_bytes(self.array()?);
                GgufValue::F64(v.to_string().parse().unwrap_or(v as f64))
            }
            7 => GgufValue::Bool(self.array::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.error("arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let n = self.len("array")?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.error(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Reads and parses `path` (the whole file is read into memory).
    ///
    /// # Errors
    /// I/O, a bad magic or version, a truncated header or data section (with the byte offset),
    /// or a tensor whose data would extend past the end of the file.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::parse(path, bytes)
    }

    /// Parses GGUF bytes; `path` is used in errors.
    ///
    /// # Errors
    /// As [`Self::open`].
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let mut r = Reader {
            path,
            bytes: &bytes,
            pos: 0,
        };
        if r.take(4)? != b"GGUF" {
            r.pos = 0;
            return Err(r.error("not a GGUF file (magic is not `GGUF`)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.error(format!("GGUF version {version} (supported: 2, 3)")));
        }
        let n_tensors = r.len("tensor count")?;
        let n_kv = r.len("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let type_id = r.u32()?;
            let value = r.value(type_id, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 4 {
                return Err(r.error(format!("tensor `{name}` has {n_dims} dimensions (max 4)")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.len("dimension")?);
            }
            let type_id = r.u32()?;
            let offset = r.u64()?;
            infos.push((
                name,
                GgufTensorInfo {
                    dims,
                    type_id,
                    offset,
                },
            ));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32) as usize;
        if alignment == 0 {
            return Err(r.error("general.alignment is 0"));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let tensors: BTreeMap<String, GgufTensorInfo> = infos.into_iter().collect();
        let file = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            bytes,
        };
        for name in file.tensors.keys() {
            // Validates the extent of every supported tensor up front: a truncated download
            // fails at open, naming the first tensor that does not fit.
            file.tensor_bytes(name)?;
        }
        Ok(file)
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The raw bytes of tensor `name`, or `None` for unknown names. Unsupported types return
    /// an empty slice (their size is unknown to this reader); [`Self::dequantize`] reports them.
    fn tensor_bytes(&self, name: &str) -> Result<Option<&[u8]>> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        let Some((block, block_bytes)) = block_layout(info.type_id) else {
            return Ok(Some(&[]));
        };
        let n: usize = info.dims.iter().product();
        if !n.is_multiple_of(block) {
            return Err(ModelError::Gguf {
                path: self.path.clone(),
                offset: info.offset,
                message: format!(
                    "tensor `{name}`: {n} elements is not a multiple of the {} block size {block}",
                    info.type_name()
                ),
            });
        }
        let len = n / block * block_bytes;
        let start = self.data_start as u64 + info.offset;
        let end = start + len as u64;
        if end > self.bytes.len() as u64 {
            return Err(ModelError::Gguf {
                path: self.path.clone(),
                offset: start,
                message: format!(
                    "file truncated: tensor `{name}` ({}, {len} bytes) ends at byte {end}, \
                     the file has {}",
                    info.type_name(),
                    self.bytes.len()
                ),
            });
        }
        Ok(Some(&self.bytes[start as usize..end as usize]))
    }

    /// Tensor `name` dequantized to f32, in GGUF element order (row-major over the
    /// PyTorch-order shape). `None` for unknown names.
    ///
    /// # Errors
    /// An unsupported type ([`ModelError::UnsupportedQuantization`], naming the tensor).
    pub fn dequantize(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        if block_layout(info.type_id).is_none() {
            return Err(ModelError::UnsupportedQuantization {
                path: self.path.clone(),
                name: name.to_string(),
                type_name: info.type_name().to_string(),
                type_id: info.type_id,
            });
        }
        let data = self.tensor_bytes(name)?.expect("tensor exists");
        Ok(Some(dequantize_blocks(info.type_id, data)))
    }
}

/// Dequantizes raw GGML data of a supported type.
fn dequantize_blocks(type_id: u32, data: &[u8]) -> Vec<f32> {
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match type_id {
        0 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        1 => data.chunks_exact(2).map(|b| f16_at(b, 0)).collect(),
        30 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        // Q4_0: d (f16), 16 bytes of nibbles; w[j] = d·(lo - 8), w[j + 16] = d·(hi - 8).
        2 => data
            .chunks_exact(18)
            .flat_map(|b| {
                let d = f16_at(b, 0);
                let q = &b[2..18];
                let lo = q.iter().map(move |&x| d * ((x & 0x0F) as f32 - 8.0));
                let hi = q.iter().map(move |&x| d * ((x >> 4) as f32 - 8.0));
                lo.chain(hi).collect::<Vec<_>>()
            })
            .collect(),
        // Q4_1: d, m (f16), 16 bytes of nibbles; w[j] = d·lo + m, w[j + 16] = d·hi + m.
        3 => data
            .chunks_exact(20)
            .flat_map(|b| {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let q = &b[4..20];
                let lo = q.iter().map(move |&x| d * (x & 0x0F) as f32 + m);
                let hi = q.iter().map(move |&x| d * (x >> 4) as f32 + m);
                lo.chain(hi).collect::<Vec<_>>()
            })
            .collect(),
        // Q8_0: d (f16), 32 × i8; w = d·q.
        8 => data
            .chunks_exact(34)
            .flat_map(|b| {
                let d = f16_at(b, 0);
                b[2..34].iter().map(move |&x| d * (x as i8) as f32)
            })
            .collect(),
        other => unreachable!("dequantize_blocks called for unsupported type {other}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a GGUF v3 file with the given string metadata and F32/raw tensors.
    pub(crate) fn build_gguf(
        metadata: &[(&str, GgufValue)],
        tensors: &[(&str, Vec<usize>, u32, Vec<u8>)],
    ) -> Vec<u8> {
        fn put_str(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
            match v {
                GgufValue::U64(x) => {
                    out.extend(10u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                GgufValue::I64(x) => {
                    out.extend(11u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                GgufValue::F64(x) => {
                    out.extend(12u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                GgufValue::Bool(x) => {
                    out.extend(7u32.to_le_bytes());
                    out.push(*x as u8);
                }
                GgufValue::String(s) => {
                    out.extend(8u32.to_le_bytes());
                    put_str(out, s);
                }
                GgufValue::Array(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for item in items {
                        put_str(out, item.as_str().expect("string arrays only"));
                    }
                }
            }
        }
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, type_id, data) in tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend((*d as u64).to_le_bytes());
            }
            out.extend(type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        for (_, _, _, data) in tensors {
            out.extend(data);
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
        }
        out
    }

    #[test]
    fn dequantizes_each_block_format() {
        let d = f16::from_f32(0.5).to_le_bytes();
        let m = f16::from_f32(-1.0).to_le_bytes();
        let nibbles: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        // Q4_0
        let mut q40 = d.to_vec();
        q40.extend(&nibbles);
        let w = dequantize_blocks(2, &q40);
        assert_eq!(w[0], 0.5 * (0.0 - 8.0));
        assert_eq!(w[15], 0.5 * (15.0 - 8.0));
        assert_eq!(w[16], 0.5 * (15.0 - 8.0));
        assert_eq!(w[31], 0.5 * (0.0 - 8.0));
        // Q4_1
        let mut q41 = d.to_vec();
        q41.extend(m);
        q41.extend(&nibbles);
        let w = dequantize_blocks(3, &q41);
        assert_eq!(w[1], 0.5 * 1.0 - 1.0);
        assert_eq!(w[17], 0.5 * 14.0 - 1.0);
        // Q8_0
        let mut q80 = d.to_vec();
        q80.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let w = dequantize_blocks(8, &q80);
        assert_eq!(w[0], -8.0);
        assert_eq!(w[31], 7.5);
        // BF16 / F16
        assert_eq!(
            dequantize_blocks(30, &bf16::from_f32(3.0).to_le_bytes()),
            [3.0]
        );
        assert_eq!(
            dequantize_blocks(1, &f16::from_f32(-2.5).to_le_bytes()),
            [-2.5]
        );
    }

    #[test]
    fn truncation_and_unknown_types_are_named() {
        let data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut bytes = build_gguf(
            &[("general.architecture", GgufValue::String("llama".into()))],
            &[
                ("a.weight", vec![4, 2], 0, data),
                ("b.weight", vec![32], 12, vec![0; 144]),
            ],
        );
        let ok = GgufFile::parse(Path::new("m.gguf"), bytes.clone()).unwrap();
        assert_eq!(ok.tensors["a.weight"].shape(), vec![2, 4]);
        assert_eq!(ok.dequantize("a.weight").unwrap().unwrap()[5], 5.0);
        let err = ok.dequantize("b.weight").unwrap_err().to_string();
        assert!(err.contains("`b.weight`") && err.contains("Q4_K"), "{err}");
        bytes.truncate(bytes.len() - 40);
        // b's data is cut; it is unsupported, so only its use fails. Cut a's data next.
        assert!(GgufFile::parse(Path::new("m.gguf"), bytes).is_ok());
        let data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut bytes = build_gguf(&[], &[("a.weight", vec![4, 2], 0, data)]);
        bytes.truncate(bytes.len() - 20);
        let err = GgufFile::parse(Path::new("m.gguf"), bytes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("truncated") && err.contains("`a.weight`"),
            "{err}"
        );
        let err = GgufFile::parse(Path::new("m.gguf"), b"GGML0000".to_vec())
            .unwrap_err()
            .to_string();
        assert!(err.contains("magic"), "{err}");
    }
}
