// An example of the application's backend in corelay's loop (PROTOCOL.md, "The
// application's backend in the loop"): it answers the hooks and reads the feed.
// Dependency-free Node (>= 18):
//
//   HOOKS_SECRET=change-me PORT=3000 node examples/backend/server.mjs
//   CORELAY_HOOKS_URL=http://127.0.0.1:3000 CORELAY_HOOKS_SECRET=change-me \
//   CORELAY_HOOKS_CONNECT=true CORELAY_HOOKS_JOIN=true CORELAY_HOOKS_PUBLISH=true \
//   CORELAY_HOOKS_RPC=true CORELAY_FEED_URL=http://127.0.0.1:3000/feed corelay serve
//
// The rules are a demo of each hook, not advice:
// - connect: a `session=<user>` cookie (or `auth.session`) is that user; user `mallory` is banned;
// - join:    `team-*` rooms for every user, `vip-*` only for users whose name starts with `vip`;
// - publish: "darn" is rewritten to "d**n"; a text with "spam" is refused;
// - rpc:     `markAsRead({room, offset})` remembers how far a user read; `whoami()`;
// - feed:    `POST /feed {"events":[…]}` is printed, one line per event.
// It prints `backend listening on http://HOST:PORT` once ready (PORT=0 picks a free one).

import { createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";

const SECRET = process.env.HOOKS_SECRET || "";
const HOST = process.env.HOST || "127.0.0.1";
const PORT = Number(process.env.PORT ?? 3000);
/** Signed requests older than this are refused (replays). */
const MAX_SKEW_MS = 5 * 60 * 1000;
const MAX_BODY = 1 << 20;

/** How far each user read, per room: `user -> room -> offset`. */
const readMarks = new Map();

/** Whether the request carries corelay's signature of `body` (always true without a secret). */
function signedByCorelay(req, body) {
  if (!SECRET) return true;
  const ts = req.headers["x-corelay-timestamp"];
  const sig = req.headers["x-corelay-signature"];
  if (typeof ts !== "string" || typeof sig !== "string") return false;
  if (Math.abs(Date.now() - Number(ts)) > MAX_SKEW_MS) return false;
  const want = "sha256=" + createHmac("sha256", SECRET).update(`${ts}.`).update(body).digest("hex");
  const a = Buffer.from(sig);
  const b = Buffer.from(want);
  return a.length === b.length && timingSafeEqual(a, b);
}

/** `name=value` pairs of a Cookie header. */
function cookies(header = "") {
  const out = {};
  for (const part of header.split(";")) {
    const at = part.indexOf("=");
    if (at > 0) out[part.slice(0, at).trim()] = decodeURIComponent(part.slice(at + 1).trim());
  }
  return out;
}

const refuse = (code, message) => ({ error: { code, message } });

const hooks = {
  connect({ auth, headers }) {
    const user = cookies(headers?.cookie).session || auth?.session;
    if (typeof user !== "string" || !user) return refuse("unauthorized", "no session");
    if (user === "mallory") return refuse("banned", "this user is banned");
    return { user, name: user[0].toUpperCase() + user.slice(1), rooms: ["lobby", `dm:${user}:*`] };
  },
  join({ user, room }) {
    if (room.startsWith("team-")) return { ok: true };
    if (room.startsWith("vip-") && user.startsWith("vip")) return { ok: true };
    return refuse("members_only", `${room} is for its members`);
  },
  publish({ text }) {
    if (/spam/i.test(text)) return refuse("spam", "no advertising here");
    if (/darn/i.test(text)) return { ok: true, text: text.replace(/darn/gi, "d**n") };
    return { ok: true };
  },
  rpc({ user, event, args }) {
    if (event === "whoami") return { result: { user } };
    if (event === "markAsRead") {
      const { room, offset } = args[0] ?? {};
      if (typeof room !== "string" || !Number.isInteger(offset)) return refuse("bad_request", "markAsRead({room, offset})");
      if (!readMarks.has(user)) readMarks.set(user, new Map());
      readMarks.get(user).set(room, offset);
      return { result: { room, offset } };
    }
    return refuse("unknown_rpc", `no such call: ${event}`);
  },
  feed({ events }) {
    for (const e of events ?? []) console.log(`feed ${JSON.stringify(e)}`);
    return {};
  },
};

function answer(res, status, json) {
  const body = JSON.stringify(json);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

const server = createServer((req, res) => {
  const chunks = [];
  let size = 0;
  req.on("data", (c) => {
    size += c.length;
    if (size > MAX_BODY) req.destroy();
    else chunks.push(c);
  });
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    const name = req.url.split("?")[0].split("/").pop();
    const hook = Object.hasOwn(hooks, name) ? hooks[name] : null;
    if (req.method !== "POST" || !hook) return answer(res, 404, refuse("not_found", req.url));
    if (!signedByCorelay(req, body)) return answer(res, 401, refuse("bad_signature", "not signed by corelay"));
    let input;
    try {
      input = JSON.parse(body.toString("utf8"));
    } catch {
      return answer(res, 400, refuse("bad_request", "not JSON"));
    }
    const out = hook(input);
    if (name !== "feed") console.log(`hook ${name} ${JSON.stringify(input)} -> ${JSON.stringify(out)}`);
    answer(res, 200, out);
  });
});
server.listen(PORT, HOST, () => {
  const { port } = server.address();
  console.log(`backend listening on http://${HOST}:${port}`);
});
