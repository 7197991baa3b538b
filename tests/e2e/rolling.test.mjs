// A host leaves under traffic: corelay hosts in cluster mode (one real redis-server),
// clients on the leaving host. Rolling restart: SIGTERM, the host closes its WebSockets
// with 1012 and exits 0 in time. Crash: SIGKILL. Either way the clients (socket.io-client
// with reconnection on, pointed at another host as a load balancer would once the first
// leaves it) reconnect, rejoin with `since` and recover what they missed; the sender
// retries unacked messages with the same cid. Every acked message is delivered to every
// member exactly once, in offset order, and is in the history.
// PROTOCOL.md "Wire" (1012), "Guarantees"; ARCHITECTURE.md "Process and operations",
// "Between hosts".
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, describe, it } from "node:test";
import { io } from "socket.io-client";
import { assertOkAck, closeAll, connect, emitAck, guard, mintToken, sleep, startServer } from "./harness.mjs";
import { redisServerBin, startRedis } from "./redis.mjs";

const SECRET = "e2e-rolling-" + randomBytes(12).toString("hex");
const ENV = {
  CORELAY_LIMITS_SEND_RATE: "10000",
  CORELAY_LIMITS_SEND_BURST: "10000",
  CORELAY_SERVER_SHUTDOWN_TIMEOUT: "5s",
};
const SKIP = redisServerBin()
  ? false
  : "redis-server is not installed (apt-get install redis-server; scripts/test.sh does it): rolling-restart test skipped";

let redis;
let hosts = [];
const roaming = [];
const T = (fn) => guard(() => hosts, fn);
const auth = (sub) => ({ token: mintToken(SECRET, { sub, rooms: ["*"] }) });

/**
 * A socket.io-client on host `from` that reconnects to `to` once `from` closes it (the
 * load balancer's job in production), rejoins ROOM with `since` = the last offset it saw, and
 * records every message offset it is given, live or recovered, in arrival order.
 */
function roamingMember(user, from, to, ROOM) {
  const socket = io(from.url, {
    transports: ["websocket"],
    forceNew: true,
    auth: auth(user),
    reconnectionDelay: 50,
    reconnectionDelayMax: 200,
  });
  // `ready`: joined on the current connection; `epoch`: joins so far.
  const m = { user, socket, offsets: [], closes: [], rejoined: 0, last: 0, ready: false, epoch: 0 };
  roaming.push(socket);
  const take = (msg) => {
    if (msg.room !== ROOM) return;
    m.offsets.push(msg.offset);
    m.last = Math.max(m.last, msg.offset);
  };
  socket.on("message", take);
  socket.on("disconnect", (reason, details) => {
    m.ready = false;
    m.closes.push({ reason, code: details?.context?.code });
  });
  socket.io.on("reconnect_attempt", () => {
    socket.io.uri = to.url;
  });
  let first = true;
  m.joined = new Promise((resolve, reject) => {
    socket.on("connect", async () => {
      try {
        const since = first ? undefined : m.last;
        // The replay is taken inside the ack callback, which runs as the ack arrives. After
        // an `await`, live messages that came in the same read as the ack would be taken
        // first: the server sends the ack before them, but a promise resumes later.
        const ack = assertOkAck(
          await new Promise((resolve, reject) =>
            socket
              .timeout(3000)
              .emit("join", since === undefined ? { room: ROOM } : { room: ROOM, since }, (err, reply) => {
                if (err) return reject(err);
                if (since !== undefined && reply?.ok) for (const msg of reply.missed ?? []) take({ ...msg, room: ROOM });
                resolve(reply);
              }),
          ),
          `${user} joins`,
        );
        if (!first) {
          m.rejoined += 1;
          assert.ok(!ack.truncated, `${user}: nothing was cut from the replay`);
        }
        first = false;
        m.epoch += 1;
        m.ready = true;
        resolve();
      } catch (e) {
        reject(e);
      }
    });
  });
  return m;
}

describe("a host leaves under traffic, its clients move to another", { skip: SKIP }, () => {
  before(async () => {
    redis = await startRedis();
    hosts = await Promise.all(
      [0, 1, 2].map(() => startServer({ store: "redis", args: ["--redis", redis.url], env: ENV, secret: SECRET })),
    );
  });
  after(async () => {
    for (const s of roaming) s.close();
    closeAll();
    await Promise.all(hosts.map((h) => h.stop()));
    if (redis) await redis.stop();
  });

  it(
    "SIGTERM (rolling restart): clients see 1012, reconnect to another host and recover; every acked message reaches every member once, in order",
    T(() => leaveUnderTraffic({ leaving: hosts[0], staying: hosts[1], room: "rolling", signal: "SIGTERM" })),
  );
  it(
    "SIGKILL (crash): clients reconnect to another host and recover; every acked message reaches every member once, in order",
    T(() => leaveUnderTraffic({ leaving: hosts[2], staying: hosts[1], room: "crash", signal: "SIGKILL" })),
  );
});

/**
 * Clients of `leaving` (a listener and a sender) and an observer on `staying`, all in
 * `room`; the sender sends one message at a time; then `leaving` gets `signal`.
 */
async function leaveUnderTraffic({ leaving: a, staying: b, room: ROOM, signal }) {
  const listener = roamingMember("listener", a, b, ROOM);
  const sender = roamingMember("sender", a, b, ROOM);
  await Promise.all([listener.joined, sender.joined]);
  const observer = await connect(b.url, { auth: auth("observer") });
  const seenByObserver = [];
  observer.on("message", (msg) => msg.room === ROOM && seenByObserver.push(msg.offset));
  assertOkAck(await emitAck(observer, "join", { room: ROOM }), "observer joins on the staying host");

  // The sender: one message at a time, each retried with its cid until acked.
  const acked = new Map(); // cid -> offset
  let stop = false;
  let unavailable = 0;
  const sending = (async () => {
    for (let i = 1; !stop; i++) {
      const cid = `c${i}`;
      for (;;) {
        if (!sender.ready) {
          await sleep(10); // reconnecting: a client sends once it has rejoined
          continue;
        }
        const epoch = sender.epoch;
        let ack;
        try {
          // volatile: not buffered while disconnected (a buffered send would reach the
          // new host before the rejoin); a lost one times out and is retried.
          ack = await sender.socket.volatile.timeout(1000).emitWithAck("message", { room: ROOM, text: `t${i}`, cid });
        } catch {
          await sleep(20); // no ack (closed meanwhile): retry, the cid makes it safe
          continue;
        }
        if (!ack.ok && ack.error?.code === "not_joined" && sender.epoch !== epoch) continue; // raced the rejoin
        if (ack.ok) {
          const before = acked.get(cid);
          assert.ok(before === undefined || before === ack.offset, `cid ${cid} acked at two offsets`);
          acked.set(cid, ack.offset);
          break;
        }
        assert.equal(ack.error?.code, "unavailable", `a send may only fail as unavailable: ${JSON.stringify(ack)}`);
        unavailable += 1;
        await sleep(20);
      }
      await sleep(5);
    }
  })();

  await sleep(700);
  const ackedBeforeTerm = acked.size;
  assert.ok(ackedBeforeTerm > 10, `traffic flows before the signal (${ackedBeforeTerm} acked)`);
  a.stopping = true; // the exit is expected
  const t0 = Date.now();
  a.proc.kill(signal);
  while (!a.exited && Date.now() - t0 < 8000) await sleep(20);
  const exitMs = Date.now() - t0;
  if (signal === "SIGTERM") {
    assert.deepEqual(a.exited, { code: 0, signal: null }, "the host exits 0 after SIGTERM");
    assert.ok(exitMs < 6000, `the host exits within its shutdown timeout (${exitMs} ms)`);
  } else {
    assert.deepEqual(a.exited, { code: null, signal: "SIGKILL" }, "the host was killed");
  }

  // Both roaming clients were closed with 1012 and came back on B.
  const end = Date.now() + 8000;
  while ((listener.rejoined < 1 || sender.rejoined < 1) && Date.now() < end) await sleep(20);
  for (const m of [listener, sender]) {
    assert.ok(m.rejoined >= 1, `${m.user} reconnected to the staying host and rejoined`);
    if (signal === "SIGTERM") {
      assert.deepEqual(m.closes[0], { reason: "transport close", code: 1012 }, `${m.user}: closed with 1012`);
    } else {
      assert.ok(/transport (close|error)/.test(m.closes[0]?.reason), `${m.user}: the transport dropped: ${JSON.stringify(m.closes[0])}`);
    }
  }
  const atRejoin = acked.size;
  while (acked.size < atRejoin + 30 && Date.now() < end + 5000) await sleep(20);
  stop = true;
  await sending;
  assert.ok(acked.size >= atRejoin + 30, "sending goes on through the staying host");

  // Every acked message reaches the listener (live or recovered) and the observer,
  // exactly once and in offset order.
  const offsets = [...acked.values()].sort((x, y) => x - y);
  const top = offsets[offsets.length - 1];
  const settle = Date.now() + 5000;
  while ((listener.last < top || Math.max(0, ...seenByObserver) < top) && Date.now() < settle) await sleep(20);
  for (const [who, got] of [
    ["listener", listener.offsets],
    ["observer", seenByObserver],
  ]) {
    for (let i = 1; i < got.length; i++) assert.ok(got[i] > got[i - 1], `${who}: offsets strictly increase (${got[i - 1]} then ${got[i]})`);
    const have = new Set(got);
    const missing = offsets.filter((o) => !have.has(o));
    assert.deepEqual(missing, [], `${who} got every acked message`);
  }
  // The room's stream has no holes: offsets 1..top, every one in the observer's view.
  assert.deepEqual(seenByObserver.filter((o) => o <= top), Array.from({ length: top }, (_, i) => i + 1));

  // B's history holds every acked message with its text.
  const texts = new Map();
  for (let after = 0; after < top; ) {
    const page = assertOkAck(await emitAck(observer, "history", { room: ROOM, after, limit: 100 }), "history page");
    if (page.messages.length === 0) break;
    for (const msg of page.messages) texts.set(msg.offset, msg.text);
    after = page.messages[page.messages.length - 1].offset;
  }
  for (const [cid, offset] of acked) assert.equal(texts.get(offset), `t${cid.slice(1)}`, `history at ${offset}`);
  process.stderr.write(
    `${signal}: ${acked.size} acked (${ackedBeforeTerm} before the signal), ${unavailable} unavailable retries, the host was gone ${exitMs} ms after the signal\n`,
  );
}
