//! The routing query: which agents a queued call may ring, in which order, and the public
//! status of a queue. Both are pure functions over an in-memory [`Snapshot`].
//!
//! # Why a snapshot
//!
//! A queued call asks for its candidates while the caller hears ringing, so the answer must
//! never wait on the store (habit 6 of STYLE.md). A refresh task reads agents, devices,
//! hot-desk sessions, queues and memberships, and builds a [`Snapshot`] once; queries then
//! only read it. The snapshot resolves every reference once, at build time: agents live in
//! one vector sorted by id (so an agent's index is also its rank in the id tie-break),
//! queues hold vectors of `(agent index, priority)`, an agent's logged-in device is an
//! index, and tags are interned to small integers. A query then walks one queue's members,
//! sorts one packed integer per candidate, and returns candidates that borrow their strings
//! from the snapshot: a query allocates a few vectors whatever the queue's size, and nothing
//! per agent.
//!
//! # Who is a candidate
//!
//! An agent is a candidate for a queue when it is all of:
//! - a **member** of the queue (a repeated membership counts once, with its best priority);
//! - **enabled**;
//! - **logged in**: it has a hot-desk session on a device, whose SIP endpoint the candidate
//!   carries so the PBX can ring it (an agent logged in twice uses its last session);
//! - **available**: not paused, not on a call, not in wrap-up. Wrap-up lasts until a given
//!   time; from that time on the agent is available again without anyone having to say so,
//!   because a lost "wrap-up ended" event must not keep an agent out of every queue.
//!
//! # In which order
//!
//! Candidates are sorted by `(demoted, priority, idle since, agent id)`:
//! - **demoted** agents come after every other: an agent with a daily cap whose sales of
//!   the day reached it (sales ≥ cap; no cap means never; a cap of 0 makes an agent the
//!   last resort all day). The CRM gives top sellers a better priority, and the cap hands
//!   the remaining calls to their colleagues once they have sold enough. Demoted agents keep
//!   their relative order, so they still ring rather than leave a caller waiting.
//! - **priority** of the membership: a lower number rings first (as Asterisk's penalty).
//! - **idle since**: the agent idle for the longest time first, for fairness. Wrap-up is work,
//!   not rest: an agent whose wrap-up has ended counts as idle from the end of the wrap-up.
//! - **agent id**, so that equal agents always come in the same order (tests, replays, and
//!   several balancers asking at once agree).
//!
//! Sales counters carry the [`Day`] they belong to, and the query takes `today` (computed by
//! the caller in the configured time zone): a counter of another day counts as zero, so
//! yesterday's sales never demote anyone today, even before a job resets the counters.
//!
//! # Caller attributes
//!
//! Each caller attribute (e.g. `vip`) is served by the agents tagged with the same name. A
//! caller with attributes goes only to the candidates that serve **all** of them, in the
//! order above; when no such agent is a candidate right now, the call falls back to every
//! candidate (the best online agent), because an unanswered VIP is worse than a VIP answered
//! by a colleague. There is no partial matching: attributes carry no weight relative to each
//! other, so "serves `vip` but not `es`" cannot be ranked against "serves `es` but not `vip`";
//! a CRM that prefers one sends that attribute only, or routes the call to its own queue.
//! A demoted agent that serves the caller still comes before the fallback: the attribute
//! decides who may take the call, the cap only the order among them.
//!
//! # Queue status
//!
//! [`Snapshot::queue_status`] answers the public, read-only status of a queue (a website shows
//! the phone number only while the queue is served): the members logged in whatever their
//! state, and the candidates ignoring caller attributes; the queue is served while at least
//! one agent is available.

use std::collections::HashMap;

use serde::Serialize;

/// A calendar day in the call center's configured time zone, as days since 1970-01-01.
///
/// The caller computes today's date in its time zone; the routing query only compares days,
/// so no date/time library is needed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Day(pub u32);

impl Day {
    /// Returns the day of a Gregorian calendar date, or `None` for an invalid date or one
    /// before 1970.
    pub fn from_ymd(year: u32, month: u32, day: u32) -> Option<Self> {
        let leap =
            year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
        let days_in_month = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        if year < 1970 || day == 0 || day > days_in_month {
            return None;
        }
        // Days from civil (H. Hinnant): years start on 1 March so that the leap day is last.
        let (year, month, day) = (u64::from(year), u64::from(month), u64::from(day));
        let y = if month <= 2 { year - 1 } else { year };
        let era = y / 400;
        let year_of_era = y - era * 400;
        let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
        let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
        u32::try_from(era * 146_097 + day_of_era - 719_468)
            .ok()
            .map(Day)
    }
}

/// A counter that belongs to one day, such as an agent's sales: on any other day it reads
/// as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DailyCount {
    /// The day the count was made on.
    pub day: Day,
    /// The count on that day.
    pub count: u32,
}

impl DailyCount {
    /// Returns the count if it belongs to `today`, zero otherwise.
    pub fn on(self, today: Day) -> u32 {
        if self.day == today { self.count } else { 0 }
    }
}

/// What an agent is doing, as far as ringing it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentState {
    /// Waiting for a call.
    #[default]
    Available,
    /// Paused by the agent or a supervisor.
    Paused,
    /// On a call.
    OnCall,
    /// Finishing the last call's work; available again from `until_ms` (Unix epoch, ms).
    WrapUp {
        /// When the wrap-up ends.
        until_ms: u64,
    },
}

/// An agent as the store knows it: the input of [`SnapshotBuilder::agent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// The agent's personal extension, unique among agents.
    pub id: String,
    /// False while an administrator has taken the agent out of every queue.
    pub enabled: bool,
    /// The caller attributes the agent serves (e.g. `vip`).
    pub tags: Vec<String>,
    /// What the agent is doing.
    pub state: AgentState,
    /// When the agent last became idle (Unix epoch, ms): the end of its last call or its login.
    pub idle_since_ms: u64,
    /// Sales after which the agent comes after everyone else for the rest of the day.
    pub daily_cap: Option<u32>,
    /// The agent's sales, with the day they were counted on.
    pub sales: DailyCount,
}

impl Agent {
    /// Returns an enabled, available agent with no tags, no cap and no sales, idle since the
    /// epoch.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            enabled: true,
            tags: Vec::new(),
            state: AgentState::Available,
            idle_since_ms: 0,
            daily_cap: None,
            sales: DailyCount::default(),
        }
    }
}

/// The attributes of a caller (e.g. `vip`) that decide which agents may take the call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallerAttributes {
    names: Vec<String>,
}

impl CallerAttributes {
    /// Returns the set of the given attribute names.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self {
            names: names.into_iter().map(Into::into).collect(),
        }
    }
}

/// An agent that may take a call now, with what the PBX needs to ring it. It borrows its
/// strings from the [`Snapshot`] it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The agent's personal extension.
    pub agent: &'a str,
    /// The SIP endpoint of the device the agent is logged in on.
    pub endpoint: &'a str,
    /// The priority of the agent's membership in the queue (lower rings first; may be
    /// negative).
    pub priority: i32,
    /// True when the agent reached its daily cap and so comes after everyone else.
    pub demoted: bool,
    /// Since when the agent is idle (Unix epoch, ms), counting from the end of a wrap-up.
    pub idle_since_ms: u64,
}

/// The public, read-only status of a queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueStatus {
    /// The queue's name.
    pub queue: String,
    /// True while at least one agent of the queue is available.
    pub served: bool,
    /// Members that could take a call now, whatever the caller's attributes.
    pub available_agents: usize,
    /// Members logged in on a device, whatever their state.
    pub logged_in_agents: usize,
}

/// An error of a routing query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    /// The queue does not exist (the API answers 404).
    #[error("unknown queue `{queue}`")]
    UnknownQueue {
        /// The name that was asked for.
        queue: String,
    },
}

/// Collects the rows a [`Snapshot`] is built from, in any order.
///
/// References are resolved by [`build`](Self::build), leniently: the rows come from several
/// tables read one after the other, and a row that names an agent, device or queue deleted
/// in between must not stop routing. So a session or membership naming an unknown agent or
/// device is ignored, and a membership creates its queue if needed. Ids are unique in the
/// store; should one repeat, the first agent or device with it is kept.
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    agents: Vec<Agent>,
    devices: Vec<(String, String)>,
    sessions: Vec<(String, String)>,
    queues: Vec<String>,
    members: Vec<(String, String, i32)>,
}

impl SnapshotBuilder {
    /// Adds an agent.
    pub fn agent(&mut self, agent: Agent) -> &mut Self {
        self.agents.push(agent);
        self
    }

    /// Adds a device (a phone) and the SIP endpoint that rings it (e.g. `PJSIP/desk-12`).
    pub fn device(&mut self, id: impl Into<String>, endpoint: impl Into<String>) -> &mut Self {
        self.devices.push((id.into(), endpoint.into()));
        self
    }

    /// Adds a hot-desk session: the agent is logged in on the device. A later session of the
    /// same agent replaces an earlier one.
    pub fn session(&mut self, agent: impl Into<String>, device: impl Into<String>) -> &mut Self {
        self.sessions.push((agent.into(), device.into()));
        self
    }

    /// Adds a queue, which exists even with no member.
    pub fn queue(&mut self, name: impl Into<String>) -> &mut Self {
        self.queues.push(name.into());
        self
    }

    /// Makes the agent a member of the queue with the given priority (lower rings first).
    pub fn member(
        &mut self,
        queue: impl Into<String>,
        agent: impl Into<String>,
        priority: i32,
    ) -> &mut Self {
        self.members.push((queue.into(), agent.into(), priority));
        self
    }

    /// Resolves every reference and returns the snapshot, leaving the builder empty.
    pub fn build(&mut self) -> Snapshot {
        let Self {
            mut agents,
            mut devices,
            sessions,
            queues: queue_names,
            members,
        } = std::mem::take(self);

        // Sorted by id, an agent's index is its rank in the final tie-break.
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        agents.dedup_by(|later, first| later.id == first.id);
        devices.sort_by(|a, b| a.0.cmp(&b.0));
        devices.dedup_by(|later, first| later.0 == first.0);
        let agent_index = |id: &str| agents.binary_search_by(|a| a.id.as_str().cmp(id)).ok();

        let mut device_of = vec![None; agents.len()];
        for (agent, device) in &sessions {
            if let (Some(a), Ok(d)) = (
                agent_index(agent),
                devices.binary_search_by(|(id, _)| id.as_str().cmp(device)),
            ) {
                device_of[a] = Some(d);
            }
        }

        let mut queues: HashMap<Box<str>, Vec<Member>> = queue_names
            .into_iter()
            .map(|name| (name.into_boxed_str(), Vec::new()))
            .collect();
        for (queue, agent, priority) in members {
            let list = queues.entry(queue.into_boxed_str()).or_default();
            if let Some(agent) = agent_index(&agent) {
                list.push(Member { agent, priority });
            }
        }
        for list in queues.values_mut() {
            // The best priority of a repeated membership wins; agent order also makes the
            // query read the agents vector front to back.
            list.sort_unstable_by_key(|m| (m.agent, m.priority));
            list.dedup_by_key(|m| m.agent);
            list.shrink_to_fit();
        }

        let mut tags: HashMap<Box<str>, usize> = HashMap::new();
        let agents = agents
            .into_iter()
            .zip(device_of)
            .map(|(agent, device)| {
                let mut tag_ids: Vec<usize> = agent
                    .tags
                    .into_iter()
                    .map(|tag| {
                        let next = tags.len();
                        *tags.entry(tag.into_boxed_str()).or_insert(next)
                    })
                    .collect();
                tag_ids.sort_unstable();
                tag_ids.dedup();
                AgentEntry {
                    id: agent.id.into_boxed_str(),
                    enabled: agent.enabled,
                    tags: tag_ids.into_boxed_slice(),
                    state: agent.state,
                    idle_since_ms: agent.idle_since_ms,
                    daily_cap: agent.daily_cap,
                    sales: agent.sales,
                    device,
                }
            })
            .collect::<Vec<AgentEntry>>();
        let readiness = queues
            .iter()
            .map(|(name, members)| (name.clone(), Readiness::of(members, &agents)))
            .collect();

        Snapshot {
            agents,
            endpoints: devices
                .into_iter()
                .map(|(_, endpoint)| endpoint.into_boxed_str())
                .collect(),
            queues,
            tags,
            readiness,
        }
    }
}

/// Everything the routing query needs, resolved into dense indices; see the module doc.
#[derive(Debug)]
pub struct Snapshot {
    /// Sorted by id.
    agents: Vec<AgentEntry>,
    /// The devices' SIP endpoints, by device index.
    endpoints: Vec<Box<str>>,
    /// Each queue's members, one per agent, sorted by agent index.
    queues: HashMap<Box<str>, Vec<Member>>,
    /// Tag name → the index agents carry.
    tags: HashMap<Box<str>, usize>,
    /// Each queue's members as its public status counts them.
    readiness: HashMap<Box<str>, Readiness>,
}

/// A queue's members as its public status counts them, made once per snapshot: the status
/// is asked far more often than the directory changes (a website's every visitor asks),
/// and counting every member per request was most of its cost. Within a snapshot, a
/// member only becomes ready with time (a wrap-up ends), never the other way, so the
/// sorted times they become ready answer "how many now" with a binary search.
#[derive(Debug, Default)]
struct Readiness {
    logged_in: usize,
    /// When each member that can become ready does so (0: ready already), sorted.
    ready_from: Box<[u64]>,
}

impl Readiness {
    fn of(members: &[Member], agents: &[AgentEntry]) -> Self {
        let mut ready_from: Vec<u64> = members
            .iter()
            .map(|member| &agents[member.agent])
            .filter(|agent| agent.enabled && agent.device.is_some())
            .filter_map(|agent| match agent.state {
                AgentState::Available => Some(0),
                AgentState::WrapUp { until_ms } => Some(until_ms),
                AgentState::Paused | AgentState::OnCall => None,
            })
            .collect();
        ready_from.sort_unstable();
        Self {
            logged_in: members
                .iter()
                .filter(|member| agents[member.agent].device.is_some())
                .count(),
            ready_from: ready_from.into_boxed_slice(),
        }
    }

    /// Members ready at `now_ms`, as [`AgentEntry::ready`] decides.
    fn available(&self, now_ms: u64) -> usize {
        self.ready_from.partition_point(|&from| from <= now_ms)
    }
}

#[derive(Debug, Clone, Copy)]
struct Member {
    agent: usize,
    priority: i32,
}

#[derive(Debug)]
struct AgentEntry {
    id: Box<str>,
    enabled: bool,
    /// Sorted tag indices.
    tags: Box<[usize]>,
    state: AgentState,
    idle_since_ms: u64,
    daily_cap: Option<u32>,
    sales: DailyCount,
    /// The device of the agent's hot-desk session, if logged in.
    device: Option<usize>,
}

impl AgentEntry {
    /// The agent's device and since when it is idle, if it may take a call at `now_ms`.
    fn ready(&self, now_ms: u64) -> Option<(usize, u64)> {
        if !self.enabled {
            return None;
        }
        let device = self.device?;
        let idle_since_ms = match self.state {
            AgentState::Available => self.idle_since_ms,
            AgentState::WrapUp { until_ms } if until_ms <= now_ms => {
                self.idle_since_ms.max(until_ms)
            }
            AgentState::Paused | AgentState::OnCall | AgentState::WrapUp { .. } => return None,
        };
        Some((device, idle_since_ms))
    }

    fn demoted(&self, today: Day) -> bool {
        self.daily_cap
            .is_some_and(|cap| self.sales.on(today) >= cap)
    }

    fn serves(&self, required: &[usize]) -> bool {
        required.iter().all(|tag| self.tags.contains(tag))
    }
}

/// A candidate's place in the order, packed into one integer so that the sort compares
/// integers only: demoted (1 bit), priority (32 bits), idle since (64 bits), then the
/// candidate's index in the list built in agent id order (31 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank(u128);

impl Rank {
    const INDEX_BITS: u32 = 31;

    fn new(candidate: &Candidate<'_>, index: usize) -> Self {
        // A queue of 2^31 members would not fit in memory anyway.
        debug_assert!(index < 1 << Self::INDEX_BITS);
        Self(
            (u128::from(candidate.demoted) << 127)
                // Flipping the sign bit orders i32 priorities as unsigned integers.
                | (u128::from(candidate.priority.cast_unsigned() ^ (1 << 31)) << 95)
                | (u128::from(candidate.idle_since_ms) << Self::INDEX_BITS)
                | index as u128,
        )
    }

    fn index(self) -> usize {
        // Keeps the low bits on purpose: the index's own.
        (self.0 & ((1 << Self::INDEX_BITS) - 1)) as usize
    }
}

impl Snapshot {
    /// Returns an empty builder.
    pub fn builder() -> SnapshotBuilder {
        SnapshotBuilder::default()
    }

    /// Returns the agents a call waiting in `queue` may ring at `now_ms` (Unix epoch, ms), best
    /// first, following the rules of the module doc. `today` is the current day in the call
    /// center's time zone. An empty list means nobody can take the call now.
    pub fn candidates(
        &self,
        queue: &str,
        caller: &CallerAttributes,
        now_ms: u64,
        today: Day,
    ) -> Result<Vec<Candidate<'_>>, RoutingError> {
        let (_, members) = self.queue(queue)?;
        // Tag indices of the caller's attributes. `None`: an attribute no agent carries, so
        // nobody serves the caller and every candidate is the fallback.
        let required: Option<Vec<usize>> = caller
            .names
            .iter()
            .map(|name| self.tags.get(name.as_str()).copied())
            .collect();
        let filter = required.as_deref().filter(|tags| !tags.is_empty());

        // Candidates in member order, which is agent id order, and their ranks: sorting the
        // ranks (plain integers) rather than the candidates nearly halved the time of the
        // bench's 2,000-candidate query.
        let mut found = Vec::with_capacity(members.len());
        let mut ranks = Vec::with_capacity(members.len());
        // Every candidate is kept until the first one that serves the caller; from then on
        // only those that serve it: one pass, and no second list for the fallback.
        let mut matched = false;
        for member in members {
            let agent = &self.agents[member.agent];
            let Some((device, idle_since_ms)) = agent.ready(now_ms) else {
                continue;
            };
            let serves = filter.is_some_and(|tags| agent.serves(tags));
            if matched && !serves {
                continue;
            }
            if serves && !matched {
                matched = true;
                found.clear();
                ranks.clear();
            }
            let candidate = Candidate {
                agent: &agent.id,
                endpoint: &self.endpoints[device],
                priority: member.priority,
                demoted: agent.demoted(today),
                idle_since_ms,
            };
            ranks.push(Rank::new(&candidate, found.len()));
            found.push(candidate);
        }
        ranks.sort_unstable();
        let out = ranks.iter().map(|rank| found[rank.index()]).collect();
        Ok(out)
    }

    /// Returns the public status of `queue` at `now_ms` (Unix epoch, ms).
    pub fn queue_status(&self, queue: &str, now_ms: u64) -> Result<QueueStatus, RoutingError> {
        let (name, readiness) =
            self.readiness
                .get_key_value(queue)
                .ok_or_else(|| RoutingError::UnknownQueue {
                    queue: queue.to_owned(),
                })?;
        let available_agents = readiness.available(now_ms);
        Ok(QueueStatus {
            queue: name.to_string(),
            served: available_agents > 0,
            available_agents,
            logged_in_agents: readiness.logged_in,
        })
    }

    fn queue(&self, queue: &str) -> Result<(&str, &[Member]), RoutingError> {
        self.queues
            .get_key_value(queue)
            .map(|(name, members)| (&**name, members.as_slice()))
            .ok_or_else(|| RoutingError::UnknownQueue {
                queue: queue.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const NOW: u64 = 1_714_953_600_000;

    fn today() -> Day {
        Day::from_ymd(2024, 5, 6).expect("a valid date")
    }

    fn yesterday() -> Day {
        Day(today().0 - 1)
    }

    /// An available agent, idle for a minute.
    fn agent(id: &str) -> Agent {
        Agent {
            idle_since_ms: NOW - 60_000,
            ..Agent::new(id)
        }
    }

    /// Adds the agent, logged in on its own device `desk-<id>`, as a member of `sales`.
    fn seat(builder: &mut SnapshotBuilder, agent: Agent, priority: i32) {
        let desk = format!("desk-{}", agent.id);
        builder
            .device(&desk, format!("PJSIP/{desk}"))
            .session(&agent.id, &desk)
            .member("sales", &agent.id, priority)
            .agent(agent);
    }

    /// A snapshot of the queue `sales` with these members, all logged in.
    fn sales(members: impl IntoIterator<Item = (Agent, i32)>) -> Snapshot {
        let mut builder = Snapshot::builder();
        for (agent, priority) in members {
            seat(&mut builder, agent, priority);
        }
        builder.build()
    }

    fn route<'a>(snapshot: &'a Snapshot, attributes: &[&str]) -> Vec<&'a str> {
        route_at(snapshot, attributes, NOW, today())
    }

    fn route_at<'a>(
        snapshot: &'a Snapshot,
        attributes: &[&str],
        now: u64,
        day: Day,
    ) -> Vec<&'a str> {
        snapshot
            .candidates(
                "sales",
                &CallerAttributes::new(attributes.iter().copied()),
                now,
                day,
            )
            .expect("sales exists")
            .iter()
            .map(|c| c.agent)
            .collect()
    }

    fn tagged(id: &str, tags: &[&str]) -> Agent {
        Agent {
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..agent(id)
        }
    }

    fn capped(id: &str, cap: Option<u32>, sold: u32, day: Day) -> Agent {
        Agent {
            daily_cap: cap,
            sales: DailyCount { day, count: sold },
            ..agent(id)
        }
    }

    fn in_state(id: &str, state: AgentState) -> Agent {
        Agent { state, ..agent(id) }
    }

    #[test]
    fn days_count_from_the_epoch() {
        assert_eq!(Day::from_ymd(1970, 1, 1), Some(Day(0)));
        assert_eq!(Day::from_ymd(1970, 3, 1), Some(Day(59)));
        assert_eq!(Day::from_ymd(2000, 3, 1), Some(Day(11_017)));
        assert_eq!(Day::from_ymd(2024, 5, 6), Some(Day(19_849)));
        assert_eq!(
            Day::from_ymd(2024, 3, 1).map(|d| d.0 - 1),
            Day::from_ymd(2024, 2, 29).map(|d| d.0)
        );
        assert_eq!(Day::from_ymd(2023, 2, 29), None);
        assert_eq!(Day::from_ymd(1900, 2, 29), None);
        assert!(Day::from_ymd(2000, 2, 29).is_some());
        assert_eq!(Day::from_ymd(2024, 13, 1), None);
        assert_eq!(Day::from_ymd(2024, 4, 31), None);
        assert_eq!(Day::from_ymd(2024, 1, 0), None);
        assert_eq!(Day::from_ymd(1969, 12, 31), None);
        assert_eq!(Day::from_ymd(u32::MAX, 1, 1), None);
    }

    #[test]
    fn daily_counts_are_zero_on_another_day() {
        let count = DailyCount {
            day: today(),
            count: 7,
        };
        assert_eq!(count.on(today()), 7);
        assert_eq!(count.on(yesterday()), 0);
        assert_eq!(count.on(Day(today().0 + 1)), 0);
    }

    #[test]
    fn lower_priority_numbers_ring_first() {
        let snapshot = sales([(agent("a"), 5), (agent("b"), 1), (agent("c"), 3)]);
        assert_eq!(route(&snapshot, &[]), ["b", "c", "a"]);
    }

    #[test]
    fn equal_priorities_ring_the_longest_idle_first() {
        let idle = |id, since| Agent {
            idle_since_ms: since,
            ..agent(id)
        };
        let snapshot = sales([
            (idle("a", NOW - 1_000), 1),
            (idle("b", NOW - 9_000), 1),
            (idle("c", NOW - 5_000), 1),
            (idle("d", NOW - 99_000), 2),
        ]);
        assert_eq!(route(&snapshot, &[]), ["b", "c", "a", "d"]);
    }

    #[test]
    fn full_ties_are_broken_by_agent_id() {
        let snapshot = sales([(agent("1003"), 1), (agent("1001"), 1), (agent("1002"), 1)]);
        assert_eq!(route(&snapshot, &[]), ["1001", "1002", "1003"]);
    }

    #[test]
    fn candidates_carry_their_device_endpoint_and_membership() {
        let snapshot = sales([(agent("1001"), 4)]);
        let candidates = snapshot
            .candidates("sales", &CallerAttributes::default(), NOW, today())
            .expect("sales exists");
        assert_eq!(
            candidates,
            [Candidate {
                agent: "1001",
                endpoint: "PJSIP/desk-1001",
                priority: 4,
                demoted: false,
                idle_since_ms: NOW - 60_000,
            }]
        );
    }

    #[test]
    fn a_new_session_moves_the_agent_to_its_new_device() {
        let mut builder = Snapshot::builder();
        builder
            .device("desk-1", "PJSIP/desk-1")
            .device("desk-2", "PJSIP/desk-2")
            .session("1001", "desk-1")
            .session("1001", "desk-2")
            .member("sales", "1001", 1)
            .agent(agent("1001"));
        let snapshot = builder.build();
        let candidates = snapshot
            .candidates("sales", &CallerAttributes::default(), NOW, today())
            .expect("sales exists");
        assert_eq!(candidates[0].endpoint, "PJSIP/desk-2");
    }

    #[test]
    fn vip_callers_go_only_to_agents_tagged_vip() {
        let snapshot = sales([
            (agent("a"), 1),
            (tagged("b", &["vip"]), 3),
            (tagged("c", &["vip", "es"]), 2),
            (tagged("d", &["es"]), 1),
        ]);
        assert_eq!(route(&snapshot, &["vip"]), ["c", "b"]);
        assert_eq!(route(&snapshot, &[]), ["a", "d", "c", "b"]);
    }

    #[test]
    fn vip_callers_fall_back_to_every_candidate_when_no_vip_agent_is_available() {
        let busy_vip = Agent {
            state: AgentState::OnCall,
            ..tagged("v", &["vip"])
        };
        let snapshot = sales([(agent("a"), 2), (busy_vip, 1), (agent("b"), 1)]);
        assert_eq!(route(&snapshot, &["vip"]), ["b", "a"]);
    }

    #[test]
    fn an_attribute_no_agent_carries_falls_back_to_every_candidate() {
        let snapshot = sales([(agent("a"), 2), (tagged("b", &["vip"]), 1)]);
        assert_eq!(route(&snapshot, &["gold"]), ["b", "a"]);
        assert_eq!(route(&snapshot, &["vip", "gold"]), ["b", "a"]);
    }

    #[test]
    fn several_attributes_go_to_the_agents_serving_all_of_them() {
        let snapshot = sales([
            (tagged("vip-only", &["vip"]), 1),
            (tagged("es-only", &["es"]), 1),
            (tagged("both-2", &["es", "vip"]), 3),
            (tagged("both-1", &["vip", "es", "fr"]), 2),
        ]);
        assert_eq!(route(&snapshot, &["vip", "es"]), ["both-1", "both-2"]);
        assert_eq!(
            route(&snapshot, &["es", "vip", "vip"]),
            ["both-1", "both-2"]
        );
    }

    #[test]
    fn several_attributes_nobody_serves_together_fall_back_to_every_candidate() {
        let snapshot = sales([
            (tagged("vip-only", &["vip"]), 2),
            (tagged("es-only", &["es"]), 3),
            (agent("plain"), 1),
        ]);
        // No partial matching: serving one of the two is no better than serving none.
        assert_eq!(
            route(&snapshot, &["vip", "es"]),
            ["plain", "vip-only", "es-only"]
        );
    }

    #[test]
    fn agents_at_or_over_their_cap_come_after_everyone_else() {
        let snapshot = sales([
            (capped("at-cap", Some(3), 3, today()), 1),
            (capped("over-cap", Some(3), 5, today()), 2),
            (capped("below-cap", Some(3), 2, today()), 4),
            (capped("no-cap", None, 50, today()), 5),
        ]);
        assert_eq!(
            route(&snapshot, &[]),
            ["below-cap", "no-cap", "at-cap", "over-cap"]
        );
        let candidates = snapshot
            .candidates("sales", &CallerAttributes::default(), NOW, today())
            .expect("sales exists");
        let demoted: Vec<bool> = candidates.iter().map(|c| c.demoted).collect();
        assert_eq!(demoted, [false, false, true, true]);
    }

    #[test]
    fn demoted_agents_keep_their_relative_order() {
        let idle = |agent: Agent, since| Agent {
            idle_since_ms: since,
            ..agent
        };
        let snapshot = sales([
            (idle(capped("d1", Some(1), 1, today()), NOW - 1_000), 2),
            (idle(capped("d2", Some(1), 1, today()), NOW - 9_000), 2),
            (capped("d3", Some(1), 1, today()), 1),
            (agent("free"), 9),
        ]);
        assert_eq!(route(&snapshot, &[]), ["free", "d3", "d2", "d1"]);
    }

    #[test]
    fn a_cap_of_zero_makes_the_agent_the_last_resort() {
        let snapshot = sales([(capped("zero", Some(0), 0, today()), 1), (agent("a"), 9)]);
        assert_eq!(route(&snapshot, &[]), ["a", "zero"]);
        let alone = sales([(capped("zero", Some(0), 0, yesterday()), 1)]);
        assert_eq!(route(&alone, &[]), ["zero"]);
    }

    #[test]
    fn yesterdays_sales_do_not_demote_today() {
        let snapshot = sales([
            (capped("star", Some(3), 10, yesterday()), 1),
            (agent("a"), 2),
        ]);
        assert_eq!(route(&snapshot, &[]), ["star", "a"]);
        // The same counter on the day it was made does demote.
        assert_eq!(
            route_at(&snapshot, &[], NOW - 86_400_000, yesterday()),
            ["a", "star"]
        );
    }

    #[test]
    fn a_demoted_vip_agent_still_takes_vip_callers_before_the_fallback() {
        let snapshot = sales([
            (
                Agent {
                    tags: vec!["vip".into()],
                    ..capped("vip", Some(2), 2, today())
                },
                5,
            ),
            (agent("a"), 1),
        ]);
        assert_eq!(route(&snapshot, &["vip"]), ["vip"]);
    }

    #[test]
    fn paused_busy_and_wrapping_up_agents_are_not_candidates() {
        let snapshot = sales([
            (in_state("paused", AgentState::Paused), 1),
            (in_state("on-call", AgentState::OnCall), 1),
            (
                in_state("wrap-up", AgentState::WrapUp { until_ms: NOW + 1 }),
                1,
            ),
            (agent("free"), 9),
        ]);
        assert_eq!(route(&snapshot, &[]), ["free"]);
    }

    #[test]
    fn wrap_up_ends_at_its_until_time_and_idle_time_counts_from_there() {
        let until_ms = NOW + 30_000;
        let snapshot = sales([
            (in_state("w", AgentState::WrapUp { until_ms }), 1),
            (agent("a"), 1),
        ]);
        assert_eq!(route_at(&snapshot, &[], until_ms - 1, today()), ["a"]);
        // At `until` the wrap-up is over; "a" idles since before the wrap-up ended.
        assert_eq!(route_at(&snapshot, &[], until_ms, today()), ["a", "w"]);
        let candidates = snapshot
            .candidates("sales", &CallerAttributes::default(), until_ms + 5, today())
            .expect("sales exists");
        assert_eq!(candidates[1].idle_since_ms, until_ms);
    }

    #[test]
    fn logged_out_agents_are_not_candidates() {
        let mut builder = Snapshot::builder();
        seat(&mut builder, agent("in"), 1);
        builder
            .member("sales", "out", 1)
            .agent(agent("out"))
            .member("sales", "ghost-desk", 1)
            .session("ghost-desk", "no-such-device")
            .agent(agent("ghost-desk"));
        let snapshot = builder.build();
        assert_eq!(route(&snapshot, &[]), ["in"]);
    }

    #[test]
    fn disabled_agents_are_not_candidates() {
        let disabled = Agent {
            enabled: false,
            ..agent("off")
        };
        let snapshot = sales([(disabled, 1), (agent("on"), 2)]);
        assert_eq!(route(&snapshot, &[]), ["on"]);
    }

    #[test]
    fn agents_of_other_queues_are_not_candidates() {
        let mut builder = Snapshot::builder();
        seat(&mut builder, agent("seller"), 1);
        builder
            .device("desk-s", "PJSIP/desk-s")
            .session("support", "desk-s")
            .member("support", "support", 1)
            .agent(agent("support"));
        let snapshot = builder.build();
        assert_eq!(route(&snapshot, &[]), ["seller"]);
    }

    #[test]
    fn a_repeated_membership_counts_once_with_its_best_priority() {
        let mut builder = Snapshot::builder();
        seat(&mut builder, agent("a"), 5);
        seat(&mut builder, agent("b"), 3);
        builder.member("sales", "a", 1).member("sales", "a", 7);
        let snapshot = builder.build();
        let candidates = snapshot
            .candidates("sales", &CallerAttributes::default(), NOW, today())
            .expect("sales exists");
        let order: Vec<_> = candidates.iter().map(|c| (c.agent, c.priority)).collect();
        assert_eq!(order, [("a", 1), ("b", 3)]);
    }

    #[test]
    fn memberships_of_unknown_agents_are_ignored() {
        let mut builder = Snapshot::builder();
        seat(&mut builder, agent("a"), 1);
        builder
            .member("sales", "deleted", 0)
            .session("deleted", "desk-a");
        let snapshot = builder.build();
        assert_eq!(route(&snapshot, &[]), ["a"]);
        let status = snapshot.queue_status("sales", NOW).expect("sales exists");
        assert_eq!(status.logged_in_agents, 1);
    }

    #[test]
    fn queue_status_counts_logged_in_and_available_members() {
        let mut builder = Snapshot::builder();
        seat(&mut builder, agent("free"), 1);
        seat(&mut builder, capped("capped", Some(1), 4, today()), 1);
        seat(&mut builder, in_state("paused", AgentState::Paused), 1);
        seat(&mut builder, in_state("busy", AgentState::OnCall), 1);
        seat(
            &mut builder,
            in_state("wrap", AgentState::WrapUp { until_ms: NOW + 1 }),
            1,
        );
        seat(
            &mut builder,
            Agent {
                enabled: false,
                ..agent("disabled")
            },
            1,
        );
        seat(&mut builder, tagged("vip", &["vip"]), 1);
        builder.member("sales", "out", 1).agent(agent("out"));
        let snapshot = builder.build();

        let status = snapshot.queue_status("sales", NOW).expect("sales exists");
        assert_eq!(
            status,
            QueueStatus {
                queue: "sales".into(),
                served: true,
                available_agents: 3,
                logged_in_agents: 7,
            }
        );
        // Once the wrap-up ends, one more agent is available.
        let later = snapshot
            .queue_status("sales", NOW + 1)
            .expect("sales exists");
        assert_eq!(later.available_agents, 4);
    }

    #[test]
    fn a_queue_with_nobody_available_is_not_served() {
        let mut builder = Snapshot::builder();
        seat(&mut builder, in_state("busy", AgentState::OnCall), 1);
        builder.queue("empty");
        let snapshot = builder.build();
        let status = snapshot.queue_status("sales", NOW).expect("sales exists");
        assert!(!status.served);
        assert_eq!((status.available_agents, status.logged_in_agents), (0, 1));
        let empty = snapshot.queue_status("empty", NOW).expect("empty exists");
        assert_eq!(
            serde_json::to_value(&empty).expect("serializes"),
            serde_json::json!({
                "queue": "empty",
                "served": false,
                "available_agents": 0,
                "logged_in_agents": 0,
            })
        );
        let none = snapshot
            .candidates("empty", &CallerAttributes::new(["vip"]), NOW, today())
            .expect("empty exists");
        assert!(none.is_empty());
    }

    #[test]
    fn unknown_queues_are_errors_that_name_the_queue() {
        let snapshot = sales([(agent("a"), 1)]);
        let error = snapshot
            .candidates("support", &CallerAttributes::default(), NOW, today())
            .expect_err("no such queue");
        assert_eq!(
            error,
            RoutingError::UnknownQueue {
                queue: "support".into()
            }
        );
        assert_eq!(error.to_string(), "unknown queue `support`");
        assert_eq!(
            snapshot.queue_status("support", NOW),
            Err(RoutingError::UnknownQueue {
                queue: "support".into()
            })
        );
    }

    #[test]
    fn the_builder_is_empty_after_build() {
        let mut builder = Snapshot::builder();
        seat(&mut builder, agent("a"), 1);
        let first = builder.build();
        let second = builder.build();
        assert_eq!(route(&first, &[]), ["a"]);
        assert!(second.queue_status("sales", NOW).is_err());
    }

    // Random snapshots, checked against a direct reading of the rules over the input rows.

    const TAGS: [&str; 3] = ["vip", "es", "fr"];
    const QUEUES: [&str; 2] = ["q0", "q1"];
    const DEVICES: usize = 4;
    /// Agent indices up to this bound may be named; those past the generated agents are
    /// dangling references.
    const MAX_AGENTS: usize = 12;

    #[derive(Debug, Clone)]
    struct World {
        agents: Vec<Agent>,
        sessions: Vec<(usize, usize)>,
        members: Vec<(usize, usize, i32)>,
    }

    fn arb_agent() -> impl Strategy<Value = Agent> {
        let state = prop_oneof![
            3 => Just(AgentState::Available),
            1 => Just(AgentState::Paused),
            1 => Just(AgentState::OnCall),
            2 => (0u64..3).prop_map(|i| AgentState::WrapUp { until_ms: NOW - 1_000 + i * 1_000 }),
        ];
        (
            prop::bool::weighted(0.85),
            prop::collection::vec(prop::sample::select(&TAGS[..2]), 0..3),
            state,
            0u64..3,
            prop::option::of(0u32..3),
            (prop::bool::ANY, 0u32..4),
        )
            .prop_map(
                |(enabled, tags, state, idle, daily_cap, (sold_today, count))| Agent {
                    id: String::new(),
                    enabled,
                    tags: tags.into_iter().map(str::to_owned).collect(),
                    state,
                    // Few distinct values, so ties are frequent; some fall inside a wrap-up.
                    idle_since_ms: NOW - 2_000 + idle * 1_000,
                    daily_cap,
                    sales: DailyCount {
                        day: if sold_today { today() } else { yesterday() },
                        count,
                    },
                },
            )
    }

    fn arb_world() -> impl Strategy<Value = World> {
        (
            prop::collection::vec(arb_agent(), 0..MAX_AGENTS),
            prop::collection::vec((0..MAX_AGENTS, 0..DEVICES), 0..16),
            prop::collection::vec((0..QUEUES.len(), 0..MAX_AGENTS, -1i32..3), 0..30),
        )
            .prop_map(|(mut agents, sessions, members)| {
                for (i, agent) in agents.iter_mut().enumerate() {
                    agent.id = format!("a{i}");
                }
                World {
                    agents,
                    sessions,
                    members,
                }
            })
    }

    fn build(world: &World) -> Snapshot {
        let mut builder = Snapshot::builder();
        for d in 0..DEVICES {
            builder.device(format!("d{d}"), format!("PJSIP/d{d}"));
        }
        for &(agent, device) in &world.sessions {
            builder.session(format!("a{agent}"), format!("d{device}"));
        }
        for &(queue, agent, priority) in &world.members {
            builder.member(QUEUES[queue], format!("a{agent}"), priority);
        }
        for agent in world.agents.iter().rev() {
            builder.agent(agent.clone());
        }
        builder.build()
    }

    /// The candidates of `queue` by agent id, read straight from the rows and the rules,
    /// ignoring caller attributes: (endpoint, priority, demoted, idle since).
    fn eligible(world: &World, queue: usize) -> BTreeMap<String, (String, i32, bool, u64)> {
        let mut out = BTreeMap::new();
        for (i, agent) in world.agents.iter().enumerate() {
            let Some(priority) = world
                .members
                .iter()
                .filter(|m| m.0 == queue && m.1 == i)
                .map(|m| m.2)
                .min()
            else {
                continue;
            };
            let Some(device) = world.sessions.iter().rev().find(|s| s.0 == i).map(|s| s.1) else {
                continue;
            };
            let idle = match agent.state {
                AgentState::Available => agent.idle_since_ms,
                AgentState::WrapUp { until_ms } if until_ms <= NOW => {
                    agent.idle_since_ms.max(until_ms)
                }
                _ => continue,
            };
            if !agent.enabled {
                continue;
            }
            let demoted = agent
                .daily_cap
                .is_some_and(|cap| agent.sales.on(today()) >= cap);
            out.insert(
                agent.id.clone(),
                (format!("PJSIP/d{device}"), priority, demoted, idle),
            );
        }
        out
    }

    proptest! {
        #[test]
        fn candidates_follow_the_rules(
            world in arb_world(),
            attributes in prop::collection::vec(prop::sample::select(&TAGS[..]), 0..3),
        ) {
            let snapshot = build(&world);
            let caller = CallerAttributes::new(attributes.iter().copied());
            for (q, queue) in QUEUES.iter().enumerate() {
                let in_world = world.members.iter().any(|m| m.0 == q);
                let Ok(candidates) = snapshot.candidates(queue, &caller, NOW, today()) else {
                    prop_assert!(!in_world, "{queue} has members but is unknown");
                    continue;
                };
                let eligible = eligible(&world, q);

                // Every candidate is eligible, as the rules describe it, and appears once.
                for c in &candidates {
                    let expected = eligible.get(c.agent);
                    prop_assert_eq!(
                        expected,
                        Some(&(c.endpoint.to_owned(), c.priority, c.demoted, c.idle_since_ms)),
                        "candidate {} of {}", c.agent, queue
                    );
                }
                // Sorted by (demoted, priority, idle since, id), strictly: no duplicates.
                let key = |c: &Candidate| (c.demoted, c.priority, c.idle_since_ms, c.agent.to_owned());
                for pair in candidates.windows(2) {
                    prop_assert!(key(&pair[0]) < key(&pair[1]), "{:?}", pair);
                }

                // The set: those serving every attribute, or everyone when nobody does.
                let serves = |id: &str| {
                    let agent = world.agents.iter().find(|a| a.id == id).expect("known agent");
                    attributes.iter().all(|t| agent.tags.iter().any(|tag| tag == t))
                };
                let serving: Vec<&str> = eligible.keys().map(String::as_str).filter(|id| serves(id)).collect();
                let expected: Vec<&str> = if attributes.is_empty() || serving.is_empty() {
                    eligible.keys().map(String::as_str).collect()
                } else {
                    serving
                };
                let mut got: Vec<&str> = candidates.iter().map(|c| c.agent).collect();
                got.sort_unstable();
                prop_assert_eq!(got, expected);

                // At other moments of the same snapshot, as the rules count them there.
                for now in [0, NOW - 1, NOW + 1, NOW + 60_000, u64::MAX] {
                    let status = snapshot.queue_status(queue, now).expect("known queue");
                    let ready = (0..world.agents.len())
                        .filter(|&i| world.members.iter().any(|m| m.0 == q && m.1 == i))
                        .filter(|&i| world.sessions.iter().any(|s| s.0 == i))
                        .filter(|&i| {
                            let agent = &world.agents[i];
                            agent.enabled && match agent.state {
                                AgentState::Available => true,
                                AgentState::WrapUp { until_ms } => until_ms <= now,
                                AgentState::Paused | AgentState::OnCall => false,
                            }
                        })
                        .count();
                    prop_assert_eq!(status.available_agents, ready, "{} at {}", queue, now);
                }
                let status = snapshot.queue_status(queue, NOW).expect("known queue");
                let logged_in = (0..world.agents.len())
                    .filter(|&i| world.members.iter().any(|m| m.0 == q && m.1 == i))
                    .filter(|&i| world.sessions.iter().any(|s| s.0 == i))
                    .count();
                prop_assert_eq!(
                    status,
                    QueueStatus {
                        queue: (*queue).to_owned(),
                        served: !eligible.is_empty(),
                        available_agents: eligible.len(),
                        logged_in_agents: logged_in,
                    }
                );
            }
        }
    }
}
