//! Seeded mutations of input files: byte-level (bit flips, interesting bytes, truncation,
//! insertion, deletion, duplication), numeric fields of binary headers replaced by boundary
//! values, and structure-aware edits of JSON, JSONL and TOML (a leaf replaced by a boundary
//! number, a huge string or array, another type; keys added or removed).

use disha_models::SplitMix64;
use serde_json::{Map, Value};

/// A deterministic random source for one case.
#[derive(Debug)]
pub struct Rng(SplitMix64);

impl Rng {
    /// The generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.0.uniform() < p
    }

    /// A raw 64-bit value.
    pub fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// One element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// How the bytes of a numeric header field are to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// A little-endian unsigned or signed integer.
    Int,
    /// A little-endian IEEE float.
    Float,
}

/// A numeric field of a binary header: where it is, how wide, what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// Byte offset in the file.
    pub offset: usize,
    /// Width in bytes (1, 2, 4 or 8).
    pub width: usize,
    /// Integer or float.
    pub kind: FieldKind,
}

impl Field {
    /// An integer field.
    pub fn int(offset: usize, width: usize) -> Self {
        Self {
            offset,
            width,
            kind: FieldKind::Int,
        }
    }

    /// A float field.
    pub fn float(offset: usize, width: usize) -> Self {
        Self {
            offset,
            width,
            kind: FieldKind::Float,
        }
    }
}

/// Integers that break careless size arithmetic: zero, one, sign and width boundaries.
const BOUNDARY_INTS: [u64; 16] = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0xFFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    1 << 32,
    1 << 40,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    u64::MAX - 31,
    u64::MAX,
];

/// Floats that break careless numerics.
const BOUNDARY_FLOATS: [f64; 12] = [
    0.0,
    -0.0,
    -1.0,
    1e-45,
    5e-324,
    f32::MAX as f64,
    1e300,
    -1e300,
    f64::INFINITY,
    f64::NEG_INFINITY,
    f64::NAN,
    1e30,
];

/// Replaces numeric field `field` of `bytes` with a boundary value (or a nearby one).
pub fn mutate_field(rng: &mut Rng, bytes: &mut [u8], field: Field) {
    let Some(slot) = bytes.get_mut(field.offset..field.offset + field.width) else {
        return;
    };
    match field.kind {
        FieldKind::Int => {
            let mut current = [0u8; 8];
            current[..field.width].copy_from_slice(slot);
            let current = u64::from_le_bytes(current);
            let value = match rng.below(6) {
                0 => current.wrapping_add(1),
                1 => current.wrapping_sub(1),
                2 => current.wrapping_mul(1 << rng.below(40)),
                3 => rng.u64(),
                _ => *rng.pick(&BOUNDARY_INTS),
            };
            slot.copy_from_slice(&value.to_le_bytes()[..field.width]);
        }
        FieldKind::Float => {
            let value = *rng.pick(&BOUNDARY_FLOATS);
            match field.width {
                4 => slot.copy_from_slice(&(value as f32).to_le_bytes()),
                8 => slot.copy_from_slice(&value.to_le_bytes()),
                _ => {}
            }
        }
    }
}

/// Bytes that matter to parsers: NUL, high bit, all ones, quotes, separators.
const INTERESTING_BYTES: [u8; 10] = [0x00, 0x01, 0x7F, 0x80, 0xFF, b'"', b'\\', b'\n', b',', b'}'];

/// A position, biased to the first `hot` bytes (the header) half of the time.
fn position(rng: &mut Rng, len: usize, hot: usize) -> usize {
    if hot > 0 && rng.chance(0.5) {
        rng.below(hot.min(len).max(1))
    } else {
        rng.below(len.max(1))
    }
}

/// One byte-level mutation; `hot` is the length of the header region to favour.
pub fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>, hot: usize) {
    let len = bytes.len();
    match rng.below(8) {
        // Flip 1–8 bits.
        0 | 1 if len > 0 => {
            for _ in 0..=rng.below(8) {
                let at = position(rng, len, hot);
                bytes[at] ^= 1 << rng.below(8);
            }
        }
        // Interesting bytes.
        2 if len > 0 => {
            for _ in 0..=rng.below(4) {
                let at = position(rng, len, hot);
                bytes[at] = *rng.pick(&INTERESTING_BYTES);
            }
        }
        // Truncate.
        3 => {
            let at = position(rng, len, hot);
            bytes.truncate(at);
        }
        // Insert random bytes, or a long run of one byte (up to 4 MiB).
        4 => {
            let at = position(rng, len, hot);
            let insert: Vec<u8> = if rng.chance(0.7) {
                (0..=rng.below(64)).map(|_| rng.u64() as u8).collect()
            } else {
                vec![*rng.pick(&INTERESTING_BYTES); 1 << (12 + rng.below(11))]
            };
            bytes.splice(at..at, insert);
        }
        // Delete a range.
        5 if len > 0 => {
            let at = position(rng, len, hot);
            let n = 1 + rng.below((len - at).min(256));
            bytes.drain(at..at + n);
        }
        // Duplicate a range elsewhere.
        6 if len > 0 => {
            let from = rng.below(len);
            let n = 1 + rng.below((len - from).min(512));
            let chunk = bytes[from..from + n].to_vec();
            let at = position(rng, len, hot);
            bytes.splice(at..at, chunk);
        }
        // Overwrite a range with bytes from elsewhere.
        _ if len > 1 => {
            let from = rng.below(len);
            let to = position(rng, len, hot);
            let n = 1 + rng.below((len - from).min(len - to).min(64));
            let chunk = bytes[from..from + n].to_vec();
            bytes[to..to + n].copy_from_slice(&chunk);
        }
        _ => bytes.push(rng.u64() as u8),
    }
}

/// Numbers JSON readers must bound or reject: zero, negatives, width boundaries, floats where
/// integers belong, extremes.
const BOUNDARY_JSON: [&str; 17] = [
    "0",
    "-1",
    "1",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "1e308",
    "-1e308",
    "5e-324",
    "0.5",
    "-0.0",
    "1e9",
];

/// A JSON value built to be large: a long string or array, or deep nesting.
fn huge_value(rng: &mut Rng) -> Value {
    match rng.below(4) {
        0 | 1 => {
            // 1 KiB … 16 MiB, smaller sizes more often.
            let n = 1 << (10 + rng.below(8) * rng.below(3));
            Value::String("x".repeat(n))
        }
        2 => Value::Array(vec![Value::from(7); 1 << (8 + rng.below(13))]),
        _ => {
            let mut v = Value::from(1);
            for _ in 0..(1 + rng.below(300)) {
                v = Value::Array(vec![v]);
            }
            v
        }
    }
}

/// A replacement for a JSON node: a boundary number, another type, or something huge.
fn replacement(rng: &mut Rng, original: &Value) -> Value {
    match rng.below(10) {
        0..=4 => {
            let number: &&str = rng.pick(&BOUNDARY_JSON);
            serde_json::from_str(number).expect("valid JSON numbers")
        }
        5 => huge_value(rng),
        6 => Value::Null,
        7 => Value::Bool(rng.chance(0.5)),
        8 => match original {
            Value::String(s) => Value::String(format!("{s}{s}\u{0}\u{FFFD}")),
            Value::Array(a) => Value::Array(a.iter().chain(a).cloned().collect()),
            _ => Value::String("not a number".into()),
        },
        _ => Value::Object(Map::new()),
    }
}

/// Every node's path (object keys / array indices), root first.
fn paths(value: &Value, prefix: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    out.push(prefix.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                prefix.push(PathStep::Key(k.clone()));
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate().take(64) {
                prefix.push(PathStep::Index(i));
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn node_mut<'a>(value: &'a mut Value, path: &[PathStep]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, step| match step {
        PathStep::Key(k) => v.get_mut(k.as_str()),
        PathStep::Index(i) => v.get_mut(*i),
    })
}

/// One structure-aware edit of a JSON value: a node replaced, removed, or given a sibling.
pub fn mutate_json_value(rng: &mut Rng, value: &mut Value) {
    let mut all = Vec::new();
    paths(value, &mut Vec::new(), &mut all);
    // Leaves and containers alike; the root rarely.
    let path = rng.pick(&all).clone();
    let Some((last, parent_path)) = path.split_last() else {
        if rng.chance(0.3) {
            *value = replacement(rng, value);
        }
        return;
    };
    let Some(parent) = node_mut(value, parent_path) else {
        return;
    };
    match rng.below(10) {
        // Remove the node.
        0 => match (parent, last) {
            (Value::Object(map), PathStep::Key(k)) => {
                map.remove(k);
            }
            (Value::Array(items), PathStep::Index(i)) if *i < items.len() => {
                items.remove(*i);
            }
            _ => {}
        },
        // Add an unknown sibling key.
        1 => {
            if let Value::Object(map) = parent {
                map.insert("unknown_field".into(), replacement(rng, &Value::Null));
            }
        }
        // Replace the node.
        _ => {
            if let Some(node) = node_mut(value, &path) {
                let new = replacement(rng, node);
                *node = new;
            }
        }
    }
}

/// One mutation of a JSON file: structure-aware when it parses (most of the time), else bytes.
pub fn mutate_json(rng: &mut Rng, bytes: &mut Vec<u8>) {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(mut value) if rng.chance(0.8) => {
            mutate_json_value(rng, &mut value);
            *bytes = if rng.chance(0.5) {
                serde_json::to_vec_pretty(&value)
            } else {
                serde_json::to_vec(&value)
            }
            .expect("values serialize");
        }
        _ => mutate_bytes(rng, bytes, 0),
    }
}

/// One mutation of a JSONL file: a line's JSON edited, replaced by a huge or non-UTF-8 line,
/// lines duplicated or removed, or bytes.
pub fn mutate_jsonl(rng: &mut Rng, bytes: &mut Vec<u8>, max_line: usize) {
    let mut lines: Vec<Vec<u8>> = bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let at = rng.below(lines.len());
    match rng.below(8) {
        0..=2 => mutate_json(rng, &mut lines[at]),
        3 => {
            // Longer than the limit: rejected without being held whole.
            let mut line = br#"{"question": ""#.to_vec();
            line.extend(std::iter::repeat_n(
                b'9',
                max_line + 1 + rng.below(max_line),
            ));
            line.extend(br#"", "answer": "1"}"#);
            lines[at] = line;
        }
        4 => {
            let line = &mut lines[at];
            let pos = rng.below(line.len() + 1);
            line.splice(pos..pos, [0xFF, 0xFE, 0xC3]);
        }
        5 => {
            let line = lines[at].clone();
            for _ in 0..rng.below(20) {
                lines.insert(at, line.clone());
            }
        }
        6 => {
            lines.truncate(at);
        }
        _ => {
            let mut flat = lines.join(&b'\n');
            mutate_bytes(rng, &mut flat, 0);
            *bytes = flat;
            return;
        }
    }
    *bytes = lines.join(&b'\n');
}

/// One mutation of a TOML file: a number replaced by a boundary value, a value by a huge
/// string, an unknown or repeated key added, or bytes.
pub fn mutate_toml(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let Ok(text) = String::from_utf8(bytes.clone()) else {
        mutate_bytes(rng, bytes, 0);
        return;
    };
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let at = rng.below(lines.len());
    match rng.below(6) {
        0..=2 => {
            if let Some((key, _)) = lines[at].split_once('=') {
                let value = match rng.below(4) {
                    0 => format!("\"{}\"", "y".repeat(1 << rng.below(21))),
                    1 => "nan".to_string(),
                    2 => "-inf".to_string(),
                    _ => rng.pick(&BOUNDARY_JSON).to_string(),
                };
                lines[at] = format!("{}= {value}", key);
            }
        }
        3 => lines.push("learning_rate = 1.0".into()),
        4 => {
            let line = lines[at].clone();
            lines.push(line);
        }
        _ => {
            mutate_bytes(rng, bytes, 0);
            return;
        }
    }
    *bytes = lines.join("\n").into_bytes();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_per_seed_and_change_the_input() {
        let original = br#"{"a": 1, "b": [1, 2, {"c": "x"}], "d": 0.5}"#.to_vec();
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut bytes = original.clone();
            mutate_json(&mut rng, &mut bytes);
            bytes
        };
        assert_eq!(run(7), run(7));
        let changed = (0..50).filter(|&s| run(s) != original).count();
        assert!(
            changed >= 45,
            "only {changed} of 50 mutations changed the input"
        );
    }

    #[test]
    fn field_mutation_writes_the_field_only() {
        let mut rng = Rng::new(3);
        let mut bytes = vec![0xAAu8; 16];
        for _ in 0..20 {
            mutate_field(&mut rng, &mut bytes, Field::int(4, 4));
        }
        assert!(bytes[..4].iter().chain(&bytes[8..]).all(|&b| b == 0xAA));
        mutate_field(&mut rng, &mut bytes, Field::int(14, 8));
        assert_eq!(bytes.len(), 16, "out-of-range fields are ignored");
    }
}
