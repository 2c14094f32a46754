//! The RWKV World tokenizer (`rwkv_vocab_v20230424.txt`): greedy longest match over bytes, no
//! merges, no normalization; and the plain byte tokenizer of byte-level RWKV models.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{ModelError, Result};

/// Longest token the vocabulary format allows (the World vocabulary's longest is 128 bytes).
const MAX_TOKEN_BYTES: usize = 4096;

/// One trie node: children sorted by byte, and the id of the token ending here.
#[derive(Clone, Debug, Default)]
struct Node {
    children: Vec<(u8, u32)>,
    id: Option<u32>,
}

/// A byte-trie vocabulary: encoding takes, at each position, the longest token that matches
/// the bytes there (the reference implementation's `TRIE_TOKENIZER`); decoding concatenates
/// token bytes, so any byte string round-trips exactly when every single byte is a token.
///
/// Id 0 is not in the World vocabulary: it is the end-of-text / document separator, and
/// decodes to nothing.
#[derive(Clone, Debug)]
pub struct WorldTokenizer {
    /// Bytes of each id (`None`: unused id).
    tokens: Vec<Option<Vec<u8>>>,
    nodes: Vec<Node>,
    /// UTF-8 tokens by text, for `token_to_id`.
    by_text: HashMap<String, u32>,
    end_of_text: Option<u32>,
}

impl WorldTokenizer {
    /// The byte tokenizer of byte-level models: id `b` is byte `b`, 256 tokens, no specials.
    pub fn bytes() -> Self {
        let mut out = Self::empty(None);
        for b in 0..=255u8 {
            out.insert(u32::from(b), vec![b]);
        }
        out
    }

    fn empty(end_of_text: Option<u32>) -> Self {
        Self {
            tokens: Vec::new(),
            nodes: vec![Node::default()],
            by_text: HashMap::new(),
            end_of_text,
        }
    }

    fn insert(&mut self, id: u32, bytes: Vec<u8>) {
        let mut node = 0usize;
        for &b in &bytes {
            node = match self.nodes[node].children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => self.nodes[node].children[i].1 as usize,
                Err(i) => {
                    let next = self.nodes.len();
                    self.nodes.push(Node::default());
                    self.nodes[node].children.insert(i, (b, next as u32));
                    next
                }
            };
        }
        // A byte string listed twice keeps its first (lowest) id.
        self.nodes[node].id.get_or_insert(id);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            self.by_text.entry(text.to_string()).or_insert(id);
        }
        let index = id as usize;
        if self.tokens.len() <= index {
            self.tokens.resize(index + 1, None);
        }
        self.tokens[index] = Some(bytes);
    }

    /// Reads a World vocabulary file: one token per line, `<id> <Python str or bytes literal>
    /// <byte length>`.
    ///
    /// # Errors
    /// The file is too large or unreadable; a line that does not parse, an id listed twice or
    /// past the `max_dim` limit, or a literal whose byte length disagrees with the line — each
    /// named by file and line.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = disha_core::limits::read_text_file(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// [`from_file`](Self::from_file) on text already read; `source_name` names it in errors.
    ///
    /// # Errors
    /// As [`from_file`](Self::from_file).
    pub fn parse(text: &str, source_name: &str) -> Result<Self> {
        let max_id = disha_core::limits::limits().max_dim;
        let mut out = Self::empty(Some(0));
        let mut seen = std::collections::HashSet::new();
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let fail = |message: String| ModelError::Tokenizer {
                source_name: format!("{source_name}:{}", number + 1),
                message,
            };
            let (id, rest) = line
                .split_once(' ')
                .ok_or_else(|| fail("expected `<id> <literal> <length>`".into()))?;
            let (literal, length) = rest
                .rsplit_once(' ')
                .ok_or_else(|| fail("expected `<id> <literal> <length>`".into()))?;
            let id: u32 = id
                .parse()
                .map_err(|_| fail(format!("id `{}` is not a number", excerpt(id))))?;
            if id == 0 || id as usize >= max_id {
                return Err(fail(format!(
                    "id {id} is outside 1..{max_id} (0 is the end-of-text id)"
                )));
            }
            let length: usize = length
                .parse()
                .map_err(|_| fail(format!("length `{}` is not a number", excerpt(length))))?;
            let bytes = python_literal(literal).map_err(fail)?;
            if bytes.len() != length || bytes.is_empty() || bytes.len() > MAX_TOKEN_BYTES {
                return Err(fail(format!(
                    "the literal has {} bytes, the line says {length} (1..={MAX_TOKEN_BYTES})",
                    bytes.len()
                )));
            }
            if !seen.insert(id) {
                return Err(fail(format!("id {id} is listed twice")));
            }
            out.insert(id, bytes);
        }
        if seen.is_empty() {
            return Err(ModelError::Tokenizer {
                source_name: source_name.to_string(),
                message: "no tokens".into(),
            });
        }
        Ok(out)
    }

    /// Ids up to the largest one, plus one (id 0 included).
    pub fn vocab_size(&self) -> usize {
        self.tokens
            .len()
            .max(self.end_of_text.map_or(0, |e| e as usize + 1))
    }

    /// The largest id and its text (lossy for a token that is not UTF-8).
    pub fn max_token_id(&self) -> Option<(u32, String)> {
        let id = self.tokens.iter().rposition(Option::is_some)?;
        let bytes = self.tokens[id].as_deref().unwrap_or_default();
        Some((id as u32, String::from_utf8_lossy(bytes).into_owned()))
    }

    /// The id of a token given as text.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.by_text.get(token).copied()
    }

    /// The end-of-text id (0 for the World vocabulary; none for the byte tokenizer).
    pub fn end_of_text(&self) -> Option<u32> {
        self.end_of_text
    }

    /// Greedy longest match over `bytes`.
    ///
    /// # Errors
    /// A byte with no token of its own at a position where nothing longer matches (the World
    /// vocabulary and the byte tokenizer have every single byte).
    pub fn encode_bytes(&self, bytes: &[u8]) -> std::result::Result<Vec<u32>, String> {
        let mut ids = Vec::with_capacity(bytes.len() / 3 + 1);
        let mut at = 0;
        while at < bytes.len() {
            let (mut node, mut best) = (0usize, None);
            for (i, &b) in bytes[at..].iter().enumerate() {
                match self.nodes[node].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(k) => node = self.nodes[node].children[k].1 as usize,
                    Err(_) => break,
                }
                if let Some(id) = self.nodes[node].id {
                    best = Some((id, i + 1));
                }
            }
            let (id, len) =
                best.ok_or_else(|| format!("byte 0x{:02x} at {at} has no token", bytes[at]))?;
            ids.push(id);
            at += len;
        }
        Ok(ids)
    }

    /// The bytes of `ids`, concatenated (the end-of-text id adds nothing).
    ///
    /// # Errors
    /// An id that is no token.
    pub fn decode_bytes(&self, ids: &[u32]) -> std::result::Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for &id in ids {
            if Some(id) == self.end_of_text {
                continue;
            }
            let bytes = self
                .tokens
                .get(id as usize)
                .and_then(Option::as_deref)
                .ok_or_else(|| format!("id {id} is not in the vocabulary"))?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }
}

fn excerpt(s: &str) -> String {
    s.chars().take(40).collect()
}

/// The bytes of a Python string literal (`'…'`, `"…"`, UTF-8 encoded) or bytes literal
/// (`b'…'`, `b"…"`), escapes decoded.
fn python_literal(literal: &str) -> std::result::Result<Vec<u8>, String> {
    let (is_bytes, body) = match literal.strip_prefix('b') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let quote = body.chars().next().filter(|q| *q == '\'' || *q == '"');
    let inner = match quote {
        Some(q) if body.len() >= 2 && body.ends_with(q) => &body[1..body.len() - 1],
        _ => return Err(format!("`{}` is not a Python literal", excerpt(literal))),
    };
    let mut out = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    let push_char = |out: &mut Vec<u8>, c: char| {
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    };
    let hex = |chars: &mut std::str::Chars<'_>, n: usize| -> std::result::Result<u32, String> {
        let digits: String = chars.by_ref().take(n).collect();
        if digits.len() != n {
            return Err(format!("truncated escape in `{}`", excerpt(literal)));
        }
        u32::from_str_radix(&digits, 16).map_err(|_| format!("bad hex `{digits}`"))
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            if is_bytes && !c.is_ascii() {
                return Err(format!(
                    "non-ASCII character in bytes `{}`",
                    excerpt(literal)
                ));
            }
            push_char(&mut out, c);
            continue;
        }
        let escaped = chars
            .next()
            .ok_or_else(|| format!("dangling backslash in `{}`", excerpt(literal)))?;
        let simple = match escaped {
            '\\' => Some(b'\\'),
            '\'' => Some(b'\''),
            '"' => Some(b'"'),
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0c),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(0x0b),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        let code = match escaped {
            'x' => hex(&mut chars, 2)?,
            'u' if !is_bytes => hex(&mut chars, 4)?,
            'U' if !is_bytes => hex(&mut chars, 8)?,
            '0'..='7' => {
                let mut value = escaped.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match chars.clone().next().and_then(|d| d.to_digit(8)) {
                        Some(d) => {
                            value = value * 8 + d;
                            chars.next();
                        }
                        None => break,
                    }
                }
                value
            }
            other => {
                return Err(format!(
                    "unknown escape `\\{other}` in `{}`",
                    excerpt(literal)
                ));
            }
        };
        if is_bytes {
            let byte = u8::try_from(code).map_err(|_| format!("escape {code} is not a byte"))?;
            out.push(byte);
        } else {
            let c = char::from_u32(code).ok_or_else(|| format!("U+{code:X} is not a character"))?;
            push_char(&mut out, c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_decode_like_python() {
        assert_eq!(python_literal("'\\x00'").unwrap(), vec![0]);
        assert_eq!(python_literal("b'\\xfe'").unwrap(), vec![0xfe]);
        assert_eq!(python_literal("'\\t\\n'").unwrap(), b"\t\n");
        assert_eq!(python_literal("\"it's\"").unwrap(), b"it's");
        assert_eq!(python_literal("'\\u00e9'").unwrap(), "é".as_bytes());
        assert_eq!(python_literal("'中'").unwrap(), "中".as_bytes());
        assert!(python_literal("b'é'").is_err());
        assert!(python_literal("'abc").is_err());
        assert!(python_literal("'\\x4'").is_err());
    }

    #[test]
    fn longest_match_wins_and_bytes_round_trip() {
        let vocab = "1 'a' 1\n2 'ab' 2\n3 'abc' 3\n4 'b' 1\n5 'c' 1\n";
        let t = WorldTokenizer::parse(vocab, "v").unwrap();
        assert_eq!(t.encode_bytes(b"abcab").unwrap(), vec![3, 2]);
        assert_eq!(t.encode_bytes(b"abba").unwrap(), vec![2, 4, 1]);
        assert!(t.encode_bytes(b"x").is_err());
        assert_eq!(t.decode_bytes(&[0, 3, 2]).unwrap(), b"abcab");
        let bytes = WorldTokenizer::bytes();
        let all: Vec<u8> = (0..=255).collect();
        let ids = bytes.encode_bytes(&all).unwrap();
        assert_eq!(bytes.decode_bytes(&ids).unwrap(), all);
        assert_eq!(bytes.vocab_size(), 256);
    }

    #[test]
    fn bad_lines_are_named() {
        for (vocab, needle) in [
            ("1 'a' 2\n", "says 2"),
            ("1 'a' 1\n1 'b' 1\n", "listed twice"),
            ("0 'a' 1\n", "outside"),
            ("1 a 1\n", "not a Python literal"),
            ("x 'a' 1\n", "not a number"),
        ] {
            let e = WorldTokenizer::parse(vocab, "vocab.txt")
                .unwrap_err()
                .to_string();
            assert!(e.contains("vocab.txt:") && e.contains(needle), "{e}");
        }
    }
}
