//! `/metrics`: Prometheus (OpenMetrics) text. One [`Metrics`] value owns the registry; nothing
//! global.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: String,
}

/// Every series the server exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub ttft: Histogram,
    pub per_token: Histogram,
    pub draft_proposed: Counter,
    pub draft_accepted: Counter,
    pub rollbacks: Counter,
    pub worker_restarts: Counter,
    pub queue_depth: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("amusd");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by endpoint and status code",
            requests.clone(),
        );
        let m = Self {
            requests,
            prompt_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            // 5 ms to ~80 s.
            ttft: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            // 1 ms to ~1 s.
            per_token: Histogram::new(exponential_buckets(0.001, 1.6, 15)),
            draft_proposed: Counter::default(),
            draft_accepted: Counter::default(),
            rollbacks: Counter::default(),
            worker_restarts: Counter::default(),
            queue_depth: Gauge::default(),
            registry,
        };
        m.register_rest()
    }

    fn register_rest(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "prompt_tokens",
            "Prompt tokens of served requests",
            self.prompt_tokens.clone(),
        );
        r.register(
            "completion_tokens",
            "Generated tokens",
            self.completion_tokens.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From a request's arrival (queueing included) to its first generated token",
            self.ttft.clone(),
        );
        r.register(
            "time_per_output_token_seconds",
            "Decode time per generated token after the first, one observation per request",
            self.per_token.clone(),
        );
        r.register(
            "draft_tokens_proposed",
            "Draft tokens checked by the verify model",
            self.draft_proposed.clone(),
        );
        r.register(
            "draft_tokens_accepted",
            "Draft tokens the verify model accepted",
            self.draft_accepted.clone(),
        );
        r.register(
            "rollbacks",
            "Draft rollbacks after a rejection",
            self.rollbacks.clone(),
        );
        r.register(
            "worker_restarts",
            "Worker processes restarted after a crash or hang",
            self.worker_restarts.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for the decode thread",
            self.queue_depth.clone(),
        );
        self
    }

    pub fn count_request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_every_series() {
        let m = Metrics::new();
        m.count_request("/v1/completions", 429);
        m.completion_tokens.inc_by(5);
        m.ttft.observe(0.2);
        let text = m.encode();
        for needle in [
            r#"amusd_http_requests_total{endpoint="/v1/completions",status="429"} 1"#,
            "amusd_completion_tokens_total 5",
            "amusd_time_to_first_token_seconds_count 1",
            "amusd_draft_tokens_accepted_total 0",
            "amusd_worker_restarts_total 0",
            "amusd_queue_depth 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
