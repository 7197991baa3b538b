// Long-polling end to end with Node's own HTTP stack: the official socket.io-client
// with a fresh TCP connection (`Connection: close`) for every request, so requests land
// on any shard; and http.request without a length, which sends a chunked body, for a
// polling POST and an API POST.  PROTOCOL.md "Wire" and "Server API".
import assert from "node:assert/strict";
import http from "node:http";
import { after, before, describe, it } from "node:test";
import {
  assertOkAck,
  closeAll,
  connect,
  emitAck,
  guard,
  mintToken,
  startServer,
  waitEvent,
} from "./harness.mjs";

const API_KEY = "e2e-api-key-polling";
let srv;
const T = (fn) => guard(() => srv, fn);
const tokenFor = (sub) => mintToken(srv.secret, { sub, rooms: ["*"] });

/**
 * An http.Agent that keeps no connection alive and records what goes out on each new
 * connection: one connection per request, each request saying `Connection: close`.
 */
class FreshAgent extends http.Agent {
  constructor() {
    super({ keepAlive: false });
    this.heads = [];
  }
  createConnection(options, cb) {
    const socket = super.createConnection(options, cb);
    const heads = this.heads;
    const write = socket.write;
    let first = true;
    socket.write = function (chunk, ...rest) {
      if (first) {
        first = false;
        heads.push(String(chunk).split("\r\n\r\n")[0]);
      }
      return write.call(this, chunk, ...rest);
    };
    return socket;
  }
}

/** One request with Node's http.request; `chunks` are written one by one with no length (chunked). */
function request(method, path, { headers = {}, chunks = [] } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      `${srv.url}${path}`,
      { method, agent: false, headers: { connection: "close", ...headers } },
      (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (c) => (body += c));
        // req._header: the request head as Node wrote it.
        res.on("end", () => resolve({ status: res.statusCode, sentHead: req._header, body }));
      },
    );
    req.on("error", reject);
    for (const c of chunks) req.write(c);
    req.end();
  });
}

describe("long-polling over Node's HTTP stack", () => {
  before(async () => {
    srv = await startServer({ shards: 2, env: { CORELAY_API_KEY: API_KEY } });
  });
  after(async () => {
    closeAll();
    await srv?.stop();
  });

  it(
    "socket.io-client polling with a fresh connection per request (Connection: close) works on every shard",
    T(async () => {
      const agent = new FreshAgent();
      const P = await connect(srv.url, { transports: ["polling"], agent, auth: { token: tokenFor("fresh") } });
      const W = await connect(srv.url, { auth: { token: tokenFor("watcher") } });
      assertOkAck(await emitAck(P, "join", { room: "fresh" }));
      assertOkAck(await emitAck(W, "join", { room: "fresh" }));
      for (let i = 1; i <= 8; i++) {
        const toP = waitEvent(P, "message", (m) => m.room === "fresh" && m.text === `to fresh ${i}`);
        const toW = waitEvent(W, "message", (m) => m.room === "fresh" && m.text === `from fresh ${i}`);
        assertOkAck(await emitAck(W, "message", { room: "fresh", text: `to fresh ${i}` }));
        assertOkAck(await emitAck(P, "message", { room: "fresh", text: `from fresh ${i}` }));
        assert.equal((await toP).user, "watcher");
        assert.equal((await toW).user, "fresh");
      }
      assert.equal(P.io.engine.transport.name, "polling", "no upgrade: polling only");
      // Every request went on its own connection and asked to close it.
      assert.ok(agent.heads.length >= 20, `requests on fresh connections: ${agent.heads.length}`);
      for (const head of agent.heads) {
        assert.match(head, /^(GET|POST) \/socket\.io\/\?EIO=4&transport=polling/, head);
        assert.match(head, /\r\nconnection: close/i, head);
      }
      assert.ok(agent.heads.some((h) => h.startsWith("POST")) && agent.heads.some((h) => h.startsWith("GET")));
      P.close();
      W.close();
    }),
  );

  it(
    "a polling POST from http.request without a length (chunked) is read",
    T(async () => {
      const open = await request("GET", "/socket.io/?EIO=4&transport=polling");
      assert.equal(open.status, 200, open.body);
      const { sid } = JSON.parse(open.body.slice(1));
      const path = `/socket.io/?EIO=4&transport=polling&sid=${sid}`;
      const connectPacket = `40${JSON.stringify({ token: tokenFor("chunky") })}`;
      const post = await request("POST", path, {
        headers: { "content-type": "text/plain;charset=UTF-8" },
        chunks: [connectPacket.slice(0, 10), connectPacket.slice(10), "\x1e", '421["join",{"room":"chunked"}]'],
      });
      assert.match(post.sentHead, /\r\nTransfer-Encoding: chunked\r\n/i, post.sentHead);
      assert.equal(post.status, 200, post.body);
      assert.equal(post.body, "ok");
      let packets = [];
      while (!packets.some((p) => p.startsWith("431"))) {
        const get = await request("GET", path);
        assert.equal(get.status, 200, get.body);
        packets = packets.concat(get.body.split("\x1e"));
        assert.ok(packets.length < 20, JSON.stringify(packets));
      }
      assert.match(packets[0], /^40\{"sid":/);
      const ack = JSON.parse(packets.find((p) => p.startsWith("431")).slice(3))[0];
      assert.equal(ack.ok, true, JSON.stringify(ack));
    }),
  );

  it(
    "an API POST from http.request without a length (chunked) publishes",
    T(async () => {
      const body = JSON.stringify({ text: "chunked from node", user: "backend" });
      const res = await request("POST", "/api/rooms/chunked-api/messages", {
        headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
        chunks: [body.slice(0, 7), body.slice(7, 20), body.slice(20)],
      });
      assert.match(res.sentHead, /\r\nTransfer-Encoding: chunked\r\n/i, res.sentHead);
      assert.equal(res.status, 201, res.body);
      assert.equal(JSON.parse(res.body).offset, 1);
      const history = await request("GET", "/api/rooms/chunked-api/messages", {
        headers: { authorization: `Bearer ${API_KEY}` },
      });
      assert.equal(JSON.parse(history.body).messages[0].text, "chunked from node");
    }),
  );
});
