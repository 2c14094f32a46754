//! GGUF v2/v3 (llama.cpp) reader: metadata, tensor directory, and dequantization of F32, F16,
//! BF16, Q8_0, Q4_0, Q4_1 and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K into f32.
//!
//! Layout (llama.cpp `gguf.h`): magic `GGUF`, version, tensor count, metadata count, the
//! metadata key/values, the tensor infos (name, dims fastest-first, type, offset), then the data
//! section at the next multiple of `general.alignment` (default 32). All integers little-endian.
//!
//! Only the header is read when a file is opened; each tensor is read from its own position
//! when it is dequantized, so peak memory is the metadata plus one tensor. Everything the header
//! declares is checked before it sizes an allocation: counts and lengths against the bytes left
//! in the file and against [`disha_core::limits::Limits`], every tensor's element count and
//! byte size with checked arithmetic, every type id against ggml's table, and every tensor slot
//! against the data section — aligned, inside the file, overlapping no other.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use disha_core::limits::{Limits, exceeds, limits};
use half::{bf16, f16};

use crate::error::{ModelError, Result};

mod kquants;

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

/// ggml's tensor types: `(id, name, block elements, block bytes)` (`ggml.h` / `ggml-common.h`);
/// ids 4, 5, 31–33 and 36–38 were removed from the format.
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

fn ggml_type(id: u32) -> Option<(&'static str, u64, u64)> {
    GGML_TYPES
        .iter()
        .find(|t| t.0 == id)
        .map(|&(_, name, block, bytes)| (name, block, bytes))
}

/// GGML type name of `id` (`Q4_1`, ...; `unknown` for ids not in ggml's table).
fn ggml_type_name(id: u32) -> &'static str {
    ggml_type(id).map_or("unknown", |t| t.0)
}

/// The types this reader dequantizes.
fn is_supported(id: u32) -> bool {
    matches!(id, 0 | 1 | 2 | 3 | 8 | 10..=15 | 30)
}

/// One entry of the tensor directory (validated when the file was opened).
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    /// Dimensions in GGUF order (fastest-varying first).
    pub dims: Vec<usize>,
    /// GGML type id.
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes the tensor occupies.
    pub byte_len: u64,
}

impl GgufTensorInfo {
    /// The PyTorch-order shape (GGUF dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// GGML type name (`Q4_1`, ...).
    pub fn type_name(&self) -> &'static str {
        ggml_type_name(self.type_id)
    }
}

/// Where the tensor data is read from.
#[derive(Debug)]
enum Source {
    File(File),
    Memory(Vec<u8>),
}

/// What the header declares, before the tensor slots are checked against the file.
struct Header {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    infos: Vec<(String, GgufTensorInfo)>,
    alignment: u64,
    data_start: u64,
}

/// A GGUF file: the parsed header, and a handle for reading tensors one at a time.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    source: Source,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor directory by name.
    pub tensors: BTreeMap<String, GgufTensorInfo>,
    data_start: u64,
}

/// Bytes of the smallest metadata value of each type (arrays: type + count).
fn min_value_bytes(type_id: u32) -> Option<u64> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

/// A cursor over the header with errors carrying the offset, bounded by the file's length and
/// the limits.
struct HeaderReader<'a, R> {
    path: &'a Path,
    inner: R,
    pos: u64,
    len: u64,
    limits: Limits,
    /// Bytes the decoded metadata and tensor table occupy in memory (bounded by
    /// `max_header_bytes`).
    decoded: u64,
}

impl<R: Read> HeaderReader<'_, R> {
    fn error(&self, message: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            offset: self.pos,
            message: message.into(),
        }
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    /// Counts `bytes` of decoded header against `max_header_bytes`.
    fn charge(&mut self, bytes: u64) -> Result<()> {
        self.decoded = self.decoded.saturating_add(bytes);
        if self.decoded > self.limits.max_header_bytes {
            return Err(self.error(format!(
                "metadata and tensor table: {} bytes in memory",
                exceeds(
                    format!("above {}", self.limits.max_header_bytes),
                    "max_header_bytes",
                    self.limits.max_header_bytes
                )
            )));
        }
        Ok(())
    }

    fn take(&mut self, n: u64) -> Result<Vec<u8>> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "file truncated: need {n} more bytes, {} left",
                self.remaining()
            )));
        }
        let mut out = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut out)
            .map_err(|e| ModelError::io(self.path, e))?;
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items each at least `min_item_bytes` long, bounded by what is left in the
    /// file and by `limit` (named `limit_name` in the error).
    fn count(
        &mut self,
        what: &str,
        min_item_bytes: u64,
        limit: u64,
        limit_name: &str,
    ) -> Result<u64> {
        let n = self.u64()?;
        if n > limit {
            return Err(self.error(format!("{what} {}", exceeds(n, limit_name, limit))));
        }
        if n.saturating_mul(min_item_bytes) > self.remaining() {
            return Err(self.error(format!(
                "{what} {n} needs at least {} bytes, the file has {} left",
                n.saturating_mul(min_item_bytes),
                self.remaining()
            )));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let max = self.limits.max_string_bytes;
        let n = self.count(&format!("{what} length"), 1, max, "max_string_bytes")?;
        self.charge(n + std::mem::size_of::<String>() as u64)?;
        let raw = self.take(n)?;
        String::from_utf8(raw).map_err(|_| self.error(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, key: &str, type_id: u32, depth: usize) -> Result<GgufValue> {
        self.charge(std::mem::size_of::<GgufValue>() as u64)?;
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
            8 => GgufValue::String(self.string(&format!("value of `{key}`"))?),
            9 => {
                if depth >= 2 {
                    return Err(self.error(format!("`{key}`: arrays nested too deeply")));
                }
                let inner = self.u32()?;
                let min = min_value_bytes(inner).ok_or_else(|| {
                    self.error(format!("`{key}`: unknown array element type {inner}"))
                })?;
                let max = self.limits.max_array_len;
                let n = self.count(&format!("`{key}` array length"), min, max, "max_array_len")?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(key, inner, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(self.error(format!("`{key}`: unknown metadata value type {other}")));
            }
        })
    }

    /// One tensor-table entry: name, dims, type, offset, with the element count and byte size
    /// computed with checked arithmetic.
    fn tensor_info(&mut self) -> Result<(String, GgufTensorInfo)> {
        let name = self.string("tensor name")?;
        let n_dims = self.u32()?;
        if n_dims > 4 {
            return Err(self.error(format!("tensor `{name}` has {n_dims} dimensions (max 4)")));
        }
        self.charge(8 * n_dims as u64 + 64)?;
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut elements: u64 = 1;
        for _ in 0..n_dims {
            let d = self.u64()?;
            if d == 0 {
                return Err(self.error(format!("tensor `{name}` has a dimension of size 0")));
            }
            elements = elements
                .checked_mul(d)
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| {
                    self.error(format!(
                        "tensor `{name}`: dimensions overflow the element count"
                    ))
                })?;
            dims.push(d);
        }
        let type_id = self.u32()?;
        let offset = self.u64()?;
        let (type_name, block, block_bytes) = ggml_type(type_id).ok_or_else(|| {
            self.error(format!(
                "tensor `{name}`: unknown GGML type id {type_id} (this reader knows {})",
                GGML_TYPES
                    .iter()
                    .map(|t| t.1)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let row = dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return Err(self.error(format!(
                "tensor `{name}`: row length {row} is not a multiple of the {type_name} block \
                 size {block}"
            )));
        }
        let byte_len = (elements / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| self.error(format!("tensor `{name}`: byte size overflows")))?;
        let dims = dims
            .into_iter()
            .map(|d| usize::try_from(d).expect("each dimension is at most the i64 element count"))
            .collect();
        Ok((
            name,
            GgufTensorInfo {
                dims,
                type_id,
                offset,
                byte_len,
            },
        ))
    }
}

impl GgufFile {
    /// Opens `path` and parses its header; tensor data stays on disk until
    /// [`Self::dequantize`] reads it.
    ///
    /// # Errors
    /// I/O; a bad magic or version; a truncated or oversized header; a count, length, type or
    /// tensor slot that the file cannot hold (each with the byte offset and, where there is
    /// one, the key or tensor).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let header = Self::parse_header(path, BufReader::new(&file), len)?;
        Self::assemble(path, Source::File(file), len, header)
    }

    /// Parses GGUF bytes held in memory; `path` is used in errors.
    ///
    /// # Errors
    /// As [`Self::open`].
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let len = bytes.len() as u64;
        let header = Self::parse_header(path, bytes.as_slice(), len)?;
        Self::assemble(path, Source::Memory(bytes), len, header)
    }

    fn parse_header<R: Read>(path: &Path, inner: R, len: u64) -> Result<Header> {
        let limits = limits();
        let mut r = HeaderReader {
            path,
            inner,
            pos: 0,
            len,
            limits: limits.clone(),
            decoded: 0,
        };
        if r.take(4).ok().as_deref() != Some(b"GGUF") {
            r.pos = 0;
            return Err(r.error("not a GGUF file (magic is not `GGUF`)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.error(format!("GGUF version {version} (supported: 2, 3)")));
        }
        // Smallest tensor-table entry: name length, n_dims, type, offset.
        let n_tensors = r.count(
            "tensor count",
            24,
            limits.max_tensor_count,
            "max_tensor_count",
        )?;
        // Smallest key/value: key length, value type, a one-byte value.
        let n_kv = r.count("metadata count", 13, u64::MAX, "")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let type_id = r.u32()?;
            let value = r.value(&key, type_id, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(r.error(format!("metadata key `{key}` appears twice")));
            }
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            infos.push(r.tensor_info()?);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| r.error(format!("general.alignment {v:?} is not a power of two")))?,
        };
        let data_start = r
            .pos
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| r.error("general.alignment overflows the data offset"))?;
        Ok(Header {
            version,
            metadata,
            infos,
            alignment,
            data_start,
        })
    }

    /// Checks every tensor slot against the data section and builds the file.
    fn assemble(path: &Path, source: Source, len: u64, header: Header) -> Result<Self> {
        let Header {
            version,
            metadata,
            infos,
            alignment,
            data_start,
        } = header;
        let data_len = len.saturating_sub(data_start);
        let error = |offset: u64, message: String| ModelError::Gguf {
            path: path.to_path_buf(),
            offset,
            message,
        };
        let mut tensors = BTreeMap::new();
        for (name, info) in infos {
            if !info.offset.is_multiple_of(alignment) {
                return Err(error(
                    data_start,
                    format!(
                        "tensor `{name}`: offset {} is not a multiple of the alignment {alignment}",
                        info.offset
                    ),
                ));
            }
            let end = info.offset.checked_add(info.byte_len);
            if end.is_none_or(|end| end > data_len) {
                return Err(error(
                    data_start,
                    format!(
                        "file truncated or tensor table corrupt: tensor `{name}` ({}, {} bytes at \
                         data offset {}) ends past the {data_len} bytes of data",
                        info.type_name(),
                        info.byte_len,
                        info.offset
                    ),
                ));
            }
            if tensors.insert(name.clone(), info).is_some() {
                return Err(error(
                    data_start,
                    format!("tensor `{name}` is listed twice"),
                ));
            }
        }
        let mut by_offset: Vec<(&String, &GgufTensorInfo)> = tensors.iter().collect();
        by_offset.sort_by_key(|(_, t)| (t.offset, t.byte_len));
        for pair in by_offset.windows(2) {
            let ((a, ta), (b, tb)) = (pair[0], pair[1]);
            if ta.offset + ta.byte_len > tb.offset {
                return Err(error(
                    data_start + tb.offset,
                    format!(
                        "tensor `{b}` (data offset {}) overlaps tensor `{a}` ({}, {} bytes at \
                         data offset {})",
                        tb.offset,
                        ta.type_name(),
                        ta.byte_len,
                        ta.offset
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            source,
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The raw bytes of tensor `name` as stored (ggml blocks for a quantized type), `None` for
    /// unknown names. The length was checked against the file when it was opened.
    ///
    /// # Errors
    /// I/O.
    pub fn raw(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(info.byte_len as usize);
        self.read_chunks(info, 1 << 20, |bytes| out.extend_from_slice(bytes))?;
        Ok(Some(out))
    }

    /// Tensor `name` dequantized to f32, in GGUF element order (row-major over the
    /// PyTorch-order shape). `None` for unknown names. The data is read in chunks of whole
    /// blocks, so memory is the result plus a small buffer.
    ///
    /// # Errors
    /// An unsupported type ([`ModelError::UnsupportedQuantization`], naming the tensor), or
    /// I/O.
    pub fn dequantize(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(info) = self.tensors.get(name) else {
            return Ok(None);
        };
        if !is_supported(info.type_id) {
            return Err(ModelError::UnsupportedQuantization {
                path: self.path.clone(),
                name: name.to_string(),
                type_name: info.type_name().to_string(),
                type_id: info.type_id,
            });
        }
        let (_, block, block_bytes) = ggml_type(info.type_id).expect("validated at open");
        let mut out = Vec::with_capacity(info.elements());
        let chunk = ((1 << 20) / block_bytes).max(1) * block_bytes;
        self.read_chunks(info, chunk, |bytes| {
            dequantize_into(info.type_id, bytes, &mut out)
        })?;
        debug_assert_eq!(out.len() as u64, info.byte_len / block_bytes * block);
        Ok(Some(out))
    }

    /// Hands the bytes of the tensor `info` describes to `each`: from a file in pieces of at
    /// most `chunk` bytes read one at a time (whole blocks when `chunk` is a multiple of the
    /// block size), from memory whole.
    fn read_chunks(
        &self,
        info: &GgufTensorInfo,
        chunk: u64,
        mut each: impl FnMut(&[u8]),
    ) -> Result<()> {
        let start = self.data_start + info.offset;
        match &self.source {
            Source::Memory(bytes) => each(&bytes[start as usize..(start + info.byte_len) as usize]),
            Source::File(file) => {
                let io = |e| ModelError::io(&self.path, e);
                let mut reader = file;
                reader.seek(SeekFrom::Start(start)).map_err(io)?;
                let mut buffer = vec![0u8; chunk.min(info.byte_len) as usize];
                let mut left = info.byte_len;
                while left > 0 {
                    let n = left.min(chunk) as usize;
                    reader.read_exact(&mut buffer[..n]).map_err(io)?;
                    each(&buffer[..n]);
                    left -= n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Dequantizes whole blocks of raw GGML data of a supported type, appending to `out`.
fn dequantize_into(type_id: u32, data: &[u8], out: &mut Vec<f32>) {
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match type_id {
        0 => out.extend(
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        1 => out.extend(data.chunks_exact(2).map(|b| f16_at(b, 0))),
        30 => out.extend(
            data.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        // Q4_0: d (f16), 16 bytes of nibbles; w[j] = d·(lo - 8), w[j + 16] = d·(hi - 8).
        2 => {
            for b in data.chunks_exact(18) {
                let d = f16_at(b, 0);
                let q = &b[2..18];
                out.extend(q.iter().map(|&x| d * ((x & 0x0F) as f32 - 8.0)));
                out.extend(q.iter().map(|&x| d * ((x >> 4) as f32 - 8.0)));
            }
        }
        // Q4_1: d, m (f16), 16 bytes of nibbles; w[j] = d·lo + m, w[j + 16] = d·hi + m.
        3 => {
            for b in data.chunks_exact(20) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let q = &b[4..20];
                out.extend(q.iter().map(|&x| d * (x & 0x0F) as f32 + m));
                out.extend(q.iter().map(|&x| d * (x >> 4) as f32 + m));
            }
        }
        // Q8_0: d (f16), 32 × i8; w = d·q.
        8 => {
            for b in data.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&x| d * (x as i8) as f32));
            }
        }
        10 => kquants::q2_k(data, out),
        11 => kquants::q3_k(data, out),
        12 => kquants::q4_k(data, out),
        13 => kquants::q5_k(data, out),
        14 => kquants::q6_k(data, out),
        15 => kquants::q8_k(data, out),
        other => unreachable!("dequantize_into called for unsupported type {other}"),
    }
}

/// Dequantizes raw GGML data of a supported type (tests).
#[cfg(test)]
fn dequantize_blocks(type_id: u32, data: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    dequantize_into(type_id, data, &mut out);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a GGUF v3 file with the given string metadata and F32/raw tensors.
    pub(crate) fn build_gguf(
        metadata: &[(&str, GgufValue)],
        tensors: &[(&str, Vec<usize>, u32, Vec<u8>)],
    ) -> Vec<u8> {
        build_gguf_with_offsets(metadata, tensors, &[])
    }

    /// [`build_gguf`] where the first `offsets.len()` tensors declare the given data offsets
    /// instead of their real ones (to write corrupt tensor tables).
    pub(crate) fn build_gguf_with_offsets(
        metadata: &[(&str, GgufValue)],
        tensors: &[(&str, Vec<usize>, u32, Vec<u8>)],
        offsets: &[u64],
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
        for (i, (name, dims, type_id, data)) in tensors.iter().enumerate() {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend((*d as u64).to_le_bytes());
            }
            out.extend(type_id.to_le_bytes());
            out.extend(offsets.get(i).copied().unwrap_or(offset).to_le_bytes());
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

    fn f32_bytes(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    fn parse_error(bytes: Vec<u8>) -> String {
        GgufFile::parse(Path::new("m.gguf"), bytes)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn truncation_and_unknown_types_are_named() {
        let bytes = build_gguf(
            &[("general.architecture", GgufValue::String("llama".into()))],
            &[
                ("a.weight", vec![4, 2], 0, f32_bytes(8)),
                ("c.weight", vec![256, 2], 12, vec![0x11; 288]),
                ("b.weight", vec![256], 16, vec![0; 66]),
            ],
        );
        let ok = GgufFile::parse(Path::new("m.gguf"), bytes.clone()).unwrap();
        assert_eq!(ok.tensors["a.weight"].shape(), vec![2, 4]);
        assert_eq!(ok.dequantize("a.weight").unwrap().unwrap()[5], 5.0);
        // Q4_K: two blocks, each `d = dmin = f16(0x1111)`, scales and minimums from the 0x11
        // bytes (sub-block 0: 17, 17), every nibble 1: `d·17·1 − dmin·17 = 0`.
        let q4k = ok.dequantize("c.weight").unwrap().unwrap();
        assert_eq!(q4k.len(), 512);
        assert_eq!(q4k[0], 0.0);
        let err = ok.dequantize("b.weight").unwrap_err().to_string();
        assert!(
            err.contains("`b.weight`") && err.contains("IQ2_XXS"),
            "{err}"
        );
        // Every slot is checked at open, supported type or not: cutting b's data fails there.
        let mut cut = bytes.clone();
        cut.truncate(cut.len() - 40);
        let err = parse_error(cut);
        assert!(
            err.contains("truncated") && err.contains("`b.weight`"),
            "{err}"
        );
        let err = parse_error(b"GGML0000".to_vec());
        assert!(err.contains("magic"), "{err}");
        // The same file read from disk, tensor by tensor.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(
            file.dequantize("a.weight").unwrap(),
            ok.dequantize("a.weight").unwrap()
        );
    }

    #[test]
    fn tensor_slots_must_fit_the_file_and_not_overlap() {
        let tensors = [
            ("a.weight", vec![8], 0, f32_bytes(8)),
            ("b.weight", vec![8], 0, f32_bytes(8)),
        ];
        // An offset near 2^64 (once wrapped into all-NaN logits) is past the data.
        let err = parse_error(build_gguf_with_offsets(&[], &tensors, &[u64::MAX - 31]));
        assert!(
            err.contains("`a.weight`") && err.contains("ends past"),
            "{err}"
        );
        // An offset that is not a multiple of the alignment.
        let err = parse_error(build_gguf_with_offsets(&[], &tensors, &[4]));
        assert!(
            err.contains("`a.weight`") && err.contains("alignment 32"),
            "{err}"
        );
        // A declared type needing more bytes than its slot reads into the next tensor.
        let wide = [
            ("a.weight", vec![16], 0, f32_bytes(8)),
            ("b.weight", vec![8], 0, f32_bytes(8)),
        ];
        let err = parse_error(build_gguf(&[], &wide));
        assert!(
            err.contains("`b.weight`") && err.contains("overlaps tensor `a.weight`"),
            "{err}"
        );
        // Unknown type ids, zero and overflowing dimensions, and rows that split blocks.
        let err = parse_error(build_gguf(&[], &[("a.weight", vec![8], 31, f32_bytes(8))]));
        assert!(
            err.contains("`a.weight`") && err.contains("unknown GGML type id 31"),
            "{err}"
        );
        let err = parse_error(build_gguf(&[], &[("a.weight", vec![8, 0], 0, vec![])]));
        assert!(err.contains("size 0"), "{err}");
        let err = parse_error(build_gguf(
            &[],
            &[("a.weight", vec![1 << 40, 1 << 40], 0, vec![])],
        ));
        assert!(err.contains("overflow"), "{err}");
        let err = parse_error(build_gguf(&[], &[("a.weight", vec![48], 8, vec![0; 34])]));
        assert!(
            err.contains("row length 48") && err.contains("Q8_0"),
            "{err}"
        );
        let err = parse_error(build_gguf(
            &[("general.alignment", GgufValue::U64(24))],
            &[],
        ));
        assert!(err.contains("power of two"), "{err}");
    }

    #[test]
    fn counts_and_lengths_are_bounded_by_the_file_and_the_limits() {
        let mut bytes = build_gguf(&[("k", GgufValue::String("v".into()))], &[]);
        // Tensor count (bytes 8..16) and metadata count (16..24) far beyond the file.
        bytes[8..16].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(parse_error(bytes.clone()).contains("max_tensor_count"));
        bytes[8..16].copy_from_slice(&1000u64.to_le_bytes());
        let err = parse_error(bytes.clone());
        assert!(err.contains("tensor count 1000 needs at least"), "{err}");
        bytes[8..16].copy_from_slice(&0u64.to_le_bytes());
        bytes[16..24].copy_from_slice(&(u64::MAX).to_le_bytes());
        assert!(parse_error(bytes.clone()).contains("metadata count"));
        bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
        // The key's length (bytes 24..32).
        bytes[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(parse_error(bytes.clone()).contains("max_string_bytes"));
        // An array claiming more elements than the file holds.
        let mut arr = build_gguf(
            &[("a", GgufValue::Array(vec![GgufValue::String("x".into())]))],
            &[],
        );
        // key len (8) + "a" (1) + type (4) + element type (4) = count at 24 + 17.
        arr[41..49].copy_from_slice(&(1u64 << 30).to_le_bytes());
        assert!(parse_error(arr).contains("`a` array length"));
    }
}
