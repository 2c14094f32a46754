//! Text ↔ token ids: HF `tokenizer.json` through the `tokenizers` crate, or the tokenizer
//! embedded in a GGUF file (rebuilt as an equivalent `tokenizer.json`), plus the model's chat
//! template.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{ModelError, Result};
use std::collections::BTreeMap;

use crate::gguf::{GgufFile, GgufValue};
use crate::world_tokenizer::WorldTokenizer;

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
    inner: Backend,
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

/// The deepest nesting `tokenizer.json` may have: the `tokenizers` crate re-parses parts of
/// the file through buffered values, where deep nesting reaches serde_json's recursion limit
/// and panics (0.22) instead of failing.
const MAX_TOKENIZER_JSON_DEPTH: usize = 32;

/// Builds a `tokenizers` tokenizer from `tokenizer.json` bytes after the checks that keep the
/// crate from panicking or running away on hostile input: valid JSON throughout (strings
/// included), added tokens bounded, merges consistent with the subword prefix, and nesting at
/// most [`MAX_TOKENIZER_JSON_DEPTH`].
fn tokenizer_from_json(bytes: &[u8], source_name: &str) -> Result<tokenizers::Tokenizer> {
    // The JSON is checked first, strings included: the `tokenizers` crate (0.22) panics
    // instead of returning an error on some invalid JSON inside its `decoder` section.
    serde_json::from_slice::<ValidJson>(bytes)
        .map_err(|e| tokenizer_error(source_name, format!("invalid JSON: {e}")))?;
    check_added_tokens(bytes).map_err(|m| tokenizer_error(source_name, m))?;
    if json_depth(bytes) > MAX_TOKENIZER_JSON_DEPTH {
        return Err(tokenizer_error(
            source_name,
            format!(
                "JSON nested more than {MAX_TOKENIZER_JSON_DEPTH} levels deep (real tokenizer \
                 files nest under 10)"
            ),
        ));
    }
    tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| tokenizer_error(source_name, e))
}

/// Longest added (special) token accepted, and the most bytes of them all together: the
/// `tokenizers` crate compiles every added token into one matcher whose time and memory grow
/// faster than their length (a 16 MB token took minutes and gigabytes); real added tokens are
/// a few dozen bytes, a few hundred KB together at most.
const MAX_ADDED_TOKEN_BYTES: usize = 1024;
const MAX_ADDED_TOKENS_TOTAL_BYTES: usize = 4 << 20;

/// Checks what the `tokenizers` crate (0.22) would otherwise panic on or spend unbounded
/// time in, without building the rest of the file: the `added_tokens` against
/// [`MAX_ADDED_TOKEN_BYTES`] and [`MAX_ADDED_TOKENS_TOTAL_BYTES`], and, for a BPE model with a
/// `continuing_subword_prefix`, that the second part of every merge starts with it (the crate
/// slices it off unchecked).
fn check_added_tokens(bytes: &[u8]) -> std::result::Result<(), String> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        added_tokens: Option<Vec<Added>>,
        #[serde(default)]
        model: Option<Model>,
    }
    #[derive(serde::Deserialize)]
    struct Added {
        content: String,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        #[serde(default)]
        continuing_subword_prefix: Option<String>,
        #[serde(default)]
        merges: Option<Vec<Merge>>,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Merge {
        Text(String),
        Pair(#[allow(dead_code)] String, String),
    }
    let file: File = serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    if let Some(Model {
        continuing_subword_prefix: Some(prefix),
        merges: Some(merges),
    }) = &file.model
    {
        for (i, merge) in merges.iter().enumerate() {
            let second = match merge {
                Merge::Text(text) => text.split_once(' ').map_or("", |(_, b)| b),
                Merge::Pair(_, b) => b.as_str(),
            };
            if !second.starts_with(prefix.as_str()) {
                return Err(format!(
                    "model.merges[{i}]: the second part `{second}` does not start with the \
                     continuing_subword_prefix `{prefix}`"
                ));
            }
        }
    }
    let mut total = 0;
    for (i, token) in file.added_tokens.iter().flatten().enumerate() {
        let n = token.content.len();
        if n > MAX_ADDED_TOKEN_BYTES {
            return Err(format!(
                "added_tokens[{i}] is {n} bytes long; added tokens are at most \
                 {MAX_ADDED_TOKEN_BYTES} bytes"
            ));
        }
        total += n;
        if total > MAX_ADDED_TOKENS_TOTAL_BYTES {
            return Err(format!(
                "added_tokens hold more than {MAX_ADDED_TOKENS_TOTAL_BYTES} bytes of text"
            ));
        }
    }
    Ok(())
}

/// Any JSON value, parsed completely (every string decoded, escapes included) but nothing
/// kept: validation in constant memory.
struct ValidJson;

impl<'de> serde::Deserialize<'de> for ValidJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(ValidJsonVisitor)
    }
}

struct ValidJsonVisitor;

impl<'de> serde::de::Visitor<'de> for ValidJsonVisitor {
    type Value = ValidJson;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_i64<E>(self, _: i64) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_u64<E>(self, _: u64) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_f64<E>(self, _: f64) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_str<E>(self, _: &str) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_unit<E>(self) -> std::result::Result<ValidJson, E> {
        Ok(ValidJson)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<ValidJson, A::Error> {
        while seq.next_element::<ValidJson>()?.is_some() {}
        Ok(ValidJson)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<ValidJson, A::Error> {
        while map.next_entry::<ValidJson, ValidJson>()?.is_some() {}
        Ok(ValidJson)
    }
}

/// The nesting depth of syntactically valid JSON (brackets outside strings).
fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// `bos_token` / `eos_token` in `tokenizer_config.json` are strings or `{"content": …}` objects.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The tokenization algorithm behind a [`TextTokenizer`].
#[derive(Clone, Debug)]
enum Backend {
    /// The `tokenizers` crate (`tokenizer.json`, GGUF tokenizers, the byte-level demo one).
    Hf(Box<tokenizers::Tokenizer>),
    /// Greedy longest match over bytes (RWKV World, byte models).
    World(WorldTokenizer),
}

impl TextTokenizer {
    /// The RWKV World tokenizer from its vocabulary file (`rwkv_vocab_v20230424.txt`), with
    /// id 0 as end-of-text.
    ///
    /// # Errors
    /// As [`WorldTokenizer::from_file`].
    pub fn from_world_vocab(path: &Path) -> Result<Self> {
        Ok(Self::from_backend(
            Backend::World(WorldTokenizer::from_file(path)?),
            path.display().to_string(),
        ))
    }

    /// The tokenizer of byte-level RWKV models: id `b` is byte `b`, 256 ids, no special
    /// tokens (unlike [`Self::byte_level`], whose specials take ids 256–258).
    pub fn bytes() -> Self {
        Self::from_backend(Backend::World(WorldTokenizer::bytes()), "bytes".into())
    }

    fn from_backend(inner: Backend, source_name: String) -> Self {
        Self {
            inner,
            source_name,
            bos_token: None,
            eos_token: None,
            add_bos: false,
            chat_template: None,
        }
    }

    /// Loads a `tokenizer.json`. Special tokens and the chat template come from a
    /// `tokenizer_config.json` and `chat_template.jinja` beside it, when present.
    ///
    /// A `.txt` file is read as an RWKV World vocabulary ([`Self::from_world_vocab`]).
    ///
    /// # Errors
    /// The file cannot be read or parsed, or the chat template does not compile.
    pub fn from_file(path: &Path) -> Result<Self> {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("txt"))
        {
            return Self::from_world_vocab(path);
        }
        let source_name = path.display().to_string();
        let limit = disha_core::limits::limits().max_text_file_bytes;
        let bytes = disha_core::limits::read_bounded(path, limit, "max_text_file_bytes")?;
        let inner = Backend::Hf(Box::new(tokenizer_from_json(&bytes, &source_name)?));
        let mut out = Self::from_backend(inner, source_name);
        let dir = path.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        let mut template = None;
        if config_path.is_file() {
            let text = disha_core::limits::read_config_file(&config_path)?;
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
            let t = disha_core::limits::read_config_file(&jinja)?;
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
                .map_err(|m| ModelError::config(file.path(), "tokenizer.ggml.tokens", m))?
            }
            other => {
                return Err(ModelError::config(
                    file.path(),
                    "tokenizer.ggml.model",
                    format!(
                        "`{}` is not supported (gpt2, llama)",
                        disha_core::limits::excerpt(other)
                    ),
                ));
            }
        };
        let inner = Backend::Hf(Box::new(tokenizer_from_json(
            json.to_string().as_bytes(),
            &source_name,
        )?));
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
            .map(|t| Backend::Hf(Box::new(t)))
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
        match &self.inner {
            Backend::Hf(t) => t.get_vocab_size(true),
            Backend::World(t) => t.vocab_size(),
        }
    }

    /// The largest id the tokenizer can produce (its vocabulary and added tokens), with the
    /// token; `None` for an empty vocabulary.
    pub fn max_token_id(&self) -> Option<(u32, String)> {
        let hf = match &self.inner {
            Backend::Hf(t) => t,
            Backend::World(t) => return t.max_token_id(),
        };
        hf.get_vocab(true)
            .into_iter()
            .max_by_key(|(token, id)| (*id, std::cmp::Reverse(token.clone())))
            .map(|(token, id)| (id, token))
    }

    /// Checks that every id this tokenizer can produce indexes a model vocabulary of
    /// `vocab_size` tokens: a model fed an id past its embedding table fails inside the
    /// backend, so the pairing is refused before any text is encoded.
    ///
    /// # Errors
    /// [`ModelError::TokenizerVocabulary`] naming the tokenizer, the id and its token.
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        match self.max_token_id() {
            Some((id, token)) if id as usize >= vocab_size => {
                Err(ModelError::TokenizerVocabulary {
                    source_name: self.source_name.clone(),
                    id,
                    token,
                    vocab_size,
                })
            }
            _ => Ok(()),
        }
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Backend::Hf(t) => t.token_to_id(token),
            Backend::World(t) => t.token_to_id(token),
        }
    }

    /// The beginning-of-sequence id, if known.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The end-of-sequence id, if known.
    pub fn eos_id(&self) -> Option<u32> {
        match &self.inner {
            Backend::World(t) => t.end_of_text(),
            Backend::Hf(_) => self.eos_token.as_deref().and_then(|t| self.token_to_id(t)),
        }
    }

    /// Encodes text. With `add_special_tokens`, the tokenizer's post-processor runs (a
    /// `tokenizer.json` adds its BOS there) and, for GGUF tokenizers with `add_bos_token`, BOS
    /// is prepended.
    ///
    /// # Errors
    /// The tokenizer failed (reported by the `tokenizers` crate).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let hf = match &self.inner {
            Backend::Hf(t) => t,
            Backend::World(t) => {
                return t
                    .encode_bytes(text.as_bytes())
                    .map_err(|message| ModelError::Tokenizer {
                        source_name: self.source_name.clone(),
                        message,
                    });
            }
        };
        let encoding = hf
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
    ///
    /// A World / byte tokenizer decodes the concatenated bytes, with invalid UTF-8 (a token
    /// that ends inside a character) replaced by U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        match &self.inner {
            Backend::Hf(t) => t
                .decode(ids, skip_special_tokens)
                .map_err(|e| tokenizer_error(&self.source_name, e)),
            Backend::World(t) => t
                .decode_bytes(ids)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .map_err(|message| ModelError::Tokenizer {
                    source_name: self.source_name.clone(),
                    message,
                }),
        }
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
                "pre-tokenizer `{}` is not supported (default, gpt2, smollm, llama-bpe); \
                 load the model's tokenizer.json instead",
                disha_core::limits::excerpt(other)
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

/// The longest SentencePiece piece whose merges are derived (real vocabularies stay under 64).
const MAX_PIECE_BYTES: usize = 1024;

/// SentencePiece BPE (Llama 1/2, Mistral v0.1): merges are every split `a + b` of a vocabulary
/// piece into two pieces, ordered by the score of the merged piece (highest first) — the
/// ordering transformers' `SentencePieceExtractor` produces.
fn sentencepiece_bpe_json(
    tokens: &[String],
    types: &[u64],
    scores: &[f64],
    unk: Option<String>,
    add_space_prefix: bool,
) -> std::result::Result<Value, String> {
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
        if piece.len() > MAX_PIECE_BYTES {
            return Err(format!(
                "token {id} is {} bytes long; SentencePiece pieces are at most \
                 {MAX_PIECE_BYTES} bytes (deriving its merges costs the square of its length)",
                piece.len()
            ));
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
    Ok(json!({
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
    }))
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

#[cfg(test)]
mod hostile_input_tests {
    use super::*;

    /// A minimal BPE `tokenizer.json` with `extra` merged into its top level.
    fn tokenizer_json(extra: Value) -> Vec<u8> {
        let mut json = json!({
            "version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
            "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": {"a": 0, "b": 1, "ab": 2, "##b": 3, "a##b": 4}, "merges": ["a b"]}
        });
        for (k, v) in extra.as_object().unwrap() {
            json[k] = v.clone();
        }
        json.to_string().into_bytes()
    }

    fn error(bytes: &[u8]) -> String {
        tokenizer_from_json(bytes, "t.json")
            .unwrap_err()
            .to_string()
    }

    /// Each input below made the `tokenizers` crate panic, or spend minutes and gigabytes,
    /// before these checks (found by the fuzzing harness).
    #[test]
    fn inputs_that_break_the_tokenizers_crate_are_errors() {
        assert!(tokenizer_from_json(&tokenizer_json(json!({})), "t.json").is_ok());
        // A lone surrogate escape inside the decoder section.
        let bad = br#"{"decoder": {"type": "\ud800"}}"#;
        assert!(error(bad).contains("invalid JSON"), "{}", error(bad));
        // Nesting the crate's buffered re-parse cannot take.
        let deep = format!("{{\"decoder\": {}1{}}}", "[".repeat(100), "]".repeat(100));
        assert!(error(deep.as_bytes()).contains("nested more than"));
        // An added token of 16 MB.
        let huge = tokenizer_json(
            json!({"added_tokens": [{"id": 5, "content": "x".repeat(1 << 24),
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false,
            "special": true}]}),
        );
        assert!(error(&huge).contains("added_tokens[0] is 16777216 bytes"));
        // A subword prefix longer than a merge's second part (sliced unchecked).
        let mut prefixed = serde_json::from_slice::<Value>(&tokenizer_json(json!({}))).unwrap();
        prefixed["model"]["continuing_subword_prefix"] = json!("##");
        let e = error(prefixed.to_string().as_bytes());
        assert!(e.contains("merges[0]") && e.contains("`b`"), "{e}");
        prefixed["model"]["merges"] = json!(["a ##b"]);
        assert!(tokenizer_from_json(prefixed.to_string().as_bytes(), "t.json").is_ok());
    }

    #[test]
    fn json_depth_ignores_brackets_in_strings() {
        assert_eq!(json_depth(br#"{"a": [1, {"b": "[[[\"]]"}]}"#), 3);
        assert_eq!(json_depth(b"1"), 0);
    }
}
