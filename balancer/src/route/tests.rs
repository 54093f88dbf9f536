use std::collections::HashMap;

use callfleet_core::testing::node_status;

use super::*;

fn node(id: &str, calls: u32, max_calls: u32) -> NodeStatus {
    NodeStatus {
        calls,
        max_calls,
        ..node_status(id, &format!("sip:{id}.example.net:5060"))
    }
}

const SCORING: Scoring = Scoring {
    heartbeat_ttl: Duration::from_secs(6),
    cpu_weight: 0.5,
};

fn local() -> NodeId {
    NodeId::new("lb").expect("id")
}

fn default_pool() -> PoolName {
    PoolName::new("default").expect("pool")
}

fn view(nodes: Vec<NodeStatus>) -> FleetView {
    FleetView::from_nodes(nodes, &local(), None, Instant::now())
}

/// Sends `calls` INVITEs through the view and counts where they land.
fn burst(view: &FleetView, calls: usize) -> HashMap<String, usize> {
    let mut landed = HashMap::new();
    let mut out = [Choice { index: 0 }];
    for _ in 0..calls {
        let n = view.choose(
            &default_pool(),
            SCORING,
            Trust::Full,
            view.read_at,
            &mut out,
        );
        assert_eq!(n, 1, "a node has room");
        *landed
            .entry(view.nodes[out[0].index].id.to_string())
            .or_insert(0) += 1;
    }
    landed
}

fn first_choice(view: &FleetView) -> Option<String> {
    let mut out = [Choice { index: 0 }];
    let n = view.choose(
        &default_pool(),
        SCORING,
        Trust::Full,
        view.read_at,
        &mut out,
    );
    (n > 0).then(|| view.nodes[out[0].index].id.to_string())
}

#[test]
fn a_burst_between_heartbeats_spreads_evenly() {
    let view = view((1..=4).map(|i| node(&format!("n{i}"), 0, 5000)).collect());
    let landed = burst(&view, 10_000);
    let max = *landed.values().max().expect("some") as f64;
    let min = *landed.values().min().expect("some") as f64;
    assert_eq!(landed.len(), 4);
    assert!(max / min <= 1.05, "max/min share {max}/{min}");
}

#[test]
fn shares_follow_capacity() {
    let view = view(vec![
        node("small", 0, 100),
        node("medium", 0, 200),
        node("large", 0, 300),
    ]);
    // 540 calls fill the fleet to 90 % between two heartbeats.
    let landed = burst(&view, 540);
    for (id, capacity) in [("small", 1.0), ("medium", 2.0), ("large", 3.0)] {
        let expected = 540.0 * capacity / 6.0;
        let share = landed[id] as f64;
        assert!(
            (share - expected).abs() / expected <= 0.05,
            "{id}: {share} calls, expected {expected:.0} ± 5 %"
        );
    }
}

#[test]
fn least_utilised_wins_and_cpu_is_a_penalty() {
    let view1 = view(vec![node("busy", 90, 100), node("idle", 10, 100)]);
    assert_eq!(first_choice(&view1).as_deref(), Some("idle"));
    let mut hot = node("hot", 10, 100);
    hot.cpu_pct = 95.0;
    let view2 = view(vec![hot, node("cool", 30, 100)]);
    assert_eq!(first_choice(&view2).as_deref(), Some("cool"));
}

#[test]
fn ties_prefer_the_local_node() {
    let view = view(vec![
        node("a", 5, 100),
        node("lb", 5, 100),
        node("b", 5, 100),
    ]);
    assert_eq!(first_choice(&view).as_deref(), Some("lb"));
}

#[test]
fn ineligible_nodes_get_nothing() {
    let mut draining = node("draining", 0, 100);
    draining.state = NodeState::Draining;
    let mut asked = node("asked", 0, 100);
    asked.drain_requested = true;
    let mut stale = node("stale", 0, 100);
    stale.age_ms = 7000;
    let mut pbx_down = node("pbx-down", 0, 100);
    pbx_down.pbx_up = false;
    let full = node("full", 100, 100);
    let mut elsewhere = node("elsewhere", 0, 100);
    elsewhere.pool = PoolName::new("de").expect("pool");
    let view = view(vec![draining, asked, stale, pbx_down, full, elsewhere]);
    assert_eq!(first_choice(&view), None);
    assert!(
        view.can_route(SCORING, Trust::Full, view.read_at),
        "the node of pool de could take a call for de"
    );
    let without = FleetView::from_nodes(
        view.nodes
            .iter()
            .take(5)
            .map(|n| node(n.id.as_str(), 100, 100))
            .collect(),
        &local(),
        None,
        Instant::now(),
    );
    assert!(!without.can_route(SCORING, Trust::Full, without.read_at));
}

#[test]
fn heartbeats_age_between_reads() {
    let view = view(vec![node("n1", 0, 100)]);
    let later = view.read_at + Duration::from_secs(6);
    let mut out = [Choice { index: 0 }];
    assert_eq!(
        view.choose(&default_pool(), SCORING, Trust::Full, later, &mut out),
        0,
        "100 ms old at the read, 6.1 s old now"
    );
}

#[test]
fn pending_fills_capacity_and_resets_on_a_new_heartbeat() {
    let first = view(vec![node("n1", 0, 3)]);
    assert_eq!(burst(&first, 3)["n1"], 3);
    assert_eq!(first_choice(&first), None, "3 pending of 3");
    let same = FleetView::from_nodes(
        vec![node("n1", 0, 3)],
        &local(),
        Some(&first),
        Instant::now(),
    );
    assert_eq!(
        first_choice(&same),
        None,
        "same heartbeat: pending carried over"
    );
    let mut newer = node("n1", 3, 10);
    newer.seq = 2;
    let next = FleetView::from_nodes(vec![newer], &local(), Some(&same), Instant::now());
    assert_eq!(next.nodes[0].pending.load(Ordering::Relaxed), 0);
    assert_eq!(first_choice(&next).as_deref(), Some("n1"));
}

#[test]
fn alternatives_come_best_first() {
    let view = view(vec![
        node("c", 30, 100),
        node("a", 10, 100),
        node("b", 20, 100),
    ]);
    let mut out = [Choice { index: 0 }; 3];
    let n = view.choose(
        &default_pool(),
        SCORING,
        Trust::Full,
        view.read_at,
        &mut out,
    );
    let order: Vec<_> = out[..n]
        .iter()
        .map(|c| view.nodes[c.index].id.to_string())
        .collect();
    assert_eq!(order, ["a", "b", "c"]);
}

#[test]
fn local_only_needs_a_live_pbx() {
    let view = view(vec![node("lb", 0, 100), node("other", 0, 100)]);
    let mut out = [Choice { index: 0 }];
    let dead = Trust::LocalOnly { pbx_alive: false };
    assert_eq!(
        view.choose(&default_pool(), SCORING, dead, view.read_at, &mut out),
        0
    );
    let alive = Trust::LocalOnly { pbx_alive: true };
    let much_later = view.read_at + Duration::from_secs(600);
    assert_eq!(
        view.choose(&default_pool(), SCORING, alive, much_later, &mut out),
        1
    );
    assert_eq!(view.nodes[out[0].index].id.as_str(), "lb");
}

#[test]
fn pools_match_domains_then_prefixes() {
    let rule = |name: &str, domains: &[&str], prefixes: &[&str]| PoolRule {
        name: PoolName::new(name).expect("pool"),
        domains: domains.iter().map(|s| s.to_string()).collect(),
        prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
    };
    let map = PoolMap::new(vec![
        rule("tenant-a", &["a.example.com"], &[]),
        rule("germany", &[], &["49"]),
    ]);
    assert_eq!(
        map.pool_for(b"A.EXAMPLE.COM", Some(b"100")).as_str(),
        "tenant-a"
    );
    assert_eq!(map.pool_for(b"lb", Some(b"+4930123")).as_str(), "germany");
    assert_eq!(map.pool_for(b"lb", Some(b"4930123")).as_str(), "germany");
    assert_eq!(map.pool_for(b"lb", Some(b"3312")).as_str(), "default");
    assert_eq!(map.pool_for(b"lb", None).as_str(), "default");
}

#[test]
fn ties_spread_across_balancers() {
    // Four idle nodes just after a heartbeat, as 1,000 balancers see them: each balancer's
    // first call goes to the node its own tie-break prefers, not all to the first one.
    let nodes: Vec<NodeStatus> = (1..=4).map(|i| node(&format!("n{i}"), 0, 100)).collect();
    let mut first_calls: HashMap<String, usize> = HashMap::new();
    for b in 0..1000 {
        let balancer = NodeId::new(format!("lb-{b}")).expect("id");
        let view = FleetView::from_nodes(nodes.clone(), &balancer, None, Instant::now());
        let chosen = first_choice(&view).expect("an idle node");
        *first_calls.entry(chosen).or_insert(0) += 1;
    }
    let mut shares: Vec<(String, usize)> = first_calls.into_iter().collect();
    shares.sort();
    // The tie-break is a fixed function of the two ids: these are its exact shares.
    assert_eq!(
        shares,
        [
            ("n1".to_owned(), 257),
            ("n2".to_owned(), 255),
            ("n3".to_owned(), 240),
            ("n4".to_owned(), 248),
        ]
    );
    // One balancer still spreads its own burst by `pending`.
    let view = view(nodes);
    let landed = burst(&view, 400);
    assert_eq!(landed.values().copied().collect::<Vec<_>>(), [100; 4]);
}

#[test]
fn a_pool_is_full_only_when_its_live_nodes_are_at_capacity() {
    let full = view(vec![node("a", 10, 10), node("b", 5, 5)]);
    assert!(full.pool_full(&default_pool(), SCORING, Trust::Full, full.read_at));
    let room = view(vec![node("a", 10, 10), node("b", 4, 5)]);
    assert!(!room.pool_full(&default_pool(), SCORING, Trust::Full, room.read_at));
    // A pool without a live node is not "full": nobody there could take the call.
    let stale = FleetView::from_nodes(
        vec![NodeStatus {
            age_ms: 60_000,
            ..node("a", 10, 10)
        }],
        &local(),
        None,
        Instant::now(),
    );
    assert!(!stale.pool_full(&default_pool(), SCORING, Trust::Full, stale.read_at));
    let elsewhere = PoolName::new("germany").expect("pool");
    assert!(!full.pool_full(&elsewhere, SCORING, Trust::Full, full.read_at));
}
