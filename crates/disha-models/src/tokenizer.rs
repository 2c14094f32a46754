//! Text ↔ token ids: HF `tokenizer.json` through the `tokenizers` crate, or the tokenizer
//! embedded in a GGUF file (rebuilt as an equivalent `tokenizer.json`), plus the model's chat
//! template.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{ModelError, Result};
use std::collections::BTreeMap;

use crate::gguf::{GgufFile, GgufValue};

/// Metadata lookups with the file path for errors.
struct MetadataView<'a> {
    metadata: &'a BTreeMap<String, GgufValue>,
    path: &'a Path,
}

impl MetadataView<'_> {
    fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn path(&self) -> &Path {
        self.path
    }
}

/// A tokenizer with its special tokens and (optional) chat template.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    source_name: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos: bool,
    chat_template: Option<ChatTemplate>,
}

fn tokenizer_error(source_name: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        source_name: source_name.to_string(),
        message: e.to_string(),
    }
}

/// `bos_token` / `eos_token` in `tokenizer_config.json` are strings or `{"content": …}` objects.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`. Special tokens and the chat template come from a
    /// `tokenizer_config.json` and `chat_template.jinja` beside it, when present.
    ///
    /// # Errors
    /// The file cannot be read or parsed, or the chat template does not compile.
    pub fn from_file(path: &Path) -> Result<Self> {
        let source_name = path.display().to_string();
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| tokenizer_error(&source_name, e))?;
        let mut out = Self {
            inner,
            source_name,
            bos_token: None,
            eos_token: None,
            add_bos: false,
            chat_template: None,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        let mut template = None;
        if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| ModelError::io(&config_path, e))?;
            let config: Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::config(&config_path, "<json>", e.to_string()))?;
            out.bos_token = token_string(config.get("bos_token"));
            out.eos_token = token_string(config.get("eos_token"));
            template = config
                .get("chat_template")
                .and_then(Value::as_str)
                .map(|t| (t.to_string(), config_path.display().to_string()));
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let t = std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?;
            template = Some((t, jinja.display().to_string()));
        }
        if let Some((t, name)) = template {
            out.set_chat_template(&t, name)?;
        }
        Ok(out)
    }

    /// Rebuilds the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata:
    /// `gpt2` (byte-level BPE with merges) or `llama` (SentencePiece BPE with byte fallback,
    /// merges derived from the piece scores as transformers' converter does).
    ///
    /// # Errors
    /// Missing metadata, or a tokenizer model / pre-tokenizer this builder does not know
    /// (named).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        Self::from_gguf_metadata(&file.metadata, file.path())
    }

    /// [`Self::from_gguf`] from the metadata alone; `path` names the source in errors.
    ///
    /// # Errors
    /// As [`Self::from_gguf`].
    pub fn from_gguf_metadata(metadata: &BTreeMap<String, GgufValue>, path: &Path) -> Result<Self> {
        let file = MetadataView { metadata, path };
        let source_name = format!("{} (embedded)", path.display());
        let strings = |key: &str| -> Result<Vec<String>> {
            file.get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| ModelError::config(file.path(), key, "missing or not an array"))?
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        ModelError::config(file.path(), key, "expected an array of strings")
                    })
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = file
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let id_of = |key: &str| {
            file.get(key)
                .and_then(GgufValue::as_u64)
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        let model = file
            .get("tokenizer.ggml.model")
            .and_then(GgufValue::as_str)
            .unwrap_or("<missing>");
        let json = match model {
            "gpt2" => {
                let pre = file
                    .get("tokenizer.ggml.pre")
                    .and_then(GgufValue::as_str)
                    .unwrap_or("default");
                byte_level_bpe_json(&tokens, &types, strings("tokenizer.ggml.merges")?, pre)
                    .map_err(|m| ModelError::config(file.path(), "tokenizer.ggml.pre", m))?
            }
            "llama" => {
                let scores: Vec<f64> = file
                    .get("tokenizer.ggml.scores")
                    .and_then(GgufValue::as_array)
                    .ok_or_else(|| {
                        ModelError::config(file.path(), "tokenizer.ggml.scores", "missing")
                    })?
                    .iter()
                    .map(|v| v.as_f64().unwrap_or(0.0))
                    .collect();
                let add_space_prefix = file
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(GgufValue::as_bool)
                    .unwrap_or(true);
                sentencepiece_bpe_json(
                    &tokens,
                    &types,
                    &scores,
                    id_of("tokenizer.ggml.unknown_token_id"),
                    add_space_prefix,
                )
            }
            other => {
                return Err(ModelError::config(
                    file.path(),
                    "tokenizer.ggml.model",
                    format!("`{other}` is not supported (gpt2, llama)"),
                ));
            }
        };
        let inner = tokenizers::Tokenizer::from_bytes(json.to_string())
            .map_err(|e| tokenizer_error(&source_name, e))?;
        let add_bos = file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool)
            .unwrap_or(model == "llama");
        let mut out = Self {
            inner,
            source_name: source_name.clone(),
            bos_token: id_of("tokenizer.ggml.bos_token_id"),
            eos_token: id_of("tokenizer.ggml.eos_token_id"),
            add_bos,
            chat_template: None,
        };
        if let Some(t) = file
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
        {
            out.set_chat_template(t, source_name)?;
        }
        Ok(out)
    }

    /// A byte-level tokenizer: ids 0–255 are the bytes of the UTF-8 text, then
    /// [`Self::BYTE_LEVEL_SPECIALS`] (`<|bos|>` = 256, `<|eos|>` = 257, `<|pad|>` = 258). No
    /// merges, no files: what small models trained from scratch (the demo) use.
    pub fn byte_level() -> Self {
        // GPT-2's byte → printable-character table, so the ByteLevel pre-tokenizer and decoder
        // of the `tokenizers` crate map each byte to exactly one vocabulary entry.
        let printable = |b: u32| {
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b)
        };
        let mut next = 256;
        let mut vocab = Map::new();
        for b in 0..256u32 {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            vocab.insert(char::from_u32(c).expect("valid char").to_string(), json!(b));
        }
        let specials: Vec<String> = Self::BYTE_LEVEL_SPECIALS
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (i, t) in specials.iter().enumerate() {
            vocab.insert(t.clone(), json!(256 + i));
        }
        let types: Vec<u64> = (0..256)
            .map(|_| 1)
            .chain(specials.iter().map(|_| 3))
            .collect();
        let tokens: Vec<String> = (0..256)
            .map(|b| b.to_string())
            .chain(specials.clone())
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        let json = json!({
            "version": "1.0",
            "added_tokens": added_tokens(&tokens, &types),
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []},
        });
        let inner = tokenizers::Tokenizer::from_bytes(json.to_string())
            .expect("the byte-level tokenizer JSON is valid");
        Self {
            inner,
            source_name: "byte-level".into(),
            bos_token: Some(specials[0].clone()),
            eos_token: Some(specials[1].clone()),
            add_bos: true,
            chat_template: None,
        }
    }

    /// The special tokens of [`Self::byte_level`], with ids 256, 257, 258.
    pub const BYTE_LEVEL_SPECIALS: [&'static str; 3] = ["<|bos|>", "<|eos|>", "<|pad|>"];

    /// Replaces the chat template.
    ///
    /// # Errors
    /// The template does not compile.
    pub fn set_chat_template(&mut self, template: &str, source_name: String) -> Result<()> {
        self.chat_template = Some(ChatTemplate::new(
            template,
            source_name,
            self.bos_token.clone().unwrap_or_default(),
            self.eos_token.clone().unwrap_or_default(),
        )?);
        Ok(())
    }

    /// The chat template, if the tokenizer has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Where the tokenizer came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The beginning-of-sequence id, if known.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The end-of-sequence id, if known.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Encodes text. With `add_special_tokens`, the tokenizer's post-processor runs (a
    /// `tokenizer.json` adds its BOS there) and, for GGUF tokenizers with `add_bos_token`, BOS
    /// is prepended.
    ///
    /// # Errors
    /// The tokenizer failed (reported by the `tokenizers` crate).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tokenizer_error(&self.source_name, e))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens
            && self.add_bos
            && let Some(bos) = self.bos_id()
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Decodes ids to text.
    ///
    /// # Errors
    /// The tokenizer failed.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tokenizer_error(&self.source_name, e))
    }

    /// Renders `messages` with the chat template (generation prompt appended) and encodes the
    /// result without adding special tokens again (the template places them).
    ///
    /// # Errors
    /// No chat template, or rendering / encoding failed.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| ModelError::ChatTemplate {
                source_name: self.source_name.clone(),
                message: "this tokenizer has no chat template; pass one explicitly".into(),
            })?;
        let text = template.render(messages, true)?;
        self.encode(&text, false)
    }
}

/// GPT-2 / Llama-3 pre-tokenizer regexes (what llama.cpp's `tokenizer.ggml.pre` names).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token types in GGUF: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
fn added_tokens(tokens: &[String], types: &[u64]) -> Vec<Value> {
    tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(2..=4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] != 4})
        })
        .collect()
}

fn byte_level_bpe_json(
    tokens: &[String],
    types: &[u64],
    merges: Vec<String>,
    pre: &str,
) -> std::result::Result<Value, String> {
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        // GPT-2's own regex, built into the ByteLevel pre-tokenizer.
        "default" | "gpt2" | "smollm" | "gpt-2" => byte_level.clone(),
        "llama-bpe" | "llama3" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]}),
        other => {
            return Err(format!(
                "pre-tokenizer `{other}` is not supported (default, gpt2, smollm, llama-bpe); \
                 load the model's tokenizer.json instead"
            ));
        }
    };
    Ok(json!({
        "version": "1.0",
        "added_tokens": added_tokens(tokens, types),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}

/// SentencePiece BPE (Llama 1/2, Mistral v0.1): merges are every split `a + b` of a vocabulary
/// piece into two pieces, ordered by the score of the merged piece (highest first) — the
/// ordering transformers' `SentencePieceExtractor` produces.
fn sentencepiece_bpe_json(
    tokens: &[String],
    types: &[u64],
    scores: &[f64],
    unk: Option<String>,
    add_space_prefix: bool,
) -> Value {
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(1) != 1 {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(split);
            if let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) {
                merges.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    ia,
                    ib,
                    format!("{a} {b}"),
                ));
            }
        }
    }
    // Highest merged-piece score first; ties by the ids of the parts (as transformers).
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0",
        "added_tokens": added_tokens(tokens, types),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab,
                  "merges": merges.into_iter().map(|m| m.3).collect::<Vec<_>>()},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_ids_are_the_utf8_bytes() {
        let t = TextTokenizer::byte_level();
        let text = "2+3=5 héllo\n\t🦙";
        let ids = t.encode(text, false).unwrap();
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, bytes);
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        assert_eq!(t.encode("a", true).unwrap(), vec![256, 97]);
        assert_eq!((t.bos_id(), t.eos_id()), (Some(256), Some(257)));
        assert_eq!(t.token_to_id("<|pad|>"), Some(258));
        assert_eq!(t.vocab_size(), 259);
        // Special tokens in text are matched whole.
        assert_eq!(t.encode("x<|eos|>", false).unwrap(), vec![120, 257]);
    }
}
