// sio.js: a small Socket.IO v5 client over Engine.IO v4, WebSocket transport only.
// It is what the chat page at / speaks to corelay with; no third-party code, no build.
//
// Engine.IO v4 over a WebSocket sends one packet per text frame; its first character
// is the packet type:
//   0 open    server → client, JSON {sid, upgrades, pingInterval, pingTimeout, maxPayload}
//   1 close   either way
//   2 ping    server → client;  3 pong  client → server (answer every ping, at once)
//   4 message carries one Socket.IO packet (the rest of the frame)
// Socket.IO v5 packets, inside "4" (so a frame reads e.g. 42["message",{…}]):
//   40{auth}          CONNECT to namespace "/" with the auth payload
//   40{"sid":…}       … accepted          44{"message":…}  … refused (CONNECT_ERROR)
//   42["ev",…]        EVENT               42<id>["ev",…]   EVENT asking for an ack
//   43<id>[…]         ACK of our EVENT <id>
//   41                DISCONNECT
//
// A missed ping (none within pingInterval + pingTimeout) counts as a dropped link. After
// a drop the client reconnects with exponential backoff and jitter, and says "connect"
// again: the caller re-joins its rooms then (corelay's join {since} returns what it
// missed). After the server refuses the CONNECT (44) or disconnects us (41) it stops, as
// socket.io-client does: retrying the same credentials would only be refused again.
//
//   const socket = new SioClient({ auth: () => ({ user: "ann" }) });
//   socket.on("connect", async () => console.log(await socket.emitWithAck("join", { room: "lobby" })));
//   socket.on("message", (m) => console.log(m.user, m.text));
//   socket.open();

export class SioClient {
  /**
   * @param {object} o
   * @param {string} [o.path] the server's Engine.IO path (server.path)
   * @param {() => object} [o.auth] the CONNECT payload, asked again at every (re)connect
   * @param {number} [o.minDelay] first reconnect delay, ms (doubles each failed attempt)
   * @param {number} [o.maxDelay] longest reconnect delay, ms
   * @param {number} [o.ackTimeout] how long emitWithAck waits, ms
   */
  constructor({ path = "/socket.io/", auth = () => ({}), minDelay = 500, maxDelay = 5000, ackTimeout = 10000 } = {}) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    this.url = `${scheme}://${location.host}${path}?EIO=4&transport=websocket`;
    this.auth = auth;
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    this.ackTimeout = ackTimeout;
    this.connected = false; // Socket.IO CONNECT accepted on the current WebSocket
    this.attempts = 0; // failed attempts since the last successful connect
    this.listeners = new Map(); // event name → [handler]
    this.acks = new Map(); // ack id → {resolve, reject, timer}
    this.nextAckId = 0;
    this.ws = null;
    this.wanted = false; // false after close(), a refused CONNECT or a server DISCONNECT
    this.pingTimer = null;
    this.retryTimer = null;
  }

  /** Calls `handler(...args)` for every `event`: a server event, or one of ours
   * ("connect", "disconnect" (reason), "connect_error" (error), "reconnecting" (attempt, ms)). */
  on(event, handler) {
    if (!this.listeners.has(event)) this.listeners.set(event, []);
    this.listeners.get(event).push(handler);
    return this;
  }

  /** Starts connecting (and reconnecting after drops until close()). */
  open() {
    this.wanted = true;
    this.dial();
  }

  /** Disconnects for good: DISCONNECT, then the WebSocket is closed. */
  close() {
    this.wanted = false;
    clearTimeout(this.retryTimer);
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send("41");
    this.ws?.close(1000);
  }

  /** Sends an event without asking for an ack; false (and dropped) while disconnected,
   * like a volatile emit: fine for "typing". */
  emit(event, ...args) {
    if (!this.connected) return false;
    this.ws.send("42" + JSON.stringify([event, ...args]));
    return true;
  }

  /** Sends an event and resolves with the server's ack (its first argument). Rejects
   * on timeout, and with `err.linkLost` while disconnected or when the link drops
   * before the ack came (the server may or may not have acted on it). */
  emitWithAck(event, ...args) {
    if (!this.connected) return Promise.reject(linkLost("not connected"));
    const id = this.nextAckId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.acks.delete(id);
        reject(new Error(`no ack for "${event}" within ${this.ackTimeout} ms`));
      }, this.ackTimeout);
      this.acks.set(id, { resolve, reject, timer });
      this.ws.send("42" + id + JSON.stringify([event, ...args]));
    });
  }

  // ------------------------------------------------------------------ internals

  fire(event, ...args) {
    for (const handler of this.listeners.get(event) || []) {
      try {
        handler(...args);
      } catch (e) {
        console.error(`handler of "${event}" threw`, e);
      }
    }
  }

  /** Opens a WebSocket; everything else happens in its callbacks. */
  dial() {
    clearTimeout(this.retryTimer);
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onmessage = (e) => {
      if (this.ws !== ws || typeof e.data !== "string") return; // corelay sends no binary to us
      try {
        this.onFrame(e.data);
      } catch (err) {
        // A frame we cannot read: drop the link (and reconnect), as the server does.
        console.error("unreadable frame, reconnecting", err);
        ws.close();
      }
    };
    ws.onclose = (e) => {
      if (this.ws === ws) this.onClose(e.wasClean ? `closed (${e.code})` : "transport error");
    };
  }

  /** One Engine.IO packet. */
  onFrame(frame) {
    switch (frame[0]) {
      case "0": {
        // Open: from now on the server pings every pingInterval and waits pingTimeout.
        const open = JSON.parse(frame.slice(1));
        this.pingWindow = open.pingInterval + open.pingTimeout;
        this.expectPing();
        this.ws.send("40" + JSON.stringify(this.auth()));
        break;
      }
      case "2": // ping → pong, and the link is alive
        this.ws.send("3");
        this.expectPing();
        break;
      case "1":
        this.ws.close();
        break;
      case "4":
        this.onPacket(frame.slice(1));
        break;
    }
  }

  /** One Socket.IO packet (namespace "/" only: corelay serves no other). */
  onPacket(packet) {
    const type = packet[0];
    const rest = packet.slice(1);
    if (type === "0") {
      this.connected = true;
      this.attempts = 0;
      this.fire("connect");
    } else if (type === "4") {
      let err;
      try {
        err = JSON.parse(rest);
      } catch {
        err = { message: rest };
      }
      this.wanted = false; // refused: do not hammer the server with the same credentials
      this.fire("connect_error", err);
      this.ws.close();
    } else if (type === "1") {
      this.wanted = false; // the server disconnected us on purpose
      this.ws.close();
    } else if (type === "2" || type === "3") {
      const digits = /^\d*/.exec(rest)[0];
      const args = JSON.parse(rest.slice(digits.length));
      if (type === "2") {
        // (An event asking us for an ack would carry an id here: corelay sends none.)
        this.fire(args[0], ...args.slice(1));
      } else {
        const pending = this.acks.get(Number(digits));
        if (pending) {
          this.acks.delete(Number(digits));
          clearTimeout(pending.timer);
          pending.resolve(args[0]);
        }
      }
    }
  }

  /** (Re)arms the ping watchdog: no ping in time means the link is dead. */
  expectPing() {
    clearTimeout(this.pingTimer);
    this.pingTimer = setTimeout(() => this.ws?.close(), this.pingWindow);
  }

  /** The WebSocket is gone: fail pending acks, tell the page, maybe retry. */
  onClose(reason) {
    clearTimeout(this.pingTimer);
    const wasConnected = this.connected;
    this.connected = false;
    this.ws = null;
    for (const { reject, timer } of this.acks.values()) {
      clearTimeout(timer);
      reject(linkLost("disconnected before the ack"));
    }
    this.acks.clear();
    if (wasConnected) this.fire("disconnect", reason);
    if (!this.wanted) return;
    // Exponential backoff with jitter (50–100% of the step), so that many clients
    // dropped together do not come back in one wave.
    const step = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempts);
    const delay = Math.round(step * (0.5 + Math.random() / 2));
    this.attempts++;
    this.fire("reconnecting", this.attempts, delay);
    this.retryTimer = setTimeout(() => this.dial(), delay);
  }
}

/** An error saying the link, not the server, failed the call: worth retrying later. */
function linkLost(message) {
  return Object.assign(new Error(message), { linkLost: true });
}
