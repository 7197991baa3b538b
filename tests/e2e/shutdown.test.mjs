// Shutdown: SIGTERM closes the transports (WebSocket close 1012), never sends `41`, so
// socket.io-client sees "transport close" and would reconnect.  PROTOCOL.md "Wire".
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  assertOkAck,
  closeAll,
  connectOnEachShard,
  emitAck,
  guard,
  mintToken,
  orTimeout,
  sleep,
  startServer,
} from "./harness.mjs";

let srv;
const T = (fn) => guard(() => srv, fn);

describe("shutdown", () => {
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    closeAll();
    if (srv) await srv.stop();
  });

  it(
    "SIGTERM: every client gets a transport close (code 1012), not a server disconnect, and the process exits",
    T(async () => {
      const auth = (sub) => ({ token: mintToken(srv.secret, { sub, rooms: ["*"] }) });
      const pair = await connectOnEachShard(srv.url, (i) => auth(i ? "bob" : "alice"));
      const closes = pair.map(
        ({ socket }) =>
          new Promise((resolve) => socket.on("disconnect", (reason, details) => resolve({ reason, code: details?.context?.code }))),
      );
      for (const { socket } of pair) assertOkAck(await emitAck(socket, "join", { room: "bye" }));

      srv.stopping = true; // the exit below is expected
      const t0 = Date.now();
      srv.proc.kill("SIGTERM");
      const results = await orTimeout(Promise.all(closes), 5000, closes.map(() => "timeout"));
      for (const [i, got] of results.entries()) {
        assert.notEqual(got, "timeout", `client ${i} was not disconnected within 5 s of SIGTERM`);
        assert.equal(got.reason, "transport close", `client ${i}: the transport is closed, no 41 is sent`);
        assert.equal(got.code, 1012, `client ${i}: WebSocket close code`);
      }
      while (!srv.exited && Date.now() - t0 < 5000) await sleep(20);
      assert.ok(srv.exited, "the server exits within 5 s of SIGTERM");
      assert.deepEqual(srv.exited, { code: 0, signal: null }, "a clean exit after SIGTERM");
    }),
  );
});
