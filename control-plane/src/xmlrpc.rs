//! The XML-RPC codec for `/RPC2`: request bytes in, a [`Call`] with typed argument access
//! out; reply values in, response bytes out. This is what the CRMs of the old system speak
//! (PHP's `xmlrpc_encode_request`, Python's `xmlrpc.client`, hand-written templates).
//!
//! # Why sans-IO
//!
//! Nothing here reads a socket, knows about HTTP or awaits anything. The axum handler for
//! `/RPC2` reads the body and the `Authorization` header, calls [`decode_call`], dispatches
//! on [`Call::method`] to the service, and writes what [`encode_response`] or
//! [`encode_fault`] returns (always with HTTP 200: a bad call is a fault, never a 500). So
//! every rule of the wire format is tested here with literal bodies, without a server, and
//! the fuzz target `xmlrpc_call` can feed it arbitrary bytes. Decoding is CPU work
//! proportional to the body: the handler caps the body size, and a very large body is
//! decoded on `spawn_blocking`.
//!
//! # Why not `dxr_server`'s router
//!
//! The values, the (de)serialization of calls, responses and faults and the multicall result
//! shape come from [`dxr`] 0.9. `dxr_server` 0.9's axum router does hand each method handler
//! the request's `HeaderMap`, so authentication could be done there; it is still not used,
//! because its request path answers a body without `Content-Length` (chunked) with a fault,
//! names every unknown method only "Unknown method." with code 404, copies the whole request
//! body into the `faultString` of a malformed call, accepts any root element and trailing
//! garbage, and has no fault codes of the interoperability table. The handler the lead
//! writes owns the route, the headers, authentication and the body limit instead, and this
//! module owns the wire format.
//!
//! # What is accepted
//!
//! Before `dxr` turns the body into values, a validating scan ([`MAX_DEPTH`] deep at most)
//! checks the XML-RPC grammar so that a mistake gets a fault string that says what and
//! where (`parameter 2, member "vip": <boolean> must be 0 or 1, found "true"`):
//!
//! - the body is UTF-8 (an optional BOM is skipped); a body that declares ISO-8859-1 (PHP's
//!   default) and is not valid UTF-8 is read as Latin-1; other declared encodings are
//!   accepted only for an all-ASCII body;
//! - one `<methodCall>` root with `<methodName>` first and at most one `<params>`; no
//!   DOCTYPE (so no entity expansion), no attributes except on the root, nothing after it;
//! - `<value>text</value>` without a type element is a string, as the specification says;
//!   whitespace around a typed element inside `<value>` (PHP's pretty-printed bodies) is
//!   ignored; `<value></value>` and `<value/>` are empty strings, and so is an untyped
//!   value of only whitespace (dxr trims it; `<string>` keeps every space);
//! - the types `i4`/`int` (32-bit), `i8` (64-bit extension), `boolean` (`0` or `1` only),
//!   `string`, `double`, `dateTime.iso8601`, `base64`, `struct`, `array` and the `nil`
//!   extension. A struct member's `<name>` must not be blank (dxr cannot read one); a
//!   struct that repeats a member name keeps the last one.
//!
//! # Fault codes
//!
//! The codes of the "specification for fault code interoperability" (see [`fault_code`]):
//! the codec itself answers -32700/-32701/-32702 for bytes that are not XML it can read,
//! -32600 for XML that is not an XML-RPC call, -32602 for arguments of the wrong number or
//! type; the handler uses -32601 for an unknown method and -32500 for the service's own
//! errors.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::{Range, RangeInclusive};

pub use dxr::{Fault, Value};
use dxr::{FaultResponse, MethodCall, MethodResponse};
use quick_xml::Reader;
use quick_xml::escape::resolve_xml_entity;
use quick_xml::events::{BytesStart, Event};

/// The fault codes this server answers with, from the "specification for fault code
/// interoperability" (the de-facto table of xmlrpc-epi, Apache XML-RPC and others).
pub mod fault_code {
    /// The body is not well-formed XML.
    pub const PARSE_ERROR: i32 = -32700;
    /// The XML declaration names an encoding the server does not read.
    pub const UNSUPPORTED_ENCODING: i32 = -32701;
    /// The body has bytes that are not valid in its encoding (not UTF-8).
    pub const INVALID_CHARACTER: i32 = -32702;
    /// The XML is well-formed but not an XML-RPC call (wrong root, missing `<methodName>`,
    /// wrong nesting, a value that does not match its type), or a malformed or nested
    /// `system.multicall` entry.
    pub const INVALID_REQUEST: i32 = -32600;
    /// No method of that name exists.
    pub const METHOD_NOT_FOUND: i32 = -32601;
    /// The method exists but its arguments are of the wrong number or type.
    pub const INVALID_PARAMS: i32 = -32602;
    /// The server failed on its own side (for example while encoding the response).
    pub const INTERNAL_ERROR: i32 = -32603;
    /// The call was understood but the service refused or failed it.
    pub const APPLICATION_ERROR: i32 = -32500;
}

/// The method name of the batch call of the de-facto multicall specification.
pub const MULTICALL: &str = "system.multicall";

/// Most calls in one `system.multicall`: a CRM's batch of a few hundred priority changes
/// fits; ten thousand status probes in one request do not.
pub const MAX_MULTICALL_CALLS: usize = 1000;

/// The method name of the introspection call that lists the server's methods.
pub const LIST_METHODS: &str = "system.listMethods";

/// Holds the deepest element nesting [`decode_call`] accepts; deeper bodies are refused
/// before they reach the recursive decoder. Real calls stay under 20 (a multicall of
/// calls that take a struct of arrays is 17 deep).
pub const MAX_DEPTH: usize = 64;

/// The XML declaration every encoded body starts with, as in the specification's examples.
const XML_DECLARATION: &str = "<?xml version=\"1.0\"?>\n";

/// Longest piece of a client's string that a fault string quotes back.
const SNIPPET_CHARS: usize = 40;

/// A decoded XML-RPC method call: what the handler dispatches on.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The method name, without surrounding whitespace (`agent.setPriority`).
    pub method: String,
    /// The parameters in order; empty when the call has no `<params>`.
    pub params: Vec<Value>,
}

impl Call {
    /// Returns typed access to the parameters, naming this call's method in its faults.
    pub fn args(&self) -> Args<'_> {
        Args::new(&self.method, &self.params)
    }
}

/// Decodes an XML-RPC `<methodCall>` request body.
///
/// # Errors
///
/// Returns a [`Fault`] ready to be encoded with [`encode_fault`]:
/// [`PARSE_ERROR`](fault_code::PARSE_ERROR) for bytes that are not well-formed XML (empty,
/// truncated, mismatched tags), [`UNSUPPORTED_ENCODING`](fault_code::UNSUPPORTED_ENCODING)
/// and [`INVALID_CHARACTER`](fault_code::INVALID_CHARACTER) for bytes it cannot read as
/// text, and [`INVALID_REQUEST`](fault_code::INVALID_REQUEST) for XML that is not an
/// XML-RPC call. The fault string says what is wrong and where; it never copies the body.
pub fn decode_call(body: &[u8]) -> Result<Call, Fault> {
    let text = body_text(body)?;
    let spans = scan(&text)?;
    let call = MethodCall::from_xml(&text).map_err(|_| diagnose(&text, &spans))?;
    Ok(Call {
        method: xml_trim(&call.name).to_owned(),
        params: call.params,
    })
}

/// Typed access to the parameters of one call, with faults that name the method, the
/// parameter's position and name, what was expected and what was found.
///
/// Positions are 0-based in the API and 1-based in fault strings, as a CRM developer
/// counts: `args.int(2, "priority")` fails with `agent.setPriority: parameter 3
/// (priority) must be an integer (<int>, <i4> or <i8>), found a string "high"`. Every
/// fault has code [`INVALID_PARAMS`](fault_code::INVALID_PARAMS).
#[derive(Clone, Copy, Debug)]
pub struct Args<'a> {
    method: &'a str,
    params: &'a [Value],
}

impl<'a> Args<'a> {
    /// Wraps the parameters of a call to `method`.
    pub fn new(method: &'a str, params: &'a [Value]) -> Self {
        Self { method, params }
    }

    /// Returns the method name faults are reported under.
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// Returns how many parameters the call has.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Tells whether the call has no parameters.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Checks that the call has exactly one parameter per name in `names`.
    ///
    /// # Errors
    ///
    /// Fails with `agent.login takes 2 parameters (agent, device), got 3` (or `takes no
    /// parameters`) when the count differs.
    pub fn arity(&self, names: &[&str]) -> Result<(), Fault> {
        if self.params.len() == names.len() {
            return Ok(());
        }
        let takes = match names.len() {
            0 => "no parameters".to_owned(),
            1 => format!("1 parameter ({})", names.join(", ")),
            n => format!("{n} parameters ({})", names.join(", ")),
        };
        Err(invalid_params(format!(
            "{} takes {takes}, got {}",
            self.method,
            self.params.len()
        )))
    }

    /// Returns the raw value at `pos`.
    ///
    /// # Errors
    ///
    /// Fails when the call has fewer than `pos + 1` parameters.
    pub fn value(&self, pos: usize, name: &str) -> Result<&'a Value, Fault> {
        self.params.get(pos).ok_or_else(|| {
            let n = self.params.len();
            invalid_params(format!(
                "{}: parameter {} ({name}) is missing: the call has {n} parameter{}",
                self.method,
                pos + 1,
                if n == 1 { "" } else { "s" }
            ))
        })
    }

    /// Returns the string at `pos`.
    ///
    /// An integer (`<int>`, `<i4>`, `<i8>`) is accepted too and read as its decimal text,
    /// because PHP clients send a numeric-looking agent or queue id such as `1001` as an
    /// integer. An untyped `<value>` is a string already.
    ///
    /// # Errors
    ///
    /// Fails when the parameter is missing or of another type.
    pub fn string(&self, pos: usize, name: &str) -> Result<Cow<'a, str>, Fault> {
        let value = self.value(pos, name)?;
        as_string(value).ok_or_else(|| self.mismatch(pos, name, "a string", value))
    }

    /// Returns the 32-bit integer at `pos`; an `<i8>` is accepted when it fits.
    ///
    /// A string is not parsed as a number: a CRM that sends `<string>5</string>` gets a
    /// fault that shows what it sent.
    ///
    /// # Errors
    ///
    /// Fails when the parameter is missing, not an integer, or an `<i8>` out of range.
    pub fn int(&self, pos: usize, name: &str) -> Result<i32, Fault> {
        match self.value(pos, name)? {
            Value::Integer(i) => Ok(*i),
            value @ Value::Long(l) => i32::try_from(*l).map_err(|_| {
                self.mismatch(
                    pos,
                    name,
                    "an integer between -2147483648 and 2147483647",
                    value,
                )
            }),
            value => Err(self.mismatch(pos, name, "an integer (<int>, <i4> or <i8>)", value)),
        }
    }

    /// Returns the integer at `pos`, which must lie in `range`.
    ///
    /// # Errors
    ///
    /// Fails as [`Args::int`] does, and with `must be between 0 and 1000, found -1` when
    /// the integer is outside `range`.
    pub fn int_in(&self, pos: usize, name: &str, range: RangeInclusive<i32>) -> Result<i32, Fault> {
        let n = self.int(pos, name)?;
        if range.contains(&n) {
            return Ok(n);
        }
        Err(invalid_params(format!(
            "{}: parameter {} ({name}) must be between {} and {}, found {n}",
            self.method,
            pos + 1,
            range.start(),
            range.end()
        )))
    }

    /// Returns the 64-bit integer at `pos` (`<int>`, `<i4>` or `<i8>`).
    ///
    /// # Errors
    ///
    /// Fails when the parameter is missing or not an integer.
    pub fn long(&self, pos: usize, name: &str) -> Result<i64, Fault> {
        match self.value(pos, name)? {
            Value::Integer(i) => Ok(i64::from(*i)),
            Value::Long(l) => Ok(*l),
            value => Err(self.mismatch(pos, name, "an integer (<int>, <i4> or <i8>)", value)),
        }
    }

    /// Returns the flag at `pos`, read with the rules of [`Args::attributes`]: a
    /// `<boolean>`, an integer 0 or 1, or a string such as `"1"`, `"true"` or `"off"`.
    ///
    /// # Errors
    ///
    /// Fails when the parameter is missing or cannot be read as a flag.
    pub fn bool(&self, pos: usize, name: &str) -> Result<bool, Fault> {
        let value = self.value(pos, name)?;
        as_flag(value).ok_or_else(|| self.mismatch(pos, name, FLAG_EXPECTED, value))
    }

    /// Returns the `<array>` of strings at `pos` (for example the tags of
    /// `agent.setTags`); its items are read as [`Args::string`] reads a parameter.
    ///
    /// # Errors
    ///
    /// Fails when the parameter is not an array, or names the first item that is not a
    /// string: `parameter 2 (tags), item 3 must be a string, found a struct`.
    pub fn string_list(&self, pos: usize, name: &str) -> Result<Vec<String>, Fault> {
        let value = self.value(pos, name)?;
        let Value::Array(items) = value else {
            return Err(self.mismatch(pos, name, "an array of strings", value));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                as_string(item).map(Cow::into_owned).ok_or_else(|| {
                    invalid_params(format!(
                        "{}: parameter {} ({name}), item {} must be a string, found {}",
                        self.method,
                        pos + 1,
                        i + 1,
                        describe(item)
                    ))
                })
            })
            .collect()
    }

    /// Returns the `<struct>` of flags at `pos`, as `queue.candidates` takes its wanted
    /// attributes: member name → whether the attribute is set.
    ///
    /// A member counts as set when its value is `<boolean>1</boolean>`, the integer 1, or
    /// one of the strings `1`, `true`, `yes`, `on`; it counts as explicitly not set for
    /// `<boolean>0</boolean>`, the integer 0, or `0`, `false`, `no`, `off` and the empty
    /// string (what PHP makes of `false`). Strings are compared without case and
    /// surrounding whitespace. So `{vip: true}`, `{vip: 1}` and `{vip: "1"}` all mean the
    /// same. Anything else is a fault, so that a typo such as `{vip: "ture"}` is not
    /// silently read as "not set".
    ///
    /// # Errors
    ///
    /// Fails when the parameter is not a struct, when a member name is empty, or names the
    /// first member whose value is not a flag.
    pub fn attributes(&self, pos: usize, name: &str) -> Result<BTreeMap<String, bool>, Fault> {
        let value = self.value(pos, name)?;
        let Value::Struct(members) = value else {
            return Err(self.mismatch(pos, name, "a struct of flags such as {vip: true}", value));
        };
        members
            .iter()
            .map(|(member, value)| {
                if member.trim().is_empty() {
                    return Err(invalid_params(format!(
                        "{}: parameter {} ({name}) has a member with an empty name",
                        self.method,
                        pos + 1
                    )));
                }
                let set = as_flag(value).ok_or_else(|| {
                    invalid_params(format!(
                        "{}: parameter {} ({name}), member {:?} must be {FLAG_EXPECTED}, found {}",
                        self.method,
                        pos + 1,
                        member,
                        describe(value)
                    ))
                })?;
                Ok((member.clone(), set))
            })
            .collect()
    }

    /// Returns the `<struct>` at `pos` of named settings (for example the steering of
    /// `autoscaler.set`), whose members must all be named in `known`: a misspelt member is
    /// a fault rather than a setting silently left at its default.
    ///
    /// # Errors
    ///
    /// Fails when the parameter is not a struct, or names the first member not in `known`
    /// with the ones that are.
    pub fn members(&self, pos: usize, name: &'a str, known: &[&str]) -> Result<Members<'a>, Fault> {
        let value = self.value(pos, name)?;
        let Value::Struct(members) = value else {
            return Err(self.mismatch(pos, name, "a struct", value));
        };
        if let Some(unknown) = members.keys().find(|m| !known.contains(&m.as_str())) {
            return Err(invalid_params(format!(
                "{}: parameter {} ({name}) has no member {}; its members are {}",
                self.method,
                pos + 1,
                snippet(unknown),
                known.join(", ")
            )));
        }
        Ok(Members {
            method: self.method,
            pos,
            name,
            members,
        })
    }

    fn mismatch(&self, pos: usize, name: &str, expected: &str, found: &Value) -> Fault {
        invalid_params(format!(
            "{}: parameter {} ({name}) must be {expected}, found {}",
            self.method,
            pos + 1,
            describe(found)
        ))
    }
}

/// The members of a `<struct>` parameter ([`Args::members`]), read with the rules of
/// [`Args`]; a member that is absent or `<nil/>` is `None`.
#[derive(Clone, Copy, Debug)]
pub struct Members<'a> {
    method: &'a str,
    pos: usize,
    name: &'a str,
    members: &'a BTreeMap<String, Value>,
}

impl Members<'_> {
    fn get(&self, member: &str) -> Option<&Value> {
        self.members
            .get(member)
            .filter(|v| !matches!(v, Value::Nil))
    }

    fn mismatch(&self, member: &str, expected: &str, found: &Value) -> Fault {
        invalid_params(format!(
            "{}: parameter {} ({}), member {member:?} must be {expected}, found {}",
            self.method,
            self.pos + 1,
            self.name,
            describe(found)
        ))
    }

    /// Returns the flag `member`, read as [`Args::bool`] reads a parameter.
    ///
    /// # Errors
    ///
    /// Fails when the member cannot be read as a flag.
    pub fn flag(&self, member: &str) -> Result<Option<bool>, Fault> {
        self.get(member)
            .map(|value| as_flag(value).ok_or_else(|| self.mismatch(member, FLAG_EXPECTED, value)))
            .transpose()
    }

    /// Returns the integer `member` (`<int>`, `<i4>` or `<i8>`), which must lie in `range`.
    ///
    /// # Errors
    ///
    /// Fails when the member is not an integer or lies outside `range`.
    pub fn int_in(&self, member: &str, range: RangeInclusive<i32>) -> Result<Option<i32>, Fault> {
        let Some(value) = self.get(member) else {
            return Ok(None);
        };
        let expected = format!("an integer between {} and {}", range.start(), range.end());
        match value {
            Value::Integer(i) if range.contains(i) => Ok(Some(*i)),
            Value::Long(l) => i32::try_from(*l)
                .ok()
                .filter(|i| range.contains(i))
                .map(Some)
                .ok_or_else(|| self.mismatch(member, &expected, value)),
            _ => Err(self.mismatch(member, &expected, value)),
        }
    }
}

/// What [`Args::bool`] and [`Args::attributes`] accept, as fault strings say it.
const FLAG_EXPECTED: &str =
    "a flag (<boolean>, 0/1, or \"true\"/\"false\", \"yes\"/\"no\", \"on\"/\"off\")";

/// Builds the fault for a call to a method this server does not have.
pub fn method_not_found(method: &str) -> Fault {
    Fault::new(
        fault_code::METHOD_NOT_FOUND,
        format!("unknown method {method:?} ({LIST_METHODS} lists the methods of this server)"),
    )
}

/// Encodes a successful `<methodResponse>` carrying `value`, with the XML declaration.
///
/// The body is 7-bit ASCII: characters outside ASCII are written as character references
/// (`&#233;`), so a client that misreads the charset (PHP's xmlrpc-epi assumes ISO-8859-1)
/// still gets the right text. Characters XML 1.0 cannot carry at all (NUL and the other C0
/// controls except tab, newline and carriage return) become U+FFFD. Doubles should be
/// finite: XML-RPC has no spelling for NaN or infinity.
pub fn encode_response(value: Value) -> Vec<u8> {
    match (MethodResponse { value }).to_xml() {
        Ok(xml) => finish(&xml),
        Err(error) => encode_fault(
            fault_code::INTERNAL_ERROR,
            &format!("internal error: the response could not be encoded: {error}"),
        ),
    }
}

/// Encodes a fault `<methodResponse>` (`{faultCode, faultString}`), with the XML
/// declaration, under the same character rules as [`encode_response`].
pub fn encode_fault(code: i32, message: &str) -> Vec<u8> {
    let fault = Fault::new(code, message.to_owned());
    match (FaultResponse { fault }).to_xml() {
        Ok(xml) => finish(&xml),
        // Unreachable with dxr 0.9 (a struct of an i4 and a string always serializes),
        // but a server must answer something well-formed.
        Err(_) => FALLBACK_FAULT.as_bytes().to_vec(),
    }
}

const FALLBACK_FAULT: &str = "<?xml version=\"1.0\"?>\n<methodResponse><fault><value><struct>\
<member><name>faultCode</name><value><i4>-32603</i4></value></member>\
<member><name>faultString</name><value><string>internal error</string></value></member>\
</struct></value></fault></methodResponse>";

/// Encodes the outcome of a call: [`encode_response`] for a value, [`encode_fault`] for a
/// fault.
pub fn encode_result(result: Result<Value, Fault>) -> Vec<u8> {
    match result {
        Ok(value) => encode_response(value),
        Err(fault) => encode_fault(fault.code(), fault.string()),
    }
}

/// Splits a `system.multicall` call into its sub-calls.
///
/// The call takes one parameter, an array of structs `{methodName: string, params:
/// array}`. Each entry becomes a [`Call`], or a fault with code
/// [`INVALID_REQUEST`](fault_code::INVALID_REQUEST) for that entry alone when it is not
/// such a struct or calls `system.multicall` again (nested multicalls are refused, so one
/// request cannot fan out without bound). Members other than those two are ignored, and a
/// missing `params` means no parameters.
///
/// # Errors
///
/// Fails with [`INVALID_PARAMS`](fault_code::INVALID_PARAMS) when the call does not have
/// exactly one parameter or it is not an array; then the whole call is a fault.
pub fn decode_multicall(call: Call) -> Result<Vec<Result<Call, Fault>>, Fault> {
    let args = call.args();
    args.arity(&["calls"])?;
    let first = args.value(0, "calls")?;
    if !matches!(first, Value::Array(_)) {
        return Err(args.mismatch(
            0,
            "calls",
            "an array of {methodName, params} structs",
            first,
        ));
    }
    if let Value::Array(entries) = first
        && entries.len() > MAX_MULTICALL_CALLS
    {
        return Err(Fault::new(
            fault_code::INVALID_PARAMS,
            format!(
                "{MULTICALL} takes at most {MAX_MULTICALL_CALLS} calls, got {}; send them in several requests",
                entries.len()
            ),
        ));
    }
    let Some(Value::Array(entries)) = call.params.into_iter().next() else {
        return Ok(Vec::new());
    };
    Ok(entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| multicall_entry(i + 1, entry))
        .collect())
}

fn multicall_entry(n: usize, entry: Value) -> Result<Call, Fault> {
    let entry_fault = |message: String| {
        Fault::new(
            fault_code::INVALID_REQUEST,
            format!("{MULTICALL}: entry {n} {message}"),
        )
    };
    let Value::Struct(mut members) = entry else {
        return Err(entry_fault(format!(
            "must be a struct {{methodName, params}}, found {}",
            describe(&entry)
        )));
    };
    let method = match members.remove("methodName") {
        Some(Value::String(name)) => xml_trim(&name).to_owned(),
        Some(other) => {
            return Err(entry_fault(format!(
                "has a methodName that is not a string: {}",
                describe(&other)
            )));
        }
        None => return Err(entry_fault("has no methodName member".to_owned())),
    };
    if method.is_empty() {
        return Err(entry_fault("has an empty methodName".to_owned()));
    }
    if method == MULTICALL {
        return Err(entry_fault(format!(
            "calls {MULTICALL} again: nested multicalls are refused"
        )));
    }
    let params = match members.remove("params") {
        Some(Value::Array(params)) => params,
        None => Vec::new(),
        Some(other) => {
            return Err(entry_fault(format!(
                "({method}) has params that are not an array: {}",
                describe(&other)
            )));
        }
    };
    Ok(Call { method, params })
}

/// About how many bytes `value` takes encoded (tags included, escaping not): enough to
/// bound a response before it is encoded.
pub fn encoded_size(value: &Value) -> usize {
    // `<value><TYPE>…</TYPE></value>`: about 30 bytes around every value.
    const WRAP: usize = 30;
    WRAP + match value {
        Value::String(text) => text.len(),
        Value::Base64(bytes) => bytes.len().div_ceil(3) * 4,
        Value::Struct(members) => members
            .iter()
            .map(|(name, member)| 30 + name.len() + encoded_size(member))
            .sum(),
        Value::Array(items) => 20 + items.iter().map(encoded_size).sum::<usize>(),
        _ => 24,
    }
}

/// Builds the result value of `system.multicall` from the outcome of each sub-call, in
/// order: a success as a one-element array `[value]`, a failure as the struct
/// `{faultCode, faultString}`, as the de-facto multicall specification says.
pub fn multicall_value(results: Vec<Result<Value, Fault>>) -> Value {
    dxr::multicall::into_multicall_response(results)
}

/// Encodes the response to `system.multicall` (see [`multicall_value`]).
pub fn encode_multicall_response(results: Vec<Result<Value, Fault>>) -> Vec<u8> {
    encode_response(multicall_value(results))
}

/// Builds the result value of `system.listMethods`: an array of the method names.
pub fn list_methods_value(names: &[&str]) -> Value {
    Value::Array(
        names
            .iter()
            .map(|name| Value::String((*name).to_owned()))
            .collect(),
    )
}

/// Encodes the response to `system.listMethods` (see [`list_methods_value`]).
pub fn encode_list_methods(names: &[&str]) -> Vec<u8> {
    encode_response(list_methods_value(names))
}

/// Converts a JSON value the service returns into an XML-RPC value.
///
/// Objects become `<struct>`s, arrays `<array>`s, strings `<string>`s, booleans
/// `<boolean>`s and floats `<double>`s. An integer becomes `<i4>` when it fits 32 bits and
/// the `<i8>` extension otherwise; an unsigned integer beyond `i64` becomes its decimal
/// `<string>` rather than lose digits. A `null` member of an object is left out of the
/// struct, because many XML-RPC clients (PHP's xmlrpc-epi, older Java and .NET libraries)
/// cannot parse `<nil/>`; a `null` elsewhere (array item, the whole result) becomes the
/// `<nil/>` extension, which Python reads as `None`, so the service should not return
/// those to CRMs.
pub fn value_from_json(json: serde_json::Value) -> Value {
    use serde_json::Value as Json;
    match json {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Boolean(b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                i32::try_from(i).map_or(Value::Long(i), Value::Integer)
            } else if n.is_u64() {
                Value::String(n.to_string())
            } else {
                n.as_f64()
                    .map_or_else(|| Value::String(n.to_string()), Value::Double)
            }
        }
        Json::String(s) => Value::String(s),
        Json::Array(items) => Value::Array(items.into_iter().map(value_from_json).collect()),
        Json::Object(members) => Value::Struct(
            members
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, value_from_json(v)))
                .collect(),
        ),
    }
}

/// Converts any serializable reply of the service into an XML-RPC value, through its JSON
/// form and the rules of [`value_from_json`].
///
/// # Errors
///
/// Fails with [`INTERNAL_ERROR`](fault_code::INTERNAL_ERROR) when the value cannot be
/// serialized (a map with non-string keys, a failing `Serialize` impl).
pub fn value_from_serialize<T: serde::Serialize + ?Sized>(value: &T) -> Result<Value, Fault> {
    serde_json::to_value(value)
        .map(value_from_json)
        .map_err(|error| {
            Fault::new(
                fault_code::INTERNAL_ERROR,
                format!("internal error: the result could not be converted: {error}"),
            )
        })
}

// ---------------------------------------------------------------------------------------
// Decoding internals.

fn parse_error(message: impl std::fmt::Display) -> Fault {
    Fault::new(fault_code::PARSE_ERROR, format!("malformed XML: {message}"))
}

fn invalid_request(message: impl std::fmt::Display) -> Fault {
    Fault::new(
        fault_code::INVALID_REQUEST,
        format!("invalid XML-RPC call: {message}"),
    )
}

fn invalid_params(message: String) -> Fault {
    Fault::new(fault_code::INVALID_PARAMS, message)
}

/// Turns the body into text: UTF-8, or Latin-1 where declared (see the module docs).
fn body_text(body: &[u8]) -> Result<Cow<'_, str>, Fault> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let declared = declared_encoding(body);
    let latin1 = matches!(
        declared.as_deref(),
        Some("iso-8859-1" | "iso8859-1" | "iso_8859-1" | "latin1" | "latin-1" | "l1")
    );
    let known = latin1
        || matches!(
            declared.as_deref(),
            None | Some("utf-8" | "utf8" | "us-ascii" | "ascii")
        );
    if !known && !body.is_ascii() {
        return Err(Fault::new(
            fault_code::UNSUPPORTED_ENCODING,
            format!(
                "unsupported encoding {:?} in the XML declaration: send UTF-8 or ISO-8859-1",
                declared.unwrap_or_default()
            ),
        ));
    }
    match std::str::from_utf8(body) {
        Ok(text) => Ok(Cow::Borrowed(text)),
        Err(_) if latin1 => Ok(Cow::Owned(body.iter().map(|&b| char::from(b)).collect())),
        Err(error) => Err(Fault::new(
            fault_code::INVALID_CHARACTER,
            format!(
                "the body is not valid UTF-8 (byte {}); send UTF-8, or declare encoding=\"ISO-8859-1\"",
                error.valid_up_to()
            ),
        )),
    }
}

/// Returns the lowercased `encoding` of the XML declaration, if the body starts with one.
fn declared_encoding(body: &[u8]) -> Option<String> {
    let rest = body.strip_prefix(b"<?xml")?;
    let end = rest.windows(2).take(256).position(|w| w == b"?>")?;
    let decl = rest.get(..end)?;
    let at = decl.windows(8).position(|w| w == b"encoding")?;
    let after = decl.get(at + 8..)?;
    let after = after
        .trim_ascii_start()
        .strip_prefix(b"=")?
        .trim_ascii_start();
    let (&quote, value) = after.split_first()?;
    if quote != b'"' && quote != b'\'' {
        return None;
    }
    let len = value.iter().position(|&b| b == quote)?;
    let name = std::str::from_utf8(value.get(..len)?).ok()?;
    Some(name.trim().to_ascii_lowercase())
}

/// Trims the whitespace XML knows (space, tab, CR, LF), as the value decoder does.
fn xml_trim(s: &str) -> &str {
    s.trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n'))
}

fn is_xml_space(s: &str) -> bool {
    xml_trim(s).is_empty()
}

/// What an element is in the XML-RPC grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    MethodCall,
    MethodName,
    Params,
    Param,
    Value,
    Scalar(Scalar),
    Nil,
    Struct,
    Member,
    Name,
    Array,
    Data,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scalar {
    Int,
    Long,
    Boolean,
    Double,
    /// `string`, `dateTime.iso8601`, `base64`: their text is checked by the decoder.
    Text,
}

impl Kind {
    /// Whether the text of this element is kept to check it when the element closes.
    fn keeps_text(self) -> bool {
        matches!(
            self,
            Kind::MethodName
                | Kind::Name
                | Kind::Scalar(Scalar::Int | Scalar::Long | Scalar::Boolean | Scalar::Double)
        )
    }
}

/// One open element of the validating scan.
#[derive(Debug)]
struct Frame {
    kind: Kind,
    tag: String,
    /// Byte offset of the element's `<`.
    start: usize,
    text: String,
    /// Non-whitespace text seen (for `<value>`, which holds text or an element).
    has_text: bool,
    /// Element children seen so far.
    elements: usize,
    /// How fault strings name this place: `parameter 2`, `member "vip"`, `item 3`.
    label: Option<String>,
    /// `<methodName>` in `<methodCall>`, `<name>` in `<member>`.
    has_name: bool,
    /// `<params>` in `<methodCall>`, `<value>` in `<member>` or `<param>`, `<data>` in
    /// `<array>`.
    has_body: bool,
}

impl Frame {
    fn new(kind: Kind, tag: &str, start: usize, label: Option<String>) -> Self {
        Self {
            kind,
            tag: tag.to_owned(),
            start,
            text: String::new(),
            has_text: false,
            elements: 0,
            label,
            has_name: false,
            has_body: false,
        }
    }
}

/// The validating scan over the XML events: checks well-formedness and the XML-RPC
/// grammar, and returns the byte range of each parameter's `<value>` for [`diagnose`].
fn scan(text: &str) -> Result<Vec<Range<usize>>, Fault> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut spans = Vec::new();
    let mut root_done = false;
    loop {
        let start = offset(reader.buffer_position());
        let event = reader.read_event().map_err(|error| {
            parse_error(format_args!(
                "{error} (at byte {})",
                offset(reader.error_position())
            ))
        })?;
        match event {
            Event::Decl(_) => {
                if root_done || !stack.is_empty() || start > 0 {
                    return Err(parse_error(
                        "the XML declaration must come first in the body",
                    ));
                }
            }
            Event::PI(_) | Event::Comment(_) => {}
            Event::DocType(_) => {
                return Err(invalid_request("DOCTYPE declarations are not accepted"));
            }
            Event::Start(element) => open(&mut stack, &element, start, root_done)?,
            Event::Empty(element) => {
                open(&mut stack, &element, start, root_done)?;
                close(&mut stack, &mut spans, offset(reader.buffer_position()))?;
                root_done = stack.is_empty();
            }
            Event::End(_) => {
                close(&mut stack, &mut spans, offset(reader.buffer_position()))?;
                root_done = stack.is_empty();
            }
            Event::Text(content) => on_text(&mut stack, &content)?,
            Event::CData(content) => on_text(&mut stack, &content)?,
            Event::GeneralRef(reference) => {
                let resolved = if reference.is_char_ref() {
                    match reference.resolve_char_ref() {
                        Ok(Some(ch)) => Cow::Owned(ch.to_string()),
                        _ => {
                            return Err(parse_error(format_args!(
                                "invalid character reference &{};",
                                snippet_raw(&reference)
                            )));
                        }
                    }
                } else if let Some(entity) = resolve_xml_entity(&reference) {
                    Cow::Borrowed(entity)
                } else {
                    return Err(parse_error(format_args!(
                        "unknown entity &{}; (only &lt; &gt; &amp; &apos; &quot; and character references exist without a DOCTYPE)",
                        snippet_raw(&reference)
                    )));
                };
                on_text(&mut stack, &resolved)?;
            }
            Event::Eof => break,
        }
    }
    if let Some(frame) = stack.last() {
        return Err(parse_error(format_args!(
            "the body ends inside <{}>: it is truncated",
            frame.tag
        )));
    }
    if !root_done {
        return Err(parse_error("the body holds no XML element"));
    }
    Ok(spans)
}

fn offset(position: u64) -> usize {
    usize::try_from(position).unwrap_or(usize::MAX)
}

/// How fault strings name the current place: `parameter 2, member "vip"`.
fn context(stack: &[Frame]) -> String {
    let labels: Vec<&str> = stack.iter().filter_map(|f| f.label.as_deref()).collect();
    labels.join(", ")
}

fn invalid_at(stack: &[Frame], message: impl std::fmt::Display) -> Fault {
    let place = context(stack);
    if place.is_empty() {
        invalid_request(message)
    } else {
        invalid_request(format_args!("{place}: {message}"))
    }
}

const VALUE_TYPES: &str =
    "i4, int, i8, boolean, string, double, dateTime.iso8601, base64, struct, array, nil";

fn open(
    stack: &mut Vec<Frame>,
    element: &BytesStart<'_>,
    start: usize,
    root_done: bool,
) -> Result<(), Fault> {
    let tag = element.name().as_ref().to_owned();
    let tag = tag.as_str();
    let Some(parent) = stack.last() else {
        if root_done {
            return Err(parse_error(format_args!(
                "<{tag}> after the end of the root element"
            )));
        }
        if tag != "methodCall" {
            return Err(invalid_request(format_args!(
                "the root element must be <methodCall>, found <{tag}>"
            )));
        }
        stack.push(Frame::new(Kind::MethodCall, tag, start, None));
        return Ok(());
    };
    if !element.attributes_raw().trim().is_empty() {
        return Err(invalid_at(
            stack,
            format_args!(
                "XML-RPC elements have no attributes, found <{tag}{}>",
                element.attributes_raw()
            ),
        ));
    }
    if stack.len() >= MAX_DEPTH {
        return Err(invalid_at(
            stack,
            format_args!("elements nested deeper than {MAX_DEPTH}"),
        ));
    }
    let parent_kind = parent.kind;
    let parent_tag = parent.tag.clone();
    let unexpected = |expected: &str| {
        invalid_at(
            stack,
            format_args!("<{parent_tag}> may hold {expected}, found <{tag}>"),
        )
    };
    let (kind, label) = match (parent_kind, tag) {
        (Kind::MethodCall, "methodName") if parent.has_name => {
            return Err(invalid_at(stack, "more than one <methodName>"));
        }
        (Kind::MethodCall, "methodName") => (Kind::MethodName, None),
        (Kind::MethodCall, "params") if !parent.has_name => {
            return Err(invalid_at(stack, "<methodName> must come before <params>"));
        }
        (Kind::MethodCall, "params") if parent.has_body => {
            return Err(invalid_at(stack, "more than one <params>"));
        }
        (Kind::MethodCall, "params") => (Kind::Params, None),
        (Kind::MethodCall, _) => return Err(unexpected("<methodName> and <params>")),
        (Kind::Params, "param") => (
            Kind::Param,
            Some(format!("parameter {}", parent.elements + 1)),
        ),
        (Kind::Params, _) => return Err(unexpected("only <param> elements")),
        (Kind::Param, "value") if parent.has_body => {
            return Err(invalid_at(stack, "a <param> holds exactly one <value>"));
        }
        (Kind::Param, "value") => (Kind::Value, None),
        (Kind::Param, _) => return Err(unexpected("one <value>")),
        (Kind::Value, _) if parent.elements > 0 => {
            return Err(invalid_at(
                stack,
                format_args!("a <value> holds one typed element, found a second one <{tag}>"),
            ));
        }
        (Kind::Value, _) if parent.has_text => {
            return Err(invalid_at(
                stack,
                format_args!(
                    "a <value> holds either text or one typed element, found text and <{tag}>"
                ),
            ));
        }
        (Kind::Value, "i4" | "int") => (Kind::Scalar(Scalar::Int), None),
        (Kind::Value, "i8") => (Kind::Scalar(Scalar::Long), None),
        (Kind::Value, "boolean") => (Kind::Scalar(Scalar::Boolean), None),
        (Kind::Value, "double") => (Kind::Scalar(Scalar::Double), None),
        (Kind::Value, "string" | "dateTime.iso8601" | "base64") => {
            (Kind::Scalar(Scalar::Text), None)
        }
        (Kind::Value, "nil") => (Kind::Nil, None),
        (Kind::Value, "struct") => (Kind::Struct, None),
        (Kind::Value, "array") => (Kind::Array, None),
        (Kind::Value, _) => {
            return Err(invalid_at(
                stack,
                format_args!("unknown value type <{tag}> (the types are {VALUE_TYPES})"),
            ));
        }
        (Kind::Struct, "member") => (
            Kind::Member,
            Some(format!("member {}", parent.elements + 1)),
        ),
        (Kind::Struct, _) => return Err(unexpected("only <member> elements")),
        (Kind::Member, "name") if parent.has_name => {
            return Err(invalid_at(stack, "a <member> holds exactly one <name>"));
        }
        (Kind::Member, "name") => (Kind::Name, None),
        (Kind::Member, "value") if parent.has_body => {
            return Err(invalid_at(stack, "a <member> holds exactly one <value>"));
        }
        (Kind::Member, "value") => (Kind::Value, None),
        (Kind::Member, _) => return Err(unexpected("one <name> and one <value>")),
        (Kind::Array, "data") if parent.has_body => {
            return Err(invalid_at(stack, "an <array> holds exactly one <data>"));
        }
        (Kind::Array, "data") => (Kind::Data, None),
        (Kind::Array, _) => return Err(unexpected("one <data>")),
        (Kind::Data, "value") => (Kind::Value, Some(format!("item {}", parent.elements + 1))),
        (Kind::Data, _) => return Err(unexpected("only <value> elements")),
        (Kind::MethodName | Kind::Name | Kind::Scalar(_) | Kind::Nil, _) => {
            return Err(unexpected("only text"));
        }
    };
    if let Some(parent) = stack.last_mut() {
        parent.elements += 1;
        match kind {
            Kind::MethodName | Kind::Name => parent.has_name = true,
            Kind::Params | Kind::Value | Kind::Data => parent.has_body = true,
            _ => {}
        }
    }
    stack.push(Frame::new(kind, tag, start, label));
    Ok(())
}

fn close(stack: &mut Vec<Frame>, spans: &mut Vec<Range<usize>>, end: usize) -> Result<(), Fault> {
    let Some(frame) = stack.last() else {
        return Err(parse_error("a closing tag without an opening one"));
    };
    let text = xml_trim(&frame.text);
    let problem = match frame.kind {
        Kind::MethodCall if !frame.has_name => Some("<methodName> is missing".to_owned()),
        Kind::MethodName if text.is_empty() => Some("<methodName> is empty".to_owned()),
        // dxr cannot read a blank member name, so it is refused here with a clear word.
        Kind::Name if text.is_empty() => Some("<name> of a struct member is empty".to_owned()),
        Kind::Param if !frame.has_body => Some("<param> has no <value>".to_owned()),
        Kind::Member if !frame.has_name => Some("<member> has no <name>".to_owned()),
        Kind::Member if !frame.has_body => Some("<member> has no <value>".to_owned()),
        Kind::Scalar(Scalar::Int) if text.parse::<i32>().is_err() => {
            Some(if text.parse::<i64>().is_ok() {
                format!(
                    "<{}> {} does not fit in 32 bits (send <i8> for larger integers)",
                    frame.tag, text
                )
            } else {
                format!(
                    "<{}> must hold an integer, found {}",
                    frame.tag,
                    snippet(text)
                )
            })
        }
        Kind::Scalar(Scalar::Long) if text.parse::<i64>().is_err() => Some(format!(
            "<i8> must hold a 64-bit integer, found {}",
            snippet(text)
        )),
        // dxr reads exactly "0" and "1", without surrounding whitespace.
        Kind::Scalar(Scalar::Boolean) if frame.text != "0" && frame.text != "1" => Some(format!(
            "<boolean> must be 0 or 1, found {}",
            snippet(&frame.text)
        )),
        Kind::Scalar(Scalar::Double) if text.parse::<f64>().is_err() => Some(format!(
            "<double> must hold a number, found {}",
            snippet(text)
        )),
        Kind::Nil if frame.has_text || frame.elements > 0 => {
            Some("<nil/> must be empty".to_owned())
        }
        _ => None,
    };
    if let Some(problem) = problem {
        return Err(invalid_at(stack, problem));
    }
    let Some(frame) = stack.pop() else {
        return Ok(());
    };
    if let Some(parent) = stack.last_mut() {
        match (parent.kind, frame.kind) {
            (Kind::Param, Kind::Value) => spans.push(frame.start..end),
            (Kind::Member, Kind::Name) => {
                parent.label = Some(format!("member {}", snippet(&frame.text)));
            }
            _ => {}
        }
    }
    Ok(())
}

fn on_text(stack: &mut [Frame], content: &str) -> Result<(), Fault> {
    let Some(top) = stack.last_mut() else {
        if is_xml_space(content) {
            return Ok(());
        }
        return Err(parse_error(format_args!(
            "text {} outside the root element",
            snippet(content)
        )));
    };
    match top.kind {
        kind if kind.keeps_text() => top.text.push_str(content),
        Kind::Scalar(Scalar::Text) => {}
        _ if is_xml_space(content) => {}
        Kind::Value if top.elements == 0 => top.has_text = true,
        Kind::Nil => top.has_text = true,
        Kind::Value => {
            return Err(invalid_at(
                stack,
                format_args!(
                    "a <value> holds either text or one typed element, found text {} after the element",
                    snippet(content)
                ),
            ));
        }
        _ => {
            let tag = top.tag.clone();
            return Err(invalid_at(
                stack,
                format_args!("unexpected text {} inside <{tag}>", snippet(content)),
            ));
        }
    }
    Ok(())
}

/// Names the first parameter `dxr` cannot decode, for a body the scan let through (a
/// malformed `dateTime.iso8601` or `base64`).
fn diagnose(text: &str, spans: &[Range<usize>]) -> Fault {
    for (i, span) in spans.iter().enumerate() {
        let bad = text
            .get(span.clone())
            .is_none_or(|value| Value::from_xml(value).is_err());
        if bad {
            return invalid_request(format_args!(
                "parameter {}: not a valid XML-RPC value (check <dateTime.iso8601> and <base64> contents)",
                i + 1
            ));
        }
    }
    invalid_request("the call could not be decoded")
}

/// Quotes a client's text back, cut to [`SNIPPET_CHARS`].
fn snippet(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(SNIPPET_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}…")
    } else {
        format!("{head:?}")
    }
}

/// Like [`snippet`] without the quotes, for entity names.
fn snippet_raw(s: &str) -> String {
    s.chars().take(SNIPPET_CHARS).collect()
}

/// Describes a value for a fault string: `a string "high"`, `a struct with 2 members`.
fn describe(value: &Value) -> String {
    match value {
        Value::Integer(i) => format!("an integer ({i})"),
        Value::Long(l) => format!("an <i8> integer ({l})"),
        Value::Boolean(b) => format!("a boolean ({b})"),
        Value::String(s) => format!("a string {}", snippet(s)),
        Value::Double(d) => format!("a double ({d})"),
        Value::DateTime(_) => "a dateTime.iso8601".to_owned(),
        Value::Base64(bytes) => format!("base64 data ({} bytes)", bytes.len()),
        Value::Struct(members) if members.is_empty() => "an empty struct".to_owned(),
        Value::Struct(members) => {
            let names: Vec<&str> = members.keys().take(5).map(String::as_str).collect();
            let more = if members.len() > names.len() {
                ", …"
            } else {
                ""
            };
            format!("a struct {{{}{more}}}", names.join(", "))
        }
        Value::Array(items) if items.is_empty() => "an empty array".to_owned(),
        Value::Array(items) => format!(
            "an array of {} value{}",
            items.len(),
            if items.len() == 1 { "" } else { "s" }
        ),
        Value::Nil => "nil".to_owned(),
        _ => "a value of another type".to_owned(),
    }
}

fn as_string(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Integer(i) => Some(Cow::Owned(i.to_string())),
        Value::Long(l) => Some(Cow::Owned(l.to_string())),
        _ => None,
    }
}

fn as_flag(value: &Value) -> Option<bool> {
    match value {
        Value::Boolean(b) => Some(*b),
        Value::Integer(0) | Value::Long(0) => Some(false),
        Value::Integer(1) | Value::Long(1) => Some(true),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Encoding internals.

/// Prepends the XML declaration and makes the body ASCII (see [`encode_response`]).
fn finish(xml: &str) -> Vec<u8> {
    let mut out = String::with_capacity(XML_DECLARATION.len() + xml.len() + 16);
    out.push_str(XML_DECLARATION);
    for ch in xml.chars() {
        match ch {
            '\t' | '\n' | '\r' | ' '..='~' => out.push(ch),
            '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => out.push_str("&#65533;"),
            _ => {
                let _ = write!(out, "&#{};", u32::from(ch));
            }
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(body: &str) -> Call {
        match decode_call(body.as_bytes()) {
            Ok(call) => call,
            Err(fault) => panic!("decode failed: {fault}"),
        }
    }

    fn fault_of(body: &[u8]) -> Fault {
        match decode_call(body) {
            Ok(call) => panic!("decoded as {call:?}"),
            Err(fault) => fault,
        }
    }

    fn s(text: &str) -> Value {
        Value::String(text.to_owned())
    }

    fn call(method: &str, params: Vec<Value>) -> Call {
        Call {
            method: method.to_owned(),
            params,
        }
    }

    /// Decodes a success response with dxr, the way a client would.
    fn response_value(body: &[u8]) -> Value {
        let text = std::str::from_utf8(body).expect("utf-8 response");
        MethodResponse::from_xml(text)
            .expect("a methodResponse")
            .value
    }

    fn response_fault(body: &[u8]) -> Fault {
        let text = std::str::from_utf8(body).expect("utf-8 response");
        FaultResponse::from_xml(text).expect("a fault").fault
    }

    /// What Python's `xmlrpc.client.dumps(("1001", "support", 5), "agent.setPriority")`
    /// sends.
    const PYTHON_SET_PRIORITY: &str = "<?xml version='1.0'?>
<methodCall>
<methodName>agent.setPriority</methodName>
<params>
<param>
<value><string>1001</string></value>
</param>
<param>
<value><string>support</string></value>
</param>
<param>
<value><int>5</int></value>
</param>
</params>
</methodCall>
";

    /// What PHP's `xmlrpc_encode_request('agent.setPriority', ['1001', 'support', 5])`
    /// (xmlrpc-epi) sends: ISO-8859-1 declared, pretty-printed inside `<value>`.
    const PHP_SET_PRIORITY: &str = r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>agent.setPriority</methodName>
<params>
 <param>
  <value>
   <string>1001</string>
  </value>
 </param>
 <param>
  <value>
   <string>support</string>
  </value>
 </param>
 <param>
  <value>
   <int>5</int>
  </value>
 </param>
</params>
</methodCall>
"#;

    #[test]
    fn python_body_decodes() {
        let call = decode(PYTHON_SET_PRIORITY);
        assert_eq!(call.method, "agent.setPriority");
        assert_eq!(
            call.params,
            vec![s("1001"), s("support"), Value::Integer(5)]
        );
        let args = call.args();
        args.arity(&["agent", "queue", "priority"]).expect("arity");
        assert_eq!(args.string(0, "agent").expect("agent"), "1001");
        assert_eq!(args.string(1, "queue").expect("queue"), "support");
        assert_eq!(args.int(2, "priority").expect("priority"), 5);
    }

    #[test]
    fn php_pretty_printed_body_decodes() {
        let call = decode(PHP_SET_PRIORITY);
        assert_eq!(call, decode(PYTHON_SET_PRIORITY));
    }

    #[test]
    fn untyped_value_is_a_string() {
        let call = decode(
            "<?xml version=\"1.0\"?>
<methodCall>
  <methodName>agent.pause</methodName>
  <params>
    <param><value>1001</value></param>
    <param><value>  lunch break  </value></param>
    <param><value></value></param>
    <param><value/></param>
  </params>
</methodCall>",
        );
        assert_eq!(call.method, "agent.pause");
        assert_eq!(
            call.params,
            vec![s("1001"), s("  lunch break  "), s(""), s("")]
        );
    }

    #[test]
    fn strings_keep_their_whitespace_and_escapes() {
        let call = decode(
            "<methodCall><methodName>agent.pause</methodName><params>
<param><value><string>  two\nlines &amp; &lt;tags&gt; &quot;q&quot;  </string></value></param>
<param><value><string/></value></param>
<param><value><string><![CDATA[a <raw> & b]]></string></value></param>
</params></methodCall>",
        );
        assert_eq!(
            call.params,
            vec![s("  two\nlines & <tags> \"q\"  "), s(""), s("a <raw> & b")]
        );
    }

    #[test]
    fn unicode_and_character_references_decode() {
        let call = decode(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>
<methodCall>
<methodName>agent.pause</methodName>
<params>
<param>
<value><string>Zoë – 日本 😀</string></value>
</param>
<param>
<value><string>caf&#233; &#x65E5;</string></value>
</param>
</params>
</methodCall>
",
        );
        assert_eq!(call.params, vec![s("Zoë – 日本 😀"), s("café 日")]);
    }

    #[test]
    fn latin1_body_decodes_where_declared() {
        let mut body = b"<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<methodCall>\n<methodName>agent.pause</methodName>\n<params>\n <param>\n  <value>\n   <string>caf".to_vec();
        body.push(0xE9);
        body.extend_from_slice(b"</string>\n  </value>\n </param>\n</params>\n</methodCall>\n");
        let call = decode_call(&body).expect("latin-1 decodes");
        assert_eq!(call.params, vec![s("café")]);
    }

    #[test]
    fn utf8_bom_is_skipped() {
        let body = format!("\u{feff}{PYTHON_SET_PRIORITY}");
        assert_eq!(decode(&body).method, "agent.setPriority");
    }

    #[test]
    fn empty_params_in_every_spelling() {
        // Python: `dumps((), "system.listMethods")`.
        let python = "<?xml version='1.0'?>
<methodCall>
<methodName>system.listMethods</methodName>
<params>
</params>
</methodCall>
";
        // PHP xmlrpc-epi with no arguments.
        let php = r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>system.listMethods</methodName>
<params/>
</methodCall>
"#;
        let bare = "<methodCall><methodName>system.listMethods</methodName></methodCall>";
        for body in [python, php, bare] {
            let call = decode(body);
            assert_eq!(call.method, LIST_METHODS);
            assert!(call.params.is_empty(), "{body}");
            call.args().arity(&[]).expect("no parameters");
        }
    }

    #[test]
    fn method_name_is_trimmed() {
        let call = decode("<methodCall><methodName>\n  node.drain \n</methodName></methodCall>");
        assert_eq!(call.method, "node.drain");
    }

    #[test]
    fn integer_spellings_decode() {
        let call = decode(
            "<methodCall><methodName>agent.setDailyCap</methodName><params>
<param><value><i4>-12</i4></value></param>
<param><value><int>+40</int></value></param>
<param><value><i8>9000000000</i8></value></param>
<param><value><i8>7</i8></value></param>
<param><value><int>
  3
</int></value></param>
</params></methodCall>",
        );
        assert_eq!(
            call.params,
            vec![
                Value::Integer(-12),
                Value::Integer(40),
                Value::Long(9_000_000_000),
                Value::Long(7),
                Value::Integer(3)
            ]
        );
        let args = call.args();
        assert_eq!(args.int(0, "n").expect("i4"), -12);
        assert_eq!(args.int(1, "n").expect("int"), 40);
        assert_eq!(args.int(3, "n").expect("i8 in range"), 7);
        assert_eq!(args.long(2, "n").expect("i8"), 9_000_000_000);
        let fault = args.int(2, "n").expect_err("i8 out of range");
        assert_eq!(fault.code(), fault_code::INVALID_PARAMS);
        assert_eq!(
            fault.string(),
            "agent.setDailyCap: parameter 3 (n) must be an integer between -2147483648 and 2147483647, found an <i8> integer (9000000000)"
        );
    }

    #[test]
    fn python_struct_and_array_decode() {
        // `dumps(("support", {"vip": True, "lang": "fr"}), "queue.candidates")`.
        let call = decode(
            "<?xml version='1.0'?>
<methodCall>
<methodName>queue.candidates</methodName>
<params>
<param>
<value><string>support</string></value>
</param>
<param>
<value><struct>
<member>
<name>vip</name>
<value><boolean>1</boolean></value>
</member>
<member>
<name>french</name>
<value><string>yes</string></value>
</member>
<member>
<name>night</name>
<value><boolean>0</boolean></value>
</member>
</struct></value>
</param>
</params>
</methodCall>
",
        );
        let args = call.args();
        args.arity(&["queue", "attributes"]).expect("arity");
        let attributes = args.attributes(1, "attributes").expect("attributes");
        let expected: BTreeMap<String, bool> = [
            ("french".to_owned(), true),
            ("night".to_owned(), false),
            ("vip".to_owned(), true),
        ]
        .into();
        assert_eq!(attributes, expected);

        // `dumps(("1001", ["fr", "vip"]), "agent.setTags")`.
        let call = decode(
            "<?xml version='1.0'?>
<methodCall>
<methodName>agent.setTags</methodName>
<params>
<param>
<value><string>1001</string></value>
</param>
<param>
<value><array><data>
<value><string>fr</string></value>
<value><string>vip</string></value>
</data></array></value>
</param>
</params>
</methodCall>
",
        );
        assert_eq!(
            call.args().string_list(1, "tags").expect("tags"),
            vec!["fr".to_owned(), "vip".to_owned()]
        );
    }

    #[test]
    fn php_struct_and_array_decode() {
        // xmlrpc-epi: `['support', ['vip' => true, 'lang' => 1]]` and a tag list.
        let call = decode(
            r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>queue.candidates</methodName>
<params>
 <param>
  <value>
   <string>support</string>
  </value>
 </param>
 <param>
  <value>
   <struct>
    <member>
     <name>vip</name>
     <value>
      <boolean>1</boolean>
     </value>
    </member>
    <member>
     <name>lang</name>
     <value>
      <int>1</int>
     </value>
    </member>
    <member>
     <name>tags</name>
     <value>
      <array>
       <data>
        <value>
         <string>fr</string>
        </value>
        <value>
         <int>42</int>
        </value>
       </data>
      </array>
     </value>
    </member>
   </struct>
  </value>
 </param>
</params>
</methodCall>
"#,
        );
        let Value::Struct(members) = &call.params[1] else {
            panic!("a struct: {:?}", call.params[1]);
        };
        assert_eq!(members.get("vip"), Some(&Value::Boolean(true)));
        assert_eq!(members.get("lang"), Some(&Value::Integer(1)));
        assert_eq!(
            members.get("tags"),
            Some(&Value::Array(vec![s("fr"), Value::Integer(42)]))
        );
    }

    #[test]
    fn empty_struct_and_array_and_nil_decode() {
        let call = decode(
            "<methodCall><methodName>x</methodName><params>
<param><value><struct></struct></value></param>
<param><value><struct/></value></param>
<param><value><array><data></data></array></value></param>
<param><value><array><data/></array></value></param>
<param><value><nil/></value></param>
<param><value><double>-1.5</double></value></param>
<param><value><base64>aGVsbG8=</base64></value></param>
<param><value><dateTime.iso8601>20240131T10:20:30</dateTime.iso8601></value></param>
</params></methodCall>",
        );
        assert_eq!(call.params.len(), 8);
        assert_eq!(call.params[0], Value::Struct(BTreeMap::new()));
        assert_eq!(call.params[1], Value::Struct(BTreeMap::new()));
        assert_eq!(call.params[2], Value::Array(Vec::new()));
        assert_eq!(call.params[3], Value::Array(Vec::new()));
        assert_eq!(call.params[4], Value::Nil);
        assert_eq!(call.params[5], Value::Double(-1.5));
        assert_eq!(call.params[6], Value::Base64(b"hello".to_vec()));
        assert!(matches!(call.params[7], Value::DateTime(_)));
    }

    #[test]
    fn comments_and_processing_instructions_are_skipped() {
        let call = decode(
            "<?xml version=\"1.0\"?>
<!-- sent by the CRM -->
<methodCall><!-- c --><methodName>agent.unpause</methodName>
<params><!-- c --><param><value><!-- c --><string>1001</string></value></param></params>
</methodCall>
<!-- end -->
",
        );
        assert_eq!(call.params, vec![s("1001")]);
    }

    // --- malformed bodies ------------------------------------------------------------

    fn assert_fault(body: &[u8], code: i32, needle: &str) {
        let fault = fault_of(body);
        assert_eq!(fault.code(), code, "{fault}");
        assert!(
            fault.string().contains(needle),
            "fault {:?} lacks {needle:?}",
            fault.string()
        );
    }

    #[test]
    fn not_xml_is_a_parse_error() {
        assert_fault(b"", fault_code::PARSE_ERROR, "no XML element");
        assert_fault(b"   \n", fault_code::PARSE_ERROR, "no XML element");
        assert_fault(
            b"agent=1001&queue=support",
            fault_code::PARSE_ERROR,
            "outside the root",
        );
        assert_fault(
            b"{\"method\": \"agent.login\"}",
            fault_code::PARSE_ERROR,
            "malformed XML",
        );
        assert_fault(
            b"<methodCall><methodName>x</methodName><params></param></methodCall>",
            fault_code::PARSE_ERROR,
            "malformed XML",
        );
    }

    #[test]
    fn truncated_body_is_a_parse_error() {
        let cut = PYTHON_SET_PRIORITY.find("</param>").expect("a param");
        assert_fault(
            &PYTHON_SET_PRIORITY.as_bytes()[..cut],
            fault_code::PARSE_ERROR,
            "the body ends inside <param>: it is truncated",
        );
        assert_fault(
            b"<methodCall><methodName>agent.pause</methodName><params><param><value><str",
            fault_code::PARSE_ERROR,
            "malformed XML",
        );
    }

    #[test]
    fn wrong_root_is_an_invalid_request() {
        assert_fault(
            b"<?xml version=\"1.0\"?><methodResponse><params><param><value>1</value></param></params></methodResponse>",
            fault_code::INVALID_REQUEST,
            "the root element must be <methodCall>, found <methodResponse>",
        );
        assert_fault(
            b"<html><body>hi</body></html>",
            fault_code::INVALID_REQUEST,
            "found <html>",
        );
    }

    #[test]
    fn missing_or_empty_method_name_is_an_invalid_request() {
        assert_fault(
            b"<methodCall><params><param><value>1001</value></param></params></methodCall>",
            fault_code::INVALID_REQUEST,
            "<methodName> must come before <params>",
        );
        assert_fault(
            b"<methodCall>\n</methodCall>",
            fault_code::INVALID_REQUEST,
            "<methodName> is missing",
        );
        assert_fault(
            b"<methodCall/>",
            fault_code::INVALID_REQUEST,
            "<methodName> is missing",
        );
        assert_fault(
            b"<methodCall><methodName> </methodName></methodCall>",
            fault_code::INVALID_REQUEST,
            "<methodName> is empty",
        );
        assert_fault(
            b"<methodCall><methodName>a</methodName><methodName>b</methodName></methodCall>",
            fault_code::INVALID_REQUEST,
            "more than one <methodName>",
        );
    }

    #[test]
    fn wrong_nesting_is_an_invalid_request() {
        let cases: &[(&str, &str)] = &[
            (
                "<methodCall><methodName>x</methodName><params><value>1</value></params></methodCall>",
                "invalid XML-RPC call: <params> may hold only <param> elements, found <value>",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param><value>a</value><value>b</value></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1: a <param> holds exactly one <value>",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1: <param> has no <value>",
            ),
            (
                "<methodCall><methodName>x</methodName><params>junk<param><value>a</value></param></params></methodCall>",
                "invalid XML-RPC call: unexpected text \"junk\" inside <params>",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param><value>ab<string>c</string></value></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1: a <value> holds either text or one typed element, found text and <string>",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param><value><string>a</string><int>1</int></value></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1: a <value> holds one typed element, found a second one <int>",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param><value><integer>5</integer></value></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1: unknown value type <integer>",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param><value><string><b>x</b></string></value></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1: <string> may hold only text, found <b>",
            ),
            (
                "<methodCall><methodName>x</methodName><params/><params/></methodCall>",
                "invalid XML-RPC call: more than one <params>",
            ),
            (
                "<methodCall><methodName>x</methodName><foo/></methodCall>",
                "invalid XML-RPC call: <methodCall> may hold <methodName> and <params>, found <foo>",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param><value><struct><member><value>1</value></member></struct></value></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1, member 1: <member> has no <name>",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param><value><struct><member><name>vip</name></member></struct></value></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1, member \"vip\": <member> has no <value>",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param><value><struct><member><name> </name><value>1</value></member></struct></value></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1, member 1: <name> of a struct member is empty",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param><value><array><value>1</value></array></value></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1: <array> may hold one <data>, found <value>",
            ),
            (
                "<methodCall><methodName>x</methodName><params><param><value type=\"string\">a</value></param></params></methodCall>",
                "invalid XML-RPC call: parameter 1: XML-RPC elements have no attributes, found <value type=\"string\">",
            ),
        ];
        for (body, expected) in cases {
            let fault = fault_of(body.as_bytes());
            assert_eq!(fault.code(), fault_code::INVALID_REQUEST, "{body}");
            assert!(
                fault.string().starts_with(expected),
                "{body}\n got {:?}\nwant {expected:?}",
                fault.string()
            );
        }
    }

    #[test]
    fn bad_scalars_name_their_place() {
        let cases: &[(&str, &str)] = &[
            (
                "<value><boolean>true</boolean></value>",
                "parameter 2: <boolean> must be 0 or 1, found \"true\"",
            ),
            (
                "<value><int>five</int></value>",
                "parameter 2: <int> must hold an integer, found \"five\"",
            ),
            (
                "<value><i4>3000000000</i4></value>",
                "parameter 2: <i4> 3000000000 does not fit in 32 bits (send <i8> for larger integers)",
            ),
            (
                "<value><i8>1.5</i8></value>",
                "parameter 2: <i8> must hold a 64-bit integer, found \"1.5\"",
            ),
            (
                "<value><double>1,5</double></value>",
                "parameter 2: <double> must hold a number, found \"1,5\"",
            ),
            (
                "<value><struct><member><name>vip</name><value><boolean>yes</boolean></value></member></struct></value>",
                "parameter 2, member \"vip\": <boolean> must be 0 or 1, found \"yes\"",
            ),
            (
                "<value><array><data><value>a</value><value><int>x</int></value></data></array></value>",
                "parameter 2, item 2: <int> must hold an integer, found \"x\"",
            ),
            (
                "<value><nil>x</nil></value>",
                "parameter 2: <nil/> must be empty",
            ),
            (
                "<value><dateTime.iso8601>yesterday</dateTime.iso8601></value>",
                "parameter 2: not a valid XML-RPC value",
            ),
            (
                "<value><base64>!!!</base64></value>",
                "parameter 2: not a valid XML-RPC value",
            ),
        ];
        for (value, expected) in cases {
            let body = format!(
                "<methodCall><methodName>x</methodName><params><param><value>ok</value></param><param>{value}</param></params></methodCall>"
            );
            let fault = fault_of(body.as_bytes());
            assert_eq!(fault.code(), fault_code::INVALID_REQUEST, "{body}");
            let want = format!("invalid XML-RPC call: {expected}");
            assert!(
                fault.string().starts_with(&want),
                "{body}\n got {:?}\nwant {want:?}",
                fault.string()
            );
        }
    }

    #[test]
    fn doctype_and_unknown_entities_are_refused() {
        assert_fault(
            b"<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY big \"boom\">]><methodCall><methodName>x</methodName><params><param><value>&big;</value></param></params></methodCall>",
            fault_code::INVALID_REQUEST,
            "DOCTYPE",
        );
        assert_fault(
            b"<methodCall><methodName>x</methodName><params><param><value>&nbsp;</value></param></params></methodCall>",
            fault_code::PARSE_ERROR,
            "unknown entity &nbsp;",
        );
        assert_fault(
            b"<methodCall><methodName>x</methodName><params><param><value>&#0;</value></param></params></methodCall>",
            fault_code::PARSE_ERROR,
            "invalid character reference",
        );
    }

    #[test]
    fn content_after_the_root_is_refused() {
        assert_fault(
            b"<methodCall><methodName>x</methodName></methodCall><methodCall><methodName>y</methodName></methodCall>",
            fault_code::PARSE_ERROR,
            "after the end of the root element",
        );
        assert_fault(
            b"<methodCall><methodName>x</methodName></methodCall>trailing",
            fault_code::PARSE_ERROR,
            "outside the root element",
        );
    }

    #[test]
    fn unreadable_bytes_are_refused() {
        let mut body = b"<methodCall><methodName>x</methodName><params><param><value>caf".to_vec();
        body.push(0xE9);
        body.extend_from_slice(b"</value></param></params></methodCall>");
        assert_fault(
            &body,
            fault_code::INVALID_CHARACTER,
            "not valid UTF-8 (byte 63)",
        );

        let mut body = b"<?xml version=\"1.0\" encoding=\"Shift_JIS\"?><methodCall><methodName>x</methodName><params><param><value>".to_vec();
        body.extend_from_slice(&[0x93, 0xFA]);
        body.extend_from_slice(b"</value></param></params></methodCall>");
        assert_fault(&body, fault_code::UNSUPPORTED_ENCODING, "\"shift_jis\"");

        // An all-ASCII body is read whatever it declares.
        let call = decode(
            "<?xml version=\"1.0\" encoding=\"windows-1252\"?><methodCall><methodName>x</methodName></methodCall>",
        );
        assert_eq!(call.method, "x");
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let mut body = String::from("<methodCall><methodName>x</methodName><params><param>");
        for _ in 0..10_000 {
            body.push_str("<value><array><data>");
        }
        for _ in 0..10_000 {
            body.push_str("</data></array></value>");
        }
        body.push_str("</param></params></methodCall>");
        assert_fault(
            body.as_bytes(),
            fault_code::INVALID_REQUEST,
            &format!("elements nested deeper than {MAX_DEPTH}"),
        );

        // Twenty levels of arrays still decode.
        let mut body = String::from("<methodCall><methodName>x</methodName><params><param>");
        for _ in 0..19 {
            body.push_str("<value><array><data>");
        }
        body.push_str("<value>leaf</value>");
        for _ in 0..19 {
            body.push_str("</data></array></value>");
        }
        body.push_str("</param></params></methodCall>");
        let mut value = &decode(&body).params[0];
        for _ in 0..19 {
            let Value::Array(items) = value else {
                panic!("an array: {value:?}");
            };
            value = &items[0];
        }
        assert_eq!(value, &s("leaf"));
    }

    #[test]
    fn faults_never_copy_the_body() {
        let body = format!(
            "<methodCall><methodName>x</methodName><params><param><value><int>{}</int></value></param></params></methodCall>",
            "9".repeat(5000)
        );
        let fault = fault_of(body.as_bytes());
        assert!(fault.string().len() < 200, "{}", fault.string());
    }

    // --- argument extraction ---------------------------------------------------------

    #[test]
    fn arity_names_the_parameters() {
        let login = call("agent.login", vec![s("1001"), s("SIP/1001"), s("extra")]);
        let fault = login.args().arity(&["agent", "device"]).expect_err("3 ≠ 2");
        assert_eq!(fault.code(), fault_code::INVALID_PARAMS);
        assert_eq!(
            fault.string(),
            "agent.login takes 2 parameters (agent, device), got 3"
        );

        let unpause = call("agent.unpause", vec![]);
        assert_eq!(
            unpause
                .args()
                .arity(&["agent"])
                .expect_err("0 ≠ 1")
                .string(),
            "agent.unpause takes 1 parameter (agent), got 0"
        );

        let list = call(LIST_METHODS, vec![s("x")]);
        assert_eq!(
            list.args().arity(&[]).expect_err("1 ≠ 0").string(),
            "system.listMethods takes no parameters, got 1"
        );
    }

    #[test]
    fn missing_parameter_is_named() {
        let c = call("agent.setPriority", vec![s("1001"), s("support")]);
        let fault = c.args().int(2, "priority").expect_err("missing");
        assert_eq!(fault.code(), fault_code::INVALID_PARAMS);
        assert_eq!(
            fault.string(),
            "agent.setPriority: parameter 3 (priority) is missing: the call has 2 parameters"
        );
    }

    #[test]
    fn wrong_types_are_named() {
        let mut members = BTreeMap::new();
        members.insert("vip".to_owned(), Value::Boolean(true));
        let c = call(
            "agent.setPriority",
            vec![
                Value::Struct(members),
                s("high"),
                Value::Array(vec![s("a"), Value::Struct(BTreeMap::new())]),
                Value::Double(2.5),
                s("ture"),
            ],
        );
        let args = c.args();
        let cases: Vec<(Fault, &str)> = vec![
            (
                args.string(0, "agent").expect_err("struct"),
                "agent.setPriority: parameter 1 (agent) must be a string, found a struct {vip}",
            ),
            (
                args.int(1, "priority").expect_err("string"),
                "agent.setPriority: parameter 2 (priority) must be an integer (<int>, <i4> or <i8>), found a string \"high\"",
            ),
            (
                args.long(1, "n").expect_err("string"),
                "agent.setPriority: parameter 2 (n) must be an integer (<int>, <i4> or <i8>), found a string \"high\"",
            ),
            (
                args.string_list(1, "tags").expect_err("string"),
                "agent.setPriority: parameter 2 (tags) must be an array of strings, found a string \"high\"",
            ),
            (
                args.string_list(2, "tags").expect_err("bad item"),
                "agent.setPriority: parameter 3 (tags), item 2 must be a string, found an empty struct",
            ),
            (
                args.attributes(2, "attributes").expect_err("array"),
                "agent.setPriority: parameter 3 (attributes) must be a struct of flags such as {vip: true}, found an array of 2 values",
            ),
            (
                args.bool(3, "flag").expect_err("double"),
                "agent.setPriority: parameter 4 (flag) must be a flag (<boolean>, 0/1, or \"true\"/\"false\", \"yes\"/\"no\", \"on\"/\"off\"), found a double (2.5)",
            ),
            (
                args.bool(4, "flag").expect_err("typo"),
                "agent.setPriority: parameter 5 (flag) must be a flag (<boolean>, 0/1, or \"true\"/\"false\", \"yes\"/\"no\", \"on\"/\"off\"), found a string \"ture\"",
            ),
        ];
        for (fault, expected) in cases {
            assert_eq!(fault.code(), fault_code::INVALID_PARAMS);
            assert_eq!(fault.string(), expected);
        }
    }

    #[test]
    fn int_in_checks_the_range() {
        let c = call("agent.setDailyCap", vec![s("1001"), Value::Integer(-1)]);
        let fault = c.args().int_in(1, "n", 0..=10_000).expect_err("negative");
        assert_eq!(
            fault.string(),
            "agent.setDailyCap: parameter 2 (n) must be between 0 and 10000, found -1"
        );
        let c = call("agent.setDailyCap", vec![s("1001"), Value::Integer(40)]);
        assert_eq!(c.args().int_in(1, "n", 0..=10_000).expect("in range"), 40);
    }

    #[test]
    fn string_accepts_integers_as_php_sends_ids() {
        let c = call(
            "agent.login",
            vec![Value::Integer(1001), Value::Long(20_000_000_000)],
        );
        assert_eq!(c.args().string(0, "agent").expect("int"), "1001");
        assert_eq!(c.args().string(1, "device").expect("i8"), "20000000000");
        let tags = call(
            "agent.setTags",
            vec![s("1001"), Value::Array(vec![Value::Integer(7), s("vip")])],
        );
        assert_eq!(
            tags.args().string_list(1, "tags").expect("tags"),
            vec!["7".to_owned(), "vip".to_owned()]
        );
    }

    #[test]
    fn attribute_flags_in_every_spelling() {
        let members: BTreeMap<String, Value> = [
            ("b1", Value::Boolean(true)),
            ("b0", Value::Boolean(false)),
            ("i1", Value::Integer(1)),
            ("i0", Value::Integer(0)),
            ("l1", Value::Long(1)),
            ("one", s("1")),
            ("zero", s("0")),
            ("true", s(" TRUE ")),
            ("false", s("False")),
            ("yes", s("yes")),
            ("no", s("no")),
            ("on", s("On")),
            ("off", s("off")),
            ("empty", s("")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let c = call(
            "queue.candidates",
            vec![s("support"), Value::Struct(members)],
        );
        let got = c.args().attributes(1, "attributes").expect("flags");
        let set: Vec<&str> = got
            .iter()
            .filter(|(_, set)| **set)
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(set, vec!["b1", "i1", "l1", "on", "one", "true", "yes"]);
        assert_eq!(got.len(), 14);

        for (bad, found) in [
            (s("maybe"), "a string \"maybe\""),
            (Value::Integer(2), "an integer (2)"),
            (Value::Array(vec![]), "an empty array"),
        ] {
            let members: BTreeMap<String, Value> = [("vip".to_owned(), bad)].into();
            let c = call(
                "queue.candidates",
                vec![s("support"), Value::Struct(members)],
            );
            let fault = c
                .args()
                .attributes(1, "attributes")
                .expect_err("not a flag");
            assert_eq!(fault.code(), fault_code::INVALID_PARAMS);
            assert_eq!(
                fault.string(),
                format!(
                    "queue.candidates: parameter 2 (attributes), member \"vip\" must be {FLAG_EXPECTED}, found {found}"
                )
            );
        }

        let members: BTreeMap<String, Value> = [(" ".to_owned(), Value::Boolean(true))].into();
        let c = call(
            "queue.candidates",
            vec![s("support"), Value::Struct(members)],
        );
        assert_eq!(
            c.args()
                .attributes(1, "attributes")
                .expect_err("empty name")
                .string(),
            "queue.candidates: parameter 2 (attributes) has a member with an empty name"
        );
    }

    #[test]
    fn long_strings_are_cut_in_faults() {
        let c = call("agent.setPriority", vec![s(&"x".repeat(500))]);
        let fault = c.args().int(0, "priority").expect_err("string");
        assert!(
            fault
                .string()
                .ends_with(&format!("\"{}\"…", "x".repeat(SNIPPET_CHARS)))
        );
    }

    // --- multicall -------------------------------------------------------------------

    /// What Python's `xmlrpc.client.MultiCall` sends for `agent.pause("1001", "lunch")`
    /// and `queue.status("support")`, plus a hand-written bad entry, a nested multicall
    /// and an entry that is not a struct.
    const MULTICALL_BODY: &str = "<?xml version='1.0'?>
<methodCall>
<methodName>system.multicall</methodName>
<params>
<param>
<value><array><data>
<value><struct>
<member>
<name>methodName</name>
<value><string>agent.pause</string></value>
</member>
<member>
<name>params</name>
<value><array><data>
<value><string>1001</string></value>
<value><string>lunch</string></value>
</data></array></value>
</member>
</struct></value>
<value><struct>
<member>
<name>methodName</name>
<value><string>agent.login</string></value>
</member>
<member>
<name>params</name>
<value><string>1001</string></value>
</member>
</struct></value>
<value><struct>
<member>
<name>methodName</name>
<value><string>queue.status</string></value>
</member>
<member>
<name>params</name>
<value><array><data>
<value><string>support</string></value>
</data></array></value>
</member>
</struct></value>
<value><struct>
<member>
<name>methodName</name>
<value><string>system.multicall</string></value>
</member>
<member>
<name>params</name>
<value><array><data>
</data></array></value>
</member>
</struct></value>
<value><string>agent.unpause</string></value>
<value><struct>
<member>
<name>params</name>
<value><array><data>
</data></array></value>
</member>
</struct></value>
</data></array></value>
</param>
</params>
</methodCall>
";

    #[test]
    fn multicall_splits_good_and_bad_entries() {
        let outer = decode(MULTICALL_BODY);
        assert_eq!(outer.method, MULTICALL);
        let entries = decode_multicall(outer).expect("an array of calls");
        assert_eq!(entries.len(), 6);
        assert_eq!(
            entries[0].as_ref().expect("good entry"),
            &call("agent.pause", vec![s("1001"), s("lunch")])
        );
        assert_eq!(
            entries[2].as_ref().expect("good entry"),
            &call("queue.status", vec![s("support")])
        );
        let expected_faults = [
            (
                1,
                "system.multicall: entry 2 (agent.login) has params that are not an array: a string \"1001\"",
            ),
            (
                3,
                "system.multicall: entry 4 calls system.multicall again: nested multicalls are refused",
            ),
            (
                4,
                "system.multicall: entry 5 must be a struct {methodName, params}, found a string \"agent.unpause\"",
            ),
            (5, "system.multicall: entry 6 has no methodName member"),
        ];
        for (i, message) in expected_faults {
            let fault = entries[i].as_ref().expect_err("bad entry");
            assert_eq!(fault.code(), fault_code::INVALID_REQUEST);
            assert_eq!(fault.string(), message);
        }
    }

    #[test]
    fn multicall_needs_one_array() {
        let fault = decode_multicall(call(MULTICALL, vec![])).expect_err("no param");
        assert_eq!(fault.code(), fault_code::INVALID_PARAMS);
        assert_eq!(
            fault.string(),
            "system.multicall takes 1 parameter (calls), got 0"
        );
        let fault = decode_multicall(call(MULTICALL, vec![s("x")])).expect_err("not array");
        assert_eq!(
            fault.string(),
            "system.multicall: parameter 1 (calls) must be an array of {methodName, params} structs, found a string \"x\""
        );
        let none = decode_multicall(call(MULTICALL, vec![Value::Array(vec![])])).expect("empty");
        assert!(none.is_empty());
    }

    #[test]
    fn multicall_response_has_the_de_facto_shape() {
        let body = encode_multicall_response(vec![
            Ok(Value::Boolean(true)),
            Err(Fault::new(fault_code::INVALID_PARAMS, "bad".to_owned())),
            Ok(Value::Array(vec![s("a")])),
        ]);
        let text = std::str::from_utf8(&body).expect("ascii");
        assert!(text.starts_with(
            "<?xml version=\"1.0\"?>\n<methodResponse><params><param><value><array><data>"
        ));
        let Value::Array(results) = response_value(&body) else {
            panic!("an array");
        };
        assert_eq!(results.len(), 3);
        assert_eq!(results[0], Value::Array(vec![Value::Boolean(true)]));
        let fault: BTreeMap<String, Value> = [
            ("faultCode".to_owned(), Value::Integer(-32602)),
            ("faultString".to_owned(), s("bad")),
        ]
        .into();
        assert_eq!(results[1], Value::Struct(fault));
        assert_eq!(results[2], Value::Array(vec![Value::Array(vec![s("a")])]));
    }

    // --- encoding --------------------------------------------------------------------

    #[test]
    fn response_has_the_spec_shape_and_round_trips() {
        let body = encode_response(s("South Dakota"));
        assert_eq!(
            std::str::from_utf8(&body).expect("ascii"),
            "<?xml version=\"1.0\"?>\n<methodResponse><params><param><value><string>South Dakota</string></value></param></params></methodResponse>"
        );
        assert_eq!(response_value(&body), s("South Dakota"));

        let mut members = BTreeMap::new();
        members.insert("queue".to_owned(), s("support"));
        members.insert("waiting".to_owned(), Value::Integer(3));
        members.insert("served".to_owned(), Value::Boolean(true));
        members.insert(
            "agents".to_owned(),
            Value::Array(vec![s("1001"), s("1002")]),
        );
        let value = Value::Struct(members);
        assert_eq!(response_value(&encode_response(value.clone())), value);
    }

    #[test]
    fn fault_has_the_spec_shape_and_round_trips() {
        let body = encode_fault(4, "Too many parameters.");
        assert_eq!(
            std::str::from_utf8(&body).expect("ascii"),
            "<?xml version=\"1.0\"?>\n<methodResponse><fault><value><struct>\
<member><name>faultCode</name><value><i4>4</i4></value></member>\
<member><name>faultString</name><value><string>Too many parameters.</string></value></member>\
</struct></value></fault></methodResponse>"
        );
        let fault = response_fault(&body);
        assert_eq!(fault.code(), 4);
        assert_eq!(fault.string(), "Too many parameters.");

        let fault = response_fault(&encode_result(Err(method_not_found("agent.fly"))));
        assert_eq!(fault.code(), fault_code::METHOD_NOT_FOUND);
        assert_eq!(
            fault.string(),
            "unknown method \"agent.fly\" (system.listMethods lists the methods of this server)"
        );
    }

    #[test]
    fn decode_faults_encode_and_round_trip() {
        let fault = fault_of(b"<methodCall><methodName>x</methodName><params><param><value><boolean>2</boolean></value></param></params></methodCall>");
        let back = response_fault(&encode_fault(fault.code(), fault.string()));
        assert_eq!(back, fault);
    }

    #[test]
    fn output_is_ascii_with_character_references() {
        let body = encode_response(s("Zoë <&> 日本 😀 tab\tnl\ncr\r nul\u{0} bell\u{7}"));
        assert!(body.is_ascii());
        let text = std::str::from_utf8(&body).expect("ascii");
        assert!(
            text.contains("Zo&#235; &lt;&amp;&gt; &#26085;&#26412; &#128512;"),
            "{text}"
        );
        assert_eq!(
            response_value(&body),
            s("Zoë <&> 日本 😀 tab\tnl\ncr\r nul\u{fffd} bell\u{fffd}")
        );
        let fault = response_fault(&encode_fault(
            fault_code::APPLICATION_ERROR,
            "agent « 1001 » unknown",
        ));
        assert_eq!(fault.string(), "agent « 1001 » unknown");
    }

    #[test]
    fn list_methods_encodes_an_array_of_names() {
        let names = ["agent.login", "agent.logout", MULTICALL, LIST_METHODS];
        let body = encode_list_methods(&names);
        assert_eq!(
            response_value(&body),
            Value::Array(names.iter().map(|n| s(n)).collect())
        );
    }

    #[test]
    fn json_values_convert() {
        let json = serde_json::json!({
            "queue": "support",
            "waiting": 3,
            "oldest_wait_ms": 5_000_000_000_i64,
            "huge": u64::MAX,
            "ratio": 0.25,
            "served": true,
            "paused_reason": null,
            "agents": ["1001", null, {"id": "1002", "tags": []}],
        });
        let Value::Struct(members) = value_from_json(json) else {
            panic!("a struct");
        };
        assert_eq!(members.get("queue"), Some(&s("support")));
        assert_eq!(members.get("waiting"), Some(&Value::Integer(3)));
        assert_eq!(
            members.get("oldest_wait_ms"),
            Some(&Value::Long(5_000_000_000))
        );
        assert_eq!(members.get("huge"), Some(&s("18446744073709551615")));
        assert_eq!(members.get("ratio"), Some(&Value::Double(0.25)));
        assert_eq!(members.get("served"), Some(&Value::Boolean(true)));
        assert!(
            !members.contains_key("paused_reason"),
            "null members are left out"
        );
        let agent: BTreeMap<String, Value> = [
            ("id".to_owned(), s("1002")),
            ("tags".to_owned(), Value::Array(vec![])),
        ]
        .into();
        assert_eq!(
            members.get("agents"),
            Some(&Value::Array(vec![
                s("1001"),
                Value::Nil,
                Value::Struct(agent)
            ]))
        );
        assert_eq!(
            value_from_json(serde_json::json!(-2_147_483_648_i64)),
            Value::Integer(i32::MIN)
        );
        assert_eq!(
            value_from_json(serde_json::json!(2_147_483_648_i64)),
            Value::Long(2_147_483_648)
        );
    }

    #[test]
    fn serializable_values_convert() {
        #[derive(serde::Serialize)]
        struct Status {
            queue: String,
            waiting: u32,
            note: Option<String>,
        }
        let value = value_from_serialize(&Status {
            queue: "support".to_owned(),
            waiting: 2,
            note: None,
        })
        .expect("serializable");
        let expected: BTreeMap<String, Value> = [
            ("queue".to_owned(), s("support")),
            ("waiting".to_owned(), Value::Integer(2)),
        ]
        .into();
        assert_eq!(value, Value::Struct(expected));

        let mut bad = std::collections::HashMap::new();
        bad.insert((1, 2), 3);
        let fault = value_from_serialize(&bad).expect_err("non-string keys");
        assert_eq!(fault.code(), fault_code::INTERNAL_ERROR);
    }

    // --- properties ------------------------------------------------------------------

    /// Encodes a call the way a client library would, with this module's character rules.
    fn encode_call(method: &str, params: Vec<Value>) -> Vec<u8> {
        let call = MethodCall {
            name: method.into(),
            params,
        };
        finish(&call.to_xml().expect("a call serializes"))
    }

    fn xml_char() -> impl Strategy<Value = char> {
        any::<char>().prop_filter("XML 1.0 characters", |c| {
            matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
        })
    }

    fn xml_string() -> impl Strategy<Value = String> {
        prop::collection::vec(xml_char(), 0..12).prop_map(String::from_iter)
    }

    /// A member name is never blank: dxr (and so this decoder) cannot read `<name></name>`.
    fn member_name() -> impl Strategy<Value = String> {
        xml_string().prop_filter("not blank", |name| !xml_trim(name).is_empty())
    }

    fn value_strategy() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i32>().prop_map(Value::Integer),
            any::<i64>().prop_map(Value::Long),
            any::<bool>().prop_map(Value::Boolean),
            xml_string().prop_map(Value::String),
            any::<f64>()
                .prop_filter("finite", |d| d.is_finite())
                .prop_map(Value::Double),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(Value::Base64),
            Just(Value::Nil),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(member_name(), inner, 0..4).prop_map(Value::Struct),
            ]
        })
    }

    /// Whatever the decoder lets in, the encoder can send back in a body a client reads.
    fn assert_answerable(call: &Call) {
        let body = encode_response(Value::Array(call.params.clone()));
        assert!(body.is_ascii());
        let text = std::str::from_utf8(&body).expect("ascii");
        assert!(MethodResponse::from_xml(text).is_ok(), "{text}");
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_call(&body);
        }

        #[test]
        fn decode_never_panics_on_damaged_calls(
            cut in 0..MULTICALL_BODY.len(),
            at in 0..MULTICALL_BODY.len(),
            byte in any::<u8>(),
        ) {
            let mut body = MULTICALL_BODY.as_bytes().to_vec();
            body[at] = byte;
            if let Ok(call) = decode_call(&body) {
                assert_answerable(&call);
            }
            body.truncate(cut);
            let _ = decode_call(&body);
            if let Ok(call) = decode_call(&MULTICALL_BODY.as_bytes()[..cut]) {
                let _ = decode_multicall(call);
            }
        }

        #[test]
        fn responses_round_trip(value in value_strategy()) {
            let body = encode_response(value.clone());
            prop_assert!(body.is_ascii());
            prop_assert_eq!(response_value(&body), value);
        }

        #[test]
        fn calls_round_trip(method in "[a-zA-Z][a-zA-Z0-9_.:/]{0,20}", params in prop::collection::vec(value_strategy(), 0..4)) {
            let body = encode_call(&method, params.clone());
            let call = decode_call(&body).map_err(|fault| TestCaseError::fail(fault.to_string()))?;
            prop_assert_eq!(call.method, method);
            prop_assert_eq!(call.params, params);
        }

        #[test]
        fn faults_round_trip(code in any::<i32>(), message in xml_string()) {
            let fault = response_fault(&encode_fault(code, &message));
            prop_assert_eq!(fault.code(), code);
            prop_assert_eq!(fault.string(), message.as_str());
        }
    }

    #[test]
    fn members_are_read_by_name_and_a_misspelt_one_is_a_fault() {
        let steering = |members: Vec<(&str, Value)>| {
            call(
                "autoscaler.set",
                vec![Value::Struct(
                    members
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                )],
            )
        };
        let known = ["paused", "min_extra", "max_extra"];
        let c = steering(vec![
            ("paused", s("yes")),
            ("min_extra", Value::Long(2)),
            ("max_extra", Value::Nil),
        ]);
        let members = c.args().members(0, "steering", &known).expect("members");
        assert_eq!(members.flag("paused").expect("flag"), Some(true));
        assert_eq!(members.int_in("min_extra", 0..=9).expect("int"), Some(2));
        assert_eq!(members.int_in("max_extra", 0..=9).expect("nil"), None);
        assert_eq!(members.flag("absent").expect("absent"), None);

        let c = steering(vec![("min_extra", Value::Integer(10))]);
        let members = c.args().members(0, "steering", &known).expect("members");
        assert_eq!(
            members
                .int_in("min_extra", 0..=9)
                .expect_err("range")
                .string(),
            "autoscaler.set: parameter 1 (steering), member \"min_extra\" must be an integer between 0 and 9, found an integer (10)"
        );
        let c = steering(vec![("paused", s("maybe"))]);
        let members = c.args().members(0, "steering", &known).expect("members");
        assert_eq!(
            members.flag("paused").expect_err("flag").code(),
            fault_code::INVALID_PARAMS
        );

        let c = steering(vec![("max_extar", Value::Integer(1))]);
        let fault = c.args().members(0, "steering", &known).expect_err("typo");
        assert_eq!(
            fault.string(),
            "autoscaler.set: parameter 1 (steering) has no member \"max_extar\"; its members are paused, min_extra, max_extra"
        );
        let c = call("autoscaler.set", vec![s("x")]);
        let fault = c
            .args()
            .members(0, "steering", &known)
            .expect_err("not a struct");
        assert_eq!(
            fault.string(),
            "autoscaler.set: parameter 1 (steering) must be a struct, found a string \"x\""
        );
    }
}
