//! Instruction-tuning data: JSONL records → prompt / response token ids with the prompt masked
//! out of the loss, truncated to `max_len`, split, shuffled with a seed, and batched.
//!
//! The default template is the Alpaca prompt the DiSHA / MiSS papers fine-tune with
//! (`### Instruction:` / `### Response:`, response followed by EOS); the model's chat template
//! and a raw prompt are the alternatives.

use std::path::Path;

use disha_models::{ChatMessage, ModelError, SplitMix64, TextTokenizer};
use serde_json::Value;

use crate::TrainError;

/// The label of positions that do not count in the loss (PEFT / transformers convention).
pub const IGNORE_INDEX: i64 = disha_models::IGNORE_INDEX;

/// Which JSON fields hold the instruction, the optional extra input, and the response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldMap {
    /// The instruction / question field.
    pub instruction: String,
    /// An optional context field appended to the instruction (Alpaca's `input`).
    pub input: Option<String>,
    /// The response / answer field.
    pub output: String,
}

impl FieldMap {
    /// Known dataset layouts: `alpaca` (instruction, input, output), `metamath` (query,
    /// response), `gsm8k` (question, answer).
    pub fn preset(name: &str) -> Option<Self> {
        let (instruction, input, output) = match name {
            "alpaca" => ("instruction", Some("input"), "output"),
            "metamath" => ("query", None, "response"),
            "gsm8k" => ("question", None, "answer"),
            _ => return None,
        };
        Some(Self {
            instruction: instruction.into(),
            input: input.map(Into::into),
            output: output.into(),
        })
    }
}

/// How a record becomes the prompt text (`--template`, `template` in run settings).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PromptTemplate {
    /// Stanford Alpaca's prompt (with or without the `### Input:` block).
    Alpaca,
    /// The tokenizer's chat template, the instruction (and input) as one user turn.
    Chat,
    /// The instruction (and input, after a newline) as is.
    Raw,
}

/// One JSONL record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// 1-based line number in the file.
    pub line: usize,
    /// The instruction text.
    pub instruction: String,
    /// The optional input text (empty strings count as absent).
    pub input: Option<String>,
    /// The response text.
    pub output: String,
}

/// One tokenized training example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Prompt then response ids.
    pub input_ids: Vec<u32>,
    /// [`IGNORE_INDEX`] over the prompt, the ids over the response.
    pub labels: Vec<i64>,
}

impl Example {
    /// Positions that count in the loss (`labels[t]` predicted from position `t - 1`).
    pub fn target_count(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

fn field(obj: &serde_json::Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!(
            "field `{name}` must be a string, got {}",
            disha_core::limits::excerpt(other)
        )),
    }
}

/// How a JSONL file is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonlOptions {
    /// Skip (and count) unusable lines instead of stopping at the first.
    pub skip_bad_lines: bool,
    /// Longest line accepted, in bytes; a longer line is a bad line. Bounds memory: a line is
    /// never held (or tokenized) beyond this.
    pub max_line_bytes: usize,
}

impl Default for JsonlOptions {
    fn default() -> Self {
        Self {
            skip_bad_lines: false,
            max_line_bytes: disha_core::limits::limits().max_line_bytes,
        }
    }
}

/// One line of a file, read without ever holding more than `max` bytes of it.
enum Line {
    /// The line's bytes (without the newline and a trailing `\r`).
    Bytes,
    /// The line was longer than `max`; its length in bytes.
    TooLong(u64),
}

/// Reads the next line into `buf` (cleared first). `None` at the end of the input.
fn read_line(
    reader: &mut impl std::io::BufRead,
    max: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Line>> {
    buf.clear();
    let mut length: u64 = 0;
    let mut any = false;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            break;
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let part = &available[..newline.unwrap_or(available.len())];
        length += part.len() as u64;
        if length <= max as u64 + 1 {
            // One byte of slack for a `\r` before the newline.
            buf.extend_from_slice(part);
        }
        let used = part.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if buf.last() == Some(&b'\r') && length <= max as u64 + 1 {
        buf.pop();
        length -= 1;
    }
    if length > max as u64 {
        buf.clear();
        return Ok(Some(Line::TooLong(length)));
    }
    Ok(Some(Line::Bytes))
}

/// Parses one line into a record.
fn parse_record(line: &[u8], number: usize, fields: &FieldMap) -> Result<Record, String> {
    let text = std::str::from_utf8(line).map_err(|e| {
        format!(
            "not valid UTF-8 (invalid byte sequence at byte {} of the line)",
            e.valid_up_to()
        )
    })?;
    let obj = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => obj,
        Ok(_) => return Err("expected a JSON object".to_string()),
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    let required = |name: &str| field(&obj, name)?.ok_or_else(|| format!("missing field `{name}`"));
    Ok(Record {
        line: number,
        instruction: required(&fields.instruction)?,
        input: match &fields.input {
            Some(name) => field(&obj, name)?.filter(|s| !s.is_empty()),
            None => None,
        },
        output: required(&fields.output)?,
    })
}

/// Reads a JSONL file line by line. Blank lines are ignored. A line that is too long, not
/// UTF-8, not a JSON object, or missing a field is an error naming the file and line, unless
/// `options.skip_bad_lines` (then it is skipped and counted).
///
/// # Errors
/// I/O, a bad line (without `skip_bad_lines`), or no usable record at all.
pub fn read_jsonl(
    path: &Path,
    fields: &FieldMap,
    options: JsonlOptions,
) -> Result<(Vec<Record>, usize), TrainError> {
    let file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut reader = std::io::BufReader::new(file);
    let mut buf = Vec::new();
    let mut records = Vec::new();
    let mut skipped = 0;
    let mut number = 0;
    while let Some(line) = read_line(&mut reader, options.max_line_bytes, &mut buf)
        .map_err(|e| TrainError::io(path, e))?
    {
        number += 1;
        let parsed = match line {
            Line::TooLong(length) => Err(format!(
                "line is {length} bytes, longer than the maximum of {} (--max-line-bytes)",
                options.max_line_bytes
            )),
            Line::Bytes if buf.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Bytes => parse_record(&buf, number, fields),
        };
        match parsed {
            Ok(record) => records.push(record),
            Err(_) if options.skip_bad_lines => skipped += 1,
            Err(message) => {
                return Err(TrainError::Data {
                    path: path.to_path_buf(),
                    line: number,
                    message: format!("{message} (use --skip-bad-lines to skip such lines)"),
                });
            }
        }
    }
    if records.is_empty() {
        return Err(TrainError::File {
            path: path.to_path_buf(),
            message: format!(
                "no usable record in {number} lines ({skipped} skipped as bad); expected JSON \
                 objects with fields `{}`{} and `{}`",
                fields.instruction,
                fields
                    .input
                    .as_ref()
                    .map(|i| format!(", `{i}`"))
                    .unwrap_or_default(),
                fields.output
            ),
        });
    }
    Ok((records, skipped))
}

/// The prompt text of `record` under `template`.
///
/// # Errors
/// [`PromptTemplate::Chat`] with a tokenizer that has no chat template.
pub fn render_prompt(
    record: &Record,
    template: PromptTemplate,
    tokenizer: &TextTokenizer,
) -> Result<String, ModelError> {
    let instruction = match &record.input {
        Some(input) if template != PromptTemplate::Alpaca => {
            format!("{}\n{input}", record.instruction)
        }
        _ => record.instruction.clone(),
    };
    Ok(match template {
        PromptTemplate::Alpaca => match &record.input {
            Some(input) => format!(
                "Below is an instruction that describes a task, paired with an input that \
                 provides further context. Write a response that appropriately completes the \
                 request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
            ),
            None => format!(
                "Below is an instruction that describes a task. Write a response that \
                 appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
            ),
        },
        PromptTemplate::Chat => {
            let template = tokenizer
                .chat_template()
                .ok_or_else(|| ModelError::ChatTemplate {
                    source_name: tokenizer.source_name().to_string(),
                    message: "--template chat needs a tokenizer with a chat template".into(),
                })?;
            template.render(&[ChatMessage::new("user", instruction)], true)?
        }
        PromptTemplate::Raw => instruction,
    })
}

/// Tokenizes one record: prompt ids (with BOS when the tokenizer adds one; chat prompts carry
/// their own special tokens) masked with [`IGNORE_INDEX`], then response ids plus EOS as
/// targets, cut to `max_len`. `None` when the prompt leaves no room for a single target.
///
/// # Errors
/// Tokenizer or chat-template failures.
pub fn encode_example(
    record: &Record,
    template: PromptTemplate,
    tokenizer: &TextTokenizer,
    max_len: usize,
) -> Result<Option<Example>, ModelError> {
    let prompt = render_prompt(record, template, tokenizer)?;
    let mut input_ids = tokenizer.encode(&prompt, template != PromptTemplate::Chat)?;
    let prompt_len = input_ids.len();
    input_ids.extend(tokenizer.encode(&record.output, false)?);
    input_ids.extend(tokenizer.eos_id());
    input_ids.truncate(max_len);
    if input_ids.len() <= prompt_len {
        return Ok(None);
    }
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if i < prompt_len {
                IGNORE_INDEX
            } else {
                id as i64
            }
        })
        .collect();
    Ok(Some(Example { input_ids, labels }))
}

/// Tokenizes every record; returns the examples and how many were dropped because the prompt
/// alone reached `max_len`.
///
/// # Errors
/// As [`encode_example`], naming the record's line; or no example left at all.
pub fn encode_all(
    path: &Path,
    records: &[Record],
    template: PromptTemplate,
    tokenizer: &TextTokenizer,
    max_len: usize,
) -> Result<(Vec<Example>, usize), TrainError> {
    let mut examples = Vec::with_capacity(records.len());
    let mut dropped = 0;
    for record in records {
        match encode_example(record, template, tokenizer, max_len).map_err(|e| {
            TrainError::Data {
                path: path.to_path_buf(),
                line: record.line,
                message: e.to_string(),
            }
        })? {
            Some(example) => examples.push(example),
            None => dropped += 1,
        }
    }
    if examples.is_empty() {
        return Err(TrainError::File {
            path: path.to_path_buf(),
            message: format!(
                "every prompt of its {} records is longer than max_len {max_len}; no example left",
                records.len()
            ),
        });
    }
    Ok((examples, dropped))
}

/// Seeded Fisher–Yates shuffle.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Splits off `validation` examples (after a seeded shuffle) as the validation set.
pub fn split_validation(
    mut examples: Vec<Example>,
    validation: usize,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    shuffle(&mut examples, seed ^ 0x5EED_F00D);
    let validation = validation.min(examples.len().saturating_sub(1));
    let train = examples.split_off(validation);
    (train, examples)
}

/// A padded batch on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBatch {
    /// `[batch, seq]` ids, right-padded with `pad_id`.
    pub input_ids: Vec<i64>,
    /// `[batch, seq]` labels, padding labelled [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// `[batch, seq]`.
    pub shape: [usize; 2],
    /// Targets that count in the loss.
    pub targets: usize,
    /// Real (non-padding) tokens.
    pub tokens: usize,
    /// Packed batches: the lengths of the sequences in each row, in order (the model attends
    /// within each one only; see `CausalLm::forward_packed`). `None`: one sequence per row.
    pub segments: Option<Vec<Vec<usize>>>,
}

/// Right-pads `examples` to the longest one. Causal attention never lets a real token see the
/// padding after it, and padded positions are labelled [`IGNORE_INDEX`], so padding changes
/// neither the loss nor its gradient.
pub fn collate(examples: &[&Example], pad_id: u32) -> HostBatch {
    let seq = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let mut input_ids = Vec::with_capacity(examples.len() * seq);
    let mut labels = Vec::with_capacity(examples.len() * seq);
    for e in examples {
        input_ids.extend(e.input_ids.iter().map(|&t| t as i64));
        input_ids.extend(std::iter::repeat_n(pad_id as i64, seq - e.input_ids.len()));
        labels.extend(&e.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, seq - e.labels.len()));
    }
    HostBatch {
        input_ids,
        labels,
        shape: [examples.len(), seq],
        targets: examples.iter().map(|e| e.target_count()).sum(),
        tokens: examples.iter().map(|e| e.input_ids.len()).sum(),
        segments: None,
    }
}

/// Packs `rows` (each a list of examples whose lengths add up to at most `row_len`) into one
/// `[rows, row_len']` batch, `row_len'` the longest row: sequences follow each other, padding
/// fills the end. The first label of every sequence is [`IGNORE_INDEX`] (nothing predicts it,
/// as in an unpacked row), so no loss term crosses a sequence boundary, and with the
/// block-diagonal attention of `CausalLm::forward_packed` the loss and its gradient equal those
/// of the same examples unpacked.
pub fn collate_packed(rows: &[Vec<&Example>], pad_id: u32) -> HostBatch {
    let len = |row: &Vec<&Example>| row.iter().map(|e| e.input_ids.len()).sum::<usize>();
    let seq = rows.iter().map(len).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(rows.len() * seq);
    let mut labels = Vec::with_capacity(rows.len() * seq);
    let mut segments = Vec::with_capacity(rows.len());
    for row in rows {
        for e in row {
            input_ids.extend(e.input_ids.iter().map(|&t| t as i64));
            labels.push(IGNORE_INDEX);
            labels.extend(e.labels.iter().skip(1));
        }
        let used = len(row);
        input_ids.extend(std::iter::repeat_n(pad_id as i64, seq - used));
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, seq - used));
        segments.push(row.iter().map(|e| e.input_ids.len()).collect());
    }
    let all = || rows.iter().flatten();
    HostBatch {
        input_ids,
        labels,
        shape: [rows.len(), seq],
        targets: all().map(|e| e.target_count()).sum(),
        tokens: all().map(|e| e.input_ids.len()).sum(),
        segments: Some(segments),
    }
}

/// Where a [`DataLoader`] is: epoch and position in that epoch's order (saved in checkpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    /// Completed passes over the data.
    pub epoch: u64,
    /// Examples consumed in the current epoch.
    pub cursor: usize,
}

/// Endless, seeded batches: each epoch is a fresh shuffle (seed + epoch), so a run is
/// reproducible and resumable from a [`DataPosition`].
#[derive(Clone, Debug)]
pub struct DataLoader {
    examples: Vec<Example>,
    batch_size: usize,
    seed: u64,
    pad_id: u32,
    order: Vec<usize>,
    position: DataPosition,
    /// Packing: each row holds consecutive examples up to this many tokens.
    pack_len: Option<usize>,
}

impl DataLoader {
    /// A loader over `examples` (at least one) with `batch_size >= 1`.
    ///
    /// # Panics
    /// No examples or a zero batch size (the CLI validates both first).
    pub fn new(examples: Vec<Example>, batch_size: usize, seed: u64, pad_id: u32) -> Self {
        assert!(
            !examples.is_empty() && batch_size > 0,
            "empty data or zero batch size"
        );
        let mut loader = Self {
            examples,
            batch_size,
            seed,
            pad_id,
            order: Vec::new(),
            position: DataPosition {
                epoch: 0,
                cursor: 0,
            },
            pack_len: None,
        };
        loader.reshuffle();
        loader
    }

    /// Packs consecutive examples (in the epoch's shuffled order) into rows of at most
    /// `row_len` tokens; a batch is then `batch_size` such rows. Examples longer than
    /// `row_len` get a row of their own.
    pub fn with_packing(mut self, row_len: usize) -> Self {
        self.pack_len = Some(row_len);
        self
    }

    fn reshuffle(&mut self) {
        self.order = (0..self.examples.len()).collect();
        shuffle(&mut self.order, self.seed.wrapping_add(self.position.epoch));
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Never empty (see [`Self::new`]).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The current position.
    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// Continues from `position` (as saved by a checkpoint).
    pub fn seek(&mut self, position: DataPosition) {
        self.position = DataPosition {
            epoch: position.epoch,
            cursor: position.cursor.min(self.examples.len()),
        };
        self.reshuffle();
    }

    /// The next batch; an epoch's last batch may be smaller.
    pub fn next_batch(&mut self) -> HostBatch {
        if self.position.cursor >= self.examples.len() {
            self.position.epoch += 1;
            self.position.cursor = 0;
            self.reshuffle();
        }
        if let Some(row_len) = self.pack_len {
            return self.next_packed_batch(row_len);
        }
        let end = (self.position.cursor + self.batch_size).min(self.examples.len());
        let batch: Vec<&Example> = self.order[self.position.cursor..end]
            .iter()
            .map(|&i| &self.examples[i])
            .collect();
        self.position.cursor = end;
        collate(&batch, self.pad_id)
    }

    /// The next `batch_size` packed rows (fewer at the end of an epoch).
    fn next_packed_batch(&mut self, row_len: usize) -> HostBatch {
        let mut rows: Vec<Vec<&Example>> = Vec::new();
        let mut used = 0;
        while self.position.cursor < self.examples.len() {
            let e = &self.examples[self.order[self.position.cursor]];
            let n = e.input_ids.len();
            let fits = rows.last().is_some_and(|row| !row.is_empty()) && used + n <= row_len;
            if !fits {
                if rows.len() == self.batch_size {
                    break;
                }
                rows.push(Vec::new());
                used = 0;
            }
            rows.last_mut().expect("a row was just pushed").push(e);
            used += n;
            self.position.cursor += 1;
        }
        collate_packed(&rows, self.pad_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &[&str]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), lines.join("\n")).unwrap();
        f
    }

    #[test]
    fn bad_lines_are_named_or_skipped() {
        let f = write(&[
            r#"{"question": "1+1?", "answer": "2"}"#,
            "",
            r#"{"question": "2+2?"}"#,
            "not json",
            r#"{"question": 3, "answer": 4}"#,
        ]);
        let gsm = FieldMap::preset("gsm8k").unwrap();
        let err = read_jsonl(f.path(), &gsm, strict())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":3:") && err.contains("missing field `answer`"),
            "{err}"
        );
        let (records, skipped) = read_jsonl(f.path(), &gsm, skipping()).unwrap();
        assert_eq!(skipped, 2);
        assert_eq!(records.len(), 2);
        assert_eq!((records[1].line, records[1].instruction.as_str()), (5, "3"));
        let alpaca = FieldMap::preset("alpaca").unwrap();
        let err = read_jsonl(f.path(), &alpaca, skipping())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no usable record in 5 lines"), "{err}");
        assert!(
            !err.contains(":0:"),
            "whole-file errors name no line: {err}"
        );
    }

    fn strict() -> JsonlOptions {
        JsonlOptions {
            skip_bad_lines: false,
            max_line_bytes: 1 << 20,
        }
    }

    fn skipping() -> JsonlOptions {
        JsonlOptions {
            skip_bad_lines: true,
            ..strict()
        }
    }

    #[test]
    fn long_and_non_utf8_lines_are_bad_lines_with_their_number() {
        let good = br#"{"question": "1+1?", "answer": "2"}"#;
        let mut bytes = good.to_vec();
        bytes.extend(b"\r\n");
        // Line 2: a 3 MB line, never held whole.
        bytes.extend(br#"{"question": ""#);
        bytes.extend(std::iter::repeat_n(b'x', 3 << 20));
        bytes.extend(b"\", \"answer\": \"1\"}\n");
        // Line 3: invalid UTF-8 inside a string.
        bytes.extend(b"{\"question\": \"\xff\xfe\", \"answer\": \"1\"}\n");
        bytes.extend(good);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &bytes).unwrap();
        let gsm = FieldMap::preset("gsm8k").unwrap();
        let err = read_jsonl(f.path(), &gsm, strict())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2:") && err.contains("longer than the maximum"),
            "{err}"
        );
        let options = JsonlOptions {
            max_line_bytes: 4 << 20,
            ..strict()
        };
        let err = read_jsonl(f.path(), &gsm, options).unwrap_err().to_string();
        assert!(err.contains(":3:") && err.contains("UTF-8"), "{err}");
        let (records, skipped) = read_jsonl(f.path(), &gsm, skipping()).unwrap();
        assert_eq!(skipped, 2);
        assert_eq!(records.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 4]);
        // A line exactly at the limit is accepted, one byte more is not (CRLF not counted).
        let limit = JsonlOptions {
            max_line_bytes: good.len(),
            ..strict()
        };
        let f2 = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f2.path(), [good.as_slice(), b"\r\n", good, b" "].concat()).unwrap();
        let err = read_jsonl(f2.path(), &gsm, limit).unwrap_err().to_string();
        assert!(
            err.contains(":2:") && err.contains(&format!("{} bytes", good.len() + 1)),
            "{err}"
        );
    }

    #[test]
    fn prompt_is_masked_and_response_ends_with_eos() {
        let t = TextTokenizer::byte_level();
        let record = Record {
            line: 1,
            instruction: "2+3".into(),
            input: None,
            output: "5".into(),
        };
        let e = encode_example(&record, PromptTemplate::Raw, &t, 64)
            .unwrap()
            .unwrap();
        // <|bos|> '2' '+' '3' | '5' <|eos|>
        assert_eq!(e.input_ids, vec![256, 50, 43, 51, 53, 257]);
        assert_eq!(e.labels, vec![-100, -100, -100, -100, 53, 257]);
        assert_eq!(e.target_count(), 2);
        // Truncation keeps the prompt and cuts the response; no room at all drops the example.
        let e = encode_example(&record, PromptTemplate::Raw, &t, 5)
            .unwrap()
            .unwrap();
        assert_eq!(e.labels, vec![-100, -100, -100, -100, 53]);
        assert!(
            encode_example(&record, PromptTemplate::Raw, &t, 4)
                .unwrap()
                .is_none()
        );
        let alpaca = render_prompt(&record, PromptTemplate::Alpaca, &t).unwrap();
        assert!(
            alpaca.ends_with("### Instruction:\n2+3\n\n### Response:\n"),
            "{alpaca}"
        );
        assert!(render_prompt(&record, PromptTemplate::Chat, &t).is_err());
    }

    #[test]
    fn batches_pad_right_and_epochs_reshuffle_reproducibly() {
        let ex = |n: usize| Example {
            input_ids: vec![1; n],
            labels: std::iter::once(-100)
                .chain(std::iter::repeat_n(7, n - 1))
                .collect(),
        };
        let b = collate(&[&ex(2), &ex(4)], 0);
        assert_eq!(b.shape, [2, 4]);
        assert_eq!(b.input_ids, vec![1, 1, 0, 0, 1, 1, 1, 1]);
        assert_eq!(b.labels, vec![-100, 7, -100, -100, -100, 7, 7, 7]);
        assert_eq!((b.targets, b.tokens), (4, 6));

        let examples: Vec<Example> = (2..12).map(ex).collect();
        let mut a = DataLoader::new(examples.clone(), 3, 9, 0);
        let first: Vec<HostBatch> = (0..8).map(|_| a.next_batch()).collect();
        assert_eq!(a.position().epoch, 1);
        // Resuming from a saved position replays the same batches.
        let mut b = DataLoader::new(examples, 3, 9, 0);
        for _ in 0..5 {
            b.next_batch();
        }
        let saved = b.position();
        let mut c = DataLoader::new((2..12).map(ex).collect(), 3, 9, 0);
        c.seek(saved);
        assert_eq!(c.next_batch(), first[5]);
        assert_eq!(c.next_batch(), first[6]);
    }
}
