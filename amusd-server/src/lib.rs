//! An OpenAI-compatible HTTP server over a token [`Generator`]: `POST /v1/chat/completions`,
//! `/v1/completions` and `/v1/responses` (whole or streamed as server-sent events), llama.cpp's
//! `/completion`, `/tokenize`, `/detokenize` and `/props`, `GET /v1/models[/{id}]`, `/health`,
//! `/metrics`; the Responses API's kept responses, read back, listed and deleted
//! ([`responses::store`]); API keys if the server has any ([`auth`]); a request log through
//! `tracing`.
//!
//! Requests are served one at a time, first come first served, by one decode thread that owns the
//! generator; a bounded queue holds the ones waiting, and beyond it a request gets a 429 with
//! `Retry-After`. The async side (axum on tokio) only validates, tokenizes and moves bytes. A client
//! that goes away cancels its request: its event channel closes, and the decode thread tells the
//! generator to stop.

pub mod auth;
pub mod decode;
pub mod error;
pub mod format;
pub mod generator;
pub mod metrics;
pub mod request;
pub mod response;
pub mod responses;
pub mod routes;
pub mod stop;
pub mod tokenize;
pub mod tools;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

pub use auth::ApiKeys;
pub use error::ApiError;
pub use generator::{
    ChatMessage, ChatOptions, Codec, DrySampling, GenError, GenRequest, GenStats, Generator,
    GeneratorFactory, Sampling, TextStream, TokenLogprobs,
};
pub use routes::Limits;

impl From<std::io::Error> for ServerError {
    // By hand, not `#[from]`: that would also make the error the `source()`, and a chain printed
    // with `{:#}` would say it twice.
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot serve: {0}")]
    Io(std::io::Error),
    #[error("cannot load the model: {0}")]
    Load(GenError),
    #[error("the decode thread panicked")]
    DecodePanicked,
}

/// A server whose decode thread is running (loading the generator first) and whose routes are
/// ready to be served.
pub struct Server {
    pub router: axum::Router,
    pub shared: Arc<decode::Shared>,
    decode: JoinHandle<Result<(), GenError>>,
    loaded: tokio::sync::oneshot::Receiver<Result<(), String>>,
}

impl Server {
    /// Starts the decode thread. `queue` requests may wait while one runs.
    pub fn start(
        codec: Arc<dyn Codec>,
        factory: GeneratorFactory,
        queue: usize,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel(queue);
        let (loaded_tx, loaded) = tokio::sync::oneshot::channel();
        let shared = Arc::new(decode::Shared::default());
        let decode = {
            let (codec, shared) = (codec.clone(), shared.clone());
            std::thread::Builder::new()
                .name("decode".into())
                .spawn(move || decode::run(factory, codec, jobs_rx, shared, loaded_tx))?
        };
        let started_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let router = routes::router(routes::AppState {
            codec,
            jobs: jobs_tx,
            shared: shared.clone(),
            responses: Arc::new(responses::store::Store::new(limits.stored_responses)),
            limits,
            started_ns,
        });
        Ok(Self {
            router,
            shared,
            decode,
            loaded,
        })
    }

    /// Serves on `listener` until `shutdown` completes (or the generator fails to load): then stops
    /// accepting, cancels the running request, refuses queued ones, waits for open responses to
    /// end, and drops the generator on its thread.
    pub fn serve(
        self,
        listener: std::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let Server {
            router,
            shared,
            decode,
            loaded,
        } = self;
        let flag = shared.clone();
        rt.block_on(async move {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let load_failed = async move {
                match loaded.await {
                    Ok(Err(_)) => {}
                    _ => std::future::pending().await,
                }
            };
            let stop = async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = load_failed => {}
                }
                flag.shutting_down.store(true, Ordering::SeqCst);
            };
            axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
        })?;
        // Every sender of the queue is gone with the router: the decode thread ends.
        match decode.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::Load(e)),
            Err(_) => Err(ServerError::DecodePanicked),
        }
    }
}
