use super::*;
use proptest::prelude::*;

/// Every byte as a token (ids 0..256), then a few multi-byte ones, then the stop token.
fn vocabulary() -> (Vec<Vec<u8>>, u32) {
    let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for t in [
        "{\"", "\":", "\"a", "true", "false", "12", "\"}", ", \"", "ab", "abc",
    ] {
        v.push(t.as_bytes().to_vec());
    }
    let mut stop = vec![TokTrie::SPECIAL_TOKEN_MARKER];
    stop.extend_from_slice(b"<eos>");
    v.push(stop);
    let stop = v.len() as u32 - 1;
    (v, stop)
}

fn compiler() -> (GrammarCompiler, u32) {
    let (v, stop) = vocabulary();
    (GrammarCompiler::new(v, &[stop]).unwrap(), stop)
}

fn allowed(c: &mut GrammarConstraint, generated: &[u32], vocab: usize) -> Vec<u32> {
    let mut logits = vec![0.0f32; vocab];
    c.mask(generated, &mut logits);
    (0..vocab as u32)
        .filter(|&t| logits[t as usize] == 0.0)
        .collect()
}

const SCHEMA: &str = r#"{"type": "object", "properties": {"a": {"type": "integer"},
    "b": {"enum": ["x", "yz"]}, "c": {"type": "boolean"}}, "required": ["a", "b"],
    "additionalProperties": false}"#;

/// A walk through the grammar: a random allowed token at each step, the stop token as soon as it
/// is allowed: the tokens before the stop, and whether it ended within `max` tokens.
fn walk(
    c: &mut GrammarConstraint,
    vocab: usize,
    stop: u32,
    seed: u64,
    max: usize,
) -> (Vec<u32>, bool) {
    let mut tokens = Vec::new();
    let mut x = seed | 1;
    for _ in 0..max {
        let a = allowed(c, &tokens, vocab);
        if a.contains(&stop) {
            return (tokens, true);
        }
        assert!(
            !a.is_empty(),
            "a grammar that has not ended allows something"
        );
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        tokens.push(a[(x % a.len() as u64) as usize]);
    }
    (tokens, false)
}

fn text(v: &[Vec<u8>], tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens.iter().flat_map(|&t| v[t as usize].clone()).collect();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn a_regex_allows_exactly_its_continuations_then_only_the_stop() {
    let (c, stop) = compiler();
    let vocab = c.vocab_size();
    let mut m = c
        .constraint(&Grammar::new(GrammarKind::Regex, "[ab]{2}c"))
        .unwrap();
    let (a, b, cc) = (u32::from(b'a'), u32::from(b'b'), u32::from(b'c'));
    let ab = 256 + 8;
    let abc = 256 + 9;
    assert_eq!(allowed(&mut m, &[], vocab), vec![a, b, ab, abc]);
    assert_eq!(allowed(&mut m, &[a], vocab), vec![a, b]);
    assert_eq!(allowed(&mut m, &[ab], vocab), vec![cc]);
    assert_eq!(allowed(&mut m, &[ab, cc], vocab), vec![stop]);
    assert_eq!(allowed(&mut m, &[abc], vocab), vec![stop]);
    // Back to an earlier prefix: the same answers as the first time.
    assert_eq!(allowed(&mut m, &[a], vocab), vec![a, b]);
    // A prefix the grammar forbids masks everything, and the next call recovers.
    assert_eq!(allowed(&mut m, &[cc], vocab), Vec::<u32>::new());
    assert_eq!(allowed(&mut m, &[b, a], vocab), vec![cc]);
}

#[test]
fn walks_through_a_schema_give_json_that_fits_it() {
    let (c, stop) = compiler();
    let (v, _) = vocabulary();
    let g = Grammar::new(GrammarKind::JsonSchema, SCHEMA);
    let mut ended = 0;
    for seed in 1..40u64 {
        let mut m = c.constraint(&g).unwrap();
        let (tokens, true) = walk(&mut m, c.vocab_size(), stop, seed, 400) else {
            continue;
        };
        ended += 1;
        let s = text(&v, &tokens);
        let value: serde_json::Value =
            serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
        let o = value.as_object().unwrap();
        assert!(o["a"].is_i64() || o["a"].is_u64(), "{s}");
        assert!(["x", "yz"].contains(&o["b"].as_str().unwrap()), "{s}");
        assert!(
            o.keys().all(|k| ["a", "b", "c"].contains(&k.as_str())),
            "{s}"
        );
    }
    assert!(ended >= 30, "only {ended} of 39 walks ended");
}

#[test]
fn any_json_object_starts_with_a_brace() {
    let (c, stop) = compiler();
    let mut m = c
        .constraint(&Grammar::new(GrammarKind::JsonObject, ""))
        .unwrap();
    let first = allowed(&mut m, &[], c.vocab_size());
    assert!(!first.contains(&stop));
    assert!(first.contains(&u32::from(b'{')));
    assert!(!first.contains(&u32::from(b'[')) && !first.contains(&u32::from(b'1')));
}

#[test]
fn a_lark_grammar_compiles_and_constrains() {
    let (c, stop) = compiler();
    let g = Grammar::new(GrammarKind::Lark, "start: \"yes\" | \"no\"");
    let mut m = c.constraint(&g).unwrap();
    let (y, n) = (u32::from(b'y'), u32::from(b'n'));
    assert_eq!(allowed(&mut m, &[], c.vocab_size()), vec![n, y]);
    let yes: Vec<u32> = b"yes".iter().map(|&b| u32::from(b)).collect();
    assert_eq!(allowed(&mut m, &yes, c.vocab_size()), vec![stop]);
}

#[test]
fn bad_grammars_are_errors_that_say_which_kind() {
    let (c, _) = compiler();
    for (kind, text, says) in [
        (GrammarKind::JsonSchema, "{not json", "JSON schema"),
        (
            GrammarKind::JsonSchema,
            r#"{"type": "nonsense"}"#,
            "JSON schema",
        ),
        (GrammarKind::Regex, "(ab", "regular expression"),
        (GrammarKind::Lark, "start: undefined_rule", "Lark grammar"),
        (
            GrammarKind::Gbnf,
            "root ::= item\n",
            "GBNF grammar does not compile: GBNF line 1, column 10",
        ),
    ] {
        let e = match c.check(&Grammar::new(kind, text)) {
            Ok(()) => panic!("{text} compiled"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(says), "{text}: {e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}

#[test]
fn a_vocabulary_needs_a_stop_token_inside_it() {
    let (v, stop) = vocabulary();
    assert!(GrammarCompiler::new(v.clone(), &[]).is_err());
    assert!(GrammarCompiler::new(v.clone(), &[stop + 1]).is_err());
    assert!(GrammarCompiler::new(v, &[stop]).is_ok());
}

#[test]
fn a_tokenizer_json_vocabulary_reads_its_bytes_and_specials() {
    let tiny = amusd_model::testing::TinyModel::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, tiny.tokenizer_json().to_string()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    let stop = tok.token_to_id(&tiny.vocab_tokens()[256]).unwrap();
    let c = GrammarCompiler::from_tokenizer(&tok, &[stop]).unwrap();
    assert_eq!(c.vocab_size(), tok.vocab_size());
    let mut m = c
        .constraint(&Grammar::new(GrammarKind::Regex, "hi"))
        .unwrap();
    let h = tok.encode("h", false).unwrap();
    let i = tok.encode("i", false).unwrap();
    assert_eq!(allowed(&mut m, &[], c.vocab_size()), h);
    assert_eq!(allowed(&mut m, &h, c.vocab_size()), i);
    assert_eq!(allowed(&mut m, &[h[0], i[0]], c.vocab_size()), vec![stop]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// The mask is a function of the generated tokens alone: one constraint asked about prefixes
    /// in any order (longer, shorter, diverging, broken, as a verify step's rows and a draft's
    /// rollbacks ask) answers as a fresh one asked once.
    #[test]
    fn the_mask_depends_only_on_the_generated_tokens(seed in 1u64..1000, asks in proptest::collection::vec((0usize..60, proptest::option::of(0u32..256)), 1..25)) {
        let (c, stop) = compiler();
        let vocab = c.vocab_size();
        let g = Grammar::new(GrammarKind::JsonSchema, SCHEMA);
        let (path, _) = walk(&mut c.constraint(&g).unwrap(), vocab, stop, seed, 60);
        let mut reused = c.constraint(&g).unwrap();
        for (len, junk) in asks {
            let mut prefix = path[..len.min(path.len())].to_vec();
            prefix.extend(junk);
            let want = allowed(&mut c.constraint(&g).unwrap(), &prefix, vocab);
            prop_assert_eq!(allowed(&mut reused, &prefix, vocab), want, "prefix {:?}", prefix);
        }
    }
}

/// Whether `text` is a whole sentence of `grammar`, fed one byte token at a time.
fn accepts(c: &GrammarCompiler, stop: u32, grammar: &Grammar, text: &str) -> bool {
    let vocab = c.vocab_size();
    let mut m = c.constraint(grammar).unwrap();
    let mut tokens: Vec<u32> = Vec::new();
    for b in text.bytes() {
        if !allowed(&mut m, &tokens, vocab).contains(&u32::from(b)) {
            return false;
        }
        tokens.push(u32::from(b));
    }
    allowed(&mut m, &tokens, vocab).contains(&stop)
}

const GBNF_LIST: &str = r#"# a list of key = value lines, llama.cpp style
root ::= line+
line ::= key ws? "=" ws? value "\n"
key ::= [a-z] [a-z0-9_]*
value ::= number | "\"" ( [^"\\] | "\\" ["\\n] )* "\"" | ("true" | "false")
number ::= "-"? [0-9]{1,3} ("." [0-9]+)?
ws ::= [ \t]+
"#;

#[test]
fn a_gbnf_grammar_accepts_its_sentences_and_nothing_else() {
    let (c, stop) = compiler();
    let g = Grammar::new(GrammarKind::Gbnf, GBNF_LIST);
    for ok in ["a = 1\n", "x_2=\"q\\\"s\"\nb =  -12.50\nc\t= true\n"] {
        assert!(accepts(&c, stop, &g, ok), "{ok:?}");
    }
    for bad in [
        "",
        "a = 1",
        "A = 1\n",
        "a = 1234\n",
        "a = tru\n",
        "a = \"x\n",
    ] {
        assert!(!accepts(&c, stop, &g, bad), "{bad:?}");
    }
}

#[test]
fn gbnf_terminals_that_overlap_still_match_as_in_llama_cpp() {
    let (c, stop) = compiler();
    let g = Grammar::new(GrammarKind::Gbnf, "root ::= [a-z]+ \"ing\"\n");
    for ok in ["sing", "singing", "inging"] {
        assert!(accepts(&c, stop, &g, ok), "{ok:?}");
    }
    assert!(!accepts(&c, stop, &g, "ing"));
}

#[test]
fn a_gbnf_walk_ends_in_a_sentence() {
    let (c, stop) = compiler();
    let (v, _) = vocabulary();
    let g = Grammar::new(GrammarKind::Gbnf, GBNF_LIST);
    let mut ended = 0;
    for seed in 1..20 {
        let mut m = c.constraint(&g).unwrap();
        let (tokens, done) = walk(&mut m, c.vocab_size(), stop, seed, 200);
        if done {
            ended += 1;
            let t = text(&v, &tokens);
            assert!(t.ends_with('\n') && t.contains('='), "{t:?}");
            assert!(accepts(&c, stop, &g, &t), "{t:?}");
        }
    }
    assert!(ended > 0, "no walk ended within 200 tokens");
}

proptest! {
    /// Whatever a client sends as GBNF, reading and compiling it is an answer, never a panic (the
    /// server and every worker read it).
    #[test]
    fn any_gbnf_text_compiles_or_is_an_error(pieces in proptest::collection::vec(
        proptest::sample::select(vec![
            "root ::= ", "b ::= ", "b", "a", "\"", "[", "]", "^", "-", "\\", "x4", "u00e9", "n",
            "(", ")", "|", "*", "+", "?", "{", "}", ",", "1", "2", "\n", " ", "# c\n", ".", "é",
            "%llguidance {}\n", "start: ",
        ]),
        0..40,
    )) {
        let (c, _) = compiler();
        let text: String = pieces.concat();
        if let Err(e) = c.check(&Grammar::new(GrammarKind::Gbnf, text.clone())) {
            prop_assert!(e.to_string().contains("GBNF"), "{text:?}: {e}");
        }
    }
}

const JSON_GBNF: &str = crate::gbnf::JSON_OBJECT;

proptest! {
    /// A string read as one terminal (`gbnf::delimited`) accepts what the character-by-character
    /// reading does: walks through either are sentences of the other.
    #[test]
    fn a_collapsed_string_reads_as_the_characters_do(seed in 1u64..10_000) {
        let (c, stop) = compiler();
        let (v, _) = vocabulary();
        let fast = Grammar::new(GrammarKind::Gbnf, JSON_GBNF);
        let lark = crate::gbnf::convert(JSON_GBNF, false).unwrap();
        prop_assert!(crate::gbnf::to_lark(JSON_GBNF).unwrap().contains("string: /"));
        let slow = Grammar::new(GrammarKind::Lark, lark);
        for (walked, other) in [(&fast, &slow), (&slow, &fast)] {
            let mut m = c.constraint(walked).unwrap();
            let (tokens, done) = walk(&mut m, c.vocab_size(), stop, seed, 120);
            if done {
                let t = text(&v, &tokens);
                prop_assert!(accepts(&c, stop, other, &t), "{:?}", t);
            }
        }
    }
}

#[test]
fn a_collapsed_string_keeps_the_verdicts() {
    let (c, stop) = compiler();
    let fast = Grammar::new(GrammarKind::Gbnf, JSON_GBNF);
    let slow = Grammar::new(
        GrammarKind::Lark,
        crate::gbnf::convert(JSON_GBNF, false).unwrap(),
    );
    for (text, ok) in [
        (r#"{"a": "b\"c", "d": [1, -2.5e3, true, null, {}]}"#, true),
        (r#"{"\u00e9x": "tab\tinside"}"#, true),
        ("{\"a\": \"a raw\ttab\"}", false),
        (r#"{"k": "\q"}"#, false),
        (r#"{"": ""} "#, true),
        (r#"{"a" "b"}"#, false),
        (r#"{"a": "b""#, false),
    ] {
        assert_eq!(accepts(&c, stop, &fast, text), ok, "{text}");
        assert_eq!(accepts(&c, stop, &slow, text), ok, "{text}");
    }
}
