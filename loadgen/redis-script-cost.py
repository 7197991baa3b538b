#!/usr/bin/env python3
"""Redis's CPU per message for corelay's publish script, against floors that do less.

Usage: loadgen/redis-script-cost.py [--rooms 13] [--calls 20000] [--rounds 3]

Starts its own redis-server on a free port (no persistence), with two subscribers
reading every room's channel (two hosts), and sends EVALSHA calls one after another,
each carrying one message for each of `--rooms` rooms with unique texts: the shape of a
10,000 msg/s load over 100 rooms, where a call holds ~1 message per room. Redis's CPU is
its utime + stime from /proc over the calls. Variants:

- `script`: the publish script as src/cluster/scripts.rs has it (no cid, no trimming by
  age), with the arguments the shards send;
- `incr+xadd+pub`: a bare script that per room moves the counter and per message makes
  one XADD and one PUBLISH (what the script cannot do without);
- `xadd+pub`: per message one XADD and one PUBLISH, no counter;
- `xadd`: per message one XADD only (history kept, nothing published);
- `publish`: plain PUBLISH commands, pipelined, no script: the peer's cost per message.

It prints microseconds of Redis CPU per message, per round. No figure here is a
test; BENCHMARKS.md reports them.
"""
import argparse, json, os, random, re, socket, string, subprocess, sys, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "..", "src", "cluster", "scripts.rs")


def lua(name):
    src = open(SCRIPTS).read()
    return re.search(r"const %s: &str = r#\"(.*?)\"#;" % name, src, re.S).group(1)


def enc(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.f = self.s.makefile("rb")

    def read(self):
        line = self.f.readline()
        t = line[:1]
        if t in b"+-:":
            if t == b"-":
                raise RuntimeError(line.decode().strip())
            return line[1:-2]
        if t == b"$":
            n = int(line[1:-2])
            return None if n < 0 else self.f.read(n + 2)[:-2]
        if t == b"*":
            return [self.read() for _ in range(int(line[1:-2]))]
        raise RuntimeError("unexpected reply %r" % line)

    def call(self, *a):
        self.s.sendall(enc(a))
        return self.read()


def ticks(pid):
    st = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return int(st[11]) + int(st[12])


def text():
    return "".join(random.choice(string.ascii_letters) for _ in range(40))


BARE = r"""
local a = 2
local out = {}
for r = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a])
  local first = WITH_COUNTER
  for i = 0, n - 1 do
    local id = string.format('%d', first + i) .. '-0'
    redis.call('XADD', KEYS[2*r], 'MAXLEN', '~', '10000', id, 'm', ARGV[a + 1 + i])
    PUBLISH_LINE
  end
  out[r] = first
  a = a + STEP + n
end
return out
"""


def bare(counter, publish):
    body = BARE.replace(
        "WITH_COUNTER",
        "redis.call('INCRBY', KEYS[2*r-1], n) - n + 1" if counter else "tonumber(ARGV[a + 1 + n])",
    )
    body = body.replace("STEP", "1" if counter else "2")
    return body.replace("PUBLISH_LINE", "redis.call('PUBLISH', KEYS[2*r-1], ARGV[a + 1 + i])" if publish else "")


def script_call(sha, c, rooms):
    keys, args = [], []
    for r in range(rooms):
        room = "r%d" % r
        keys += ["corelay:{%s}:offset" % room, "corelay:{%s}:stream" % room]
        args += ["corelay:{%s}" % room, 0, 1, 'm{"room":"%s","offset":' % room]
        suffix = json.dumps({"id": "i%d-%d" % (c, r), "user": "u1", "text": text(), "ts": 1700000000000 + c})
        args += ["", "," + suffix[1:]]
    return ["EVALSHA", sha, len(keys)] + keys + [600000, 10000, 0, "PUBLISH", 0, rooms, 0] + args


def bare_call(sha, c, rooms, explicit_ids):
    keys, args = [], [rooms]
    for r in range(rooms):
        room = "r%d" % r
        keys += ["corelay:{%s}" % room, "corelay:{%s}:stream" % room]
        payload = json.dumps({"room": room, "id": "i%d-%d" % (c, r), "user": "u1", "text": text(), "ts": 1700000000000 + c})
        args += [1, payload] + ([c + 1] if explicit_ids else [])
    return ["EVALSHA", sha, len(keys)] + keys + args


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rooms", type=int, default=13)
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3)
    o = p.parse_args()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = tempfile.mkdtemp(prefix="corelay-script-cost-")
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                c = Conn(port)
                break
            except OSError:
                time.sleep(0.05)
        channels = ["corelay:{r%d}" % r for r in range(o.rooms)]

        def subscriber():
            sub = socket.create_connection(("127.0.0.1", port))
            sub.sendall(enc(["SUBSCRIBE"] + channels))
            while sub.recv(1 << 20):
                pass

        for _ in range(2):
            threading.Thread(target=subscriber, daemon=True).start()
        time.sleep(0.2)
        hz = os.sysconf("SC_CLK_TCK")
        full = lua("HELPERS") + "\n" + lua("PUBLISH_BODY")
        variants = [
            ("script", c.call("SCRIPT", "LOAD", full).decode(), lambda sha, i: script_call(sha, i, o.rooms)),
            ("incr+xadd+pub", c.call("SCRIPT", "LOAD", bare(True, True)).decode(), lambda sha, i: bare_call(sha, i, o.rooms, False)),
            ("xadd+pub", c.call("SCRIPT", "LOAD", bare(False, True)).decode(), lambda sha, i: bare_call(sha, i, o.rooms, True)),
            ("xadd", c.call("SCRIPT", "LOAD", bare(False, False)).decode(), lambda sha, i: bare_call(sha, i, o.rooms, True)),
        ]
        print("Redis CPU per message (us), %d rooms x 1 message per call, %d calls, two subscribers" % (o.rooms, o.calls))
        for rnd in range(o.rounds):
            row = []
            for name, sha, make in variants:
                c.call("FLUSHALL")
                reqs = [enc(make(sha, i)) for i in range(o.calls)]
                t0 = ticks(redis.pid)
                for q in reqs:
                    c.s.sendall(q)
                    c.read()
                t1 = ticks(redis.pid)
                row.append((name, (t1 - t0) / hz * 1e6 / (o.calls * o.rooms)))
            # The peer's way: one PUBLISH per message, pipelined by 13.
            msgs = [enc(["PUBLISH", channels[i % o.rooms], json.dumps({"t": text(), "i": i})]) for i in range(o.calls * o.rooms)]
            t0 = ticks(redis.pid)
            for i in range(0, len(msgs), o.rooms):
                c.s.sendall(b"".join(msgs[i:i + o.rooms]))
                for _ in range(o.rooms):
                    c.read()
            t1 = ticks(redis.pid)
            row.append(("publish", (t1 - t0) / hz * 1e6 / len(msgs)))
            print("round %d: " % (rnd + 1) + "  ".join("%s %.2f" % r for r in row), flush=True)
    finally:
        redis.terminate()
        redis.wait()


if __name__ == "__main__":
    sys.exit(main())
