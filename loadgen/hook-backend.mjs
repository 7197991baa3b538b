// A backend for the hooks benchmark: answers every hook at once ({"ok":true}), and takes
// feed batches, with no logging and no checks, so that what is measured is corelay's side
// of a hook call against a backend that answers in well under a millisecond.
//
//   PORT=3100 node loadgen/hook-backend.mjs
import http from "node:http";

const port = Number(process.env.PORT ?? 3100);
let calls = 0;
const server = http.createServer((req, res) => {
  req.on("data", () => {});
  req.on("end", () => {
    calls++;
    res.writeHead(200, { "content-type": "application/json", "content-length": 11 });
    res.end('{"ok":true}');
  });
});
server.keepAliveTimeout = 60_000;
server.listen(port, "127.0.0.1", () => console.log(`hook backend listening on ${port}`));
process.on("SIGTERM", () => {
  console.log(`hook backend: ${calls} calls`);
  process.exit(0);
});
