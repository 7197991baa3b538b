//! Emits from existing Node services: the wire format of `@socket.io/redis-emitter`
//! (5.x, the same one `@socket.io/redis-adapter` 8.x publishes between Node servers),
//! decoded into what corelay delivers.
//!
//! `io.to(room).emit(event, …args)` PUBLISHes, with classic pub/sub, a MessagePack
//! (`notepack.io`) array `[uid, packet, opts]`:
//!
//! - `uid`: the sender's id (`"emitter"`; a Node server's random id); not used here;
//! - `packet`: `{type: 2, data: [event, …args], nsp: "/"}` (a Socket.IO EVENT);
//! - `opts`: `{rooms: [...], except: [...], flags: {volatile?, compress?}}`;
//!
//! on channel `<prefix>#<nsp>#`, or `<prefix>#<nsp>#<room>#` when exactly one room is
//! named (`prefix` is the emitter's `key` option, `socket.io` by default). A host reads
//! them all with one `PSUBSCRIBE <prefix>#/#*` ([`pattern`]); on a Redis Cluster a classic
//! PUBLISH reaches the subscribers of every node, so any node will do.
//!
//! The emitter's other calls (`socketsJoin`, `socketsLeave`, `disconnectSockets`,
//! `serverSideEmit`) are JSON requests on `<prefix>-request#<nsp>#`: corelay does not read
//! them (its rooms are joined through `join`, with their grants).
//!
//! An emit's arguments become the JSON a Node server would send: a `Date` (MessagePack
//! timestamp extension) becomes its ISO string, as `JSON.stringify` writes it. Binary
//! arguments (a `Buffer`) would need a Socket.IO binary packet and are refused
//! ([`EmitError::Binary`]).

use std::io::Cursor;
use std::sync::Arc;

use rmpv::Value;

/// The emitter's default key prefix (its `key` option).
pub const DEFAULT_PREFIX: &str = "socket.io";

/// Deepest nesting decoded (each array or map level counts twice in `rmpv`'s depth): a
/// deeper message is refused rather than recursed into on the bridge's stack.
const MAX_DEPTH: usize = 256;

/// The pattern that matches every broadcast channel of namespace `/` under `prefix`,
/// with the prefix's glob characters escaped.
pub fn pattern(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 4);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push_str("#/#*");
    out
}

/// One emit, decoded: the event and its arguments, and whom it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    /// `[event, …args]` as JSON: the body of the `42[…]` packet a client receives.
    pub data: Vec<u8>,
    /// The rooms it goes to; empty: every connected socket.
    pub rooms: Vec<String>,
    /// Members of these rooms do not get it.
    pub except: Vec<String>,
    /// The emitter's `volatile` flag: it may be dropped for a client that is behind.
    pub volatile: bool,
}

/// Where the process's link hands each message read from the emitter's channels
/// ([`RedisCluster::on_emit`](super::redis::RedisCluster::on_emit)), decoded or not. It runs
/// on the bridge's thread: it must not block.
pub type EmitSink = Arc<dyn Fn(Result<Emit, EmitError>) + Send + Sync>;

/// Why a message on an emitter channel is not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// The payload is not one whole MessagePack value.
    #[error("not MessagePack: {0}")]
    NotMsgpack(String),
    /// MessagePack, but not `[uid, packet, opts]` as the emitter writes it.
    #[error("not an emitter broadcast: {0}")]
    Shape(&'static str),
    /// A packet for another namespace than `/` (corelay serves `/` only).
    #[error("namespace {0:?} is not served (only \"/\")")]
    Namespace(String),
    /// A packet that is not an EVENT (type 2).
    #[error("packet type {0} is not delivered (only EVENT, 2)")]
    PacketType(String),
    /// An argument holds binary data (a `Buffer`), which needs a binary packet.
    #[error("binary arguments are not supported")]
    Binary,
}

/// Decodes one message published on an emitter channel.
pub fn decode(payload: &[u8]) -> Result<Emit, EmitError> {
    let mut cursor = Cursor::new(payload);
    let value = rmpv::decode::read_value_with_max_depth(&mut cursor, MAX_DEPTH)
        .map_err(|e| EmitError::NotMsgpack(e.to_string()))?;
    if cursor.position() != payload.len() as u64 {
        return Err(EmitError::NotMsgpack("bytes after the message".into()));
    }
    let Value::Array(parts) = value else {
        return Err(EmitError::Shape("not an array"));
    };
    let [_uid, packet, opts] = parts.as_slice() else {
        return Err(EmitError::Shape("not [uid, packet, opts]"));
    };
    let packet = map_of(packet).ok_or(EmitError::Shape("packet is not a map"))?;
    match field(packet, "nsp") {
        None | Some(Value::Nil) => {}
        Some(Value::String(s)) if s.as_str() == Some("/") => {}
        Some(other) => return Err(EmitError::Namespace(other.to_string())),
    }
    match field(packet, "type") {
        Some(Value::Integer(t)) if t.as_u64() == Some(2) => {}
        other => {
            return Err(EmitError::PacketType(
                other.map_or_else(|| "(none)".into(), ToString::to_string),
            ))
        }
    }
    let data = match field(packet, "data") {
        Some(Value::Array(args)) if matches!(args.first(), Some(Value::String(_))) => args,
        _ => return Err(EmitError::Shape("packet data is not [event, …args]")),
    };
    let mut json = Vec::with_capacity(payload.len() + 16);
    write_array(&mut json, data)?;
    let opts = map_of(opts).ok_or(EmitError::Shape("opts is not a map"))?;
    let volatile = map_of(field(opts, "flags").unwrap_or(&Value::Nil))
        .and_then(|flags| field(flags, "volatile"))
        .is_some_and(|v| v.as_bool() == Some(true));
    Ok(Emit {
        data: json,
        rooms: rooms(field(opts, "rooms"))?,
        except: rooms(field(opts, "except"))?,
        volatile,
    })
}

/// A map's entries, if `v` is a map.
fn map_of(v: &Value) -> Option<&[(Value, Value)]> {
    match v {
        Value::Map(entries) => Some(entries),
        _ => None,
    }
}

/// The value of a map's string key `name`.
fn field<'a>(map: &'a [(Value, Value)], name: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
}

/// A list of room names (absent or nil: none). Socket.IO rooms may be numbers: they are
/// named by their decimal form, as corelay's rooms are strings.
fn rooms(v: Option<&Value>) -> Result<Vec<String>, EmitError> {
    let items = match v {
        None | Some(Value::Nil) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(EmitError::Shape("rooms is not an array")),
    };
    items
        .iter()
        .map(|r| match r {
            Value::String(s) => s
                .as_str()
                .map(str::to_owned)
                .ok_or(EmitError::Shape("a room name is not UTF-8")),
            Value::Integer(n) => Ok(n.to_string()),
            _ => Err(EmitError::Shape("a room name is not a string")),
        })
        .collect()
}

/// Writes `v` as the JSON `JSON.stringify` gives for what `notepack.io` decodes it to.
fn write_json(out: &mut Vec<u8>, v: &Value) -> Result<(), EmitError> {
    let json_err = |_| EmitError::Shape("unwritable value");
    match v {
        Value::Nil => out.extend_from_slice(b"null"),
        Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Integer(n) => out.extend_from_slice(n.to_string().as_bytes()),
        // serde_json writes a non-finite number as null, as JSON.stringify does.
        Value::F32(f) => serde_json::to_writer(&mut *out, &f64::from(*f)).map_err(json_err)?,
        Value::F64(f) => serde_json::to_writer(&mut *out, f).map_err(json_err)?,
        Value::String(s) => {
            let s = s
                .as_str()
                .ok_or(EmitError::Shape("a string is not UTF-8"))?;
            serde_json::to_writer(&mut *out, s).map_err(json_err)?;
        }
        Value::Binary(_) => return Err(EmitError::Binary),
        Value::Array(items) => write_array(out, items)?,
        Value::Map(entries) => {
            out.push(b'{');
            for (i, (k, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let key = k
                    .as_str()
                    .ok_or(EmitError::Shape("a map key is not a string"))?;
                serde_json::to_writer(&mut *out, key).map_err(json_err)?;
                out.push(b':');
                write_json(out, item)?;
            }
            out.push(b'}');
        }
        Value::Ext(-1, body) => {
            let ms = timestamp_ms(body).ok_or(EmitError::Shape("a bad timestamp"))?;
            out.push(b'"');
            out.extend_from_slice(
                iso_date(ms)
                    .ok_or(EmitError::Shape("a date out of range"))?
                    .as_bytes(),
            );
            out.push(b'"');
        }
        Value::Ext(..) => return Err(EmitError::Shape("an unknown extension type")),
    }
    Ok(())
}

/// Writes `items` as a JSON array.
fn write_array(out: &mut Vec<u8>, items: &[Value]) -> Result<(), EmitError> {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json(out, item)?;
    }
    out.push(b']');
    Ok(())
}

/// The MessagePack timestamp extension (32, 64 or 96 bits) in ms since the epoch,
/// truncated as a JavaScript `Date` holds it.
fn timestamp_ms(body: &[u8]) -> Option<i64> {
    let (secs, nanos): (i64, u32) = match body.len() {
        4 => (i64::from(u32::from_be_bytes(body.try_into().ok()?)), 0),
        8 => {
            let v = u64::from_be_bytes(body.try_into().ok()?);
            ((v & 0x3_ffff_ffff) as i64, (v >> 34) as u32)
        }
        12 => (
            i64::from_be_bytes(body[4..].try_into().ok()?),
            u32::from_be_bytes(body[..4].try_into().ok()?),
        ),
        _ => return None,
    };
    if nanos >= 1_000_000_000 {
        return None;
    }
    secs.checked_mul(1000)?
        .checked_add(i64::from(nanos / 1_000_000))
}

/// `Date.prototype.toISOString` for years 0000 to 9999: `YYYY-MM-DDTHH:mm:ss.sssZ`.
fn iso_date(ms: i64) -> Option<String> {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return None;
    }
    let (h, m, s, milli) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z"
    ))
}

#[cfg(test)]
mod tests;
