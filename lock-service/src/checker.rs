//! Reads a history of grants and rings and finds what must never happen.
//!
//! The fault harness records, for every lease a holder is granted, the claim's reply, its
//! renewals and the release the holder sends, and for every ring of an agent a start and
//! an end event, each with the lease's token and deadline (one JSON object per line). A
//! grant lives from the claim's `ok` until its holder sends the release or its deadline
//! passes, whichever comes first: a holder may act on its lease all that time. A history
//! is correct when, per agent:
//! - no two rings with different tokens overlap in time (one agent, one call);
//! - tokens of successive rings strictly increase (a superseded holder never rings again);
//! - no ring lasts past its lease's deadline plus the guard;
//! - no ring starts after the deadline its holder had when it started (a dead lease must
//!   be refused where the ring happens, whatever renewals claim later);
//! - no two grants with different tokens live at once (otherwise two holders may both act,
//!   whether or not they happened to ring);
//! - tokens of successive grants strictly increase (fencing only works if they do);
//!
//! and, per call (a node's claim attempt), no two grants of different agents live at once
//! (one call, one agent).
//!
//! Every violation is reported with the events that show it.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds on the harness's monotonic clock.
    pub t_ms: f64,
    /// Which holder (node) acted.
    pub node: String,
    /// `claim`, `renew`, `ring_start`, `ring_end`, `release`, …
    pub op: String,
    /// `ok`, `busy`, `error: …`, `lost`, …
    pub outcome: String,
    /// The agent.
    pub resource: String,
    /// The claim's attempt id.
    pub attempt: String,
    /// The lease's token.
    pub token: u64,
    /// When the lease's validity ends, on the same clock.
    pub deadline_ms: f64,
}

/// A ring: from its start to its end event.
#[derive(Debug, Clone, PartialEq)]
pub struct Ring {
    /// The agent rung.
    pub resource: String,
    /// Who rang.
    pub node: String,
    /// The claim's attempt id.
    pub attempt: String,
    /// The lease's token.
    pub token: u64,
    /// Start, ms.
    pub start_ms: f64,
    /// End, ms (the end of the history if it never ended).
    pub end_ms: f64,
    /// The lease's deadline, ms: the latest the holder had while ringing (renewals move
    /// it), so a ring that was renewed while it rang is judged on the renewed deadline.
    pub deadline_ms: f64,
    /// The deadline carried by the start event: what the holder knew when it began to
    /// ring, which a later renewal cannot make up for.
    pub start_deadline_ms: f64,
}

/// A lease as its holder knew it, from the claim's reply to when it let go.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// The agent granted.
    pub resource: String,
    /// Who holds it.
    pub node: String,
    /// The claim's attempt id.
    pub attempt: String,
    /// The lease's token.
    pub token: u64,
    /// The claim's `ok`, ms.
    pub start_ms: f64,
    /// The first of: the release being sent, the deadline, the end of the history, ms.
    pub end_ms: f64,
    /// The latest deadline the holder had (renewals move it), ms.
    pub deadline_ms: f64,
}

/// Something that must never happen.
#[derive(Debug, Clone, PartialEq)]
pub enum Violation {
    /// Two rings with different tokens overlapped on one agent.
    Overlap(Ring, Ring),
    /// A ring's token was not above the token of the agent's ring before it.
    TokenNotIncreasing(Ring, Ring),
    /// A ring went on past its deadline plus the guard.
    PastDeadline(Ring),
    /// A ring started after the deadline its start event carried.
    RingAfterDeadline(Ring),
    /// Two grants of one agent with different tokens were live at once.
    GrantOverlap(Grant, Grant),
    /// One call (node and attempt) held two agents at once.
    TwoAgentsForOneCall(Grant, Grant),
    /// A grant's token was not above the token of the agent's grant before it.
    GrantTokenNotIncreasing(Grant, Grant),
}

/// Pairs start and end events into rings (an unmatched start ends at the history's end).
pub fn rings(events: &[Event]) -> Vec<Ring> {
    let end_of_history = events.iter().map(|e| e.t_ms).fold(0.0, f64::max);
    let mut open: HashMap<(&str, &str, &str), Ring> = HashMap::new();
    let mut done = Vec::new();
    for event in events {
        let key = (
            event.node.as_str(),
            event.resource.as_str(),
            event.attempt.as_str(),
        );
        match event.op.as_str() {
            "ring_start" => {
                open.insert(
                    key,
                    Ring {
                        resource: event.resource.clone(),
                        node: event.node.clone(),
                        attempt: event.attempt.clone(),
                        token: event.token,
                        start_ms: event.t_ms,
                        end_ms: end_of_history,
                        deadline_ms: event.deadline_ms,
                        start_deadline_ms: event.deadline_ms,
                    },
                );
            }
            "ring_end" => {
                if let Some(mut ring) = open.remove(&key) {
                    ring.end_ms = event.t_ms;
                    // Renewals move the deadline while the agent rings; the end event
                    // carries the last one the holder had.
                    ring.deadline_ms = ring.deadline_ms.max(event.deadline_ms);
                    done.push(ring);
                }
            }
            _ => {}
        }
    }
    done.extend(open.into_values());
    done.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    done
}

/// What the history says about one lease, whether or not it was granted.
struct LeaseEvents {
    granted_ms: Option<f64>,
    deadline_ms: f64,
    released_ms: Option<f64>,
}

/// Finds the grants in `events` (sorted by start).
///
/// A retried claim of the same attempt that got the same lease back is the same grant,
/// starting at the first `ok`. Releases carry no deadline and do not count toward it.
pub fn grants(events: &[Event]) -> Vec<Grant> {
    let end_of_history = events.iter().map(|e| e.t_ms).fold(0.0, f64::max);
    // Ordered so that grants starting together come out the same way on every run.
    let mut leases: BTreeMap<(&str, &str, &str, u64), LeaseEvents> = BTreeMap::new();
    for event in events {
        let key = (
            event.node.as_str(),
            event.resource.as_str(),
            event.attempt.as_str(),
            event.token,
        );
        let op = event.op.as_str();
        let moves_deadline = matches!(op, "claim" | "renew" | "ring_start" | "ring_end");
        if !moves_deadline && op != "release" {
            continue;
        }
        let lease = leases.entry(key).or_insert(LeaseEvents {
            granted_ms: None,
            deadline_ms: f64::NEG_INFINITY,
            released_ms: None,
        });
        if moves_deadline {
            lease.deadline_ms = lease.deadline_ms.max(event.deadline_ms);
        } else {
            // Recorded when the release is sent, whatever the reply: the holder has
            // stopped acting by then, so the grant ends there.
            lease.released_ms = Some(lease.released_ms.map_or(event.t_ms, |t| t.min(event.t_ms)));
        }
        if op == "claim" && event.outcome == "ok" {
            lease.granted_ms = Some(lease.granted_ms.map_or(event.t_ms, |t| t.min(event.t_ms)));
        }
    }
    let mut all: Vec<Grant> = leases
        .into_iter()
        .filter_map(|((node, resource, attempt, token), lease)| {
            let start_ms = lease.granted_ms?;
            let end_ms = lease
                .released_ms
                .map_or(lease.deadline_ms, |t| t.min(lease.deadline_ms))
                .min(end_of_history);
            Some(Grant {
                resource: resource.to_owned(),
                node: node.to_owned(),
                attempt: attempt.to_owned(),
                token,
                start_ms,
                end_ms,
                deadline_ms: lease.deadline_ms,
            })
        })
        .collect();
    all.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    all
}

/// Every violation in `events`, given the lease guard in milliseconds: those of rings
/// first, then those of grants.
pub fn check(events: &[Event], guard_ms: f64) -> Vec<Violation> {
    let mut violations = check_rings(&rings(events), guard_ms);
    violations.extend(check_grants(&grants(events)));
    violations
}

fn check_rings(all: &[Ring], guard_ms: f64) -> Vec<Violation> {
    let mut violations = Vec::new();
    // Ordered so that violations come out the same way on every run.
    let mut by_agent: BTreeMap<&str, Vec<Ring>> = BTreeMap::new();
    for ring in all {
        if ring.start_ms > ring.start_deadline_ms {
            violations.push(Violation::RingAfterDeadline(ring.clone()));
        }
        if ring.end_ms > ring.deadline_ms + guard_ms {
            violations.push(Violation::PastDeadline(ring.clone()));
        }
        by_agent
            .entry(ring.resource.as_str())
            .or_default()
            .push(ring.clone());
    }
    for rings in by_agent.values() {
        for (i, earlier) in rings.iter().enumerate() {
            if let Some(next) = rings.get(i + 1)
                && next.token <= earlier.token
                && next.attempt != earlier.attempt
            {
                violations.push(Violation::TokenNotIncreasing(earlier.clone(), next.clone()));
            }
            for later in &rings[i + 1..] {
                if later.start_ms >= earlier.end_ms {
                    break;
                }
                if later.token != earlier.token {
                    violations.push(Violation::Overlap(earlier.clone(), later.clone()));
                }
            }
        }
    }
    violations
}

/// `all` must be sorted by start, as [`grants`] returns them.
fn check_grants(all: &[Grant]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut by_agent: BTreeMap<&str, Vec<&Grant>> = BTreeMap::new();
    let mut by_call: BTreeMap<(&str, &str), Vec<&Grant>> = BTreeMap::new();
    for grant in all {
        by_agent.entry(&grant.resource).or_default().push(grant);
        by_call
            .entry((&grant.node, &grant.attempt))
            .or_default()
            .push(grant);
    }
    for grants in by_agent.values() {
        for (i, &earlier) in grants.iter().enumerate() {
            if let Some(&next) = grants.get(i + 1)
                && next.token <= earlier.token
                && next.attempt != earlier.attempt
            {
                violations.push(Violation::GrantTokenNotIncreasing(
                    earlier.clone(),
                    next.clone(),
                ));
            }
            for later in live_during(earlier, &grants[i + 1..]) {
                if later.token != earlier.token {
                    violations.push(Violation::GrantOverlap(earlier.clone(), later.clone()));
                }
            }
        }
    }
    for grants in by_call.values() {
        for (i, &earlier) in grants.iter().enumerate() {
            for later in live_during(earlier, &grants[i + 1..]) {
                if later.resource != earlier.resource {
                    violations.push(Violation::TwoAgentsForOneCall(
                        earlier.clone(),
                        later.clone(),
                    ));
                }
            }
        }
    }
    violations
}

/// The grants of `later` (sorted by start, none before `earlier`'s) live while `earlier`
/// is. A grant whose deadline had passed before its claim's reply came was never live.
fn live_during<'a>(earlier: &'a Grant, later: &'a [&'a Grant]) -> impl Iterator<Item = &'a Grant> {
    later
        .iter()
        .copied()
        .take_while(|g| g.start_ms < earlier.end_ms)
        .filter(|g| g.start_ms < g.end_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(
        node: &str,
        agent: &str,
        token: u64,
        start: f64,
        end: f64,
        deadline: f64,
    ) -> [Event; 2] {
        let event = |op: &str, t_ms: f64| Event {
            t_ms,
            node: node.into(),
            op: op.into(),
            outcome: "ok".into(),
            resource: agent.into(),
            attempt: format!("{node}-{token}"),
            token,
            deadline_ms: deadline,
        };
        [event("ring_start", start), event("ring_end", end)]
    }

    fn history(rings: &[[Event; 2]]) -> Vec<Event> {
        let mut events: Vec<Event> = rings.iter().flatten().cloned().collect();
        events.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
        events
    }

    /// An event of the lease `token` on `agent` that `node` got for attempt `{node}-{token}`.
    fn lease(op: &str, t_ms: f64, node: &str, agent: &str, token: u64, deadline: f64) -> Event {
        Event {
            t_ms,
            node: node.into(),
            op: op.into(),
            outcome: "ok".into(),
            resource: agent.into(),
            attempt: format!("{node}-{token}"),
            token,
            deadline_ms: deadline,
        }
    }

    fn sorted(mut events: Vec<Event>) -> Vec<Event> {
        events.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
        events
    }

    #[test]
    fn a_clean_history_has_no_violations() {
        let events = history(&[
            ring("n1", "agent:1", 10, 0.0, 100.0, 1000.0),
            ring("n2", "agent:1", 11, 100.0, 300.0, 1200.0),
            ring("n3", "agent:2", 5, 50.0, 400.0, 1000.0),
        ]);
        assert_eq!(check(&events, 500.0), []);
    }

    #[test]
    fn overlapping_rings_with_different_tokens_are_caught() {
        let events = history(&[
            ring("n1", "agent:1", 10, 0.0, 200.0, 1000.0),
            ring("n2", "agent:1", 11, 150.0, 300.0, 1200.0),
        ]);
        let found = check(&events, 500.0);
        assert!(
            matches!(&found[..], [Violation::Overlap(a, b)] if a.token == 10 && b.token == 11),
            "{found:?}"
        );
    }

    #[test]
    fn a_token_that_goes_back_is_caught() {
        let events = history(&[
            ring("n1", "agent:1", 11, 0.0, 100.0, 1000.0),
            ring("n2", "agent:1", 10, 200.0, 300.0, 1000.0),
        ]);
        let found = check(&events, 500.0);
        assert!(
            matches!(&found[..], [Violation::TokenNotIncreasing(a, b)] if a.token == 11 && b.token == 10),
            "{found:?}"
        );
    }

    #[test]
    fn a_ring_past_its_deadline_and_guard_is_caught_and_an_open_one_counts_to_the_end() {
        let mut events = history(&[ring("n1", "agent:1", 10, 0.0, 1600.0, 1000.0)]);
        let found = check(&events, 500.0);
        assert!(
            matches!(&found[..], [Violation::PastDeadline(r)] if r.token == 10),
            "{found:?}"
        );

        // A ring whose end was never recorded lasts until the history ends.
        events = history(&[ring("n1", "agent:2", 3, 0.0, 10.0, 100.0)]);
        events.retain(|e| e.op == "ring_start");
        events.push(Event {
            t_ms: 5000.0,
            op: "claim".into(),
            ..events[0].clone()
        });
        assert!(matches!(
            &check(&events, 500.0)[..],
            [Violation::PastDeadline(_)]
        ));
    }

    #[test]
    fn a_ring_that_starts_after_its_deadline_is_caught_whatever_its_end_says() {
        // Ends within the guard, so only the start is wrong.
        let [start, mut end] = ring("n1", "agent:1", 10, 1200.0, 1300.0, 1000.0);
        let found = check(&[start.clone(), end.clone()], 500.0);
        assert!(
            matches!(&found[..], [Violation::RingAfterDeadline(r)] if r.token == 10 && r.start_deadline_ms == 1000.0),
            "{found:?}"
        );

        // A renewal recorded at the end does not make up for starting on a dead lease.
        end.deadline_ms = 2000.0;
        let found = check(&[start, end], 500.0);
        assert!(
            matches!(&found[..], [Violation::RingAfterDeadline(r)] if r.deadline_ms == 2000.0 && r.start_deadline_ms == 1000.0),
            "{found:?}"
        );
    }

    #[test]
    fn a_ring_renewed_while_it_rang_is_judged_on_the_renewed_deadline() {
        let [start, mut end] = ring("n1", "agent:1", 10, 500.0, 1800.0, 1000.0);
        end.deadline_ms = 1600.0;
        assert_eq!(check(&[start.clone(), end], 500.0), []);

        // The same ring without the renewal went on past its deadline, but it started
        // in time.
        let [_, end] = ring("n1", "agent:1", 10, 500.0, 1800.0, 1000.0);
        let found = check(&[start, end], 500.0);
        assert!(
            matches!(&found[..], [Violation::PastDeadline(r)] if r.token == 10),
            "{found:?}"
        );
    }

    #[test]
    fn a_grant_lasts_from_its_claim_to_its_release_or_deadline_or_the_history_end() {
        let events = sorted(vec![
            lease("claim", 0.0, "n1", "agent:1", 10, 1000.0),
            lease("renew", 300.0, "n1", "agent:1", 10, 1300.0),
            lease("release", 400.0, "n1", "agent:1", 10, 0.0),
            lease("claim", 500.0, "n2", "agent:2", 3, 600.0),
            // Not a grant: the claim was refused.
            Event {
                outcome: "busy".into(),
                ..lease("claim", 550.0, "n3", "agent:1", 11, 0.0)
            },
            // Unknown ops say nothing about leases, whatever they carry.
            lease("frozen", 560.0, "n1", "agent:1", 10, 9000.0),
            lease("claim", 700.0, "n3", "agent:3", 7, 5000.0),
            lease("fault", 900.0, "harness", "", 0, 0.0),
        ]);
        let grant = |node: &str, resource: &str, token, start_ms, end_ms, deadline_ms| Grant {
            resource: String::from(resource),
            node: String::from(node),
            attempt: format!("{node}-{token}"),
            token,
            start_ms,
            end_ms,
            deadline_ms,
        };
        assert_eq!(
            grants(&events),
            [
                // Released before its (renewed) deadline.
                grant("n1", "agent:1", 10, 0.0, 400.0, 1300.0),
                // Never released: over at its deadline.
                grant("n2", "agent:2", 3, 500.0, 600.0, 600.0),
                // Never released and still valid when the history ends.
                grant("n3", "agent:3", 7, 700.0, 900.0, 5000.0),
            ]
        );
        assert_eq!(check(&events, 500.0), []);
    }

    #[test]
    fn grants_of_one_agent_live_at_once_are_caught() {
        let events = sorted(vec![
            lease("claim", 0.0, "n1", "agent:1", 10, 1000.0),
            lease("claim", 500.0, "n2", "agent:1", 11, 1500.0),
            lease("release", 600.0, "n1", "agent:1", 10, 0.0),
            lease("release", 700.0, "n2", "agent:1", 11, 0.0),
        ]);
        let found = check(&events, 500.0);
        assert!(
            matches!(&found[..], [Violation::GrantOverlap(a, b)] if a.token == 10 && a.end_ms == 600.0 && b.token == 11),
            "{found:?}"
        );
    }

    #[test]
    fn a_renewal_keeps_a_grant_live_past_its_first_deadline() {
        let events = sorted(vec![
            lease("claim", 0.0, "n1", "agent:1", 10, 400.0),
            lease("renew", 300.0, "n1", "agent:1", 10, 800.0),
            lease("claim", 500.0, "n2", "agent:1", 11, 1500.0),
            lease("release", 900.0, "n1", "agent:1", 10, 0.0),
        ]);
        let found = check(&events, 500.0);
        assert!(
            matches!(&found[..], [Violation::GrantOverlap(a, b)] if a.end_ms == 800.0 && b.token == 11),
            "{found:?}"
        );
    }

    #[test]
    fn a_grant_released_or_expired_before_the_next_one_is_no_overlap() {
        let released = sorted(vec![
            lease("claim", 0.0, "n1", "agent:1", 10, 1000.0),
            lease("release", 400.0, "n1", "agent:1", 10, 0.0),
            lease("claim", 500.0, "n2", "agent:1", 11, 1500.0),
        ]);
        assert_eq!(check(&released, 500.0), []);

        let expired = sorted(vec![
            lease("claim", 0.0, "n1", "agent:1", 10, 400.0),
            lease("claim", 500.0, "n2", "agent:1", 11, 1500.0),
            lease("release", 600.0, "n1", "agent:1", 10, 0.0),
        ]);
        assert_eq!(check(&expired, 500.0), []);
    }

    #[test]
    fn one_call_holding_two_agents_is_caught() {
        let events = sorted(vec![
            lease("claim", 0.0, "n1", "agent:1", 10, 1000.0),
            Event {
                attempt: "n1-10".into(),
                ..lease("claim", 100.0, "n1", "agent:2", 4, 1100.0)
            },
            lease("release", 500.0, "n1", "agent:1", 10, 0.0),
            Event {
                attempt: "n1-10".into(),
                ..lease("release", 600.0, "n1", "agent:2", 4, 0.0)
            },
        ]);
        let found = check(&events, 500.0);
        assert!(
            matches!(&found[..], [Violation::TwoAgentsForOneCall(a, b)] if a.resource == "agent:1" && b.resource == "agent:2" && b.attempt == "n1-10"),
            "{found:?}"
        );
    }

    #[test]
    fn a_retried_claim_and_the_next_agent_after_a_release_are_one_agent_per_call() {
        let events = sorted(vec![
            lease("claim", 0.0, "n1", "agent:1", 10, 1000.0),
            // The reply to the retry is the same lease: the same grant, not a second one.
            lease("claim", 50.0, "n1", "agent:1", 10, 1050.0),
            lease("ring_start", 60.0, "n1", "agent:1", 10, 1050.0),
            lease("ring_end", 200.0, "n1", "agent:1", 10, 1050.0),
            lease("release", 250.0, "n1", "agent:1", 10, 0.0),
            Event {
                attempt: "n1-10".into(),
                ..lease("claim", 300.0, "n1", "agent:2", 4, 1300.0)
            },
        ]);
        assert_eq!(check(&events, 500.0), []);
        let found = grants(&events);
        assert!(
            matches!(&found[..], [a, b] if a.start_ms == 0.0 && a.end_ms == 250.0 && a.deadline_ms == 1050.0 && b.resource == "agent:2"),
            "{found:?}"
        );
    }

    #[test]
    fn a_grant_token_that_goes_back_is_caught() {
        let events = sorted(vec![
            lease("claim", 0.0, "n1", "agent:1", 11, 1000.0),
            lease("release", 100.0, "n1", "agent:1", 11, 0.0),
            lease("claim", 200.0, "n2", "agent:1", 10, 1200.0),
            lease("release", 300.0, "n2", "agent:1", 10, 0.0),
        ]);
        let found = check(&events, 500.0);
        assert!(
            matches!(&found[..], [Violation::GrantTokenNotIncreasing(a, b)] if a.token == 11 && b.token == 10),
            "{found:?}"
        );
    }

    #[test]
    fn grant_tokens_only_need_to_increase_per_agent() {
        let events = sorted(vec![
            lease("claim", 0.0, "n1", "agent:1", 11, 1000.0),
            lease("release", 100.0, "n1", "agent:1", 11, 0.0),
            lease("claim", 200.0, "n2", "agent:2", 10, 1200.0),
            lease("release", 300.0, "n2", "agent:2", 10, 0.0),
            lease("claim", 400.0, "n3", "agent:1", 12, 1400.0),
            lease("release", 500.0, "n3", "agent:1", 12, 0.0),
        ]);
        assert_eq!(check(&events, 500.0), []);
    }

    #[test]
    fn ring_violations_come_before_grant_violations() {
        let events = sorted(vec![
            lease("claim", 0.0, "n1", "agent:1", 10, 1000.0),
            lease("claim", 100.0, "n2", "agent:1", 11, 1000.0),
            lease("ring_start", 1100.0, "n2", "agent:1", 11, 1000.0),
            lease("ring_end", 1200.0, "n2", "agent:1", 11, 1000.0),
        ]);
        let found = check(&events, 500.0);
        assert!(
            matches!(
                &found[..],
                [Violation::RingAfterDeadline(r), Violation::GrantOverlap(a, b)]
                    if r.token == 11 && a.token == 10 && b.token == 11
            ),
            "{found:?}"
        );
    }

    #[test]
    fn history_lines_are_json() {
        let [start, _] = ring("n1", "agent:1", 10, 0.0, 100.0, 1000.0);
        let line = serde_json::to_string(&start).expect("serialise");
        assert!(line.contains("\"op\":\"ring_start\""), "{line}");
        let back: Event = serde_json::from_str(&line).expect("parse");
        assert_eq!(back, start);
    }
}
