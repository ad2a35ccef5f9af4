//! The HTTP side: routes, validation, the queue's admission (429 beyond it), and moving the decode
//! thread's events to the client, whole or as server-sent events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::auth::{require_key, ApiKeys};
use crate::decode::{Event, Job, LogprobEntry, Shared, Summary};
use crate::error::{ApiError, Unlogged};
use crate::generator::{Codec, GenRequest};
use crate::request::{self, Endpoint, Input, Validated};
use crate::response::{Echo, Head};
use crate::responses::{self, render::Responder, retrieve, store::Store, stream::ResponseStream};
use crate::tools::reader::{ReplyEvent, ReplyReader};
use crate::tools::Reply;

/// Server settings that handlers need.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Seconds a request may take from arrival to its last token.
    pub request_timeout: Option<Duration>,
    /// The `Retry-After` of a 429, in seconds.
    pub retry_after_s: u64,
    /// The keys clients must present (none: the server is open).
    pub api_keys: ApiKeys,
    /// How many Responses API responses are kept for `previous_response_id` (0: none).
    pub stored_responses: usize,
}

#[derive(Clone)]
pub struct AppState {
    pub codec: Arc<dyn Codec>,
    pub jobs: SyncSender<Job>,
    pub shared: Arc<Shared>,
    pub limits: Limits,
    /// Unique per server start, so response ids do not repeat across restarts.
    pub started_ns: u128,
    /// The Responses API's kept responses.
    pub responses: Arc<Store>,
}

pub fn router(state: AppState) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/completion", post(llama_completion))
        .route("/v1/responses", post(responses_route))
        .route(
            "/v1/responses/{id}",
            get(retrieve::get_response).delete(retrieve::delete_response),
        )
        .route("/v1/responses/{id}/input_items", get(retrieve::input_items))
        .route("/v1/models", get(models))
        // A catch-all: a served name may hold slashes (`--alias org/model`).
        .route("/v1/models/{*id}", get(model))
        .route("/props", get(props))
        .route("/tokenize", post(tokenize_route))
        .route("/detokenize", post(detokenize_route))
        .route("/apply-template", post(apply_template_route))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::new(state.limits.api_keys.clone()),
            require_key,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(middleware::from_fn(log_errors))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Counts every response by endpoint and status.
async fn count(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let endpoint = match path {
        "/v1/chat/completions"
        | "/v1/completions"
        | "/completion"
        | "/v1/responses"
        | "/v1/models"
        | "/props"
        | "/tokenize"
        | "/detokenize"
        | "/health"
        | "/metrics" => path.to_string(),
        // One label for every id, so the metric's series stay few.
        p if p.starts_with("/v1/responses/") && p.ends_with("/input_items") => {
            "/v1/responses/{id}/input_items".to_string()
        }
        p if p.starts_with("/v1/responses/") => "/v1/responses/{id}".to_string(),
        p if p.starts_with("/v1/models/") => "/v1/models/{id}".to_string(),
        _ => "other".to_string(),
    };
    let resp = next.run(req).await;
    s.shared
        .metrics
        .count_request(&endpoint, resp.status().as_u16());
    resp
}

/// Logs each error response at WARN, once, with the request's method and path, its status and its
/// message (what the error carries to here, [`Unlogged`]; those logged where they arose carry
/// none).
async fn log_errors(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    if let Some(Unlogged(error)) = resp.extensions().get::<Unlogged>() {
        let status = resp.status().as_u16();
        match resp.status().is_client_error() {
            true => tracing::warn!(%method, path, status, error = %error, "request refused"),
            false => tracing::warn!(%method, path, status, error = %error, "request failed"),
        }
    }
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint: use /v1/chat/completions, /v1/completions, /v1/responses[/{id}[/input_items]], /completion, /v1/models[/{id}], /props, /tokenize, /detokenize, /health or /metrics",
    )
}

/// A known endpoint asked with a method it does not take: an error object, as for an unknown
/// path (axum's own 405 has an empty body, which leaves a client's `error.message` empty).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

async fn models(State(s): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(s.codec.as_ref())]}))
}

/// `GET /v1/models/{id}` (the clients' `models.retrieve`): the served model's object, as the
/// list has it; any other id is a 404 with OpenAI's `model_not_found`.
async fn model(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let served = s.codec.model_id();
    if id != served {
        let message = format!("the model {id:?} does not exist: this server serves {served:?}");
        return Err(ApiError::new(StatusCode::NOT_FOUND, message).with_code("model_not_found"));
    }
    Ok(Json(model_object(s.codec.as_ref())))
}

/// The served model as OpenAI's Model object, with vLLM's `max_model_len`.
fn model_object(codec: &dyn Codec) -> Value {
    json!({"id": codec.model_id(), "object": "model", "created": 0, "owned_by": "amusd",
        "max_model_len": codec.context_length()})
}

/// llama.cpp's `GET /props`: what its front ends read of a server (the context, the chat
/// template, one slot).
async fn props(State(s): State<AppState>) -> Json<Value> {
    let ctx = s.codec.context_length();
    Json(json!({
        "default_generation_settings": {"n_ctx": ctx, "model": s.codec.model_id()},
        "total_slots": 1,
        "model_path": s.codec.model_id(),
        "chat_template": s.codec.chat_template().unwrap_or_default(),
        "modalities": {"vision": false, "audio": false},
        "build_info": concat!("amusd ", env!("CARGO_PKG_VERSION")),
    }))
}

async fn health(State(s): State<AppState>) -> Response {
    let down = (s.shared.unavailable.lock())
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(why) = down {
        let e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why);
        (
            e.status,
            Json(json!({"status": "unavailable", "error": e.body()["error"]})),
        )
            .into_response()
    } else if s.shared.ready.load(Ordering::SeqCst) {
        Json(json!({"status": "ok"})).into_response()
    } else {
        let e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "loading the models: the draft and verify workers are not ready yet",
        );
        (
            e.status,
            Json(json!({"status": "loading", "error": e.body()["error"]})),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.shared.metrics.encode(),
    )
        .into_response()
}

async fn tokenize_route(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = |codec: &dyn Codec, body: &[u8]| crate::tokenize::tokenize(codec, json_body(body)?);
    off_thread(s, body, run).await
}

async fn detokenize_route(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = |codec: &dyn Codec, body: &[u8]| crate::tokenize::detokenize(codec, json_body(body)?);
    off_thread(s, body, run).await
}

async fn apply_template_route(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    off_thread(s, body, crate::tokenize::apply_template).await
}

/// A JSON body as `T`; a syntax or type error names where it is.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    request::typed(request::json_object(body, "{\"tokens\": [...]}")?)
}

/// Runs `f` on the body off the async threads (tokenizing is CPU work) and answers its JSON.
async fn off_thread(
    s: AppState,
    body: Result<Bytes, BytesRejection>,
    f: fn(&dyn Codec, &[u8]) -> Result<Value, ApiError>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e, s.limits.max_body_bytes).into_response(),
    };
    let codec = s.codec.clone();
    match tokio::task::spawn_blocking(move || f(codec.as_ref(), &body)).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("tokenizer failed: {e}"),
        )
        .into_response(),
    }
}

async fn chat(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(s, body, Endpoint::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(s, body, Endpoint::Completions)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// llama.cpp's own `/completion`: a completion in its names and shapes.
async fn llama_completion(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle_as(s, body, Endpoint::Completions, Api::LlamaCpp)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The Responses API: a chat request in its names and shapes ([`crate::responses`]); errors name
/// its fields.
async fn responses_route(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle_as(s, body, Endpoint::Chat, Api::Responses)
        .await
        .unwrap_or_else(|e| responses::rename(e).into_response())
}

async fn handle(
    s: AppState,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    handle_as(s, body, endpoint, Api::OpenAi).await
}

/// Whose names and shapes a request and its response use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    /// OpenAI's chat and completions.
    OpenAi,
    /// llama.cpp's `/completion`.
    LlamaCpp,
    /// OpenAI's Responses API.
    Responses,
}

/// A generation request to `endpoint`, in `api`'s names and shapes.
async fn handle_as(
    s: AppState,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
    api: Api,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = body.map_err(|e| body_error(e, s.limits.max_body_bytes))?;
    let (raw, responses) = match api {
        Api::OpenAi => (request::parse(&body)?, None),
        Api::LlamaCpp => (request::parse_llama(&body)?, None),
        Api::Responses => {
            let p = responses::parse(&body, &s.responses)?;
            (p.raw, Some((p.echoed, p.keep)))
        }
    };
    let syntax = crate::tools::Syntax::of_codec(s.codec.as_ref());
    let mut v = request::validate(raw, endpoint, syntax)?;
    check_logit_bias(s.codec.as_ref(), &v)?;
    dry_breakers(&s.codec, &mut v).await?;
    check_grammar(&s.codec, &v).await?;
    let prompt = tokenize(&s.codec, &v).await?;
    let max_tokens = budget(s.codec.as_ref(), &v, prompt.len())?;
    let echo = v.echo.then(|| echo_of(s.codec.as_ref(), &v.input, &prompt));
    let prefix = match (api, endpoint) {
        (Api::Responses, _) => "resp",
        (_, Endpoint::Chat) => "chatcmpl",
        (_, Endpoint::Completions) => "cmpl",
    };
    let id = response_id(&s, prefix);
    let (tx, rx) = unbounded_channel();
    let job = Job {
        id: id.clone(),
        request: GenRequest {
            prompt,
            max_tokens,
            sampling: v.sampling.clone(),
        },
        n: v.n,
        stop: v.stop.clone(),
        arrived,
        deadline: s.limits.request_timeout.map(|t| arrived + t),
        events: tx,
        // llama.cpp's field: OpenAI's shapes have no place for the ids.
        return_tokens: api == Api::LlamaCpp && v.return_tokens,
    };
    admit(&s, job)?;
    if let Some((echoed, keep)) = responses {
        let keep = keep.map(|input| (s.responses.clone(), input));
        return respond(&s, &v, id, echoed, keep, rx).await;
    }
    let head = Head {
        endpoint,
        id,
        created: unix_now(),
        model: s.codec.model_id().to_string(),
        include_usage: v.include_usage,
        logprobs: v.sampling.logprobs.is_some(),
        echo,
        tools: v.tools.as_ref().map(|t| t.syntax),
        llama: api == Api::LlamaCpp,
    };
    if v.stream {
        let (state, opening) = StreamState::open(head, v.n);
        Ok(sse_response(sse(state, opening, rx)))
    } else {
        let mut choices = match collect(v.n, rx).await {
            Ok(c) => c,
            Err(failed) => return Ok(failed),
        };
        if v.score_only {
            choices.iter_mut().for_each(|(text, s)| score_only(text, s));
        }
        Ok(Json(head.full(&choices)).into_response())
    }
}

/// A scored prompt's choice ([`request::Validated::score_only`]): the one generated token left
/// out of its text, log-probabilities, ids and usage, as if it had never been asked for.
fn score_only(text: &mut String, s: &mut Summary) {
    text.clear();
    s.finish = crate::decode::Finish::Length;
    s.usage.total_tokens -= s.usage.completion_tokens;
    s.usage.completion_tokens = 0;
    if let Some(entries) = s.logprobs.as_mut() {
        entries.clear();
    }
    if let Some(ids) = s.tokens.as_mut() {
        ids.clear();
    }
}

/// A Responses API request's response, whole or streamed.
async fn respond(
    s: &AppState,
    v: &Validated,
    id: String,
    echoed: responses::Echoed,
    keep: Option<(Arc<Store>, Vec<Value>)>,
    rx: UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let r = Responder {
        id,
        created_at: unix_now(),
        model: s.codec.model_id().to_string(),
        echoed,
        logprobs: v.sampling.logprobs.is_some(),
        tools: v.tools.as_ref().map(|t| t.syntax),
        keep,
    };
    if v.stream {
        let (state, opening) = ResponseStream::open(r);
        return Ok(sse_response(sse(state, opening, rx)));
    }
    let choices = match collect(1, rx).await {
        Ok(c) => c,
        Err(failed) => return Ok(failed),
    };
    let (text, summary) = &choices[0];
    let whole = r.whole(text, summary);
    r.keep(&whole);
    Ok(Json(whole).into_response())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sse_response(
    events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the server's limit of {limit} bytes; send a shorter prompt"),
        )
    } else {
        ApiError::new(
            e.status(),
            format!("cannot read the request body: {}", e.body_text()),
        )
    }
}

/// What an echoing response repeats: the prompt's text as given (token prompts decoded) and its
/// first token's text.
fn echo_of(codec: &dyn Codec, input: &Input, prompt: &[u32]) -> Echo {
    let text = match input {
        Input::Text(t) => t.clone(),
        _ => {
            let mut stream = codec.text_stream();
            let mut text: String = prompt.iter().map(|&t| stream.push(t)).collect();
            text.push_str(&stream.finish());
            text
        }
    };
    Echo {
        text,
        first_token: codec.token_text(prompt[0]),
    }
}

/// Refuses a logit bias that names a token past the model's vocabulary.
fn check_logit_bias(codec: &dyn Codec, v: &Validated) -> Result<(), ApiError> {
    let vocab = codec.vocab_size();
    match v.sampling.logit_bias.iter().find(|b| b.0 as usize >= vocab) {
        Some((t, _)) => Err(ApiError::bad_param(
            "logit_bias",
            format!("logit_bias: token id {t} is out of the vocabulary (0..{vocab})"),
        )),
        None => Ok(()),
    }
}

/// Fills DRY's breaker set from the codec's vocabulary, if DRY is on (reading every token's
/// text is CPU work: off the async threads).
async fn dry_breakers(codec: &Arc<dyn Codec>, v: &mut Validated) -> Result<(), ApiError> {
    let dry = &v.sampling.dry;
    if dry.is_off() {
        return Ok(());
    }
    let (codec, strings) = (codec.clone(), dry.sequence_breakers.clone());
    v.sampling.dry.breakers =
        tokio::task::spawn_blocking(move || codec.dry_breakers(strings.as_deref()))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading the breakers failed: {e}"),
                )
            })?;
    Ok(())
}

/// Refuses a grammar that does not compile against the model's vocabulary (compiling is CPU
/// work: off the async threads).
async fn check_grammar(codec: &Arc<dyn Codec>, v: &Validated) -> Result<(), ApiError> {
    let Some(g) = v.sampling.grammar.clone() else {
        return Ok(());
    };
    let codec = codec.clone();
    let param = g.param;
    tokio::task::spawn_blocking(move || codec.check_grammar(&g))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("grammar check failed: {e}"),
            )
        })?
        .map_err(|m| ApiError::bad_param(param, format!("{param}: {m}")))
}

/// The prompt's token ids (tokenizing is CPU work: off the async threads).
async fn tokenize(codec: &Arc<dyn Codec>, v: &Validated) -> Result<Vec<u32>, ApiError> {
    let codec = codec.clone();
    let input = v.input.clone();
    let (param, ids) = tokio::task::spawn_blocking(move || match input {
        Input::Chat(m, options) => ("messages", codec.encode_chat(&m, &options)),
        Input::Text(t) => ("prompt", codec.encode_prompt(&t)),
        Input::Tokens(ids) => {
            let vocab = codec.vocab_size();
            let ids = match ids.iter().find(|&&t| t as usize >= vocab) {
                Some(t) => Err(format!(
                    "token id {t} is out of the vocabulary (0..{vocab})"
                )),
                None => Ok(ids),
            };
            ("prompt", ids)
        }
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("tokenizer failed: {e}"),
        )
    })?;
    let ids = ids.map_err(|m| ApiError::bad_param(param, format!("{param}: {m}")))?;
    if ids.is_empty() {
        return Err(ApiError::bad_param(
            param,
            format!("{param} gives no tokens"),
        ));
    }
    Ok(ids)
}

/// The tokens a request may generate: what it asked for, if the context has room for it.
fn budget(codec: &dyn Codec, v: &Validated, prompt: usize) -> Result<usize, ApiError> {
    let context = codec.context_length();
    let param = match v.input {
        Input::Chat(..) => "messages",
        _ => "prompt",
    };
    // OpenAI's code for both: clients (langchain-openai) tell an overflow by it alone.
    let overflow = |param: &str, message: String| {
        ApiError::bad_param(param, message).with_code("context_length_exceeded")
    };
    if prompt >= context {
        return Err(overflow(
            param,
            format!("the prompt is {prompt} tokens, and the model's context holds {context} in all; shorten it"),
        ));
    }
    let room = context - prompt;
    match v.max_tokens {
        None => Ok(room),
        Some(n) if n > room => Err(overflow(
            "max_tokens",
            format!(
                "max_tokens {n} does not fit: the context holds {context} tokens and the prompt takes {prompt}; pass at most {room}"
            ),
        )),
        Some(n) => Ok(n),
    }
}

/// Queues a job, first come first served; a full queue is a 429.
fn admit(s: &AppState, job: Job) -> Result<(), ApiError> {
    if s.shared.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    s.shared.metrics.queue_depth.inc();
    let refused = match s.jobs.try_send(job) {
        Ok(()) => return Ok(()),
        Err(TrySendError::Full(_)) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "the server is busy: its request queue is full; retry after the Retry-After delay",
        )
        .retry_after(s.limits.retry_after_s),
        Err(TrySendError::Disconnected(_)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the decode thread has stopped; restart the server",
        ),
    };
    s.shared.metrics.queue_depth.dec();
    Err(refused)
}

/// `prefix`, then unique across requests and server starts (`_` after `resp`, as OpenAI's).
fn response_id(s: &AppState, prefix: &str) -> String {
    if prefix == "resp" {
        // A kept response is read back by its id alone: one a client cannot guess.
        return format!("resp_{:032x}", rand::random::<u128>());
    }
    let n = s.shared.next_id.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}-{n}", s.started_ns)
}

/// The `n` choices' texts and summaries, gathered as they come; or the error response (a
/// generation's failure was logged by the decode thread, with the request's id).
async fn collect(
    n: usize,
    mut rx: UnboundedReceiver<Event>,
) -> Result<Vec<(String, Summary)>, Response> {
    let mut choices: Vec<(String, Option<Summary>)> = vec![(String::new(), None); n];
    while let Some(event) = rx.recv().await {
        match event {
            // The summary has every log-probability.
            Event::Text(i, t, ..) => choices[i].0.push_str(&t),
            Event::Done(i, summary) => {
                choices[i].1 = Some(summary);
                if i + 1 == n {
                    // The decode thread ends the choices in order: all are here.
                    let done: Option<Vec<(String, Summary)>> = choices
                        .into_iter()
                        .map(|(t, s)| s.map(|s| (t, s)))
                        .collect();
                    return done.ok_or_else(|| {
                        ApiError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "a choice ended before the ones ahead of it",
                        )
                        .into_response()
                    });
                }
            }
            Event::Failed(e) => return Err(e.into_logged_response()),
        }
    }
    Err(ApiError::dropped().into_response())
}

/// One server-sent event: its name (the Responses API names its events) and its data.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Outgoing {
    pub name: Option<&'static str>,
    pub data: String,
}

impl Outgoing {
    fn wire(self) -> SseEvent {
        // axum writes the fields in the order they are set: the name first, as OpenAI's.
        let e = match self.name {
            Some(name) => SseEvent::default().event(name),
            None => SseEvent::default(),
        };
        e.data(self.data)
    }
}

/// How a stream's SSE events come from the decode thread's: chat's and completions' chunks
/// ([`StreamState`]) or the Responses API's events.
pub(crate) trait Shape: Send + 'static {
    /// Queues the SSE events `event` makes (None: the decode thread dropped the request); true
    /// once the stream has ended.
    fn take(&mut self, event: Option<Event>, out: &mut VecDeque<Outgoing>) -> bool;
}

/// The SSE stream: `opening`, then what `shape` makes of each event until it ends. Dropping it
/// (the client left) closes `rx`, which the decode thread takes as a cancellation.
fn sse<S: Shape>(
    shape: S,
    opening: VecDeque<Outgoing>,
    rx: UnboundedReceiver<Event>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(
        (shape, opening, Some(rx)),
        |(mut shape, mut queued, mut rx)| async move {
            loop {
                if let Some(e) = queued.pop_front() {
                    return Some((Ok(e.wire()), (shape, queued, rx)));
                }
                let event = rx.as_mut()?.recv().await;
                if shape.take(event, &mut queued) {
                    rx = None;
                }
            }
        },
    )
}

/// Where a chat or completions stream is: the choice being streamed, whether its chat opening
/// went out, and the summaries of the choices that ended.
struct StreamState {
    head: Head,
    n: usize,
    opened: usize,
    ended: Vec<Summary>,
    /// Bytes of text each choice's tokens have had so far (completions' `text_offset`).
    offsets: Vec<usize>,
    /// With tools, each choice's reply being read, and the log-probabilities not sent yet (a
    /// piece that completes nothing waits for one that does).
    readers: Vec<(ReplyReader, Vec<LogprobEntry>)>,
}

impl StreamState {
    /// The stream: the first choice's opening chunk, one chunk per text piece (each with its
    /// choice's index; the choices one after another), each choice's closing chunk, the usage,
    /// `[DONE]`; on a failure, the error object and the end.
    fn open(head: Head, n: usize) -> (Self, VecDeque<Outgoing>) {
        let syntax = head.tools.unwrap_or_default();
        let mut state = StreamState {
            head,
            n,
            opened: 0,
            ended: Vec::new(),
            offsets: vec![0; n],
            readers: (0..n)
                .map(|_| (ReplyReader::new(syntax), Vec::new()))
                .collect(),
        };
        let mut out = VecDeque::new();
        state.open_up_to(0, &mut out);
        (state, out)
    }

    /// Queues the chat openings of the choices up to `i` that have none yet.
    fn open_up_to(&mut self, i: usize, out: &mut VecDeque<Outgoing>) {
        while self.opened <= i {
            if let Some(v) = self.head.opening(self.opened) {
                out.push_back(data(v));
            }
            self.opened += 1;
        }
    }

    /// A choice's end (and after the last one the usage and `[DONE]`); true after the last.
    fn end(&mut self, i: usize, s: Summary, out: &mut VecDeque<Outgoing>) -> bool {
        self.open_up_to(i, out);
        let end = if self.head.tools.is_some() {
            let (reader, logprobs) = std::mem::take(&mut self.readers[i]);
            let recognized = reader.recognized();
            let reply = reader.finish();
            if let (false, Reply::Content(text)) = (recognized, &reply) {
                // Neither calls nor an answer (cut short early): the text as it is.
                let content = ReplyEvent::Content(text.clone());
                out.push_back(data(self.head.tool_delta(i, &content, &[])));
            }
            let calls = matches!(reply, Reply::Calls(_));
            self.head.tool_end(i, calls, &s, &logprobs)
        } else {
            self.head.choice_end(i, &s)
        };
        out.push_back(data(end));
        self.ended.push(s);
        if self.ended.len() < self.n {
            return false;
        }
        if let Some(v) = self.head.closing(&self.ended) {
            out.push_back(data(v));
        }
        // llama.cpp's own stream just ends.
        if !self.head.llama {
            out.push_back(Outgoing {
                name: None,
                data: "[DONE]".into(),
            });
        }
        true
    }
}

fn data(v: Value) -> Outgoing {
    Outgoing {
        name: None,
        data: v.to_string(),
    }
}

impl Shape for StreamState {
    /// Text, a choice's end, or the error that ends the stream.
    fn take(&mut self, event: Option<Event>, out: &mut VecDeque<Outgoing>) -> bool {
        match event {
            Some(Event::Text(i, t, logprobs, _)) if self.head.tools.is_some() => {
                self.open_up_to(i, out);
                let (reader, held) = &mut self.readers[i];
                held.extend(logprobs);
                for event in reader.push(&t) {
                    let chunk = self.head.tool_delta(i, &event, held);
                    held.clear();
                    out.push_back(data(chunk));
                }
                false
            }
            Some(Event::Text(i, t, logprobs, ids)) => {
                self.open_up_to(i, out);
                let chunk = self.head.text(i, &t, &logprobs, &ids, self.offsets[i]);
                self.offsets[i] += logprobs.iter().map(|e| e.text.len()).sum::<usize>();
                out.push_back(data(chunk));
                false
            }
            Some(Event::Done(i, s)) => self.end(i, s, out),
            Some(Event::Failed(e)) => {
                out.push_back(data(e.body()));
                true
            }
            None => {
                out.push_back(data(ApiError::dropped().body()));
                true
            }
        }
    }
}
