// Cluster end to end: three corelay hosts (`serve --redis URL --store redis`) on one real
// redis-server, a socket.io-client on each. A message sent on any host reaches every
// host's members and not the sender; concurrent senders on three hosts give every
// receiver one contiguous offset sequence; thirty rooms at once, each in order and once,
// history agreeing; a member that was away recovers on another host; typing and presence
// cross hosts; a killed host's user goes offline once. The checks are crossHostChecks
// (redis.mjs), which redis-cluster.test.mjs runs on a Redis Cluster too.
// PROTOCOL.md "Server → client events", "Guarantees"; ARCHITECTURE.md "Between hosts:
// Redis". Skipped (with the reason) only when redis-server is not installed;
// scripts/test.sh installs it.
import { randomBytes } from "node:crypto";
import { after, before, describe } from "node:test";
import { closeAll } from "./harness.mjs";
import { crossHostChecks, redisServerBin, startHosts, startRedis } from "./redis.mjs";

const SKIP = redisServerBin()
  ? false
  : "redis-server is not installed (apt-get install redis-server; scripts/test.sh does it): cluster tests skipped";

describe("cluster: three hosts, one redis", { skip: SKIP }, () => {
  const ctx = { hosts: [], secret: "e2e-cluster-" + randomBytes(12).toString("hex"), ttlMs: 2000, cluster: null };
  let redis;
  before(async () => {
    redis = await startRedis();
    ctx.hosts = await startHosts([redis.url, redis.url, redis.url], ctx);
  });
  after(async () => {
    closeAll();
    await Promise.all(ctx.hosts.map((h) => h.stop()));
    if (redis) await redis.stop();
  });

  crossHostChecks(ctx);
});
