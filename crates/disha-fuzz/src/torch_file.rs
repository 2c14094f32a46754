//! Writes a `torch.save(state_dict)` file without PyTorch: a zip archive (entries stored, as
//! `torch.save` writes them) holding `data.pkl` (pickle protocol 2, tensors rebuilt through
//! `torch._utils._rebuild_tensor_v2` from persistent storages), one `data/N` entry per storage,
//! `version` and `byteorder`. The fuzzing harness mutates such a file for the `.pth` reader.

use std::io::Write;

use zip::write::SimpleFileOptions;

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

/// Serializes `tensors` (name, shape, f32 values) as a PyTorch zip checkpoint under the
/// archive folder `archive/`.
pub fn write_pth(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
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
        zip.start_file(format!("archive/{name}"), stored)
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
