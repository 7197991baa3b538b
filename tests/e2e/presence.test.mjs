// Presence: join/leave/drop notifications across shards, the presence query, and
// multi-connection users.  PROTOCOL.md "presence" (client and server events).
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  assertErrorAck,
  assertOkAck,
  closeAll,
  collect,
  connect,
  connectOnEachShard,
  connectOnShard,
  emitAck,
  guard,
  mintToken,
  sleep,
  startServer,
  waitEvent,
} from "./harness.mjs";

let srv;
const T = (fn) => guard(() => srv, fn);
const NAMES = { alice: "Alice Liddell", bob: "Bob Dylan", carol: "Carol Danvers" };
const auth = (sub) => ({ token: mintToken(srv.secret, { sub, name: NAMES[sub], rooms: ["*"] }) });
const sortUsers = (users) => [...users].sort((a, b) => (a.user < b.user ? -1 : a.user > b.user ? 1 : 0));

async function presenceOf(socket, room) {
  const r = await emitAck(socket, "presence", { room });
  assertOkAck(r, "presence");
  assert.ok(Array.isArray(r.users), JSON.stringify(r));
  return sortUsers(r.users);
}

describe("presence", () => {
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    closeAll();
    if (srv) await srv.stop();
  });

  it(
    "join/query/disconnect across shards",
    T(async () => {
      // B on one shard, A on the other
      const [{ socket: B, shard: sb }, { socket: A, shard: sa }] = await connectOnEachShard(srv.url, (i) =>
        auth(i === 0 ? "bob" : "alice"),
      );
      assert.notEqual(sa, sb);
      assertOkAck(await emitAck(B, "join", { room: "p1" }));
      assert.deepEqual(await presenceOf(B, "p1"), [{ user: "bob", name: NAMES.bob }]);

      const selfPresence = collect(A, "presence");
      const online = waitEvent(B, "presence", (p) => p.room === "p1" && p.user === "alice");
      assertOkAck(await emitAck(A, "join", { room: "p1" }));
      assert.deepEqual(await online, { room: "p1", user: "alice", online: true });

      const expected = [
        { user: "alice", name: NAMES.alice },
        { user: "bob", name: NAMES.bob },
      ];
      assert.deepEqual(await presenceOf(A, "p1"), expected, "cluster-wide list, with names from the token");
      assert.deepEqual(await presenceOf(B, "p1"), expected);
      await sleep(200);
      assert.deepEqual(
        selfPresence.stop().filter((p) => p.user === "alice"),
        [],
        "a joining user is not told about itself",
      );

      const offline = waitEvent(B, "presence", (p) => p.room === "p1" && p.user === "alice");
      A.close();
      assert.deepEqual(await offline, { room: "p1", user: "alice", online: false });
      assert.deepEqual(await presenceOf(B, "p1"), [{ user: "bob", name: NAMES.bob }]);
      B.close();
    }),
  );

  it(
    "leave sends online:false, and a non-member cannot query presence",
    T(async () => {
      const B = await connect(srv.url, { auth: auth("bob") });
      const C = await connect(srv.url, { auth: auth("carol") });
      assertOkAck(await emitAck(B, "join", { room: "p2" }));
      const on = waitEvent(B, "presence", (p) => p.room === "p2" && p.user === "carol");
      assertOkAck(await emitAck(C, "join", { room: "p2" }));
      assert.equal((await on).online, true);
      const off = waitEvent(B, "presence", (p) => p.room === "p2" && p.user === "carol");
      assertOkAck(await emitAck(C, "leave", { room: "p2" }));
      assert.deepEqual(await off, { room: "p2", user: "carol", online: false });
      assert.deepEqual(await presenceOf(B, "p2"), [{ user: "bob", name: NAMES.bob }]);
      assertErrorAck(await emitAck(C, "presence", { room: "p2" }), "not_joined");
      B.close();
      C.close();
    }),
  );

  it(
    "a user with two connections (on different shards) goes offline only when the second one leaves",
    T(async () => {
      const [{ socket: B }, { socket: A1, shard: s1 }] = await connectOnEachShard(srv.url, (i) =>
        auth(i === 0 ? "bob" : "alice"),
      );
      // the second connection of alice on the other shard than her first
      const A2 = await connectOnShard(srv.url, { auth: auth("alice") }, 1 - s1);
      assertOkAck(await emitAck(B, "join", { room: "p3" }));

      const events = collect(B, "presence");
      const firstOnline = waitEvent(B, "presence", (p) => p.room === "p3" && p.user === "alice" && p.online === true);
      assertOkAck(await emitAck(A1, "join", { room: "p3" }));
      await firstOnline;
      assertOkAck(await emitAck(A2, "join", { room: "p3" }));
      await sleep(300);
      assert.deepEqual(
        events.items.filter((p) => p.user === "alice"),
        [{ room: "p3", user: "alice", online: true }],
        "exactly one online:true: the second connection of a present user announces nothing",
      );
      assert.deepEqual(await presenceOf(B, "p3"), [
        { user: "alice", name: NAMES.alice },
        { user: "bob", name: NAMES.bob },
      ]);

      A1.close();
      await sleep(500);
      assert.deepEqual(
        events.items.filter((p) => p.user === "alice"),
        [{ room: "p3", user: "alice", online: true }],
        "no online:false while alice still has a connection in the room",
      );
      assert.deepEqual(
        (await presenceOf(B, "p3")).map((u) => u.user),
        ["alice", "bob"],
      );

      const off = waitEvent(B, "presence", (p) => p.room === "p3" && p.user === "alice" && p.online === false);
      A2.close();
      await off;
      await sleep(200);
      assert.deepEqual(
        events.stop().filter((p) => p.user === "alice"),
        [
          { room: "p3", user: "alice", online: true },
          { room: "p3", user: "alice", online: false },
        ],
      );
      assert.deepEqual(await presenceOf(B, "p3"), [{ user: "bob", name: NAMES.bob }]);
      B.close();
    }),
  );

  it(
    "a dropped connection (TCP torn down, no close handshake) sends online:false",
    T(async () => {
      const [{ socket: B }, { socket: A }] = await connectOnEachShard(srv.url, (i) => auth(i === 0 ? "bob" : "alice"));
      assertOkAck(await emitAck(B, "join", { room: "p5" }));
      const on = waitEvent(B, "presence", (p) => p.room === "p5" && p.user === "alice");
      assertOkAck(await emitAck(A, "join", { room: "p5" }));
      assert.equal((await on).online, true);
      const off = waitEvent(B, "presence", (p) => p.room === "p5" && p.user === "alice", 5000);
      const ws = A.io.engine.transport.ws;
      assert.equal(typeof ws?.terminate, "function", "websocket transport with a ws socket");
      ws.terminate(); // destroys the TCP socket without a WebSocket close frame
      assert.deepEqual(await off, { room: "p5", user: "alice", online: false });
      assert.deepEqual(await presenceOf(B, "p5"), [{ user: "bob", name: NAMES.bob }]);
      B.close();
      A.close();
    }),
  );

  it(
    "a user without a name claim is listed without a name",
    T(async () => {
      const B = await connect(srv.url, { auth: auth("bob") });
      const N = await connect(srv.url, { auth: { token: mintToken(srv.secret, { sub: "noname", rooms: ["*"] }) } });
      assertOkAck(await emitAck(B, "join", { room: "p4" }));
      assertOkAck(await emitAck(N, "join", { room: "p4" }));
      const users = await presenceOf(B, "p4");
      assert.deepEqual(users.map((u) => u.user), ["bob", "noname"]);
      assert.equal(users[1].name ?? undefined, undefined, JSON.stringify(users[1]));
      B.close();
      N.close();
    }),
  );
});
