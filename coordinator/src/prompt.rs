//! From the user's text to prompt tokens: the prompt itself, the models' tokenizers and chat
//! templates (without their weights), and the checks that draft and verify speak the same tokens.

use amusd_model::chat::{ChatTemplate, Message, RenderOptions};
use amusd_model::loader::{load_text, ModelText};
use amusd_model::tokenizer::Tokenizer;
use amusd_spec::constraint::{Constraints, Grammar};
use amusd_spec::fake::FakeModel;
use amusd_spec::{Dry, RequestSampling};
use anyhow::{bail, Context, Result};

use std::path::Path;
use std::sync::Arc;

/// The prompt text from `--prompt` or `--prompt-file` (`-`: standard input), or from standard
/// input when neither is given and it is not a terminal.
pub fn prompt_text(prompt: Option<&str>, prompt_file: Option<&Path>) -> Result<String> {
    use std::io::{IsTerminal, Read};
    let stdin = Path::new("-");
    let file = match (prompt, prompt_file) {
        (Some(p), _) => return check_prompt(p.to_string()),
        (None, Some(f)) => f,
        (None, None) if !std::io::stdin().is_terminal() => stdin,
        (None, None) => bail!(
            "no prompt: pass --prompt TEXT or --prompt-file FILE, or pipe it to standard input"
        ),
    };
    let mut bytes = Vec::new();
    if file == stdin {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read the prompt from standard input")?;
    } else {
        bytes = std::fs::read(file)
            .with_context(|| format!("cannot read the prompt file {}", file.display()))?;
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "the prompt in {} is not valid UTF-8 (first bad byte at offset {}); convert it to UTF-8",
            if file == stdin { "standard input".to_string() } else { file.display().to_string() },
            e.utf8_error().valid_up_to()
        )
    })?;
    // `echo ... | amusd generate` should mean what `--prompt ...` means: the shell's newline is
    // not part of the message.
    let text = if file == stdin {
        text.trim_end_matches(['\n', '\r']).to_string()
    } else {
        text
    };
    check_prompt(text)
}

fn check_prompt(text: String) -> Result<String> {
    if text.trim().is_empty() {
        bail!("the prompt is empty: pass some text with --prompt, --prompt-file or standard input");
    }
    Ok(text)
}

/// Token ids of a conversation: rendered with the model's chat template (ChatML if it has none) and
/// tokenized without adding specials (the template writes them), or the raw text as is.
pub fn encode_conversation(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    messages: &[Message],
    raw: bool,
) -> Result<Vec<u32>> {
    if raw {
        let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        return Ok(tokenizer.encode(&text.join("\n"), true)?);
    }
    let new_turn = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    encode_chat(tokenizer, template, messages, &new_turn)
}

/// Token ids of a conversation rendered as `options` say, with the model's chat template (ChatML
/// if it has none), tokenized without adding specials (the template writes them).
pub fn encode_chat(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    messages: &[Message],
    options: &RenderOptions,
) -> Result<Vec<u32>> {
    let text = render_chat(template, messages, options)?;
    Ok(tokenizer.encode(&text, false)?)
}

/// A conversation's text, rendered as `options` say with the model's chat template (ChatML if it
/// has none).
pub fn render_chat(
    template: Option<&ChatTemplate>,
    messages: &[Message],
    options: &RenderOptions,
) -> Result<String> {
    let fallback;
    let template = match template {
        Some(t) => t,
        None => {
            fallback = ChatTemplate::chatml();
            &fallback
        }
    };
    Ok(template.render_with(messages, options)?)
}

/// Refuses a logit bias that names a token past `tokenizer`'s vocabulary.
pub fn check_logit_bias(tokenizer: &Tokenizer, s: &RequestSampling) -> Result<()> {
    (s.params.logit_bias)
        .check_vocab(tokenizer.vocab_size())
        .map_err(|e| anyhow::anyhow!("bad sampling option: {e}"))?;
    Ok(())
}

/// Refuses a grammar that does not compile for the verify model's vocabulary (or any grammar for a
/// model that cannot follow one).
pub fn check_grammar(grammars: Option<&dyn Constraints>, g: &Grammar) -> Result<()> {
    let Some(c) = grammars else {
        bail!("this model cannot follow a grammar");
    };
    // What the region carries; refused under every strategy, so the same requests succeed under
    // each.
    let max = amusd_shm::GRAMMAR_TEXT_LEN;
    if g.text.len() > max {
        bail!(
            "the grammar is {} bytes; at most {max} are taken",
            g.text.len()
        );
    }
    c.compile(g).map(drop).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Draft and verify must share one vocabulary, token for token, or draft ids mean nothing to the
/// verify model.
pub fn check_same_vocabulary(verify: &Tokenizer, draft: &Tokenizer) -> Result<()> {
    let (v, d) = (verify.vocab_size(), draft.vocab_size());
    if v != d {
        bail!("vocabulary mismatch: the verify model has {v} tokens, the draft {d}; pick a draft from the same model family");
    }
    for id in 0..v as u32 {
        if verify.id_to_token(id) != draft.id_to_token(id) {
            bail!(
                "vocabulary mismatch at token {id} ({:?} vs {:?}); pick a draft from the same model family",
                verify.id_to_token(id),
                draft.id_to_token(id)
            );
        }
    }
    Ok(())
}

/// Draft and verify must also have as many embedding rows: a padded vocabulary's extra ids are
/// tokens one model may produce and the other cannot read (the verify worker failed on the
/// draft's, and was restarted until its budget ran out).
fn check_same_rows(verify: usize, draft: usize) -> Result<()> {
    if verify != draft {
        bail!(
            "vocabulary mismatch: the verify model's embedding has {verify} rows, the draft's \
             {draft} (the same tokenizer, padded differently); pick a draft with the same \
             vocabulary size"
        );
    }
    Ok(())
}

/// The tokenizer side of the verify model and of the draft (when the strategy has one); `None`
/// for a fake model (`fake:...`, tests), which has no tokenizer.
pub struct Texts {
    pub verify: Option<ModelText>,
    pub draft: Option<ModelText>,
    /// Compiles grammars for the verify model's vocabulary (the draft's is the same), built on the
    /// first grammar; a fake model's follows the fake grammar.
    pub grammars: Option<Arc<dyn Constraints>>,
    fake_stop: Vec<u32>,
}

impl Texts {
    /// The verify model's chat template replaced by the one in `file`, if given (it keeps the
    /// model's BOS and EOS strings).
    pub fn with_chat_template(mut self, file: Option<&Path>) -> Result<Self> {
        let Some(file) = file else {
            return Ok(self);
        };
        let Some(verify) = self.verify.as_mut() else {
            bail!("--chat-template-file: a fake model has no chat template to replace");
        };
        let source = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read --chat-template-file {}", file.display()))?;
        let (bos, eos) = match &verify.chat_template {
            Some(t) => (t.bos_token().to_string(), t.eos_token().to_string()),
            None => Default::default(),
        };
        let template = ChatTemplate::new(source, bos, eos)
            .with_context(|| format!("--chat-template-file {}", file.display()))?;
        verify.chat_template = Some(template);
        Ok(self)
    }

    /// Reads both models' text side (cheap: no weights) and checks that they share a vocabulary.
    pub fn load(verify_spec: &str, draft_spec: Option<&str>) -> Result<Self> {
        let verify = text_of(verify_spec, "verify")?;
        let draft = match draft_spec {
            // The default pair is one file: its text side is the verify model's, read once
            // (reading and comparing 49 152 token strings twice was a fifth of a short run).
            Some(spec) if same_file(verify_spec, spec) => None,
            Some(spec) => text_of(spec, "draft")?,
            None => None,
        };
        if let (Some(v), Some(d)) = (&verify, &draft) {
            check_same_vocabulary(&v.tokenizer, &d.tokenizer)?;
            check_same_rows(v.vocab_size, d.vocab_size)?;
        }
        if verify
            .as_ref()
            .is_some_and(|v| v.tokenizer.is_approximate())
        {
            // As llama.cpp warns: the text still decodes exactly, but prompts may be split into
            // other ids than the model was trained on.
            eprintln!(
                "amusd: warning: the model's GGUF names no pre-tokenizer amusd knows \
                 (tokenizer.ggml.pre); prompts are split as GPT-2 splits them, which may differ \
                 from the model's own tokenizer on digits, punctuation and non-Latin text"
            );
        }
        Ok(Self {
            grammars: amusd_proc::constraints_for(verify_spec),
            verify,
            draft,
            fake_stop: fake_stop(verify_spec),
        })
    }

    /// An error unless every id of `prompt` is a row of the verify model's embedding (a
    /// program's ids come unchecked; one past it failed the worker until its restarts ran out).
    pub fn check_prompt_ids(&self, prompt: &[u32]) -> Result<()> {
        let Some(v) = &self.verify else {
            return Ok(());
        };
        match prompt.iter().find(|&&id| id as usize >= v.vocab_size) {
            Some(id) => bail!(
                "token id {id} is outside the model's {}-token vocabulary",
                v.vocab_size
            ),
            None => Ok(()),
        }
    }

    /// `s` with DRY's sequence breakers found in the verify model's vocabulary: the tokens whose
    /// text holds one of `breakers` (a fake model has no text: none). Only when DRY is on: it
    /// reads every token's text.
    pub fn with_dry_breakers(
        &self,
        mut s: RequestSampling,
        breakers: &[String],
    ) -> RequestSampling {
        if let (false, Some(v)) = (s.params.dry.is_off(), &self.verify) {
            s.params.dry.breakers = Dry::breaker_bits(v.tokenizer.tokens_containing(breakers));
        }
        s
    }

    /// Refuses a logit bias that names a token past the verify model's vocabulary (a fake model
    /// has no tokenizer to check against; its decoders ignore such ids).
    pub fn check_sampling(&self, s: &RequestSampling) -> Result<()> {
        // The command line's parser and the server's check these too; a program's values come
        // straight here (a NaN temperature failed each worker until its restarts ran out).
        s.params
            .clone()
            .validate()
            .map_err(|e| anyhow::anyhow!("bad sampling option: {e}"))?;
        if let Some(v) = &self.verify {
            check_logit_bias(&v.tokenizer, s)?;
        }
        match &s.grammar {
            Some(g) => check_grammar(self.grammars.as_deref(), g),
            None => Ok(()),
        }
    }

    /// The prompt's token ids and the stop ids: `ids` as given (fake models), or the conversation
    /// encoded with the verify model's tokenizer and chat template.
    pub fn prompt(
        &self,
        messages: &[Message],
        raw: bool,
        ids: Option<&[u32]>,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        match (&self.verify, ids) {
            (Some(t), Some(ids)) => Ok((ids.to_vec(), t.eos_ids.clone())),
            (None, Some(ids)) => Ok((ids.to_vec(), self.fake_stop.clone())),
            (Some(t), None) => Ok((
                encode_conversation(&t.tokenizer, t.chat_template.as_ref(), messages, raw)?,
                t.eos_ids.clone(),
            )),
            (None, None) => bail!("a fake verify model needs --prompt-ids"),
        }
    }

    /// The ids that end a generation: the verify model's, or a fake model's.
    pub fn stop_ids(&self) -> Vec<u32> {
        match &self.verify {
            Some(t) => t.eos_ids.clone(),
            None => self.fake_stop.clone(),
        }
    }

    /// The longest request (prompt plus new tokens) both models can hold, at most `limit`.
    pub fn context(&self, limit: usize) -> usize {
        [&self.verify, &self.draft]
            .into_iter()
            .flatten()
            .map(|t| t.context_length)
            .fold(limit, usize::min)
    }
}

/// A model's tokenizer and metadata; `None` for a fake model or prompt lookup (no model).
fn text_of(spec: &str, role: &str) -> Result<Option<ModelText>> {
    if FakeModel::is_fake(spec) || amusd_spec::lookup::parse_spec(spec).is_some() {
        return Ok(None);
    }
    let s = spec.parse()?;
    Ok(Some(load_text(&s).with_context(|| {
        format!("cannot load the {role} model")
    })?))
}

/// Whether two model specs name the same file or directory (whatever their formats).
fn same_file(a: &str, b: &str) -> bool {
    let path = |s: &str| {
        let spec: amusd_model::ModelSpec = s.parse().ok()?;
        std::fs::canonicalize(spec.path).ok()
    };
    !FakeModel::is_fake(a) && !FakeModel::is_fake(b) && path(a).is_some_and(|p| path(b) == Some(p))
}

fn fake_stop(spec: &str) -> Vec<u32> {
    match FakeModel::parse(spec) {
        Ok(m) if m.eos_every > 0 => vec![m.eos],
        _ => Vec::new(),
    }
}
