// corelay on a Redis Cluster, end to end: real redis-server nodes formed into a cluster
// (3 masters, a replica each; redis.mjs startRedisCluster), corelay hosts started with
// `--redis <one node's URL> --store redis`, each host given a different node (two masters
// and a replica: any node will do), official socket.io-clients on them.
//
// - The checks three hosts on a standalone Redis pass (crossHostChecks, redis.mjs, run by
//   cluster.test.mjs too), with thirty rooms whose slots are on every master.
// - Under traffic (three senders, one per host, each retrying a send with the same cid
//   while it is acked `unavailable`): a busy room's slot migrated live to another master,
//   then a master SIGKILLed and failed over. Afterwards every acked message is in every
//   receiver's stream and in the history on every host exactly once, at its acked offset,
//   in offset order, with no duplicate offset, and nothing else is.
// - AUTH: a cluster with requirepass works with `redis://:PASSWORD@node`; a wrong or
//   missing password makes `corelay serve` exit with a clear message without the password.
//
// PROTOCOL.md "Configuration" (a Redis Cluster), "Guarantees", "Errors"; ARCHITECTURE.md
// "Between hosts: Redis". Skipped (with the reason) only when redis-server or redis-cli is
// not installed; scripts/test.sh installs them.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, describe, it } from "node:test";
import { assertOkAck, closeAll, collect, connect, emitAck, freePort, guard, mintToken, runUntilExit, sleep, waitEvent } from "./harness.mjs";
import { crossHostChecks, redisCliBin, redisServerBin, roomKey, startHosts, startRedisCluster } from "./redis.mjs";

const SKIP = !redisServerBin()
  ? "redis-server is not installed (apt-get install redis-server; scripts/test.sh does it): Redis Cluster tests skipped"
  : !redisCliBin()
    ? "redis-cli is not installed (apt-get install redis-tools; scripts/test.sh does it): Redis Cluster tests skipped"
    : false;
const TTL_MS = 2000;
const LIMIT = { timeout: 60000 };
const newSecret = () => "e2e-redis-cluster-" + randomBytes(12).toString("hex");

/**
 * The nodes the three hosts are given: two masters and a replica of the first one, so that
 * "any node" includes a replica; the third master is nobody's seed (the failover test
 * kills it, so that its failover is all it tests).
 */
async function seedNodes(cluster) {
  const [a, b] = await cluster.masters();
  const [r] = await cluster.replicasOf(a);
  return [a, b, r];
}

/** A room named prefix + n (the first n that fits) whose slot is served by master m now. */
async function roomOn(cluster, prefix, m) {
  for (let n = 0; n < 1000; n++) {
    const room = `${prefix}${n}`;
    if ((await cluster.masterIndexForSlot(await cluster.slotOf(roomKey(room)))) === m) return room;
  }
  throw new Error(`no room ${prefix}N on node ${m}`);
}

describe("redis cluster: three hosts, each given a different node, pass what they pass on one redis", { skip: SKIP }, () => {
  const ctx = { hosts: [], secret: newSecret(), ttlMs: TTL_MS, cluster: null };
  before(async () => {
    ctx.cluster = await startRedisCluster({ masters: 3, replicasPerMaster: 1 });
    const seeds = await seedNodes(ctx.cluster);
    ctx.hosts = await startHosts(seeds.map((i) => ctx.cluster.nodeUrl(i)), ctx);
  });
  after(async () => {
    closeAll();
    await Promise.all(ctx.hosts.map((h) => h.stop()));
    if (ctx.cluster) await ctx.cluster.stop();
  });

  crossHostChecks(ctx);
});

describe("redis cluster: resharding and failover under traffic lose nothing that was acked", { skip: SKIP }, () => {
  const ctx = { hosts: [], secret: newSecret(), cluster: null, seeds: [] };
  const T = (fn) => guard(() => ctx.hosts, fn);
  const auth = (sub) => ({ token: mintToken(ctx.secret, { sub, rooms: ["*"] }) });
  before(async () => {
    ctx.cluster = await startRedisCluster({ masters: 3, replicasPerMaster: 1 });
    ctx.seeds = await seedNodes(ctx.cluster);
    ctx.hosts = await startHosts(ctx.seeds.map((i) => ctx.cluster.nodeUrl(i)), { secret: ctx.secret, ttlMs: TTL_MS });
  });
  after(async () => {
    closeAll();
    await Promise.all(ctx.hosts.map((h) => h.stop()));
    if (ctx.cluster) await ctx.cluster.stop();
  });

  /** A socket.io client of `user` on host i, joined to `rooms`. */
  async function member(i, user, rooms) {
    const s = await connect(ctx.hosts[i].url, { auth: auth(user) });
    for (const room of new Set(rooms)) assertOkAck(await emitAck(s, "join", { room }), `${user} joins ${room} on host ${i}`);
    return s;
  }

  /**
   * Traffic on `rooms` (a room listed twice gets twice the messages) while `disrupt()`
   * runs (given `{acked()}`: how many sends were acked so far), then the checks. A
   * receiver and a sender per host, all in every room. Each sender sends one message at a
   * time, ~5 ms apart, each with a cid, retried with the same cid while it is acked
   * `unavailable` (any other error, no ack within 10 s, or 20 s of `unavailable` fails the
   * test). Traffic flows 1 s first (every room must get acks), then `disrupt()`, then at
   * least 1.5 s and 30 acks more. Afterwards, in every receiver's stream and in the history on every
   * host, per room: offsets strictly increase (no duplicate offset), every acked message
   * is there exactly once at its acked offset with its id, and nothing else is (every
   * send was retried until acked, so whatever was stored was acked). Returns a summary.
   */
  async function underTraffic(label, rooms, disrupt) {
    const unique = [...new Set(rooms)];
    const receivers = await Promise.all([0, 1, 2].map((i) => member(i, `${label}-recv${i}`, unique)));
    const senders = await Promise.all([0, 1, 2].map((i) => member(i, `${label}-send${i}`, unique)));
    const logs = receivers.map((r) => collect(r, "message"));
    const drops = [];
    [...receivers, ...senders].forEach((s, i) => s.on("disconnect", (reason) => drops.push(`socket ${i}: ${reason}`)));

    const acked = new Map(); // cid -> {room, offset, id}
    const ackedIn = new Map(unique.map((r) => [r, 0]));
    const lastError = new Map();
    let unavailable = 0;
    let stop = false;
    let abort = false;
    const loops = senders.map(async (s, i) => {
      for (let n = 1; !stop && !abort; n++) {
        const room = rooms[n % rooms.length];
        const cid = `${label}-${i}-${n}`;
        const text = `${i}:${n}`;
        const retryUntil = Date.now() + 20000;
        for (;;) {
          let ack;
          try {
            ack = await emitAck(s, "message", { room, text, cid }, 10000);
          } catch (e) {
            throw new Error(`sender ${i}: no ack for ${cid} in ${room} within 10 s (${e.message})`);
          }
          if (ack.ok) {
            acked.set(cid, { room, offset: ack.offset, id: ack.id, text, user: `${label}-send${i}` });
            ackedIn.set(room, ackedIn.get(room) + 1);
            break;
          }
          assert.equal(ack.error?.code, "unavailable", `sender ${i}, ${cid} in ${room}: a send may only fail as unavailable: ${JSON.stringify(ack)}`);
          unavailable += 1;
          lastError.set(room, ack.error.message);
          if (abort) return; // failing anyway: the send stays unacked
          if (Date.now() > retryUntil) throw new Error(`sender ${i}: ${cid} in ${room} still unavailable after 20 s: ${ack.error.message}`);
          await sleep(50);
        }
        await sleep(5);
      }
    });
    const sending = Promise.all(loops);
    sending.catch(() => (abort = true));
    const stopAll = async () => {
      abort = true;
      await sending.catch(() => {});
    };

    let summary;
    let ackedBefore;
    try {
      // Traffic flows, in every room, before the disruption.
      const start = Date.now();
      while (Date.now() - start < 1000 || [...ackedIn.values()].some((n) => n < 5)) {
        if (Date.now() - start > 5000) {
          const stuck = unique.filter((r) => ackedIn.get(r) < 5);
          assert.fail(
            `traffic does not flow before the disruption: ${stuck.map((r) => `${r}: ${ackedIn.get(r)} acked, last error ${JSON.stringify(lastError.get(r) ?? null)}`).join("; ")}`,
          );
        }
        await Promise.race([sending, sleep(20)]);
      }
      ackedBefore = acked.size;
      summary = await disrupt({ acked: () => acked.size });
      const atEnd = acked.size;
      const end = Date.now() + 10000;
      await Promise.race([sending, sleep(1500)]);
      while (acked.size < atEnd + 30 && Date.now() < end) await Promise.race([sending, sleep(20)]);
      assert.ok(acked.size >= atEnd + 30, `sending goes on after the disruption (${acked.size - atEnd} acked since)`);
      stop = true;
      await sending;
    } finally {
      await stopAll();
    }

    // Every receiver gets every acked message (≤ 10 s), then a duplicate would show (300 ms).
    const wantIn = new Map(unique.map((r) => [r, []]));
    for (const [cid, a] of acked) wantIn.get(a.room).push({ cid, ...a });
    for (const list of wantIn.values()) list.sort((x, y) => x.offset - y.offset);
    const settle = Date.now() + 10000;
    while (logs.some((l) => l.items.length < acked.size) && Date.now() < settle) await sleep(20);
    await sleep(300);
    const pick = (m) => ({ offset: m.offset, id: m.id, cid: m.cid, user: m.user, text: m.text });
    const check = (who, room, got) => {
      for (let k = 1; k < got.length; k++) {
        assert.ok(got[k].offset > got[k - 1].offset, `${who}, ${room}: offsets strictly increase (${got[k - 1].offset} then ${got[k].offset})`);
      }
      const seen = new Map();
      for (const m of got) seen.set(m.cid, (seen.get(m.cid) ?? 0) + 1);
      assert.deepEqual([...seen].filter(([, k]) => k > 1), [], `${who}, ${room}: no message twice (by cid)`);
      const want = wantIn.get(room);
      const have = new Set(got.map((m) => m.cid));
      assert.deepEqual(want.filter((a) => !have.has(a.cid)).map((a) => `${a.cid}@${a.offset}`), [], `${who}, ${room}: every acked message`);
      assert.deepEqual(got.map(pick), want.map(pick), `${who}, ${room}: exactly the acked messages, at their acked offsets`);
    };
    assert.deepEqual(drops, [], "no client was disconnected");
    for (const [i, log] of logs.entries()) {
      const got = log.stop();
      for (const room of unique) check(`receiver on host ${i}`, room, got.filter((m) => m.room === room));
    }
    for (const [i, r] of receivers.entries()) {
      for (const room of unique) {
        const history = [];
        for (let afterOffset = 0; ; ) {
          const page = assertOkAck(await emitAck(r, "history", { room, after: afterOffset, limit: 100 }, 10000), `history of ${room}`);
          if (page.messages.length === 0) break;
          history.push(...page.messages);
          afterOffset = page.messages[page.messages.length - 1].offset;
        }
        check(`history on host ${i}`, room, history);
      }
    }
    const line = `${label}: ${summary}; ${acked.size} acked (${ackedBefore} before), ${unavailable} unavailable retries`;
    process.stderr.write(line + "\n");
    return line;
  }

  it(
    "a busy room's slot migrated live to another master mid-stream: every acked message reaches every receiver and the history once, in order",
    LIMIT,
    T(async () => {
      const c = ctx.cluster;
      const [m0, m1, m2] = await c.masters();
      const busy = await roomOn(c, "mig-busy-", m0);
      const quiet = await roomOn(c, "mig-quiet-", m2);
      const slot = await c.slotOf(roomKey(busy));
      let moved;
      await underTraffic("mig", [busy, busy, quiet], async ({ acked }) => {
        const t = Date.now();
        const before = acked();
        moved = await c.migrateSlot(slot, m1, { batch: 10, pauseMs: 30 });
        return `${moved.keys} keys of ${busy} (slot ${slot}) moved from node ${moved.from} to node ${m1} in ${Date.now() - t} ms, ${acked() - before} sends acked meanwhile`;
      });
      // The room's data moved (its offset and stream keys at least), not an empty slot.
      assert.ok(moved.keys >= 2, `the migration moved the room's keys (${moved.keys})`);
      assert.equal(await c.masterIndexForSlot(slot), m1);
      assert.equal(await c.cmd(m0, "CLUSTER", "COUNTKEYSINSLOT", slot), 0, "nothing of the room left on its old master");
      assert.ok((await c.cmd(m1, "CLUSTER", "COUNTKEYSINSLOT", slot)) > 0, "the room's keys are on its new master");
    }),
  );

  it(
    "a master SIGKILLed mid-stream: its replica takes over; sends may be unavailable meanwhile, retried with their cid; every acked message reaches every receiver and the history once, in order",
    LIMIT,
    T(async () => {
      const c = ctx.cluster;
      const masters = await c.masters();
      const victim = masters.find((m) => !ctx.seeds.includes(m));
      const [spared] = masters.filter((m) => m !== victim);
      assert.ok(victim !== undefined && (await c.replicasOf(victim)).length === 1, "a master that is nobody's seed, with a replica");
      const hit1 = await roomOn(c, "fo-hit-", victim);
      const hit2 = await roomOn(c, `${hit1}-`, victim);
      const safe = await roomOn(c, "fo-safe-", spared);
      await underTraffic("fo", [hit1, hit2, safe], async () => {
        await c.killNode(victim);
        const t = Date.now();
        const promoted = await c.waitFailover(victim);
        return `master node ${victim} (${hit1}, ${hit2}) killed, node ${promoted} took over in ${Date.now() - t} ms`;
      });
    }),
  );
});

describe("redis cluster with a password", { skip: SKIP }, () => {
  const PASSWORD = "s3cret p@ss";
  const ctx = { hosts: [], secret: newSecret(), cluster: null };
  const T = (fn) => guard(() => ctx.hosts, fn);
  before(async () => {
    ctx.cluster = await startRedisCluster({ masters: 3, replicasPerMaster: 0, password: PASSWORD });
    ctx.hosts = await startHosts([0, 1].map((i) => ctx.cluster.nodeUrl(i, { auth: true })), { secret: ctx.secret, ttlMs: TTL_MS });
  });
  after(async () => {
    closeAll();
    await Promise.all(ctx.hosts.map((h) => h.stop()));
    if (ctx.cluster) await ctx.cluster.stop();
  });

  it(
    "hosts given redis://:PASSWORD@<node>: messages cross hosts in a room on every master, and the history has them",
    LIMIT,
    T(async () => {
      const c = ctx.cluster;
      const rooms = [];
      for (const m of await c.masters()) rooms.push(await roomOn(c, `pw-${m}-`, m));
      const auth = (sub) => ({ auth: { token: mintToken(ctx.secret, { sub, rooms: ["*"] }) } });
      const [a, b] = await Promise.all(ctx.hosts.map((h, i) => connect(h.url, auth(`pw${i}`))));
      for (const room of rooms) {
        for (const s of [a, b]) assertOkAck(await emitAck(s, "join", { room }), `join ${room}`);
        for (const [from, to, text] of [
          [a, b, "from host 0"],
          [b, a, "from host 1"],
        ]) {
          const got = waitEvent(to, "message", (m) => m.room === room && m.text === text, 5000);
          const ack = assertOkAck(await emitAck(from, "message", { room, text }), `${room}: ${text}`);
          const m = await got;
          assert.equal(m.offset, ack.offset);
        }
        const h = assertOkAck(await emitAck(b, "history", { room }), `history of ${room}`);
        assert.deepEqual(h.messages.map((m) => m.text), ["from host 0", "from host 1"], `history of ${room}`);
      }
    }),
  );

  it(
    "a wrong or missing password: corelay serve refuses to start, saying the credentials were refused, without the password",
    LIMIT,
    async () => {
      const port = ctx.cluster.nodes[2].port;
      for (const url of [`redis://:wrong-pw@127.0.0.1:${port}`, `redis://127.0.0.1:${port}`]) {
        const listen = `127.0.0.1:${await freePort()}`;
        const r = await runUntilExit(["serve", "--listen", listen, "--store", "redis", "--redis", url], { secret: ctx.secret, timeoutMs: 15000 });
        assert.ok(!r.timedOut && !r.ready && r.code !== 0, `${url}: serve exits non-zero without serving: ${JSON.stringify(r)}`);
        assert.match(r.output, /refused the credentials/, `${url}: says why`);
        assert.ok(!r.output.includes("wrong-pw") && !r.output.includes(PASSWORD), `no password in the output: ${r.output}`);
      }
    },
  );
});
