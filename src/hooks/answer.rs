//! The backend's answers, checked: each hook's answer has one shape (PROTOCOL.md,
//! "Hooks"); anything else is a [`Failure::Shape`] (or [`Failure::NotJson`]), never a panic.

use serde_json::{Map, Value};

use super::Failure;

/// Longest error code or message kept from a backend's `{error:{code,message}}`.
const MAX_ERROR_TEXT: usize = 256;

/// The backend's refusal: `{error:{code,message}}` (the code is what the client sees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The backend's code, if it gave one (the caller has a default per hook).
    pub code: Option<String>,
    pub message: String,
}

/// The `connect` hook's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectAnswer {
    /// `{user, name?, rooms?}`: act like a token with this `sub`, `name`, `rooms`.
    Accept {
        user: String,
        name: Option<String>,
        rooms: Option<Vec<String>>,
    },
    Refuse(Refusal),
}

/// The `join` and `publish` hooks' answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `{ok:true}`, and for `publish` maybe the rewritten `text`.
    Allow {
        text: Option<String>,
    },
    Refuse(Refusal),
}

/// The `rpc` hook's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum RpcAnswer {
    /// `{result}`: any JSON, `null` included.
    Result(Value),
    /// `{error}`: the error as the backend gave it (an object with `code`, `message`).
    Error(Value),
}

/// Parses a body as a JSON object.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, Failure> {
    match serde_json::from_slice::<Value>(body).map_err(Failure::NotJson)? {
        Value::Object(m) => Ok(m),
        _ => Err(Failure::Shape("not a JSON object")),
    }
}

/// `{error:{code?,message?}}`, if the answer is one.
fn refusal(answer: &Map<String, Value>) -> Result<Option<Refusal>, Failure> {
    let Some(error) = answer.get("error").filter(|e| !e.is_null()) else {
        return Ok(None);
    };
    let error = error
        .as_object()
        .ok_or(Failure::Shape("error is not an object"))?;
    let code = match error.get("code") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if !c.is_empty() && c.len() <= MAX_ERROR_TEXT => Some(c.clone()),
        Some(_) => return Err(Failure::Shape("error.code is not a short string")),
    };
    let message = match error.get("message") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(m)) => truncate(m),
        Some(_) => return Err(Failure::Shape("error.message is not a string")),
    };
    Ok(Some(Refusal { code, message }))
}

/// At most [`MAX_ERROR_TEXT`] bytes, cut on a character boundary.
fn truncate(s: &str) -> String {
    let mut end = s.len().min(MAX_ERROR_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// An optional string field.
fn opt_str(answer: &Map<String, Value>, key: &str) -> Result<Option<String>, Failure> {
    match answer.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Failure::Shape("a field that must be a string is not")),
    }
}

/// The `connect` answer: `{user, name?, rooms?}` or `{error}`.
pub fn connect(body: &[u8]) -> Result<ConnectAnswer, Failure> {
    let answer = object(body)?;
    if let Some(r) = refusal(&answer)? {
        return Ok(ConnectAnswer::Refuse(r));
    }
    let user = opt_str(&answer, "user")?.ok_or(Failure::Shape("no user and no error"))?;
    if user.is_empty() || user.len() > 128 {
        return Err(Failure::Shape("user must be 1-128 bytes"));
    }
    let rooms = match answer.get("rooms") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => Some(
            list.iter()
                .map(|r| r.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(Failure::Shape("rooms must be strings"))?,
        ),
        Some(_) => return Err(Failure::Shape("rooms is not a list")),
    };
    Ok(ConnectAnswer::Accept {
        user,
        name: opt_str(&answer, "name")?,
        rooms,
    })
}

/// The `join` or `publish` answer: `{ok:true, text?}` or `{error}` (`{ok:false}` alone
/// is a refusal without a code).
pub fn verdict(body: &[u8]) -> Result<Verdict, Failure> {
    let answer = object(body)?;
    if let Some(r) = refusal(&answer)? {
        return Ok(Verdict::Refuse(r));
    }
    match answer.get("ok") {
        Some(Value::Bool(true)) => Ok(Verdict::Allow {
            text: opt_str(&answer, "text")?,
        }),
        Some(Value::Bool(false)) => Ok(Verdict::Refuse(Refusal {
            code: None,
            message: String::new(),
        })),
        _ => Err(Failure::Shape("neither ok nor error")),
    }
}

/// The `rpc` answer: `{result}` or `{error}`.
pub fn rpc(body: &[u8]) -> Result<RpcAnswer, Failure> {
    let mut answer = object(body)?;
    if let Some(error) = answer.remove("error").filter(|e| !e.is_null()) {
        if !error.is_object() {
            return Err(Failure::Shape("error is not an object"));
        }
        return Ok(RpcAnswer::Error(error));
    }
    answer
        .remove("result")
        .map(RpcAnswer::Result)
        .ok_or(Failure::Shape("neither result nor error"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(
            connect(br#"{"user":"bob","rooms":["a","b*"]}"#).unwrap(),
            ConnectAnswer::Accept {
                user: "bob".into(),
                name: None,
                rooms: Some(vec!["a".into(), "b*".into()])
            }
        );
        assert!(matches!(
            connect(br#"{"error":{"code":"banned","message":"no"}}"#).unwrap(),
            ConnectAnswer::Refuse(Refusal { code: Some(c), .. }) if c == "banned"
        ));
        assert_eq!(
            verdict(br#"{"ok":true,"text":"hi"}"#).unwrap(),
            Verdict::Allow {
                text: Some("hi".into())
            }
        );
        assert!(matches!(
            verdict(br#"{"ok":false}"#).unwrap(),
            Verdict::Refuse(_)
        ));
        assert_eq!(
            rpc(br#"{"result":null}"#).unwrap(),
            RpcAnswer::Result(Value::Null)
        );
        for bad in [
            &b"nope"[..],
            b"[]",
            b"{}",
            br#"{"user":""}"#,
            br#"{"user":1}"#,
            br#"{"error":"x"}"#,
            br#"{"ok":"yes"}"#,
        ] {
            assert!(connect(bad).is_err() || verdict(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(verdict(b"<html>"), Err(Failure::NotJson(_))));
        assert!(matches!(rpc(b"{}"), Err(Failure::Shape(_))));
    }
}
