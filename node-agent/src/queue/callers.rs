//! A queued caller's attributes from the caller-number lists kept in the control plane
//! (issue 16: VIP callers by number; `docs/queued-calls.md`), to be merged with the
//! attributes the carrier's `X-Callfleet-Attributes` header gave before the call joins the
//! waiting order.
//!
//! Every queued call asks once, before it joins, so the lookup must never hold a caller up
//! for long, whatever the control plane does:
//!
//! The settings are `node.queue`'s `callers_*` keys ([`Settings::from_config`]).
//!
//! - **Fresh** (at most `fresh` old, 5 s by default): a number looked up lately is answered
//!   from the cache without a request. A CRM's change to a list reaches the next call of
//!   that number after at most `fresh`.
//! - **Older or unknown:** the control plane is asked, within `deadline` (200 ms by
//!   default), with the node's `provisioning.token` (role `node`).
//! - **No answer** (refused connection, deadline, 5xx, a refused token): the cached answer
//!   is served while it is at most `stale_max` old ([`Outcome::Stale`]); otherwise the
//!   caller goes on with no list attributes ([`Outcome::Unavailable`], logged for each such
//!   call). For `retry_after` after a failure nobody asks at all, so during an outage a call
//!   waits for no deadline, and the control plane gets no storm when it comes back. The
//!   outage is logged once when it starts and once when it ends.
//! - **Not a number** a list can hold (`anonymous`, an empty caller id, letters): nobody is
//!   asked ([`Outcome::NotANumber`]). Numbers are normalised here as the control plane does
//!   ([`callfleet_core::store::directory::normalize_caller_number`]), so `+49 30 123` and
//!   `+4930123` share one cache entry.
//!
//! A number no list names is an answer like any other (no attributes), cached as such, so
//! ordinary callers cost one request per `fresh` too. The cache holds at most `cached`
//! numbers; the least recently asked goes first. Two calls of one number at the same moment
//! each ask (no single flight): a caller calls once at a time.
//!
//! ```text
//! queue-call flow ─lookup(number)─▶ CallerDirectory ─GET /api/v1/callers/{number}─▶ control plane
//!                                   (cache, quiet period)   Authorization: Bearer <provisioning.token> (role node)
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use callfleet_core::config::{Config, QueueConfig};
use callfleet_core::store::directory::normalize_caller_number;
use serde::Deserialize;
use tokio::time::Instant;

use super::cache::{error_text, evict_least_recent, unusable};
use crate::provisioning::ProvisioningError;
use crate::provisioning::upstream::Upstream;

/// How the directory caches and asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// An answer this young is used without asking.
    pub fresh: Duration,
    /// How long one request may take: the most a lookup ever delays a call.
    pub deadline: Duration,
    /// The oldest answer used while the control plane cannot answer.
    pub stale_max: Duration,
    /// After a failure, how long the cache answers alone, without asking.
    pub retry_after: Duration,
    /// Numbers kept at most.
    pub cached: usize,
}

impl Settings {
    /// The settings of `node.queue` (`callers_fresh`, `callers_deadline`,
    /// `callers_stale_max`, `callers_retry_after`, `callers_cached`).
    pub fn from_config(config: &QueueConfig) -> Self {
        Self {
            fresh: config.callers_fresh,
            deadline: config.callers_deadline,
            stale_max: config.callers_stale_max,
            retry_after: config.callers_retry_after,
            cached: config.callers_cached.max(1),
        }
    }
}

impl Default for Settings {
    /// The defaults of `node.queue`: 5 s fresh, a 200 ms deadline, answers used up to
    /// 10 min through an outage, 2 s without asking after a failure, 10,000 numbers.
    fn default() -> Self {
        Self::from_config(&QueueConfig::default())
    }
}

/// Where a lookup's attributes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A cached answer at most `fresh` old; no request.
    Fresh,
    /// The control plane answered this lookup.
    Answered,
    /// The control plane could not answer; this cached answer, older than `fresh` but at
    /// most `stale_max`, was used.
    Stale {
        /// How long ago the control plane gave it.
        age: Duration,
        /// Why there was no new answer.
        reason: String,
    },
    /// The control plane could not answer and nothing young enough was cached: no list
    /// attributes.
    Unavailable {
        /// Why there was no answer.
        reason: String,
    },
    /// The control plane refused the number (400): no list attributes. The node checks
    /// numbers with the control plane's own rule first, so this means the two disagree.
    Refused {
        /// The control plane's words.
        message: String,
    },
    /// The caller id is not a number a list can hold: nobody was asked.
    NotANumber,
}

/// A caller number's attributes as the lists say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerLookup {
    /// The number as normalised; `None` for [`Outcome::NotANumber`].
    pub number: Option<String>,
    /// Sorted, without copies; empty when no list names the number or no answer was had.
    pub attributes: Arc<[String]>,
    /// Where they come from.
    pub outcome: Outcome,
}

impl CallerLookup {
    /// `header` (the attributes the carrier's header gave, in their order) followed by
    /// the listed attributes it lacks.
    pub fn merged_with(&self, header: &[String]) -> Vec<String> {
        let mut merged = header.to_vec();
        for attribute in self.attributes.iter() {
            if !merged.contains(attribute) {
                merged.push(attribute.clone());
            }
        }
        merged
    }
}

/// What the directory has done since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests sent to the control plane.
    pub requests: u64,
    /// Lookups answered from a fresh cached answer.
    pub fresh: u64,
    /// Lookups answered with a stale answer because the control plane could not answer.
    pub stale: u64,
    /// Lookups that went on without list attributes because there was no answer to use.
    pub unavailable: u64,
    /// Requests that got no usable answer (transport, deadline, 5xx, refused token).
    pub failures: u64,
    /// Numbers in the cache now.
    pub cached: u64,
}

/// The caller directory of a node-agent; cheap to clone, all clones share one cache.
#[derive(Clone)]
pub struct CallerDirectory {
    inner: Arc<Inner>,
}

impl fmt::Debug for CallerDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerDirectory")
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
    unavailable: AtomicU64,
    failures: AtomicU64,
    /// Whether the last request was answered, so an outage is logged once each way.
    reachable: AtomicBool,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<String, Entry>,
    /// No request before this (the quiet period after a failure).
    quiet_until: Option<Instant>,
    /// Counts lookups, to find the least recently asked entry.
    clock: u64,
}

struct Entry {
    attributes: Arc<[String]>,
    at: Instant,
    /// [`Cache::clock`] at the last lookup.
    used: u64,
}

/// The body of the control plane's answer.
#[derive(Deserialize)]
struct Body {
    attributes: Vec<String>,
}

impl CallerDirectory {
    /// A directory asking the control plane at `control_plane` (`http://host:port`) with
    /// `token` (role `node`), through the same HTTP client as realtime provisioning.
    pub fn new(
        control_plane: &str,
        token: &str,
        settings: Settings,
    ) -> Result<Self, ProvisioningError> {
        let upstream = Upstream::new(control_plane, token, settings.deadline)?;
        let settings = Settings {
            cached: settings.cached.max(1),
            ..settings
        };
        Ok(Self {
            inner: Arc::new(Inner {
                upstream,
                settings,
                cache: Mutex::new(Cache::default()),
                requests: AtomicU64::new(0),
                fresh: AtomicU64::new(0),
                stale: AtomicU64::new(0),
                unavailable: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                reachable: AtomicBool::new(true),
            }),
        })
    }

    /// The directory of this node: the control plane and token of `provisioning`, the
    /// settings of `node.queue` (`callers_*`).
    pub fn from_config(config: &Config) -> Result<Self, ProvisioningError> {
        Self::new(
            &config.provisioning.control_plane_url(&config.control_plane),
            config.provisioning.token.expose(),
            Settings::from_config(&config.node.queue),
        )
    }

    /// What the directory has done so far.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let cached = inner.cache.lock().expect("cache lock").entries.len();
        Stats {
            requests: inner.requests.load(Ordering::Relaxed),
            fresh: inner.fresh.load(Ordering::Relaxed),
            stale: inner.stale.load(Ordering::Relaxed),
            unavailable: inner.unavailable.load(Ordering::Relaxed),
            failures: inner.failures.load(Ordering::Relaxed),
            cached: u64::try_from(cached).unwrap_or(u64::MAX),
        }
    }

    /// The attributes the lists give the caller `number` (the caller id as Asterisk has it),
    /// within the deadline at most; never an error: without an answer the caller has no
    /// list attributes ([`CallerLookup::outcome`] says why).
    pub async fn lookup(&self, number: &str) -> CallerLookup {
        let Ok(number) = normalize_caller_number(number) else {
            return CallerLookup {
                number: None,
                attributes: Arc::from([]),
                outcome: Outcome::NotANumber,
            };
        };
        let settings = &self.inner.settings;
        let cached = {
            let now = Instant::now();
            let mut cache = self.inner.cache.lock().expect("cache lock");
            cache.clock += 1;
            let clock = cache.clock;
            let cached = cache.entries.get_mut(&number).map(|entry| {
                entry.used = clock;
                (entry.attributes.clone(), entry.at)
            });
            if let Some((attributes, at)) = &cached
                && now.duration_since(*at) <= settings.fresh
            {
                self.inner.fresh.fetch_add(1, Ordering::Relaxed);
                return CallerLookup {
                    number: Some(number),
                    attributes: attributes.clone(),
                    outcome: Outcome::Fresh,
                };
            }
            if let Some(until) = cache.quiet_until
                && now < until
            {
                drop(cache);
                let reason = format!("a request failed less than {:?} ago", settings.retry_after);
                return self.fallback(number, reason, cached);
            }
            cached
        };
        match self.inner.fetch(&number).await {
            Fetched::Answered(attributes) => CallerLookup {
                number: Some(number),
                attributes,
                outcome: Outcome::Answered,
            },
            Fetched::Refused(message) => {
                tracing::warn!(%number, %message, "control plane refuses the caller number; the call goes on without list attributes");
                CallerLookup {
                    number: Some(number),
                    attributes: Arc::from([]),
                    outcome: Outcome::Refused { message },
                }
            }
            Fetched::Failed(reason) => self.fallback(number, reason, cached),
        }
    }

    /// `cached` if it is young enough to use without the control plane, else no attributes.
    fn fallback(
        &self,
        number: String,
        reason: String,
        cached: Option<(Arc<[String]>, Instant)>,
    ) -> CallerLookup {
        match cached {
            Some((attributes, at)) if at.elapsed() <= self.inner.settings.stale_max => {
                self.inner.stale.fetch_add(1, Ordering::Relaxed);
                CallerLookup {
                    number: Some(number),
                    attributes,
                    outcome: Outcome::Stale {
                        age: at.elapsed(),
                        reason,
                    },
                }
            }
            _ => {
                self.inner.unavailable.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%number, %reason, "caller attributes unknown: the call goes on without list attributes");
                CallerLookup {
                    number: Some(number),
                    attributes: Arc::from([]),
                    outcome: Outcome::Unavailable { reason },
                }
            }
        }
    }
}

/// How a request ended.
enum Fetched {
    Answered(Arc<[String]>),
    Refused(String),
    Failed(String),
}

impl Inner {
    /// Asks the control plane for `number` and records the answer (or the failure) in the
    /// cache.
    async fn fetch(&self, number: &str) -> Fetched {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let deadline_at = Instant::now() + self.settings.deadline;
        let path = format!("/api/v1/callers/{}", number.replace('+', "%2B"));
        let fetched = match self.upstream.get(&path, deadline_at).await {
            Ok((StatusCode::OK, body)) => match serde_json::from_slice::<Body>(&body) {
                Ok(mut body) => {
                    body.attributes.sort_unstable();
                    body.attributes.dedup();
                    Fetched::Answered(body.attributes.into())
                }
                Err(err) => Fetched::Failed(format!("answer not understood: {err}")),
            },
            Ok((StatusCode::BAD_REQUEST, body)) => Fetched::Refused(error_text(&body)),
            Ok((status, body)) => Fetched::Failed(unusable(status, &body)),
            Err(failure) => Fetched::Failed(failure.to_string()),
        };
        let mut cache = self.cache.lock().expect("cache lock");
        match &fetched {
            Fetched::Failed(reason) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                cache.quiet_until = Some(Instant::now() + self.settings.retry_after);
                if self.reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %reason,
                        retry_after = ?self.settings.retry_after,
                        "control plane gives no caller attributes; callers go on with cached or no list attributes"
                    );
                }
            }
            answered => {
                cache.quiet_until = None;
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!("control plane answers caller attributes again");
                }
                if let Fetched::Answered(attributes) = answered {
                    if !cache.entries.contains_key(number)
                        && cache.entries.len() >= self.settings.cached
                    {
                        cache.evict_one();
                    }
                    cache.clock += 1;
                    let used = cache.clock;
                    cache.entries.insert(
                        number.to_owned(),
                        Entry {
                            attributes: attributes.clone(),
                            at: Instant::now(),
                            used,
                        },
                    );
                }
            }
        }
        fetched
    }
}

impl Cache {
    /// Drops the least recently asked entry.
    fn evict_one(&mut self) {
        evict_least_recent(&mut self.entries, |entry| entry.used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(attributes: &[&str]) -> CallerLookup {
        CallerLookup {
            number: Some("+4930123".into()),
            attributes: attributes.iter().map(|a| (*a).to_owned()).collect(),
            outcome: Outcome::Answered,
        }
    }

    #[test]
    fn merged_attributes_keep_the_header_s_first_and_add_the_list_s_once() {
        let header = vec!["fr".to_owned(), "vip".to_owned()];
        assert_eq!(
            lookup(&["gold", "vip"]).merged_with(&header),
            ["fr", "vip", "gold"]
        );
        assert_eq!(lookup(&[]).merged_with(&header), ["fr", "vip"]);
        assert_eq!(lookup(&["vip"]).merged_with(&[]), ["vip"]);
    }

    #[test]
    fn the_least_recently_asked_number_is_evicted() {
        let mut cache = Cache::default();
        for (number, used) in [("1", 3), ("2", 1), ("3", 2)] {
            cache.entries.insert(
                number.to_owned(),
                Entry {
                    attributes: Arc::from([]),
                    at: Instant::now(),
                    used,
                },
            );
        }
        cache.evict_one();
        let mut left: Vec<&str> = cache.entries.keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["1", "3"]);
    }
}
