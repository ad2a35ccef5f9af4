use super::*;
use crate::generator::DrySampling;

fn check(body: &str, endpoint: Endpoint) -> Result<Validated, ApiError> {
    validate(parse(body.as_bytes())?, endpoint, Syntax::Generic)
}

fn err(body: &str, endpoint: Endpoint) -> ApiError {
    check(body, endpoint).expect_err(body)
}

#[test]
fn a_chat_request_with_every_parameter() {
    let v = check(
        r#"{"model":"x","messages":[{"role":"developer","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]}],
            "max_completion_tokens":7,"max_tokens":99,"stop":"\n","temperature":0.5,"dynatemp_range":0.25,
            "top_p":0.9,"top_k":-1,"min_p":0.1,"typical_p":0.95,"xtc_probability":0.5,"seed":42,"prompt_lookup":false,"cache_prompt":false,"stream":true,
            "frequency_penalty":0.5,"presence_penalty":-0.25,"repetition_penalty":1.1,"repeat_last_n":-1,
            "dry_multiplier":0.8,"dry_allowed_length":3,"dry_penalty_last_n":100,"dry_sequence_breakers":["\n"],
            "logit_bias":{"198":-100,"15":2.5},"stream_options":{"include_usage":true},"n":1,"logprobs":false,
            "unknown_field":{"ignored":true}}"#,
        Endpoint::Chat,
    )
    .unwrap();
    assert_eq!(
        v.input,
        Input::Chat(
            vec![
                ChatMessage::text("system", "be brief"),
                ChatMessage::text("user", "hi there"),
            ],
            ChatOptions::default()
        )
    );
    assert_eq!(v.max_tokens, Some(7), "max_completion_tokens wins");
    assert_eq!(v.stop, vec!["\n".to_string()]);
    assert_eq!(
        v.sampling,
        Sampling {
            temperature: 0.5,
            dynatemp_range: 0.25,
            dynatemp_exponent: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.1,
            top_n_sigma: 0.0,
            typical_p: 0.95,
            xtc_probability: 0.5,
            xtc_threshold: 0.1,
            seed: Some(42),
            repeat_penalty: 1.1,
            frequency_penalty: 0.5,
            presence_penalty: -0.25,
            repeat_last_n: u32::MAX,
            dry: DrySampling {
                multiplier: 0.8,
                allowed_length: 3,
                last_n: 100,
                sequence_breakers: Some(vec!["\n".into()]),
                ..DrySampling::default()
            },
            logit_bias: vec![(15, 2.5), (198, -100.0)],
            logprobs: None,
            prompt_logprobs: false,
            grammar: None,
            prompt_lookup: false,
            cache_prompt: false,
        }
    );
    assert!(v.stream && v.include_usage && v.n == 1);
}

#[test]
fn logprobs_per_endpoint() {
    let chat = |extra: &str| {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
        check(&body, Endpoint::Chat).unwrap().sampling.logprobs
    };
    assert_eq!(chat(""), None);
    assert_eq!(chat(r#","logprobs":false,"top_logprobs":0"#), None);
    assert_eq!(chat(r#","logprobs":true"#), Some(0));
    assert_eq!(chat(r#","logprobs":true,"top_logprobs":20"#), Some(20));
    let completion = |extra: &str| {
        let body = format!(r#"{{"prompt":"x"{extra}}}"#);
        check(&body, Endpoint::Completions)
            .unwrap()
            .sampling
            .logprobs
    };
    assert_eq!(completion(r#","logprobs":null"#), None);
    assert_eq!(completion(r#","logprobs":3"#), Some(3));
    let e = err(r#"{"prompt":"x","logprobs":-1}"#, Endpoint::Completions);
    assert_eq!(e.param.as_deref(), Some("logprobs"));
}

#[test]
fn n_choices_up_to_the_limit() {
    let v = check(r#"{"prompt":"hi","n":16}"#, Endpoint::Completions).unwrap();
    assert_eq!(v.n, MAX_CHOICES);
    let v = check(r#"{"prompt":"hi"}"#, Endpoint::Completions).unwrap();
    assert_eq!(v.n, 1);
}

#[test]
fn defaults_are_greedy_with_prompt_lookup() {
    let v = check(r#"{"prompt":"hi"}"#, Endpoint::Completions).unwrap();
    assert_eq!(v.sampling, Sampling::default());
    assert!(v.sampling.prompt_lookup && v.sampling.cache_prompt);
    assert_eq!(v.sampling.temperature, 0.0);
    let e = err(
        r#"{"prompt":"hi","prompt_lookup":"no"}"#,
        Endpoint::Completions,
    );
    assert!(format!("{e:?}").contains("prompt_lookup"), "{e:?}");
}

#[test]
fn completion_prompts() {
    let text = |b: &str| check(b, Endpoint::Completions).map(|v| v.input);
    assert_eq!(text(r#"{"prompt":"abc"}"#), Ok(Input::Text("abc".into())));
    assert_eq!(text(r#"{"prompt":["abc"]}"#), Ok(Input::Text("abc".into())));
    assert_eq!(
        text(r#"{"prompt":[1,2,3]}"#),
        Ok(Input::Tokens(vec![1, 2, 3]))
    );
    // A list of one token list, as lm-eval-harness sends.
    assert_eq!(
        text(r#"{"prompt":[[504,6355,314]]}"#),
        Ok(Input::Tokens(vec![504, 6355, 314]))
    );
    for bad in [
        r#"{"prompt":""}"#,
        r#"{"prompt":[]}"#,
        r#"{"prompt":[[]]}"#,
        r#"{"prompt":[[1,"a"]]}"#,
        r#"{"prompt":[[1,[2]]]}"#,
        r#"{"prompt":[1,[2]]}"#,
        r#"{"prompt":["a","b"]}"#,
        r#"{"prompt":[[1],[2]]}"#,
        r#"{"prompt":["a",[2]]}"#,
        r#"{"prompt":7}"#,
        r#"{}"#,
    ] {
        assert_eq!(
            err(bad, Endpoint::Completions).param.as_deref(),
            Some("prompt")
        );
    }
}

#[test]
fn bad_input_names_the_field() {
    let cases = [
        (r#"{"messages":[]}"#, "messages"),
        (r#"{"max_tokens":1}"#, "messages"),
        (r#"{"messages":"hi"}"#, "messages"),
        (
            r#"{"messages":[{"role":"function","content":"x"}]}"#,
            "messages[0].role",
        ),
        (
            r#"{"messages":[{"role":"user","content":5}]}"#,
            "messages[0].content",
        ),
        (
            r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
            "messages[0].content",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
            "max_tokens",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-3}"#,
            "max_tokens",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
            "temperature",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"temperature":-1}"#,
            "temperature",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#,
            "top_p",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"min_p":2}"#,
            "min_p",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"typical_p":0}"#,
            "typical_p",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"dry_multiplier":-1}"#,
            "dry_multiplier",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"dry_base":0.5}"#,
            "dry_base",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"xtc_threshold":-1}"#,
            "xtc_threshold",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"stop":[1]}"#,
            "stop",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"frequency_penalty":2.5}"#,
            "frequency_penalty",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"presence_penalty":-3}"#,
            "presence_penalty",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"repeat_penalty":0}"#,
            "repeat_penalty",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"repetition_penalty":-1}"#,
            "repetition_penalty",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"repeat_last_n":-2}"#,
            "repeat_last_n",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
            "stream",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"5":101}}"#,
            "logit_bias",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"five":1}}"#,
            "logit_bias",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"5":"up"}}"#,
            "logit_bias",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":[5]}"#,
            "logit_bias",
        ),
        (r#"{"messages":[{"role":"user","content":"x"}],"n":0}"#, "n"),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"logprobs":3}"#,
            "logprobs",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#,
            "top_logprobs",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
            "top_logprobs",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"n":17}"#,
            "n",
        ),
    ];
    for (body, param) in cases {
        let e = err(body, Endpoint::Chat);
        assert_eq!(e.status, 400, "{body}");
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        assert!(
            e.message.contains(param.split('[').next().unwrap()),
            "{e:?}"
        );
    }
}

#[test]
fn malformed_json_is_a_400_that_says_so() {
    for body in ["{", "not json", "[1,2]", ""] {
        let e = err(body, Endpoint::Chat);
        assert_eq!(e.status, 400);
        assert!(e.message.contains("JSON"), "{body}: {e:?}");
    }
}

/// Tools: their description ends the system message (or is one), their schema is the
/// grammar, earlier calls and results are written in the reply's format; tools with another
/// grammar, or on completions, are refused.
#[test]
fn tools_shape_the_prompt_and_the_grammar() {
    let tools =
        r#""tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#;
    let turns = r#""messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"x"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function",
        "function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c","content":"1"}]"#;
    let v = check(&format!("{{{turns},{tools}}}"), Endpoint::Chat).unwrap();
    let Input::Chat(m, _) = &v.input else {
        panic!("{v:?}")
    };
    assert!(
        m[0].content
            .starts_with("Be brief.\n\nYou can call these tools"),
        "{m:?}"
    );
    assert!(m[0]
        .content
        .contains(r#"{"name":"f","parameters":{"type":"object","additionalProperties":false}}"#));
    assert_eq!(
        m[2].content,
        r#"{"tool_calls":[{"name":"f","arguments":{}}]}"#
    );
    assert_eq!(
        (m[3].role.as_str(), m[3].content.as_str()),
        (
            "user",
            r#"{"tool_response":{"content":"1","tool_call_id":"c"}}"#
        )
    );
    assert_eq!(v.sampling.grammar.as_ref().map(|g| g.param), Some("tools"));
    assert!(v.tools.is_some());
    // No system message: one comes first.
    let v = check(
        &format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{tools}}}"#),
        Endpoint::Chat,
    )
    .unwrap();
    let Input::Chat(m, _) = &v.input else {
        panic!("{v:?}")
    };
    assert_eq!((m.len(), m[0].role.as_str()), (2, "system"));
    for (body, endpoint, param) in [
        (
            format!(
                r#"{{"messages":[{{"role":"user","content":"x"}}],{tools},"guided_regex":"a"}}"#
            ),
            Endpoint::Chat,
            "guided_regex",
        ),
        (
            format!(r#"{{"prompt":"x",{tools}}}"#),
            Endpoint::Completions,
            "tools",
        ),
    ] {
        let e = check(&body, endpoint).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
    }
}

/// A template with a tool syntax of its own gets the conversation as it came (the calls with
/// their arguments as objects, the `tool` turn as one) and the tools as its `tools` variable;
/// no system message describes them, and the grammar is the syntax's.
#[test]
fn a_native_tool_syntax_leaves_the_prompt_to_the_template() {
    let body = r#"{"messages":[{"role":"user","content":"x"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function",
        "function":{"name":"f","arguments":"{\"a\": 1}"}}]},{"role":"tool","tool_call_id":"c","content":"1"}],
        "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}"#;
    let v = validate(
        parse(body.as_bytes()).unwrap(),
        Endpoint::Chat,
        Syntax::Hermes,
    )
    .unwrap();
    let Input::Chat(m, options) = &v.input else {
        panic!("{v:?}")
    };
    assert_eq!(m.len(), 3, "no system message added: {m:?}");
    assert_eq!(
        (m[1].role.as_str(), m[1].content.as_str()),
        ("assistant", "")
    );
    let calls = m[1].tool_calls.as_ref().unwrap();
    assert_eq!(
        calls[0]["function"]["arguments"],
        serde_json::json!({"a": 1})
    );
    assert_eq!(
        (
            m[2].role.as_str(),
            m[2].content.as_str(),
            m[2].tool_call_id.as_deref()
        ),
        ("tool", "1", Some("c"))
    );
    assert_eq!(options.template_kwargs["tools"][0]["function"]["name"], "f");
    let grammar = v.sampling.grammar.as_ref().unwrap();
    assert_eq!(grammar.kind, crate::format::GrammarType::Lark);
    assert!(grammar.text.contains("<tool_call>"), "{}", grammar.text);
    assert_eq!(v.tools.as_ref().map(|t| t.syntax), Some(Syntax::Hermes));
}

/// Audio output, asked by either parameter, is a 400 naming it (answered in text, a client
/// would wait for audio); text output asked explicitly is served.
#[test]
fn audio_output_is_refused_by_name() {
    let base = r#""messages":[{"role":"user","content":"x"}]"#;
    for (extra, name) in [
        (r#""modalities":["text","audio"]"#, "modalities"),
        (r#""modalities":["audio"]"#, "modalities"),
        (r#""modalities":"audio""#, "modalities"),
        (r#""audio":{"voice":"alloy","format":"wav"}"#, "audio"),
    ] {
        let e = err(&format!("{{{base},{extra}}}"), Endpoint::Chat);
        assert_eq!(e.param.as_deref(), Some(name), "{extra}");
        assert!(e.message.starts_with(name), "{e:?}");
    }
    let text = format!(r#"{{{base},"modalities":["text"],"audio":null}}"#);
    check(&text, Endpoint::Chat).unwrap();
}

#[test]
fn unsupported_parameters_are_refused_by_name() {
    let base = r#""messages":[{"role":"user","content":"x"}]"#;
    for (extra, name) in [
        (r#""best_of":2"#, "best_of"),
        (r#""suffix":"x""#, "suffix"),
        (r#""mirostat":2"#, "mirostat"),
    ] {
        let e = err(&format!("{{{base},{extra}}}"), Endpoint::Chat);
        assert_eq!(e.param.as_deref(), Some(name), "{extra}");
        assert!(e.message.contains(name), "{e:?}");
    }
    // Their neutral values are accepted.
    check(
        &format!(
            r#"{{{base},"n":1,"logprobs":false,"tools":[],"tool_choice":"none","mirostat":0,"tfs_z":1,
            "response_format":{{"type":"text"}},"presence_penalty":0,"logit_bias":{{}}}}"#
        ),
        Endpoint::Chat,
    )
    .unwrap();
}
