//! A safetensors file read tensor by tensor: the header is parsed and validated when the file
//! is opened, and each tensor's bytes are read from its own position when asked for, so peak
//! memory is one tensor, never the whole file.
//!
//! Layout: an 8-byte little-endian header length `N`, `N` bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {…}}`), then
//! the data. Validation at open, before anything is sized from the header: `N` within
//! [`Limits::max_header_bytes`](crate::limits::Limits) and the file, at most
//! `max_tensor_count` tensors of rank at most `max_tensor_rank`, every byte length equal to the
//! shape's element count times the dtype's width (checked arithmetic), and the slots tiling
//! the data section exactly — no overlap, no gap, nothing past the end (the format's own rule).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use half::{bf16, f16};
use safetensors::Dtype;
use safetensors::tensor::TensorInfo;
use serde::de::{DeserializeSeed, Error as _, MapAccess, Visitor};

use crate::error::{DishaError, Result};
use crate::limits::{exceeds, limits};
use crate::peft_files::HostTensor;

/// Bytes converted per read while decoding a tensor (bounds the scratch buffer).
const CHUNK_BYTES: usize = 1 << 20;

/// Where one tensor lives in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSlot {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Offset from the start of the data section.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl TensorSlot {
    /// Number of elements (the product of the shape; checked at open).
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened safetensors file: its validated header and a handle for positioned reads.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    data_start: u64,
    tensors: BTreeMap<String, TensorSlot>,
}

fn invalid(path: &Path, message: impl Into<String>) -> DishaError {
    DishaError::Safetensors {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Deserializes the header map straight into `(name, TensorInfo)` pairs, counting as it goes,
/// so a header with millions of entries stops at the limit instead of building them all.
struct HeaderSeed {
    max_tensors: u64,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed {
    type Value = Vec<(String, TensorInfo)>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed {
    type Value = Vec<(String, TensorInfo)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of tensors")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "__metadata__" {
                map.next_value::<Option<BTreeMap<String, String>>>()?;
                continue;
            }
            if out.len() as u64 >= self.max_tensors {
                return Err(A::Error::custom(format!(
                    "tensor count {}",
                    exceeds(
                        format!("above {}", self.max_tensors),
                        "max_tensor_count",
                        self.max_tensors
                    )
                )));
            }
            let info = map
                .next_value::<TensorInfo>()
                .map_err(|e| A::Error::custom(format!("tensor `{key}`: {e}")))?;
            out.push((key, info));
        }
        Ok(out)
    }
}

impl SafetensorsFile {
    /// Opens `path` and validates its header (see the module docs). No tensor data is read.
    ///
    /// # Errors
    /// I/O, or [`DishaError::Safetensors`] naming what is wrong (and the tensor, if one is).
    pub fn open(path: &Path) -> Result<Self> {
        let limits = limits();
        let mut file = File::open(path).map_err(|e| DishaError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| DishaError::io(path, e))?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes).map_err(|_| {
            invalid(
                path,
                format!("{file_len} bytes: shorter than the 8-byte header length"),
            )
        })?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > limits.max_header_bytes {
            return Err(invalid(
                path,
                format!(
                    "header length {}",
                    exceeds(header_len, "max_header_bytes", limits.max_header_bytes)
                ),
            ));
        }
        let data_start = 8 + header_len;
        if data_start > file_len {
            return Err(invalid(
                path,
                format!(
                    "header length {header_len} runs past the end of the file ({file_len} bytes): \
                     truncated, or not a safetensors file"
                ),
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| DishaError::io(path, e))?;
        let mut de = serde_json::Deserializer::from_slice(&header);
        let entries = HeaderSeed {
            max_tensors: limits.max_tensor_count,
        }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| invalid(path, format!("header: {e}")))?;
        drop(header);

        let data_len = file_len - data_start;
        let mut tensors = BTreeMap::new();
        for (name, info) in entries {
            let slot = Self::slot(path, &name, info, limits.max_tensor_rank)?;
            if tensors.insert(name.clone(), slot).is_some() {
                return Err(invalid(path, format!("tensor `{name}` is listed twice")));
            }
        }
        // The slots must tile the data section exactly.
        let mut by_start: Vec<(&String, &TensorSlot)> = tensors.iter().collect();
        by_start.sort_by_key(|(_, s)| (s.start, s.len));
        let mut end = 0u64;
        for (name, slot) in by_start {
            if slot.start != end {
                return Err(invalid(
                    path,
                    format!(
                        "tensor `{name}` starts at data offset {} but the previous tensor ends at \
                         {end} (slots must not overlap or leave gaps)",
                        slot.start
                    ),
                ));
            }
            end = slot.start + slot.len;
            if end > data_len {
                return Err(invalid(
                    path,
                    format!(
                        "tensor `{name}` ends at data offset {end}, past the {data_len} bytes of \
                         data in the file (truncated?)"
                    ),
                ));
            }
        }
        if end != data_len {
            return Err(invalid(
                path,
                format!("{} bytes after the last tensor's data", data_len - end),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start,
            tensors,
        })
    }

    /// Checks one header entry: rank, element count and byte length (checked arithmetic).
    fn slot(path: &Path, name: &str, info: TensorInfo, max_rank: usize) -> Result<TensorSlot> {
        let bad = |message: String| invalid(path, format!("tensor `{name}`: {message}"));
        if info.shape.len() > max_rank {
            return Err(bad(format!(
                "rank {}",
                exceeds(info.shape.len(), "max_tensor_rank", max_rank)
            )));
        }
        let (begin, end) = info.data_offsets;
        if begin > end {
            return Err(bad(format!("data_offsets [{begin}, {end}] run backwards")));
        }
        let bits = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            })
            .ok_or_else(|| bad(format!("shape {:?} overflows", info.shape)))?;
        let bytes = bits.div_ceil(8);
        if bytes != (end - begin) as u64 {
            return Err(bad(format!(
                "shape {:?} of {} needs {bytes} bytes, but data_offsets [{begin}, {end}] hold {}",
                info.shape,
                info.dtype,
                end - begin
            )));
        }
        if usize::try_from(bits / info.dtype.bitsize().max(1) as u64).is_err() {
            return Err(bad(format!("shape {:?} is too large", info.shape)));
        }
        Ok(TensorSlot {
            dtype: info.dtype,
            shape: info.shape,
            start: begin as u64,
            len: bytes,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorSlot> {
        &self.tensors
    }

    fn slot_of(&self, name: &str) -> Result<&TensorSlot> {
        self.tensors
            .get(name)
            .ok_or_else(|| invalid(&self.path, format!("no tensor `{name}`")))
    }

    /// Reads a tensor's bytes in chunks of whole elements of `width` bytes, converting each
    /// element with `convert`.
    fn read_converted<T>(
        &self,
        slot: &TensorSlot,
        width: usize,
        convert: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<T>> {
        let io = |e| DishaError::io(&self.path, e);
        let mut reader = &self.file;
        reader
            .seek(SeekFrom::Start(self.data_start + slot.start))
            .map_err(io)?;
        let mut out = Vec::with_capacity(slot.elements());
        let chunk = CHUNK_BYTES / width * width;
        let mut buffer = vec![0u8; chunk.min(slot.len as usize)];
        let mut left = slot.len as usize;
        while left > 0 {
            let n = left.min(chunk);
            reader.read_exact(&mut buffer[..n]).map_err(io)?;
            out.extend(buffer[..n].chunks_exact(width).map(&convert));
            left -= n;
        }
        Ok(out)
    }

    /// Reads a floating-point tensor (F32, F16 or BF16) as f32.
    ///
    /// # Errors
    /// No such tensor, another dtype ([`DishaError::TensorDtype`]), or I/O.
    pub fn read_f32(&self, name: &str) -> Result<HostTensor> {
        let slot = self.slot_of(name)?;
        let values = match slot.dtype {
            Dtype::F32 => {
                self.read_converted(slot, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))?
            }
            Dtype::F16 => {
                self.read_converted(slot, 2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32())?
            }
            Dtype::BF16 => {
                self.read_converted(slot, 2, |b| bf16::from_le_bytes([b[0], b[1]]).to_f32())?
            }
            other => {
                return Err(DishaError::TensorDtype {
                    path: self.path.clone(),
                    key: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(HostTensor::new(slot.shape.clone(), values))
    }

    /// Reads a floating-point tensor (F32, F16 or BF16) converted to `dtype` (F32, F16 or
    /// BF16) element by element as its bytes are read: a bf16 tensor kept in bf16 costs its
    /// own bytes, with no f32 copy of the whole tensor on the way (`f16 → bf16` and
    /// `f32 → half` round to nearest-even through f32, where half → f32 is exact).
    ///
    /// # Errors
    /// No such tensor, a non-float dtype ([`DishaError::TensorDtype`]), a non-float target, or
    /// I/O.
    pub fn read_data(&self, name: &str, dtype: burn::tensor::DType) -> Result<TensorData> {
        use burn::tensor::DType;
        let slot = self.slot_of(name)?;
        let decode: fn(&[u8]) -> f32 = match slot.dtype {
            Dtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::F16 => |b| f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::BF16 => |b| bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            other => {
                return Err(DishaError::TensorDtype {
                    path: self.path.clone(),
                    key: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let width = slot.dtype.bitsize() / 8;
        let shape = slot.shape.clone();
        Ok(match dtype {
            DType::F32 => TensorData::new(self.read_converted(slot, width, decode)?, shape),
            DType::F16 => TensorData::new(
                self.read_converted(slot, width, |b| f16::from_f32(decode(b)))?,
                shape,
            ),
            DType::BF16 => TensorData::new(
                self.read_converted(slot, width, |b| bf16::from_f32(decode(b)))?,
                shape,
            ),
            other => {
                return Err(invalid(
                    &self.path,
                    format!("tensor `{name}`: cannot be read as {other:?} (F32, F16 or BF16)"),
                ));
            }
        })
    }

    /// Reads an integer tensor (I64 or I32) as i64, with its shape.
    ///
    /// # Errors
    /// No such tensor, another dtype, or I/O.
    pub fn read_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let slot = self.slot_of(name)?;
        let values = match slot.dtype {
            Dtype::I64 => self.read_converted(slot, 8, |b| {
                i64::from_le_bytes(b.try_into().expect("8-byte chunks"))
            })?,
            Dtype::I32 => self.read_converted(slot, 4, |b| {
                i32::from_le_bytes(b.try_into().expect("4-byte chunks")) as i64
            })?,
            other => {
                return Err(invalid(
                    &self.path,
                    format!("tensor `{name}` is {other:?}, expected I64 or I32"),
                ));
            }
        };
        Ok((slot.shape.clone(), values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    /// A file from a raw header and data section.
    fn raw(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    fn error(bytes: &[u8]) -> String {
        let (_dir, path) = write(bytes);
        SafetensorsFile::open(&path).unwrap_err().to_string()
    }

    #[test]
    fn reads_each_tensor_from_its_slot() {
        let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let ids: Vec<u8> = [7i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = safetensors::serialize(
            [
                ("a", TensorView::new(Dtype::F32, vec![2, 2], &a).unwrap()),
                (
                    "ids",
                    TensorView::new(Dtype::I64, vec![1, 2], &ids).unwrap(),
                ),
            ],
            None,
        )
        .unwrap();
        let (_dir, path) = write(&bytes);
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(
            file.read_f32("a").unwrap(),
            HostTensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])
        );
        assert_eq!(file.read_i64("ids").unwrap(), (vec![1, 2], vec![7, -1]));
        let e = file.read_f32("ids").unwrap_err();
        assert!(
            matches!(e, DishaError::TensorDtype { ref key, .. } if key == "ids"),
            "{e}"
        );
        assert!(
            file.read_f32("nope")
                .unwrap_err()
                .to_string()
                .contains("`nope`")
        );
    }

    #[test]
    fn header_numbers_are_checked_before_use() {
        // Header length near 2^64.
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend(b"{}");
        assert!(error(&huge).contains("max_header_bytes"));
        // Header longer than the file.
        let mut long = 1000u64.to_le_bytes().to_vec();
        long.extend(b"{}");
        assert!(error(&long).contains("past the end of the file"));
        assert!(error(&[1, 2, 3]).contains("shorter than the 8-byte"));
        // Shape product overflowing u64.
        let e = error(&raw(
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ));
        assert!(e.contains("`w`") && e.contains("overflows"), "{e}");
        // Declared size disagrees with the offsets (would read into the next tensor).
        let e = error(&raw(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ));
        assert!(e.contains("`w`") && e.contains("needs 8 bytes"), "{e}");
        // Overlapping slots.
        let e = error(&raw(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            &[0; 8],
        ));
        assert!(e.contains("`b`") && e.contains("overlap"), "{e}");
        // Past the end of the data.
        let e = error(&raw(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 8],
        ));
        assert!(e.contains("`a`") && e.contains("truncated"), "{e}");
        // Rank above the limit.
        let e = error(&raw(
            r#"{"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ));
        assert!(e.contains("max_tensor_rank"), "{e}");
        // Duplicates, and the metadata entry is not a tensor.
        let e = error(&raw(
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ));
        assert!(e.contains("listed twice"), "{e}");
        let e = error(&raw(r#"{"a":{"dtype":"F99"}}"#, &[]));
        assert!(e.contains("tensor `a`"), "{e}");
    }
}
