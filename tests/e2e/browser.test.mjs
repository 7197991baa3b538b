// A real browser end to end: Debian's chromium (headless) loads a page served by this
// test with the official socket.io-client browser bundle from npm, connects to corelay
// with DEFAULT options (long-polling first, cross-origin, so CORS applies; then the
// upgrade to WebSocket), joins a room, receives a message sent by a Node client and
// sends one back.  A page from an origin outside CORELAY_SERVER_CORS_ORIGINS must get
// connect_error.  PROTOCOL.md "Wire", "Identity", "Client → server events".
//
// Needs /usr/bin/chromium (scripts/test.sh installs Debian's `chromium`); skipped with a
// message when it is missing.  CORELAY_E2E_SCREENSHOT=/path.png saves a screenshot of the
// page after the exchange (and /path-refused.png of the refused one).  playwright-core
// stays on 1.61.x, the last release that runs on Node.js 18 (Debian bookworm's nodejs,
// which scripts/test.sh installs where node is missing); it drives the system chromium
// and never downloads a browser.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, describe, it } from "node:test";
import { chromium } from "playwright-core";
import { assertOkAck, closeAll, connect, emitAck, guard, mintToken, startServer, waitEvent } from "./harness.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CORELAY_E2E_CHROMIUM || "/usr/bin/chromium";
const PAGE_HTML = readFileSync(path.join(HERE, "browser", "index.html"));
// The official browser bundle, as npm ships it (not exported by the package: find it
// next to its package.json).
const BUNDLE_PATH = path.join(
  path.dirname(createRequire(import.meta.url).resolve("socket.io-client/package.json")),
  "dist",
  "socket.io.min.js",
);
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const STEP_MS = 10_000; // bound of every single wait in the browser

/** A static server on a free loopback port for the test page and the bundle. */
async function startPageServer() {
  const bundle = readFileSync(BUNDLE_PATH);
  const requests = [];
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    requests.push(`${req.method} ${url.pathname}`);
    const send = (status, type, body) => {
      res.writeHead(status, { "content-type": type, "cache-control": "no-store" });
      res.end(body);
    };
    if (req.method !== "GET") return send(405, "text/plain", "method not allowed\n");
    if (url.pathname === "/" || url.pathname === "/index.html") return send(200, "text/html; charset=utf-8", PAGE_HTML);
    if (url.pathname === "/socket.io.min.js") return send(200, "application/javascript; charset=utf-8", bundle);
    if (url.pathname === "/favicon.ico") return send(204, "image/x-icon", "");
    return send(404, "text/plain", "not found\n");
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const { port } = server.address();
  return {
    origin: `http://127.0.0.1:${port}`,
    requests,
    close() {
      server.closeAllConnections();
      return new Promise((r) => server.close(() => r()));
    },
  };
}

/** Waits for a predicate over window.chat in the page; fails with the page's state and console. */
async function waitChat(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: STEP_MS, polling: 50 });
  } catch (e) {
    const chat = await page.evaluate(() => window.chat).catch(() => null);
    throw new Error(`browser: timed out after ${STEP_MS} ms waiting for ${what}; page state: ${JSON.stringify(chat)}${page.diag?.() ?? ""}`, {
      cause: e,
    });
  }
}

/** Waits (≤ ms) for a promise; rejects with a message naming what it waited for. */
function bounded(promise, ms, what) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

describe("browser (headless chromium, socket.io-client browser bundle)", () => {
  let srv;
  const cleanups = [];
  after(async () => {
    // Last opened, first closed; never let one failure skip the others.
    for (const fn of cleanups.reverse()) {
      try {
        await bounded(Promise.resolve().then(fn), 10_000, "cleanup");
      } catch (e) {
        process.stderr.write(`browser test cleanup: ${e?.message || e}\n`);
      }
    }
    closeAll();
  });

  it(
    "chats from a real browser over polling upgraded to WebSocket, and CORS refuses other origins",
    { timeout: 120_000 },
    guard(
      () => srv,
      async (t) => {
        if (!existsSync(CHROMIUM)) {
          t.skip(`${CHROMIUM} not found: install Debian's chromium (scripts/test.sh does) to run the browser test`);
          return;
        }
        const t0 = Date.now();

        // Two page origins: one allowed by CORS, one not.
        const allowedSite = await startPageServer();
        cleanups.push(() => allowedSite.close());
        const otherSite = await startPageServer();
        cleanups.push(() => otherSite.close());

        srv = await startServer({
          shards: 2,
          env: { CORELAY_SERVER_CORS_ORIGINS: allowedSite.origin },
        });
        cleanups.push(() => srv.stop());

        const browser = await chromium.launch({
          executablePath: CHROMIUM,
          headless: true,
          args: CHROMIUM_ARGS,
          timeout: 30_000,
        });
        cleanups.push(() => browser.close());
        const context = await browser.newContext();
        const consoleLines = [];
        const watch = (page, label) => {
          page.diag = () => diag();
          page.on("console", (m) => consoleLines.push(`[${label} console.${m.type()}] ${m.text()}`));
          page.on("pageerror", (e) => consoleLines.push(`[${label} pageerror] ${e.message}`));
        };
        const diag = () => `\nbrowser console:\n${consoleLines.join("\n") || "(none)"}`;

        const room = "browser-e2e";
        const bobToken = mintToken(srv.secret, { sub: "bob", name: "Bob", rooms: [room] });
        const carolToken = mintToken(srv.secret, { sub: "carol", name: "Carol", rooms: [room] });
        const pageUrl = (origin, token) =>
          `${origin}/?${new URLSearchParams({ server: srv.url, token, room })}`;

        // A Node client (websocket only, as the harness connects) in the same room.
        const bob = await connect(srv.url, { auth: { token: bobToken } });
        assertOkAck(await emitAck(bob, "join", { room }), "node join");

        // ---- the allowed origin: connect with default options, join, chat.
        const page = await context.newPage();
        watch(page, "allowed");
        page.setDefaultTimeout(STEP_MS);
        await page.goto(pageUrl(allowedSite.origin, carolToken), { timeout: STEP_MS });
        assert.equal(await page.evaluate(() => typeof window.io), "function", `bundle not loaded${diag()}`);
        await waitChat(page, "the join ack", () => window.chat.joinAck !== null);
        const chat0 = await page.evaluate(() => window.chat);
        assert.equal(chat0.joinAck?.ok, true, `browser join: ${JSON.stringify(chat0.joinAck)}${diag()}`);
        assert.deepEqual(chat0.connectErrors, [], `browser connect errors on the allowed origin${diag()}`);
        // Default options start with long-polling: the handshake went through cross-origin XHR.
        // (The upgrade may complete before or after the Socket.IO CONNECT: both are fine.)
        assert.equal(chat0.firstTransport, "polling", "the browser opens its session over polling");

        // Node -> browser.
        const toBrowser = "hello browser, from node " + Date.now();
        assertOkAck(await emitAck(bob, "message", { room, text: toBrowser }), "node message");
        await waitChat(page, "the node client's message", (text) => window.chat.received.some((m) => m.text === text), toBrowser);
        const got = (await page.evaluate(() => window.chat.received)).find((m) => m.text === toBrowser);
        assert.equal(got.room, room);
        assert.equal(got.user, "bob");
        assert.equal(typeof got.offset, "number");

        // Browser -> node.
        const toNode = "hello node, from chromium " + Date.now();
        const atNode = waitEvent(bob, "message", (m) => m.text === toNode, STEP_MS);
        const ack = await bounded(page.evaluate((text) => window.send(text), toNode), STEP_MS, "browser send ack");
        assertOkAck(ack, "browser message");
        const m = await atNode;
        assert.equal(m.room, room);
        assert.equal(m.user, "carol");
        assert.equal(m.offset, ack.offset, "delivered offset = acked offset");
        assert.ok(m.offset > got.offset, `browser's message comes after node's: ${m.offset} > ${got.offset}`);

        // The browser upgraded from polling to WebSocket (and stayed connected).
        await waitChat(page, "the upgrade to websocket", () => window.socket.io.engine?.transport?.name === "websocket");
        const end = await page.evaluate(() => ({
          transport: window.socket.io.engine.transport.name,
          connected: window.socket.connected,
          upgradedTo: window.chat.upgradedTo,
        }));
        assert.deepEqual(end, { transport: "websocket", connected: true, upgradedTo: "websocket" }, diag());
        assert.deepEqual(
          allowedSite.requests.filter((r) => r !== "GET /favicon.ico"),
          ["GET /", "GET /socket.io.min.js"],
          "the page and the npm bundle came from the test's own server",
        );
        if (process.env.CORELAY_E2E_SCREENSHOT) {
          await page.screenshot({ path: process.env.CORELAY_E2E_SCREENSHOT, fullPage: true });
        }

        // ---- an origin not in CORELAY_SERVER_CORS_ORIGINS: the browser refuses the
        // polling responses (no Access-Control-Allow-Origin), so connect_error.
        const refused = await context.newPage();
        watch(refused, "refused");
        refused.setDefaultTimeout(STEP_MS);
        await refused.goto(pageUrl(otherSite.origin, carolToken), { timeout: STEP_MS });
        await waitChat(refused, "connect_error on the refused origin", () => window.chat.connectErrors.length > 0);
        const r = await refused.evaluate(() => {
          window.socket.close(); // stop the reconnection attempts
          return window.chat;
        });
        assert.equal(r.connected, false);
        assert.equal(r.joinAck, null);
        assert.equal(r.connectErrors[0], "xhr poll error", `connect_error: ${JSON.stringify(r.connectErrors)}`);
        // The server is reachable from that page (an opaque no-cors request succeeds), but a
        // CORS read of the handshake is refused: the refusal really is CORS.
        const probe = await refused.evaluate(async (server) => {
          const url = `${server}/socket.io/?EIO=4&transport=polling&t=probe`;
          const out = {};
          try {
            out.noCors = (await fetch(url, { mode: "no-cors" })).type;
          } catch (e) {
            out.noCors = "error: " + e.message;
          }
          try {
            out.cors = "status " + (await fetch(url)).status;
          } catch (e) {
            out.cors = "error: " + e.name;
          }
          return out;
        }, srv.url);
        assert.deepEqual(probe, { noCors: "opaque", cors: "error: TypeError" }, diag());
        // And chromium says so (its console reports the blocked request, for the XHR poll
        // as for the fetch); the allowed page never saw such a message.
        const corsBlocked = (label) =>
          consoleLines.filter((l) => l.startsWith(`[${label} `) && /blocked by CORS policy/.test(l));
        for (let i = 0; i < 100 && corsBlocked("refused").length < 2; i++) await new Promise((r) => setTimeout(r, 20));
        assert.ok(
          corsBlocked("refused").some((l) => l.includes("XMLHttpRequest") && l.includes("transport=polling")),
          `no CORS refusal of the polling XHR in chromium's console${diag()}`,
        );
        assert.deepEqual(corsBlocked("allowed"), [], "CORS errors on the allowed origin");
        if (process.env.CORELAY_E2E_SCREENSHOT) {
          await refused.screenshot({ path: process.env.CORELAY_E2E_SCREENSHOT.replace(/(\.png)?$/, "-refused.png") });
        }
        // Meanwhile the allowed page is still fine.
        assert.equal(await page.evaluate(() => window.socket.connected), true);

        t.diagnostic(`browser test body took ${Date.now() - t0} ms`);
      },
    ),
  );
});
