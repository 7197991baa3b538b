// End-to-end test harness for corelay: starts a real server binary, mints JWTs,
// drives official socket.io-client sockets. See /work/shared/PROTOCOL.md.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { io } from "socket.io-client";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(HERE, "..", "..");
export const BIN = process.env.CORELAY_BIN || path.join(REPO_ROOT, "target", "debug", "corelay");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The promise's value, or `fallback` after ms (the timer does not outlive the race). */
export function orTimeout(promise, ms, fallback = "timeout") {
  let timer;
  const t = new Promise((r) => (timer = setTimeout(() => r(fallback), ms)));
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

/** Error codes of PROTOCOL.md "Errors". */
export const ERROR_CODES = [
  "bad_request",
  "unauthorized",
  "forbidden",
  "not_joined",
  "too_large",
  "rate_limited",
  "unavailable",
  "internal",
];

// ---------------------------------------------------------------- ports & server

/** A free TCP port on 127.0.0.1: bind port 0, read it, close it. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const live = new Set();
process.on("exit", () => {
  for (const p of live) {
    try {
      p.kill("SIGKILL");
    } catch {}
  }
});

/** Kills the child `proc` (SIGKILL) if the test process exits while it still runs. */
export function killOnExit(proc) {
  live.add(proc);
  proc.once("exit", () => live.delete(proc));
}

/**
 * Start `corelay serve` on a free loopback port.
 * @param {object} o
 * @param {number} [o.shards=2]
 * @param {object} [o.env] extra environment (CORELAY_* overrides etc.)
 * @param {string[]} [o.args] extra command-line arguments
 * @param {string} [o.store="memory"] history store (`--store`): "redis" for a cluster host
 * @param {string|null} [o.secret] JWT secret; null = dev mode (no CORELAY_JWT_SECRET)
 * @param {number} [o.readyTimeoutMs=15000]
 */
export async function startServer({
  shards = 2,
  env = {},
  args = [],
  store = "memory",
  secret,
  readyTimeoutMs = 15000,
} = {}) {
  if (!existsSync(BIN)) throw new Error(`corelay binary not found at ${BIN} (set CORELAY_BIN or build it)`);
  if (secret === undefined) secret = "e2e-secret-" + randomBytes(12).toString("hex");
  let lastErr;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    try {
      return await spawnServer({ port, shards, env, args, store, secret, readyTimeoutMs });
    } catch (e) {
      lastErr = e;
      // Only retry when another process grabbed the port between our probe and the bind.
      if (!/in use|EADDRINUSE|address already/i.test(String(e.output || e.message))) throw e;
    }
  }
  throw lastErr;
}

/** The server's environment: hermetic (no inherited CORELAY_* / REDIS_*), RUST_LOG=warn. */
function serverEnv(env, secret) {
  const out = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith("CORELAY_") || k.startsWith("REDIS_")) continue;
    out[k] = v;
  }
  Object.assign(out, { RUST_LOG: "warn" }, env);
  if (secret !== null) out.CORELAY_JWT_SECRET = secret;
  return out;
}

function spawnServer({ port, shards, env, args, store, secret, readyTimeoutMs }) {
  const cwd = mkdtempSync(path.join(os.tmpdir(), "corelay-e2e-"));
  const fullEnv = serverEnv(env, secret);
  const argv = [
    "serve",
    "--listen",
    `127.0.0.1:${port}`,
    "--shards",
    String(shards),
    "--store",
    store,
    ...args,
  ];
  const proc = spawn(BIN, argv, { cwd, env: fullEnv, stdio: ["ignore", "pipe", "pipe"] });
  killOnExit(proc);
  const lines = [];
  const url = `http://127.0.0.1:${port}`;
  const server = {
    url,
    port,
    secret,
    proc,
    argv,
    lines,
    exited: null, // {code, signal} once the process is gone
    stopping: false,
    output() {
      return lines.join("\n");
    },
    /** The server died without being asked to stop. */
    crashed() {
      return this.exited && !this.stopping ? this.exited : null;
    },
    dump(label = "") {
      const tail = lines.slice(-300);
      process.stderr.write(
        `\n----- corelay output${label ? " (" + label + ")" : ""}: ${BIN} ${argv.join(" ")}` +
          `${this.exited ? ` [exited code=${this.exited.code} signal=${this.exited.signal}]` : ""} -----\n` +
          (tail.length < lines.length ? `... ${lines.length - tail.length} earlier lines omitted\n` : "") +
          tail.join("\n") +
          "\n----- end corelay output -----\n",
      );
    },
    async stop() {
      this.stopping = true;
      if (!this.exited) {
        proc.kill("SIGTERM");
        let timer;
        const done = await Promise.race([
          exitP.then(() => true),
          new Promise((r) => (timer = setTimeout(() => r(false), 5000))),
        ]);
        clearTimeout(timer);
        if (!done) {
          lines.push("[harness] server did not exit within 5 s of SIGTERM: SIGKILL");
          proc.kill("SIGKILL");
          await exitP;
        }
      }
      rmSync(cwd, { recursive: true, force: true });
      return this.exited;
    },
  };
  const exitP = new Promise((resolve) => {
    proc.on("exit", (code, signal) => {
      server.exited = { code, signal };
      lines.push(`[harness] process exited code=${code} signal=${signal}`);
      resolve(server.exited);
    });
  });

  return new Promise((resolve, reject) => {
    let ready = false;
    const timer = setTimeout(() => {
      fail(new Error(`corelay did not log "listening on" within ${readyTimeoutMs} ms`));
    }, readyTimeoutMs);
    function fail(err) {
      if (ready) return;
      ready = true;
      clearTimeout(timer);
      err.output = server.output();
      err.message += `\n--- output ---\n${err.output}`;
      server.stop().finally(() => reject(err));
    }
    for (const [name, stream] of [
      ["stdout", proc.stdout],
      ["stderr", proc.stderr],
    ]) {
      let buf = "";
      stream.setEncoding("utf8");
      stream.on("data", (chunk) => {
        buf += chunk;
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          lines.push(`[${name}] ${line}`);
          if (!ready && line.includes("listening on")) {
            ready = true;
            clearTimeout(timer);
            resolve(server);
          }
        }
      });
    }
    proc.on("error", (e) => fail(e));
    exitP.then((x) => fail(new Error(`corelay exited before it was ready (code=${x.code} signal=${x.signal})`)));
  });
}

/**
 * Run the binary with exactly `argv` and wait (≤ timeoutMs) for it to exit on its own.
 * Resolves {code, signal, output, ready} where ready says whether it logged "listening on";
 * a process still running at the deadline is killed and reported with code null.
 */
export function runUntilExit(argv, { env = {}, secret = null, timeoutMs = 5000 } = {}) {
  const cwd = mkdtempSync(path.join(os.tmpdir(), "corelay-e2e-"));
  const fullEnv = serverEnv(env, secret);
  const proc = spawn(BIN, argv, { cwd, env: fullEnv, stdio: ["ignore", "pipe", "pipe"] });
  killOnExit(proc);
  let output = "";
  proc.stdout.setEncoding("utf8").on("data", (c) => (output += c));
  proc.stderr.setEncoding("utf8").on("data", (c) => (output += c));
  return new Promise((resolve) => {
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      proc.kill("SIGKILL");
    }, timeoutMs);
    proc.on("exit", (code, signal) => {
      clearTimeout(timer);
      rmSync(cwd, { recursive: true, force: true });
      resolve({
        code: timedOut ? null : code,
        signal: timedOut ? null : signal,
        timedOut,
        output,
        ready: output.includes("listening on"),
      });
    });
  });
}

/**
 * Wrap a test body so that the server output is printed when it fails, and a test
 * fails if the server died under it.  Usage: it("…", guard(() => srv, async (t) => {…}))
 */
export function guard(getServer, fn) {
  return async (t) => {
    const servers = () => [].concat(getServer() || []);
    try {
      await fn(t);
      for (const s of servers()) {
        const c = s.crashed();
        if (c) throw new Error(`corelay exited during the test (code=${c.code} signal=${c.signal})`);
      }
    } catch (e) {
      for (const s of servers()) s.dump(t?.name);
      throw e;
    }
  };
}

// ---------------------------------------------------------------- JWT

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/**
 * Mint a JWT by hand.  Claims are passed through (sub, name, rooms, room, exp, …);
 * exp defaults to now + 1 h (pass exp: null to leave it out).
 * opts.alg: "HS256" (default), "HS384", "HS512" or "none"; opts.header: extra header fields
 * (e.g. {alg: "HS512"} to lie about the algorithm while signing with opts.alg).
 */
export function mintToken(secret, claims = {}, opts = {}) {
  const alg = opts.alg || "HS256";
  const now = Math.floor(Date.now() / 1000);
  const payload = { iat: now, ...claims };
  if (claims.exp === undefined) payload.exp = now + 3600;
  if (claims.exp === null) delete payload.exp;
  const header = { alg, typ: "JWT", ...(opts.header || {}) };
  const signingInput = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(payload))}`;
  if (alg === "none") return `${signingInput}.`;
  const hash = { HS256: "sha256", HS384: "sha384", HS512: "sha512" }[alg];
  if (!hash) throw new Error(`unsupported alg ${alg}`);
  const sig = createHmac(hash, secret).update(signingInput).digest();
  return `${signingInput}.${b64url(sig)}`;
}

// ---------------------------------------------------------------- sockets

const openSockets = new Set();

/**
 * Connect a socket.io client over WebSocket.  Resolves with the connected socket,
 * rejects with the connect_error (err.message is the server's CONNECT_ERROR message).
 */
export function connect(url, opts = {}, timeoutMs = 5000) {
  const socket = io(url, { transports: ["websocket"], reconnection: false, forceNew: true, timeout: timeoutMs, ...opts });
  openSockets.add(socket);
  socket.on("disconnect", () => openSockets.delete(socket));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      socket.close();
      openSockets.delete(socket);
      reject(new Error(`connect timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    const onConnect = () => {
      cleanup();
      resolve(socket);
    };
    const onError = (err) => {
      cleanup();
      socket.close();
      openSockets.delete(socket);
      reject(err);
    };
    function cleanup() {
      clearTimeout(timer);
      socket.off("connect", onConnect);
      socket.off("connect_error", onError);
    }
    socket.on("connect", onConnect);
    socket.on("connect_error", onError);
  });
}

/** Expect a connection attempt to be refused; resolves with the connect_error. */
export async function connectError(url, opts = {}, timeoutMs = 5000) {
  let socket;
  try {
    socket = await connect(url, opts, timeoutMs);
  } catch (err) {
    return err;
  }
  socket.close();
  throw new Error(`expected connect_error, but the socket connected (id ${socket.id})`);
}

export function closeAll() {
  for (const s of openSockets) s.close();
  openSockets.clear();
}

/** Promise of the ack of `event` (one argument). */
export function emitAck(socket, event, payload, timeoutMs = 3000) {
  return socket.timeout(timeoutMs).emitWithAck(event, payload);
}

/** Promise of the ack of `event` with an arbitrary argument list (possibly empty). */
export function emitAckArgs(socket, event, args, timeoutMs = 3000) {
  return socket.timeout(timeoutMs).emitWithAck(event, ...args);
}

/** First `event` whose first argument satisfies predicate. */
export function waitEvent(socket, event, predicate = () => true, timeoutMs = 3000) {
  const p = new Promise((resolve, reject) => {
    const seen = [];
    const handler = (payload) => {
      seen.push(payload);
      let ok;
      try {
        ok = predicate(payload);
      } catch {
        ok = false;
      }
      if (ok) {
        clearTimeout(timer);
        socket.off(event, handler);
        resolve(payload);
      }
    };
    const timer = setTimeout(() => {
      socket.off(event, handler);
      reject(
        new Error(
          `timed out after ${timeoutMs} ms waiting for "${event}"` +
            (seen.length ? `; saw non-matching: ${JSON.stringify(seen).slice(0, 800)}` : "; none received"),
        ),
      );
    }, timeoutMs);
    socket.on(event, handler);
  });
  p.catch(() => {}); // a test that fails before awaiting it must not leave an unhandled rejection
  return p;
}

/** Record every `event` payload a socket receives from now on. */
export function collect(socket, event) {
  const items = [];
  const handler = (payload) => items.push(payload);
  socket.on(event, handler);
  return {
    items,
    stop() {
      socket.off(event, handler);
      return items;
    },
    /** Wait until at least n items arrived. */
    async waitFor(n, timeoutMs = 5000) {
      const end = Date.now() + timeoutMs;
      while (items.length < n) {
        if (Date.now() > end)
          throw new Error(`only ${items.length}/${n} "${event}" events within ${timeoutMs} ms`);
        await sleep(10);
      }
      return items;
    },
  };
}

/** Assert that no matching `event` arrives within ms. */
export async function expectNoEvent(socket, event, predicate = () => true, ms = 300) {
  const c = collect(socket, event);
  await sleep(ms);
  const got = c.stop().filter((p) => {
    try {
      return predicate(p);
    } catch {
      return false;
    }
  });
  if (got.length) throw new Error(`unexpected "${event}" event(s): ${JSON.stringify(got).slice(0, 800)}`);
}

// ---------------------------------------------------------------- HTTP

/** GET a path; resolves {status, headers, body} without keep-alive. */
export function httpGet(url, pathName, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.get(`${url}${pathName}`, { agent: false, headers: { connection: "close", ...headers } }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (c) => (body += c));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body }));
    });
    req.setTimeout(3000, () => req.destroy(new Error(`GET ${pathName} timed out`)));
    req.on("error", reject);
  });
}

/** GET /healthz as JSON. */
export async function health(url) {
  const r = await httpGet(url, "/healthz");
  try {
    const j = JSON.parse(r.body);
    Object.defineProperty(j, "httpStatus", { value: r.status, enumerable: false });
    return j;
  } catch {
    throw new Error(`/healthz returned ${r.status} with non-JSON body: ${r.body.slice(0, 300)}`);
  }
}

/** Map shard index -> connection count from /healthz. */
export async function shardCounts(url) {
  const h = await health(url);
  if (!Array.isArray(h.shards)) throw new Error(`/healthz has no shards array: ${JSON.stringify(h)}`);
  const m = new Map();
  for (const s of h.shards) m.set(s.shard, s.connections);
  return m;
}

const sameCounts = (a, b) => a.size === b.size && [...a].every(([k, v]) => b.get(k) === v);

/** Shard counts once two reads 50 ms apart agree (closes still in flight have landed). */
async function stableShardCounts(url) {
  let prev = await shardCounts(url);
  for (let i = 0; i < 40; i++) {
    await sleep(50);
    const cur = await shardCounts(url);
    if (sameCounts(prev, cur)) return cur;
    prev = cur;
  }
  return prev;
}

/**
 * Connect and find out which shard took the connection, by diffing /healthz
 * connection counts before and after.  Resolves {socket, shard}.
 */
export async function connectAndLocate(url, opts) {
  const before = await stableShardCounts(url);
  const socket = await connect(url, opts);
  const end = Date.now() + 2000;
  for (;;) {
    const after = await shardCounts(url);
    const rose = [...after.keys()].filter((k) => (after.get(k) ?? 0) > (before.get(k) ?? 0));
    if (rose.length === 1) return { socket, shard: rose[0] };
    if (Date.now() > end) {
      socket.close();
      throw new Error(
        `could not tell which shard took the connection: before ${JSON.stringify([...before])} after ${JSON.stringify([...after])}`,
      );
    }
    await sleep(20);
  }
}

/**
 * Connect until a socket lands on `shard`.  Sockets that land elsewhere are kept open
 * until the end (so the /healthz diff stays unambiguous), then closed.
 */
export async function connectOnShard(url, opts, shard, tries = 40) {
  const extras = [];
  try {
    for (let i = 0; i < tries; i++) {
      const { socket, shard: s } = await connectAndLocate(url, opts);
      if (s === shard) return socket;
      extras.push(socket);
    }
    throw new Error(`no connection landed on shard ${shard} in ${tries} tries`);
  } finally {
    await closeAndSettle(url, extras);
  }
}

/**
 * Get one socket on each of two different shards.  authFor(i) gives the `auth` for the
 * i-th socket (i = 0, 1), e.g. i => ({token: tokens[i]}).  Resolves
 * [{socket, shard}, {socket, shard}] in authFor order, with different shards.
 */
export async function connectOnEachShard(url, authFor, tries = 40) {
  const first = await connectAndLocate(url, { auth: authFor(0) });
  const extras = [];
  try {
    for (let i = 0; i < tries; i++) {
      const r = await connectAndLocate(url, { auth: authFor(1) });
      if (r.shard !== first.shard) return [first, r];
      extras.push(r.socket);
    }
    first.socket.close();
    throw new Error(`no second connection landed on a shard other than ${first.shard} in ${tries} tries`);
  } finally {
    await closeAndSettle(url, extras);
  }
}

/** Close sockets and wait (≤2 s) until /healthz no longer counts them. */
async function closeAndSettle(url, sockets) {
  if (!sockets.length) return;
  const before = (await health(url)).connections;
  for (const s of sockets) s.close();
  const end = Date.now() + 2000;
  while (Date.now() < end) {
    const now = (await health(url)).connections;
    if (now <= before - sockets.length) return;
    await sleep(20);
  }
}

// ---------------------------------------------------------------- assertions helpers

/**
 * Assert an error ack {ok:false, error:{code, message:string}}; `code` may be a string
 * or an array of acceptable codes.
 */
export function assertErrorAck(ack, code, what = "") {
  const codes = [].concat(code ?? ERROR_CODES);
  const shape = {
    ok: ack?.ok,
    codeOk: codes.includes(ack?.error?.code),
    messageIsString: typeof ack?.error?.message === "string",
  };
  assert.deepStrictEqual(
    shape,
    { ok: false, codeOk: true, messageIsString: true },
    `${what ? what + ": " : ""}expected error ack with code ${codes.join("|")}, got ${JSON.stringify(ack)}`,
  );
}

/** Assert a success ack ({ok:true,…}) and return it. */
export function assertOkAck(ack, what = "") {
  assert.ok(ack && ack.ok === true, `${what ? what + ": " : ""}expected {ok:true,…}, got ${JSON.stringify(ack)}`);
  return ack;
}
