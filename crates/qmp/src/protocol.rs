//! The QMP wire protocol (QEMU `docs/interop/qmp-spec.rst`), without I/O.
//!
//! # Message sequence
//!
//! ```text
//! client                                   server
//!   | ---------------- connect -------------> |
//!   | <-- {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
//!   |              "package": "baton 0.1.0"}, "capabilities": []}}
//!   |                                          |   capabilities negotiation mode:
//!   | -- {"execute": "query-status"} -------> |   anything but qmp_capabilities is
//!   | <-- {"error": {"class": "CommandNotFound", "desc": "Expecting capabilities
//!   |               negotiation with 'qmp_capabilities'"}}
//!   | -- {"execute": "qmp_capabilities"} ---> |
//!   | <-- {"return": {}} ----------------------|   command mode from here on:
//!   | -- {"execute": "stop", "id": 7} ------> |   commands run in order, one reply
//!   | <-- {"return": {}, "id": 7} ------------ |   each, echoing "id" (any JSON value)
//!   | <-- {"event": "STOP", "timestamp": {"seconds": S, "microseconds": U}}
//!   |                                          |   events go to every client in
//!   |                                          |   command mode, interleaved between
//!   |                                          |   replies, never inside one
//! ```
//!
//! Each server message is one line of compact JSON terminated by CRLF, as QEMU writes
//! them. Client input is a stream of JSON objects in any layout (see
//! [`crate::framing`]). Out-of-band execution is not offered: the greeting lists no
//! `oob` capability, `qmp_capabilities` with `enable: ["oob"]` fails with
//! `Capability 'oob' not available`, and an `exec-oob` member is refused as QEMU refuses
//! it when OOB is not enabled.
//!
//! # Errors for malformed input (the connection stays usable)
//!
//! | input                                 | reply (`GenericError` unless noted)           |
//! |---------------------------------------|-----------------------------------------------|
//! | not JSON                              | `JSON parse error, <where and why>`           |
//! | JSON but not an object                | `QMP input must be a JSON object`             |
//! | no `execute`                          | `QMP input lacks member 'execute'`            |
//! | `execute` not a string                | `QMP input member 'execute' must be a string` |
//! | `arguments` not an object             | `QMP input member 'arguments' must be an object` |
//! | any other member (`exec-oob`, typos)  | `QMP input member 'NAME' is unexpected`       |
//! | unknown command                       | `CommandNotFound`: `The command NAME has not been found` |
//! | bad arguments                         | see [`crate::args`]                           |
//! | too large / too deep                  | `JSON message size limit exceeded (N bytes)`  |
//!
//! Errors about input that was not an object carry no `id` (there is none to echo);
//! all others echo the request's `id` when it has one.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::QmpError;
use crate::schema::VersionInfo;

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The `id` member, echoed in the reply.
    pub id: Option<Value>,
    /// The command name (`execute`).
    pub command: String,
    /// The `arguments` member, empty when absent.
    pub arguments: Map<String, Value>,
}

/// A request that cannot be executed, with the `id` to echo when one was found.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    /// The request's `id`, when the input was an object that had one.
    pub id: Option<Value>,
    /// The error reply.
    pub error: QmpError,
}

/// Parses and checks one framed message, as QEMU's `qmp_dispatch_check_obj` does.
pub fn parse_request(frame: &[u8]) -> Result<Request, BadRequest> {
    let value: Value = serde_json::from_slice(frame).map_err(|e| BadRequest {
        id: None,
        error: QmpError::generic(format!("JSON parse error, {e}")),
    })?;
    let Value::Object(mut obj) = value else {
        return Err(BadRequest {
            id: None,
            error: QmpError::generic("QMP input must be a JSON object"),
        });
    };
    let id = obj.remove("id");
    let fail = |id: Option<Value>, desc: String| BadRequest {
        id,
        error: QmpError::generic(desc),
    };
    if let Some(key) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
    {
        return Err(fail(id, format!("QMP input member '{key}' is unexpected")));
    }
    let command = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(fail(
                id,
                "QMP input member 'execute' must be a string".into(),
            ))
        }
        None => return Err(fail(id, "QMP input lacks member 'execute'".into())),
    };
    let arguments = match obj.remove("arguments") {
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(fail(
                id,
                "QMP input member 'arguments' must be an object".into(),
            ))
        }
        None => Map::new(),
    };
    Ok(Request {
        id,
        command,
        arguments,
    })
}

/// The greeting, `{"QMP": {"version": ..., "capabilities": []}}`.
#[derive(Debug, Clone, Serialize)]
pub struct Greeting<'a> {
    /// The only member.
    #[serde(rename = "QMP")]
    pub qmp: GreetingBody<'a>,
}

/// The body of the greeting.
#[derive(Debug, Clone, Serialize)]
pub struct GreetingBody<'a> {
    /// Same shape as `query-version`.
    pub version: &'a VersionInfo,
    /// Offered capabilities (baton offers none: no `oob`).
    pub capabilities: &'a [&'a str],
}

#[derive(Serialize)]
struct ReturnMsg<'a> {
    #[serde(rename = "return")]
    ret: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct ErrorMsg<'a> {
    error: &'a QmpError,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

/// `{"seconds": S, "microseconds": U}`, wall-clock time of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timestamp {
    /// Seconds since the UNIX epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: since.as_secs(),
            microseconds: since.subsec_micros(),
        }
    }
}

#[derive(Serialize)]
struct EventMsg<'a> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    timestamp: Timestamp,
}

/// Serialises a server message as one CRLF-terminated line.
fn line<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising these plain structs into a Vec cannot fail: keys are strings and
    // values are already JSON.
    let mut out = serde_json::to_vec(msg).unwrap_or_else(|e| {
        tracing::error!("QMP message serialisation failed: {e}");
        br#"{"error": {"class": "GenericError", "desc": "internal serialisation error"}}"#.to_vec()
    });
    out.extend_from_slice(b"\r\n");
    out
}

/// The greeting line.
pub fn encode_greeting(version: &VersionInfo) -> Vec<u8> {
    line(&Greeting {
        qmp: GreetingBody {
            version,
            capabilities: &[],
        },
    })
}

/// A success reply line.
pub fn encode_return(ret: &Value, id: Option<&Value>) -> Vec<u8> {
    line(&ReturnMsg { ret, id })
}

/// An error reply line.
pub fn encode_error(error: &QmpError, id: Option<&Value>) -> Vec<u8> {
    line(&ErrorMsg { error, id })
}

/// An event line. `data` is omitted when `None` (as for `STOP`).
pub fn encode_event(event: &str, data: Option<&Value>, timestamp: Timestamp) -> Vec<u8> {
    line(&EventMsg {
        event,
        data,
        timestamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use serde_json::json;

    fn desc(input: &str) -> (Option<Value>, String) {
        let err = parse_request(input.as_bytes()).expect_err(input);
        assert_eq!(err.error.class, ErrorClass::GenericError);
        (err.id, err.error.desc)
    }

    #[test]
    fn valid_request() {
        let req =
            parse_request(br#"{"execute": "stop", "arguments": {"a": 1}, "id": [1]}"#).unwrap();
        assert_eq!(req.command, "stop");
        assert_eq!(req.id, Some(json!([1])));
        assert_eq!(req.arguments.get("a"), Some(&json!(1)));
    }

    #[test]
    fn malformed_requests_are_named() {
        assert!(desc("{\"execute\": }").1.starts_with("JSON parse error, "));
        assert_eq!(desc("[1]").1, "QMP input must be a JSON object");
        assert_eq!(
            desc(r#"{"id": 3}"#),
            (Some(json!(3)), "QMP input lacks member 'execute'".into())
        );
        assert_eq!(
            desc(r#"{"execute": 1, "id": "x"}"#),
            (
                Some(json!("x")),
                "QMP input member 'execute' must be a string".into()
            )
        );
        assert_eq!(
            desc(r#"{"execute": "stop", "arguments": []}"#).1,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(r#"{"exec-oob": "stop"}"#).1,
            "QMP input member 'exec-oob' is unexpected"
        );
    }

    #[test]
    fn encodings() {
        let v = VersionInfo::new(7, 2, 0, "baton test");
        let g: Value = serde_json::from_slice(&encode_greeting(&v)).unwrap();
        assert_eq!(
            g,
            json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                "package": "baton test"}, "capabilities": []}})
        );
        assert!(encode_return(&json!({}), None).ends_with(b"}\r\n"));
        let e = encode_error(&QmpError::generic("x"), Some(&json!(1)));
        assert_eq!(
            std::str::from_utf8(&e).unwrap(),
            "{\"error\":{\"class\":\"GenericError\",\"desc\":\"x\"},\"id\":1}\r\n"
        );
    }
}
