//! From a model spec (`PATH[:FORMAT]`) to a ready model, tokenizer and chat template.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::cache::KvPrecision;
use crate::chat::ChatTemplate;
use crate::gguf::GgufFile;
use crate::kernels::PANEL;
use crate::linear::WeightFormat;
use crate::llama::Llama;
use crate::qkernels::IntActivations;
use crate::ranking::TokenRanking;
use crate::tokenizer::Tokenizer;

pub use crate::paths::{amusd_home, default_model_path, DEFAULT_MODEL_FILE};
use crate::ModelError;

/// A model file or directory, how to run its weights and, for a draft model, how to compute its
/// output head, store its KV cache and give its integer kernels activations:
/// `PATH[:FORMAT][:head=HEAD][:kv=f32|f16][:acts=8|16][:bulk=8|16]`, e.g. `model.gguf:f32` or
/// `model.gguf:stored:head=screen:kv=f16:acts=16:bulk=8`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    pub path: PathBuf,
    pub format: WeightFormat,
    /// `None`: the whole head, unless the caller's role chooses otherwise (a draft screens it).
    pub head: Option<HeadChoice>,
    /// `None`: f32, unless the caller's role chooses otherwise (a draft stores f16).
    pub kv: Option<KvPrecision>,
    /// `None`: 8 bits, unless the caller's role chooses otherwise (a draft takes 16).
    pub acts: Option<IntActivations>,
    /// The activations of a prompt's bulk ([`Llama::bulk_acts`]); `None`: as `acts`, unless the
    /// caller's role chooses otherwise (an amusd draft takes 8).
    pub bulk: Option<IntActivations>,
}

/// How a model computes its output head (`head=...` in a [`ModelSpec`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadChoice {
    /// `head=full`: every row, as stored.
    Whole,
    /// `head=N`: only the `N` most frequent token ids ([`keep_frequent_head`]).
    Frequent(usize),
    /// `head=screen[:K]`: a q4_0 copy picks each position's `K` candidates, the head as stored
    /// scores them ([`crate::screen`]).
    Screened(usize),
}

impl FromStr for HeadChoice {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ModelError::Spec(format!(
                "bad head '{s}': expected full, screen, screen:K or a number of token ids N"
            ))
        };
        let positive = |n: &str| n.parse::<usize>().ok().filter(|&n| n > 0);
        Ok(match s {
            "full" => Self::Whole,
            "screen" => Self::Screened(crate::screen::DEFAULT_KEEP),
            _ => match s.strip_prefix("screen:") {
                Some(k) => Self::Screened(positive(k).ok_or_else(bad)?),
                None => Self::Frequent(positive(s).ok_or_else(bad)?),
            },
        })
    }
}

impl std::fmt::Display for HeadChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Whole => write!(f, "full"),
            Self::Frequent(n) => write!(f, "{n}"),
            Self::Screened(k) => write!(f, "screen:{k}"),
        }
    }
}

impl FromStr for ModelSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ModelError::Spec(
                "empty model spec; expected \
                 PATH[:FORMAT][:head=HEAD][:kv=f32|f16][:acts=8|16][:bulk=8|16]"
                    .into(),
            ));
        }
        let bulk = spec_suffix(
            s,
            ":bulk=",
            IntActivations::parse,
            "bulk activation bits",
            "8 or 16",
        )?;
        if let Some((rest, bulk)) = bulk {
            return Ok(Self {
                bulk: Some(bulk),
                ..rest.parse()?
            });
        }
        let acts = spec_suffix(
            s,
            ":acts=",
            IntActivations::parse,
            "activation bits",
            "8 or 16",
        )?;
        if let Some((rest, acts)) = acts {
            return Ok(Self {
                acts: Some(acts),
                ..rest.parse()?
            });
        }
        let kv = spec_suffix(s, ":kv=", KvPrecision::parse, "KV cache type", "f32 or f16")?;
        if let Some((rest, kv)) = kv {
            return Ok(Self {
                kv: Some(kv),
                ..rest.parse()?
            });
        }
        if let Some((rest, head)) = s.rsplit_once(":head=") {
            return Ok(Self {
                head: Some(head.parse()?),
                ..rest.parse()?
            });
        }
        if let Some((path, fmt)) = s.rsplit_once(':') {
            if let Some(format) = WeightFormat::parse(fmt) {
                return Ok(Self {
                    path: path.into(),
                    format,
                    head: None,
                    kv: None,
                    acts: None,
                    bulk: None,
                });
            }
            // A colon in a path is legal; only complain when the path without the suffix exists.
            if !Path::new(s).exists() && Path::new(path).exists() {
                return Err(ModelError::Spec(format!(
                    "unknown weight format '{fmt}' in '{s}'; expected one of: {}",
                    WeightFormat::NAMES
                )));
            }
        }
        Ok(Self {
            path: s.into(),
            format: WeightFormat::AsStored,
            head: None,
            kv: None,
            acts: None,
            bulk: None,
        })
    }
}

/// `s` split at its last `key` (`:kv=`, `:acts=`, `:bulk=`) and the value after it, parsed by `parse`;
/// `None` without the key, an error saying `what` is bad and what was `expected` if it does not
/// parse.
fn spec_suffix<'a, T>(
    s: &'a str,
    key: &str,
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
    expected: &str,
) -> Result<Option<(&'a str, T)>, ModelError> {
    let Some((rest, value)) = s.rsplit_once(key) else {
        return Ok(None);
    };
    let bad = || {
        ModelError::Spec(format!(
            "bad {what} '{value}' in '{s}': expected {expected}"
        ))
    };
    Ok(Some((rest, parse(value).ok_or_else(bad)?)))
}

impl std::fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.format)?;
        if let Some(head) = self.head {
            write!(f, ":head={head}")?;
        }
        if let Some(kv) = self.kv {
            write!(f, ":kv={kv}")?;
        }
        if let Some(acts) = self.acts {
            write!(f, ":acts={acts}")?;
        }
        match self.bulk {
            Some(bulk) => write!(f, ":bulk={bulk}"),
            None => Ok(()),
        }
    }
}

/// A model ready to run, with what is needed to talk to it.
pub struct LoadedModel {
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Tokens that end a generation.
    pub eos_ids: Vec<u32>,
    /// A short human-readable name: file name and weight format.
    pub name: String,
}

/// What is needed to talk to a model, without its weights: cheap (a GGUF header or a few JSON files),
/// so the coordinator can tokenize and check vocabularies while the workers load the weights.
pub struct ModelText {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub eos_ids: Vec<u32>,
    /// The model's context length in tokens (prompt plus generated).
    pub context_length: usize,
    /// Rows of the model's embedding: the token ids it can read, and may produce (at least the
    /// tokenizer's vocabulary; checkpoints often pad it).
    pub vocab_size: usize,
}

/// Loads the tokenizer, chat template and stop ids of a model.
pub fn load_text(spec: &ModelSpec) -> Result<ModelText, ModelError> {
    let path = &spec.path;
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
        path: path.clone(),
        error: source,
    })?;
    if let Some(dir) = hf_dir(path, meta.is_dir()) {
        let hf = crate::hf::HfConfig::read(dir)?;
        let (tokenizer, chat_template, eos_ids) = hf_text(dir, &hf)?;
        check_vocab(&tokenizer, hf.vocab_size)?;
        return Ok(ModelText {
            tokenizer,
            chat_template,
            eos_ids,
            context_length: hf.max_position_embeddings,
            vocab_size: hf.vocab_size,
        });
    }
    let mut gguf = GgufFile::open(path)?;
    let config = gguf.config()?;
    let tokenizer = Tokenizer::from_gguf_metadata(gguf.metadata())?;
    check_vocab(&tokenizer, config.vocab_size)?;
    let chat_template = ChatTemplate::from_gguf_metadata(gguf.metadata())?;
    let eos_ids = stop_ids(&tokenizer);
    Ok(ModelText {
        tokenizer,
        chat_template,
        eos_ids,
        context_length: config.max_position,
        vocab_size: config.vocab_size,
    })
}

/// The Hugging Face checkpoint directory `path` names: the directory itself, or the one holding
/// the named `config.json` or safetensors file. `None` for anything else (a GGUF file).
fn hf_dir(path: &Path, is_dir: bool) -> Option<&Path> {
    if is_dir {
        return Some(path);
    }
    let named = path.extension().is_some_and(|e| e == "safetensors")
        || path.file_name().is_some_and(|n| n == "config.json");
    named.then(|| path.parent().unwrap_or(Path::new(".")))
}

/// Loads only the weights, for a process that never tokenizes (the workers): the model and a
/// short name (file name and weight format).
pub fn load_weights(spec: &ModelSpec) -> Result<(Llama, String), ModelError> {
    let path = &spec.path;
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
        path: path.clone(),
        error: source,
    })?;
    let llama = match hf_dir(path, meta.is_dir()) {
        Some(dir) => crate::hf::load_llama(dir, spec.format)?.0,
        None => GgufFile::open(path)?.load_llama(spec.format)?,
    };
    let mut name = format!("{}:{}", file_name(path), llama.lm_head.storage_name());
    let mut llama = llama;
    apply_head(spec, &mut llama, &mut name)?;
    // Once every matrix (the screen's too) is where it stays.
    llama.collapse_to_huge_pages();
    Ok((llama, name))
}

/// A draft's `head=...`, `kv=...`, `acts=...` and `bulk=...` from its spec, said in the model's
/// name.
fn apply_head(spec: &ModelSpec, llama: &mut Llama, name: &mut String) -> Result<(), ModelError> {
    if let Some(head) = spec.head {
        name.push_str(&choose_head(&spec.path, llama, head)?);
    }
    if let Some(kv) = spec.kv {
        llama.kv_precision = kv;
        if kv != KvPrecision::F32 {
            name.push_str(&format!(", {kv} KV cache"));
        }
    }
    if let Some(acts) = spec.acts {
        llama.set_int_activations(acts);
        if acts != IntActivations::Bits8 {
            name.push_str(&format!(", {acts}-bit activations"));
        }
    }
    if let Some(bulk) = spec.bulk.filter(|&b| b != llama.int_activations()) {
        llama.bulk_acts = Some(bulk);
        name.push_str(&format!(" ({bulk} in a prompt's bulk)"));
    }
    Ok(())
}

/// Restricts or screens the output head of the model loaded from `path` as `head` says; returns
/// what it did, for the model's name (", head ...", or "" for the whole head).
pub fn choose_head(path: &Path, llama: &mut Llama, head: HeadChoice) -> Result<String, ModelError> {
    Ok(match head {
        HeadChoice::Whole => String::new(),
        HeadChoice::Frequent(n) => {
            let order = keep_frequent_head(path, llama, n)?;
            format!(", head {} ({order})", llama.lm_head.out_features())
        }
        HeadChoice::Screened(k) => {
            llama.screen_head(k)?;
            format!(", head screened by q4_0 (top {k})")
        }
    })
}

/// Keeps the output head's `n` most frequent tokens (rounded up to a whole panel of rows) by the
/// built-in ranking of the vocabulary of the model at `path`, or its first `n` ids when there is
/// none. Returns which: "most frequent" or "first ids".
pub fn keep_frequent_head(
    path: &Path,
    llama: &mut Llama,
    n: usize,
) -> Result<&'static str, ModelError> {
    let ranking = head_ranking(path)?;
    let vocab = llama.config.vocab_size;
    llama.restrict_head(&ranking.top(n.next_multiple_of(PANEL), vocab))?;
    Ok(if ranking.by_frequency() {
        "most frequent"
    } else {
        "first ids"
    })
}

/// The built-in frequency ranking of the model's vocabulary, or id order.
fn head_ranking(path: &Path) -> Result<TokenRanking, ModelError> {
    if let Some(dir) = hf_dir(path, path.is_dir()) {
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
        let tokens: Vec<String> = (0..tokenizer.vocab_size() as u32)
            .map(|id| tokenizer.id_to_token(id).unwrap_or_default())
            .collect();
        return Ok(TokenRanking::for_vocab(&tokens));
    }
    Ok(TokenRanking::for_vocab(
        &GgufFile::open(path)?.token_strings(),
    ))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Loads a GGUF file or a Hugging Face checkpoint directory.
pub fn load(spec: &ModelSpec) -> Result<LoadedModel, ModelError> {
    let mut m = load_all(spec)?;
    apply_head(spec, &mut m.llama, &mut m.name)?;
    m.llama.collapse_to_huge_pages();
    Ok(m)
}

fn load_all(spec: &ModelSpec) -> Result<LoadedModel, ModelError> {
    let path = &spec.path;
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
        path: path.clone(),
        error: source,
    })?;
    let file_name = file_name(path);
    if let Some(dir) = hf_dir(path, meta.is_dir()) {
        return load_hf_dir(dir, spec.format, &file_name);
    }
    let mut gguf = GgufFile::open(path)?;
    let llama = gguf.load_llama(spec.format)?;
    let tokenizer = Tokenizer::from_gguf_metadata(gguf.metadata())?;
    let chat_template = ChatTemplate::from_gguf_metadata(gguf.metadata())?;
    let eos_ids = stop_ids(&tokenizer);
    let name = format!("{file_name}:{}", llama.lm_head.storage_name());
    finish(LoadedModel {
        llama,
        tokenizer,
        chat_template,
        eos_ids,
        name,
    })
}

fn load_hf_dir(
    dir: &Path,
    format: WeightFormat,
    file_name: &str,
) -> Result<LoadedModel, ModelError> {
    let (llama, hf) = crate::hf::load_llama(dir, format)?;
    let (tokenizer, chat_template, eos_ids) = hf_text(dir, &hf)?;
    let name = format!("{file_name}:{}", llama.lm_head.storage_name());
    finish(LoadedModel {
        llama,
        tokenizer,
        chat_template,
        eos_ids,
        name,
    })
}

fn hf_text(
    dir: &Path,
    hf: &crate::hf::HfConfig,
) -> Result<(Tokenizer, Option<ChatTemplate>, Vec<u32>), ModelError> {
    let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
    let tc = dir.join("tokenizer_config.json");
    let chat_template = if tc.is_file() {
        ChatTemplate::from_tokenizer_config(tc)?
    } else {
        None
    };
    let mut eos_ids = hf.eos_ids()?;
    if eos_ids.is_empty() {
        eos_ids = stop_ids(&tokenizer);
    } else {
        let mut special = *tokenizer.special_tokens();
        special.eos = eos_ids.first().copied();
        tokenizer = tokenizer.with_special_tokens(special);
    }
    Ok((tokenizer, chat_template, eos_ids))
}

/// The end-of-sequence and end-of-turn ids a tokenizer names.
fn stop_ids(t: &Tokenizer) -> Vec<u32> {
    let s = t.special_tokens();
    let mut ids: Vec<u32> = [s.eos, s.eot].into_iter().flatten().collect();
    ids.dedup();
    ids
}

fn finish(m: LoadedModel) -> Result<LoadedModel, ModelError> {
    check_vocab(&m.tokenizer, m.llama.config.vocab_size)?;
    Ok(m)
}

/// Every token id the tokenizer can produce must have a row in the embedding.
fn check_vocab(tokenizer: &Tokenizer, model_vocab: usize) -> Result<(), ModelError> {
    let (tv, mv) = (tokenizer.vocab_size(), model_vocab);
    if tv == 0 {
        // It would encode every prompt as nothing (the text silently dropped).
        return Err(ModelError::Config("the tokenizer has no tokens".into()));
    }
    if tv > mv {
        return Err(ModelError::Config(format!(
            "the tokenizer has {tv} tokens but the model's embedding only {mv}: tokenizer and weights do not belong together"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn parses_specs() {
        let s: ModelSpec = "m.gguf:f32".parse().unwrap();
        assert_eq!(
            (s.path, s.format),
            (PathBuf::from("m.gguf"), WeightFormat::F32)
        );
        let s: ModelSpec = "dir/model".parse().unwrap();
        assert_eq!((s.format, s.head), (WeightFormat::AsStored, None));
        assert!("".parse::<ModelSpec>().is_err());
        let s: ModelSpec = "m.gguf:q4_1:head=16384".parse().unwrap();
        assert_eq!(
            (s.format, s.head),
            (
                WeightFormat::Quantized(GgmlDType::Q4_1),
                Some(HeadChoice::Frequent(16384))
            )
        );
        assert_eq!(s.to_string(), "m.gguf:q4_1:head=16384");
        let s: ModelSpec = "m.gguf:head=64".parse().unwrap();
        assert_eq!(s.to_string(), "m.gguf:stored:head=64");
        for (spec, head) in [
            (
                "m.gguf:head=screen",
                HeadChoice::Screened(crate::screen::DEFAULT_KEEP),
            ),
            ("m.gguf:stored:head=screen:8", HeadChoice::Screened(8)),
            ("m.gguf:head=full", HeadChoice::Whole),
            ("m.gguf:head=screen:4:kv=f16", HeadChoice::Screened(4)),
            ("m.gguf:head=full:acts=8", HeadChoice::Whole),
            (
                "m.gguf:stored:head=screen:kv=f32:acts=16",
                HeadChoice::Screened(32),
            ),
            ("m.gguf:head=full:acts=16:bulk=8", HeadChoice::Whole),
            ("m.gguf:head=full:bulk=16", HeadChoice::Whole),
        ] {
            let s: ModelSpec = spec.parse().unwrap();
            assert_eq!(s.head, Some(head), "{spec}");
            assert_eq!(s.kv.is_some(), spec.contains(":kv="), "{spec}");
            let value = |key: &str| {
                let (_, v) = spec.rsplit_once(key)?;
                v.split(':').next().map(str::to_string)
            };
            assert_eq!(s.acts.map(|a| a.to_string()), value(":acts="), "{spec}");
            assert_eq!(s.bulk.map(|a| a.to_string()), value(":bulk="), "{spec}");
            assert_eq!(s.to_string().parse::<ModelSpec>().unwrap(), s, "{spec}");
        }
        for bad in [
            "m.gguf:head=0",
            "m.gguf:f32:head=",
            "m.gguf:head=lots",
            "m.gguf:head=screen:0",
            "m.gguf:head=screen:",
            "m.gguf:kv=f8",
            "m.gguf:kv=",
            "m.gguf:acts=4",
            "m.gguf:acts=",
            "m.gguf:acts=16:kv=f16",
            "m.gguf:bulk=4",
            "m.gguf:bulk=8:acts=16",
        ] {
            assert!(bad.parse::<ModelSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_checkpoint_is_named_by_its_directory_its_config_or_its_weights() {
        let dir = tempfile::tempdir().unwrap();
        crate::testing::TinyModel::default()
            .write_hf(dir.path())
            .unwrap();
        for p in [
            dir.path().to_path_buf(),
            dir.path().join("config.json"),
            dir.path().join("model.safetensors"),
        ] {
            let spec: ModelSpec = p.to_str().unwrap().parse().unwrap();
            let text = load_text(&spec).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let (llama, _) = load_weights(&spec).unwrap();
            assert_eq!(text.context_length, llama.config.max_position);
        }
    }
}
