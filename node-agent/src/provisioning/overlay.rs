//! Reads see writes: an answer of the control plane with the writes logged after it applied
//! on top, sans-IO.
//!
//! While the control plane is away, a phone that registers on this node is a `store` into
//! `ps_contacts` that only the node-agent has seen; the cached `multi` Asterisk asks when it
//! dials that phone was fetched before. Replaying the writes over the cached rows makes the
//! phone reachable (and a phone that unregistered unreachable) until the control plane
//! answers again. Replaying a write the control plane has already applied changes nothing
//! (a store replaces the row by its `id`, an update sets the same values, a destroy finds
//! nothing), so the log may overlap the answer.

use callfleet_core::realtime::{self, Field, Operation, Request, Row};

/// A row and whether a write added or changed it.
struct Overlaid {
    row: Row,
    touched: bool,
}

/// The rows of `rows` (a whole family) that meet `read`'s conditions; a `single` answers
/// its first. `None` when `rows` is not rows.
pub(super) fn narrowed(rows: &str, read: &Request) -> Option<String> {
    let limit = if read.operation == Operation::Single {
        1
    } else {
        usize::MAX
    };
    Some(
        realtime::parse_rows(rows)
            .ok()?
            .iter()
            .filter(|row| realtime::matches(row, &read.fields))
            .take(limit)
            .map(|row| realtime::print_row(row.iter().map(|(n, v)| (n.as_str(), v.as_str()))))
            .collect(),
    )
}

/// The answer to `read` (a `single` or `multi`) from `base`, the control plane's answer to
/// the same request, with `writes` applied in order. Rows no write touched are the control
/// plane's and pass as they are (its matching is the authority, e.g. on case); rows a write
/// added or changed pass when they meet the read's conditions. A `single` answers its first
/// row. `None` when `base` is not rows (the caller then answers `base` unchanged).
pub(super) fn answer<'a>(
    base: &str,
    writes: impl IntoIterator<Item = &'a Request>,
    read: &Request,
) -> Option<String> {
    let mut rows: Vec<Overlaid> = realtime::parse_rows(base)
        .ok()?
        .into_iter()
        .map(|row| Overlaid {
            row,
            touched: false,
        })
        .collect();
    for write in writes {
        apply(&mut rows, write);
    }
    let mut out = String::new();
    let passing = rows
        .iter()
        .filter(|overlaid| !overlaid.touched || realtime::matches(&overlaid.row, &read.fields));
    for overlaid in passing.take(if read.operation == Operation::Single {
        1
    } else {
        usize::MAX
    }) {
        out.push_str(&realtime::print_row(
            overlaid
                .row
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
        ));
    }
    Some(out)
}

/// One write on the rows, as a SQL backend would run it.
fn apply(rows: &mut Vec<Overlaid>, write: &Request) {
    match write.operation {
        Operation::Store => {
            let row: Row = write
                .fields
                .iter()
                .map(|field| (field.name.clone(), field.value.clone()))
                .collect();
            let id = realtime::value(&row, "id");
            let existing = id.and_then(|id| {
                rows.iter()
                    .position(|have| realtime::value(&have.row, "id") == Some(id))
            });
            match existing {
                Some(at) => rows[at] = Overlaid { row, touched: true },
                None => rows.push(Overlaid { row, touched: true }),
            }
        }
        // `update?id=X` names its row in the query; `update2` its lookup conditions. An
        // empty condition list would change every row, which Asterisk never asks for.
        Operation::Update | Operation::Update2 if !write.query.is_empty() => {
            for overlaid in rows
                .iter_mut()
                .filter(|overlaid| realtime::matches(&overlaid.row, &write.query))
            {
                merge(&mut overlaid.row, &write.fields);
                overlaid.touched = true;
            }
        }
        Operation::Destroy => {
            let conditions: Vec<Field> = write.query.iter().chain(&write.fields).cloned().collect();
            if !conditions.is_empty() {
                rows.retain(|overlaid| !realtime::matches(&overlaid.row, &conditions));
            }
        }
        _ => {}
    }
}

/// Sets each field's column in `row`, appending the columns it lacks.
fn merge(row: &mut Row, fields: &[Field]) {
    for field in fields {
        match row.iter_mut().find(|(name, _)| *name == field.name) {
            Some((_, value)) => value.clone_from(&field.value),
            None => row.push((field.name.clone(), field.value.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, body: &str) -> Request {
        realtime::parse_request(target, body.as_bytes()).expect("a res_config_curl request")
    }

    fn overlay(base: &str, writes: &[Request], read: &Request) -> String {
        answer(base, writes, read).expect("rows")
    }

    const CONTACT: &str = "id=2001%3B%40abc&uri=sip%3A2001%40127.0.0.1%3A5071&endpoint=2001\n";

    #[test]
    fn a_store_adds_a_row_or_replaces_the_one_with_its_id() {
        let by_prefix = request("/ps_contacts/multi", "id%20LIKE=2001%3B%40%25");
        let store = request(
            "/ps_contacts/store",
            "id=2001%3B%40abc&uri=sip%3A2001%40127.0.0.1%3A5071&endpoint=2001",
        );
        assert_eq!(
            overlay("", std::slice::from_ref(&store), &by_prefix),
            CONTACT
        );
        // Replayed over an answer that already has it: the same single row.
        assert_eq!(overlay(CONTACT, &[store], &by_prefix), CONTACT);
        let moved = request(
            "/ps_contacts/store",
            "id=2001%3B%40abc&uri=sip%3A2001%40127.0.0.1%3A5099&endpoint=2001",
        );
        assert_eq!(
            overlay(CONTACT, &[moved], &by_prefix),
            "id=2001%3B%40abc&uri=sip%3A2001%40127.0.0.1%3A5099&endpoint=2001\n"
        );
        // A row that does not meet the read's conditions is not shown.
        let other = request("/ps_contacts/store", "id=2002%3B%40def&endpoint=2002");
        assert_eq!(overlay("", &[other], &by_prefix), "");
    }

    #[test]
    fn an_update_merges_into_the_rows_its_query_names() {
        let read = request("/ps_contacts/single", "id=2001%3B%40abc");
        let update = request(
            "/ps_contacts/update?id=2001%3B%40abc",
            "uri=sip%3A2001%40127.0.0.1%3A5099&expiration_time=1764000000",
        );
        assert_eq!(
            overlay(CONTACT, &[update], &read),
            "id=2001%3B%40abc&uri=sip%3A2001%40127.0.0.1%3A5099&endpoint=2001&expiration_time=1764000000\n"
        );
        let elsewhere = request("/ps_contacts/update?id=2002%3B%40def", "uri=sip%3Ax");
        assert_eq!(overlay(CONTACT, &[elsewhere], &read), CONTACT);
        // update2: lookup conditions in the query, values in the body; a row the change
        // takes out of the read's conditions is no longer shown.
        let by_endpoint = request("/ps_contacts/multi", "endpoint=2001");
        let update2 = request("/ps_contacts/update2?endpoint=2001", "endpoint=2003");
        assert_eq!(overlay(CONTACT, &[update2], &by_endpoint), "");
    }

    #[test]
    fn a_destroy_removes_the_rows_meeting_its_conditions() {
        let read = request("/ps_contacts/multi", "id%20LIKE=2001%3B%40%25");
        let destroy = request("/ps_contacts/destroy", "id=2001%3B%40abc&");
        assert_eq!(overlay(CONTACT, std::slice::from_ref(&destroy), &read), "");
        let store = request("/ps_contacts/store", "id=2001%3B%40abc&endpoint=2001");
        assert_eq!(overlay("", &[store.clone(), destroy.clone()], &read), "");
        assert_eq!(
            overlay("", &[destroy, store], &read),
            "id=2001%3B%40abc&endpoint=2001\n"
        );
        // No conditions: nothing, never everything.
        let unbounded = request("/ps_contacts/destroy", "");
        assert_eq!(overlay(CONTACT, &[unbounded], &read), CONTACT);
    }

    #[test]
    fn untouched_rows_pass_as_the_control_plane_matched_them_and_single_answers_one() {
        // The control plane matched these (say case-insensitively); the overlay does not
        // second-guess rows no write touched.
        let base = "id=ALICE&endpoint=a\nid=BOB&endpoint=b\n";
        let read = request("/ps_endpoints/multi", "id%20LIKE=%25e%25");
        assert_eq!(overlay(base, &[], &read), base);
        let single = request("/ps_endpoints/single", "id%20LIKE=%25");
        assert_eq!(overlay(base, &[], &single), "id=ALICE&endpoint=a\n");
        assert_eq!(answer("garbage=%ZZ", &[], &read), None);
    }
}
