// Chat end to end: join, message ack and delivery across shards, ordering, idempotent
// retries, history paging, join {since}, typing, leave.  PROTOCOL.md "Client → server
// events", "Server → client events", "Guarantees".
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  assertErrorAck,
  assertOkAck,
  closeAll,
  collect,
  connect,
  connectOnEachShard,
  emitAck,
  health,
  guard,
  mintToken,
  sleep,
  startServer,
  waitEvent,
} from "./harness.mjs";

let srv;
let A; // alice, on one shard
let B; // bob, on the other shard
let shardA;
let shardB;
const T = (fn) => guard(() => srv, fn);
const tokenFor = (sub, extra = {}) => mintToken(srv.secret, { sub, name: sub.toUpperCase(), rooms: ["*"], ...extra });
const offs = (ms) => ms.map((m) => m.offset);
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

function assertTs(ts, t0, t1) {
  assert.equal(typeof ts, "number", `ts must be a number, got ${JSON.stringify(ts)}`);
  assert.ok(ts >= t0 - 2000 && ts <= t1 + 2000, `ts ${ts} is not server time in ms near [${t0}, ${t1}]`);
}

describe("chat", () => {
  before(async () => {
    // Generous send limits: this file tests delivery, not rate limiting.
    srv = await startServer({ env: { CORELAY_LIMITS_SEND_RATE: "10000", CORELAY_LIMITS_SEND_BURST: "10000" } });
    const pair = await connectOnEachShard(srv.url, (i) => ({ token: tokenFor(i === 0 ? "alice" : "bob") }));
    [{ socket: A, shard: shardA }, { socket: B, shard: shardB }] = pair;
  });
  after(async () => {
    closeAll();
    if (srv) await srv.stop();
  });

  it(
    "puts the two clients on different shards (per /healthz)",
    T(async () => {
      assert.notEqual(shardA, shardB);
      const h = await health(srv.url);
      assert.equal(h.httpStatus, 200);
      assert.equal(h.status, "ok");
      assert.equal(h.shards.length, 2, `2 shards expected: ${JSON.stringify(h.shards)}`);
      assert.deepEqual(h.shards.map((s) => s.shard).sort(), [0, 1]);
      for (const s of h.shards) assert.equal(s.connections, 1, `one connection per shard: ${JSON.stringify(h)}`);
      assert.equal(h.connections, 2);
      assert.equal(h.redis, null, "single host: redis is null");
      assert.equal(h.store?.ok, true);
    }),
  );

  let first; // ack of the first message
  const t0 = Date.now();

  it(
    "join of a fresh room acks {ok:true, room, offset:0}",
    T(async () => {
      for (const s of [B, A]) {
        const ack = await emitAck(s, "join", { room: "lobby" });
        assert.deepEqual({ ok: ack.ok, room: ack.room, offset: ack.offset }, { ok: true, room: "lobby", offset: 0 }, JSON.stringify(ack));
        assert.equal(ack.error, undefined);
      }
      const h = await health(srv.url);
      assert.ok(h.rooms >= 1, `/healthz counts the room: ${JSON.stringify(h)}`);
    }),
  );

  it(
    "message is acked {ok,id,offset:1,ts}, delivered to the other shard, not echoed to the sender",
    T(async () => {
      const echo = collect(A, "message");
      const got = waitEvent(B, "message", (m) => m.room === "lobby");
      first = await emitAck(A, "message", { room: "lobby", text: "hello, bob", cid: "c-1" });
      const t1 = Date.now();
      assertOkAck(first, "message");
      assert.equal(typeof first.id, "string");
      assert.ok(first.id.length > 0);
      assert.equal(first.offset, 1);
      assertTs(first.ts, t0, t1);
      const m = await got;
      assert.deepEqual(m, {
        room: "lobby",
        id: first.id,
        offset: 1,
        user: "alice",
        text: "hello, bob",
        ts: first.ts,
        cid: "c-1",
      });
      await sleep(300);
      assert.deepEqual(echo.stop(), [], "the sender does not receive its own message");
    }),
  );

  it(
    "50 pipelined messages are acked and delivered in order, offsets 2..51, no gaps or duplicates",
    T(async () => {
      const recv = collect(B, "message");
      const acks = await Promise.all(range(1, 50).map((i) => emitAck(A, "message", { room: "lobby", text: `m${i}` }, 5000)));
      acks.forEach((a, i) => assertOkAck(a, `ack ${i}`));
      assert.deepEqual(acks.map((a) => a.offset), range(2, 51), "accepted in the order sent");
      assert.equal(new Set(acks.map((a) => a.id)).size, 50, "ids are unique");
      await recv.waitFor(50);
      await sleep(300); // anything extra (duplicates) would show up now
      const got = recv.stop();
      assert.deepEqual(got.map((m) => m.offset), range(2, 51));
      assert.deepEqual(got.map((m) => m.text), range(1, 50).map((i) => `m${i}`));
      assert.deepEqual(got.map((m) => m.id), acks.map((a) => a.id));
      for (const m of got) {
        assert.equal(m.user, "alice");
        assert.equal(m.room, "lobby");
        assert.equal(m.cid, undefined, "no cid was sent, none delivered");
      }
    }),
  );

  it(
    "id sorts by time",
    T(async () => {
      await sleep(5);
      const seen = waitEvent(B, "message", (m) => m.text === "later");
      const later = assertOkAck(await emitAck(A, "message", { room: "lobby", text: "later" }));
      await seen; // (so that it cannot spill into the next test)
      assert.equal(later.offset, 52);
      assert.ok(later.id > first.id, `id ${later.id} (later) must sort after ${first.id}`);
      assert.ok(later.ts >= first.ts);
    }),
  );

  it(
    "a retry of the same cid gets the identical ack, from any connection of the user, and stores nothing",
    T(async () => {
      const recv = collect(B, "message");
      const retry = await emitAck(A, "message", { room: "lobby", text: "hello, bob", cid: "c-1" });
      assert.deepEqual(retry, first);
      // the same user on another connection
      const A2 = await connect(srv.url, { auth: { token: tokenFor("alice") } });
      assertOkAck(await emitAck(A2, "join", { room: "lobby" }));
      const retry2 = await emitAck(A2, "message", { room: "lobby", text: "hello, bob", cid: "c-1" });
      assert.deepEqual(retry2, first);
      // (A2 is one of "every connection in the room except the sending one")
      const toA2 = waitEvent(A2, "message", (m) => m.text === "to every other connection");
      const own = assertOkAck(await emitAck(A, "message", { room: "lobby", text: "to every other connection" }));
      assert.equal((await toA2).offset, own.offset, "the sender's other connection receives it");
      assert.equal(own.offset, 53, "the retries stored nothing: the next message takes the next offset");
      await sleep(300);
      assert.deepEqual(
        recv.stop().filter((m) => m.offset !== own.offset),
        [],
        "a deduplicated retry delivers nothing",
      );
      A2.close();
      const nextSeen = waitEvent(B, "message", (m) => m.text === "after retry");
      const next = assertOkAck(await emitAck(A, "message", { room: "lobby", text: "after retry" }));
      assert.equal(next.offset, own.offset + 1);
      assert.equal((await nextSeen).offset, own.offset + 1);
      // the same cid from another user is a different message
      const otherSeen = waitEvent(A, "message", (m) => m.text === "bob's c-1");
      const other = assertOkAck(await emitAck(B, "message", { room: "lobby", text: "bob's c-1", cid: "c-1" }));
      assert.equal(other.offset, own.offset + 2);
      assert.notEqual(other.id, first.id);
      assert.deepEqual(await otherSeen, {
        room: "lobby",
        id: other.id,
        offset: own.offset + 2,
        user: "bob",
        text: "bob's c-1",
        ts: other.ts,
        cid: "c-1",
      });
    }),
  );

  describe("history and join {since}", () => {
    const N = 120;
    let acks;
    before(async () => {
      assertOkAck(await emitAck(A, "join", { room: "hist" }));
      acks = await Promise.all(range(1, N).map((i) => emitAck(A, "message", { room: "hist", text: `h${i}`, cid: `h-${i}` }, 5000)));
      // B joins after the fact (and lives on the other shard)
      const j = await emitAck(B, "join", { room: "hist" });
      assert.equal(j.offset, N, JSON.stringify(j));
    });
    const hist = async (q) => {
      const r = await emitAck(B, "history", { room: "hist", ...q });
      assertOkAck(r, `history ${JSON.stringify(q)}`);
      assert.ok(Array.isArray(r.messages), JSON.stringify(r).slice(0, 300));
      return r.messages;
    };

    it(
      "history {limit:10} is the newest 10, oldest first, with full messages",
      T(async () => {
        assert.deepEqual(acks.map((a) => a.offset), range(1, N));
        const ms = await hist({ limit: 10 });
        assert.deepEqual(offs(ms), range(N - 9, N));
        const last = ms[ms.length - 1];
        assert.deepEqual(last, {
          room: "hist",
          id: acks[N - 1].id,
          offset: N,
          user: "alice",
          text: `h${N}`,
          ts: acks[N - 1].ts,
          cid: `h-${N}`,
        });
      }),
    );

    it(
      "history default limit is 50 and limits above 100 are capped at 100",
      T(async () => {
        assert.deepEqual(offs(await hist({})), range(N - 49, N));
        assert.deepEqual(offs(await hist({ limit: 500 })), range(N - 99, N));
        assert.deepEqual(offs(await hist({ limit: 100 })), range(N - 99, N));
      }),
    );

    it(
      "history before/after paging",
      T(async () => {
        assert.deepEqual(offs(await hist({ before: 21, limit: 5 })), range(16, 20));
        assert.deepEqual(offs(await hist({ after: 5, limit: 5 })), range(6, 10));
        assert.deepEqual(offs(await hist({ before: 3, limit: 10 })), [1, 2]);
        assert.deepEqual(offs(await hist({ after: N - 2, limit: 10 })), [N - 1, N]);
        assert.deepEqual(offs(await hist({ after: 0, limit: 3 })), [1, 2, 3]);
        assert.deepEqual(offs(await hist({ before: 1 })), []);
        assert.deepEqual(offs(await hist({ after: N })), []);
        assert.deepEqual(offs(await hist({ after: 10 })), range(11, 60), "after with the default limit 50");
        // walk the whole room backwards page by page: every offset exactly once
        const seen = [];
        let cursor = N + 1;
        for (;;) {
          const page = await hist({ before: cursor, limit: 33 });
          if (!page.length) break;
          seen.unshift(...offs(page));
          cursor = page[0].offset;
        }
        assert.deepEqual(seen, range(1, N));
      }),
    );

    it(
      "join {since} returns exactly the missed messages, then live ones follow",
      T(async () => {
        const C = await connect(srv.url, { auth: { token: tokenFor("carol") } });
        const j = await emitAck(C, "join", { room: "hist", since: N - 5 });
        assertOkAck(j);
        assert.equal(j.room, "hist");
        assert.equal(j.offset, N);
        assert.deepEqual(offs(j.missed), range(N - 4, N));
        assert.deepEqual(j.missed.map((m) => m.text), range(N - 4, N).map((i) => `h${i}`));
        assert.deepEqual(j.missed[0], {
          room: "hist",
          id: acks[N - 5].id,
          offset: N - 4,
          user: "alice",
          text: `h${N - 4}`,
          ts: acks[N - 5].ts,
          cid: `h-${N - 4}`,
        });
        assert.notEqual(j.truncated, true);

        const D = await connect(srv.url, { auth: { token: tokenFor("dave") } });
        const jd = await emitAck(D, "join", { room: "hist", since: N });
        assert.equal(jd.offset, N);
        assert.deepEqual(jd.missed, [], "missed is present and empty when nothing was missed");
        const je = await emitAck(D, "join", { room: "hist-empty", since: 0 });
        assert.equal(je.offset, 0);
        assert.deepEqual(je.missed, []);

        const E = await connect(srv.url, { auth: { token: tokenFor("erin") } });
        const jall = await emitAck(E, "join", { room: "hist", since: 0 });
        assert.deepEqual(offs(jall.missed), range(1, N), "since 0: everything (fewer than max_replay)");
        assert.notEqual(jall.truncated, true);

        const live = waitEvent(C, "message", (m) => m.room === "hist");
        const a = assertOkAck(await emitAck(A, "message", { room: "hist", text: "live" }));
        assert.equal(a.offset, N + 1);
        const m = await live;
        assert.equal(m.offset, N + 1);
        assert.equal(m.text, "live");
        C.close();
        D.close();
        E.close();
      }),
    );
  });

  it(
    "two senders on different shards: every receiver sees offset order without gaps or duplicates",
    T(async () => {
      const C = await connect(srv.url, { auth: { token: tokenFor("carol") } });
      for (const s of [A, B, C]) assertOkAck(await emitAck(s, "join", { room: "race" }));
      const atA = collect(A, "message");
      const atB = collect(B, "message");
      const atC = collect(C, "message");
      const K = 40;
      const [acksA, acksB] = await Promise.all([
        Promise.all(range(1, K).map((i) => emitAck(A, "message", { room: "race", text: `a${i}` }, 5000))),
        Promise.all(range(1, K).map((i) => emitAck(B, "message", { room: "race", text: `b${i}` }, 5000))),
      ]);
      for (const a of [...acksA, ...acksB]) assertOkAck(a);
      const increasing = (xs) => xs.every((x, i) => i === 0 || x > xs[i - 1]);
      assert.ok(increasing(acksA.map((a) => a.offset)), "A's sends are accepted in the order sent");
      assert.ok(increasing(acksB.map((a) => a.offset)), "B's sends are accepted in the order sent");
      assert.deepEqual(
        [...acksA, ...acksB].map((a) => a.offset).sort((x, y) => x - y),
        range(1, 2 * K),
        "offsets 1..80 without gaps",
      );
      await atC.waitFor(2 * K);
      await atA.waitFor(K);
      await atB.waitFor(K);
      await sleep(300);
      const race = (c) => c.stop().filter((m) => m.room === "race");
      const gotC = race(atC);
      assert.deepEqual(gotC.map((m) => m.offset), range(1, 2 * K), "the third member gets every offset once, in order");
      const byOffset = new Map([...acksA.map((a, i) => [a.offset, `a${i + 1}`]), ...acksB.map((a, i) => [a.offset, `b${i + 1}`])]);
      assert.deepEqual(gotC.map((m) => m.text), gotC.map((m) => byOffset.get(m.offset)), "text matches the offset's ack");
      assert.deepEqual(race(atA).map((m) => m.offset), acksB.map((a) => a.offset), "A gets exactly B's messages, in order");
      assert.deepEqual(race(atB).map((m) => m.offset), acksA.map((a) => a.offset), "B gets exactly A's messages, in order");
      C.close();
    }),
  );

  it(
    "join {since} during a live stream: missed + live messages are exactly 1..N, each once",
    T(async () => {
      const K = 60;
      assertOkAck(await emitAck(A, "join", { room: "stream" }));
      const C = await connect(srv.url, { auth: { token: tokenFor("carol") } });
      const live = collect(C, "message");
      // A sends a paced stream; C joins a third of the way in
      const sends = [];
      let joinP;
      for (let i = 1; i <= K; i++) {
        sends.push(emitAck(A, "message", { room: "stream", text: `s${i}` }, 5000));
        if (i === K / 3) joinP = emitAck(C, "join", { room: "stream", since: 0 });
        if (i % 3 === 0) await sleep(3);
      }
      const j = await joinP;
      assertOkAck(j);
      const acks = await Promise.all(sends);
      acks.forEach((a) => assertOkAck(a));
      assert.deepEqual(offs(j.missed), range(1, j.offset), "missed is everything up to the join offset");
      const liveOffsets = () => live.items.filter((m) => m.room === "stream").map((m) => m.offset);
      const end = Date.now() + 3000;
      while (liveOffsets().length < K - j.offset && Date.now() < end) await sleep(10);
      await sleep(200);
      live.stop();
      assert.deepEqual(liveOffsets(), range(j.offset + 1, K), "live messages carry offsets > the join offset");
      C.close();
    }),
  );

  it(
    "join {since} replays at most history.max_replay (1000) messages, the newest, and says truncated",
    T(async () => {
      const K = 1005;
      assertOkAck(await emitAck(A, "join", { room: "big" }));
      for (let from = 1; from <= K; from += 250) {
        const acks = await Promise.all(
          range(from, Math.min(from + 249, K)).map((i) => emitAck(A, "message", { room: "big", text: `b${i}` }, 10000)),
        );
        acks.forEach((a) => assertOkAck(a));
      }
      const C = await connect(srv.url, { auth: { token: tokenFor("carol") } });
      const j = await emitAck(C, "join", { room: "big", since: 0 }, 10000);
      assertOkAck(j);
      assert.equal(j.offset, K);
      assert.equal(j.missed.length, 1000);
      assert.deepEqual(offs(j.missed), range(K - 999, K), "the newest 1000, oldest first");
      assert.equal(j.truncated, true);
      const j2 = await emitAck(C, "join", { room: "big", since: K - 1000 }, 10000);
      assert.equal(j2.missed.length, 1000);
      assert.notEqual(j2.truncated, true, "exactly 1000 missed: nothing left out");
      C.close();
    }),
  );

  it(
    "joining a room twice is harmless: messages still arrive once",
    T(async () => {
      const C = await connect(srv.url, { auth: { token: tokenFor("carol") } });
      assertOkAck(await emitAck(C, "join", { room: "twice" }));
      const again = await emitAck(C, "join", { room: "twice" });
      assertOkAck(again);
      assert.equal(again.offset, 0);
      assertOkAck(await emitAck(A, "join", { room: "twice" }));
      const got = collect(C, "message");
      assertOkAck(await emitAck(A, "message", { room: "twice", text: "once" }));
      await got.waitFor(1);
      await sleep(300);
      assert.deepEqual(got.stop().map((m) => m.text), ["once"]);
      C.close();
    }),
  );

  it(
    "polling clients (polling only, and polling with upgrade) join, send and receive",
    T(async () => {
      for (const transports of [["polling"], ["polling", "websocket"]]) {
        const P = await connect(srv.url, { transports, auth: { token: tokenFor("polly") } });
        const room = `poll-${transports.length}`;
        assertOkAck(await emitAck(P, "join", { room }), `join over ${transports}`);
        assertOkAck(await emitAck(B, "join", { room }));
        // several round trips so that polling requests land on both shards
        for (let i = 1; i <= 6; i++) {
          const toP = waitEvent(P, "message", (m) => m.room === room && m.text === `to polly ${i}`);
          const toB = waitEvent(B, "message", (m) => m.room === room && m.text === `from polly ${i}`);
          assertOkAck(await emitAck(B, "message", { room, text: `to polly ${i}` }));
          const a = assertOkAck(await emitAck(P, "message", { room, text: `from polly ${i}` }), `send over ${transports}`);
          assert.equal(a.offset, 2 * i);
          assert.equal((await toP).offset, 2 * i - 1);
          assert.equal((await toB).user, "polly");
        }
        P.close();
      }
    }),
  );

  it(
    "typing reaches the other members as {room,user}, not the sender",
    T(async () => {
      const echo = collect(A, "typing");
      const got = waitEvent(B, "typing", (p) => p.room === "lobby");
      A.emit("typing", { room: "lobby" });
      assert.deepEqual(await got, { room: "lobby", user: "alice" });
      // acked {ok:true} when the client asks for it
      const ack = await emitAck(A, "typing", { room: "lobby" });
      assert.deepEqual(ack, { ok: true });
      await sleep(300);
      assert.deepEqual(echo.stop(), [], "the sender gets no typing of its own");
    }),
  );

  it(
    "leave: {ok:true}, then message gets not_joined and nothing is delivered either way",
    T(async () => {
      const ack = await emitAck(A, "leave", { room: "lobby" });
      assertOkAck(ack, "leave");
      const toB = collect(B, "message");
      const r = await emitAck(A, "message", { room: "lobby", text: "after leave" });
      assertErrorAck(r, "not_joined");
      const toA = collect(A, "message");
      assertOkAck(await emitAck(B, "message", { room: "lobby", text: "anyone?" }));
      await sleep(300);
      assert.deepEqual(toB.stop().filter((m) => m.room === "lobby"), [], "a refused message is not delivered");
      assert.deepEqual(toA.stop().filter((m) => m.room === "lobby"), [], "a connection that left gets no more messages");
      assertErrorAck(await emitAck(A, "history", { room: "lobby" }), "not_joined");
    }),
  );
});
