// chat.js: the chat page at / (assets/chat.html). One room per page: pick a name, join,
// see the room's recent history, then live messages, who is here, who is typing.
//
// How it stays whole across a drop (PROTOCOL.md "Rooms", "Guarantees"): every message
// of a room has an offset 1, 2, 3, … without gaps. The page remembers `upTo`, the offset
// up to which it holds every message. When the link drops, SioClient reconnects with
// backoff; the page then joins again with {since: upTo}, and the join's ack carries
// `missed`: exactly the messages it did not see. Messages are kept by offset, so one
// that arrives twice (live and in `missed`) is shown once.
import { SioClient } from "/assets/sio.js";

const $ = (id) => document.getElementById(id);
const TYPING_EVERY_MS = 2000; // we say "typing" at most this often…
const TYPING_SHOWN_MS = 3500; // …and show another's "typing" this long after their last
const HISTORY_LIMIT = 50;

const state = {
  socket: null,
  me: null, // our user id: the name (dev mode) or the token's sub
  room: null,
  joined: false, // joined once: later joins are re-joins with since
  upTo: 0, // every message with offset ≤ upTo is in `messages`
  messages: new Map(), // offset → message
  users: new Map(), // user → {name, online}
  typing: new Map(), // user → timer that clears their "typing"
  lastTypingSent: 0,
  outbox: [], // sends whose ack the link lost: {text, cid}, sent again after the re-join
};
// For tests and the curious (devtools): what the page did, without reading the DOM.
window.chat = { status: "idle", joins: [], errors: [] };

// ------------------------------------------------------------------ joining

$("join-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("name").value.trim();
  const token = $("token").value.trim();
  const room = $("room").value.trim();
  if (!/^[A-Za-z0-9_.:@-]{1,128}$/.test(room)) return showJoinError("a room name is 1–128 of A–Z a–z 0–9 _ . : @ -");
  if (!token && !name) return showJoinError("pick a name");
  // With a token the server takes the identity from it; we read `sub` only to know which
  // messages are ours (display only: the server checked the signature, we cannot).
  state.me = token ? tokenSub(token) : name;
  state.room = room;
  $("join").disabled = true;
  const auth = () => (token ? { token } : { user: name, name });
  const socket = new SioClient({ path: document.querySelector('meta[name="corelay-path"]').content, auth });
  state.socket = socket;
  window.chat.socket = socket;
  socket.on("connect", () => onConnect().catch((err) => note(`join failed: ${err.message}`, "error")));
  socket.on("disconnect", (reason) => {
    setStatus("offline", `disconnected: ${reason}`);
    if (state.joined) note(`connection lost (${reason}): reconnecting…`);
  });
  socket.on("reconnecting", (attempt, ms) => setStatus("offline", `reconnecting in ${(ms / 1000).toFixed(1)} s (attempt ${attempt})`));
  socket.on("connect_error", (err) => {
    const why = err.message === "unauthorized" && !token ? "unauthorized: this server needs a token (see below)" : err.message;
    setStatus("offline", `refused: ${err.message}`);
    showJoinError(why);
    $("token-box").open = !token;
    $("join").disabled = false;
  });
  socket.on("message", (m) => m.room === state.room && addMessage(m));
  socket.on("presence", onPresence);
  socket.on("typing", onTyping);
  setStatus("offline", "connecting…");
  socket.open();
});

/** A (re)connect: join the room, first time with its recent history, later with `since`. */
async function onConnect() {
  setStatus("online", "connected");
  const first = !state.joined;
  const ack = await state.socket.emitWithAck("join", first ? { room: state.room } : { room: state.room, since: state.upTo });
  if (!ack.ok) {
    setStatus("offline", `join refused: ${ack.error.code}`);
    showJoinError(`${ack.error.code}: ${ack.error.message}`);
    state.socket.close();
    $("join").disabled = false;
    return;
  }
  window.chat.joins.push({ since: first ? null : state.upTo, offset: ack.offset, missed: ack.missed?.length ?? null });
  if (first) {
    state.joined = true;
    state.upTo = ack.offset; // from here on, offsets above it arrive live
    $("join-form").hidden = true;
    $("chat-view").hidden = false;
    $("room-title").textContent = `# ${state.room} as ${state.me}`;
    const history = await state.socket.emitWithAck("history", { room: state.room, limit: HISTORY_LIMIT });
    if (history.ok) history.messages.forEach(addMessage);
    note(`joined #${state.room}`);
    $("text").focus();
  } else {
    // Truncated: `missed` holds only the newest history.max_replay; accept the gap before
    // them rather than asking for it again at every reconnect.
    if (ack.truncated && ack.missed.length) state.upTo = Math.max(state.upTo, ack.missed[0].offset - 1);
    ack.missed.forEach(addMessage);
    const n = ack.missed.length;
    note(n ? `back online: ${n} message${n > 1 ? "s" : ""} you missed` : "back online: you missed nothing");
    if (ack.truncated) note("older missed messages were left out (history.max_replay)");
    for (const { text, cid } of state.outbox.splice(0)) send(text, cid);
  }
  await refreshPresence();
  window.chat.status = "joined";
}

/** The room's members as the server knows them now (cluster-wide). */
async function refreshPresence() {
  const ack = await state.socket.emitWithAck("presence", { room: state.room });
  if (!ack.ok) return;
  for (const u of state.users.values()) u.online = false;
  for (const { user, name } of ack.users) state.users.set(user, { name, online: true });
  renderPresence();
}

// ------------------------------------------------------------------ messages

/** Adds a message once, in offset order, and moves `upTo` past every contiguous one. */
function addMessage(m) {
  if (state.messages.has(m.offset)) return;
  state.messages.set(m.offset, m);
  while (state.messages.has(state.upTo + 1)) state.upTo++;
  const li = document.createElement("li");
  li.dataset.offset = m.offset;
  li.className = m.user === state.me ? "mine" : "";
  const who = document.createElement("b");
  who.textContent = displayName(m.user);
  const when = document.createElement("time");
  when.textContent = new Date(m.ts).toLocaleTimeString();
  when.title = `offset ${m.offset}`;
  const text = document.createElement("span");
  text.textContent = m.text; // textContent, never innerHTML: messages are not markup
  li.append(who, " ", text, " ", when);
  // Insert before the first message with a higher offset (history may come after live ones).
  const after = [...$("messages").children].find((el) => el.dataset.offset && Number(el.dataset.offset) > m.offset);
  $("messages").insertBefore(li, after || null);
  if (!after) li.scrollIntoView({ block: "end" });
  clearTyping(m.user);
}

/** A line from the page itself (joined, back online, errors). */
function note(text, kind = "note") {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
}

$("send-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("text").value;
  if (!text.trim()) return;
  $("text").value = "";
  send(text, randomId());
});

/** Sends a message. `cid` makes a retry idempotent: the server acks a repeat (same user,
 * room and cid) with the first ack and stores nothing. So a send whose ack was lost with
 * the link waits in the outbox and goes again, same cid, after the re-join. */
async function send(text, cid) {
  try {
    const ack = await state.socket.emitWithAck("message", { room: state.room, text, cid });
    if (!ack.ok) throw new Error(`${ack.error.code}: ${ack.error.message}`);
    // The server does not echo our own message back: we add it from the ack.
    addMessage({ room: state.room, id: ack.id, offset: ack.offset, ts: ack.ts, user: state.me, text, cid });
  } catch (err) {
    if (err.linkLost) {
      state.outbox.push({ text, cid });
      note(`offline: "${text}" will be sent when back online`);
      return;
    }
    note(`not sent (${err.message}): ${text}`, "error");
    window.chat.errors.push(err.message);
    if (!$("text").value) $("text").value = text;
  }
}

// ------------------------------------------------------------------ presence and typing

function onPresence({ room, user, online }) {
  if (room !== state.room || user === state.me) return;
  const known = state.users.get(user);
  state.users.set(user, { name: known?.name, online });
  note(`${displayName(user)} ${online ? "is here" : "left"}`);
  if (!online) clearTyping(user);
  renderPresence();
}

function renderPresence() {
  const ul = $("presence");
  ul.replaceChildren();
  const users = [...state.users.entries()].sort(([a], [b]) => a.localeCompare(b));
  for (const [user, { online }] of users) {
    const li = document.createElement("li");
    li.dataset.user = user;
    li.className = online ? "online" : "offline";
    li.textContent = displayName(user) + (user === state.me ? " (you)" : "");
    ul.append(li);
  }
}

$("text").addEventListener("input", () => {
  const now = Date.now();
  if (!state.joined || now - state.lastTypingSent < TYPING_EVERY_MS) return;
  state.lastTypingSent = now;
  state.socket.emit("typing", { room: state.room }); // volatile: no ack, dropped offline
});

function onTyping({ room, user }) {
  if (room !== state.room || user === state.me) return;
  clearTimeout(state.typing.get(user));
  state.typing.set(user, setTimeout(() => clearTyping(user), TYPING_SHOWN_MS));
  renderTyping();
}

function clearTyping(user) {
  if (!state.typing.has(user)) return;
  clearTimeout(state.typing.get(user));
  state.typing.delete(user);
  renderTyping();
}

function renderTyping() {
  const names = [...state.typing.keys()].map(displayName);
  $("typing").textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}

// ------------------------------------------------------------------ small helpers

function displayName(user) {
  return state.users.get(user)?.name || user;
}

function setStatus(kind, text) {
  $("status").className = `pill ${kind}`;
  $("status").textContent = text;
  window.chat.status = text;
}

function showJoinError(text) {
  $("join-error").hidden = false;
  $("join-error").textContent = text;
}

/** A JWT's `sub`, read without verifying (display only). */
function tokenSub(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).sub ?? null;
  } catch {
    return null;
  }
}

/** 16 random bytes as hex (crypto.randomUUID needs a secure context; this does not). */
function randomId() {
  return [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
}
