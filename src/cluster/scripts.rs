//! The Lua scripts the cluster layer runs in Redis. Each one touches the keys of a single
//! room only (one hash tag, so one Redis Cluster slot), but for the publish script, which
//! carries the rooms of one Redis node; each runs atomically: no other
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

-- The offset of the newest id the stream ever had (even when trimmed away since), 0 when
-- there is no stream.
local function top_offset(stream)
  if redis.call('EXISTS', stream) == 0 then return 0 end
  local info = redis.call('XINFO', 'STREAM', stream)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return id_offset(info[i + 1]) or 0 end
  end
  return 0
end

-- XADD of entry `<offset>-0` with `fields`, trimmed to about `max_len` (0: no trim), as
-- redis.pcall: an error comes back as a value.
local function xadd(stream, max_len, offset, fields)
  local args = {'XADD', stream}
  if max_len > 0 then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = '~'
    args[#args + 1] = max_len
  end
  args[#args + 1] = string.format('%d', offset) .. '-0'
  for _, f in ipairs(fields) do args[#args + 1] = f end
  return redis.pcall(unpack(args))
end

-- An entry's ts: its `ts` field, or the `"ts":` of its payload field `m` (the only `"ts":`
-- there: the strings in the JSON escape their quotes).
local function entry_ts(entry)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == 'ts' then return tonumber(f[i + 1]) end
    if f[i] == 'm' then return tonumber(string.match(f[i + 1], '"ts":(%d+)')) end
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

-- Whether `user` is in the presence hash of one of the `hosts` other than `except`.
local function present_on(prefix, hosts, user, except)
  for _, h in ipairs(hosts) do
    if h ~= except and redis.call('HEXISTS', prefix .. h, user) == 1 then return true end
  end
  return false
end

-- A presence event's channel payload (`p` + JSON, as the hosts decode it).
local function presence_event(room, user, name, online, host)
  local e = {room = room, user = user, online = online, host = host}
  if name ~= nil and name ~= '' then e['name'] = name end
  return 'p' .. cjson.encode(e)
end

-- Reaps the room's hosts whose presence expired (dead, or cut off from Redis for longer
-- than the ttl): removes them and their hashes, and publishes the offline event of each of
-- their users who is present through no live host, once per user (this script is the only
-- one that sees those hosts: the removal is atomic). The users announced offline are
-- remembered per reaped host (`reaped_prefix .. host`, kept `keep_ms`), so that a host that
-- was only cut off announces them online again when it refreshes (see PRESENCE_SET_BODY).
-- The hashes outlive their host's expiry (see PRESENCE_SET_BODY), so the users are known.
local function reap(hosts_key, prefix, reaped_prefix, keep_ms, now, room, pubcmd, channel)
  local dead = redis.call('ZRANGEBYSCORE', hosts_key, '-inf', now)
  if #dead == 0 then return end
  redis.call('ZREMRANGEBYSCORE', hosts_key, '-inf', now)
  local live = redis.call('ZRANGE', hosts_key, 0, -1)
  local told = {}
  for _, h in ipairs(dead) do
    local users = redis.call('HKEYS', prefix .. h)
    redis.call('DEL', prefix .. h)
    local tomb = reaped_prefix .. h
    for _, u in ipairs(users) do
      if not present_on(prefix, live, u, nil) then
        redis.call('SADD', tomb, u)
        if not told[u] then
          told[u] = true
          redis.call(pubcmd, channel, presence_event(room, u, nil, false, h))
        end
      end
    end
    if redis.call('EXISTS', tomb) == 1 then redis.call('PEXPIRE', tomb, keep_ms) end
  end
end
"#;

/// The publish script, for the messages of one or many rooms: a home shard sends whatever
/// queued while its previous call was out, every room of one Redis node in one call, so
/// one round trip and one script run carry a batch (the per-call cost of a script is most
/// of its cost at a few messages per room).
///
/// Keys, per room in call order: 1 offset counter, 2 stream, then the dedupe keys of its
/// messages that carry a cid, in message order. They are KEYS (declared) or, when ARGV[7]
/// is not 0, ARGV from that index on (undeclared: see below).
/// ARGV: 1 dedupe window ms, 2 stream max len (0: none), 3 max age ms (0: none), 4
/// `PUBLISH` or `SPUBLISH`, 5 deadline (Redis clock ms; 0: none), 6 room count, 7 where the
/// keys start in ARGV (0: they are KEYS), then per room: channel, floor (an offset the
/// caller knows was handed out already, 0: none; the room's new offsets are always above
/// it), message count n, payload prefix (the room's part before the offset), then 2 values
/// per message: its dedupe record's tail `<ts>:<id>` when it carries a cid (empty when
/// not), and its payload suffix. A message's payload is prefix .. offset .. suffix: the
/// same bytes are published on the room's channel and kept as the stream entry's one field
/// `m` (the store decodes either).
///
/// Returns one reply per room: when none of its messages was a duplicate, the integer
/// offset of its first one (the others follow it one by one); else an array of one reply
/// per message, in order: the offset it got, or `d<offset>:<ts>:<id>` (a duplicate: the
/// first send's ack; nothing done for this one). Past the deadline it returns `{'expired',
/// now}` and does nothing (the caller gave up already). A room's messages get consecutive
/// offsets in the order given, and are published in that order: a call is the same as its
/// messages published one after another. Per room, the counter moves once (INCRBY) for all
/// its new messages; per message the script makes one XADD and one PUBLISH (and a GET and a
/// SET when it has a cid), and gets two arguments: Redis's cost per message is those calls,
/// the rest is per call and per room.
///
/// On a Redis Cluster the rooms of one call live on one node but on many slots, and Redis
/// refuses declared keys of several slots (`CROSSSLOT`). Such a call passes its keys in
/// ARGV, and the script is sent with the `allow-cross-slot-keys` flag
/// ([`CROSS_SLOT_FLAGS`]). Redis then checks each key as the script touches it, and fails
/// the script at the first key this node does not serve (its slot moved, or is moving):
/// so the script touches every key before it writes anything, and a call that fails that
/// way wrote nothing.
const PUBLISH_BODY: &str = r#"
local now = now_ms()
local deadline = tonumber(ARGV[5])
if deadline > 0 and now > deadline then
  return {'expired', string.format('%d', now)}
end
local ko = tonumber(ARGV[7])
local function key(i)
  if ko == 0 then return KEYS[i] end
  return ARGV[ko + i - 1]
end
if ko > 0 then
  -- Undeclared keys: fail here, before any write, if this node does not serve one.
  for i = ko, #ARGV do redis.call('EXISTS', ARGV[i]) end
end
local window, max_len, max_age, pubcmd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
-- The same as Redis got them: a Lua number would be formatted again on every call.
local window_arg, max_len_arg = ARGV[1], ARGV[2]
local out = {}
local a = 8
local k = 1
-- XADD of one payload at `offset` (its id already formatted), as redis.pcall: an error
-- comes back as a value. Runs once per message: no table, no number formatting.
local function add(stream, id, payload)
  if max_len > 0 then
    return redis.pcall('XADD', stream, 'MAXLEN', '~', max_len_arg, id, 'm', payload)
  end
  return redis.pcall('XADD', stream, id, 'm', payload)
end
for _ = 1, tonumber(ARGV[6]) do
  local channel, floor, n, prefix = ARGV[a], tonumber(ARGV[a + 1]) or 0, tonumber(ARGV[a + 2]), ARGV[a + 3]
  local offset_key, stream = key(k), key(k + 1)
  k = k + 2
  a = a + 4
  -- Dedupe first, so that the room's counter moves once for all its new messages. The
  -- tables exist only for a room with a cid among its messages.
  local replies, cid_keys, seen, again
  local fresh = n
  for i = 0, n - 1 do
    if ARGV[a + 2 * i] ~= '' then
      if not cid_keys then replies, cid_keys, seen, again = {}, {}, {}, {} end
      local cid_key = key(k)
      cid_keys[i] = cid_key
      k = k + 1
      if window > 0 and seen[cid_key] then
        -- A cid sent twice in this call: the later message's index → the first one's.
        again[i] = seen[cid_key]
        fresh = fresh - 1
      else
        local first = redis.call('GET', cid_key)
        if first then
          replies[i + 1] = 'd' .. first
          fresh = fresh - 1
        else
          seen[cid_key] = i
        end
      end
    end
  end
  local first_offset = 0
  if fresh > 0 then
    -- New offsets go above the caller's floor. They also go above the stream's top id:
    -- XADD refuses one at or below it, which is how a counter that fell behind (lost or
    -- reset) is noticed, without reading the stream on every call.
    local offset = redis.call('INCRBY', offset_key, fresh) - fresh
    local moved = false
    if offset < floor then
      offset = floor
      moved = true
    end
    for i = 0, n - 1 do
      local j = again and again[i]
      if j then
        -- After the first one's write (j < i): its ack, as a later retry would get it.
        replies[i + 1] = 'd' .. replies[j + 1] .. ':' .. ARGV[a + 2 * j]
      elseif not (replies and replies[i + 1]) then
        offset = offset + 1
        local off = string.format('%d', offset)
        local payload = prefix .. off .. ARGV[a + 2 * i + 1]
        local added = add(stream, off .. '-0', payload)
        if type(added) == 'table' and added.err then
          local top = top_offset(stream)
          if top < offset then return redis.error_reply(added.err) end
          -- The counter fell behind the stream (lost or reset): go on after its top.
          offset = top + 1
          moved = true
          off = string.format('%d', offset)
          payload = prefix .. off .. ARGV[a + 2 * i + 1]
          added = add(stream, off .. '-0', payload)
          if type(added) == 'table' and added.err then return redis.error_reply(added.err) end
        end
        if first_offset == 0 then first_offset = offset end
        local cid_key = cid_keys and cid_keys[i]
        if cid_key and window > 0 then
          redis.call('SET', cid_key, off .. ':' .. ARGV[a + 2 * i], 'PX', window_arg)
        end
        redis.call(pubcmd, channel, payload)
        if replies then replies[i + 1] = off end
      end
    end
    if moved then redis.call('SET', offset_key, string.format('%d', offset)) end
  end
  trim_age(stream, max_age, now)
  if replies then out[#out + 1] = replies else out[#out + 1] = first_offset end
  a = a + 2 * n
end
return out
"#;

/// The first line of a script sent to a Redis Cluster node: it may touch the keys of many
/// slots, all on that node (Redis ≥ 7). Standalone Redis gets no flags line, so that Redis
/// 6 runs the same script.
pub(crate) const CROSS_SLOT_FLAGS: &str = "#!lua flags=allow-cross-slot-keys\n";

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
        if f['m'] then
          -- Written by the publish script: its one field is the channel payload (`m` + JSON).
          local d = cjson.decode(string.sub(f['m'], 2))
          f = {id = d.id, user = d.user, text = d.text, ts = string.format('%d', d.ts), cid = d.cid}
        end
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
/// (refresh, also after Redis lost it). Either way expired hosts are reaped first (see
/// `reap`), and users of this host that a reap announced offline while it was cut off
/// are announced online again (unless present through another live host).
///
/// KEYS: 1 this host's hash, 2 the hosts zset, 3 this host's reaped set. ARGV: 1 host id,
/// 2 ttl ms, 3 hash prefix, 4 mode (`join`, `refresh`), 5 publish command, 6 channel,
/// 7 payload (join: the online event), 8 room, 9 reaped prefix, 10 how long reaped sets are
/// kept (ms), then user/name pairs (join: one; refresh: all of this host's, possibly none).
///
/// The host's expiry (its zset score) is now + ttl; its hash and the zset are kept three
/// ttls, so that a reap after the host's expiry still finds its users.
///
/// Returns 1 when a joining user was not present through any live host before (the online
/// event was published), else 0.
const PRESENCE_SET_BODY: &str = r#"
local now = now_ms()
local ttl = tonumber(ARGV[2])
local prefix = ARGV[3]
reap(KEYS[2], prefix, ARGV[9], ARGV[10], now, ARGV[8], ARGV[5], ARGV[6])
local announced = 0
local joining = nil
if ARGV[4] == 'join' then
  joining = ARGV[11]
  local hosts = redis.call('ZRANGE', KEYS[2], 0, -1)
  local present = present_on(prefix, hosts, joining, nil)
  redis.call('HSET', KEYS[1], joining, ARGV[12])
  if not present then
    redis.call(ARGV[5], ARGV[6], ARGV[7])
    announced = 1
  end
else
  redis.call('DEL', KEYS[1])
  for i = 11, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ttl * 3)
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[2], ttl * 3)
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  local hosts = redis.call('ZRANGE', KEYS[2], 0, -1)
  for _, u in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    if u ~= joining and redis.call('HEXISTS', KEYS[1], u) == 1
      and not present_on(prefix, hosts, u, ARGV[1]) then
      local name = redis.call('HGET', KEYS[1], u)
      redis.call(ARGV[5], ARGV[6], presence_event(ARGV[8], u, name, true, ARGV[1]))
    end
  end
  redis.call('DEL', KEYS[3])
end
return announced
"#;

/// Presence: a user's last connection through this host left the room (expired hosts are
/// reaped first, see `reap`).
///
/// KEYS: 1 this host's hash, 2 the hosts zset, 3 this host's reaped set. ARGV: 1 host id,
/// 2 hash prefix, 3 user, 4 publish command, 5 channel, 6 payload (the offline event),
/// 7 room, 8 reaped prefix, 9 how long reaped sets are kept (ms).
///
/// Returns 1 when the user is now present through no live host, else 0 (still online
/// elsewhere, or was not here at all). The offline event was published when 1, except
/// when a reap of this host (while it was cut off) announced it already: then this host's
/// own members, who ignore events about this host, are still to be told.
const PRESENCE_LEAVE_BODY: &str = r#"
local now = now_ms()
reap(KEYS[2], ARGV[2], ARGV[8], ARGV[9], now, ARGV[7], ARGV[4], ARGV[5])
local reaped = redis.call('SREM', KEYS[3], ARGV[3])
local removed = redis.call('HDEL', KEYS[1], ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if removed == 0 and reaped == 0 then return 0 end
if present_on(ARGV[2], redis.call('ZRANGE', KEYS[2], 0, -1), ARGV[3], ARGV[1]) then return 0 end
if removed == 1 then redis.call(ARGV[4], ARGV[5], ARGV[6]) end
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
    /// See [`PUBLISH_BODY`]: for standalone Redis, and with [`CROSS_SLOT_FLAGS`] for a
    /// Redis Cluster.
    pub publish: ScriptSource,
    /// The publish script with [`CROSS_SLOT_FLAGS`].
    pub publish_cross_slot: ScriptSource,
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
        let source = |body: &str| format!("{HELPERS}\n{body}");
        let with_helpers = |body: &str| redis::Script::new(&source(body));
        Scripts {
            publish: ScriptSource::new(source(PUBLISH_BODY)),
            publish_cross_slot: ScriptSource::new(format!(
                "{CROSS_SLOT_FLAGS}{}",
                source(PUBLISH_BODY)
            )),
            append: with_helpers(APPEND_BODY),
            presence_set: with_helpers(PRESENCE_SET_BODY),
            presence_leave: with_helpers(PRESENCE_LEAVE_BODY),
            presence_list: with_helpers(PRESENCE_LIST_BODY),
        }
    }
}

/// A script a shard sends itself (EVALSHA over its own connections): its source, to load
/// it (SCRIPT LOAD) when a node answers `NOSCRIPT`, and its SHA1.
pub(crate) struct ScriptSource {
    /// The whole source.
    pub source: String,
    /// Its SHA1, as EVALSHA wants it.
    pub sha: String,
}

impl ScriptSource {
    fn new(source: String) -> ScriptSource {
        let sha = redis::Script::new(&source).get_hash().to_owned();
        ScriptSource { source, sha }
    }
}
