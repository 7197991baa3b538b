// Real Redis for the end-to-end tests of corelay hosts between which Redis runs: a
// standalone redis-server (startRedis), or a Redis Cluster of them (startRedisCluster),
// each node on a free loopback port in its own temporary directory, no persistence.
// Stopped (SIGKILL) by stop(), and at the latest when the test process exits. No mocks of
// Redis. Also the checks every such setup must pass, whatever Redis is under the hosts
// (crossHostChecks), so that a standalone Redis and a cluster are held to the same ones.
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { accessSync, constants, mkdtempSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { it } from "node:test";
import {
  assertOkAck,
  collect,
  connect,
  emitAck,
  expectNoEvent,
  freePort,
  guard,
  killOnExit,
  mintToken,
  sleep,
  startServer,
  waitEvent,
} from "./harness.mjs";

/** Path of Redis's program `name` (/usr/bin, /usr/local/bin, then $PATH), or null when it is not installed. */
function redisBin(name) {
  const dirs = ["/usr/bin", "/usr/local/bin", ...(process.env.PATH || "").split(":").filter(Boolean)];
  for (const dir of dirs) {
    const candidate = path.join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {}
  }
  return null;
}

/** Path of redis-server, or null when it is not installed. */
export const redisServerBin = () => redisBin("redis-server");

/** Path of redis-cli (Debian package redis-tools), or null when it is not installed: it forms clusters. */
export const redisCliBin = () => redisBin("redis-cli");

/** Whether something accepts TCP connections on 127.0.0.1:port. */
function accepts(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

/**
 * Start redis-server on a port `pickPort()` gives, with `args` on top of the defaults;
 * resolves {url, port, dir, proc, alive(), kill(), log(), stop()} once it accepts
 * connections. Tries another port when the first one was taken meanwhile. kill() SIGKILLs
 * it and keeps its directory (its log); stop() also removes the directory.
 */
async function launchRedis({ pickPort = freePort, args = [], readyTimeoutMs = 15000 } = {}) {
  const bin = redisServerBin();
  if (!bin) throw new Error("redis-server is not installed (apt-get install redis-server)");
  let lastLog = "";
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await pickPort();
    const dir = mkdtempSync(path.join(os.tmpdir(), "corelay-e2e-redis-"));
    const logfile = path.join(dir, "redis.log");
    const proc = spawn(
      bin,
      [
        "--port",
        String(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        dir,
        "--logfile",
        logfile,
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        ...args,
      ],
      { stdio: "ignore" },
    );
    killOnExit(proc);
    let exited = false;
    const gone = new Promise((r) => proc.once("exit", r));
    gone.then(() => (exited = true));
    const node = {
      url: `redis://127.0.0.1:${port}`,
      port,
      dir,
      proc,
      alive: () => !exited,
      async kill() {
        if (!exited) {
          proc.kill("SIGKILL");
          await gone;
        }
      },
      log() {
        try {
          return readFileSync(logfile, "utf8");
        } catch {
          return "";
        }
      },
      async stop() {
        await node.kill();
        rmSync(dir, { recursive: true, force: true });
      },
    };
    const end = Date.now() + readyTimeoutMs;
    while (Date.now() < end && !exited) {
      const log = node.log();
      if (log.includes("Ready to accept connections") && (await accepts(port))) return node;
      lastLog = log;
      await sleep(20);
    }
    lastLog = node.log();
    await node.stop();
  }
  throw new Error(`redis-server did not start:\n${lastLog}`);
}

/**
 * Start redis-server on a free port; resolves {url, port, stop()} once it accepts
 * connections. Tries another port when the first one was taken meanwhile.
 */
export async function startRedis({ readyTimeoutMs = 15000 } = {}) {
  const { url, port, stop } = await launchRedis({ readyTimeoutMs });
  return { url, port, stop };
}

// ---------------------------------------------------------------- a RESP client

/** One command as RESP: an array of bulk strings. */
function encode(args) {
  const parts = [Buffer.from(`*${args.length}\r\n`)];
  for (const a of args) {
    const b = Buffer.isBuffer(a) ? a : Buffer.from(String(a));
    parts.push(Buffer.from(`$${b.length}\r\n`), b, Buffer.from("\r\n"));
  }
  return Buffer.concat(parts);
}

/**
 * One RESP2 reply from buf at pos: {value, pos} (past it), or null when buf does not hold
 * all of it yet. Errors are {error: text}; bulk strings are UTF-8 strings.
 */
function decode(buf, pos) {
  const eol = buf.indexOf("\r\n", pos);
  if (eol < 0) return null;
  const type = String.fromCharCode(buf[pos]);
  const line = buf.toString("utf8", pos + 1, eol);
  const next = eol + 2;
  switch (type) {
    case "+":
      return { value: line, pos: next };
    case "-":
      return { value: { error: line }, pos: next };
    case ":":
      return { value: Number(line), pos: next };
    case "$": {
      const n = Number(line);
      if (n < 0) return { value: null, pos: next };
      if (buf.length < next + n + 2) return null;
      return { value: buf.toString("utf8", next, next + n), pos: next + n + 2 };
    }
    case "*": {
      const n = Number(line);
      if (n < 0) return { value: null, pos: next };
      const items = [];
      let p = next;
      for (let i = 0; i < n; i++) {
        const r = decode(buf, p);
        if (!r) return null;
        items.push(r.value);
        p = r.pos;
      }
      return { value: items, pos: p };
    }
    default:
      throw new Error(`unexpected RESP type ${JSON.stringify(type)}`);
  }
}

/**
 * Runs one command on 127.0.0.1:port over a fresh connection (AUTH first with `password`),
 * following no redirection: the reply; rejects with the server's error text (e.g. "MOVED
 * 12539 127.0.0.1:30007") as the Error's message, or after timeoutMs.
 */
export function redisCommand(port, args, { password = null, timeoutMs = 5000 } = {}) {
  const commands = password === null ? [args] : [["AUTH", password], args];
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, "127.0.0.1");
    let buf = Buffer.alloc(0);
    const replies = [];
    const timer = setTimeout(() => finish(new Error(`redis :${port} ${args[0]}: no reply within ${timeoutMs} ms`)), timeoutMs);
    function finish(err, value) {
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(value);
    }
    sock.on("connect", () => sock.write(Buffer.concat(commands.map(encode))));
    sock.on("error", (e) => finish(new Error(`redis :${port} ${args[0]}: ${e.message}`)));
    sock.on("data", (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      let r;
      while (replies.length < commands.length && (r = decode(buf, 0))) {
        replies.push(r.value);
        buf = buf.subarray(r.pos);
      }
      if (replies.length < commands.length) return;
      const failed = replies.find((v) => v && typeof v === "object" && "error" in v);
      if (failed) finish(Object.assign(new Error(failed.error), { redisError: true }));
      else finish(null, replies[replies.length - 1]);
    });
  });
}

// ---------------------------------------------------------------- a Redis Cluster

/** Whether 127.0.0.1:port can be bound right now. */
function bindable(port) {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.once("error", () => resolve(false));
    srv.listen(port, "127.0.0.1", () => srv.close(() => resolve(true)));
  });
}

// A cluster node's port: at most 55535, since its cluster bus listens on port + 10000.
const LOWEST_PORT = 30000;
const HIGHEST_PORT = 55535;
let nextPort = LOWEST_PORT + ((process.pid * 7919 + Date.now()) % (HIGHEST_PORT - LOWEST_PORT + 1));

/** A free port ≤ 55535 whose cluster bus port (port + 10000) is free too. */
async function freeClusterPort() {
  const span = HIGHEST_PORT - LOWEST_PORT + 1;
  for (let i = 0; i < span; i++) {
    const port = LOWEST_PORT + ((nextPort++ - LOWEST_PORT) % span);
    if ((await bindable(port)) && (await bindable(port + 10000))) return port;
  }
  throw new Error(`no free port pair (P, P+10000) with P in ${LOWEST_PORT}..${HIGHEST_PORT}`);
}

/** Runs redis-cli with args (at most timeoutMs); resolves its output, rejects with it. */
function redisCli(args, timeoutMs = 30000) {
  return new Promise((resolve, reject) => {
    execFile(redisCliBin(), args, { timeout: timeoutMs, killSignal: "SIGKILL" }, (err, stdout, stderr) => {
      if (err) reject(new Error(`redis-cli ${args.slice(0, 2).join(" ")} failed (${err.message}):\n${stdout}${stderr}`));
      else resolve(stdout + stderr);
    });
  });
}

/** One line of CLUSTER NODES: {id, port, flags, master (id or null), slots: [[from, to]]}, failed. */
function parseNodeLine(line) {
  const f = line.trim().split(/\s+/);
  if (f.length < 8) return null;
  const port = Number(f[1].split("@")[0].split(":").pop());
  const slots = f
    .slice(8)
    .filter((s) => !s.startsWith("[")) // migration marks
    .map((s) => (s.includes("-") ? s.split("-").map(Number) : [Number(s), Number(s)]));
  const flags = f[2].split(",");
  return { id: f[0], port, flags, master: f[3] === "-" ? null : f[3], slots, failed: flags.includes("fail") || flags.includes("fail?") };
}

/** The value of `field` in an INFO-style text (name:value lines). */
const infoField = (text, field) => text.split(/\r?\n/).find((l) => l.startsWith(field + ":"))?.slice(field.length + 1);

/** The id of the node serving `slot` in `view`, failed nodes left out; undefined if none. */
const ownerIn = (view, slot) => view.find((n) => !n.failed && n.slots.some(([a, b]) => a <= slot && slot <= b))?.id;

/**
 * Start a Redis Cluster: masters * (1 + replicasPerMaster) redis-server nodes
 * (`--cluster-enabled yes`, node timeout 2 s, no persistence, ports ≤ 55535 with their bus
 * ports free), formed with `redis-cli --cluster create`; resolves once every node says
 * cluster_state:ok, all agree on the slot map and every replica is in sync. With a
 * password, every node gets it as requirepass and masterauth.
 *
 * Resolves {url, urls, nodes, password, stop(), killNode(i), waitFailover(i),
 * migrateSlot(slot, toIndex, {batch, pauseMs}), slotOf(key), masterIndexForSlot(slot),
 * masters(), replicasOf(i), nodeUrl(i, {auth}), cmd(i, ...args)}. Nodes are referred to by
 * index (the order they were started in); redis-cli picks which are masters and which
 * replica follows which: ask masters() and replicasOf(i). url and urls carry no password
 * (nodeUrl(i, {auth: true}) does).
 */
export async function startRedisCluster({ masters = 3, replicasPerMaster = 1, password = null } = {}) {
  if (!redisCliBin()) throw new Error("redis-cli is not installed (apt-get install redis-tools)");
  if (masters < 3) throw new Error("a Redis Cluster needs at least 3 masters");
  const args = [
    "--cluster-enabled",
    "yes",
    "--cluster-node-timeout",
    "2000",
    "--cluster-config-file",
    "nodes.conf", // in the node's --dir
    // A replica's first sync starts at once (the default waits 5 s for others).
    "--repl-diskless-sync-delay",
    "0",
    ...(password === null ? [] : ["--requirepass", password, "--masterauth", password]),
  ];
  const nodes = [];
  const killed = new Map(); // index -> {slots, replicas} it had when killed
  const cluster = {
    nodes,
    password,
    url: null,
    urls: [],
    /** Node i's URL; with {auth: true} and a password, with the password in it. */
    nodeUrl(i, { auth = false } = {}) {
      const who = auth && password !== null ? `:${encodeURIComponent(password)}@` : "";
      return `redis://${who}127.0.0.1:${nodes[i].port}`;
    },
    /** One command on node i (authenticated), no redirection followed; rejects with the error text. */
    cmd(i, ...cmdArgs) {
      return redisCommand(nodes[i].port, cmdArgs, { password });
    },
    async stop() {
      await Promise.all(nodes.map((n) => n.stop()));
    },
    /** Node i's CLUSTER NODES, parsed. */
    async view(i) {
      return (await cluster.cmd(i, "CLUSTER", "NODES")).split("\n").map(parseNodeLine).filter(Boolean);
    },
    /** The view of the first node that runs. */
    async currentView() {
      const i = nodes.findIndex((n) => n.alive());
      if (i < 0) throw new Error("no node of the cluster runs");
      return cluster.view(i);
    },
    indexOf(id) {
      const i = nodes.findIndex((n) => n.id === id);
      if (i < 0) throw new Error(`no node has id ${id}`);
      return i;
    },
    /** The nodes serving slots now, by index. */
    async masters() {
      const view = await cluster.currentView();
      return view.filter((n) => !n.failed && n.slots.length).map((n) => cluster.indexOf(n.id)).sort((a, b) => a - b);
    },
    /** The healthy replicas of node m, by index. */
    async replicasOf(m) {
      const view = await cluster.currentView();
      return view.filter((n) => !n.failed && n.master === nodes[m].id).map((n) => cluster.indexOf(n.id)).sort((a, b) => a - b);
    },
    /** The slot of key (CLUSTER KEYSLOT: its {hash tag} if it has one). */
    async slotOf(key) {
      return cluster.cmd(nodes.findIndex((n) => n.alive()), "CLUSTER", "KEYSLOT", key);
    },
    /** The index of the node serving slot now (as the first node that runs sees it). */
    async masterIndexForSlot(slot) {
      const id = ownerIn(await cluster.currentView(), slot);
      if (id === undefined) throw new Error(`no healthy master for slot ${slot}`);
      return cluster.indexOf(id);
    },
    /** Whether replica r has everything `master` had written when asked, and is linked. */
    async inSync(r, master) {
      const written = Number(infoField(await cluster.cmd(master, "INFO", "replication"), "master_repl_offset"));
      const repl = await cluster.cmd(r, "INFO", "replication");
      const has = Number(infoField(repl, "slave_repl_offset") ?? 0);
      if (infoField(repl, "master_link_status") !== "up" || infoField(repl, "master_sync_in_progress") !== "0" || has < written) {
        return `replica ${r} is not in sync with master ${master} (offset ${has} of ${written})`;
      }
      return null;
    },
    /**
     * Why the cluster is not settled, or null: every node that runs says cluster_state:ok,
     * sees the others that run as healthy and the killed ones as failed; all have the same
     * slot map and replicas; every replica that runs is in sync with its master.
     */
    async unsettled() {
      let first = null;
      for (const [i, node] of nodes.entries()) {
        if (!node.alive()) continue;
        const info = await cluster.cmd(i, "CLUSTER", "INFO");
        if (infoField(info, "cluster_state") !== "ok") return `node ${i}: cluster_state is not ok`;
        const view = await cluster.view(i);
        for (const n of view) {
          const j = cluster.indexOf(n.id);
          if (nodes[j].alive() && (n.failed || n.flags.includes("handshake"))) return `node ${i} sees node ${j} as ${n.flags}`;
          if (!nodes[j].alive() && !n.flags.includes("fail")) return `node ${i} does not see killed node ${j} as failed yet`;
          if (n.flags.includes("myself") && n.flags.includes("slave")) {
            const why = await cluster.inSync(i, cluster.indexOf(n.master));
            if (why) return why;
          }
        }
        const healthy = view.filter((n) => !n.failed);
        const agreed = JSON.stringify({
          owners: healthy.flatMap((n) => n.slots.map(([a, b]) => [a, b, n.id])).sort((x, y) => x[0] - y[0]),
          replicas: healthy.filter((n) => n.master).map((n) => [n.id, n.master]).sort(),
        });
        if (first === null) first = { i, agreed };
        else if (first.agreed !== agreed) return `nodes ${first.i} and ${i} disagree about the slots or replicas`;
      }
      return null;
    },
    /** Waits until the cluster settled; throws after limitMs (`what` names the change). */
    async waitSettled(what, limitMs = 30000) {
      const end = Date.now() + limitMs;
      for (;;) {
        let why;
        try {
          why = await cluster.unsettled();
        } catch (e) {
          why = e.message;
        }
        if (why === null) return;
        if (Date.now() > end) throw new Error(`${what}: not settled after ${limitMs} ms: ${why}`);
        await sleep(50);
      }
    },
    /** SIGKILLs node i; for a master, remembers what it served and its replicas (for waitFailover). */
    async killNode(i) {
      const other = nodes.findIndex((n, j) => j !== i && n.alive());
      const view = other < 0 ? [] : await cluster.view(other).catch(() => []);
      const me = view.find((n) => n.id === nodes[i].id);
      killed.set(
        i,
        me && me.slots.length
          ? { slots: me.slots, replicas: view.filter((n) => n.master === me.id).map((n) => cluster.indexOf(n.id)) }
          : null,
      );
      await nodes[i].kill();
    },
    /**
     * Waits (≤ limitMs, 15 s) until a replica of the killed master `old` serves all its
     * slots and the cluster settled again; resolves the new master's index.
     */
    async waitFailover(old, limitMs = 15000) {
      const k = killed.get(old);
      if (k === undefined) throw new Error(`node ${old} was not killed with killNode`);
      if (k === null) throw new Error(`node ${old} served no slots when it was killed`);
      const end = Date.now() + limitMs;
      for (;;) {
        let why;
        try {
          const view = await cluster.currentView();
          const owners = new Set(k.slots.map(([a]) => ownerIn(view, a)));
          const [id] = owners;
          const n = id === undefined ? -1 : cluster.indexOf(id);
          if (owners.size !== 1 || !k.replicas.includes(n)) why = `slot ${k.slots[0][0]} is served by node ${n}`;
          else {
            why = await cluster.unsettled();
            if (why === null) return n;
          }
        } catch (e) {
          why = e.message;
        }
        if (Date.now() > end) throw new Error(`no failover of node ${old} (replicas ${k.replicas}) within ${limitMs} ms: ${why}`);
        await sleep(50);
      }
    },
    /**
     * Moves `slot` to master `to`, live, as redis-cli --cluster reshard would: the target
     * IMPORTING and the source MIGRATING it, its keys MIGRATEd `batch` at a time
     * (GETKEYSINSLOT), then SETSLOT … NODE on the target, the source and every other
     * master; resolves once every node agrees. `pauseMs` after the slot is opened and
     * after each batch keeps it half-moved longer, for traffic to meet. Clients see ASK
     * and TRYAGAIN meanwhile, then MOVED. Resolves {from, keys: how many it moved}.
     */
    async migrateSlot(slot, to, { batch = 10, pauseMs = 0 } = {}) {
      const from = await cluster.masterIndexForSlot(slot);
      if (from === to) return { from, keys: 0 };
      if (!(await cluster.masters()).includes(to)) throw new Error(`node ${to} is not a master`);
      await cluster.cmd(to, "CLUSTER", "SETSLOT", slot, "IMPORTING", nodes[from].id);
      await cluster.cmd(from, "CLUSTER", "SETSLOT", slot, "MIGRATING", nodes[to].id);
      if (pauseMs) await sleep(pauseMs);
      let moved = 0;
      for (;;) {
        const keys = await cluster.cmd(from, "CLUSTER", "GETKEYSINSLOT", slot, batch);
        if (keys.length === 0) break;
        const auth = password === null ? [] : ["AUTH", password];
        await cluster.cmd(from, "MIGRATE", "127.0.0.1", nodes[to].port, "", 0, 5000, ...auth, "KEYS", ...keys);
        moved += keys.length;
        if (pauseMs) await sleep(pauseMs);
      }
      const others = (await cluster.masters()).filter((m) => m !== to && m !== from);
      for (const m of [to, from, ...others]) await cluster.cmd(m, "CLUSTER", "SETSLOT", slot, "NODE", nodes[to].id);
      await cluster.waitSettled(`slot ${slot} moved to node ${to}`);
      for (const [i, n] of nodes.entries()) {
        if (!n.alive()) continue;
        const owner = ownerIn(await cluster.view(i), slot);
        if (owner !== nodes[to].id) throw new Error(`node ${i} says slot ${slot} is served by ${owner}, not node ${to}`);
      }
      return { from, keys: moved };
    },
  };
  try {
    const count = masters * (1 + replicasPerMaster);
    for (let i = 0; i < count; i++) nodes.push(await launchRedis({ pickPort: freeClusterPort, args }));
    cluster.urls = nodes.map((n) => n.url);
    cluster.url = cluster.urls[0];
    for (const [i, n] of nodes.entries()) n.id = await cluster.cmd(i, "CLUSTER", "MYID");
    await redisCli([
      "--cluster",
      "create",
      ...nodes.map((n) => `127.0.0.1:${n.port}`),
      "--cluster-replicas",
      String(replicasPerMaster),
      "--cluster-yes",
      ...(password === null ? [] : ["-a", password, "--no-auth-warning"]),
    ]);
    await cluster.waitSettled("the new cluster");
  } catch (e) {
    for (const [i, n] of nodes.entries()) process.stderr.write(`----- redis node ${i} (:${n.port}) log -----\n${n.log()}\n`);
    await cluster.stop();
    throw e;
  }
  return cluster;
}

// ---------------------------------------------------------------- corelay hosts on Redis

/** A room's offset key: its slot is the room's slot (hash tag `{room}`), channel included. */
export const roomKey = (room) => `corelay:{${room}}:offset`;

/** Environment of a corelay host for these tests: no send limits to speak of, fast Redis probes, presence TTL ttlMs. */
export const hostEnv = (ttlMs) => ({
  CORELAY_LIMITS_SEND_RATE: "10000",
  CORELAY_LIMITS_SEND_BURST: "10000",
  CORELAY_REDIS_PING_INTERVAL: "200ms",
  CORELAY_REDIS_COMMAND_TIMEOUT: "1s",
  CORELAY_PRESENCE_TTL: `${ttlMs}ms`,
});

/** One corelay host (`serve --redis URL --store redis`) per URL in redisUrls, started side by side. */
export function startHosts(redisUrls, { secret, ttlMs }) {
  return Promise.all(
    redisUrls.map((url) => startServer({ store: "redis", args: ["--redis", url], env: hostEnv(ttlMs), secret })),
  );
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/**
 * The checks three corelay hosts on Redis must pass, whatever the Redis (standalone or a
 * cluster): a message crosses hosts and not back to its sender; concurrent senders give
 * one contiguous offset sequence; many rooms at once (spread over every master of a
 * cluster), each in order, once, with the history agreeing; a member that was away
 * recovers with `join {since}` on another host; typing and presence cross hosts; a killed
 * host's user goes offline once (that one kills host 2: it runs last). Registers the
 * tests (node:test `it`) in the caller's `describe`. PROTOCOL.md "Server → client
 * events", "Guarantees"; ARCHITECTURE.md "Between hosts: Redis".
 *
 * ctx: {hosts (three started hosts, set by the caller's `before`), secret (their JWT
 * secret), ttlMs (their presence TTL), cluster (a startRedisCluster() under them, or null)}.
 */
export function crossHostChecks(ctx) {
  const T = (fn) => guard(() => ctx.hosts, fn);
  const LIMIT = { timeout: 60000 };
  const auth = (sub) => ({ token: mintToken(ctx.secret, { sub, rooms: ["*"] }) });

  /** A socket.io client of `user` on host i, joined to `rooms`. */
  async function member(i, user, ...rooms) {
    const s = await connect(ctx.hosts[i].url, { auth: auth(user) });
    for (const room of rooms) assertOkAck(await emitAck(s, "join", { room }), `${user} joins ${room} on host ${i}`);
    return s;
  }

  /** Every message of `room` in the history, as `s` (a member) reads it, page by page, oldest first. */
  async function wholeHistory(s, room) {
    const out = [];
    for (let after = 0; ; ) {
      const page = assertOkAck(await emitAck(s, "history", { room, after, limit: 100 }, 10000), `history of ${room}`);
      if (page.messages.length === 0) return out;
      out.push(...page.messages);
      after = page.messages[page.messages.length - 1].offset;
    }
  }

  it(
    "a message sent on any host reaches the members on every host and not the sender's socket",
    LIMIT,
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
    LIMIT,
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
    "thirty rooms at once (on a cluster: spread over every master): per room, every member on every host gets every message once, in offset order, and the history on every host agrees",
    LIMIT,
    T(async () => {
      const ROOMS = range(0, 29).map((n) => `many-${n}`);
      const EACH = 4; // per writer and room
      const PER_ROOM = 3 * EACH;
      if (ctx.cluster) {
        const c = ctx.cluster;
        const owners = await Promise.all(ROOMS.map(async (r) => c.masterIndexForSlot(await c.slotOf(roomKey(r)))));
        assert.deepEqual([...new Set(owners)].sort((a, b) => a - b), await c.masters(), "the rooms' slots are on every master");
      }
      const readers = await Promise.all([0, 1, 2].map((i) => member(i, `mreader${i}`, ...ROOMS)));
      const writers = await Promise.all([0, 1, 2].map((i) => member(i, `mwriter${i}`, ...ROOMS)));
      const readerLogs = readers.map((r) => collect(r, "message"));
      const writerLogs = writers.map((w) => collect(w, "message"));
      const sends = await Promise.all(
        writers.map((w, i) =>
          Promise.all(
            ROOMS.flatMap((room) =>
              range(1, EACH).map(async (n) => ({ room, n, ack: await emitAck(w, "message", { room, text: `${i}:${n}` }, 15000) })),
            ),
          ),
        ),
      );
      // Per room: offsets 1..PER_ROOM, one per message; each writer's accepted in the order sent.
      const byRoom = new Map(ROOMS.map((r) => [r, []]));
      for (const [i, list] of sends.entries()) {
        for (const { room, n, ack } of list) byRoom.get(room).push({ ...assertOkAck(ack, `writer${i}, ${room}, #${n}`), writer: i, n });
      }
      for (const [room, list] of byRoom) {
        assert.deepEqual(list.map((a) => a.offset).sort((a, b) => a - b), range(1, PER_ROOM), `${room}: one offset per message, no gap`);
        for (const w of [0, 1, 2]) {
          const offs = list.filter((a) => a.writer === w).map((a) => a.offset);
          assert.ok(offs.every((o, k) => k === 0 || o > offs[k - 1]), `${room}: writer${w}'s messages accepted in the order sent: ${offs}`);
        }
        list.sort((a, b) => a.offset - b.offset);
      }
      const want = (room, skipWriter = -1) =>
        byRoom
          .get(room)
          .filter((a) => a.writer !== skipWriter)
          .map((a) => ({ offset: a.offset, id: a.id, user: `mwriter${a.writer}`, text: `${a.writer}:${a.n}` }));
      const pick = (m) => ({ offset: m.offset, id: m.id, user: m.user, text: m.text });
      for (const [i, log] of readerLogs.entries()) {
        await log.waitFor(ROOMS.length * PER_ROOM, 20000).catch(() => {}); // what is missing is named below
        await sleep(300); // a duplicate would show up now
        const got = log.stop();
        for (const room of ROOMS) {
          assert.deepEqual(got.filter((m) => m.room === room).map(pick), want(room), `reader on host ${i}, ${room}: every message, once, in offset order`);
        }
      }
      for (const [i, log] of writerLogs.entries()) {
        await log.waitFor(ROOMS.length * (PER_ROOM - EACH), 20000).catch(() => {});
        await sleep(300);
        const got = log.stop();
        for (const room of ROOMS) {
          assert.deepEqual(got.filter((m) => m.room === room).map(pick), want(room, i), `writer on host ${i}, ${room}: the others' messages, in offset order`);
        }
      }
      for (const [i, r] of readers.entries()) {
        for (const room of ROOMS) {
          assert.deepEqual((await wholeHistory(r, room)).map(pick), want(room), `history of ${room} on host ${i}`);
        }
      }
    }),
  );

  it(
    "a member away from its rooms gets exactly what it missed through join {since} on another host; history and paging agree on every host",
    LIMIT,
    T(async () => {
      const ROOMS = range(0, 5).map((n) => `away-${n}`);
      const away = await member(0, "wanderer", ...ROOMS);
      const sender = await member(1, "asender", ...ROOMS);
      const other = await member(2, "aother", ...ROOMS);
      const seen = collect(away, "message");
      for (const room of ROOMS) {
        for (const n of [1, 2, 3]) assertOkAck(await emitAck(sender, "message", { room, text: `before ${n}` }), `${room}: before ${n}`);
      }
      await seen.waitFor(ROOMS.length * 3, 10000);
      const last = new Map();
      for (const m of seen.stop()) last.set(m.room, Math.max(last.get(m.room) ?? 0, m.offset));
      for (const room of ROOMS) assert.equal(last.get(room), 3, `${room}: the member saw offsets 1..3`);

      away.close();
      await sleep(100);
      const missed = new Map(ROOMS.map((r) => [r, []]));
      for (const room of ROOMS) {
        for (const [who, s, n] of [...range(1, 5).map((n) => ["asender", sender, n]), ...range(1, 2).map((n) => ["aother", other, n])]) {
          const text = `away ${who} ${n}`;
          const ack = assertOkAck(await emitAck(s, "message", { room, text }), `${room}: ${text}`);
          missed.get(room).push({ offset: ack.offset, id: ack.id, user: who, text });
        }
      }
      const back = await connect(ctx.hosts[2].url, { auth: auth("wanderer") });
      for (const room of ROOMS) {
        const ack = assertOkAck(await emitAck(back, "join", { room, since: last.get(room) }), `rejoin ${room}`);
        assert.equal(ack.offset, 10, `${room}: the room's latest offset`);
        assert.equal(ack.truncated, false);
        assert.deepEqual(
          ack.missed.map((m) => ({ offset: m.offset, id: m.id, user: m.user, text: m.text })),
          missed.get(room),
          `${room}: exactly what was missed, in order`,
        );
      }
      const live = waitEvent(back, "message", (m) => m.room === ROOMS[0] && m.text === "after", 5000);
      assertOkAck(await emitAck(sender, "message", { room: ROOMS[0], text: "after" }));
      assert.equal((await live).offset, 11, "live delivery resumes after the replay");

      const reader0 = await member(0, "hreader", ...ROOMS);
      for (const [i, s] of [reader0, sender, other].entries()) {
        for (const room of ROOMS) {
          const all = assertOkAck(await emitAck(s, "history", { room }), `history of ${room} on host ${i}`).messages;
          const wantOffsets = range(1, room === ROOMS[0] ? 11 : 10);
          assert.deepEqual(all.map((m) => m.offset), wantOffsets, `history of ${room} on host ${i}`);
          assert.deepEqual(all.slice(3, 10).map((m) => m.id), missed.get(room).map((m) => m.id), `history of ${room} on host ${i}: the ids`);
          const page = assertOkAck(await emitAck(s, "history", { room, after: 3, limit: 2 })).messages;
          assert.deepEqual(page.map((m) => m.offset), [4, 5], `${room} on host ${i}: after 3, limit 2`);
          const older = assertOkAck(await emitAck(s, "history", { room, before: 4 })).messages;
          assert.deepEqual(older.map((m) => m.text), ["before 1", "before 2", "before 3"], `${room} on host ${i}: before 4`);
        }
      }
    }),
  );

  it(
    "typing reaches the room's members on the other hosts, not the typer",
    LIMIT,
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
    LIMIT,
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
    LIMIT,
    T(async () => {
      const ttl = ctx.ttlMs;
      const [k0, k1] = [await member(0, "keep0", "kill"), await member(1, "keep1", "kill")];
      await member(2, "doomed", "kill");
      await sleep(300);
      const logs = [k0, k1].map((s) => collect(s, "presence"));
      const killedAt = Date.now();
      ctx.hosts[2].stopping = true; // killed on purpose: not a crash
      ctx.hosts[2].proc.kill("SIGKILL");
      // ttl, plus a refresh interval (ttl/3), plus slack.
      const bound = ttl + ttl / 3 + 1500;
      await Promise.all(logs.map((l) => l.waitFor(1, bound)));
      const took = Date.now() - killedAt;
      await sleep(ttl); // a second event would show up now
      for (const l of logs) assert.deepEqual(l.stop(), [{ room: "kill", user: "doomed", online: false }]);
      assert.ok(took <= bound, `offline after ${took} ms`);
      const q = assertOkAck(await emitAck(k0, "presence", { room: "kill" }));
      assert.deepEqual(q.users.map((u) => u.user).sort(), ["keep0", "keep1"]);
    }),
  );
}
