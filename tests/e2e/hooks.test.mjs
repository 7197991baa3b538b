// The application's backend in the loop (PROTOCOL.md, "Hooks"), with the official client
// and the example backend (examples/backend/server.mjs), so that the example cannot rot:
// connect from a cookie or the auth payload, a join denied, a publish rewritten or
// refused, an rpc event with its ack, and calls that are not signed with its secret.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import {
  REPO_ROOT,
  assertErrorAck,
  assertOkAck,
  closeAll,
  connect,
  connectError,
  emitAck,
  emitAckArgs,
  guard,
  killOnExit,
  startServer,
  waitEvent,
} from "./harness.mjs";

const HOOKS_SECRET = "e2e-hooks-secret";

/** Starts the example backend on a free port; resolves {url, lines, stop}. */
function startBackend() {
  const script = path.join(REPO_ROOT, "examples", "backend", "server.mjs");
  const proc = spawn(process.execPath, [script], {
    env: { ...process.env, PORT: "0", HOOKS_SECRET },
    stdio: ["ignore", "pipe", "inherit"],
  });
  killOnExit(proc);
  const lines = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the example backend did not start")), 5000);
    let buf = "";
    proc.stdout.setEncoding("utf8");
    proc.stdout.on("data", (chunk) => {
      buf += chunk;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        lines.push(line);
        const m = /backend listening on (\S+)/.exec(line);
        if (m) {
          clearTimeout(timer);
          resolve({ url: m[1], lines, stop: () => proc.kill("SIGTERM") });
        }
      }
    });
    proc.on("exit", (code) => reject(new Error(`the example backend exited (${code})`)));
  });
}

/** corelay's environment for every hook against `url`, signed with `secret`. */
const hooksEnv = (url, secret) => ({
  CORELAY_HOOKS_URL: url,
  CORELAY_HOOKS_SECRET: secret,
  CORELAY_HOOKS_CONNECT: "true",
  CORELAY_HOOKS_JOIN: "true",
  CORELAY_HOOKS_PUBLISH: "true",
  CORELAY_HOOKS_RPC: "true",
});

describe("hooks with the example backend", () => {
  let backend;
  let srv;
  const T = (fn) => guard(() => srv, fn);
  before(async () => {
    backend = await startBackend();
    srv = await startServer({
      env: { ...hooksEnv(backend.url, HOOKS_SECRET), CORELAY_FEED_URL: `${backend.url}/feed` },
    });
  });
  after(async () => {
    closeAll();
    if (srv) await srv.stop();
    backend?.stop();
  });

  it(
    "connect: a session cookie or the auth payload, no JWT; a banned user is refused with the backend's code",
    T(async () => {
      const bob = await connect(srv.url, { extraHeaders: { cookie: "theme=dark; session=bob" } });
      assertOkAck(await emitAck(bob, "join", { room: "lobby" }), "the backend's rooms act like the token's");
      const carol = await connect(srv.url, { auth: { session: "carol" } });
      assertOkAck(await emitAck(carol, "join", { room: "dm:carol:bob" }), "a prefix grant from the backend");
      const err = await connectError(srv.url, { auth: { session: "mallory" } });
      assert.equal(err.message, "banned");
      const none = await connectError(srv.url, {});
      assert.equal(none.message, "unauthorized");
      const seen = backend.lines.find((l) => l.startsWith("hook connect") && l.includes("session=bob"));
      assert.ok(seen, `the backend saw the cookie: ${backend.lines.join("\n")}`);
    }),
  );

  it(
    "join: the backend allows a room outside the grants, or denies it with its code",
    T(async () => {
      const bob = await connect(srv.url, { auth: { session: "bob" } });
      assertOkAck(await emitAck(bob, "join", { room: "team-core" }));
      assertErrorAck(await emitAck(bob, "join", { room: "vip-lounge" }), "members_only");
      const vip = await connect(srv.url, { auth: { session: "vipann" } });
      assertOkAck(await emitAck(vip, "join", { room: "vip-lounge" }));
    }),
  );

  it(
    "publish: a rewrite is what is stored, delivered and acked; a refusal stores nothing",
    T(async () => {
      const bob = await connect(srv.url, { auth: { session: "bob" } });
      const carol = await connect(srv.url, { auth: { session: "carol" } });
      for (const s of [bob, carol]) assertOkAck(await emitAck(s, "join", { room: "team-pub" }));
      const got = waitEvent(carol, "message", (m) => m.room === "team-pub");
      const ack = assertOkAck(await emitAck(bob, "message", { room: "team-pub", text: "darn it" }));
      assert.equal((await got).text, "d**n it");
      assertErrorAck(await emitAck(bob, "message", { room: "team-pub", text: "buy spam" }), "spam");
      const history = assertOkAck(await emitAck(bob, "history", { room: "team-pub" }));
      assert.deepEqual(
        history.messages.map((m) => [m.offset, m.text]),
        [[ack.offset, "d**n it"]],
      );
    }),
  );

  it(
    "feed: every acked message reaches the backend, signed, in offset order per room",
    T(async () => {
      const bob = await connect(srv.url, { auth: { session: "bob" } });
      assertOkAck(await emitAck(bob, "join", { room: "team-feed" }));
      const acked = [];
      for (let i = 0; i < 20; i++) {
        acked.push(assertOkAck(await emitAck(bob, "message", { room: "team-feed", text: `n${i}` })).offset);
      }
      const fed = () =>
        backend.lines
          .filter((l) => l.startsWith("feed "))
          .map((l) => JSON.parse(l.slice(5)))
          .filter((e) => e.room === "team-feed");
      const deadline = Date.now() + 10_000;
      while (fed().length < acked.length) {
        assert.ok(Date.now() < deadline, `the feed got ${fed().length} of ${acked.length}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      const events = fed();
      assert.deepEqual(events.map((e) => e.offset), acked, "each once, in offset order");
      assert.deepEqual(events.map((e) => e.text), acked.map((_, i) => `n${i}`));
      assert.ok(events.every((e) => e.type === "message" && e.user === "bob" && e.id && e.ts));
    }),
  );

  it(
    "rpc: an event that is not a chat event goes to the backend, its answer is the ack",
    T(async () => {
      const bob = await connect(srv.url, { auth: { session: "bob" } });
      const ack = await emitAckArgs(bob, "markAsRead", [{ room: "lobby", offset: 3 }]);
      assert.deepEqual(ack, { ok: true, result: { room: "lobby", offset: 3 } });
      assert.deepEqual(await emitAckArgs(bob, "whoami", []), { ok: true, result: { user: "bob" } });
      const bad = await emitAckArgs(bob, "launchRockets", []);
      assertErrorAck(bad, "unknown_rpc");
    }),
  );

  it(
    "calls signed with another secret are refused by the backend: a failure, so denied",
    T(async () => {
      const other = await startServer({ env: hooksEnv(backend.url, "not-the-backends-secret") });
      try {
        const err = await connectError(other.url, { auth: { session: "bob" } });
        assert.equal(err.message, "unauthorized");
      } finally {
        await other.stop();
      }
    }),
  );
});
