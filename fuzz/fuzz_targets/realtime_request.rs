//! Feeds arbitrary bytes to the res_config_curl request parser the way the provisioning
//! endpoint does (the request target, a newline, the body). Besides "never panics", a row
//! printed from parsed fields must read back as the same fields: what the node-agent caches
//! and serves again is what Asterisk sent.

#![no_main]

use callfleet_core::realtime::{parse_request, print_row};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (target, body) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(target) = std::str::from_utf8(target) else {
        return;
    };
    let Ok(request) = parse_request(target, body) else {
        return;
    };
    let row: Vec<(&str, &str)> = request
        .fields
        .iter()
        .filter(|field| field.operator.is_none() && !field.name.contains(' '))
        .map(|field| (field.name.as_str(), field.value.as_str()))
        .collect();
    if row.is_empty() {
        return;
    }
    let printed = print_row(row.iter().copied());
    assert_eq!(printed.matches('\n').count(), 1, "one row is one line");
    let back = parse_request("/fuzz/single", printed.as_bytes()).expect("a printed row parses");
    let read: Vec<(&str, &str)> = back
        .fields
        .iter()
        .map(|field| (field.name.as_str(), field.value.as_str()))
        .collect();
    assert_eq!(read, row);
});
