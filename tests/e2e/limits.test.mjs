// Host-protecting limits as socket.io-client sees them: connections per user
// (limits.max_connections_per_user: CONNECT_ERROR "too_many_connections") and new
// sessions per source address (limits.connect_rate_per_ip: the handshake gets 429).
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { closeAll, connect, connectError, guard, mintToken, sleep, startServer } from "./harness.mjs";

describe("connections per user", () => {
  let srv;
  const T = (fn) => guard(() => srv, fn);
  before(async () => {
    srv = await startServer({ env: { CORELAY_LIMITS_MAX_CONNECTIONS_PER_USER: "2" } });
  });
  after(async () => {
    closeAll();
    if (srv) await srv.stop();
  });

  it(
    "the third connection of a user gets too_many_connections, another user connects, a close frees a slot",
    T(async () => {
      const alice = { auth: { token: mintToken(srv.secret, { sub: "alice", rooms: ["*"] }) } };
      const a1 = await connect(srv.url, alice);
      const a2 = await connect(srv.url, { ...alice, transports: ["polling"] });
      const err = await connectError(srv.url, alice);
      assert.equal(err.message, "too_many_connections");
      const bob = await connect(srv.url, { auth: { token: mintToken(srv.secret, { sub: "bob" }) } });
      assert.equal(bob.connected, true);
      a1.close();
      let a3;
      for (let i = 0; i < 40 && !a3; i++) {
        try {
          a3 = await connect(srv.url, alice);
        } catch (e) {
          assert.equal(e.message, "too_many_connections");
          await sleep(50);
        }
      }
      assert.ok(a3?.connected, "a slot is free once a connection closed");
      a2.close();
      a3.close();
      bob.close();
    }),
  );
});

describe("new sessions per source address", () => {
  let srv;
  const T = (fn) => guard(() => srv, fn);
  before(async () => {
    srv = await startServer({
      env: { CORELAY_LIMITS_CONNECT_RATE_PER_IP: "0.5", CORELAY_LIMITS_CONNECT_BURST_PER_IP: "2" },
    });
  });
  after(async () => {
    closeAll();
    if (srv) await srv.stop();
  });

  it(
    "past the burst, the polling handshake is answered 429",
    T(async () => {
      const auth = (sub) => ({ auth: { token: mintToken(srv.secret, { sub }) } });
      await connect(srv.url, auth("u1"));
      await connect(srv.url, auth("u2"));
      const err = await connectError(srv.url, { ...auth("u3"), transports: ["polling"] });
      assert.equal(err.message, "xhr poll error");
      assert.equal(err.description, 429);
      const ws = await connectError(srv.url, auth("u4"));
      assert.equal(ws.message, "websocket error");
    }),
  );
});
