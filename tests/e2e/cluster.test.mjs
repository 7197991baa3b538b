// Cluster end to end: three corelay hosts (`serve --redis URL --store redis`) on one real
// redis-server, a socket.io-client on each. A message sent on any host reaches every
// host's members and not the sender; concurrent senders on three hosts give every
// receiver one contiguous offset sequence; typing and presence cross hosts; a killed
// host's user goes offline once. PROTOCOL.md "Server → client events", "Guarantees";
// ARCHITECTURE.md "Between hosts: Redis". Skipped (with the reason) only when
// redis-server is not installed; scripts/test.sh installs it.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, describe, it } from "node:test";
import {
  assertOkAck,
  closeAll,
  collect,
  connect,
  emitAck,
  expectNoEvent,
  guard,
  mintToken,
  sleep,
  startServer,
  waitEvent,
} from "./harness.mjs";
import { redisServerBin, startRedis } from "./redis.mjs";

const SECRET = "e2e-cluster-" + randomBytes(12).toString("hex");
const TTL_MS = 2000;
const ENV = {
  CORELAY_LIMITS_SEND_RATE: "10000",
  CORELAY_LIMITS_SEND_BURST: "10000",
  CORELAY_REDIS_PING_INTERVAL: "200ms",
  CORELAY_REDIS_COMMAND_TIMEOUT: "1s",
  CORELAY_PRESENCE_TTL: `${TTL_MS}ms`,
};
const SKIP = redisServerBin()
  ? false
  : "redis-server is not installed (apt-get install redis-server; scripts/test.sh does it): cluster tests skipped";

let redis;
let hosts = [];
const T = (fn) => guard(() => hosts, fn);
const auth = (sub) => ({ token: mintToken(SECRET, { sub, rooms: ["*"] }) });
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** A socket.io client of `user` on host i, joined to `room`. */
async function member(i, user, room) {
  const s = await connect(hosts[i].url, { auth: auth(user) });
  assertOkAck(await emitAck(s, "join", { room }), `${user} joins ${room} on host ${i}`);
  return s;
}

describe("cluster: three hosts, one redis", { skip: SKIP }, () => {
  before(async () => {
    redis = await startRedis();
    hosts = await Promise.all(
      [0, 1, 2].map(() => startServer({ store: "redis", args: ["--redis", redis.url], env: ENV, secret: SECRET })),
    );
  });
  after(async () => {
    closeAll();
    await Promise.all(hosts.map((h) => h.stop()));
    if (redis) await redis.stop();
  });

  it(
    "a message sent on any host reaches the members on every host and not the sender's socket",
    T(async () => {
      const users = ["m0", "m1", "m2"];
      const sockets = [];
      for (const [i, u] of users.entries()) sockets.push(await member(i, u, "lobby"));
      for (const [i, sender] of sockets.entries()) {
        const others = sockets.filter((_, j) => j !== i);
        const got = others.map((s) => waitEvent(s, "message", (m) => m.room === "lobby" && m.text === `from ${i}`, 5000));
        const echo = collect(sender, "message");
        const ack = assertOkAck(await emitAck(sender, "message", { room: "lobby", text: `from ${i}` }), `send on host ${i}`);
        assert.equal(ack.offset, i + 1);
        for (const m of await Promise.all(got)) {
          assert.deepEqual(m, { room: "lobby", id: ack.id, offset: ack.offset, user: users[i], text: `from ${i}`, ts: ack.ts });
        }
        await sleep(300);
        assert.deepEqual(echo.stop(), [], `the sender on host ${i} got its own message back`);
      }
    }),
  );

  it(
    "three senders on three hosts at once: every receiver sees one contiguous offset sequence",
    T(async () => {
      const EACH = 40;
      const TOTAL = 3 * EACH;
      const readers = await Promise.all([0, 1, 2].map((i) => member(i, `reader${i}`, "busy")));
      const writers = await Promise.all([0, 1, 2].map((i) => member(i, `writer${i}`, "busy")));
      const readerLogs = readers.map((r) => collect(r, "message"));
      const writerLogs = writers.map((w) => collect(w, "message"));
      const acks = await Promise.all(
        writers.map((w, i) =>
          Promise.all(range(1, EACH).map((n) => emitAck(w, "message", { room: "busy", text: `${i}:${n}` }, 10000))),
        ),
      );
      const acked = [];
      for (const [i, list] of acks.entries()) {
        list.forEach((a) => assertOkAck(a, `writer${i}`));
        const offs = list.map((a) => a.offset);
        assert.ok(
          offs.every((o, k) => k === 0 || o > offs[k - 1]),
          `writer${i}'s messages are accepted in the order sent: ${offs}`,
        );
        acked.push(...offs);
      }
      assert.deepEqual([...acked].sort((a, b) => a - b), range(1, TOTAL), "one offset per message, no gap");
      for (const [i, log] of readerLogs.entries()) {
        await log.waitFor(TOTAL, 15000);
        await sleep(300); // a duplicate would show up now
        const got = log.stop();
        assert.deepEqual(got.map((m) => m.offset), range(1, TOTAL), `reader${i}: contiguous, in order, once`);
        for (const w of [0, 1, 2]) {
          const texts = got.filter((m) => m.user === `writer${w}`).map((m) => m.text);
          assert.deepEqual(texts, range(1, EACH).map((n) => `${w}:${n}`), `reader${i}: writer${w}'s order`);
        }
      }
      // Each writer sees everyone else's messages, in offset order, and none of its own.
      for (const [i, log] of writerLogs.entries()) {
        const own = new Set(acks[i].map((a) => a.offset));
        const want = range(1, TOTAL).filter((o) => !own.has(o));
        await log.waitFor(want.length, 15000);
        await sleep(300);
        assert.deepEqual(log.stop().map((m) => m.offset), want, `writer${i}`);
      }
    }),
  );

  it(
    "typing reaches the room's members on the other hosts, not the typer",
    T(async () => {
      const [t0, t1, t2] = await Promise.all([0, 1, 2].map((i) => member(i, `typist${i}`, "typing-room")));
      await sleep(200); // the joins' presence events go by
      const seen = [t1, t2].map((s) => waitEvent(s, "typing", (p) => p.user === "typist0", 3000));
      const own = collect(t0, "typing");
      t0.emit("typing", { room: "typing-room" });
      for (const p of await Promise.all(seen)) assert.deepEqual(p, { room: "typing-room", user: "typist0" });
      // Once each, and the typer gets nothing back.
      await expectNoEvent(t1, "typing", (p) => p.user === "typist0", 300);
      assert.deepEqual(own.stop(), []);
      // With an ack it is acked {ok:true}; the other way round too.
      const back = waitEvent(t0, "typing", (p) => p.user === "typist2", 3000);
      assert.deepEqual(await emitAck(t2, "typing", { room: "typing-room" }), { ok: true });
      assert.deepEqual(await back, { room: "typing-room", user: "typist2" });
    }),
  );

  it(
    "presence: online on the first connection cluster-wide, offline on the last, heard on every host",
    T(async () => {
      const [w0, w2] = [await member(0, "watch0", "pres"), await member(2, "watch2", "pres")];
      await sleep(200);
      const online = [w0, w2].map((s) => waitEvent(s, "presence", (p) => p.user === "pat", 3000));
      const pat1 = await member(1, "pat", "pres");
      for (const p of await Promise.all(online)) assert.deepEqual(p, { room: "pres", user: "pat", online: true });
      const q = assertOkAck(await emitAck(w2, "presence", { room: "pres" }));
      assert.deepEqual(q.users.map((u) => u.user).sort(), ["pat", "watch0", "watch2"]);

      // A second connection on another host: no event; closing one of the two: none either.
      const quiet = [w0, w2].map((s) => collect(s, "presence"));
      const pat2 = await member(2, "pat", "pres");
      pat1.close();
      await sleep(800);
      assert.deepEqual(quiet.map((c) => c.stop()), [[], []], "pat is still online through host 2");

      const offline = [w0, w2].map((s) => waitEvent(s, "presence", (p) => p.user === "pat", 3000));
      pat2.close();
      for (const p of await Promise.all(offline)) assert.deepEqual(p, { room: "pres", user: "pat", online: false });
      const q2 = assertOkAck(await emitAck(w0, "presence", { room: "pres" }));
      assert.deepEqual(q2.users.map((u) => u.user).sort(), ["watch0", "watch2"]);
    }),
  );

  it(
    "a killed host's user goes offline once for the members on the other hosts",
    T(async () => {
      const [k0, k1] = [await member(0, "keep0", "kill"), await member(1, "keep1", "kill")];
      await member(2, "doomed", "kill");
      await sleep(300);
      const logs = [k0, k1].map((s) => collect(s, "presence"));
      const killedAt = Date.now();
      hosts[2].stopping = true; // killed on purpose: not a crash
      hosts[2].proc.kill("SIGKILL");
      // ttl, plus a refresh interval (ttl/3), plus slack.
      const bound = TTL_MS + TTL_MS / 3 + 1500;
      await Promise.all(logs.map((l) => l.waitFor(1, bound)));
      const took = Date.now() - killedAt;
      await sleep(TTL_MS); // a second event would show up now
      for (const l of logs) assert.deepEqual(l.stop(), [{ room: "kill", user: "doomed", online: false }]);
      assert.ok(took <= bound, `offline after ${took} ms`);
      const q = assertOkAck(await emitAck(k0, "presence", { room: "kill" }));
      assert.deepEqual(q.users.map((u) => u.user).sort(), ["keep0", "keep1"]);
    }),
  );
});
