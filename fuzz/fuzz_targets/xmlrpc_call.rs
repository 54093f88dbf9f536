//! Feeds arbitrary bytes to the XML-RPC request decoder the way the `/RPC2` handler does:
//! decode, read the arguments with every extractor, split a `system.multicall`, and encode
//! the answer.
//!
//! Besides "never panics" (and never overflowing the stack on deep nesting): every fault
//! encodes to an ASCII body that reads back as the same fault, and every call it accepts
//! can be sent back as a response that reads again, so nothing the decoder lets in makes
//! the encoder write something a client cannot parse.

#![no_main]

use callfleet_control_plane::xmlrpc::{
    Args, Fault, MULTICALL, Value, decode_call, decode_multicall, encode_fault, encode_response,
};
use libfuzzer_sys::fuzz_target;

fn read_every_way(args: Args<'_>) {
    let _ = args.arity(&["agent", "queue", "priority"]);
    for pos in 0..=args.len() {
        let _ = args.value(pos, "p");
        let _ = args.string(pos, "p");
        let _ = args.int(pos, "p");
        let _ = args.int_in(pos, "p", 0..=100);
        let _ = args.long(pos, "p");
        let _ = args.bool(pos, "p");
        let _ = args.string_list(pos, "p");
        let _ = args.attributes(pos, "p");
    }
}

fn check_fault(fault: &Fault) {
    let body = encode_fault(fault.code(), fault.string());
    assert!(body.is_ascii());
    let text = std::str::from_utf8(&body).expect("ascii");
    let back = dxr::FaultResponse::from_xml(text).expect("a fault body reads again");
    assert_eq!(back.fault.code(), fault.code());
}

fuzz_target!(|data: &[u8]| {
    let call = match decode_call(data) {
        Ok(call) => call,
        Err(fault) => return check_fault(&fault),
    };
    read_every_way(call.args());

    let body = encode_response(Value::Array(call.params.clone()));
    assert!(body.is_ascii());
    let text = std::str::from_utf8(&body).expect("ascii");
    // Not compared for equality: a NaN double or a control character sent as a character
    // reference does not come back equal, by design.
    dxr::MethodResponse::from_xml(text).expect("an accepted call can be answered");

    if call.method == MULTICALL {
        if let Ok(entries) = decode_multicall(call) {
            for entry in entries {
                match entry {
                    Ok(sub) => read_every_way(sub.args()),
                    Err(fault) => check_fault(&fault),
                }
            }
        }
    }
});
