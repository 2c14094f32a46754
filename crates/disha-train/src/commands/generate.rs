//! `disha generate`: prompt → streamed text.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use disha_models::{
    ChatMessage, ChatTemplate, GenerationConfig, LoadedModel, TextTokenizer, generate,
};

use super::{load_model_args, tokenizer_arg};
use crate::cli::GenerateArgs;
use crate::error::CliResult;

fn tokenizer_for(args: &GenerateArgs, loaded: &LoadedModel) -> CliResult<TextTokenizer> {
    let mut tokenizer = tokenizer_arg(args.tokenizer.as_deref(), loaded)?;
    if let Some(name) = &args.chat_template {
        let path = Path::new(name);
        if path.is_file() {
            let text = disha_core::limits::read_config_file(path)?;
            tokenizer.set_chat_template(&text, path.display().to_string())?;
        } else {
            // Validate the name early; the tokenizer's special tokens fill the template.
            ChatTemplate::builtin(name, "", "")?;
            let text = match name.as_str() {
                "chatml" => disha_models::chat_templates::CHATML,
                "llama2" => disha_models::chat_templates::LLAMA2,
                _ => disha_models::chat_templates::LLAMA3,
            };
            tokenizer.set_chat_template(text, format!("built-in {name}"))?;
        }
    }
    Ok(tokenizer)
}

pub fn run(args: GenerateArgs) -> CliResult {
    let (loaded, _, _) = load_model_args(&args.model)?;
    let tokenizer = tokenizer_for(&args, &loaded)?;
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        tokenizer.encode_chat(&messages)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    let stop_tokens = disha_models::stop_tokens(&loaded.model, &tokenizer);
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_tokens: stop_tokens.clone(),
    };
    if !args.chat {
        print!("{}", args.prompt);
    }
    let mut stdout = std::io::stdout();
    let mut new_ids = Vec::new();
    let mut printed = 0;
    let start = Instant::now();
    let mut first_token = None;
    let generated = generate(&loaded.model, &prompt, &config, &mut |id| {
        first_token.get_or_insert_with(|| start.elapsed());
        if stop_tokens.contains(&id) {
            return ControlFlow::Continue(());
        }
        new_ids.push(id);
        // Decode everything so far and print the new suffix: multi-token characters appear
        // once complete.
        if let Ok(text) = tokenizer.decode(&new_ids, true)
            && text.len() > printed
            && text.is_char_boundary(printed)
            && !text.ends_with('\u{FFFD}')
        {
            let _ = write!(stdout, "{}", &text[printed..]);
            let _ = stdout.flush();
            printed = text.len();
        }
        ControlFlow::Continue(())
    })?;
    println!();
    let elapsed = start.elapsed().as_secs_f64();
    let prefill = first_token.map_or(0.0, |d| d.as_secs_f64());
    let decode_tokens = generated.len().saturating_sub(1);
    eprintln!(
        "[{} prompt tokens, {} new; prefill {:.2}s, decode {:.1} tok/s]",
        prompt.len(),
        generated.len(),
        prefill,
        if elapsed > prefill {
            decode_tokens as f64 / (elapsed - prefill)
        } else {
            0.0
        }
    );
    Ok(())
}
