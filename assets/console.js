// console.js: the live console at /console (assets/console.html).
//
// Every second it fetches GET /api/console: raw counters per shard (messages in and out,
// queue drops, a cumulative fan-out histogram), gauges (connections, rooms), Redis, the
// store, and places for the backend hooks and the feed. The server keeps no rates: this
// page computes them from successive samples, (counter now − counter then) / (ts now −
// ts then), so every figure per second shown here was measured over real time.
//
// The key: a page load cannot carry an Authorization header, so the page itself is
// static and asks for the key when /api/console answers 401. It is kept in
// sessionStorage (this tab only, gone when the tab closes) and sent as a Bearer header.

const $ = (id) => document.getElementById(id);
const KEY_ITEM = "corelay.apiKey";
const EVERY_MS = 1000;
const FANOUT_WINDOW_MS = 10_000; // quantiles over this much history: a quiet second is not a blank

const samples = []; // the last ~10 s of answers, oldest first
window.consoleState = { samples, errors: 0, unauthorized: false }; // for tests and devtools
let timer = null;

async function poll() {
  clearTimeout(timer);
  if (document.hidden) {
    // Nobody is looking: ask nothing, and start the rates afresh when the tab comes back.
    samples.length = 0;
    timer = setTimeout(poll, EVERY_MS);
    return;
  }
  const key = sessionStorage.getItem(KEY_ITEM);
  let res;
  try {
    res = await fetch("/api/console", { headers: key ? { Authorization: `Bearer ${key}` } : {}, cache: "no-store" });
  } catch (err) {
    return retry(`unreachable: ${err.message}`);
  }
  if (res.status === 401) {
    const why = (await res.json().catch(() => null))?.error?.message;
    return askForKey(key ? "That key was refused." : null, why);
  }
  if (!res.ok) return retry(`HTTP ${res.status}`);
  const sample = await res.json();
  samples.push(sample);
  while (samples.length > 2 && sample.ts_ms - samples[1].ts_ms >= FANOUT_WINDOW_MS) samples.shift();
  render(sample);
  timer = setTimeout(poll, EVERY_MS);
}

function retry(why) {
  window.consoleState.errors++;
  setStatus("offline", why);
  timer = setTimeout(poll, EVERY_MS);
}

// ------------------------------------------------------------------ the key

function askForKey(refused, serverSays) {
  window.consoleState.unauthorized = true;
  sessionStorage.removeItem(KEY_ITEM);
  $("board").hidden = true;
  $("forget").hidden = true;
  $("key-form").hidden = false;
  if (refused || serverSays) $("key-why").textContent = [refused, serverSays].filter(Boolean).join(" ");
  setStatus("offline", "API key needed");
  $("key").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("key").value.trim());
  $("key").value = "";
  $("key-form").hidden = true;
  window.consoleState.unauthorized = false;
  poll();
});

$("forget").addEventListener("click", () => {
  clearTimeout(timer);
  askForKey(null, "Key forgotten.");
});

// ------------------------------------------------------------------ rates and quantiles

/** Per second between two samples of a counter; null if it went backwards (a restart). */
function rate(now, then, pick) {
  if (!then) return null;
  const seconds = (now.ts_ms - then.ts_ms) / 1000;
  const delta = pick(now) - pick(then);
  return seconds > 0 && delta >= 0 ? delta / seconds : null;
}

/** Quantile q of the observations between two cumulative histograms, as the upper
 * bound of the bucket it falls in: the histogram knows no more than that, so the page
 * shows "≤ bound" rather than a figure interpolated inside the bucket. null when nothing
 * happened in between; Infinity above the last bound. */
function quantile(q, bounds, now, then) {
  if (!then) return null; // one sample: no window yet
  const count = now.count - then.count;
  if (count <= 0) return null;
  const target = q * count;
  for (let i = 0; i < bounds.length; i++) {
    if (now.buckets[i] - then.buckets[i] >= target) return bounds[i];
  }
  return Infinity;
}

/** The fan-out histogram of all shards added up. */
function sumFanout(sample) {
  const n = sample.fanout_bounds_s.length;
  return sample.shards.reduce(
    (acc, s) => ({ count: acc.count + s.fanout.count, buckets: acc.buckets.map((b, i) => b + s.fanout.buckets[i]) }),
    { count: 0, buckets: new Array(n).fill(0) },
  );
}

// ------------------------------------------------------------------ rendering

function render(now) {
  const prev = samples.length > 1 ? samples[samples.length - 2] : null;
  const oldest = samples.length > 1 ? samples[0] : null;
  const bounds = now.fanout_bounds_s;
  const sum = (s, k) => s.shards.reduce((acc, sh) => acc + sh[k], 0);
  $("board").hidden = false;
  $("forget").hidden = !sessionStorage.getItem(KEY_ITEM);
  $("updated").textContent = `updated ${new Date(now.ts_ms).toLocaleTimeString()}`;
  setStatus(now.draining ? "offline" : "online", now.draining ? "draining" : `live${now.dev_mode ? " (dev mode)" : ""}`);

  $("t-connections").textContent = sum(now, "connections");
  $("t-rooms").textContent = sum(now, "rooms");
  $("t-in").textContent = perSecond(rate(now, prev, (s) => sum(s, "messages_in")));
  $("t-out").textContent = perSecond(rate(now, prev, (s) => sum(s, "messages_out")));
  $("t-drops").textContent = perSecond(rate(now, prev, (s) => sum(s, "queue_drops")));
  const all = [sumFanout(now), oldest && sumFanout(oldest)];
  $("t-p50").textContent = duration(quantile(0.5, bounds, ...all));
  $("t-p99").textContent = duration(quantile(0.99, bounds, ...all));

  const rows = now.shards.map((s, i) => {
    const p = prev?.shards[i];
    const o = oldest?.shards[i];
    const link = now.redis === null ? "–" : s.redis_link_down ? "down" : "up";
    return [
      s.shard,
      s.connections,
      s.rooms,
      perSecond(rate(now, prev, (x) => x.shards[i]?.messages_in ?? 0)),
      perSecond(rate(now, prev, (x) => x.shards[i]?.messages_out ?? 0)),
      duration(quantile(0.5, bounds, s.fanout, o?.fanout)),
      duration(quantile(0.99, bounds, s.fanout, o?.fanout)),
      `${s.queue_drops}${p ? ` (+${Math.max(0, s.queue_drops - p.queue_drops)})` : ""}`,
      s.slow_consumer_closes,
      link,
    ];
  });
  $("shards").replaceChildren(...rows.map((cells) => row(cells)));

  renderRedis(now.redis);
  const store = now.store;
  $("store").replaceChildren(
    line("kind", `${store.kind} (durability ${store.durability})`),
    line("state", store.ok ? "ok" : `refusing writes: ${store.error}`, store.ok ? "ok" : "bad"),
  );
  renderOptional("hooks", now.hooks, "not configured (hooks.url unset)");
  renderOptional("feed", now.feed, "not configured (feed.url unset)");
}

function renderRedis(redis) {
  if (redis === null) {
    $("redis").replaceChildren(line("mode", "single host: no Redis (redis.url unset)"));
    return;
  }
  const parts = [
    line("link", redis.connected ? "connected" : "down", redis.connected ? "ok" : "bad"),
    line("pub/sub round trip", redis.pubsub_roundtrip_ms == null ? "–" : `${redis.pubsub_roundtrip_ms} ms`),
    line("shard links down", redis.shard_links_down, redis.shard_links_down ? "bad" : "ok"),
    line("kind", redis.cluster ? "Redis Cluster" : "standalone"),
  ];
  if (redis.nodes) {
    const table = document.createElement("table");
    table.append(row(["node", "role", "master", "slots", "state"], "th"));
    for (const n of redis.nodes) table.append(row([n.addr, n.role, n.master ?? "–", n.slots, n.up ? "up" : "down"]));
    parts.push(table);
  }
  $("redis").replaceChildren(...parts);
}

/** A section others fill in later (hooks, feed): null = not configured, else its fields. */
function renderOptional(id, value, off) {
  if (value === null || value === undefined) return $(id).replaceChildren(line("state", off));
  $(id).replaceChildren(...Object.entries(value).map(([k, v]) => line(k, typeof v === "object" ? JSON.stringify(v) : v)));
}

function row(cells, tag = "td") {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement(tag);
    td.textContent = c;
    if (c === "down") td.className = "bad";
    tr.append(td);
  }
  return tr;
}

function line(label, value, kind = "") {
  const p = document.createElement("p");
  const b = document.createElement("b");
  b.textContent = `${label}: `;
  const span = document.createElement("span");
  span.textContent = value;
  span.className = kind;
  p.append(b, span);
  return p;
}

function perSecond(x) {
  if (x === null) return "–";
  return x >= 100 ? Math.round(x).toLocaleString() : x.toFixed(1);
}

/** A quantile's bucket bound, e.g. "≤ 250 µs". */
function duration(seconds) {
  if (seconds === null) return "–";
  if (seconds === Infinity) return "> 1 s"; // above the last bound (metrics::LATENCY_BUCKETS)
  if (seconds < 0.001) return `≤ ${Math.round(seconds * 1e6)} µs`;
  return `≤ ${+(seconds * 1000).toFixed(1)} ms`;
}

function setStatus(kind, text) {
  $("status").className = `pill ${kind}`;
  $("status").textContent = text;
}

poll();
