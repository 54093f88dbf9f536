//! Feeds arbitrary bytes to the AMI greeting and message parsers the way the client does:
//! the greeting first, then message after message until the parser wants more bytes.
//!
//! Besides "never panics", it checks the promises the client's read loop relies on: a
//! parsed value never claims more bytes than it was given nor zero bytes, and a strict
//! prefix of a whole message is never mistaken for a different message.

#![no_main]

use callfleet_node_agent::ami::proto::{active_calls, parse_greeting, parse_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    if let Ok(Some((_, used))) = parse_greeting(rest) {
        assert!(used > 0 && used <= rest.len());
        rest = &rest[used..];
    }
    while let Ok(Some((msg, used))) = parse_message(rest) {
        assert!(used > 0 && used <= rest.len());
        // A message cut short must read as "need more bytes", whatever the cut.
        for cut in [used - 1, used / 2] {
            let prefix = parse_message(&rest[..cut]);
            assert!(
                matches!(prefix, Ok(None)),
                "prefix of {cut} bytes gave {prefix:?}"
            );
        }
        let _ = active_calls(&msg);
        rest = &rest[used..];
    }
    // Messages without a greeting in front, as after a reconnect mid-stream.
    let _ = parse_message(data);
});
