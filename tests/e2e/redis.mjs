// A real redis-server for the cluster end-to-end tests: a free loopback port, its own
// temporary directory, no persistence. Stopped (SIGKILL) by stop(), and at the latest when
// the test process exits. No mocks of Redis.
import { spawn } from "node:child_process";
import { accessSync, constants, mkdtempSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { freePort, killOnExit, sleep } from "./harness.mjs";

/** Path of redis-server (/usr/bin, /usr/local/bin, then $PATH), or null when it is not installed. */
export function redisServerBin() {
  const dirs = ["/usr/bin", "/usr/local/bin", ...(process.env.PATH || "").split(":").filter(Boolean)];
  for (const dir of dirs) {
    const candidate = path.join(dir, "redis-server");
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {}
  }
  return null;
}

/** Whether something accepts TCP connections on 127.0.0.1:port. */
function accepts(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

/**
 * Start redis-server on a free port; resolves {url, port, stop()} once it accepts
 * connections. Tries another port when the first one was taken meanwhile.
 */
export async function startRedis({ readyTimeoutMs = 15000 } = {}) {
  const bin = redisServerBin();
  if (!bin) throw new Error("redis-server is not installed (apt-get install redis-server)");
  let lastLog = "";
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const dir = mkdtempSync(path.join(os.tmpdir(), "corelay-e2e-redis-"));
    const logfile = path.join(dir, "redis.log");
    const proc = spawn(
      bin,
      ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--logfile", logfile, "--save", "", "--appendonly", "no", "--protected-mode", "no"],
      { stdio: "ignore" },
    );
    killOnExit(proc);
    let exited = false;
    proc.on("exit", () => (exited = true));
    const stop = async () => {
      if (!exited) {
        const gone = new Promise((r) => proc.once("exit", r));
        proc.kill("SIGKILL");
        await gone;
      }
      rmSync(dir, { recursive: true, force: true });
    };
    const end = Date.now() + readyTimeoutMs;
    while (Date.now() < end && !exited) {
      let log = "";
      try {
        log = readFileSync(logfile, "utf8");
      } catch {}
      if (log.includes("Ready to accept connections") && (await accepts(port))) {
        return { url: `redis://127.0.0.1:${port}`, port, stop };
      }
      lastLog = log;
      await sleep(20);
    }
    try {
      lastLog = readFileSync(logfile, "utf8");
    } catch {}
    await stop();
  }
  throw new Error(`redis-server did not start:\n${lastLog}`);
}
