// Identity: JWT checks on CONNECT, the rooms claim, room tokens, dev mode.
// PROTOCOL.md "Identity".
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  assertErrorAck,
  assertOkAck,
  closeAll,
  connect,
  connectError,
  emitAck,
  freePort,
  guard,
  mintToken,
  runUntilExit,
  startServer,
  waitEvent,
} from "./harness.mjs";

const now = () => Math.floor(Date.now() / 1000);

async function expectUnauthorized(url, opts, what) {
  const err = await connectError(url, opts);
  assert.equal(err.message, "unauthorized", `${what}: connect_error message, got ${JSON.stringify(err.message)}`);
}

describe("auth with a JWT secret", () => {
  let srv;
  const T = (fn) => guard(() => srv, fn);
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    closeAll();
    if (srv) await srv.stop();
  });

  it(
    "a valid HS256 token connects",
    T(async () => {
      const s = await connect(srv.url, { auth: { token: mintToken(srv.secret, { sub: "alice", rooms: ["*"] }) } });
      assert.equal(s.connected, true);
      assert.equal(typeof s.id, "string");
      // and the identity is the sub: another member sees it as the message's user
      const b = await connect(srv.url, { auth: { token: mintToken(srv.secret, { sub: "bob", rooms: ["*"] }) } });
      assertOkAck(await emitAck(s, "join", { room: "auth-1" }));
      assertOkAck(await emitAck(b, "join", { room: "auth-1" }));
      const got = waitEvent(b, "message");
      assertOkAck(await emitAck(s, "message", { room: "auth-1", text: "hi" }));
      assert.equal((await got).user, "alice");
      s.close();
      b.close();
    }),
  );

  it(
    "a token without exp is accepted (only sub is required)",
    T(async () => {
      const noExp = await connect(srv.url, { auth: { token: mintToken(srv.secret, { sub: "carol", exp: null }) } });
      assert.equal(noExp.connected, true);
      noExp.close();
    }),
  );

  it(
    "bad signature, expired, missing token, tampered alg, bad sub: connect_error \"unauthorized\"",
    T(async () => {
      const u = srv.url;
      const good = { sub: "alice", rooms: ["*"] };
      await expectUnauthorized(u, { auth: { token: mintToken("not-the-secret", good) } }, "bad signature");
      const valid = mintToken(srv.secret, good);
      const [h, p, sig] = valid.split(".");
      const forgedPayload = Buffer.from(JSON.stringify({ sub: "mallory", rooms: ["*"], exp: now() + 3600 })).toString("base64url");
      await expectUnauthorized(u, { auth: { token: `${h}.${forgedPayload}.${sig}` } }, "payload swapped under a valid signature");
      await expectUnauthorized(u, { auth: { token: `${h}.${p}.` } }, "signature stripped");
      await expectUnauthorized(u, { auth: { token: mintToken(srv.secret, { ...good, exp: now() - 3600 }) } }, "expired");
      await expectUnauthorized(u, { auth: {} }, "no token");
      await expectUnauthorized(u, {}, "no auth at all");
      await expectUnauthorized(u, { auth: { token: "" } }, "empty token");
      await expectUnauthorized(u, { auth: { token: "not.a.jwt" } }, "garbage token");
      await expectUnauthorized(u, { auth: { token: 42 } }, "token of the wrong type");
      await expectUnauthorized(u, { auth: { token: mintToken(srv.secret, good, { alg: "none" }) } }, "alg none");
      await expectUnauthorized(u, { auth: { token: mintToken(srv.secret, good, { alg: "HS512" }) } }, "alg HS512 (correctly signed)");
      await expectUnauthorized(u, { auth: { token: mintToken(srv.secret, good, { alg: "HS384" }) } }, "alg HS384 (correctly signed)");
      await expectUnauthorized(
        u,
        { auth: { token: mintToken(srv.secret, good, { header: { alg: "HS512" } }) } },
        "header says HS512, signed HS256",
      );
      await expectUnauthorized(u, { auth: { token: mintToken(srv.secret, { rooms: ["*"] }) } }, "missing sub");
      await expectUnauthorized(u, { auth: { token: mintToken(srv.secret, { sub: "" }) } }, "empty sub");
      await expectUnauthorized(u, { auth: { token: mintToken(srv.secret, { sub: "x".repeat(129) }) } }, "sub of 129 bytes");
      await expectUnauthorized(u, { auth: { token: mintToken(srv.secret, { sub: 7 }) } }, "numeric sub");
      // the boundary: 128 bytes is fine
      const ok = await connect(u, { auth: { token: mintToken(srv.secret, { sub: "x".repeat(128) }) } });
      assert.equal(ok.connected, true);
      ok.close();
      // dev-mode identity is not accepted when a secret is configured
      await expectUnauthorized(u, { auth: { user: "alice" } }, "dev-mode auth with a secret configured");
    }),
  );

  it(
    "rooms claim: prefix and exact entries admit, others are forbidden",
    T(async () => {
      const s = await connect(srv.url, {
        auth: { token: mintToken(srv.secret, { sub: "alice", rooms: ["team-*", "exact"] }) },
      });
      const j = await emitAck(s, "join", { room: "team-1" });
      assertOkAck(j, "team-1");
      assert.equal(j.room, "team-1");
      assertOkAck(await emitAck(s, "join", { room: "team-42.b" }), "team-42.b");
      assertOkAck(await emitAck(s, "join", { room: "exact" }), "exact");
      for (const room of ["other", "team", "exact2", "xteam-1"]) {
        const r = await emitAck(s, "join", { room });
        assertErrorAck(r, "forbidden", `join ${room}`);
        // and the forbidden join did not make it a member
        assertErrorAck(await emitAck(s, "message", { room, text: "x" }), "not_joined", `send to ${room}`);
      }
      // a token without a rooms claim admits no room by itself
      const n = await connect(srv.url, { auth: { token: mintToken(srv.secret, { sub: "norooms" }) } });
      assertErrorAck(await emitAck(n, "join", { room: "team-1" }), "forbidden", "no rooms claim");
      // "*" admits every room
      const all = await connect(srv.url, { auth: { token: mintToken(srv.secret, { sub: "root", rooms: ["*"] }) } });
      assertOkAck(await emitAck(all, "join", { room: "other" }));
      assertOkAck(await emitAck(all, "join", { room: "anything:at_all@x" }));
      s.close();
      n.close();
      all.close();
    }),
  );

  it(
    "room tokens: the right one admits, any other is forbidden",
    T(async () => {
      const s = await connect(srv.url, { auth: { token: mintToken(srv.secret, { sub: "alice", rooms: ["team-*"] }) } });
      const bad = [
        ["a token for another room", mintToken(srv.secret, { sub: "alice", room: "elsewhere" })],
        ["a token for another user", mintToken(srv.secret, { sub: "mallory", room: "other" })],
        ["a token with a bad signature", mintToken("wrong-secret", { sub: "alice", room: "other" })],
        ["an expired token", mintToken(srv.secret, { sub: "alice", room: "other", exp: now() - 3600 })],
        ["a token without room", mintToken(srv.secret, { sub: "alice" })],
        ["alg none", mintToken(srv.secret, { sub: "alice", room: "other" }, { alg: "none" })],
        ["garbage", "garbage"],
      ];
      for (const [what, token] of bad) {
        assertErrorAck(await emitAck(s, "join", { room: "other", token }), "forbidden", what);
      }
      const j = await emitAck(s, "join", { room: "other", token: mintToken(srv.secret, { sub: "alice", room: "other" }) });
      assertOkAck(j, "room token");
      assert.equal(j.room, "other");
      assert.equal(j.offset, 0);
      // it is a real membership: the user can send there
      assertOkAck(await emitAck(s, "message", { room: "other", text: "in via room token" }));
      // a room token admits a user whose access token has no rooms claim at all
      const n = await connect(srv.url, { auth: { token: mintToken(srv.secret, { sub: "norooms" }) } });
      assertOkAck(await emitAck(n, "join", { room: "private-1", token: mintToken(srv.secret, { sub: "norooms", room: "private-1" }) }));
      s.close();
      n.close();
    }),
  );
});

describe("auth in dev mode (no secret)", () => {
  let dev;
  const T = (fn) => guard(() => dev, fn);
  before(async () => {
    dev = await startServer({ secret: null });
  });
  after(async () => {
    closeAll();
    if (dev) await dev.stop();
  });

  it(
    "auth {user} connects and may join any room; no user is unauthorized",
    T(async () => {
      const a = await connect(dev.url, { auth: { user: "alice" } });
      const b = await connect(dev.url, { auth: { user: "bob" } });
      assertOkAck(await emitAck(a, "join", { room: "any-room" }));
      assertOkAck(await emitAck(b, "join", { room: "any-room" }));
      const got = waitEvent(b, "message");
      assertOkAck(await emitAck(a, "message", { room: "any-room", text: "dev" }));
      const m = await got;
      assert.equal(m.user, "alice", "the identity is auth.user");
      await expectUnauthorized(dev.url, { auth: {} }, "dev mode without user");
      await expectUnauthorized(dev.url, {}, "dev mode without auth");
      a.close();
      b.close();
    }),
  );

  it(
    "dev mode refuses to start on a non-loopback address",
    T(async () => {
      const port = await freePort();
      const r = await runUntilExit(["serve", "--listen", `0.0.0.0:${port}`, "--shards", "1", "--store", "memory"]);
      assert.equal(r.timedOut, false, `still running after 5 s; output:\n${r.output}`);
      assert.equal(r.ready, false, `it must not serve; output:\n${r.output}`);
      assert.notEqual(r.code, 0, `exit code; output:\n${r.output}`);
      assert.ok(r.output.trim().length > 0, "it explains why");
      // the same with a secret starts fine (so the refusal above is about dev mode)
      const withSecret = await runUntilExit(["serve", "--listen", `0.0.0.0:${port}`, "--shards", "1", "--store", "memory"], {
        secret: "a-long-enough-test-secret-0123456789",
        timeoutMs: 1500,
      });
      assert.equal(withSecret.ready, true, `with a secret it serves on 0.0.0.0; output:\n${withSecret.output}`);
    }),
  );

  it(
    "dev mode logs a warning at start",
    T(async () => {
      const lines = dev.output().split("\n");
      assert.ok(
        lines.some((l) => /warn/i.test(l) && /dev|secret|jwt|auth|insecure/i.test(l)),
        "a warning about dev mode is logged at start (RUST_LOG=warn)",
      );
    }),
  );
});
