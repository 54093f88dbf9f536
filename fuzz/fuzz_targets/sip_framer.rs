//! Feeds arbitrary bytes to the balancer's TCP framer the way a connection delivers them:
//! in pieces whose sizes the input chooses, each frame consumed as `tcp.rs` consumes it.
//!
//! Besides "never panics": every frame claims at least one byte and no more than it was
//! given, a message is never larger than the limit, an oversized message is sampled at
//! exactly `max_message + 1` bytes, and the frames of a stream do not depend on how it
//! was cut into reads (the framer remembers where its search stopped; a slip there would
//! cut a message differently when it arrives one byte at a time).

#![no_main]

use callfleet_balancer::transport::frame::{Frame, Framer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // Two bytes choose the limit (small, to reach the oversized paths), one the cuts.
    let [a, b, cut_seed, stream @ ..] = input else {
        return;
    };
    let max_message = 16 + usize::from(u16::from_le_bytes([*a, *b]) % 2048);
    let whole = frames(stream, max_message, |_| stream.len());
    let one_byte = frames(stream, max_message, |fed| fed + 1);
    let step = usize::from(*cut_seed).max(1);
    let pieces = frames(stream, max_message, |fed| fed + step);
    assert_eq!(whole, one_byte, "whole vs one byte per read, max {max_message}");
    assert_eq!(whole, pieces, "whole vs {step} bytes per read, max {max_message}");
});

/// The frames of `stream`, read in pieces ending where `next_cut` says (given the bytes
/// fed so far). Skips are summed: discarding a body in one piece or several is the same.
fn frames(stream: &[u8], max_message: usize, next_cut: impl Fn(usize) -> usize) -> Vec<Frame> {
    let mut framer = Framer::new(max_message);
    let mut buffer: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut fed = 0;
    loop {
        loop {
            let frame = framer.next(&buffer);
            let used = match frame {
                Frame::Incomplete => break,
                Frame::Lost => {
                    out.push(frame);
                    return out;
                }
                Frame::Ping(n) => {
                    assert_eq!(n, 4, "a ping is a double CRLF");
                    n
                }
                Frame::Skip(n) => n,
                Frame::Message(n) => {
                    assert!(n <= max_message, "message of {n} over the limit {max_message}");
                    n
                }
                Frame::TooLarge(n) => {
                    assert_eq!(n, max_message + 1, "an oversized message's sample");
                    n
                }
                Frame::BadLength(n) => {
                    assert!(n >= 1 && n <= buffer.len() && n <= max_message);
                    // Answered 400, then the stream is lost (tcp.rs).
                    out.push(frame);
                    return out;
                }
            };
            assert!(used >= 1 && used <= buffer.len(), "{frame:?} of {} bytes", buffer.len());
            buffer.drain(..used);
            match (out.last_mut(), frame) {
                (Some(Frame::Skip(total)), Frame::Skip(n)) => *total += n,
                _ => out.push(frame),
            }
        }
        if fed == stream.len() {
            return out;
        }
        let cut = next_cut(fed).clamp(fed + 1, stream.len());
        buffer.extend_from_slice(&stream[fed..cut]);
        fed = cut;
    }
}
