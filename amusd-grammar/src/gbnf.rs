//! llama.cpp's GBNF, read and rewritten as llguidance's Lark, so a grammar written for
//! llama.cpp's `--grammar-file` or its server's `grammar` works here unchanged.
//!
//! The reader follows llama.cpp's own parser (`llama-grammar.cpp`): `name ::= alternatives`, a
//! rule ends at a newline outside parentheses, `#` comments, `"literals"` and `[classes]` with
//! the escapes `\x.. \u.... \U........ \t \n \r \\ \" \[ \] \-`, `.` for any character, groups,
//! `* + ?` and `{m}`, `{m,}`, `{m,n}`, `{,n}`, and `root` as the start. A grammar that starts
//! with `%llguidance` is Lark already (llama.cpp's convention) and passes through.
//!
//! GBNF matches character by character, and every parse counts: `[a-z]+ "ing"` accepts
//! "singing". llguidance first splits the text into its terminals, greedily, and would read that
//! "ing" as the literal and then refuse the rest. So every terminal here is one character: each
//! rule stays a Lark rule, a literal becomes a sequence of one-character literals, a class a
//! one-character regex, and the Earley parser sees what llama.cpp's sees. That is dear where a
//! grammar lets most of the vocabulary through one character at a time (a JSON string's body:
//! ~2.4 ms a mask on the 49k vocabulary), so a quoted string whose reading cannot differ is one
//! regex terminal instead (`delimited`: JSON in GBNF then masks in ~0.06 ms, as a schema does;
//! `cargo run --release -p amusd-grammar --example grammar_cost`).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// Why a GBNF grammar could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("GBNF line {line}, column {column}: {message}")]
pub struct GbnfError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// JSON in GBNF, as llama.cpp's `grammars/json.gbnf` writes it (any JSON object): for examples,
/// tests and the cost measurements.
pub const JSON_OBJECT: &str = r#"root ::= object
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9]{1,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"#;

/// The prefix that marks a grammar as llguidance's Lark (as llama.cpp reads it).
pub const LLGUIDANCE_PREFIX: &str = "%llguidance";

mod delimited;

/// `src` (GBNF) as a Lark grammar whose `start` is GBNF's `root`.
pub fn to_lark(src: &str) -> Result<String, GbnfError> {
    convert(src, true)
}

/// [`to_lark`], with delimited strings read as one terminal where that is exact
/// ([`delimited`]) or never.
pub(crate) fn convert(src: &str, collapse: bool) -> Result<String, GbnfError> {
    if src.trim_start().starts_with(LLGUIDANCE_PREFIX) {
        return Ok(src.to_string());
    }
    let rules = Reader::new(src).grammar()?;
    check_references(src, &rules)?;
    let mut out = String::from("start: root\n");
    if rules.iter().all(|r| r.name != "root") {
        return Err(GbnfError {
            line: 1,
            column: 1,
            message: "no `root` rule: GBNF starts at `root ::= ...`".into(),
        });
    }
    let collapsed = match collapse {
        true => delimited::collapsible(&rules),
        false => Default::default(),
    };
    for (i, r) in rules.iter().enumerate() {
        let body = match collapsed.get(&i) {
            // The rule is one sequence; its first three items are the string.
            Some(regex) => match &r.body[0][3..] {
                [] => format!("/{regex}/"),
                rest => format!("/{regex}/ {}", sequence(rest)),
            },
            None => alternatives(&r.body),
        };
        let _ = writeln!(out, "{}: {body}", lark_name(&r.name));
    }
    Ok(out)
}

/// One `name ::= body` (a rule given twice adds alternatives, as in llama.cpp).
struct Rule {
    name: String,
    body: Vec<Seq>,
}

type Seq = Vec<Item>;

struct Item {
    term: Term,
    /// Applied innermost first: `x*?` is `(x*)?`.
    reps: Vec<Rep>,
}

enum Term {
    Literal(String),
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    Any,
    Ref {
        name: String,
        at: usize,
    },
    Group(Vec<Seq>),
}

#[derive(Clone, Copy)]
enum Rep {
    Star,
    Plus,
    Opt,
    Range(u32, Option<u32>),
}

/// A rule name Lark reads as a rule: GBNF names are `[a-zA-Z0-9-]+`; lowercase names that start
/// with a letter stay, others are escaped into names with `_` (which GBNF names lack, so no two
/// meet), and so is `start`, which is ours.
fn lark_name(name: &str) -> String {
    let plain = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name != "start";
    if plain {
        return name.to_string();
    }
    let mut s = String::from("g_");
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            s.push('_');
        }
        s.push(c.to_ascii_lowercase());
    }
    s
}

fn alternatives(alts: &[Seq]) -> String {
    let seqs: Vec<String> = alts.iter().map(|s| sequence(s)).collect();
    seqs.join(" | ")
}

fn sequence(seq: &[Item]) -> String {
    if seq.is_empty() {
        return "\"\"".into();
    }
    let items: Vec<String> = seq.iter().map(item).collect();
    items.join(" ")
}

fn item(it: &Item) -> String {
    let mut s = term(&it.term);
    for (i, rep) in it.reps.iter().enumerate() {
        if i > 0 {
            s = format!("({s})");
        }
        match rep {
            Rep::Star => s.push('*'),
            Rep::Plus => s.push('+'),
            Rep::Opt => s.push('?'),
            // llguidance refuses an upper bound of 0; `x{0}` is the empty string.
            Rep::Range(_, Some(0)) => s = "\"\"".into(),
            Rep::Range(m, Some(n)) => {
                let _ = write!(s, "{{{m},{n}}}");
            }
            Rep::Range(m, None) => {
                let _ = write!(s, "{{{m},}}");
            }
        }
    }
    s
}

fn term(t: &Term) -> String {
    match t {
        Term::Literal(l) if l.chars().count() > 1 => {
            let chars: Vec<String> = l.chars().map(|c| literal(&c.to_string())).collect();
            format!("({})", chars.join(" "))
        }
        Term::Literal(l) => literal(l),
        Term::Class { negated, ranges } => format!("/{}/", class_regex(*negated, ranges)),
        Term::Any => "/(?s:.)/".into(),
        Term::Ref { name, .. } => lark_name(name),
        Term::Group(alts) => format!("({})", alternatives(alts)),
    }
}

/// A Lark string: JSON's syntax, with every control character escaped (Lark's lexer refuses
/// them raw, DEL included, which JSON leaves raw).
fn literal(l: &str) -> String {
    let mut s = String::from("\"");
    for c in l.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// A class as a regex (`[...]` or `[^...]`).
fn class_regex(negated: bool, ranges: &[(char, char)]) -> String {
    let mut s = String::from(if negated { "[^" } else { "[" });
    for &(lo, hi) in ranges {
        class_char(&mut s, lo);
        if hi != lo {
            s.push('-');
            class_char(&mut s, hi);
        }
    }
    s.push(']');
    s
}

/// A character inside a regex class: alphanumerics as they are, everything else as `\x{..}`, so
/// nothing is special to the regex or ends Lark's `/.../`.
fn class_char(s: &mut String, c: char) {
    if c.is_ascii_alphanumeric() {
        s.push(c);
    } else {
        let _ = write!(s, "\\x{{{:x}}}", c as u32);
    }
}

fn check_references(src: &str, rules: &[Rule]) -> Result<(), GbnfError> {
    let defined: HashSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    let mut missing = None;
    for r in rules {
        visit_refs(&r.body, &mut |name, at| {
            if missing.is_none() && !defined.contains(name) {
                missing = Some((name.to_string(), at));
            }
        });
    }
    match missing {
        None => Ok(()),
        Some((name, at)) => Err(error_at(src, at, format!("undefined rule `{name}`"))),
    }
}

fn visit_refs(alts: &[Seq], f: &mut dyn FnMut(&str, usize)) {
    for it in alts.iter().flatten() {
        match &it.term {
            Term::Ref { name, at } => f(name, *at),
            Term::Group(inner) => visit_refs(inner, f),
            _ => {}
        }
    }
}

fn error_at(src: &str, at: usize, message: String) -> GbnfError {
    let before = &src[..at.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    GbnfError {
        line,
        column,
        message,
    }
}

/// llama.cpp's recursive-descent reader, over bytes with `pos` always on a char boundary.
struct Reader<'a> {
    src: &'a str,
    pos: usize,
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-'
}

impl<'a> Reader<'a> {
    fn new(src: &'a str) -> Self {
        Self { src, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos).copied()
    }

    fn peek_at(&self, n: usize) -> Option<u8> {
        self.src.as_bytes().get(self.pos + n).copied()
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T, GbnfError> {
        Err(error_at(self.src, self.pos, message.into()))
    }

    /// Spaces and comments; newlines too inside parentheses or after `::=` and `|`.
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' => self.pos += 1,
                b'\r' | b'\n' if newlines => self.pos += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n' && c != b'\r') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn grammar(mut self) -> Result<Vec<Rule>, GbnfError> {
        let mut rules: Vec<Rule> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        self.space(true);
        while self.peek().is_some() {
            let rule = self.rule()?;
            match index.get(&rule.name) {
                Some(&i) => rules[i].body.extend(rule.body),
                None => {
                    index.insert(rule.name.clone(), rules.len());
                    rules.push(rule);
                }
            }
            self.space(true);
        }
        if rules.is_empty() {
            self.pos = 0;
            return self.err("empty grammar: GBNF starts at `root ::= ...`");
        }
        Ok(rules)
    }

    fn rule(&mut self) -> Result<Rule, GbnfError> {
        let name = self.name()?;
        self.space(false);
        if !self.src[self.pos..].starts_with("::=") {
            return self.err(format!("expected `::=` after `{name}`"));
        }
        self.pos += 3;
        self.space(true);
        let body = self.alternatives(false)?;
        match self.peek() {
            None | Some(b'\n') | Some(b'\r') => Ok(Rule { name, body }),
            Some(_) => self.err("expected a newline or the end after a rule"),
        }
    }

    fn name(&mut self) -> Result<String, GbnfError> {
        let start = self.pos;
        while self.peek().is_some_and(is_word) {
            self.pos += 1;
        }
        if self.pos == start {
            return self.err("expected a rule name (letters, digits and `-`)");
        }
        Ok(self.src[start..self.pos].to_string())
    }

    fn alternatives(&mut self, nested: bool) -> Result<Vec<Seq>, GbnfError> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some(b'|') {
            self.pos += 1;
            self.space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(alts)
    }

    fn sequence(&mut self, nested: bool) -> Result<Seq, GbnfError> {
        let mut seq: Seq = Vec::new();
        while let Some(c) = self.peek() {
            let term = match c {
                b'"' => self.literal()?,
                b'[' => self.class()?,
                b'.' => {
                    self.pos += 1;
                    Term::Any
                }
                b'(' => {
                    self.pos += 1;
                    self.space(true);
                    let alts = self.alternatives(true)?;
                    if self.peek() != Some(b')') {
                        return self.err("expected `)`");
                    }
                    self.pos += 1;
                    Term::Group(alts)
                }
                b'*' | b'+' | b'?' | b'{' => {
                    let rep = self.repetition()?;
                    match seq.last_mut() {
                        Some(last) => last.reps.push(rep),
                        None => return self.err("a repetition needs an item before it"),
                    }
                    self.space(nested);
                    continue;
                }
                c if is_word(c) => {
                    let at = self.pos;
                    let name = self.name()?;
                    Term::Ref { name, at }
                }
                _ => break,
            };
            seq.push(Item {
                term,
                reps: Vec::new(),
            });
            self.space(nested);
        }
        Ok(seq)
    }

    fn repetition(&mut self) -> Result<Rep, GbnfError> {
        let c = self.peek();
        self.pos += 1;
        match c {
            Some(b'*') => Ok(Rep::Star),
            Some(b'+') => Ok(Rep::Plus),
            Some(b'?') => Ok(Rep::Opt),
            _ => {
                self.space(true);
                let min = if self.peek() == Some(b',') {
                    0
                } else {
                    self.int()?
                };
                self.space(true);
                let max = if self.peek() == Some(b',') {
                    self.pos += 1;
                    self.space(true);
                    match self.peek() {
                        Some(b'}') => None,
                        _ => Some(self.int()?),
                    }
                } else {
                    Some(min)
                };
                self.space(true);
                if self.peek() != Some(b'}') {
                    return self.err("expected `}` to close a repetition");
                }
                self.pos += 1;
                if max.is_some_and(|n| n < min) {
                    return self.err(format!(
                        "repetition {{{min},{}}}: max < min",
                        max.unwrap_or(0)
                    ));
                }
                Ok(Rep::Range(min, max))
            }
        }
    }

    fn int(&mut self) -> Result<u32, GbnfError> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        match self.src[start..self.pos].parse() {
            Ok(n) => Ok(n),
            Err(_) => {
                self.pos = start;
                self.err("expected a number in a repetition")
            }
        }
    }

    fn literal(&mut self) -> Result<Term, GbnfError> {
        let open = self.pos;
        self.pos += 1;
        let mut s = String::new();
        loop {
            match self.peek() {
                None => {
                    self.pos = open;
                    return self.err("unterminated string literal");
                }
                Some(b'"') => break,
                Some(_) => s.push(self.char()?),
            }
        }
        self.pos += 1;
        Ok(Term::Literal(s))
    }

    fn class(&mut self) -> Result<Term, GbnfError> {
        let open = self.pos;
        self.pos += 1;
        let negated = self.peek() == Some(b'^');
        if negated {
            self.pos += 1;
        }
        let mut ranges = Vec::new();
        loop {
            match self.peek() {
                None => {
                    self.pos = open;
                    return self.err("unterminated character class");
                }
                Some(b']') => break,
                Some(_) => {}
            }
            let lo = self.char()?;
            let hi = if self.peek() == Some(b'-') && self.peek_at(1).is_some_and(|c| c != b']') {
                self.pos += 1;
                self.char()?
            } else {
                lo
            };
            if hi < lo {
                return self.err(format!("character range {lo:?}-{hi:?} is backwards"));
            }
            ranges.push((lo, hi));
        }
        self.pos += 1;
        if ranges.is_empty() && !negated {
            self.pos = open;
            return self.err("empty character class: it matches nothing");
        }
        Ok(Term::Class { negated, ranges })
    }

    /// One character of a literal or a class, escapes read.
    fn char(&mut self) -> Result<char, GbnfError> {
        let rest = &self.src[self.pos..];
        let c = rest.chars().next().expect("called before the end");
        if c != '\\' {
            self.pos += c.len_utf8();
            return Ok(c);
        }
        let at = self.pos;
        let Some(e) = self.peek_at(1) else {
            return self.err("a `\\` at the end");
        };
        self.pos += 2;
        let hex = |me: &mut Self, n: usize| {
            let digits = me.src.get(me.pos..me.pos + n).unwrap_or("");
            let code = (digits.len() == n && digits.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(digits, 16).ok())
                .flatten()
                .and_then(char::from_u32);
            match code {
                Some(c) => {
                    me.pos += n;
                    Ok(c)
                }
                None => {
                    me.pos = at;
                    me.err(format!(
                        "`\\{}` needs {n} hex digits of a character",
                        e as char
                    ))
                }
            }
        };
        match e {
            b'x' => hex(self, 2),
            b'u' => hex(self, 4),
            b'U' => hex(self, 8),
            b't' => Ok('\t'),
            b'n' => Ok('\n'),
            b'r' => Ok('\r'),
            b'\\' | b'"' | b'[' | b']' | b'-' => Ok(e as char),
            _ => {
                self.pos = at;
                self.err(format!("unknown escape `\\{}`", e as char))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_literals_classes_and_repetitions_become_lark() {
        let g = "root ::= \"a\\n\" [^\"\\\\x-z] Item-2* # comment\nItem-2 ::= (\"x\" | ) . {2,} \"y\"{,3}\n";
        assert_eq!(
            to_lark(g).unwrap(),
            "start: root\nroot: (\"a\" \"\\u000a\") /[^\\x{22}\\x{5c}x-z]/ g__item-2*\n\
             g__item-2: (\"x\" | \"\") /(?s:.)/{2,} \"y\"{0,3}\n"
        );
    }

    #[test]
    fn continuation_lines_and_nested_repetitions() {
        let g = "root ::=\n  \"{\" (\n    \"a\" |\n    \"b\"\n  )*? \"}\"\nstart ::= \"s\"{0}\n";
        assert_eq!(
            to_lark(g).unwrap(),
            "start: root\nroot: \"{\" ((\"a\" | \"b\")*)? \"}\"\ng_start: \"\"\n"
        );
    }

    #[test]
    fn escapes_reach_the_characters_they_name() {
        let g = r#"root ::= "\x41\u00e9\U0001F600\t\"\\" [\[\]\-]"#;
        assert_eq!(
            to_lark(g).unwrap(),
            "start: root\nroot: (\"A\" \"\u{e9}\" \"\u{1F600}\" \"\\u0009\" \"\\\"\" \"\\\\\") /[\\x{5b}\\x{5d}\\x{2d}]/\n"
        );
    }

    #[test]
    fn a_delimited_string_is_one_terminal_only_where_that_is_exact() {
        let json = "root ::= str \":\" str\nstr ::= \"\\\"\" ( [^\"\\\\] | \"\\\\\" [\"nt] )* \"\\\"\" ws\nws ::= \" \"?\n";
        let lark = to_lark(json).unwrap();
        assert!(
            lark.contains("str: /\\x{22}(?:(?:(?:[^\\x{22}\\x{5c}])|(?:\\x{5c})(?:[\\x{22}nt])))*\\x{22}/ ws\n"),
            "{lark}"
        );
        assert!(!convert(json, false).unwrap().contains("/\\x{22}("));
        // Another rule that reads the quote, a body that may start with it, a rule reference in
        // it, or a second string of the same quote: character by character.
        for g in [
            "root ::= str \"\\\"\"\nstr ::= \"\\\"\" [a-z]* \"\\\"\"\n",
            "root ::= \"'\" [^\\n]* \"'\"\n",
            "root ::= \"'\" ( x )* \"'\"\nx ::= [a-z]\n",
            "root ::= a b\na ::= \"'\" [a-z]* \"'\"\nb ::= \"'\" [0-9]* \"'\"\n",
        ] {
            assert!(
                !to_lark(g).unwrap().contains("(?:"),
                "{g}: {}",
                to_lark(g).unwrap()
            );
        }
    }

    #[test]
    fn llguidance_grammars_pass_through() {
        let g = "%llguidance {}\nstart: \"x\"\n";
        assert_eq!(to_lark(g).unwrap(), g);
    }

    #[test]
    fn errors_say_where() {
        let cases = [
            ("root ::= foo\n", 1, 10, "undefined rule `foo`"),
            ("a ::= \"x\"\n", 1, 1, "no `root` rule"),
            ("root ::= \"x\n", 1, 10, "unterminated string"),
            ("root ::= [ab\n", 1, 10, "unterminated character class"),
            ("root \"x\"\n", 1, 6, "expected `::=`"),
            ("root ::= \"x\" )\n", 1, 14, "expected a newline"),
            ("root ::= * \"x\"\n", 1, 11, "needs an item"),
            ("root ::= \"\\q\"\n", 1, 11, "unknown escape"),
            ("root ::= \"\\x4\"\n", 1, 11, "needs 2 hex digits"),
            ("root ::= \"x\"{3,1}\n", 1, 18, "max < min"),
            ("root ::= []\n", 1, 10, "empty character class"),
            ("\n\n  # nothing\n", 1, 1, "empty grammar"),
            ("root ::= [z-a]\n", 1, 14, "backwards"),
        ];
        for (g, line, column, msg) in cases {
            let e = to_lark(g).unwrap_err();
            assert!(e.message.contains(msg), "{g:?}: {e}");
            assert_eq!((e.line, e.column), (line, column), "{g:?}: {e}");
        }
    }
}
