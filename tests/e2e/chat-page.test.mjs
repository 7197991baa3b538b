// The chat page corelay serves at / (assets/chat.html, chat.js, and sio.js, its own
// Socket.IO client), in headless Chromium: two pages chat, see each other's presence and
// typing; one page's link is cut (through a TCP proxy: no close frame, like a network
// drop) while the other sends; after it reconnects it shows exactly what it missed,
// through join {since}. Also: the page is off under a JWT secret unless
// server.demo_page = true, and then a pasted token is the identity.
//
// CORELAY_SCREENSHOTS_DIR=docs/screenshots saves chat.png (scripts/screenshots.sh).
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import { assertOkAck, closeAll, connect, emitAck, guard, httpGet, mintToken, sleep, startServer } from "./harness.mjs";
import { chromiumMissing, cuttableProxy, launch, screenshot, waitIn } from "./chromium.mjs";

const ROOM = "lobby";

/** Fills the join form and waits until the page has joined. */
async function join(page, { name, token }, diag) {
  if (name) await page.fill("#name", name);
  if (token) {
    await page.click("#token-box summary");
    await page.fill("#token", token);
  }
  await page.fill("#room", ROOM);
  await page.click("#join");
  await waitIn(page, `${name || "token"} joined`, () => window.chat.status === "joined", null, diag);
}

/** The page's messages as "user: text", in order. */
const shown = (page) =>
  page.$$eval("#messages li[data-offset]", (lis) => lis.map((li) => `${li.querySelector("b").textContent}: ${li.querySelector("span").textContent}`));

/** Waits until the page shows a message with this text. */
const waitText = (page, text, diag) =>
  waitIn(page, `message "${text}"`, (t) => [...document.querySelectorAll("#messages li[data-offset] span")].some((s) => s.textContent === t), text, diag);

/** Waits until the page lists `user` in its presence panel as online (true) or not. */
const waitPresence = (page, user, online, diag) =>
  waitIn(page, `${user} ${online ? "online" : "offline"}`, ([u, on]) => document.querySelector(`#presence li[data-user="${u}"]`)?.className === (on ? "online" : "offline"), [user, online], diag);

describe("the chat page at /", () => {
  let srv;
  const cleanups = [];
  after(async () => {
    for (const fn of cleanups.reverse()) await Promise.resolve().then(fn).catch((e) => process.stderr.write(`cleanup: ${e.message}\n`));
    closeAll();
  });

  it(
    "two pages chat, see presence and typing, and one catches up after a drop",
    { timeout: 120_000 },
    guard(
      () => srv,
      async (t) => {
        if (chromiumMissing()) return t.skip(chromiumMissing());
        const dev = (srv = await startServer({ shards: 2, secret: null })); // dev mode: the page is on
        cleanups.push(() => dev.stop());
        const proxy = await cuttableProxy(srv.port);
        cleanups.push(() => proxy.close());
        const { browser, diag, page: newPage } = await launch();
        cleanups.push(() => browser.close());

        // Recent history, written before anyone opens the page.
        const carol = await connect(srv.url, { auth: { user: "carol" } });
        assertOkAck(await emitAck(carol, "join", { room: ROOM }));
        for (const text of ["welcome to the lobby", "the page shows recent history"]) {
          assertOkAck(await emitAck(carol, "message", { room: ROOM, text }));
        }
        carol.close();

        const ann = await newPage("ann");
        await ann.goto(proxy.url + "/"); // through the proxy: its link can be cut
        await join(ann, { name: "ann" }, diag);
        const bob = await newPage("bob");
        await bob.goto(srv.url + "/");
        await join(bob, { name: "bob" }, diag);
        for (const page of [ann, bob]) {
          assert.deepEqual((await shown(page)).slice(0, 2), ["carol: welcome to the lobby", "carol: the page shows recent history"]);
        }

        // Presence both ways (ann saw bob arrive; bob found ann already there).
        await waitPresence(ann, "bob", true, diag);
        await waitPresence(bob, "ann", true, diag);

        // Messages both ways.
        await ann.fill("#text", "hi bob, from ann's page");
        await ann.press("#text", "Enter");
        await waitText(bob, "hi bob, from ann's page", diag);
        await bob.type("#text", "hello ann"); // typing "input" events: ann sees bob typing
        await waitIn(ann, "bob is typing", () => document.querySelector("#typing").textContent === "bob is typing…", null, diag);
        await bob.press("#text", "Enter");
        await waitText(ann, "hello ann", diag);
        await waitIn(ann, "typing cleared by bob's message", () => document.querySelector("#typing").textContent === "", null, diag);

        // Cut ann's link: her page sees the drop and retries (refused while cut); bob sees her go.
        proxy.cut();
        await waitIn(ann, "ann's page offline", () => document.querySelector("#status").className.includes("offline"), null, diag);
        await waitPresence(bob, "ann", false, diag);
        const missed = ["sent while ann was away 1", "sent while ann was away 2", "sent while ann was away 3"];
        for (const text of missed) {
          await bob.fill("#text", text);
          await bob.press("#text", "Enter");
          await waitText(bob, text, diag); // acked: bob's page adds its own message from the ack
        }
        assert.equal((await shown(ann)).some((m) => m.includes("while ann was away")), false, "nothing reached ann while cut");
        // What ann sends while offline waits in her page's outbox (its cid kept for the retry).
        await ann.fill("#text", "ann wrote this offline");
        await ann.press("#text", "Enter");
        await waitIn(ann, "the outbox note", () => document.querySelector("#messages li.note:last-child").textContent.includes("will be sent when back online"), null, diag);

        // Restore: ann's page reconnects, joins with since, and shows exactly what it missed.
        proxy.restore();
        for (const text of missed) await waitText(ann, text, diag);
        await waitText(bob, "ann wrote this offline", diag);
        await waitText(ann, "ann wrote this offline", diag);
        const joins = await ann.evaluate(() => window.chat.joins);
        assert.equal(joins.length, 2, `one join, then one re-join: ${JSON.stringify(joins)}`);
        assert.equal(joins[1].missed, 3, `the re-join's missed: ${JSON.stringify(joins)}`);
        assert.equal(joins[1].since, joins[0].offset + 2, "since = the last offset ann held (her message and bob's)");
        const annSees = await shown(ann);
        const bobSees = await shown(bob);
        assert.deepEqual(annSees, bobSees, "both pages show the same conversation, in offset order");
        await waitPresence(bob, "ann", true, diag);
        await waitIn(ann, "the catch-up note", () => [...document.querySelectorAll("#messages li.note")].some((li) => li.textContent === "back online: 3 messages you missed"), null, diag);

        // For the README: ann's page, with bob typing.
        // (bob's page says "typing" at most every 2 s: keep typing until ann's page shows it)
        const typingShown = () => ann.evaluate(() => document.querySelector("#typing").textContent !== "");
        for (const word of "welcome back ann, you missed three".split(" ")) {
          if (await typingShown()) break;
          await bob.type("#text", word + " ");
          await sleep(400);
        }
        await waitIn(ann, "bob typing again", () => document.querySelector("#typing").textContent !== "", null, diag);
        await screenshot(ann, "chat.png");
      },
    ),
  );

  it(
    "the page answers pings; a catch-up past history.max_replay shows the newest, says so, and does not ask for the gap again",
    { timeout: 60_000 },
    guard(
      () => srv,
      async (t) => {
        if (chromiumMissing()) return t.skip(chromiumMissing());
        // Pings every 300 ms too: the page's client must answer them to stay connected.
        const env = { CORELAY_HISTORY_MAX_REPLAY: "2", CORELAY_ENGINEIO_PING_INTERVAL: "300", CORELAY_ENGINEIO_PING_TIMEOUT: "300" };
        const small = (srv = await startServer({ shards: 1, secret: null, env }));
        cleanups.push(() => small.stop());
        const proxy = await cuttableProxy(srv.port);
        cleanups.push(() => proxy.close());
        const { browser, diag, page: newPage } = await launch();
        cleanups.push(() => browser.close());
        const carol = await connect(srv.url, { auth: { user: "carol" } });
        assertOkAck(await emitAck(carol, "join", { room: ROOM }));
        const ann = await newPage("ann");
        await ann.goto(proxy.url + "/");
        await join(ann, { name: "ann" }, diag);
        await sleep(1500); // five pings: each answered with a pong, or the server would close
        assert.equal(await ann.evaluate(() => window.chat.joins.length), 1, "no reconnect while idle: pongs answered");
        const away = async (texts) => {
          proxy.cut();
          await waitIn(ann, "ann offline", () => document.querySelector("#status").className.includes("offline"), null, diag);
          for (const text of texts) assertOkAck(await emitAck(carol, "message", { room: ROOM, text }));
          proxy.restore();
          await waitText(ann, texts.at(-1), diag);
        };
        await away(["t1", "t2", "t3", "t4"]);
        assert.deepEqual(await shown(ann), ["carol: t3", "carol: t4"], "the newest max_replay of what was missed");
        await waitIn(ann, "the truncation note", () => [...document.querySelectorAll("#messages li.note")].some((li) => li.textContent.includes("were left out")), null, diag);
        await away(["t5"]);
        const joins = await ann.evaluate(() => window.chat.joins);
        assert.deepEqual(
          joins.map((j) => [j.since, j.missed]),
          [
            [null, null],
            [0, 2],
            [4, 1],
          ],
          "the second re-join starts after t4, not at the gap",
        );
      },
    ),
  );

  it(
    "under a JWT secret the page is off by default, and with demo_page a pasted token is the identity",
    { timeout: 60_000 },
    guard(
      () => srv,
      async (t) => {
        if (chromiumMissing()) return t.skip(chromiumMissing());
        const off = await startServer({ shards: 1 });
        const status = (await httpGet(off.url, "/")).status;
        await off.stop();
        assert.equal(status, 404, "no demo page under a secret unless asked for");

        const withSecret = (srv = await startServer({ shards: 1, env: { CORELAY_SERVER_DEMO_PAGE: "true" } }));
        cleanups.push(() => withSecret.stop());
        const { browser, diag, page: newPage } = await launch();
        cleanups.push(() => browser.close());
        const page = await newPage("token");
        await page.goto(srv.url + "/");
        // A name alone is refused, and the page says a token is needed.
        await page.fill("#name", "dave");
        await page.click("#join");
        await waitIn(page, "the refusal", () => !document.querySelector("#join-error").hidden, null, diag);
        assert.match(await page.textContent("#join-error"), /unauthorized: this server needs a token/);
        assert.equal(await page.evaluate(() => document.querySelector("#token-box").open), true);
        // A token minted with the secret: the identity is its sub.
        const token = mintToken(srv.secret, { sub: "dave", name: "Dave", rooms: [ROOM] });
        await page.fill("#token", token);
        await page.click("#join");
        await waitIn(page, "joined with the token", () => window.chat.status === "joined", null, diag);
        await page.fill("#text", "signed in with a token");
        await page.press("#text", "Enter");
        await waitText(page, "signed in with a token", diag);
        assert.deepEqual(await shown(page), ["Dave: signed in with a token"], "shown by the name from the token");
        await waitPresence(page, "dave", true, diag);
      },
    ),
  );
});
