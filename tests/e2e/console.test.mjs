// The live console: GET /api/console (the JSON it polls) and the page at /console
// (assets/console.html, console.js) in headless Chromium.
//
// - /api/console answers 401 without the API key (or with a wrong one) when a key is
//   configured, and its counters move when messages flow (messages in and out, the
//   fan-out histogram), on every shard's behalf whichever shard answers;
// - on Redis it reports the link and its pub/sub round trip, as /healthz does;
// - under a JWT secret without an API key, neither the page nor its JSON is served;
// - the page asks for the key, keeps it in sessionStorage, and shows live rates
//   computed from successive samples.
//
// CORELAY_SCREENSHOTS_DIR=docs/screenshots saves console.png (scripts/screenshots.sh).
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import { assertOkAck, closeAll, connect, emitAck, guard, httpGet, mintToken, sleep, startServer } from "./harness.mjs";
import { chromiumMissing, launch, screenshot, waitIn } from "./chromium.mjs";
import { redisServerBin, startRedis } from "./redis.mjs";

const KEY = "console-key-for-tests";

/** GET /api/console with `key` (or none): {status, json}. */
async function consoleJson(url, key) {
  const r = await httpGet(url, "/api/console", key ? { authorization: `Bearer ${key}` } : {});
  return { status: r.status, json: JSON.parse(r.body), headers: r.headers };
}

const total = (j, k) => j.shards.reduce((a, s) => a + s[k], 0);

/** `n` sockets joined to `room`, as users u0, u1, … */
async function members(srv, room, n, prefix) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const token = mintToken(srv.secret, { sub: `${prefix}${i}`, rooms: ["*"] });
    const s = await connect(srv.url, { auth: { token } });
    assertOkAck(await emitAck(s, "join", { room }));
    out.push(s);
  }
  return out;
}

describe("the live console", () => {
  const cleanups = [];
  after(async () => {
    for (const fn of cleanups.reverse()) await Promise.resolve().then(fn).catch((e) => process.stderr.write(`cleanup: ${e.message}\n`));
    closeAll();
  });

  let srv;
  it(
    "GET /api/console: 401 without the key, and its figures move when messages flow",
    { timeout: 60_000 },
    guard(
      () => srv,
      async () => {
        const s = (srv = await startServer({ shards: 2, env: { CORELAY_API_KEY: KEY } }));
        cleanups.push(() => s.stop());
        for (const key of [null, "wrong-key"]) {
          const r = await consoleJson(srv.url, key);
          assert.equal(r.status, 401, `key ${key}`);
          assert.equal(r.json.error.code, "unauthorized");
        }
        const before = await consoleJson(srv.url, KEY);
        assert.equal(before.status, 200);
        assert.equal(before.headers["cache-control"], "no-store");
        const j = before.json;
        assert.equal(j.shards.length, 2, "every shard's figures, whichever shard answered");
        assert.deepEqual([j.redis, j.hooks, j.feed], [null, null, null], "single host; hooks and feed not configured");
        assert.deepEqual(j.store, { kind: "memory", durability: "fsync", ok: true, error: null });
        assert.equal(typeof j.ts_ms, "number");
        assert.equal(j.fanout_bounds_s.length, j.shards[0].fanout.buckets.length);

        const [sender, ...others] = await members(srv, "console-room", 3, "m");
        for (let i = 0; i < 5; i++) assertOkAck(await emitAck(sender, "message", { room: "console-room", text: `m${i}` }));
        await sleep(100); // deliveries to the other two land
        const now = (await consoleJson(srv.url, KEY)).json;
        assert.equal(total(now, "messages_in") - total(j, "messages_in"), 5, "five messages in");
        assert.ok(total(now, "messages_out") - total(j, "messages_out") >= 10, "delivered to two members each");
        assert.ok(total(now, "connections") >= 3);
        const fanouts = (x) => x.shards.reduce((a, s) => a + s.fanout.count, 0);
        assert.ok(fanouts(now) > fanouts(j), "the fan-out histogram counted them");
        assert.ok(now.ts_ms >= j.ts_ms);
        for (const s of [sender, ...others]) s.close();
      },
    ),
  );

  it("on Redis: the link, its pub/sub round trip, and the redis store", { timeout: 60_000 }, async (t) => {
    if (!redisServerBin()) return t.skip("redis-server not installed");
    const redis = await startRedis();
    cleanups.push(() => redis.stop());
    const s = await startServer({ shards: 2, store: "redis", args: ["--redis", redis.url], env: { CORELAY_API_KEY: KEY } });
    cleanups.push(() => s.stop());
    let j;
    for (let i = 0; i < 50; i++) {
      j = (await consoleJson(s.url, KEY)).json;
      if (j.redis?.connected && typeof j.redis.pubsub_roundtrip_ms === "number") break;
      await sleep(100);
    }
    assert.equal(j.redis.connected, true, JSON.stringify(j.redis));
    assert.equal(typeof j.redis.pubsub_roundtrip_ms, "number", "the probe's round trip");
    assert.deepEqual([j.redis.cluster, j.redis.shard_links_down], [false, 0]);
    assert.equal(j.store.kind, "redis");
    assert.equal(j.shards.some((x) => x.redis_link_down), false);
  });

  it("is not served under a JWT secret without an API key", async () => {
    const s = await startServer({ shards: 1 });
    cleanups.push(() => s.stop());
    assert.equal((await httpGet(s.url, "/console")).status, 404);
    const r = await consoleJson(s.url, null);
    assert.equal(r.status, 401);
    assert.match(r.json.error.message, /set auth.api_key/);
  });

  it(
    "the page asks for the key, keeps it for the tab, and shows live rates",
    { timeout: 90_000 },
    guard(
      () => srv,
      async (t) => {
        if (chromiumMissing()) return t.skip(chromiumMissing());
        // On Redis when there is one (the screenshot then shows the link), else one host.
        const redis = redisServerBin() ? await startRedis() : null;
        if (redis) cleanups.push(() => redis.stop());
        const onRedis = redis ? { store: "redis", args: ["--redis", redis.url] } : {};
        const s = (srv = await startServer({ shards: 2, env: { CORELAY_API_KEY: KEY }, ...onRedis }));
        cleanups.push(() => s.stop());
        const { browser, diag, page: newPage } = await launch();
        cleanups.push(() => browser.close());
        const page = await newPage("console", { width: 1100, height: 700 });
        const r = await httpGet(srv.url, "/console");
        assert.equal(r.status, 200);
        assert.match(r.headers["content-type"], /^text\/html/);
        await page.goto(srv.url + "/console");
        await waitIn(page, "the key form", () => !document.querySelector("#key-form").hidden, null, diag);
        await page.fill("#key", KEY);
        await page.click("#key-form button");
        await waitIn(page, "the board", () => !document.querySelector("#board").hidden, null, diag);
        assert.equal(await page.evaluate(() => sessionStorage.getItem("corelay.apiKey")), KEY);
        assert.equal(await page.$$eval("#shards tr", (rows) => rows.length), 2, diag());

        // Traffic: two rooms, a message every 50 ms, while the page samples. With two shards
        // "lobby" lives on shard 1 and "support" on shard 0 (their members follow them).
        const lobby = await members(srv, "lobby", 4, "l");
        const support = await members(srv, "support", 3, "s");
        let sending = true;
        const traffic = (async () => {
          for (let i = 0; sending; i++) {
            const [sock, room] = i % 3 ? [lobby[i % 4], "lobby"] : [support[i % 3], "support"];
            await emitAck(sock, "message", { room, text: `load ${i}` });
            await sleep(50);
          }
        })();
        cleanups.push(() => (sending = false));
        await waitIn(page, "a rate above zero", () => Number(document.querySelector("#t-in").textContent) > 0, null, diag);
        await waitIn(page, "a fan-out quantile", () => /µs|ms/.test(document.querySelector("#t-p99").textContent), null, diag);
        assert.match(await page.textContent("#hooks"), /not configured/);
        await waitIn(page, "the Redis panel", (r) => document.querySelector("#redis").textContent.includes(r ? "link: connected" : "single host"), !!redis, diag);
        await sleep(2500); // a few samples for the screenshot
        await screenshot(page, "console.png", { fullPage: true });

        // A reload keeps the key (same tab): no prompt.
        await page.reload();
        await waitIn(page, "the board after a reload", () => !document.querySelector("#board").hidden, null, diag);
        assert.equal(await page.evaluate(() => window.consoleState.unauthorized), false);
        sending = false;
        await traffic;
      },
    ),
  );
});
