//! A queued call's candidates: the agents to ring, best first, as the control plane's routing
//! query ranks them for a queue and the caller's attributes (step 3 of
//! `docs/queued-calls.md`).
//!
//! Every ring asks, so the answer is cached per (queue, sorted distinct attributes):
//!
//! - **Fresh** (at most `fresh` old, 1 s by default): served without a request. A CRM's
//!   change (priority, pause, cap, tags) must take effect on the next ring, so this is short;
//!   it only spares the control plane the rings of one busy second.
//! - **Older:** the control plane is asked, within `deadline`. Askers of the same key at the
//!   same time share that one request (single flight), so a thousand waiting callers of one
//!   queue cost one request when an agent frees up.
//! - **No answer** (refused connection, deadline, 5xx, a refused token): the cached answer
//!   is served while it is at most `stale_max` old, marked [`Candidates::stale`], so a
//!   control-plane outage keeps calls flowing on the last answer. For `retry_after` after a
//!   failure nobody asks at all (the cache answers alone), so an outage costs no ring a
//!   deadline and the control plane no storm when it comes back.
//! - **404** (no such queue) and **400** (attributes it refuses) are answers, not outages:
//!   a clear error, and a queue that is gone loses its cached answer rather than ringing on
//!   it for `stale_max`.
//!
//! - **Ahead:** the answer also lists the agents whose wrap-up ends within twice `fresh`,
//!   each with its `free_at_ms`, so an agent is rung as its wrap-up ends rather than up to
//!   `fresh` later, when a new answer would first show it free. The control plane must
//!   know `within_ms` (upgrade it before the node-agents).
//!
//! The cache holds at most `cached` answers; the least recently asked goes first.
//!
//! ```text
//! queue-call flow ─candidates(queue, attributes)─▶ CandidatesSource ─GET /api/v1/queues/{queue}/candidates?within_ms=2000&attributes=a,b─▶ control plane
//!                                                  (cache, single flight, quiet period)   Authorization: Bearer <provisioning.token> (role node)
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use callfleet_core::config::{Config, QueueConfig};
use serde::Deserialize;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::cache::{error_text, evict_least_recent, unusable};
use crate::provisioning::ProvisioningError;
use crate::provisioning::upstream::Upstream;

/// An agent to ring, as the control plane answers it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Candidate {
    /// The agent's personal extension.
    pub agent: String,
    /// The SIP endpoint to ring (the agent's current device).
    pub endpoint: String,
    /// The membership's priority (lower rings first).
    pub priority: i32,
    /// Past the daily cap: ranked after everyone else.
    pub demoted: bool,
    /// When the agent's wrap-up ends (Unix epoch, ms): listed ahead of being free, so a
    /// cached answer lets the agent ring as the wrap-up ends, not at the next answer.
    /// Absent for an agent free now.
    #[serde(default)]
    pub free_at_ms: Option<u64>,
}

impl Candidate {
    /// Whether the agent may be rung at `now_ms` (Unix epoch, ms).
    pub fn free_at(&self, now_ms: u64) -> bool {
        self.free_at_ms.is_none_or(|free_at| free_at <= now_ms)
    }
}

/// The candidates for one queue and attribute set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    /// Best first, in the control plane's order; empty when nobody can take the call now.
    pub list: Arc<[Candidate]>,
    /// Served from the cache because the control plane could not answer: changes made
    /// since [`Candidates::age`] ago are missing.
    pub stale: bool,
    /// How long ago the control plane gave this answer.
    pub age: Duration,
}

/// Why there are no candidates to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CandidatesError {
    /// The control plane knows no such queue (404); nothing cached is served for it.
    #[error("no queue `{queue}`: {message}")]
    UnknownQueue {
        /// The queue asked for.
        queue: String,
        /// The control plane's words.
        message: String,
    },
    /// The question cannot be asked: the control plane refused it (400), or it cannot be
    /// written (an empty queue, an attribute with a comma).
    #[error("candidates of queue `{queue}` cannot be asked: {message}")]
    Invalid {
        /// The queue asked for.
        queue: String,
        /// What is wrong.
        message: String,
    },
    /// The control plane cannot answer and no answer young enough is cached.
    #[error(
        "no candidates for queue `{queue}`: the control plane cannot answer ({reason}) and no answer younger than {stale_max:?} is cached"
    )]
    Unavailable {
        /// The queue asked for.
        queue: String,
        /// Why the control plane gave no answer.
        reason: String,
        /// The oldest answer that would have been served.
        stale_max: Duration,
    },
}

/// How the source caches and asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// An answer this young is served without asking.
    pub fresh: Duration,
    /// How long one request may take.
    pub deadline: Duration,
    /// The oldest answer served while the control plane cannot answer.
    pub stale_max: Duration,
    /// After a failure, how long the cache answers without asking.
    pub retry_after: Duration,
    /// Answers kept at most.
    pub cached: usize,
}

impl Settings {
    /// How far ahead the answer lists agents whose wrap-up is ending: as long as an answer
    /// is served fresh, and once more for the time until the next ask.
    fn ahead(&self) -> Duration {
        (self.fresh * 2).min(Duration::from_secs(60))
    }

    /// The settings of `node.queue`.
    pub fn from_config(config: &QueueConfig) -> Self {
        Self {
            fresh: config.candidates_fresh,
            deadline: config.candidates_deadline,
            stale_max: config.candidates_stale_max,
            retry_after: config.candidates_retry_after,
            cached: config.candidates_cached.max(1),
        }
    }
}

/// What the source has done since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests sent to the control plane.
    pub requests: u64,
    /// Asks answered from a fresh cached answer, without a request.
    pub fresh: u64,
    /// Asks answered with a stale answer because the control plane could not answer.
    pub stale: u64,
    /// Requests that got no usable answer (transport, deadline, 5xx, refused token).
    pub failures: u64,
    /// Answers in the cache now.
    pub cached: u64,
}

/// The candidates source of a node-agent; cheap to clone, all clones share one cache.
#[derive(Clone)]
pub struct CandidatesSource {
    inner: Arc<Inner>,
}

impl fmt::Debug for CandidatesSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CandidatesSource")
            .field("upstream", &self.inner.upstream)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

struct Inner {
    upstream: Upstream,
    settings: Settings,
    cache: Mutex<Cache>,
    requests: AtomicU64,
    fresh: AtomicU64,
    stale: AtomicU64,
    failures: AtomicU64,
    /// Whether the last request was answered, so an outage is logged once each way.
    reachable: AtomicBool,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<Key, Entry>,
    /// No request before this (the quiet period after a failure).
    quiet_until: Option<Instant>,
    /// Counts asks, to find the least recently asked entry.
    clock: u64,
}

/// A queue and its caller's attributes, sorted and without copies: `vip,fr` and `fr,vip`
/// are one question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    queue: String,
    attributes: Vec<String>,
}

#[derive(Default)]
struct Entry {
    answer: Option<Answer>,
    /// The request in progress for this key, shared by everyone who asks meanwhile.
    flight: Option<Arc<Flight>>,
    /// [`Cache::clock`] at the last ask.
    used: u64,
}

type Flight = OnceCell<Outcome>;

#[derive(Debug, Clone)]
struct Answer {
    list: Arc<[Candidate]>,
    at: Instant,
}

/// How a request ended, for everyone who waited on it.
#[derive(Debug, Clone)]
enum Outcome {
    Answered(Answer),
    NotFound(String),
    Invalid(String),
    /// No usable answer; `fallback` is what the cache held for the key then.
    Failed {
        reason: String,
        fallback: Option<Answer>,
    },
}

/// The body of the control plane's answer.
#[derive(Deserialize)]
struct Body {
    candidates: Vec<Candidate>,
}

impl CandidatesSource {
    /// A source asking the control plane at `control_plane` (`http://host:port`) with
    /// `token` (role `node`), through the same HTTP client as realtime provisioning.
    pub fn new(
        control_plane: &str,
        token: &str,
        settings: Settings,
    ) -> Result<Self, ProvisioningError> {
        let upstream = Upstream::new(control_plane, token, settings.deadline)?;
        Ok(Self {
            inner: Arc::new(Inner {
                upstream,
                settings,
                cache: Mutex::new(Cache::default()),
                requests: AtomicU64::new(0),
                fresh: AtomicU64::new(0),
                stale: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                reachable: AtomicBool::new(true),
            }),
        })
    }

    /// The source of this node: the control plane and token of `provisioning`, the
    /// settings of `node.queue`.
    pub fn from_config(config: &Config) -> Result<Self, ProvisioningError> {
        Self::new(
            &config.provisioning.control_plane_url(&config.control_plane),
            config.provisioning.token.expose(),
            Settings::from_config(&config.node.queue),
        )
    }

    /// What the source has done so far.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let cached = inner
            .cache
            .lock()
            .expect("cache lock")
            .entries
            .values()
            .filter(|entry| entry.answer.is_some())
            .count();
        Stats {
            requests: inner.requests.load(Ordering::Relaxed),
            fresh: inner.fresh.load(Ordering::Relaxed),
            stale: inner.stale.load(Ordering::Relaxed),
            failures: inner.failures.load(Ordering::Relaxed),
            cached: u64::try_from(cached).unwrap_or(u64::MAX),
        }
    }

    /// The candidates for a call in `queue` from a caller with `attributes` (order and
    /// copies do not matter), best first.
    pub async fn candidates<A: AsRef<str>>(
        &self,
        queue: &str,
        attributes: &[A],
    ) -> Result<Candidates, CandidatesError> {
        let key = Key::new(queue, attributes)?;
        let settings = &self.inner.settings;
        let flight = {
            let now = Instant::now();
            let mut cache = self.inner.cache.lock().expect("cache lock");
            cache.clock += 1;
            let clock = cache.clock;
            let cached = cache.entries.get_mut(&key).and_then(|entry| {
                entry.used = clock;
                entry.answer.clone()
            });
            if let Some(answer) = &cached
                && now.duration_since(answer.at) <= settings.fresh
            {
                self.inner.fresh.fetch_add(1, Ordering::Relaxed);
                return Ok(answer.serve(false));
            }
            if let Some(until) = cache.quiet_until
                && now < until
            {
                drop(cache);
                let reason = format!("a request failed less than {:?} ago", settings.retry_after);
                return self.fallback(&key, reason, cached);
            }
            if !cache.entries.contains_key(&key) && cache.entries.len() >= settings.cached {
                cache.evict_one();
            }
            let entry = cache.entries.entry(key.clone()).or_default();
            entry.used = clock;
            entry
                .flight
                .get_or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        // Whoever runs the request first runs it for everyone; if that asker goes away
        // mid-request, the next waiter runs it again.
        let outcome = flight
            .get_or_init(|| self.inner.fetch(&key, &flight))
            .await
            .clone();
        match outcome {
            Outcome::Answered(answer) => Ok(answer.serve(false)),
            Outcome::NotFound(message) => Err(CandidatesError::UnknownQueue {
                queue: key.queue,
                message,
            }),
            Outcome::Invalid(message) => Err(CandidatesError::Invalid {
                queue: key.queue,
                message,
            }),
            Outcome::Failed { reason, fallback } => self.fallback(&key, reason, fallback),
        }
    }

    /// `cached` if it is young enough to serve without the control plane.
    fn fallback(
        &self,
        key: &Key,
        reason: String,
        cached: Option<Answer>,
    ) -> Result<Candidates, CandidatesError> {
        let stale_max = self.inner.settings.stale_max;
        match cached {
            Some(answer) if answer.at.elapsed() <= stale_max => {
                self.inner.stale.fetch_add(1, Ordering::Relaxed);
                Ok(answer.serve(true))
            }
            _ => Err(CandidatesError::Unavailable {
                queue: key.queue.clone(),
                reason,
                stale_max,
            }),
        }
    }
}

impl Inner {
    /// Asks the control plane for `key` and records the outcome in the cache (when
    /// `flight` is still the key's request).
    async fn fetch(&self, key: &Key, flight: &Arc<Flight>) -> Outcome {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let deadline_at = Instant::now() + self.settings.deadline;
        let answered = self
            .upstream
            .get(&key.path(self.settings.ahead()), deadline_at)
            .await;
        let outcome = match answered {
            Ok((StatusCode::OK, body)) => match serde_json::from_slice::<Body>(&body) {
                Ok(body) => Outcome::Answered(Answer {
                    list: body.candidates.into(),
                    at: Instant::now(),
                }),
                Err(err) => failed(format!("answer not understood: {err}")),
            },
            Ok((StatusCode::NOT_FOUND, body)) => Outcome::NotFound(error_text(&body)),
            Ok((StatusCode::BAD_REQUEST, body)) => Outcome::Invalid(error_text(&body)),
            Ok((status, body)) => failed(unusable(status, &body)),
            Err(failure) => failed(failure.to_string()),
        };
        let mut cache = self.cache.lock().expect("cache lock");
        let mut outcome = outcome;
        let ours = cache
            .entries
            .get(key)
            .and_then(|entry| entry.flight.as_ref())
            .is_some_and(|current| Arc::ptr_eq(current, flight));
        match &mut outcome {
            Outcome::Failed { reason, fallback } => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                cache.quiet_until = Some(Instant::now() + self.settings.retry_after);
                if self.reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        queue = %key.queue,
                        error = %reason,
                        retry_after = ?self.settings.retry_after,
                        "control plane gives no candidates; serving cached answers"
                    );
                }
                if let Some(entry) = cache.entries.get_mut(key) {
                    *fallback = entry.answer.clone();
                    if ours {
                        entry.flight = None;
                        if entry.answer.is_none() {
                            cache.entries.remove(key);
                        }
                    }
                }
            }
            answered => {
                cache.quiet_until = None;
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!(queue = %key.queue, "control plane answers candidates again");
                }
                if ours {
                    match answered {
                        Outcome::Answered(answer) => {
                            if let Some(entry) = cache.entries.get_mut(key) {
                                entry.answer = Some(answer.clone());
                                entry.flight = None;
                            }
                        }
                        // A queue that is gone (or a question refused) rings nobody from
                        // the cache.
                        _ => {
                            cache.entries.remove(key);
                        }
                    }
                }
            }
        }
        outcome
    }
}

fn failed(reason: String) -> Outcome {
    Outcome::Failed {
        reason,
        fallback: None,
    }
}

impl Answer {
    fn serve(&self, stale: bool) -> Candidates {
        Candidates {
            list: self.list.clone(),
            stale,
            age: self.at.elapsed(),
        }
    }
}

impl Cache {
    /// Drops the least recently asked entry. A request in progress for it still answers
    /// its waiters; its answer is just not kept.
    fn evict_one(&mut self) {
        evict_least_recent(&mut self.entries, |entry| entry.used);
    }
}

impl Key {
    fn new<A: AsRef<str>>(queue: &str, attributes: &[A]) -> Result<Self, CandidatesError> {
        let invalid = |message: String| CandidatesError::Invalid {
            queue: queue.to_owned(),
            message,
        };
        if queue.is_empty() {
            return Err(invalid("the queue name is empty".to_owned()));
        }
        let mut sorted: Vec<String> = attributes
            .iter()
            .map(|a| a.as_ref().trim())
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect();
        // The control plane reads the attributes as one comma-separated list.
        if let Some(bad) = sorted.iter().find(|a| a.contains(',')) {
            return Err(invalid(format!("attribute `{bad}` has a comma")));
        }
        sorted.sort_unstable();
        sorted.dedup();
        Ok(Self {
            queue: queue.to_owned(),
            attributes: sorted,
        })
    }

    /// `/api/v1/queues/{queue}/candidates?within_ms=…&attributes=a,b`, percent-encoded.
    fn path(&self, ahead: Duration) -> String {
        let mut path = format!(
            "/api/v1/queues/{}/candidates?within_ms={}",
            encode(&self.queue),
            ahead.as_millis()
        );
        if !self.attributes.is_empty() {
            let attributes: Vec<String> = self.attributes.iter().map(|a| encode(a)).collect();
            path.push_str("&attributes=");
            path.push_str(&attributes.join(","));
        }
        path
    }
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_the_queue_and_its_sorted_distinct_attributes() {
        let a = Key::new("sales", &["vip", " fr ", "vip", ""]).expect("key");
        let b = Key::new("sales", &["fr", "vip"]).expect("key");
        assert_eq!(a, b);
        assert_eq!(a.attributes, ["fr", "vip"]);
        let ahead = Duration::from_secs(2);
        assert_eq!(
            a.path(ahead),
            "/api/v1/queues/sales/candidates?within_ms=2000&attributes=fr,vip"
        );
        let none = Key::new::<&str>("sales", &[]).expect("key");
        assert_eq!(
            none.path(ahead),
            "/api/v1/queues/sales/candidates?within_ms=2000"
        );
    }

    #[test]
    fn names_are_percent_encoded_and_commas_refused() {
        let key = Key::new("sales team/é", &["a&b=c"]).expect("key");
        assert_eq!(
            key.path(Duration::ZERO),
            "/api/v1/queues/sales%20team%2F%C3%A9/candidates?within_ms=0&attributes=a%26b%3Dc"
        );
        assert!(matches!(
            Key::new("sales", &["vip,fr"]),
            Err(CandidatesError::Invalid { .. })
        ));
        assert!(matches!(
            Key::new::<&str>("", &[]),
            Err(CandidatesError::Invalid { .. })
        ));
    }

    #[test]
    fn the_least_recently_asked_entry_is_evicted() {
        let mut cache = Cache::default();
        for (queue, used) in [("a", 3), ("b", 1), ("c", 2)] {
            cache.entries.insert(
                Key::new::<&str>(queue, &[]).expect("key"),
                Entry {
                    used,
                    ..Entry::default()
                },
            );
        }
        cache.evict_one();
        let mut left: Vec<&str> = cache.entries.keys().map(|k| k.queue.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["a", "c"]);
    }
}
