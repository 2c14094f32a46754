//! rwkv.cpp model files (`.bin`, versions 100 and 101), FP32 and FP16, as a [`WeightSource`]
//! with BlinkDL names and shapes.
//!
//! Layout (little-endian `i32`s): the header `magic = 0x67676d66`, `version`,
//! `n_vocab`, `n_embed`, `n_layer`, `data_type`; then, to the end of the file, one record per
//! tensor: `dim_count`, `key_length`, `data_type`, the shape **reversed** (`dim_count` values),
//! the UTF-8 key, and the data (`4·n` bytes for FP32, `2·n` for FP16). Against a BlinkDL
//! checkpoint, RWKV-7 files differ in two ways, undone here: the six token-shift vectors are
//! packed as `att.x_rwkvag` `[6, 1, C]` (order r, w, k, v, a, g), and the low-rank matrices
//! `w1, w2, a1, a2, v1, v2, g1, g2` are stored transposed.
//!
//! The header and every record are bounded before anything is sized from them (counts, ranks,
//! extents and key lengths against [`disha_core::limits`]; each record's data must lie inside
//! the file); the data is read from its offset when a tensor is taken.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use disha_core::HostTensor;
use disha_core::limits::{exceeds, limits};
use half::f16;

use crate::error::{ModelError, Result};
use crate::weights::WeightSource;

/// The magic, the first little-endian `i32` of the file.
pub const RWKV_CPP_MAGIC: u32 = 0x6767_6d66;

/// The six token-shift vectors packed in `att.x_rwkvag`, in order.
const PACKED_SHIFTS: [&str; 6] = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"];

/// Low-rank matrices rwkv.cpp stores transposed.
const TRANSPOSED: [&str; 8] = ["w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"];

/// `true` when `path` starts with the rwkv.cpp magic.
pub fn is_rwkv_cpp(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| u32::from_le_bytes(magic) == RWKV_CPP_MAGIC)
}

/// One tensor record of the file.
#[derive(Clone, Debug)]
struct Record {
    /// The PyTorch-order shape (the file's, reversed).
    shape: Vec<usize>,
    /// FP16 (else FP32).
    half: bool,
    /// Byte offset of the data.
    offset: u64,
}

/// How a BlinkDL tensor is made from a record.
#[derive(Clone, Debug)]
enum Source {
    /// The record as is.
    Whole(String),
    /// The record transposed (a 2-D low-rank matrix).
    Transposed(String),
    /// Slice `i` of a packed `[6, 1, C]` record, as `[1, 1, C]`.
    Packed(String, usize),
}

/// The tensors of an rwkv.cpp file under BlinkDL names, read when taken.
#[derive(Debug)]
pub struct RwkvCppWeights {
    path: PathBuf,
    file: File,
    records: BTreeMap<String, Record>,
    /// BlinkDL name → (shape, where it comes from), for the tensors not taken yet.
    tensors: BTreeMap<String, (Vec<usize>, Source)>,
}

fn read_i32s<const N: usize>(file: &mut File, path: &Path) -> Result<[i32; N]> {
    let mut raw = vec![0u8; 4 * N];
    file.read_exact(&mut raw)
        .map_err(|e| ModelError::io(path, e))?;
    Ok(std::array::from_fn(|i| {
        i32::from_le_bytes(raw[4 * i..4 * i + 4].try_into().expect("4 bytes"))
    }))
}

impl RwkvCppWeights {
    /// Opens `path` and reads its header and tensor table (no tensor data yet).
    ///
    /// # Errors
    /// I/O; a wrong magic or version; a header or record field that is negative or beyond the
    /// limits; a key that is not UTF-8 or appears twice; a quantized or unknown data type
    /// (naming the tensor); data that runs past the end of the file. Every error names the file
    /// and the byte offset of the field.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let bad = |offset: u64, message: String| ModelError::Config {
            path: path.to_path_buf(),
            field: format!("<rwkv.cpp file, byte {offset}>"),
            message,
        };
        if len < 24 {
            return Err(bad(
                0,
                format!("{len} bytes is shorter than the 24-byte header"),
            ));
        }
        let [magic, version, n_vocab, n_embed, n_layer, _data_type] =
            read_i32s::<6>(&mut file, path)?;
        if magic as u32 != RWKV_CPP_MAGIC {
            return Err(bad(
                0,
                format!("magic {magic:#x}, expected {RWKV_CPP_MAGIC:#x}"),
            ));
        }
        if !matches!(version, 100 | 101) {
            return Err(bad(
                4,
                format!("version {version}; rwkv.cpp files are 100 or 101"),
            ));
        }
        let l = limits();
        for (offset, name, value, limit, limit_name) in [
            (8, "n_vocab", n_vocab, l.max_dim, "max_dim"),
            (12, "n_embed", n_embed, l.max_dim, "max_dim"),
            (16, "n_layer", n_layer, l.max_layers, "max_layers"),
        ] {
            if value <= 0 {
                return Err(bad(offset, format!("{name} = {value} must be positive")));
            }
            if value as usize > limit {
                return Err(bad(offset, exceeds(value, limit_name, limit)));
            }
        }

        let mut records = BTreeMap::new();
        let mut offset = 24u64;
        while offset < len {
            if records.len() as u64 >= l.max_tensor_count {
                return Err(bad(
                    offset,
                    exceeds(records.len() + 1, "max_tensor_count", l.max_tensor_count),
                ));
            }
            if len - offset < 12 {
                return Err(bad(
                    offset,
                    "a tensor record starts but its 12-byte head is cut off".into(),
                ));
            }
            let [dims, key_len, data_type] = read_i32s::<3>(&mut file, path)?;
            if dims <= 0 || dims as usize > l.max_tensor_rank {
                return Err(bad(
                    offset,
                    format!(
                        "dim_count {dims} (1..={} allowed: max_tensor_rank)",
                        l.max_tensor_rank
                    ),
                ));
            }
            if key_len <= 0 || key_len as u64 > l.max_string_bytes {
                return Err(bad(
                    offset + 4,
                    format!(
                        "key_length {key_len} (1..={} allowed: max_string_bytes)",
                        l.max_string_bytes
                    ),
                ));
            }
            let head = 12 + 4 * dims as u64 + key_len as u64;
            if len - offset < head {
                return Err(bad(
                    offset,
                    "the tensor's shape and key run past the end of the file".into(),
                ));
            }
            let mut raw = vec![0u8; 4 * dims as usize];
            file.read_exact(&mut raw)
                .map_err(|e| ModelError::io(path, e))?;
            let mut shape = Vec::with_capacity(dims as usize);
            for (i, d) in raw.chunks_exact(4).enumerate() {
                let d = i32::from_le_bytes(d.try_into().expect("4 bytes"));
                if d <= 0 || d as usize > l.max_dim {
                    return Err(bad(
                        offset + 12 + 4 * i as u64,
                        format!("extent {d} (1..={} allowed: max_dim)", l.max_dim),
                    ));
                }
                shape.push(d as usize);
            }
            shape.reverse();
            let mut key = vec![0u8; key_len as usize];
            file.read_exact(&mut key)
                .map_err(|e| ModelError::io(path, e))?;
            let key = String::from_utf8(key).map_err(|_| {
                bad(
                    offset + 12 + 4 * dims as u64,
                    "the tensor key is not UTF-8".into(),
                )
            })?;
            let element = match data_type {
                0 => 4u64,
                1 => 2,
                2 | 3 | 7 | 8 | 9 => {
                    let name = ["Q4_0", "Q4_1", "", "", "", "Q5_0", "Q5_1", "Q8_0"]
                        [data_type as usize - 2];
                    return Err(bad(
                        offset + 8,
                        format!(
                            "tensor `{key}` is quantized ({name}); disha reads FP32 and FP16 \
                             rwkv.cpp files (or the BlinkDL .pth / .safetensors)"
                        ),
                    ));
                }
                other => {
                    return Err(bad(
                        offset + 8,
                        format!("tensor `{key}`: data type {other} (0 = FP32, 1 = FP16)"),
                    ));
                }
            };
            let count = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            let data_offset = offset + head;
            let bytes = count.and_then(|n| n.checked_mul(element));
            let Some(bytes) = bytes.filter(|&b| b <= len - data_offset) else {
                return Err(bad(
                    data_offset,
                    format!(
                        "tensor `{key}` {shape:?}: its data runs past the end of the file ({len} bytes)"
                    ),
                ));
            };
            if records.contains_key(&key) {
                return Err(bad(
                    offset + 12 + 4 * dims as u64,
                    format!("tensor `{key}` appears twice"),
                ));
            }
            records.insert(
                key,
                Record {
                    shape,
                    half: data_type == 1,
                    offset: data_offset,
                },
            );
            offset = data_offset + bytes;
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| ModelError::io(path, e))?;
        }

        let mut tensors = BTreeMap::new();
        for (key, record) in &records {
            let module_param = key.rsplit_once('.');
            match module_param {
                Some((module, "x_rwkvag")) if record.shape.len() == 3 && record.shape[0] == 6 => {
                    let c = record.shape[2];
                    for (i, shift) in PACKED_SHIFTS.iter().enumerate() {
                        tensors.insert(
                            format!("{module}.{shift}"),
                            (vec![1, 1, c], Source::Packed(key.clone(), i)),
                        );
                    }
                }
                Some((_, param)) if TRANSPOSED.contains(&param) && record.shape.len() == 2 => {
                    let shape = vec![record.shape[1], record.shape[0]];
                    tensors.insert(key.clone(), (shape, Source::Transposed(key.clone())));
                }
                _ => {
                    tensors.insert(
                        key.clone(),
                        (record.shape.clone(), Source::Whole(key.clone())),
                    );
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            records,
            tensors,
        })
    }

    /// Every tensor's BlinkDL shape, by BlinkDL name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors
            .iter()
            .map(|(name, (shape, _))| (name.clone(), shape.clone()))
            .collect()
    }

    /// The values of record `key`, as f32.
    fn read(&mut self, key: &str) -> Result<Vec<f32>> {
        let record = &self.records[key];
        let count: usize = record.shape.iter().product();
        let width = if record.half { 2 } else { 4 };
        let mut raw = vec![0u8; count * width];
        self.file
            .seek(SeekFrom::Start(record.offset))
            .and_then(|_| self.file.read_exact(&mut raw))
            .map_err(|e| ModelError::io(&self.path, e))?;
        Ok(if record.half {
            raw.chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()
        } else {
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
    }
}

impl WeightSource for RwkvCppWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let Some((shape, source)) = self.tensors.remove(name) else {
            return Ok(None);
        };
        let values = match &source {
            Source::Whole(key) => self.read(key)?,
            Source::Transposed(key) => {
                let stored = self.read(key)?;
                let (rows, cols) = (shape[1], shape[0]);
                let mut out = vec![0.0; stored.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        out[c * rows + r] = stored[r * cols + c];
                    }
                }
                out
            }
            Source::Packed(key, i) => {
                let c = shape[2];
                let stored = self.read(key)?;
                stored[i * c..(i + 1) * c].to_vec()
            }
        };
        Ok(Some(HostTensor::new(shape, values)))
    }

    fn remaining(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}
