//! Who is being rung for a queued call, for the agent lists (issue 16).
//!
//! A node reports each ring (`ringing`) and each end of a ring that was neither answered
//! nor missed (`ring_ended`). Routing does not need them (the lease in the lock service
//! keeps a ringing agent from a second ring), so these writes leave the directory version
//! alone: a ring moving the version would make every control plane re-read the whole
//! directory and rebuild its routing index once more per call, for a field only
//! supervisors look at. The lists are served from memory, so the rings are read on their
//! own instead: [`crate::Control::figures_loop`] reads the ringing agents with the queue
//! counters (one indexed query per tick), and this instance notes the rings it writes
//! itself at once. One agent's ring then comes from whichever of three reads is the newest
//! (each shows every write committed before it started): the directory read (whose
//! answers, misses and ends of calls clear a ring), the last read of the ringing agents, or
//! a ring noted here. `GET /api/v1/agents/{agent}` reads the store and is never behind.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;
use std::time::Instant;

use callfleet_core::store::Ringing;

/// The rings as last read, and those this instance wrote since.
#[derive(Debug, Default)]
pub struct Rings {
    state: RwLock<State>,
}

/// See [`Rings`].
#[derive(Debug, Default)]
pub struct State {
    /// The last read of the ringing agents, and when it started.
    read: Option<(Instant, BTreeMap<String, Ringing>)>,
    /// Rings written (`Some`) or ended (`None`) on this instance since that read started,
    /// with when each write committed (or later).
    noted: HashMap<String, (Option<Ringing>, Instant)>,
}

impl Rings {
    /// Every agent being rung, as a read of the store that began at `started` found them.
    /// What was noted before `started` is in the read.
    pub fn set_read(&self, started: Instant, ringing: BTreeMap<String, Ringing>) {
        let mut state = self.state.write().expect("rings lock");
        if state.read.as_ref().is_some_and(|(last, _)| *last > started) {
            return; // a newer read got here first
        }
        state.noted.retain(|_, (_, at)| *at >= started);
        state.read = Some((started, ringing));
    }

    /// Notes a write of this instance that just committed: `agent` is rung (`Some`) or no
    /// longer (`None`).
    pub fn note(&self, agent: &str, ring: Option<Ringing>) {
        let mut state = self.state.write().expect("rings lock");
        state.noted.insert(agent.to_owned(), (ring, Instant::now()));
    }

    /// The rings for a read of many agents at once.
    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("rings lock")
    }
}

impl State {
    /// `agent`'s ring from the newest of: the directory read that began at `view_started`
    /// and found `in_view`, the last read of the ringing agents, and a note.
    pub fn ring_of(
        &self,
        agent: &str,
        in_view: Option<&Ringing>,
        view_started: Instant,
    ) -> Option<Ringing> {
        let mut newest = (view_started, in_view);
        if let Some((started, ringing)) = &self.read
            && *started > newest.0
        {
            newest = (*started, ringing.get(agent));
        }
        if let Some((ring, at)) = self.noted.get(agent)
            && *at > newest.0
        {
            newest = (*at, ring.as_ref());
        }
        newest.1.cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ring(since_ms: i64) -> Ringing {
        Ringing {
            since_ms,
            queue: "sales".into(),
        }
    }

    #[test]
    fn the_newest_read_or_note_decides_each_agent_s_ring() {
        let rings = Rings::default();
        // Three reads that started before the notes below.
        let ago = |ms| {
            Instant::now()
                .checked_sub(Duration::from_millis(ms))
                .expect("uptime")
        };
        let (t0, t1, t2) = (ago(30), ago(20), ago(10));
        // Nothing read yet: the directory read decides.
        assert_eq!(
            rings.state().ring_of("1001", Some(&ring(1)), t0),
            Some(ring(1))
        );
        // A later read of the rings overrides an earlier directory read, both ways.
        rings.set_read(t1, BTreeMap::from([("1002".to_owned(), ring(2))]));
        let state = rings.state();
        assert_eq!(state.ring_of("1001", Some(&ring(1)), t0), None);
        assert_eq!(state.ring_of("1002", None, t0), Some(ring(2)));
        // A later directory read (the answer that cleared the ring) overrides it.
        assert_eq!(state.ring_of("1002", None, t2), None);
        drop(state);
        // A ring written here shows at once, over both reads before it.
        rings.note("1003", Some(ring(3)));
        rings.note("1002", None);
        let state = rings.state();
        assert_eq!(state.ring_of("1003", None, t2), Some(ring(3)));
        assert_eq!(state.ring_of("1002", Some(&ring(2)), t2), None);
        drop(state);
        // A read that started after the notes replaces them; an older read is ignored.
        let later = Instant::now() + Duration::from_millis(1);
        rings.set_read(later, BTreeMap::new());
        rings.set_read(t1, BTreeMap::from([("1003".to_owned(), ring(3))]));
        let state = rings.state();
        assert_eq!(state.ring_of("1003", None, t2), None);
        assert!(state.noted.is_empty());
    }
}
