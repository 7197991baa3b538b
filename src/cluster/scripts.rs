//! The Lua scripts the cluster layer runs in Redis. Each one touches the keys of a single
//! room only (one hash tag, so one Redis Cluster slot), and runs atomically: no other
//! command sees a half-done publish. They are sent with EVALSHA and loaded (SCRIPT LOAD) on
//! the first `NOSCRIPT` of each connection, by `redis::Script`.

/// Helpers shared by the scripts (prepended to them).
const HELPERS: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function id_offset(id)
  return tonumber(string.match(id, '^(%d+)'))
end

-- The offset of the stream's newest entry, 0 when empty.
local function last_offset(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last > 0 then
    return id_offset(last[1][1]) or 0
  end
  return 0
end

local function entry_ts(entry)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == 'ts' then return tonumber(f[i + 1]) end
  end
  return nil
end

-- Trims entries older than max_age_ms from the head of the stream (ts field against the
-- Redis clock). Bounded work: the head entry is looked at first, and at most 10 rounds of
-- 100 entries are removed per call, so a backlog goes away over a few publishes.
local function trim_age(stream, max_age_ms, now)
  if max_age_ms <= 0 then return end
  local cutoff = now - max_age_ms
  local batch = 1
  for _ = 1, 10 do
    local entries = redis.call('XRANGE', stream, '-', '+', 'COUNT', batch)
    if #entries == 0 then return end
    for i = 1, #entries do
      local ts = entry_ts(entries[i])
      if ts == nil or ts >= cutoff then
        if i > 1 then redis.call('XTRIM', stream, 'MINID', entries[i][1]) end
        return
      end
    end
    local next_min = string.format('%d', id_offset(entries[#entries][1]) + 1)
    redis.call('XTRIM', stream, 'MINID', next_min)
    if #entries < batch then return end
    batch = 100
  end
end
"#;

/// The publish script.
///
/// KEYS: 1 offset counter, 2 stream, 3 dedupe key (looked at only when ARGV[2] is `1`).
/// ARGV: 1 channel, 2 has cid (`0`/`1`), 3 cid, 4 user, 5 text, 6 ts, 7 id, 8 dedupe window
/// ms, 9 stream max len (0: none), 10 max age ms (0: none), 11 `PUBLISH` or `SPUBLISH`,
/// 12 deadline (Redis clock ms; 0: none), 13 payload prefix, 14 payload suffix (the payload
/// is prefix .. offset .. suffix), 15 floor: an offset the caller knows was handed out
/// already (0: none); the new offset is always above it.
///
/// Returns `{'ok', offset}`, `{'dup', '<offset>:<ts>:<id>'}` (the first ack, nothing done) or
/// `{'expired', now}` (past the deadline: the caller gave up already, nothing done).
const PUBLISH_BODY: &str = r#"
local now = now_ms()
local deadline = tonumber(ARGV[12])
if deadline > 0 and now > deadline then
  return {'expired', string.format('%d', now)}
end
local has_cid = ARGV[2] == '1'
if has_cid then
  local first = redis.call('GET', KEYS[3])
  if first then return {'dup', first} end
end
local offset = redis.call('INCR', KEYS[1])
local last = last_offset(KEYS[2])
local floor = tonumber(ARGV[15]) or 0
if floor > last then last = floor end
if last >= offset then
  -- The counter fell behind the stream or the caller's floor (lost or reset): never reuse
  -- an offset.
  offset = last + 1
  redis.call('SET', KEYS[1], string.format('%d', offset))
end
local off = string.format('%d', offset)
local fields = {'id', ARGV[7], 'user', ARGV[4], 'text', ARGV[5], 'ts', ARGV[6]}
if has_cid then
  fields[#fields + 1] = 'cid'
  fields[#fields + 1] = ARGV[3]
end
if tonumber(ARGV[9]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], off .. '-0', unpack(fields))
else
  redis.call('XADD', KEYS[2], off .. '-0', unpack(fields))
end
if has_cid and tonumber(ARGV[8]) > 0 then
  redis.call('SET', KEYS[3], off .. ':' .. ARGV[6] .. ':' .. ARGV[7], 'PX', ARGV[8])
end
trim_age(KEYS[2], tonumber(ARGV[10]), now)
redis.call(ARGV[11], ARGV[1], ARGV[13] .. off .. ARGV[14])
return {'ok', off}
"#;

/// The store's append script, for one room's part of a batch.
///
/// KEYS: 1 offset counter, 2 stream, 3.. the dedupe keys of the messages that carry a cid.
/// ARGV: 1 mode (`check` or `write`), 2 dedupe window ms, 3 max len (0: none), 4 max age ms
/// (0: none), 5 message count n, then 7 values per message: offset, id, user, text, ts, cid,
/// index of its dedupe key among KEYS[3..] (1-based; 0: no cid).
///
/// A message whose offset is not above the room's latest is accepted only when the stream
/// holds exactly that message at that offset already (idempotent re-append); else the whole
/// call is refused with `{'conflict', offset, latest}` and nothing is written. In `check`
/// mode nothing is written either way. Returns `{'ok', written}`.
const APPEND_BODY: &str = r#"
local latest = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local last = last_offset(KEYS[2])
if last > latest then latest = last end
local n = tonumber(ARGV[5])
local prev = latest
local write = {}
for i = 0, n - 1 do
  local b = 6 + i * 7
  local off = tonumber(ARGV[b])
  if off > prev then
    prev = off
    write[#write + 1] = b
  else
    local same = false
    if off <= latest then
      local e = redis.call('XRANGE', KEYS[2], ARGV[b] .. '-0', ARGV[b] .. '-0')
      if #e == 1 then
        local f = {}
        local fl = e[1][2]
        for j = 1, #fl, 2 do f[fl[j]] = fl[j + 1] end
        local cid_same
        if ARGV[b + 6] == '0' then cid_same = f['cid'] == nil else cid_same = f['cid'] == ARGV[b + 5] end
        same = cid_same and f['id'] == ARGV[b + 1] and f['user'] == ARGV[b + 2]
          and f['text'] == ARGV[b + 3] and f['ts'] == ARGV[b + 4]
      end
    end
    if not same then
      return {'conflict', ARGV[b], string.format('%d', prev)}
    end
  end
end
if ARGV[1] ~= 'write' or #write == 0 then
  return {'ok', '0'}
end
local window = tonumber(ARGV[2])
for _, b in ipairs(write) do
  local key_index = tonumber(ARGV[b + 6])
  if key_index > 0 then
    redis.call('XADD', KEYS[2], ARGV[b] .. '-0', 'id', ARGV[b + 1], 'user', ARGV[b + 2],
      'text', ARGV[b + 3], 'ts', ARGV[b + 4], 'cid', ARGV[b + 5])
    if window > 0 then
      redis.call('SET', KEYS[2 + key_index], ARGV[b] .. ':' .. ARGV[b + 4] .. ':' .. ARGV[b + 1],
        'PX', ARGV[2])
    end
  else
    redis.call('XADD', KEYS[2], ARGV[b] .. '-0', 'id', ARGV[b + 1], 'user', ARGV[b + 2],
      'text', ARGV[b + 3], 'ts', ARGV[b + 4])
  end
end
redis.call('SET', KEYS[1], string.format('%d', prev))
if tonumber(ARGV[3]) > 0 then
  redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', ARGV[3])
end
trim_age(KEYS[2], tonumber(ARGV[4]), now_ms())
return {'ok', string.format('%d', #write)}
"#;

/// Presence: this host's users of one room enter (join), or the whole hash is rewritten
/// (refresh, also after Redis lost it).
///
/// KEYS: 1 this host's hash, 2 the hosts zset. ARGV: 1 host id, 2 ttl ms, 3 hash prefix,
/// 4 mode (`join`, `refresh`), 5 publish command, 6 channel, 7 payload (join: the online
/// event), then user/name pairs (join: one; refresh: all of this host's, possibly none).
///
/// Returns 1 when a joining user was not present through any live host before (the online
/// event was published), else 0.
const PRESENCE_SET_BODY: &str = r#"
local now = now_ms()
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local announced = 0
if ARGV[4] == 'join' then
  local user = ARGV[8]
  local present = false
  for _, h in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if redis.call('HEXISTS', ARGV[3] .. h, user) == 1 then present = true break end
  end
  redis.call('HSET', KEYS[1], user, ARGV[9])
  if not present then
    redis.call(ARGV[5], ARGV[6], ARGV[7])
    announced = 1
  end
else
  redis.call('DEL', KEYS[1])
  for i = 8, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return announced
"#;

/// Presence: a user's last connection through this host left the room.
///
/// KEYS: 1 this host's hash, 2 the hosts zset. ARGV: 1 host id, 2 hash prefix, 3 user,
/// 4 publish command, 5 channel, 6 payload (the offline event).
///
/// Returns 1 when the user is now present through no live host (the offline event was
/// published), else 0 (still online elsewhere, or was not here at all).
const PRESENCE_LEAVE_BODY: &str = r#"
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local removed = redis.call('HDEL', KEYS[1], ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if removed == 0 then return 0 end
for _, h in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if h ~= ARGV[1] and redis.call('HEXISTS', ARGV[2] .. h, ARGV[3]) == 1 then return 0 end
end
redis.call(ARGV[4], ARGV[5], ARGV[6])
return 1
"#;

/// Presence: the users of a room across live hosts.
///
/// KEYS: 1 the hosts zset. ARGV: 1 hash prefix. Returns a flat list user, name, user, name…
/// (a user present through several hosts appears once per host).
const PRESENCE_LIST_BODY: &str = r#"
local now = now_ms()
local out = {}
for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local pairs_ = redis.call('HGETALL', ARGV[1] .. h)
  for i = 1, #pairs_ do out[#out + 1] = pairs_[i] end
end
return out
"#;

/// The scripts, with their SHA1s computed once.
pub(crate) struct Scripts {
    /// See [`PUBLISH_BODY`].
    pub publish: redis::Script,
    /// See [`APPEND_BODY`].
    pub append: redis::Script,
    /// See [`PRESENCE_SET_BODY`].
    pub presence_set: redis::Script,
    /// See [`PRESENCE_LEAVE_BODY`].
    pub presence_leave: redis::Script,
    /// See [`PRESENCE_LIST_BODY`].
    pub presence_list: redis::Script,
}

impl Scripts {
    /// Builds every script (helpers prepended).
    pub fn new() -> Scripts {
        let with_helpers = |body: &str| redis::Script::new(&format!("{HELPERS}\n{body}"));
        Scripts {
            publish: with_helpers(PUBLISH_BODY),
            append: with_helpers(APPEND_BODY),
            presence_set: with_helpers(PRESENCE_SET_BODY),
            presence_leave: with_helpers(PRESENCE_LEAVE_BODY),
            presence_list: with_helpers(PRESENCE_LIST_BODY),
        }
    }
}
