// Emits from existing Node services: the real `@socket.io/redis-emitter` (with the `redis`
// client its README uses) publishes on the Redis two corelay hosts share with
// `emitter.enabled = true`, and a third host with it off. socket.io-client sockets in rooms
// on each host: `to(room).emit` reaches the room's members on both enabled hosts and no one
// else, `emit` reaches everyone connected there, `except` is honoured, a member of two
// target rooms gets it once, and the disabled host delivers nothing. Garbage on the
// emitter's channel is counted, not fatal. On a Redis Cluster (3 masters) an emit published
// through a node neither host was given still reaches both. PROTOCOL.md "From existing Node services";
// ARCHITECTURE.md "The application's backend". Skipped (with the reason) only when
// redis-server is not installed; scripts/test.sh installs it.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, describe, it } from "node:test";
import { Emitter } from "@socket.io/redis-emitter";
import { createClient } from "redis";
import {
  assertOkAck,
  closeAll,
  connect,
  emitAck,
  expectNoEvent,
  guard,
  httpGet,
  mintToken,
  runUntilExit,
  startServer,
  waitEvent,
} from "./harness.mjs";
import { hostEnv, redisCliBin, redisServerBin, startRedis, startRedisCluster } from "./redis.mjs";

const SKIP = redisServerBin()
  ? false
  : "redis-server is not installed (apt-get install redis-server; scripts/test.sh does it): emitter tests skipped";

/** A metric's value from a host's /metrics text (0 when absent). */
async function metric(host, name) {
  const { body } = await httpGet(host.url, "/metrics");
  const line = body.split("\n").find((l) => l.startsWith(name + " "));
  return line ? Number(line.split(" ")[1]) : 0;
}

describe("@socket.io/redis-emitter: two hosts read it, one does not", { skip: SKIP }, () => {
  const secret = "e2e-emitter-" + randomBytes(12).toString("hex");
  let redis;
  let hosts = [];
  let publisher;
  let emitter;
  const T = (fn) => guard(() => hosts, fn);
  const LIMIT = { timeout: 60000 };

  /** A socket.io client of `user` on host i (polling only when `polling`), joined to `rooms`. */
  async function member(i, user, rooms, { polling = false } = {}) {
    const opts = { auth: { token: mintToken(secret, { sub: user, rooms: ["*"] }) } };
    if (polling) opts.transports = ["polling"];
    const s = await connect(hosts[i].url, opts);
    for (const room of rooms) assertOkAck(await emitAck(s, "join", { room }), `${user} joins ${room} on host ${i}`);
    return s;
  }

  before(async () => {
    redis = await startRedis();
    const env = (enabled) => ({ ...hostEnv(2000), CORELAY_EMITTER_ENABLED: String(enabled) });
    const start = (enabled) =>
      startServer({ store: "redis", args: ["--redis", redis.url], env: env(enabled), secret });
    hosts = await Promise.all([start(true), start(true), start(false)]);
    publisher = createClient({ url: redis.url });
    await publisher.connect();
    emitter = new Emitter(publisher);
  });
  after(async () => {
    closeAll();
    if (publisher) await publisher.quit();
    await Promise.all(hosts.map((h) => h.stop()));
    if (redis) await redis.stop();
  });

  it(
    "to(room).emit reaches the room's members on both hosts, as sent, and no one else",
    LIMIT,
    T(async () => {
      const inRoom = [await member(0, "a0", ["news"]), await member(1, "a1", ["news"]), await member(1, "p1", ["news"], { polling: true })];
      const outside = [await member(0, "b0", ["other"]), await member(1, "b1", [])];
      const disabled = await member(2, "c2", ["news"]);
      const at = new Date(Date.UTC(2025, 4, 6, 7, 8, 9, 10));
      const got = inRoom.map((s) => waitEvent(s, "notice", (n) => n.id === 1, 5000));
      const argsOf = (s) => new Promise((resolve) => s.once("two", (...a) => resolve(a)));
      const twoArgs = inRoom.map(argsOf);
      emitter.to("news").emit("notice", { id: 1, text: "héllo", n: 1.5, at, nested: [null, true, { k: -3 }] });
      emitter.to("news").emit("two", "first", 2);
      for (const n of await Promise.all(got)) {
        assert.deepEqual(n, { id: 1, text: "héllo", n: 1.5, at: at.toISOString(), nested: [null, true, { k: -3 }] });
      }
      for (const a of await Promise.all(twoArgs)) assert.deepEqual(a, ["first", 2]);
      for (const s of [...outside, disabled]) await expectNoEvent(s, "notice", () => true, 500);
    }),
  );

  it(
    "emit without a room reaches every connected socket on the enabled hosts",
    LIMIT,
    T(async () => {
      const enabled = [await member(0, "e0", []), await member(1, "e1", ["x"])];
      const disabled = await member(2, "e2", []);
      const got = enabled.map((s) => waitEvent(s, "broadcast", (b) => b.all === true, 5000));
      emitter.emit("broadcast", { all: true });
      await Promise.all(got);
      await expectNoEvent(disabled, "broadcast", () => true, 500);
    }),
  );

  it(
    "except leaves out members of the excepted rooms; a member of two target rooms gets it once",
    LIMIT,
    T(async () => {
      const plain = [await member(0, "x0", ["team"]), await member(1, "x1", ["team"])];
      const vip = [await member(0, "v0", ["team", "vip"]), await member(1, "v1", ["team", "vip"])];
      const got = plain.map((s) => waitEvent(s, "memo", (m) => m.n === 1, 5000));
      emitter.to("team").except("vip").emit("memo", { n: 1 });
      await Promise.all(got);
      for (const s of vip) await expectNoEvent(s, "memo", (m) => m.n === 1, 500);

      const both = await member(1, "y1", ["team", "ops"]);
      const seen = [];
      both.on("memo", (m) => seen.push(m));
      const reached = waitEvent(plain[0], "memo", (m) => m.n === 2, 5000);
      emitter.to(["team", "ops"]).emit("memo", { n: 2 });
      await reached;
      await expectNoEvent(both, "memo", () => false, 500);
      assert.deepEqual(seen, [{ n: 2 }]);
    }),
  );

  it(
    "garbage on the emitter's channel is counted and skipped; the next emit still arrives",
    LIMIT,
    T(async () => {
      const s = await member(0, "g0", ["g"]);
      const before = await metric(hosts[0], "corelay_emitter_undecodable_total");
      await publisher.publish("socket.io#/#", Buffer.from([0xc1, 0xff, 0x00]));
      await publisher.publish("socket.io#/#g#", Buffer.from("not msgpack at all"));
      const got = waitEvent(s, "after", () => true, 5000);
      emitter.to("g").emit("after", 1);
      await got;
      assert.equal(await metric(hosts[0], "corelay_emitter_undecodable_total"), before + 2);
      assert.ok((await metric(hosts[0], "corelay_emitter_received_total")) >= before + 3);
      assert.ok((await metric(hosts[0], "corelay_emitter_frames_total")) > 0);
      assert.equal(await metric(hosts[2], "corelay_emitter_received_total"), 0);
    }),
  );
});

describe("@socket.io/redis-emitter on a Redis Cluster: one PUBLISH, heard through every node", { skip: SKIP || (!redisCliBin() && "redis-cli is not installed: skipped") }, () => {
  const secret = "e2e-emitter-cluster-" + randomBytes(12).toString("hex");
  let cluster;
  let hosts = [];
  let publisher;
  const T = (fn) => guard(() => hosts, fn);
  before(async () => {
    cluster = await startRedisCluster({ masters: 3, replicasPerMaster: 0 });
    const [a, b, c] = await cluster.masters();
    const env = { ...hostEnv(2000), CORELAY_EMITTER_ENABLED: "true" };
    hosts = await Promise.all(
      [a, b].map((i) => startServer({ store: "redis", args: ["--redis", cluster.nodeUrl(i)], env, secret })),
    );
    // The emitter's plain client on the third master, which neither host was given.
    publisher = createClient({ url: cluster.nodeUrl(c) });
    await publisher.connect();
  });
  after(async () => {
    closeAll();
    if (publisher) await publisher.quit();
    await Promise.all(hosts.map((h) => h.stop()));
    if (cluster) await cluster.stop();
  });

  it(
    "to(room).emit published through a node neither host was given reaches the room's members on both hosts",
    { timeout: 60000 },
    T(async () => {
      const sockets = [];
      for (const [i, h] of hosts.entries()) {
        const s = await connect(h.url, { auth: { token: mintToken(secret, { sub: `k${i}`, rooms: ["*"] }) } });
        assertOkAck(await emitAck(s, "join", { room: "desk" }), `k${i} joins desk`);
        sockets.push(s);
      }
      const got = sockets.map((s) => waitEvent(s, "notice", (n) => n.via === "cluster", 5000));
      new Emitter(publisher).to("desk").emit("notice", { via: "cluster" });
      await Promise.all(got);
    }),
  );
});

describe("emitter.enabled without redis.url", () => {
  it("refuses to start with a message naming redis.url", async () => {
    const r = await runUntilExit(["serve", "--listen", "127.0.0.1:0", "--store", "memory"], {
      env: { CORELAY_EMITTER_ENABLED: "true" },
    });
    assert.notEqual(r.code, 0);
    assert.equal(r.ready, false);
    assert.match(r.output, /emitter\.enabled.*redis\.url/);
  });
});
