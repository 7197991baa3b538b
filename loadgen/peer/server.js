#!/usr/bin/env node
// The seed's chat stack, as the peer corelay is compared against: Node socket.io 4.8 with
// @socket.io/redis-adapter 8.3, one process per port, all joined through Redis (what PM2
// cluster mode gives the seed), speaking corelay's PROTOCOL.md chat events with the same
// ack shapes:
//
//   join {room, since?, token?}   -> {ok, room, offset, missed?, truncated?}
//   leave {room}                  -> {ok}
//   message {room, text, cid?}    -> {ok, id, offset, ts}     (+ "message" to the room)
//   typing {room}                 -> volatile "typing" to the room
//   history {room, before?, after?, limit?} -> {ok, messages}
//   presence {room}               -> {ok, users:[{user, name?}]}
//
// Offsets per room come from Redis INCR; history is a capped Redis list; INCR + RPUSH +
// LTRIM run as one Lua script so the list is in offset order. Presence is a Redis hash of
// connection counts per user. Auth: HS256 JWT with the same secret (jsonwebtoken), or dev
// mode ({"user": ...}) without one.
//
//   node server.js --port 3000 --redis redis://127.0.0.1:6379 [--secret S] [--host 127.0.0.1]
//
// Environment: CORELAY_JWT_SECRET (secret), REDIS_URL, HISTORY_CAP (default 1000),
// MAX_REPLAY (default 1000), MAX_TEXT_BYTES (default 4096).

'use strict';

const http = require('http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { createClient } = require('redis');
const jwt = require('jsonwebtoken');
const crypto = require('crypto');

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const PORT = Number(arg('port', process.env.PORT || 3000));
const HOST = arg('host', '127.0.0.1');
const REDIS_URL = arg('redis', process.env.REDIS_URL || 'redis://127.0.0.1:6379');
const SECRET = arg('secret', process.env.CORELAY_JWT_SECRET || '');
const HISTORY_CAP = Number(process.env.HISTORY_CAP || 1000);
const MAX_REPLAY = Number(process.env.MAX_REPLAY || 1000);
const MAX_TEXT_BYTES = Number(process.env.MAX_TEXT_BYTES || 4096);
const ROOM_RE = /^[A-Za-z0-9_.:@-]{1,128}$/;
const PREFIX = 'corelay-peer:';

// Atomically: next offset, append to the capped history list. ARGV[1] is the message JSON
// without its opening brace; the offset goes first.
const APPEND = `
local o = redis.call('INCR', KEYS[1])
redis.call('RPUSH', KEYS[2], '{"offset":' .. o .. ',' .. ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
return o`;

const err = (code, message) => ({ ok: false, error: { code, message: message || code } });
const offsetKey = (room) => `${PREFIX}offset:${room}`;
const historyKey = (room) => `${PREFIX}history:${room}`;
const presenceKey = (room) => `${PREFIX}presence:${room}`;
const namesKey = (room) => `${PREFIX}names:${room}`;
const dedupeKey = (user, room, cid) => `${PREFIX}dedupe:${user}:${room}:${cid}`;

let idCounter = 0;
const idNode = crypto.randomBytes(3).toString('hex');
function newId(ts) {
  idCounter = (idCounter + 1) % 0x1000000;
  return ts.toString(36).padStart(9, '0') + idCounter.toString(36).padStart(5, '0') + idNode;
}

function roomAllowed(claims, room) {
  const rooms = claims.rooms;
  if (!Array.isArray(rooms)) return false;
  return rooms.some((r) => typeof r === 'string' && (r.endsWith('*') ? room.startsWith(r.slice(0, -1)) : r === room));
}

function authenticate(auth) {
  if (!SECRET) {
    const user = auth && typeof auth.user === 'string' ? auth.user : '';
    if (!user || user.length > 128) throw new Error('unauthorized');
    return { user, name: undefined, claims: { rooms: ['*'] } };
  }
  const token = auth && auth.token;
  if (typeof token !== 'string') throw new Error('unauthorized');
  const claims = jwt.verify(token, SECRET, { algorithms: ['HS256'], clockTolerance: 30 });
  if (typeof claims.sub !== 'string' || claims.sub.length < 1 || claims.sub.length > 128) {
    throw new Error('unauthorized');
  }
  return { user: claims.sub, name: typeof claims.name === 'string' ? claims.name : undefined, claims };
}

function parseMessages(list) {
  const out = [];
  for (const s of list) {
    try {
      out.push(JSON.parse(s));
    } catch (_) {
      // skip a corrupt entry
    }
  }
  return out;
}

async function main() {
  const redis = createClient({ url: REDIS_URL });
  const sub = redis.duplicate();
  redis.on('error', (e) => console.error('redis:', e.message));
  sub.on('error', (e) => console.error('redis sub:', e.message));
  await Promise.all([redis.connect(), sub.connect()]);

  const httpServer = http.createServer((req, res) => {
    if (req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ ok: true, connections: io.engine.clientsCount }));
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const io = new Server(httpServer, {
    pingInterval: 25000,
    pingTimeout: 20000,
    maxHttpBufferSize: 1e6,
    serveClient: false,
    cors: { origin: '*' },
  });
  io.adapter(createAdapter(redis, sub));

  io.use((socket, next) => {
    try {
      socket.data.identity = authenticate(socket.handshake.auth);
      next();
    } catch (_) {
      next(new Error('unauthorized'));
    }
  });

  const append = (room, rest) =>
    redis.eval(APPEND, { keys: [offsetKey(room), historyKey(room)], arguments: [rest, String(HISTORY_CAP)] });

  async function presenceOnline(socket, room) {
    const { user, name } = socket.data.identity;
    const n = await redis.hIncrBy(presenceKey(room), user, 1);
    if (name) await redis.hSet(namesKey(room), user, name);
    if (n === 1) socket.to(room).emit('presence', { room, user, online: true });
  }

  async function presenceOffline(socket, room) {
    const { user } = socket.data.identity;
    const n = await redis.hIncrBy(presenceKey(room), user, -1);
    if (n <= 0) {
      await redis.hDel(presenceKey(room), user);
      io.to(room).emit('presence', { room, user, online: false });
    }
  }

  io.on('connection', (socket) => {
    const { user, claims } = socket.data.identity;
    const joined = new Set();
    const known = new Set(['join', 'leave', 'message', 'typing', 'history', 'presence']);
    const reply = (ack, v) => {
      if (typeof ack === 'function') ack(v);
    };
    const roomOf = (p) => (p && typeof p.room === 'string' && ROOM_RE.test(p.room) ? p.room : null);

    socket.onAny((event, ...args) => {
      if (known.has(event)) return;
      const ack = args[args.length - 1];
      reply(ack, err('bad_request', 'unknown event'));
    });

    socket.on('join', async (p, ack) => {
      try {
        const room = roomOf(p);
        if (!room) return reply(ack, err('bad_request', 'bad room'));
        let allowed = roomAllowed(claims, room);
        if (!allowed && typeof p.token === 'string' && SECRET) {
          try {
            const rt = jwt.verify(p.token, SECRET, { algorithms: ['HS256'], clockTolerance: 30 });
            allowed = rt.sub === user && rt.room === room;
          } catch (_) {
            allowed = false;
          }
        }
        if (!allowed) return reply(ack, err('forbidden'));
        if (p.since !== undefined && !(Number.isInteger(p.since) && p.since >= 0)) {
          return reply(ack, err('bad_request', 'bad since'));
        }
        if (!joined.has(room)) {
          joined.add(room);
          socket.join(room);
          await presenceOnline(socket, room);
        }
        const offset = Number((await redis.get(offsetKey(room))) || 0);
        const out = { ok: true, room, offset };
        if (p.since !== undefined) {
          const all = parseMessages(await redis.lRange(historyKey(room), 0, -1));
          const newer = all.filter((m) => m.offset > p.since && m.offset <= offset);
          const oldestKept = all.length ? all[0].offset : offset + 1;
          const replay = newer.slice(-MAX_REPLAY);
          out.missed = replay;
          out.truncated = replay.length < newer.length || (offset > p.since && oldestKept > p.since + 1);
        }
        reply(ack, out);
      } catch (e) {
        reply(ack, err('unavailable', e.message));
      }
    });

    socket.on('leave', async (p, ack) => {
      try {
        const room = roomOf(p);
        if (!room) return reply(ack, err('bad_request', 'bad room'));
        if (joined.delete(room)) {
          socket.leave(room);
          await presenceOffline(socket, room);
        }
        reply(ack, { ok: true });
      } catch (e) {
        reply(ack, err('unavailable', e.message));
      }
    });

    socket.on('message', async (p, ack) => {
      try {
        const room = roomOf(p);
        if (!room || typeof p.text !== 'string') return reply(ack, err('bad_request'));
        if (!joined.has(room)) return reply(ack, err('not_joined'));
        if (Buffer.byteLength(p.text) > MAX_TEXT_BYTES) return reply(ack, err('too_large'));
        const cid = p.cid;
        if (cid !== undefined && (typeof cid !== 'string' || cid.length < 1 || cid.length > 64)) {
          return reply(ack, err('bad_request', 'bad cid'));
        }
        if (cid !== undefined) {
          const prev = await redis.get(dedupeKey(user, room, cid));
          if (prev) return reply(ack, JSON.parse(prev));
        }
        const ts = Date.now();
        const id = newId(ts);
        const body = { room, id, user, text: p.text, ts };
        if (cid !== undefined) body.cid = cid;
        const offset = await append(room, JSON.stringify(body).slice(1));
        const out = { ok: true, id, offset, ts };
        if (cid !== undefined) await redis.set(dedupeKey(user, room, cid), JSON.stringify(out), { EX: 600 });
        reply(ack, out);
        socket.to(room).emit('message', { room, id, offset, user, text: p.text, ts, ...(cid !== undefined ? { cid } : {}) });
      } catch (e) {
        reply(ack, err('unavailable', e.message));
      }
    });

    socket.on('typing', (p, ack) => {
      const room = roomOf(p);
      if (!room) return reply(ack, err('bad_request'));
      if (!joined.has(room)) return reply(ack, err('not_joined'));
      socket.to(room).volatile.emit('typing', { room, user });
      reply(ack, { ok: true });
    });

    socket.on('history', async (p, ack) => {
      try {
        const room = roomOf(p);
        if (!room) return reply(ack, err('bad_request'));
        if (!joined.has(room)) return reply(ack, err('not_joined'));
        if (p.before !== undefined && p.after !== undefined) return reply(ack, err('bad_request', 'before and after'));
        let limit = p.limit === undefined ? 50 : p.limit;
        if (!Number.isInteger(limit) || limit < 1) return reply(ack, err('bad_request', 'bad limit'));
        limit = Math.min(limit, 100);
        const all = parseMessages(await redis.lRange(historyKey(room), 0, -1));
        let messages;
        if (p.after !== undefined) messages = all.filter((m) => m.offset > p.after).slice(0, limit);
        else if (p.before !== undefined) messages = all.filter((m) => m.offset < p.before).slice(-limit);
        else messages = all.slice(-limit);
        reply(ack, { ok: true, messages });
      } catch (e) {
        reply(ack, err('unavailable', e.message));
      }
    });

    socket.on('presence', async (p, ack) => {
      try {
        const room = roomOf(p);
        if (!room) return reply(ack, err('bad_request'));
        if (!joined.has(room)) return reply(ack, err('not_joined'));
        const [counts, names] = await Promise.all([redis.hGetAll(presenceKey(room)), redis.hGetAll(namesKey(room))]);
        const users = Object.keys(counts)
          .filter((u) => Number(counts[u]) > 0)
          .map((u) => (names[u] ? { user: u, name: names[u] } : { user: u }));
        reply(ack, { ok: true, users });
      } catch (e) {
        reply(ack, err('unavailable', e.message));
      }
    });

    socket.on('disconnect', () => {
      for (const room of joined) {
        presenceOffline(socket, room).catch(() => {});
      }
      joined.clear();
    });
  });

  httpServer.listen(PORT, HOST, () => {
    console.log(`listening on ${HOST}:${PORT} pid=${process.pid} redis=${REDIS_URL}${SECRET ? '' : ' (dev mode: no secret)'}`);
  });

  const shutdown = () => {
    io.close();
    Promise.allSettled([redis.quit(), sub.quit()]).finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

main().catch((e) => {
  console.error(`cannot start: ${e.message}`);
  process.exit(1);
});
