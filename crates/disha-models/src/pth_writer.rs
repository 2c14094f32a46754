//! Writes a `torch.save(state_dict)` file without PyTorch: a zip archive (entries stored, as
//! `torch.save` writes them) holding `data.pkl` (pickle protocol 2, tensors rebuilt through
//! `torch._utils._rebuild_tensor_v2` from persistent storages), one `data/N` entry per storage,
//! `version` and `byteorder`. `torch.load` and Burn's `pytorch-reader` read it; RWKV-PEFT
//! adapter checkpoints are written this way.

use std::io::Write;
use std::path::Path;

use disha_core::write_atomic;
use zip::write::SimpleFileOptions;

use crate::error::{ModelError, Result};

/// A pickle under construction.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) {
        self.0.push(op);
    }

    fn string(&mut self, s: &str) {
        self.op(b'X'); // BINUNICODE
        self.0
            .extend((s.len() as u32).to_le_bytes().iter().chain(s.as_bytes()));
    }

    fn int(&mut self, v: usize) {
        self.op(b'J'); // BININT
        self.0.extend((v as i32).to_le_bytes());
    }

    fn global(&mut self, module: &str, name: &str) {
        self.op(b'c'); // GLOBAL
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
    }

    fn tuple(&mut self, items: &[usize]) {
        self.op(b'('); // MARK
        for &i in items {
            self.int(i);
        }
        self.op(b't'); // TUPLE
    }
}

/// One named f32 tensor to write: name, shape, row-major values.
pub type PthTensor = (String, Vec<usize>, Vec<f32>);

/// Writes `tensors` to `path` as a PyTorch zip checkpoint (a flat `dict[str, Tensor]`, f32),
/// atomically (a temporary file renamed over `path`).
///
/// # Errors
/// A tensor whose value count is not its shape's product, or one too large for the format
/// (over 2³¹ − 1 elements or extents); I/O errors naming the path.
pub fn write_pth(path: &Path, tensors: &[PthTensor]) -> Result<()> {
    for (name, shape, values) in tensors {
        let fits = |n: usize| i32::try_from(n).is_ok();
        if shape.iter().product::<usize>() != values.len()
            || !fits(values.len())
            || !shape.iter().all(|&d| fits(d))
        {
            return Err(ModelError::Pytorch {
                path: path.to_path_buf(),
                message: format!(
                    "cannot write tensor `{name}`: shape {shape:?} with {} values",
                    values.len()
                ),
            });
        }
    }
    // torch.save names the archive folder after the file.
    let archive: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect();
    let archive = if archive.is_empty() {
        "archive"
    } else {
        &archive
    };
    Ok(write_atomic(path, &pth_bytes(archive, tensors))?)
}

/// Serializes `tensors` (name, shape, f32 values; counts and extents below 2³¹) as a PyTorch
/// zip checkpoint under the archive folder `archive/`.
pub fn pth_bytes(archive: &str, tensors: &[PthTensor]) -> Vec<u8> {
    let mut p = Pickle::default();
    p.0.extend([0x80, 2]); // PROTO 2
    p.op(b'}'); // EMPTY_DICT
    p.op(b'('); // MARK
    for (i, (name, shape, values)) in tensors.iter().enumerate() {
        p.string(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'('); // MARK: the arguments
        p.op(b'('); // MARK: the persistent id
        p.string("storage");
        p.global("torch", "FloatStorage");
        p.string(&i.to_string());
        p.string("cpu");
        p.int(values.len());
        p.op(b't');
        p.op(b'Q'); // BINPERSID
        p.int(0); // storage offset
        p.tuple(shape);
        let mut strides = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        p.tuple(&strides);
        p.op(0x89); // NEWFALSE: requires_grad
        p.global("collections", "OrderedDict");
        p.op(b')'); // EMPTY_TUPLE
        p.op(b'R'); // REDUCE: OrderedDict()
        p.op(b't'); // TUPLE of the arguments
        p.op(b'R'); // REDUCE: the tensor
    }
    p.op(b'u'); // SETITEMS
    p.op(b'.'); // STOP

    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut entry = |name: &str, bytes: &[u8]| {
        zip.start_file(format!("{archive}/{name}"), stored)
            .expect("in-memory zip");
        zip.write_all(bytes).expect("in-memory zip");
    };
    entry("data.pkl", &p.0);
    entry("byteorder", b"little");
    for (i, (_, _, values)) in tensors.iter().enumerate() {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        entry(&format!("data/{i}"), &bytes);
    }
    entry("version", b"3\n");
    zip.finish().expect("in-memory zip");
    out.into_inner()
}
