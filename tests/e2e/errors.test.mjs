// Every error code a socket.io client can reach, and the connection survives them all.
// PROTOCOL.md "Client → server events", "message rules", "Errors".
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import http from "node:http";
import { after, before, describe, it } from "node:test";
import {
  assertErrorAck,
  assertOkAck,
  closeAll,
  connect,
  connectError,
  emitAck,
  emitAckArgs,
  guard,
  httpGet,
  mintToken,
  orTimeout,
  sleep,
  startServer,
  waitEvent,
} from "./harness.mjs";

let srv;
const T = (fn) => guard(() => srv, fn);
const SEND_RATE = 5; // messages per second, per the server's env below
const token = (sub, rooms = ["*"]) => mintToken(srv.secret, { sub, rooms });

/** A raw WebSocket upgrade request; resolves {status, body} (101 on upgrade). */
function upgradeRequest(url, pathName) {
  return new Promise((resolve, reject) => {
    const req = http.request(`${url}${pathName}`, {
      agent: false,
      headers: {
        Connection: "Upgrade",
        Upgrade: "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": randomBytes(16).toString("base64"),
      },
    });
    req.setTimeout(3000, () => req.destroy(new Error("upgrade request timed out")));
    req.on("upgrade", (res, socket) => {
      socket.destroy();
      resolve({ status: res.statusCode, body: "" });
    });
    req.on("response", (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (c) => (body += c));
      res.on("end", () => resolve({ status: res.statusCode, body }));
    });
    req.on("error", reject);
    req.end();
  });
}

// eve collects the errors; her sends are paced below the rate limit so that every
// error below is the one under test and never rate_limited.
let E;
const eveDisconnects = [];
// (The rate limit may cover history and typing as well as messages; eve paces those too.)
let lastEveSend = 0;
async function evePaced(event, payload) {
  const wait = lastEveSend + 1000 / SEND_RATE + 40 - Date.now();
  if (wait > 0) await sleep(wait);
  lastEveSend = Date.now();
  return emitAck(E, event, payload);
}
const eveSend = (payload) => evePaced("message", payload);

describe("errors", () => {
  before(async () => {
    srv = await startServer({
      env: { CORELAY_LIMITS_SEND_RATE: String(SEND_RATE), CORELAY_LIMITS_SEND_BURST: "5" },
    });
    E = await connect(srv.url, { auth: { token: token("eve") } });
    E.on("disconnect", (reason) => eveDisconnects.push(reason));
  });
  after(async () => {
    closeAll();
    if (srv) await srv.stop();
  });

  it(
    "not_joined: message, history and presence before join",
    T(async () => {
      assertErrorAck(await eveSend({ room: "e-main", text: "too early" }), "not_joined", "message");
      assertErrorAck(await evePaced("history", { room: "e-main" }), "not_joined", "history");
      assertErrorAck(await emitAck(E, "presence", { room: "e-main" }), "not_joined", "presence");
      assertOkAck(await emitAck(E, "join", { room: "e-main" }));
    }),
  );

  it(
    "bad_request: malformed join/leave/history/presence payloads and room names",
    T(async () => {
      const bad = async (event, payload, what) =>
        assertErrorAck(
          await (event === "history" ? evePaced(event, payload) : emitAck(E, event, payload)),
          "bad_request",
          `${event} ${what}`,
        );
      await bad("join", {}, "missing room");
      await bad("join", { room: 5 }, "numeric room");
      await bad("join", "e-main", "payload not an object");
      await bad("join", null, "null payload");
      assertErrorAck(await emitAckArgs(E, "join", []), "bad_request", "join without arguments");
      await bad("join", { room: "bad room!" }, "room 'bad room!'");
      await bad("join", { room: "" }, "empty room");
      await bad("join", { room: "a/b" }, "room with '/'");
      await bad("join", { room: "café" }, "non-ASCII room");
      await bad("join", { room: "r".repeat(129) }, "room of 129 bytes");
      await bad("join", { room: "e-main", since: "abc" }, "since not a number");
      await bad("leave", {}, "missing room");
      await bad("presence", {}, "missing room");
      await bad("history", {}, "missing room");
      await bad("history", { room: "e-main", before: 10, after: 2 }, "both before and after");
      await bad("history", { room: "e-main", limit: 0 }, "limit 0");
      await bad("history", { room: "e-main", limit: -3 }, "limit -3");
      await bad("history", { room: "e-main", limit: "ten" }, "limit not a number");
      // valid names at the edges are accepted
      const long = "r".repeat(128);
      const j = await emitAck(E, "join", { room: long });
      assertOkAck(j, "room of 128 bytes");
      assert.equal(j.room, long);
      assertOkAck(await emitAck(E, "join", { room: "Az09_.:@-" }), "every allowed character");
      assertOkAck(await evePaced("history", { room: "e-main", limit: 1 }), "limit 1");
      assertOkAck(await evePaced("history", { room: "e-main", limit: 101 }), "limit 101 is capped, not refused");
    }),
  );

  it(
    "bad_request: malformed message payloads and cids (1–64 bytes)",
    T(async () => {
      const bad = async (payload, what) => assertErrorAck(await eveSend(payload), "bad_request", `message ${what}`);
      await bad({ text: "no room" }, "missing room");
      await bad({ room: 5, text: "x" }, "numeric room");
      await bad({ room: "e-main" }, "missing text");
      await bad({ room: "e-main", text: 12 }, "numeric text");
      await bad({ room: "e-main", text: "x", cid: "c".repeat(65) }, "cid of 65 bytes");
      await bad({ room: "e-main", text: "x", cid: "é".repeat(33) }, "cid of 33 chars / 66 bytes");
      await bad({ room: "e-main", text: "x", cid: "" }, "empty cid");
      await bad({ room: "e-main", text: "x", cid: 5 }, "numeric cid");
      // binary arguments are parsed (45 packets) but refused for chat events
      await bad({ room: "e-main", text: Buffer.from("binary text") }, "binary text");
      assertErrorAck(await emitAck(E, "join", { room: "e-bin", blob: Buffer.from([1, 2, 3]) }), "bad_request", "join with a binary argument");
      // the edges are accepted
      const a1 = assertOkAck(await eveSend({ room: "e-main", text: "x", cid: "c".repeat(64) }), "cid of 64 bytes");
      const a2 = assertOkAck(await eveSend({ room: "e-main", text: "y", cid: "é".repeat(32) }), "cid of 32 chars / 64 bytes");
      assert.equal(a2.offset, a1.offset + 1, "the refused sends stored nothing");
    }),
  );

  it(
    "bad_request: unknown event with an ack; ignored without one",
    T(async () => {
      assertErrorAck(await emitAck(E, "frobnicate", { room: "e-main" }), "bad_request", "unknown event");
      assertErrorAck(await emitAckArgs(E, "frobnicate", []), "bad_request", "unknown event, no arguments");
      E.emit("frobnicate", { room: "e-main" }); // no ack id: ignored
      assertErrorAck(
        await evePaced("typing", { room: "bad room!" }),
        "bad_request",
        "typing with a bad room, ack requested",
      );
      assertOkAck(await evePaced("history", { room: "e-main", limit: 1 }), "still served afterwards");
      assert.equal(E.connected, true);
    }),
  );

  it(
    "too_large: text over 4096 bytes (bytes, not characters)",
    T(async () => {
      assertErrorAck(await eveSend({ room: "e-main", text: "a".repeat(4097) }), "too_large", "4097 ASCII bytes");
      assertErrorAck(await eveSend({ room: "e-main", text: "é".repeat(2049) }), "too_large", "2049 chars / 4098 bytes");
      const big = assertOkAck(await eveSend({ room: "e-main", text: "a".repeat(4096) }), "4096 bytes");
      const big2 = assertOkAck(await eveSend({ room: "e-main", text: "é".repeat(2048) }), "2048 chars / 4096 bytes");
      assert.equal(big2.offset, big.offset + 1);
      const h = await evePaced("history", { room: "e-main", limit: 2 });
      assert.deepEqual(
        h.messages.map((m) => m.text),
        ["a".repeat(4096), "é".repeat(2048)],
        "texts at the limit are stored intact",
      );
    }),
  );

  it(
    "rate_limited: a burst past the send rate is partly refused, and nothing refused is stored",
    T(async () => {
      const S = await connect(srv.url, { auth: { token: token("spammer") } });
      assertOkAck(await emitAck(S, "join", { room: "e-spam" }));
      const acks = await Promise.all(
        Array.from({ length: 30 }, (_, i) => emitAck(S, "message", { room: "e-spam", text: `spam ${i}` })),
      );
      const oks = acks.filter((a) => a.ok === true);
      const limited = acks.filter((a) => a.ok === false);
      for (const a of limited) assertErrorAck(a, "rate_limited", "refused burst send");
      assert.ok(oks.length >= 1, "the burst allowance is accepted");
      assert.ok(limited.length >= 15, `most of 30 instant sends past a 5/s rate, burst 5 are refused: ${limited.length}`);
      assert.deepEqual(
        oks.map((a) => a.offset),
        Array.from({ length: oks.length }, (_, i) => i + 1),
        "accepted sends take consecutive offsets, in send order",
      );
      // read back from another member's connection (the spammer's own bucket is empty)
      const W = await connect(srv.url, { auth: { token: token("spam-watcher") } });
      assertOkAck(await emitAck(W, "join", { room: "e-spam" }));
      const h = await emitAck(W, "history", { room: "e-spam", limit: 100 });
      assertOkAck(h);
      W.close();
      assert.equal(h.messages.length, oks.length, "refused sends stored nothing");
      // the bucket refills
      await sleep(1200);
      const later = assertOkAck(await emitAck(S, "message", { room: "e-spam", text: "after a pause" }), "after refill");
      assert.equal(later.offset, oks.length + 1);
      S.close();
    }),
  );

  it(
    "forbidden: a room outside the rooms claim, a bad room token",
    T(async () => {
      const F = await connect(srv.url, { auth: { token: token("frank", ["f-*"]) } });
      assertErrorAck(await emitAck(F, "join", { room: "e-main" }), "forbidden", "room outside claim");
      assertErrorAck(
        await emitAck(F, "join", { room: "e-main", token: mintToken(srv.secret, { sub: "frank", room: "e-other" }) }),
        "forbidden",
        "room token for another room",
      );
      assertOkAck(await emitAck(F, "join", { room: "f-1" }));
      F.close();
    }),
  );

  it(
    "joining more than 100 rooms: the 101st gets an error ack",
    T(async () => {
      const J = await connect(srv.url, { auth: { token: token("joiner") } });
      for (let i = 1; i <= 100; i++) {
        assertOkAck(await emitAck(J, "join", { room: `j-${i}` }), `join j-${i}`);
      }
      const r = await emitAck(J, "join", { room: "j-101" });
      assertErrorAck(r, undefined, "101st room");
      assertErrorAck(await emitAck(J, "message", { room: "j-101", text: "x" }), "not_joined", "the refused room was not joined");
      // the limit is on rooms held at once
      assertOkAck(await emitAck(J, "leave", { room: "j-1" }));
      assertOkAck(await emitAck(J, "join", { room: "j-101" }), "after leaving one, room 100 again");
      assertOkAck(await emitAck(J, "message", { room: "j-101", text: "works" }));
      J.close();
    }),
  );

  it(
    "unauthorized: connect_error with a bad token",
    T(async () => {
      const err = await connectError(srv.url, { auth: { token: mintToken("wrong", { sub: "eve" }) } });
      assert.equal(err.message, "unauthorized");
    }),
  );

  it(
    "another namespace gets connect_error \"Invalid namespace\"",
    T(async () => {
      const err = await connectError(`${srv.url}/admin`, { auth: { token: token("eve") } });
      assert.equal(err.message, "Invalid namespace");
    }),
  );

  it(
    "EIO other than 4: HTTP 400 with the Engine.IO error body, on both transports",
    T(async () => {
      const expected = { code: 5, message: "Unsupported protocol version" };
      const poll = await httpGet(srv.url, "/socket.io/?EIO=3&transport=polling");
      assert.equal(poll.status, 400);
      assert.deepEqual(JSON.parse(poll.body), expected);
      const ws = await upgradeRequest(srv.url, "/socket.io/?EIO=3&transport=websocket");
      assert.equal(ws.status, 400, "refused before any WebSocket upgrade");
      assert.deepEqual(JSON.parse(ws.body), expected);
      // EIO=4 over the same raw request is upgraded (the check above is meaningful)
      const ok = await upgradeRequest(srv.url, "/socket.io/?EIO=4&transport=websocket");
      assert.equal(ok.status, 101);
      // and the EIO=4 polling handshake is the documented open packet
      const open = await httpGet(srv.url, "/socket.io/?EIO=4&transport=polling");
      assert.equal(open.status, 200);
      assert.equal(open.body[0], "0", `open packet: ${open.body}`);
      const o = JSON.parse(open.body.slice(1));
      assert.equal(typeof o.sid, "string");
      assert.deepEqual(o.upgrades, ["websocket"]);
      assert.deepEqual(
        { pingInterval: o.pingInterval, pingTimeout: o.pingTimeout, maxPayload: o.maxPayload },
        { pingInterval: 25000, pingTimeout: 20000, maxPayload: 1000000 },
      );
    }),
  );

  it(
    "an invalid Socket.IO packet, an oversized frame or > 10 attachments closes only that connection",
    T(async () => {
      const W = await connect(srv.url, { auth: { token: token("bystander") } });
      assertOkAck(await emitAck(W, "join", { room: "e-bystand" }));
      // a valid Engine.IO message whose Socket.IO packet is garbage
      const G = await connect(srv.url, { auth: { token: token("garbler") } });
      const gClosed = new Promise((r) => G.on("disconnect", r));
      G.io.engine.write("9not a socket.io packet");
      assert.equal(await orTimeout(gClosed, 3000, "still open"), "transport close");
      // a frame above maxPayload (1000000)
      const O = await connect(srv.url, { auth: { token: token("oversize") } });
      assertOkAck(await emitAck(O, "join", { room: "e-bystand" }));
      const oClosed = new Promise((r) => O.on("disconnect", r));
      O.emit("message", { room: "e-bystand", text: "x".repeat(1_100_000) });
      assert.equal(await orTimeout(oClosed, 3000, "still open"), "transport close");
      // a binary event with more than 10 attachments
      const M = await connect(srv.url, { auth: { token: token("attacher") } });
      const mClosed = new Promise((r) => M.on("disconnect", r));
      M.emit("message", { room: "e-bystand", parts: Array.from({ length: 11 }, (_, i) => Buffer.from([i])) });
      assert.equal(await orTimeout(mClosed, 3000, "still open"), "transport close", "11 attachments close the connection");
      // the bystander is unaffected
      assert.equal(W.connected, true);
      assertOkAck(await emitAck(W, "message", { room: "e-bystand", text: "fine" }));
      W.close();
    }),
  );

  it(
    "after all of these the connection still works",
    T(async () => {
      const W = await connect(srv.url, { auth: { token: token("watcher") } });
      assertOkAck(await emitAck(W, "join", { room: "e-main" }));
      const got = waitEvent(W, "message", (m) => m.room === "e-main");
      const a = assertOkAck(await eveSend({ room: "e-main", text: "still here", cid: "final" }), "normal message");
      const m = await got;
      assert.equal(m.offset, a.offset);
      assert.equal(m.text, "still here");
      assert.equal(m.user, "eve");
      assert.equal(E.connected, true);
      assert.deepEqual(eveDisconnects, [], "eve was never disconnected");
      W.close();
    }),
  );
});
