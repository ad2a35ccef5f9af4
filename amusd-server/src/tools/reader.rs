//! Reading a tool reply as it is generated, so a stream can send each call's name once it is
//! whole and its arguments as they come (OpenAI's streamed `tool_calls` deltas), or an answer's
//! text as it comes. The reply follows the grammar of [`super::ToolUse::grammar`]:
//! `{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}` or `{"response": "..."}`. The reader
//! is a JSON scanner that knows where it is: which call, which field, inside a string or not.
//! The whole response reads its text through the same reader, so streamed and whole agree, a
//! reply cut short included (its calls so far, the last one's arguments unfinished).
//!
//! A native syntax ([`Syntax`]) is read by the same scanner: the reply's first character past any
//! whitespace says whether it is calls or an answer (the grammar keeps answers from beginning as
//! calls do); an answer is its text as it comes, and in calls each top-level JSON object is the
//! next element of the generic format's `tool_calls` list, whatever stands between them
//! (Hermes's tags).

use super::{Reply, Syntax};

/// What a piece of the reply said.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplyEvent {
    /// Call `index` is named.
    Call { index: usize, name: String },
    /// More of call `index`'s arguments: JSON text, without the whitespace between tokens.
    Arguments { index: usize, text: String },
    /// More of the answer's text (decoded).
    Content(String),
}

/// A container the scanner is in.
#[derive(Debug)]
enum Frame {
    /// An object: its last key, and whether a key comes next.
    Object { key: String, expect_key: bool },
    /// An array: the element being read.
    Array { index: usize },
}

/// What the string being read is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Text {
    Key,
    Name(usize),
    Response,
    Other,
}

/// A string being read: its role, its text so far, and an escape sequence in progress.
#[derive(Debug)]
struct Str {
    role: Text,
    text: String,
    escape: Option<String>,
    /// A `\uD8xx` waiting for its low surrogate.
    high: Option<u16>,
}

#[derive(Debug, Default)]
struct Call {
    name: Option<String>,
    arguments: String,
    /// The name was given out.
    announced: bool,
    /// Bytes of `arguments` given out (they wait for the name).
    sent: usize,
}

/// Call arguments being captured: whose, the stack depth they opened at, and whether they are
/// a scalar (which ends at the next delimiter, not at a bracket of its own).
#[derive(Clone, Copy, Debug)]
struct Capture {
    index: usize,
    depth: usize,
    scalar: bool,
}

/// What a native reply is, once its first character past any whitespace says.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Native {
    #[default]
    Undecided,
    Answer,
    /// Calls: how many objects began.
    Calls(usize),
}

#[derive(Debug, Default)]
pub struct ReplyReader {
    raw: String,
    stack: Vec<Frame>,
    string: Option<Str>,
    capture: Option<Capture>,
    calls: Vec<Call>,
    content: Option<String>,
    syntax: Syntax,
    native: Native,
}

/// The generic format's opening, which a native reply's calls are read inside.
const CALLS_OPENING: &str = "{\"tool_calls\": [";

impl ReplyReader {
    /// A reader of replies in `syntax`.
    pub fn new(syntax: Syntax) -> Self {
        Self {
            syntax,
            ..Default::default()
        }
    }

    /// Reads `piece`; what it completed.
    pub fn push(&mut self, piece: &str) -> Vec<ReplyEvent> {
        let mut out = Vec::new();
        for c in piece.chars() {
            if self.syntax.native() {
                self.native_char(c, &mut out);
            } else {
                self.raw.push(c);
                self.char(c, &mut out);
            }
        }
        self.flush_calls(&mut out);
        out
    }

    /// One character of a native reply.
    fn native_char(&mut self, c: char, out: &mut Vec<ReplyEvent>) {
        self.raw.push(c);
        match self.native {
            Native::Undecided if c.is_whitespace() => {}
            Native::Undecided if c == self.syntax.call_start() => {
                for o in CALLS_OPENING.chars() {
                    self.char(o, out);
                }
                self.native = Native::Calls(0);
                self.call_char(c, out);
            }
            Native::Undecided => {
                self.native = Native::Answer;
                self.content = Some(self.raw.clone());
                out.push(ReplyEvent::Content(self.raw.clone()));
            }
            Native::Answer => {
                self.content.get_or_insert_with(String::new).push(c);
                match out.last_mut() {
                    Some(ReplyEvent::Content(t)) => t.push(c),
                    _ => out.push(ReplyEvent::Content(c.to_string())),
                }
            }
            Native::Calls(_) => self.call_char(c, out),
        }
    }

    /// One character of a native reply's calls: inside an object the scanner reads it; between
    /// objects only an object's opening counts (as the list's next element).
    fn call_char(&mut self, c: char, out: &mut Vec<ReplyEvent>) {
        let Native::Calls(objects) = self.native else {
            return;
        };
        let inside = self.string.is_some() || self.stack.len() > 2;
        if inside {
            return self.char(c, out);
        }
        if c == '{' && self.stack.len() == 2 {
            if objects > 0 {
                self.char(',', out);
            }
            self.native = Native::Calls(objects + 1);
            self.char(c, out);
        }
    }

    /// The reply: its calls (the last one's arguments as far as they came), its answer, or,
    /// where it was neither as far as it went, its text as it is.
    pub fn finish(self) -> Reply {
        if self.calls.iter().any(|c| c.name.is_some()) {
            let calls = (self.calls.into_iter())
                .filter_map(|c| Some((c.name?, c.arguments)))
                .collect();
            return Reply::Calls(calls);
        }
        Reply::Content(self.content.unwrap_or(self.raw))
    }

    /// Whether the reply reads as calls or an answer yet.
    pub fn recognized(&self) -> bool {
        self.content.is_some() || self.calls.iter().any(|c| c.name.is_some())
    }

    fn char(&mut self, c: char, out: &mut Vec<ReplyEvent>) {
        if let Some(cap) = self.capture {
            let delimiter = matches!(c, ',' | '}' | ']') || c.is_whitespace();
            if cap.scalar && self.string.is_none() && delimiter {
                self.capture = None;
            } else if self.string.is_some() || !c.is_whitespace() {
                self.calls[cap.index].arguments.push(c);
            }
        }
        if self.string.is_some() {
            return self.string_char(c, out);
        }
        match c {
            '{' | '[' => {
                self.value_starts(c);
                self.stack.push(match c {
                    '{' => Frame::Object {
                        key: String::new(),
                        expect_key: true,
                    },
                    _ => Frame::Array { index: 0 },
                });
            }
            '}' | ']' => {
                self.stack.pop();
                self.value_ends();
            }
            ',' => match self.stack.last_mut() {
                Some(Frame::Object { expect_key, .. }) => *expect_key = true,
                Some(Frame::Array { index }) => *index += 1,
                None => {}
            },
            '"' => {
                let role = self.string_role();
                if role != Text::Key {
                    self.value_starts(c);
                }
                self.string = Some(Str {
                    role,
                    text: String::new(),
                    escape: None,
                    high: None,
                });
            }
            c if c.is_whitespace() || c == ':' => {}
            // A number, true, false or null: arguments capture it; nothing else reads it.
            c => self.value_starts(c),
        }
    }

    /// What a string starting here is, by where it is.
    fn string_role(&self) -> Text {
        if let Some(Frame::Object {
            expect_key: true, ..
        }) = self.stack.last()
        {
            return Text::Key;
        }
        match self.path() {
            Some((Some(index), "name")) => Text::Name(index),
            Some((None, "response")) => Text::Response,
            _ => Text::Other,
        }
    }

    /// Where a value starting now sits: `(Some(call), field)` in a call, `(None, key)` at the
    /// top.
    fn path(&self) -> Option<(Option<usize>, &str)> {
        match self.stack.as_slice() {
            [Frame::Object { key, .. }] => Some((None, key)),
            [Frame::Object { key: top, .. }, Frame::Array { index }, Frame::Object { key, .. }]
                if top == "tool_calls" =>
            {
                Some((Some(*index), key))
            }
            _ => None,
        }
    }

    fn call_mut(&mut self, index: usize) -> &mut Call {
        if self.calls.len() <= index {
            self.calls.resize_with(index + 1, Call::default);
        }
        &mut self.calls[index]
    }

    /// A value opens with `first`: a call's arguments start their capture.
    fn value_starts(&mut self, first: char) {
        if self.capture.is_some() {
            return;
        }
        let key = self.syntax.arguments_key();
        if let Some((Some(index), _)) = self.path().filter(|(_, k)| *k == key) {
            self.capture = Some(Capture {
                index,
                depth: self.stack.len(),
                scalar: !matches!(first, '{' | '[' | '"'),
            });
            self.call_mut(index).arguments.push(first);
        }
    }

    /// A container or a string closed: the arguments' capture ends with its own.
    fn value_ends(&mut self) {
        if let Some(cap) = self.capture {
            if self.stack.len() == cap.depth && self.string.is_none() {
                self.capture = None;
            }
        }
    }

    fn string_char(&mut self, c: char, out: &mut Vec<ReplyEvent>) {
        let s = self.string.as_mut().expect("in a string");
        if s.escape.is_none() && c == '"' {
            return self.string_ends();
        }
        if s.escape.is_none() && c == '\\' {
            s.escape = Some(String::new());
            return;
        }
        let decoded = match s.escape.take() {
            None => Some(c),
            Some(mut e) => {
                e.push(c);
                match unescape(&e, &mut s.high) {
                    None => {
                        s.escape = Some(e);
                        None
                    }
                    Some(d) => d,
                }
            }
        };
        let Some(d) = decoded else { return };
        s.text.push(d);
        if s.role == Text::Response {
            self.content.get_or_insert_with(String::new).push(d);
            match out.last_mut() {
                Some(ReplyEvent::Content(t)) => t.push(d),
                _ => out.push(ReplyEvent::Content(d.to_string())),
            }
        }
    }

    fn string_ends(&mut self) {
        let s = self.string.take().expect("in a string");
        match s.role {
            Text::Key => {
                if let Some(Frame::Object { key, expect_key }) = self.stack.last_mut() {
                    *key = s.text;
                    *expect_key = false;
                }
            }
            Text::Name(index) => self.call_mut(index).name = Some(s.text),
            Text::Response => {
                self.content.get_or_insert_with(String::new);
            }
            Text::Other => {}
        }
        self.value_ends();
    }

    /// Gives out what the calls gained: a name once, then their arguments' new text.
    fn flush_calls(&mut self, out: &mut Vec<ReplyEvent>) {
        for (index, call) in self.calls.iter_mut().enumerate() {
            let Some(name) = &call.name else { continue };
            if !call.announced {
                out.push(ReplyEvent::Call {
                    index,
                    name: name.clone(),
                });
                call.announced = true;
            }
            if call.arguments.len() > call.sent {
                out.push(ReplyEvent::Arguments {
                    index,
                    text: call.arguments[call.sent..].to_string(),
                });
                call.sent = call.arguments.len();
            }
        }
    }
}

/// The character of escape sequence `e` (what followed the backslash), None while it is
/// unfinished; `Some(None)` for half of a surrogate pair (kept in `high`).
fn unescape(e: &str, high: &mut Option<u16>) -> Option<Option<char>> {
    let simple = match e {
        "n" => '\n',
        "t" => '\t',
        "r" => '\r',
        "b" => '\u{8}',
        "f" => '\u{c}',
        _ if e.starts_with('u') && e.len() < 5 => return None,
        _ if e.starts_with('u') => {
            let unit = u16::from_str_radix(&e[1..], 16).unwrap_or(0xFFFD);
            return Some(match (high.take(), unit) {
                (None, 0xD800..=0xDBFF) => {
                    *high = Some(unit);
                    None
                }
                (Some(h), 0xDC00..=0xDFFF) => char::from_u32(
                    0x10000 + ((u32::from(h) - 0xD800) << 10) + (u32::from(unit) - 0xDC00),
                ),
                (_, u) => Some(char::from_u32(u.into()).unwrap_or('\u{FFFD}')),
            });
        }
        other => other.chars().next().unwrap_or('\u{FFFD}'),
    };
    Some(Some(simple))
}

/// The whole reply, read at once.
pub fn read(text: &str, syntax: Syntax) -> Reply {
    let mut r = ReplyReader::new(syntax);
    r.push(text);
    r.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The events of `text` fed in pieces of `size` bytes (on character boundaries), merged: the
    /// calls' names and their arguments, and the answer's text.
    fn streamed(text: &str, size: usize) -> (Vec<(String, String)>, String, Reply) {
        streamed_in(Syntax::Generic, text, size)
    }

    fn streamed_in(
        syntax: Syntax,
        text: &str,
        size: usize,
    ) -> (Vec<(String, String)>, String, Reply) {
        let mut r = ReplyReader::new(syntax);
        let (mut calls, mut content) = (Vec::<(String, String)>::new(), String::new());
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = size.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            for e in r.push(&rest[..cut]) {
                match e {
                    ReplyEvent::Call { index, name } => {
                        assert_eq!(index, calls.len(), "calls are named in order");
                        calls.push((name, String::new()));
                    }
                    ReplyEvent::Arguments { index, text } => calls[index].1.push_str(&text),
                    ReplyEvent::Content(t) => content.push_str(&t),
                }
            }
            rest = &rest[cut..];
        }
        (calls, content, r.finish())
    }

    #[test]
    fn calls_stream_their_names_then_their_arguments() {
        let text = r#"{ "tool_calls" : [ {"name": "f", "arguments": {"x": [1, 2], "s": "a, b}"}},
            {"name": "g", "arguments": { }} ] }"#;
        let want = vec![
            ("f".to_string(), r#"{"x":[1,2],"s":"a, b}"}"#.to_string()),
            ("g".to_string(), "{}".to_string()),
        ];
        for size in [1, 2, 7, 1000] {
            let (calls, content, whole) = streamed(text, size);
            assert_eq!(calls, want, "pieces of {size}");
            assert_eq!(content, "");
            assert_eq!(whole, Reply::Calls(want.clone()));
        }
    }

    #[test]
    fn an_answer_streams_its_text_decoded() {
        let text = r#"{"response": "Tab\there, \"quoted\", \u00e9 and \ud83d\ude00."}"#;
        let want = "Tab\there, \"quoted\", \u{e9} and \u{1F600}.";
        for size in [1, 3, 1000] {
            let (calls, content, whole) = streamed(text, size);
            assert!(calls.is_empty());
            assert_eq!(content, want, "pieces of {size}");
            assert_eq!(whole, Reply::Content(want.into()));
        }
        assert_eq!(
            read(r#"{"response": ""}"#, Syntax::Generic),
            Reply::Content(String::new())
        );
    }

    /// Cut short, a reply is what came of it: the calls named so far (the last one's arguments
    /// unfinished), the answer so far, or where it is neither yet, its text.
    #[test]
    fn a_reply_cut_short_is_what_came() {
        assert_eq!(
            read(
                r#"{"tool_calls": [{"name": "f", "arguments": {"x": 1"#,
                Syntax::Generic
            ),
            Reply::Calls(vec![("f".into(), r#"{"x":1"#.into())])
        );
        assert_eq!(
            read(r#"{"response": "Hel"#, Syntax::Generic),
            Reply::Content("Hel".into())
        );
        let cut = r#"{"tool_calls": [{"na"#;
        assert_eq!(read(cut, Syntax::Generic), Reply::Content(cut.into()));
        assert_eq!(
            read("plain text", Syntax::Generic),
            Reply::Content("plain text".into())
        );
        // Arguments that are not an object end where their value does.
        assert_eq!(
            read(
                r#"{"tool_calls": [{"name": "f", "arguments": 12 }, {"name": "g", "arguments": "s"}]}"#,
                Syntax::Generic
            ),
            Reply::Calls(vec![
                ("f".into(), "12".into()),
                ("g".into(), r#""s""#.into())
            ])
        );
    }

    #[test]
    fn hermes_calls_stream_as_the_generic_ones_do() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"</tool_call> {\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>";
        let want = vec![
            ("f".to_string(), r#"{"s":"</tool_call> {"}"#.to_string()),
            ("g".to_string(), "{}".to_string()),
        ];
        for size in [1, 3, 1000] {
            let (calls, content, whole) = streamed_in(Syntax::Hermes, text, size);
            assert_eq!(calls, want, "pieces of {size}");
            assert_eq!(content, "");
            assert_eq!(whole, Reply::Calls(want.clone()));
        }
        // Cut short inside the second call's name: the first call.
        let cut = &text[..text.rfind("\"g").unwrap() + 2];
        assert_eq!(
            read(cut, Syntax::Hermes),
            Reply::Calls(vec![want[0].clone()])
        );
    }

    #[test]
    fn llama3_calls_take_their_parameters() {
        let text = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#;
        let want = vec![("get_weather".to_string(), r#"{"city":"Paris"}"#.to_string())];
        for size in [1, 5, 1000] {
            let (calls, _, whole) = streamed_in(Syntax::Llama3, text, size);
            assert_eq!(calls, want, "pieces of {size}");
            assert_eq!(whole, Reply::Calls(want.clone()));
        }
        // The generic key means nothing here: a call without arguments.
        assert_eq!(
            read(r#"{"name": "f", "arguments": {"x": 1}}"#, Syntax::Llama3),
            Reply::Calls(vec![("f".into(), String::new())])
        );
    }

    /// A native answer is its text, as it comes and whole, whitespace before it included; its
    /// own braces and tags are text.
    #[test]
    fn a_native_answer_is_its_text() {
        for (syntax, text) in [
            (Syntax::Hermes, " Paris {is} <tool_call> the capital."),
            (Syntax::Llama3, "\nParis <b>{\"name\": 1}</b>"),
        ] {
            for size in [1, 4, 1000] {
                let (calls, content, whole) = streamed_in(syntax, text, size);
                assert!(calls.is_empty());
                assert_eq!(content, text, "{syntax:?}, pieces of {size}");
                assert_eq!(whole, Reply::Content(text.into()));
            }
        }
        let mut r = ReplyReader::new(Syntax::Hermes);
        assert!(r.push("  ").is_empty() && !r.recognized());
        assert_eq!(r.finish(), Reply::Content("  ".into()));
    }

    proptest! {
        /// Any native reply, in any pieces: no panic, and the pieces read as the whole does.
        #[test]
        fn native_pieces_read_as_the_whole(text in r#"[<>{}\[\]",: a-z_/\n0-9]{0,60}"#, size in 1usize..8, hermes: bool) {
            let syntax = if hermes { Syntax::Hermes } else { Syntax::Llama3 };
            let (calls, content, whole) = streamed_in(syntax, &text, size);
            prop_assert_eq!(&whole, &read(&text, syntax));
            match whole {
                Reply::Calls(c) => prop_assert_eq!(c, calls),
                Reply::Content(c) if !content.is_empty() => prop_assert_eq!(c, content),
                Reply::Content(_) => {}
            }
        }

        /// Any text, in any pieces: no panic, and the pieces read as the whole does.
        #[test]
        fn pieces_read_as_the_whole(text in r#"[{}\[\]",: a-z\\u0-9]{0,60}"#, size in 1usize..8) {
            let (calls, content, whole) = streamed(&text, size);
            prop_assert_eq!(&whole, &read(&text, Syntax::Generic));
            match whole {
                Reply::Calls(c) => prop_assert_eq!(c, calls),
                Reply::Content(c) if !content.is_empty() => prop_assert_eq!(c, content),
                Reply::Content(_) => {}
            }
        }
    }
}
