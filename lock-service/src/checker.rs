//! Reads a history of rings and finds what must never happen.
//!
//! The fault harness records, for every ring of an agent, a start and an end event with
//! the lease's token and deadline (one JSON object per line). A history is correct when,
//! per agent:
//! - no two rings with different tokens overlap in time (one agent, one call);
//! - tokens of successive rings strictly increase (a superseded holder never rings again);
//! - no ring lasts past its lease's deadline plus the guard.
//!
//! Every violation is reported with the events that show it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds on the harness's monotonic clock.
    pub t_ms: f64,
    /// Which holder (node) acted.
    pub node: String,
    /// `claim`, `ring_start`, `ring_end`, `release`, …
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
    /// The lease's deadline, ms.
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

/// Every violation in `events`, given the lease guard in milliseconds.
pub fn check(events: &[Event], guard_ms: f64) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut by_agent: HashMap<&str, Vec<Ring>> = HashMap::new();
    let all = rings(events);
    for ring in &all {
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
    fn history_lines_are_json() {
        let [start, _] = ring("n1", "agent:1", 10, 0.0, 100.0, 1000.0);
        let line = serde_json::to_string(&start).expect("serialise");
        assert!(line.contains("\"op\":\"ring_start\""), "{line}");
        let back: Event = serde_json::from_str(&line).expect("parse");
        assert_eq!(back, start);
    }
}
