// Recovery with the official socket.io-client: a member that was away (disconnected,
// or the server restarted under it) gets exactly what it missed through `join {since}`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { io } from "socket.io-client";
import { BIN, freePort, mintToken, emitAck, waitEvent, sleep } from "./harness.mjs";

const SECRET = "recovery-secret-0123456789";

/** Starts corelay on `port` with the embedded store in `dataDir`; resolves when ready. */
function startEmbedded(port, dataDir) {
  const env = { ...process.env, RUST_LOG: "warn", CORELAY_JWT_SECRET: SECRET };
  const proc = spawn(BIN, ["serve", "--listen", `127.0.0.1:${port}`, "--shards", "2", "--data-dir", dataDir], { env });
  let output = "";
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`not ready:\n${output}`)), 15000);
    const onData = (d) => {
      output += d;
      if (output.includes("listening on")) {
        clearTimeout(timer);
        resolve({
          proc,
          stop: () =>
            new Promise((done) => {
              proc.once("exit", (code) => done(code));
              proc.kill("SIGTERM");
            }),
        });
      }
    };
    proc.stdout.on("data", onData);
    proc.stderr.on("data", onData);
    proc.once("exit", (code) => reject(new Error(`exited ${code}:\n${output}`)));
  });
}

function client(port, user, opts = {}) {
  return io(`http://127.0.0.1:${port}`, {
    auth: { token: mintToken(SECRET, { sub: user, rooms: ["*"] }) },
    forceNew: true,
    reconnectionDelay: 100,
    reconnectionDelayMax: 200,
    ...opts,
  });
}

const connected = (s) => (s.connected ? Promise.resolve() : new Promise((r) => s.once("connect", r)));

test("a member that disconnected gets exactly what it missed, in order", async () => {
  const port = await freePort();
  const dataDir = mkdtempSync(path.join(os.tmpdir(), "corelay-rec-"));
  const server = await startEmbedded(port, dataDir);
  const sender = client(port, "sender");
  const member = client(port, "member");
  try {
    await Promise.all([connected(sender), connected(member)]);
    await emitAck(sender, "join", { room: "r" });
    let last = (await emitAck(member, "join", { room: "r" })).offset;
    const seen = [];
    member.on("message", (m) => {
      seen.push(m.offset);
      last = m.offset;
    });
    const fifth = waitEvent(member, "message", (m) => m.text === "before 4");
    for (let i = 0; i < 5; i++) await emitAck(sender, "message", { room: "r", text: `before ${i}` });
    await fifth;
    assert.deepEqual(seen, [1, 2, 3, 4, 5]);

    member.disconnect();
    const sent = [];
    for (let i = 0; i < 20; i++) sent.push(await emitAck(sender, "message", { room: "r", text: `away ${i}` }));
    member.connect();
    await connected(member);
    const rejoin = await emitAck(member, "join", { room: "r", since: last });
    assert.equal(rejoin.ok, true);
    assert.equal(rejoin.offset, 25);
    assert.deepEqual(rejoin.missed.map((m) => m.offset), sent.map((a) => a.offset));
    assert.deepEqual(rejoin.missed.map((m) => m.text), sent.map((_, i) => `away ${i}`));
    assert.equal(rejoin.truncated, false);
    const live = waitEvent(member, "message", (m) => m.text === "after");
    await emitAck(sender, "message", { room: "r", text: "after" });
    assert.equal((await live).offset, 26);
  } finally {
    sender.close();
    member.close();
    await server.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test("after a server restart, clients reconnect by themselves and recover with since", async () => {
  const port = await freePort();
  const dataDir = mkdtempSync(path.join(os.tmpdir(), "corelay-rec-"));
  let server = await startEmbedded(port, dataDir);
  const sender = client(port, "sender");
  const member = client(port, "member");
  try {
    await Promise.all([connected(sender), connected(member)]);
    await emitAck(sender, "join", { room: "r" });
    await emitAck(member, "join", { room: "r" });
    let last = 0;
    member.on("message", (m) => (last = m.offset));
    const third = waitEvent(member, "message", (m) => m.text === "m2");
    for (let i = 0; i < 3; i++) await emitAck(sender, "message", { room: "r", text: `m${i}` });
    await third;
    assert.equal(last, 3);

    // The server drains (clients see 1012 and start reconnecting) and comes back.
    const reconnecting = new Promise((r) => member.io.once("reconnect_attempt", r));
    assert.equal(await server.stop(), 0);
    await reconnecting;
    server = await startEmbedded(port, dataDir);
    await Promise.all([connected(sender), connected(member)]);
    // Rooms are per connection: the sender joins again and sends while the member is not in the room yet.
    await emitAck(sender, "join", { room: "r" });
    for (let i = 3; i < 10; i++) await emitAck(sender, "message", { room: "r", text: `m${i}` });
    const rejoin = await emitAck(member, "join", { room: "r", since: last });
    assert.deepEqual(rejoin.missed.map((m) => m.offset), [4, 5, 6, 7, 8, 9, 10]);
    assert.deepEqual(rejoin.missed.map((m) => m.text), [3, 4, 5, 6, 7, 8, 9].map((i) => `m${i}`));
    await sleep(50);
  } finally {
    sender.close();
    member.close();
    await server.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
});
