// Headless Chromium for the tests of corelay's own pages (chat-page, console): Debian's
// /usr/bin/chromium driven by playwright-core, which never downloads a browser (see
// browser.test.mjs for why playwright-core stays on 1.61.x).
import { existsSync, mkdirSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { chromium } from "playwright-core";
import { REPO_ROOT } from "./harness.mjs";

export const CHROMIUM = process.env.CORELAY_E2E_CHROMIUM || "/usr/bin/chromium";
export const STEP_MS = 15_000; // bound of every single wait in the browser

/** Why the browser tests cannot run here, or null. */
export function chromiumMissing() {
  return existsSync(CHROMIUM) ? null : `${CHROMIUM} not found: install Debian's chromium (scripts/test.sh does)`;
}

/** Launches headless chromium; `diag()` gives every page's console so far. */
export async function launch() {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 30_000,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const lines = [];
  return {
    browser,
    diag: () => `\nbrowser console:\n${lines.join("\n") || "(none)"}`,
    /** A new page (own context: own storage) whose console and errors are recorded. */
    async page(label, viewport = { width: 1000, height: 700 }) {
      const context = await browser.newContext({ viewport });
      const page = await context.newPage();
      page.setDefaultTimeout(STEP_MS);
      page.on("console", (m) => lines.push(`[${label} console.${m.type()}] ${m.text()}`));
      page.on("pageerror", (e) => lines.push(`[${label} pageerror] ${e.message}`));
      return page;
    },
  };
}

/** Waits for a predicate in the page; on timeout fails naming `what`, with `diag()`. */
export async function waitIn(page, what, fn, arg, diag = () => "") {
  try {
    await page.waitForFunction(fn, arg, { timeout: STEP_MS, polling: 50 });
  } catch (e) {
    throw new Error(`browser: timed out after ${STEP_MS} ms waiting for ${what}${diag()}`, { cause: e });
  }
}

/**
 * Saves a screenshot as `name` under CORELAY_SCREENSHOTS_DIR (relative to the repository)
 * when that is set (scripts/screenshots.sh sets it to docs/screenshots).
 */
export async function screenshot(page, name, { fullPage = false } = {}) {
  const dir = process.env.CORELAY_SCREENSHOTS_DIR;
  if (!dir) return;
  const full = path.resolve(REPO_ROOT, dir);
  mkdirSync(full, { recursive: true });
  await page.screenshot({ path: path.join(full, name), fullPage });
}

/**
 * A TCP proxy to 127.0.0.1:`port` on a free loopback port, whose link can be cut: `cut()`
 * destroys every proxied connection and refuses new ones until `restore()`. A page loaded
 * through it loses its WebSocket as on a real network drop (no close frame).
 */
export async function cuttableProxy(port) {
  const live = new Set();
  let refusing = false;
  const server = net.createServer((client) => {
    if (refusing) return client.destroy();
    const upstream = net.connect(port, "127.0.0.1");
    const pair = [client, upstream];
    live.add(pair);
    const end = () => {
      live.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut() {
      refusing = true;
      for (const [a, b] of live) {
        a.destroy();
        b.destroy();
      }
      live.clear();
    },
    restore() {
      refusing = false;
    },
    close() {
      this.cut();
      return new Promise((r) => server.close(() => r()));
    },
  };
}
