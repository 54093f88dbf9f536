//! The SQL that differs between MySQL and SQLite. Both dialects bind the same parameters
//! in the same order, so the store's Rust code is written once.
//!
//! Every timestamp is taken from the database clock (`NOW(6)` / `'now'`), and ages are
//! computed by the database too: no node's clock is ever compared with another's.

/// SQL statements of one database dialect.
#[derive(Debug)]
pub(crate) struct Dialect {
    pub name: &'static str,
    /// Binds: id, pool, role, sip_uri, refusing_calls, pbx_up, calls, max_calls, load1,
    /// cpu_pct, mem_pct, cores, services, interval_ms, refusing_calls, first_of_run.
    pub upsert_heartbeat: &'static str,
    /// Binds: node id, calls, load1, cpu_pct, mem_pct.
    pub insert_sample: &'static str,
    /// Binds: node id, retention in seconds.
    pub prune_samples: &'static str,
    /// Columns as read by `Store::list_nodes`, ending in `uptime_ms, age_ms`. Unordered and
    /// free of date formatting: this read runs every refresh of every balancer, so the
    /// server does the least work and the caller sorts.
    pub list_nodes: &'static str,
    /// Binds: node id, seconds of history. Columns: at, calls, load1, cpu_pct, mem_pct, age_ms.
    pub samples_since: &'static str,
}

/// Recomputes `state` from the operator's drain request, the shed tiers and the calls.
/// Written in terms of the row's current values; the upserts substitute the new ones.
macro_rules! state_case {
    ($drain:literal, $refusing:literal, $calls:literal) => {
        concat!(
            "CASE WHEN ",
            $drain,
            " = 1 AND ",
            $calls,
            " = 0 THEN 'drained' ",
            "WHEN ",
            $drain,
            " = 1 OR ",
            $refusing,
            " = 1 THEN 'draining' ",
            "ELSE 'active' END"
        )
    };
}

/// Sets or clears an operator's drain request and recomputes the state at once.
/// Binds: drain_requested (twice), drain_requested, node id. Same SQL for both dialects.
pub(crate) const SET_DRAIN: &str = concat!(
    "UPDATE nodes SET state = ",
    state_case!("?", "refusing_calls", "calls"),
    ", drain_requested = ? WHERE id = ?"
);

/// Binds: node id. Same SQL for both dialects.
pub(crate) const NODE_STATE: &str = "SELECT state FROM nodes WHERE id = ?";

pub(crate) static MYSQL: Dialect = Dialect {
    name: "mysql",
    upsert_heartbeat: concat!(
        "INSERT INTO nodes (id, pool, role, sip_uri, refusing_calls, pbx_up, calls, max_calls, ",
        "load1, cpu_pct, mem_pct, cores, services, interval_ms, state, drain_requested, seq, ",
        "started_at, updated_at) ",
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ",
        "IF(? = 1, 'draining', 'active'), 0, 1, NOW(6), NOW(6)) ",
        "ON DUPLICATE KEY UPDATE ",
        "started_at = IF(? = 1, NOW(6), started_at), ",
        "pool = VALUES(pool), role = VALUES(role), sip_uri = VALUES(sip_uri), ",
        "refusing_calls = VALUES(refusing_calls), pbx_up = VALUES(pbx_up), calls = VALUES(calls), ",
        "max_calls = VALUES(max_calls), load1 = VALUES(load1), cpu_pct = VALUES(cpu_pct), ",
        "mem_pct = VALUES(mem_pct), cores = VALUES(cores), services = VALUES(services), ",
        "interval_ms = VALUES(interval_ms), seq = seq + 1, ",
        "state = ",
        state_case!("drain_requested", "VALUES(refusing_calls)", "VALUES(calls)"),
        ", updated_at = NOW(6)"
    ),
    insert_sample: concat!(
        "INSERT INTO node_samples (node_id, at, calls, load1, cpu_pct, mem_pct) ",
        "VALUES (?, NOW(6), ?, ?, ?, ?)"
    ),
    prune_samples: "DELETE FROM node_samples WHERE node_id = ? AND at < DATE_SUB(NOW(6), INTERVAL ? SECOND)",
    list_nodes: concat!(
        "SELECT id, pool, role, sip_uri, state, drain_requested, pbx_up, calls, max_calls, ",
        "load1, cpu_pct, mem_pct, cores, services, seq, interval_ms, ",
        "TIMESTAMPDIFF(MICROSECOND, started_at, NOW(6)) DIV 1000, ",
        "TIMESTAMPDIFF(MICROSECOND, updated_at, NOW(6)) DIV 1000 ",
        "FROM nodes"
    ),
    samples_since: concat!(
        "SELECT CAST(at AS CHAR), calls, load1, cpu_pct, mem_pct, ",
        "TIMESTAMPDIFF(MICROSECOND, at, NOW(6)) DIV 1000 FROM node_samples ",
        "WHERE node_id = ? AND at >= DATE_SUB(NOW(6), INTERVAL ? SECOND) ORDER BY at"
    ),
};

pub(crate) static SQLITE: Dialect = Dialect {
    name: "sqlite",
    upsert_heartbeat: concat!(
        "INSERT INTO nodes (id, pool, role, sip_uri, refusing_calls, pbx_up, calls, max_calls, ",
        "load1, cpu_pct, mem_pct, cores, services, interval_ms, state, drain_requested, seq, ",
        "started_at, updated_at) ",
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ",
        "CASE WHEN ? = 1 THEN 'draining' ELSE 'active' END, 0, 1, ",
        "strftime('%Y-%m-%d %H:%M:%f', 'now'), strftime('%Y-%m-%d %H:%M:%f', 'now')) ",
        "ON CONFLICT (id) DO UPDATE SET ",
        "started_at = CASE WHEN ? = 1 THEN excluded.started_at ELSE nodes.started_at END, ",
        "pool = excluded.pool, role = excluded.role, sip_uri = excluded.sip_uri, ",
        "refusing_calls = excluded.refusing_calls, pbx_up = excluded.pbx_up, ",
        "calls = excluded.calls, max_calls = excluded.max_calls, load1 = excluded.load1, ",
        "cpu_pct = excluded.cpu_pct, mem_pct = excluded.mem_pct, cores = excluded.cores, ",
        "services = excluded.services, interval_ms = excluded.interval_ms, seq = nodes.seq + 1, ",
        "state = ",
        state_case!(
            "nodes.drain_requested",
            "excluded.refusing_calls",
            "excluded.calls"
        ),
        ", updated_at = excluded.updated_at"
    ),
    insert_sample: concat!(
        "INSERT INTO node_samples (node_id, at, calls, load1, cpu_pct, mem_pct) ",
        "VALUES (?, strftime('%Y-%m-%d %H:%M:%f', 'now'), ?, ?, ?, ?)"
    ),
    prune_samples: concat!(
        "DELETE FROM node_samples WHERE node_id = ? ",
        "AND at < strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ? || ' seconds')"
    ),
    list_nodes: concat!(
        "SELECT id, pool, role, sip_uri, state, drain_requested, pbx_up, calls, max_calls, ",
        "load1, cpu_pct, mem_pct, cores, services, seq, interval_ms, ",
        "CAST((julianday('now') - julianday(started_at)) * 86400000.0 AS INTEGER), ",
        "CAST((julianday('now') - julianday(updated_at)) * 86400000.0 AS INTEGER) ",
        "FROM nodes"
    ),
    samples_since: concat!(
        "SELECT at, calls, load1, cpu_pct, mem_pct, ",
        "CAST((julianday('now') - julianday(at)) * 86400000.0 AS INTEGER) ",
        "FROM node_samples WHERE node_id = ? ",
        "AND at >= strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ? || ' seconds') ORDER BY at"
    ),
};

/// The directory's SQL (agents, devices, sessions, queues, counters, audit) of one dialect.
///
/// The statements are written once, in `directory_sql!`, from a few fragments that differ:
/// the clock expression, the row-lock suffixes and the upsert syntax. Statements that are
/// the same text on both drivers live in `store::directory`.
#[derive(Debug)]
pub(crate) struct DirectorySql {
    /// Starts a transaction that will write. SQLite takes the write lock at once
    /// (`BEGIN IMMEDIATE`): a deferred transaction that reads and then writes fails with
    /// "database is locked" when another writer got in between, and no busy timeout helps.
    pub begin_write: &'static str,
    /// Columns: the database clock in unix ms.
    pub now_ms: &'static str,
    /// Binds: agent id. Columns: state. Locks the agent's row until commit (MySQL).
    pub lock_agent: &'static str,
    /// Binds: device id. Columns: endpoint. Locks the device's row until commit (MySQL).
    pub lock_device: &'static str,
    /// Binds: queue id. Columns: id. Locks the queue's row until commit (MySQL).
    pub lock_queue: &'static str,
    /// Binds: queue id. Columns: id. Keeps the queue from being deleted until commit (MySQL).
    pub share_queue: &'static str,
    /// Binds: queue id. Columns: service_level_ms. Locks the queue's row until commit (MySQL).
    pub lock_queue_service_level: &'static str,
    /// Binds: id, name, tags, daily_cap, enabled. A new agent starts available.
    pub upsert_agent: &'static str,
    /// Binds: id, endpoint, name.
    pub upsert_device: &'static str,
    /// Binds: id, name, service_level_ms.
    pub upsert_queue: &'static str,
    /// Binds: queue id, agent id, priority.
    pub upsert_member: &'static str,
    /// Binds: agent id, day. Adds one call.
    pub count_call: &'static str,
    /// Binds: agent id, day. Adds one sale.
    pub count_sale: &'static str,
    /// Binds: agent id, day. Adds one missed ring.
    pub count_missed: &'static str,
    /// Binds: queue id, day, then what to add to answered, abandoned, overflowed and
    /// answered_within_sl.
    pub count_outcome: &'static str,
    /// Binds: actor, request id, action, subject, result, answer (JSON or NULL).
    pub remember_answer: &'static str,
    /// Binds: actor, age in ms. Deletes the actor's request ids older than that.
    pub forget_requests: &'static str,
    /// Binds: agent id, device id.
    pub insert_session: &'static str,
    /// Binds: device id, agent id.
    pub move_session: &'static str,
    /// Binds: agent id. Restarts the idle time of an available agent who just logged in.
    pub idle_from_now: &'static str,
    /// Binds: reason, agent id.
    pub pause: &'static str,
    /// Binds: reason, agent id. Pauses the agent only if they could be rung now (available,
    /// or in a wrap-up that has ended).
    pub pause_if_available: &'static str,
    /// Binds: agent id. Keeps `idle_since_ms` of an agent who was already available, or
    /// whose wrap-up has ended (idle since its end); otherwise idle from now.
    pub unpause: &'static str,
    /// Binds: wrap-up ms, wrap-up ms, agent id. The agent is idle from the end of wrap-up.
    pub wrap_up: &'static str,
    /// Binds: agent id. A call ended without wrap-up: available, idle from now.
    pub end_call: &'static str,
    /// Binds: agent id. Columns: state, reason, until_ms, idle_since_ms, now_ms,
    /// ringing_since_ms, ringing_queue, state_since_ms.
    pub availability: &'static str,
    /// Binds: agent id. The agent is on a call from now.
    pub on_call: &'static str,
    /// Binds: agent id. [`Self::on_call`] for an answered queued call, which also ends the
    /// ring and the agent's misses in a row.
    pub answered: &'static str,
    /// Binds: queue id, agent id. The agent is rung from now.
    pub ring: &'static str,
    /// Binds: actor, action, subject, detail.
    pub insert_audit: &'static str,
    /// Binds: number. Makes the number's row exist (with no attributes) and locks it until
    /// commit (MySQL), so the read that follows sees the current row: locking a row that
    /// may be missing (`SELECT … FOR UPDATE`) takes a gap lock, and two writers of one new
    /// number would both hold it and deadlock on their inserts.
    pub ensure_caller: &'static str,
    /// Binds: number. Columns: attributes. Locks the row until commit (MySQL).
    pub lock_caller: &'static str,
}

/// The directory statements of a dialect, built from its fragments: `$now` is the database
/// clock in unix ms, `$for_update`/`$for_share` the row-lock suffixes, `$upsert` the start
/// of the conflict clause and `$new` a macro naming the value an upsert proposed.
/// `state_since_ms` kept when the agent already is in `$state`, else now. Comes first in
/// an UPDATE's SET: MySQL assigns left to right, so it must see the state before the
/// change.
macro_rules! state_since {
    ($state:literal, $now:expr) => {
        concat!(
            "state_since_ms = CASE WHEN state = '",
            $state,
            "' THEN state_since_ms ELSE ",
            $now,
            " END, "
        )
    };
}

macro_rules! directory_sql {
    (
        begin_write: $begin:literal,
        now: $now:literal,
        for_update: $for_update:literal,
        for_share: $for_share:literal,
        upsert: $upsert:literal,
        new: $new:ident $(,)?
    ) => {
        DirectorySql {
            begin_write: $begin,
            now_ms: concat!("SELECT ", $now),
            lock_agent: concat!("SELECT state FROM agents WHERE id = ?", $for_update),
            lock_device: concat!("SELECT endpoint FROM devices WHERE id = ?", $for_update),
            lock_queue: concat!("SELECT id FROM queues WHERE id = ?", $for_update),
            share_queue: concat!("SELECT id FROM queues WHERE id = ?", $for_share),
            lock_queue_service_level: concat!(
                "SELECT service_level_ms FROM queues WHERE id = ?",
                $for_update
            ),
            upsert_agent: concat!(
                "INSERT INTO agents (id, name, tags, daily_cap, enabled, state, idle_since_ms, ",
                "state_since_ms) VALUES (?, ?, ?, ?, ?, 'available', ",
                $now,
                ", ",
                $now,
                ") ",
                $upsert,
                "name = ",
                $new!("name"),
                ", tags = ",
                $new!("tags"),
                ", daily_cap = ",
                $new!("daily_cap"),
                ", enabled = ",
                $new!("enabled")
            ),
            upsert_device: concat!(
                "INSERT INTO devices (id, endpoint, name, contact) VALUES (?, ?, ?, ?) ",
                $upsert,
                "endpoint = ",
                $new!("endpoint"),
                ", name = ",
                $new!("name"),
                ", contact = ",
                $new!("contact")
            ),
            upsert_queue: concat!(
                "INSERT INTO queues (id, name, service_level_ms) VALUES (?, ?, ?) ",
                $upsert,
                "name = ",
                $new!("name"),
                ", service_level_ms = ",
                $new!("service_level_ms")
            ),
            upsert_member: concat!(
                "INSERT INTO queue_members (queue_id, agent_id, priority) VALUES (?, ?, ?) ",
                $upsert,
                "priority = ",
                $new!("priority")
            ),
            count_call: concat!(
                "INSERT INTO daily_counters (agent_id, day, calls, sales) VALUES (?, ?, 1, 0) ",
                $upsert,
                "calls = calls + 1"
            ),
            count_sale: concat!(
                "INSERT INTO daily_counters (agent_id, day, calls, sales) VALUES (?, ?, 0, 1) ",
                $upsert,
                "sales = sales + 1"
            ),
            count_missed: concat!(
                "INSERT INTO daily_counters (agent_id, day, calls, sales, missed) ",
                "VALUES (?, ?, 0, 0, 1) ",
                $upsert,
                "missed = missed + 1"
            ),
            count_outcome: concat!(
                "INSERT INTO queue_daily_counters ",
                "(queue_id, day, answered, abandoned, overflowed, answered_within_sl) ",
                "VALUES (?, ?, ?, ?, ?, ?) ",
                $upsert,
                "answered = answered + ",
                $new!("answered"),
                ", abandoned = abandoned + ",
                $new!("abandoned"),
                ", overflowed = overflowed + ",
                $new!("overflowed"),
                ", answered_within_sl = answered_within_sl + ",
                $new!("answered_within_sl")
            ),
            insert_session: concat!(
                "INSERT INTO sessions (agent_id, device_id, since_ms) VALUES (?, ?, ",
                $now,
                ")"
            ),
            move_session: concat!(
                "UPDATE sessions SET device_id = ?, since_ms = ",
                $now,
                " WHERE agent_id = ?"
            ),
            idle_from_now: concat!(
                "UPDATE agents SET idle_since_ms = ",
                $now,
                " WHERE id = ? AND state = 'available'"
            ),
            pause: concat!(
                "UPDATE agents SET ",
                state_since!("paused", $now),
                "state = 'paused', reason = ?, until_ms = NULL WHERE id = ?"
            ),
            pause_if_available: concat!(
                "UPDATE agents SET state_since_ms = ",
                $now,
                ", state = 'paused', reason = ?, until_ms = NULL WHERE id = ? ",
                "AND (state = 'available' OR (state = 'wrap_up' AND until_ms <= ",
                $now,
                "))"
            ),
            // MySQL assigns left to right and later assignments see earlier ones, so
            // `idle_since_ms` is computed first, from the state before this change.
            unpause: concat!(
                "UPDATE agents SET idle_since_ms = CASE ",
                "WHEN state = 'available' THEN idle_since_ms ",
                "WHEN state = 'wrap_up' AND until_ms <= ",
                $now,
                " THEN until_ms ",
                "ELSE ",
                $now,
                " END, state_since_ms = CASE ",
                "WHEN state = 'available' THEN state_since_ms ",
                "WHEN state = 'wrap_up' AND until_ms <= ",
                $now,
                " THEN until_ms ",
                "ELSE ",
                $now,
                " END, ",
                "state = 'available', reason = NULL, until_ms = NULL WHERE id = ?"
            ),
            wrap_up: concat!(
                "UPDATE agents SET state_since_ms = ",
                $now,
                ", state = 'wrap_up', reason = NULL, until_ms = ",
                $now,
                " + ?, idle_since_ms = ",
                $now,
                " + ? WHERE id = ?"
            ),
            end_call: concat!(
                "UPDATE agents SET ",
                state_since!("available", $now),
                "state = 'available', reason = NULL, until_ms = NULL, ",
                "idle_since_ms = ",
                $now,
                " WHERE id = ?"
            ),
            availability: concat!(
                "SELECT state, reason, until_ms, idle_since_ms, ",
                $now,
                ", ringing_since_ms, ringing_queue, state_since_ms FROM agents WHERE id = ?"
            ),
            on_call: concat!(
                "UPDATE agents SET ",
                state_since!("on_call", $now),
                "state = 'on_call', reason = NULL, until_ms = NULL WHERE id = ?"
            ),
            // An answered call also ends the agent's misses in a row.
            answered: concat!(
                "UPDATE agents SET ",
                state_since!("on_call", $now),
                "state = 'on_call', reason = NULL, until_ms = NULL, misses_in_row = 0, ",
                "ringing_since_ms = NULL, ringing_queue = NULL WHERE id = ?"
            ),
            ring: concat!(
                "UPDATE agents SET ringing_since_ms = ",
                $now,
                ", ringing_queue = ? WHERE id = ?"
            ),
            remember_answer: concat!(
                "INSERT INTO request_ids (actor, request_id, action, subject, result, answer, ",
                "at_ms) VALUES (?, ?, ?, ?, ?, ?, ",
                $now,
                ")"
            ),
            forget_requests: concat!(
                "DELETE FROM request_ids WHERE actor = ? AND at_ms < ",
                $now,
                " - ?"
            ),
            insert_audit: concat!(
                "INSERT INTO audit_log (at_ms, actor, action, subject, detail) VALUES (",
                $now,
                ", ?, ?, ?, ?)"
            ),
            ensure_caller: concat!(
                "INSERT INTO caller_attributes (number, attributes) VALUES (?, '[]') ",
                $upsert,
                "number = number"
            ),
            lock_caller: concat!(
                "SELECT attributes FROM caller_attributes WHERE number = ?",
                $for_update
            ),
        }
    };
}

macro_rules! mysql_new {
    ($column:literal) => {
        concat!("VALUES(", $column, ")")
    };
}

macro_rules! sqlite_new {
    ($column:literal) => {
        concat!("excluded.", $column)
    };
}

/// UTC_TIMESTAMP rather than NOW: the epoch is counted in UTC whatever the server's or the
/// session's time zone, and no daylight-saving hour is ambiguous.
pub(crate) static MYSQL_DIRECTORY: DirectorySql = directory_sql! {
    begin_write: "BEGIN",
    now: "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000)",
    for_update: " FOR UPDATE",
    for_share: " LOCK IN SHARE MODE",
    upsert: "ON DUPLICATE KEY UPDATE ",
    new: mysql_new,
};

/// `'now'` is the same instant for every use within one statement.
pub(crate) static SQLITE_DIRECTORY: DirectorySql = directory_sql! {
    begin_write: "BEGIN IMMEDIATE",
    now: "CAST(ROUND(unixepoch('now', 'subsec') * 1000) AS INTEGER)",
    for_update: "",
    for_share: "",
    upsert: "ON CONFLICT DO UPDATE SET ",
    new: sqlite_new,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_dialects_bind_the_same_parameters() {
        for (a, b) in [
            (MYSQL.upsert_heartbeat, SQLITE.upsert_heartbeat),
            (MYSQL.insert_sample, SQLITE.insert_sample),
            (MYSQL.prune_samples, SQLITE.prune_samples),
            (MYSQL.samples_since, SQLITE.samples_since),
        ] {
            assert_eq!(a.matches('?').count(), b.matches('?').count(), "{a}\n{b}");
        }
        assert_eq!(MYSQL.upsert_heartbeat.matches('?').count(), 16);
        let (m, s) = (&MYSQL_DIRECTORY, &SQLITE_DIRECTORY);
        for (a, b) in [
            (m.lock_agent, s.lock_agent),
            (m.lock_device, s.lock_device),
            (m.lock_queue, s.lock_queue),
            (m.share_queue, s.share_queue),
            (m.lock_queue_service_level, s.lock_queue_service_level),
            (m.upsert_agent, s.upsert_agent),
            (m.upsert_device, s.upsert_device),
            (m.upsert_queue, s.upsert_queue),
            (m.upsert_member, s.upsert_member),
            (m.count_call, s.count_call),
            (m.count_sale, s.count_sale),
            (m.count_missed, s.count_missed),
            (m.count_outcome, s.count_outcome),
            (m.remember_answer, s.remember_answer),
            (m.pause_if_available, s.pause_if_available),
            (m.end_call, s.end_call),
            (m.insert_session, s.insert_session),
            (m.move_session, s.move_session),
            (m.idle_from_now, s.idle_from_now),
            (m.pause, s.pause),
            (m.unpause, s.unpause),
            (m.wrap_up, s.wrap_up),
            (m.availability, s.availability),
            (m.ring, s.ring),
            (m.insert_audit, s.insert_audit),
            (m.ensure_caller, s.ensure_caller),
            (m.lock_caller, s.lock_caller),
        ] {
            assert_eq!(a.matches('?').count(), b.matches('?').count(), "{a}\n{b}");
        }
        assert_eq!(m.upsert_agent.matches('?').count(), 5);
        assert_eq!(m.upsert_queue.matches('?').count(), 3);
        assert_eq!(m.count_outcome.matches('?').count(), 6);
        assert_eq!(m.wrap_up.matches('?').count(), 3);
        assert_eq!(m.remember_answer.matches('?').count(), 6);
        assert_eq!(m.pause_if_available.matches('?').count(), 2);
        assert_eq!(m.insert_audit.matches('?').count(), 4);
        assert_eq!(m.ring.matches('?').count(), 2);
        assert_eq!(m.ensure_caller.matches('?').count(), 1);
        assert_eq!(SET_DRAIN.matches('?').count(), 4);
    }
}
