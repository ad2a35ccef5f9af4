//! Driving a real `amusd serve` process: start it on a free port, talk HTTP to it, stop it with
//! SIGTERM and check it cleaned up.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amusd_e2e::{amusd, shm_entries_of, wait_until, workers_of};
use serde_json::Value;

/// A running server.
pub struct Served {
    child: Option<Child>,
    pub pid: u32,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    stderr: Arc<Mutex<String>>,
    agent: ureq::Agent,
}

/// Starts `amusd serve --port 0 ARGS...` and waits until `/health` says 200.
pub fn start(args: &[&str], ready_timeout: Duration) -> Served {
    let mut child = amusd()
        .args(["serve", "--port", "0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start amusd serve");
    let pid = child.id();
    let stderr = Arc::new(Mutex::new(String::new()));
    let (lines_tx, lines) = mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    let log = stderr.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            log.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = lines_tx.send(line);
        }
    });
    let mut served = Served {
        child: Some(child),
        pid,
        base: String::new(),
        stderr,
        agent: ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(120))
            .build(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while served.base.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("amusd serve printed no address: {}", served.log()));
        if let Some(i) = line.find("http://") {
            let rest = &line[i..];
            served.base = rest.split_whitespace().next().unwrap().to_string();
        }
    }
    wait_until("/health to say 200", ready_timeout, || {
        served.get("/health").0 == 200
    });
    served
}

impl Served {
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// GET: status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        match self.agent.get(&format!("{}{path}", self.base)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// POST a JSON body: status, headers of interest, the body parsed as JSON.
    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, &body.to_string())
    }

    pub fn post_raw(&self, path: &str, body: &str) -> Reply {
        self.post_with(path, body, &[])
    }

    /// POST with extra request headers.
    pub fn post_with(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self
            .agent
            .post(&format!("{}{path}", self.base))
            .set("Content-Type", "application/json");
        for (name, value) in headers {
            req = req.set(name, value);
        }
        let resp = match req.send_string(body) {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("POST {path} failed: {e}\n{}", self.log()),
        };
        let status = resp.status();
        let retry_after = resp.header("retry-after").map(String::from);
        let text = resp.into_string().unwrap();
        let json =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text:?}"));
        Reply {
            status,
            retry_after,
            json,
        }
    }

    /// POST a streamed request; read its events one by one.
    pub fn stream(&self, path: &str, body: &Value) -> Sse {
        let resp = self
            .agent
            .post(&format!("{}{path}", self.base))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap_or_else(|e| panic!("POST {path} failed: {e}\n{}", self.log()));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
        Sse(BufReader::new(resp.into_reader()))
    }

    /// The value of a metric line starting with `prefix` (0 if absent).
    pub fn metric(&self, prefix: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The server's shared-memory region.
    pub fn region(&self) -> String {
        let r = shm_entries_of(self.pid);
        assert_eq!(r.len(), 1, "expected one region of pid {}: {r:?}", self.pid);
        r[0].clone()
    }

    /// SIGTERM; the server must exit 0 within `timeout`, its region and workers gone. Returns its
    /// log.
    pub fn terminate(mut self, timeout: Duration) -> String {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill() on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "amusd serve ignored SIGTERM for {timeout:?}: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let log = self.log();
        assert_eq!(
            status.code(),
            Some(0),
            "amusd serve exit: {status:?}\n{log}"
        );
        assert!(
            shm_entries_of(self.pid).is_empty(),
            "region left behind:\n{log}"
        );
        wait_until("the workers to exit", Duration::from_secs(10), || {
            workers_of(self.pid).is_empty()
        });
        log
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub json: Value,
}

/// A server-sent event stream.
pub struct Sse(BufReader<Box<dyn Read + Send + Sync>>);

impl Sse {
    /// The next `data:` payload; None at the end of the stream.
    pub fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.0.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
    }

    /// The text pieces of the remaining chunks (chat deltas or completion texts) up to `[DONE]`,
    /// and the finish reason. Panics on an error event or a stream without `[DONE]`.
    pub fn rest(&mut self) -> (String, Option<String>) {
        let mut text = String::new();
        let mut finish = None;
        while let Some(d) = self.next_data() {
            if d == "[DONE]" {
                return (text, finish);
            }
            let v: Value = serde_json::from_str(&d).unwrap();
            assert!(v.get("error").is_none(), "error event: {v}");
            text.push_str(&chunk_text(&v));
            if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
        panic!("the stream ended without [DONE]");
    }

    /// llama.cpp's own stream (`/completion`): the `content` of every event up to the one with
    /// `stop`, which must be the last.
    pub fn llama_rest(&mut self) -> String {
        let mut text = String::new();
        while let Some(d) = self.next_data() {
            let v: Value = serde_json::from_str(&d).unwrap();
            assert!(v.get("error").is_none(), "error event: {v}");
            text.push_str(v["content"].as_str().unwrap_or_default());
            if v["stop"] == true {
                assert!(
                    self.next_data().is_none(),
                    "an event after the one with stop"
                );
                return text;
            }
        }
        panic!("the stream ended without an event with stop");
    }
}

/// The text a chunk carries.
pub fn chunk_text(v: &Value) -> String {
    let c = &v["choices"][0];
    c["delta"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The text of a whole (non-streamed) response.
pub fn reply_text(v: &Value) -> String {
    let c = &v["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}
