//! Delimited strings as one terminal: where GBNF's character-by-character reading and
//! llguidance's greedy terminals provably agree, a rule's quoted string becomes one regex, which
//! llguidance's lexer walks without the Earley parser (JSON's string body masks ~20x faster).
//!
//! A rule qualifies when it is one sequence that starts `D (X)* D` (or `+`), `D` a one-character
//! literal and `X` built of terminals only, and
//! - `X` cannot start with `D`: after the opening `D` or a whole `X`, a `D` can only close the
//!   string, so the regex's one way to read it is GBNF's (and once closed it cannot go on: the
//!   terminal is complete);
//! - nothing else in the grammar can read `D` (no other literal holds it, no class or `.` matches
//!   it), and no other rule qualifies with the same `D`: no other path can start a terminal where
//!   this one starts, so greedy matching drops no parse.
//!
//! Otherwise the rule stays character by character.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::{class_char, class_regex, Item, Rep, Rule, Seq, Term};

/// The rules whose opening `D (X)* D` becomes one terminal: rule index to the regex (without
/// Lark's slashes).
pub(super) fn collapsible(rules: &[Rule]) -> HashMap<usize, String> {
    let mut found: Vec<(usize, char, String)> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        if let Some((d, regex)) = delimited(r) {
            found.push((i, d, regex));
        }
    }
    let shared = |d: char| found.iter().filter(|f| f.1 == d).count() > 1;
    let mut out = HashMap::new();
    for (i, d, regex) in &found {
        let elsewhere = rules.iter().enumerate().any(|(j, r)| {
            let skip = if j == *i { 3 } else { 0 };
            r.body.iter().enumerate().any(|(k, seq)| {
                let from = if k == 0 { skip } else { 0 };
                seq[from.min(seq.len())..]
                    .iter()
                    .any(|it| may_read(&it.term, *d))
            })
        });
        if !elsewhere && !shared(*d) {
            out.insert(*i, regex.clone());
        }
    }
    out
}

/// `D (X)* D` at the start of `r`'s one sequence, with `X` of terminals that cannot start with
/// `D`: `D` and the regex.
fn delimited(r: &Rule) -> Option<(char, String)> {
    let [seq] = &r.body[..] else {
        return None;
    };
    let [open, body, close, ..] = &seq[..] else {
        return None;
    };
    let d = one_char(open)?;
    if one_char(close) != Some(d) || !matches!(&body.reps[..], [Rep::Star] | [Rep::Plus]) {
        return None;
    }
    if may_start_with(&body.term, d) != Some(false) {
        return None;
    }
    let mut regex = String::new();
    class_char(&mut regex, d);
    let _ = write!(regex, "(?:{})", term_regex(&body.term)?);
    regex.push(if matches!(body.reps[..], [Rep::Star]) {
        '*'
    } else {
        '+'
    });
    class_char(&mut regex, d);
    Some((d, regex))
}

/// The character of a one-character literal without repetition.
fn one_char(it: &Item) -> Option<char> {
    let Term::Literal(l) = &it.term else {
        return None;
    };
    let mut chars = l.chars();
    match (chars.next(), chars.next(), it.reps.is_empty()) {
        (Some(c), None, true) => Some(c),
        _ => None,
    }
}

/// Whether `t` can read `d` anywhere (a rule reference is read where its rule is).
fn may_read(t: &Term, d: char) -> bool {
    match t {
        Term::Literal(l) => l.contains(d),
        Term::Class { negated, ranges } => in_class(*negated, ranges, d),
        Term::Any => true,
        Term::Ref { .. } => false,
        Term::Group(alts) => alts.iter().flatten().any(|it| may_read(&it.term, d)),
    }
}

fn in_class(negated: bool, ranges: &[(char, char)], d: char) -> bool {
    ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&d)) != negated
}

/// Whether `t`'s first character can be `d`; None when that is not known here (a rule
/// reference, an alternative that may start empty).
fn may_start_with(t: &Term, d: char) -> Option<bool> {
    match t {
        Term::Literal(l) => l.chars().next().map(|c| c == d),
        Term::Class { negated, ranges } => Some(in_class(*negated, ranges, d)),
        Term::Any => Some(true),
        Term::Ref { .. } => None,
        Term::Group(alts) => {
            let mut any = false;
            for seq in alts {
                let first = seq.first()?;
                if first.reps.iter().any(|r| may_be_empty(*r)) {
                    return None;
                }
                any |= may_start_with(&first.term, d)?;
            }
            Some(any)
        }
    }
}

fn may_be_empty(r: Rep) -> bool {
    matches!(r, Rep::Star | Rep::Opt | Rep::Range(0, _))
}

/// `t` as a regex, if it holds only terminals.
fn term_regex(t: &Term) -> Option<String> {
    let mut s = String::new();
    match t {
        Term::Literal(l) => l.chars().for_each(|c| class_char(&mut s, c)),
        Term::Class { negated, ranges } => s.push_str(&class_regex(*negated, ranges)),
        Term::Any => s.push_str("(?s:.)"),
        Term::Ref { .. } => return None,
        Term::Group(alts) => {
            let seqs: Option<Vec<String>> = alts.iter().map(seq_regex).collect();
            let _ = write!(s, "(?:{})", seqs?.join("|"));
        }
    }
    Some(s)
}

fn seq_regex(seq: &Seq) -> Option<String> {
    let mut s = String::new();
    for it in seq {
        let mut r = format!("(?:{})", term_regex(&it.term)?);
        for rep in &it.reps {
            match rep {
                Rep::Star => r.push('*'),
                Rep::Plus => r.push('+'),
                Rep::Opt => r.push('?'),
                Rep::Range(m, Some(n)) => {
                    let _ = write!(r, "{{{m},{n}}}");
                }
                Rep::Range(m, None) => {
                    let _ = write!(r, "{{{m},}}");
                }
            }
            r = format!("(?:{r})");
        }
        s.push_str(&r);
    }
    Some(s)
}
