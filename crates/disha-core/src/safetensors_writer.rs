//! A safetensors file written tensor by tensor, holding one tensor in memory at a time.
//!
//! The format puts the header (every tensor's dtype, shape and byte range) before the data, and
//! the header is known only once every tensor has been seen. [`SafetensorsWriter`] therefore
//! streams the tensors' bytes into a sibling data file as they come, then writes the file: the
//! 8-byte header length, the header (JSON, space-padded to a multiple of 8 bytes), and the data
//! copied over in 1 MiB pieces. Memory stays at one tensor plus a buffer; disk holds the data
//! twice for a moment. Callers that need the file to appear atomically write it into a staging
//! directory or under a temporary name and rename it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{Map, Value, json};

use crate::error::{DishaError, Result};

/// One tensor already streamed to the data file.
#[derive(Debug)]
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// Writes a safetensors file tensor by tensor (module docs).
///
/// ```no_run
/// # fn main() -> disha_core::Result<()> {
/// use disha_core::SafetensorsWriter;
/// use safetensors::Dtype;
///
/// let mut writer = SafetensorsWriter::create("model.safetensors")?;
/// let values: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
/// writer.write("bias", Dtype::F32, &[2], &values)?;
/// writer.finish(&[("format", "pt")])?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SafetensorsWriter {
    path: PathBuf,
    data_path: PathBuf,
    data: BufWriter<File>,
    entries: Vec<Entry>,
    offset: u64,
}

impl SafetensorsWriter {
    /// Starts `path` (created by [`finish`](Self::finish)); the tensors' bytes go to
    /// `<path>.data` meanwhile.
    ///
    /// # Errors
    /// The data file cannot be created.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut data_path = path.clone().into_os_string();
        data_path.push(".data");
        let data_path = PathBuf::from(data_path);
        let file = File::create(&data_path).map_err(|e| DishaError::io(&data_path, e))?;
        Ok(Self {
            path,
            data_path,
            data: BufWriter::with_capacity(1 << 20, file),
            entries: Vec::new(),
            offset: 0,
        })
    }

    /// Appends tensor `name`: `bytes` are its little-endian values in `dtype`.
    ///
    /// # Panics
    /// `bytes` is not the shape's element count times the dtype's width, or `name` was written
    /// before (programmer errors).
    ///
    /// # Errors
    /// Writing the data file fails.
    pub fn write(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Result<()> {
        let expected = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        assert_eq!(
            bytes.len(),
            expected,
            "SafetensorsWriter: `{name}` has {} bytes for shape {shape:?} in {dtype:?}",
            bytes.len()
        );
        assert!(
            self.entries.iter().all(|e| e.name != name),
            "SafetensorsWriter: `{name}` written twice"
        );
        self.data
            .write_all(bytes)
            .map_err(|e| DishaError::io(&self.data_path, e))?;
        let start = self.offset;
        self.offset += bytes.len() as u64;
        self.entries.push(Entry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            start,
            end: self.offset,
        });
        Ok(())
    }

    /// Writes the file (header, then the data) with `metadata` as its `__metadata__`, syncs it
    /// and removes the data file.
    ///
    /// # Errors
    /// I/O errors, naming the file.
    pub fn finish(mut self, metadata: &[(&str, &str)]) -> Result<()> {
        let io_data = |e| DishaError::io(&self.data_path, e);
        self.data.flush().map_err(io_data)?;
        let text = safetensors_header(
            self.entries
                .iter()
                .map(|e| (e.name.as_str(), e.dtype, e.shape.as_slice(), e.start..e.end)),
            metadata,
        );
        let io = |e| DishaError::io(&self.path, e);
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&self.path).map_err(io)?);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(text.as_bytes()).map_err(io)?;
        let mut data = File::open(&self.data_path).map_err(io_data)?;
        std::io::copy(&mut data, &mut out).map_err(io)?;
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::remove_file(&self.data_path).map_err(io_data)
    }
}

/// A safetensors header: the JSON object of `tensors` (name, dtype, shape, byte range in the
/// data section) and `metadata`, space-padded to a multiple of 8 bytes. The file is its length
/// as a little-endian `u64`, the header, then the data.
pub fn safetensors_header<'a>(
    tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [usize], std::ops::Range<u64>)>,
    metadata: &[(&str, &str)],
) -> String {
    let mut header = Map::new();
    for (name, dtype, shape, range) in tensors {
        header.insert(
            name.to_string(),
            json!({
                "dtype": format!("{dtype:?}"),
                "shape": shape,
                "data_offsets": [range.start, range.end],
            }),
        );
    }
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        header.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut text = Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SafetensorsFile;

    #[test]
    fn streamed_file_reads_back_with_both_readers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut writer = SafetensorsWriter::create(&path).unwrap();
        let a: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b: Vec<u8> = [half::bf16::from_f32(0.5), half::bf16::from_f32(-4.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        writer.write("z.first", Dtype::F32, &[3], &a).unwrap();
        writer.write("a.second", Dtype::BF16, &[1, 2], &b).unwrap();
        writer.finish(&[("format", "pt")]).unwrap();
        assert!(
            !dir.path().join("t.safetensors.data").exists(),
            "data file removed"
        );
        // The reference reader (the `safetensors` crate) and disha's own.
        let bytes = std::fs::read(&path).unwrap();
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header_len % 8, 0);
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(parsed.tensor("z.first").unwrap().data(), &a[..]);
        assert_eq!(parsed.tensor("a.second").unwrap().shape(), &[1, 2]);
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.read_f32("a.second").unwrap().values, vec![0.5, -4.0]);
        assert_eq!(
            file.read_f32("z.first").unwrap().values,
            vec![1.5, -2.0, 3.25]
        );
    }
}
