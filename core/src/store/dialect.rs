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
    /// Binds: node id, seconds of history. Columns: at, calls, load1, cpu_pct, mem_pct.
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
        "SELECT CAST(at AS CHAR), calls, load1, cpu_pct, mem_pct FROM node_samples ",
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
        "SELECT at, calls, load1, cpu_pct, mem_pct FROM node_samples WHERE node_id = ? ",
        "AND at >= strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ? || ' seconds') ORDER BY at"
    ),
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
        assert_eq!(SET_DRAIN.matches('?').count(), 4);
    }
}
