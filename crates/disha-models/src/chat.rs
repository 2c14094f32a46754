//! Chat templates: the Jinja templates of `tokenizer_config.json` / `chat_template.jinja` /
//! GGUF `tokenizer.chat_template`, rendered with `minijinja` (Python string methods such as
//! `.strip()` enabled), plus built-in ChatML, Llama-2 and Llama-3 templates.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A turn with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// ChatML (`<|im_start|>role\n…<|im_end|>\n`), as used by SmolLM2 and Qwen.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Meta's Llama-2 chat format (`<s>[INST] <<SYS>>…<</SYS>> … [/INST]`).
pub const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// Meta's Llama-3 instruct format (`<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>`).
pub const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Longest chat template accepted (bytes). Real templates are 1–15 KB; the limit keeps a
/// template (and what it renders, which is then tokenized) from sizing memory.
pub const MAX_CHAT_TEMPLATE_BYTES: usize = 256 << 10;

/// Instructions one rendering may execute: a conversation of thousands of turns needs well
/// under a million; a template that loops without end stops with an error instead of hanging.
const CHAT_TEMPLATE_FUEL: u64 = 20_000_000;

/// A compiled chat template with the special tokens it may reference.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source_name: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `template` (Jinja source); `source_name` names it in errors.
    ///
    /// # Errors
    /// A template longer than [`MAX_CHAT_TEMPLATE_BYTES`], or a syntax error with the engine's
    /// line information.
    pub fn new(
        template: &str,
        source_name: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let source_name = source_name.into();
        if template.len() > MAX_CHAT_TEMPLATE_BYTES {
            return Err(ModelError::ChatTemplate {
                source_name,
                message: format!(
                    "{} bytes long; chat templates are at most {MAX_CHAT_TEMPLATE_BYTES} bytes",
                    template.len()
                ),
            });
        }
        let mut env = Environment::new();
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| ModelError::ChatTemplate {
                source_name: source_name.clone(),
                message: e.to_string(),
            })?;
        Ok(Self {
            env,
            source_name,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// A built-in template by name: `chatml`, `llama2` or `llama3`.
    ///
    /// # Errors
    /// An unknown name.
    pub fn builtin(name: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let template = match name {
            "chatml" => CHATML,
            "llama2" => LLAMA2,
            "llama3" => LLAMA3,
            other => {
                return Err(ModelError::invalid(
                    "chat template",
                    other,
                    "built-in templates: chatml, llama2, llama3",
                ));
            }
        };
        Self::new(template, format!("built-in {name}"), bos_token, eos_token)
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    ///
    /// # Errors
    /// The template raised (e.g. roles that do not alternate) or failed to evaluate.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new()");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ModelError::ChatTemplate {
                source_name: self.source_name.clone(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", " What is 2+3? "),
            ChatMessage::new("assistant", "5"),
            ChatMessage::new("user", "And 2+4?"),
        ]
    }

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::builtin("chatml", "", "<|im_end|>").unwrap();
        let out = t.render(&conversation()[1..2], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\n What is 2+3? <|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama2_renders_system_and_strips() {
        let t = ChatTemplate::builtin("llama2", "<s>", "</s>").unwrap();
        let out = t.render(&conversation(), true).unwrap();
        assert_eq!(
            out,
            // `.strip()` applies to the whole content (system block included), so the user
            // turn keeps its leading space, as in transformers.
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n What is 2+3? [/INST] 5 </s><s>[INST] And 2+4? [/INST]"
        );
        let bad = [ChatMessage::new("assistant", "hi")];
        let err = t.render(&bad, true).unwrap_err().to_string();
        assert!(err.contains("alternate"), "{err}");
    }

    #[test]
    fn llama3_renders_headers() {
        let t = ChatTemplate::builtin("llama3", "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&conversation()[..2], true).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    /// A template is code from the model's files: its size and the work one rendering may do
    /// are bounded, so neither a huge template nor an endless loop hangs or exhausts memory.
    #[test]
    fn oversized_and_endless_templates_are_errors() {
        let huge = "x".repeat(MAX_CHAT_TEMPLATE_BYTES + 1);
        let err = ChatTemplate::new(&huge, "chat_template.jinja", "", "")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chat_template.jinja") && err.contains("at most"),
            "{err}"
        );
        let endless =
            "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(endless, "loop.jinja", "", "").unwrap();
        let err = t.render(&conversation(), true).unwrap_err().to_string();
        assert!(err.contains("loop.jinja") && err.contains("fuel"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_source() {
        let err = ChatTemplate::new("{% for %}", "tokenizer_config.json", "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");
    }
}
