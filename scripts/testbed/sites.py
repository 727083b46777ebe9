#!/usr/bin/env python3
"""Multi-site Lowtide testbed: a head office, two branches behind WAN links, a
Wi-Fi child site and a VPN site, every host in its own network namespace, and
one package distributed to every agent, measured on the links.

    hq  (router ns r-hq, LAN 10.60.0.0/24 on br0)
        srv  10.60.0.2   lowtide-server (metadata, SQLite)
        org  10.60.0.3   the origin: a second lowtide-server serving /files/{id}
        hq-1, hq-2       agents 10.60.0.11..
        w-b1  10.69.1.1/30 ── [d-b1: delay line] ── wan 10.69.1.2/30  r-b1
        w-b2  10.69.2.1/30 ── [d-b2: delay line] ── wan 10.69.2.2/30  r-b2
        w-vpn 10.69.4.1/30 ── [d-vpn: delay line] ── wan 10.69.4.2/30 r-vpn
    b1  (r-b1, LAN 10.61.0.0/24 on br0)  agents b1-1..   + Wi-Fi child site
    b1w (r-b1, 10.63.0.0/24 on br1)      agents b1w-1..  (routed by r-b1, no WAN)
    b2  (r-b2, LAN 10.62.0.0/24)         agents b2-1..
    vpn (r-vpn, 10.64.0.0/24)            agents vpn-1..

Each WAN link has a TBF bottleneck on both ends' egress (hq -> site on r-hq's
w-SITE, site -> hq on r-SITE's wan) and the user-space delay line
(benches/delayline) in between, as in scripts/testbed/wan.sh; offloads are off
on the WAN, Wi-Fi and VPN veths so frames are wire-sized. The delay lines run at
SCHED_FIFO priority 60 and the probes at 55 (--rt-prio; 0 turns it off): they
stand for wires and other hosts, and on this 2-core machine they would otherwise
wait for a CPU behind 16 agents, which the probe would count as added delay.

Measured, not self-reported: `lowtide-wanprobe count` taps r-hq's w-* interfaces
(every frame crossing each WAN link, both directions), the origin's eth0, r-b1's
br1 (what enters the Wi-Fi site, by source) and each VPN agent's bridge port
(what each VPN agent sends). `lowtide-wanprobe probe` on each WAN router echoes
off r-hq every 10 ms; added delay = RTT - median RTT of the idle seconds before
the case. Every agent's copy is checked against the package's SHA-256.

Namespaces are named ltd-<pid>-*, state lives in --work (default
/tmp/ltd-<pid>); everything is removed on exit, on failure and on Ctrl-C/TERM.
`sites.py cleanup` removes what a killed run (SIGKILL) left behind.

Usage: sites.py run [options]  (see --help); sites.py cleanup
Needs root, iproute2, ethtool, curl (and aria2c for --methods parallel-http).
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NS_ROOT = "/run/netns"
ADMIN_TOKEN = "ltd-testbed-admin-token-0123456789"
SERVER_PORT = 7400
ECHO_PORT = 7999
AGENT_PORT = 4500
IDLE_PROBE_S = 3.0
# Bounded waits.
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
POLL_S = 0.25
BIG_FRAME = 1000
# Lowtide's header in front of the content in each data datagram (engine/src/wire.rs DATA_HEADER_BYTES).
DATA_HEADER_BYTES = 48
# The WAN links' /30 router addresses (10.69.<link>.1 at hq, .2 at the site).
WAN_NET = "10.69."


def log(msg):
    print(f"sites: {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    pass


def rate_bps(text):
    t = text.lower()
    for suffix, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(float(t) * 10**6)


class Site:
    def __init__(self, sid, name, parent, kind, net, router, agents, wan=None, bridge="br0"):
        self.id, self.name, self.parent, self.kind = sid, name, parent, kind
        self.net = net  # "10.61.0"
        self.router = router  # short router name
        self.agents = agents
        self.wan = wan  # dict(idx, rate_bps, rtt_ms) or None
        self.bridge = bridge

    @property
    def cidr(self):
        return f"{self.net}.0/24"


class Agent:
    def __init__(self, name, site, addr):
        self.name, self.site, self.addr = name, site, addr
        self.ns = None
        self.dir = None
        self.config = None
        self.proc = None
        self.agent_id = None
        self.port = f"p-{name}"


class Testbed:
    def __init__(self, args):
        self.args = args
        self.pid = os.getpid()
        self.prefix = f"ltd-{self.pid}-"
        self.work = args.work or f"/tmp/ltd-{self.pid}"
        self.bin = args.bin_dir
        self.procs = []  # (name, Popen) of everything started in the background
        self.namespaces = []
        self.sites = []
        self.agents = []
        self.package = None
        self.content_id = None
        self.origin_url = None
        self.token = None
        self.counters = {}  # name -> path of the count JSON

    # ---- helpers ----

    def ns(self, short):
        return self.prefix + short

    def run(self, cmd, ns=None, check=True, capture=True, timeout=120, env=None, input_text=None):
        full = (["ip", "netns", "exec", self.ns(ns)] if ns else []) + cmd
        r = subprocess.run(
            full,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
            env=env,
            input=input_text,
        )
        if check and r.returncode != 0:
            raise Failure(f"{' '.join(full)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def rt(self, below, cmd):
        """`cmd` at SCHED_FIFO priority --rt-prio minus `below` (unchanged with --rt-prio 0): the
        delay lines stand for wires and the probes for other hosts, so on this shared machine they
        must not wait for a CPU behind the agents (that wait would be counted as added delay)."""
        prio = self.args.rt_prio - below
        return ["chrt", "-f", str(prio)] + cmd if self.args.rt_prio > 0 and prio > 0 else cmd

    def spawn(self, name, cmd, ns=None, log_path=None, env=None, stdout=None):
        full = (["ip", "netns", "exec", self.ns(ns)] if ns else []) + cmd
        logf = open(log_path or os.path.join(self.work, "logs", f"{name}.log"), "ab")
        p = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else logf,
            stderr=logf,
            env=env,
            start_new_session=True,  # Ctrl-C reaches this script, which stops them in order
        )
        logf.close()
        self.procs.append((name, p))
        return p

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def binary(self, name):
        path = os.path.join(self.bin, name)
        if not os.access(path, os.X_OK):
            raise Failure(
                f"no {path}: build it first (cargo build --release -p lowtide-agent -p lowtide-server "
                "-p lowtide-delayline -p lowtide-wanprobe), or pass --bin-dir"
            )
        return path

    def clean_env(self, extra=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOWTIDE_")}
        # SITES_LOG sets the agents' and server's log filter, e.g. lowtide_engine::cc=debug,info
        env["LOWTIDE_LOG"] = os.environ.get("SITES_LOG", "info")
        env.update(extra or {})
        return env

    # ---- the network ----

    def new_ns(self, short):
        name = self.ns(short)
        self.run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], ns=short)
        self.run(["ip", "link", "set", "lo", "up"], ns=short)

    def no_offloads(self, short, dev):
        self.run(["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off"], ns=short, check=False)

    def attach(self, host, router, bridge, port, addr, gw, wire_sized):
        """A host namespace with eth0 on `bridge` of the router namespace."""
        self.run(["ip", "-n", self.ns(host), "link", "add", "eth0", "type", "veth", "peer", "name", port,
                  "netns", self.ns(router)])
        self.run(["ip", "-n", self.ns(router), "link", "set", port, "master", bridge])
        self.run(["ip", "-n", self.ns(host), "addr", "add", f"{addr}/24", "dev", "eth0"])
        if wire_sized:
            self.no_offloads(host, "eth0")
            self.no_offloads(router, port)
        self.run(["ip", "-n", self.ns(router), "link", "set", port, "up"])
        self.run(["ip", "-n", self.ns(host), "link", "set", "eth0", "up"])
        self.run(["ip", "-n", self.ns(host), "route", "add", "default", "via", gw])

    def tbf(self, short, dev, bps):
        limit = max(bps // 8 * self.args.queue_ms // 1000, 3000)
        burst = max(bps // 8 // 250, 3200)
        self.run(["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{bps}bit",
                  "burst", str(burst), "limit", str(limit)], ns=short)

    def build(self):
        a = self.args
        branch_bps = rate_bps(a.rate)
        vpn_bps = rate_bps(a.vpn_rate)
        self.sites = [
            Site("hq", "Head office", "", "standard", "10.60.0", "hq", a.hq_agents),
            Site("b1", "Branch 1", "hq", "standard", "10.61.0", "b1", a.agents,
                 wan=dict(idx=1, rate_bps=branch_bps, rtt_ms=a.rtt_ms)),
            Site("b1w", "Branch 1 Wi-Fi", "b1", "wifi", "10.63.0", "b1", a.wifi_agents, bridge="br1"),
            Site("b2", "Branch 2", "hq", "standard", "10.62.0", "b2", a.agents,
                 wan=dict(idx=2, rate_bps=branch_bps, rtt_ms=a.rtt_ms)),
            Site("vpn", "VPN users", "hq", "vpn", "10.64.0", "vpn", a.vpn_agents,
                 wan=dict(idx=4, rate_bps=vpn_bps, rtt_ms=a.vpn_rtt_ms)),
        ]
        delayline = self.binary("lowtide-delayline")
        for r in ("hq", "b1", "b2", "vpn"):
            self.new_ns(f"r-{r}")
            self.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], ns=f"r-{r}")
        for n, s in enumerate(self.sites):
            # A fixed MAC: a bridge otherwise takes its lowest port's, which changes as ports are added
            # (under the ARP caches of hosts already attached).
            self.run(["ip", "-n", self.ns(f"r-{s.router}"), "link", "add", s.bridge, "address",
                      f"02:1d:00:00:00:{n + 1:02x}", "type", "bridge"])
            self.run(["ip", "-n", self.ns(f"r-{s.router}"), "addr", "add", f"{s.net}.1/24", "dev", s.bridge])
            self.run(["ip", "-n", self.ns(f"r-{s.router}"), "link", "set", s.bridge, "up"])
        # WAN links: r-hq w-SITE <-> d-SITE (delay line) <-> r-SITE wan
        for s in self.sites:
            if not s.wan:
                continue
            i, d = s.wan["idx"], f"d-{s.id}"
            self.new_ns(d)
            self.run(["ip", "-n", self.ns("r-hq"), "link", "add", f"w-{s.id}", "type", "veth", "peer", "name", "dly-a",
                      "netns", self.ns(d)])
            self.run(["ip", "-n", self.ns(f"r-{s.router}"), "link", "add", "wan", "type", "veth", "peer", "name",
                      "dly-b", "netns", self.ns(d)])
            self.run(["ip", "-n", self.ns("r-hq"), "addr", "add", f"{WAN_NET}{i}.1/30", "dev", f"w-{s.id}"])
            self.run(["ip", "-n", self.ns(f"r-{s.router}"), "addr", "add", f"{WAN_NET}{i}.2/30", "dev", "wan"])
            for short, dev in (("r-hq", f"w-{s.id}"), (d, "dly-a"), (d, "dly-b"), (f"r-{s.router}", "wan")):
                self.no_offloads(short, dev)
                self.run(["ip", "-n", self.ns(short), "link", "set", dev, "up"])
            self.tbf("r-hq", f"w-{s.id}", s.wan["rate_bps"])
            self.tbf(f"r-{s.router}", "wan", s.wan["rate_bps"])
            self.spawn(f"delayline-{s.id}", self.rt(0, [delayline, "--if-a", "dly-a", "--if-b", "dly-b",
                                                        "--delay-us", str(s.wan["rtt_ms"] * 500)]), ns=d)
            self.run(["ip", "-n", self.ns(f"r-{s.router}"), "route", "add", "default", "via", f"10.69.{i}.1"])
            for t in self.sites:
                if t.router == s.router:
                    self.run(["ip", "-n", self.ns("r-hq"), "route", "add", t.cidr, "via", f"10.69.{i}.2"])
        # Hosts: server, origin, agents.
        self.new_ns("srv")
        self.attach("srv", "r-hq", "br0", "p-srv", "10.60.0.2", "10.60.0.1", False)
        self.new_ns("org")
        self.attach("org", "r-hq", "br0", "p-org", "10.60.0.3", "10.60.0.1", False)
        for s in self.sites:
            for k in range(1, s.agents + 1):
                ag = Agent(f"{s.id}-{k}", s, f"{s.net}.{10 + k}")
                ag.ns = f"a-{ag.name}"
                self.new_ns(ag.ns)
                self.attach(ag.ns, f"r-{s.router}", s.bridge, ag.port, ag.addr, f"{s.net}.1",
                            s.kind in ("wifi", "vpn"))
                self.agents.append(ag)
        # Every WAN path answers before anything starts.
        for s in self.sites:
            if s.wan:
                self.wait_ping("srv", f"{s.net}.1")
        log(f"network up: {len(self.namespaces)} namespaces ({self.prefix}*)")

    def wait_ping(self, ns, addr):
        deadline = time.time() + READY_TIMEOUT_S
        while time.time() < deadline:
            if self.run(["ping", "-c1", "-W1", "-q", addr], ns=ns, check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise Failure(f"{addr} not reachable from {ns} (delay line log: {self.work}/logs)")

    def teardown(self):
        for name, p in reversed(self.procs):
            self.stop(p)
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
        self.namespaces = []
        if not self.args.keep_work and os.path.isdir(self.work):
            shutil.rmtree(self.work, ignore_errors=True)

    # ---- servers ----

    def start_servers(self):
        a = self.args
        server = self.binary("lowtide-server")
        size = a.size_mb * 1_000_000
        self.package = os.path.join(self.work, "package.bin")
        log(f"generating a {a.size_mb} MB package")
        h = hashlib.sha256()
        with open(self.package, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 8 << 20))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        self.package_sha256 = h.hexdigest()
        self.package_bytes = size
        # The origin: its own namespace (its egress is measured) and its own file store.
        org_dir = os.path.join(self.work, "origin")
        out = self.run([server, "--state-dir", org_dir, "publish", self.package, "--name", "demo-package",
                        "--version", "1"], timeout=600).stdout
        self.content_id = json.loads(out)["id"]
        self.origin_url = f"http://10.60.0.3:{SERVER_PORT}/files/{self.content_id}"
        self.spawn("origin", [server, "--state-dir", org_dir, "serve", "--listen", f"0.0.0.0:{SERVER_PORT}"],
                   ns="org", env=self.clean_env({"LOWTIDE_PUBLIC_URL": f"http://10.60.0.3:{SERVER_PORT}"}))
        # The metadata server.
        srv_dir = os.path.join(self.work, "server")
        self.srv_env = self.clean_env({
            "LOWTIDE_ADMIN_TOKEN": ADMIN_TOKEN,
            "LOWTIDE_PUBLIC_URL": f"http://10.60.0.2:{SERVER_PORT}",
            "LOWTIDE_HEARTBEAT_SECS": str(a.heartbeat_secs),
            "LOWTIDE_INACTIVE_AFTER_SECS": str(a.inactive_after_secs),
        })
        for k, v in a.server_env:
            self.srv_env[k] = v
        self.spawn("server", [server, "--state-dir", srv_dir, "serve", "--listen", f"0.0.0.0:{SERVER_PORT}"],
                   ns="srv", env=self.srv_env)
        self.srv_dir = srv_dir
        for ns, url in (("srv", f"http://10.60.0.2:{SERVER_PORT}/healthz"),
                        ("srv", f"http://10.60.0.3:{SERVER_PORT}/healthz")):
            deadline = time.time() + READY_TIMEOUT_S
            while self.run(["curl", "-sf", "-o", "/dev/null", url], ns=ns, check=False).returncode != 0:
                if time.time() > deadline:
                    raise Failure(f"{url} did not answer (logs in {self.work}/logs)")
                time.sleep(0.2)
        # Upload the topology CSV through the admin API.
        rows = ["id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps"]
        for s in self.sites:
            kbps = str(s.wan["rate_bps"] // 1000) if s.wan else ""
            rows.append(f"{s.id},{s.name},{s.parent},{s.kind},{s.cidr},{kbps},{kbps}")
        self.topology_csv = "\n".join(rows) + "\n"
        csv_path = os.path.join(self.work, "topology.csv")
        with open(csv_path, "w") as f:
            f.write(self.topology_csv)
        self.admin("PUT", "/v1/admin/topology", data_file=csv_path, content_type="text/csv")
        # Publish on the metadata server, naming the origin (no copy kept by the metadata server).
        out = self.run([server, "--state-dir", srv_dir, "publish", self.package, "--name", "demo-package",
                        "--version", "1", "--origin", self.origin_url, "--no-store"],
                       env=self.srv_env, timeout=600).stdout
        if json.loads(out)["id"] != self.content_id:
            raise Failure("the metadata server and the origin disagree on the content id")
        out = self.run([server, "--state-dir", srv_dir, "token", "create", "--uses", str(len(self.agents) + 5)],
                       env=self.srv_env).stdout
        self.token = json.loads(out)["token"]
        log(f"published {self.content_id[:16]}… ({size} bytes), origin {self.origin_url}")

    def admin(self, method, path, data_file=None, content_type=None, check=True):
        cmd = ["curl", "-sS", "-X", method, "-H", f"Authorization: Bearer {ADMIN_TOKEN}",
               "-w", "\n%{http_code}", f"http://10.60.0.2:{SERVER_PORT}{path}"]
        if data_file:
            cmd += ["-H", f"Content-Type: {content_type}", "--data-binary", f"@{data_file}"]
        r = self.run(cmd, ns="srv", check=False)
        body, _, code = r.stdout.rpartition("\n")
        if check and not code.startswith("2"):
            raise Failure(f"{method} {path}: HTTP {code}: {body}")
        return json.loads(body) if body.strip().startswith(("{", "[")) else body

    # ---- agents ----

    def agent_cmd(self, ag, *args):
        return [self.binary("lowtide-agent"), "--config", ag.config, *args]

    def agent_json(self, ag, *args, check=True):
        r = subprocess.run(self.agent_cmd(ag, *args, "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=60, env=self.clean_env())
        if r.returncode != 0:
            if check:
                raise Failure(f"lowtide-agent {' '.join(args)} on {ag.name}: {r.stderr.strip()}")
            return None
        return json.loads(r.stdout)

    def start_agents(self):
        a = self.args
        for ag in self.agents:
            ag.dir = os.path.join(self.work, "agents", ag.name)
            os.makedirs(ag.dir, exist_ok=True)
            ag.config = os.path.join(ag.dir, "agent.toml")
            lines = [
                f'server_url = "http://10.60.0.2:{SERVER_PORT}"',
                f'enrol_token = "{self.token}"',
                f'state_dir = "{ag.dir}/state"',
                f'listen = "0.0.0.0:{AGENT_PORT}"',
                f"cache_limit_mib = {max(64, 3 * a.size_mb)}",
                f'advertise_addresses = ["{ag.addr}"]',
                f'hostname = "{ag.name}"',
                "inventory_secs = 1",
            ] + list(a.agent_config)
            with open(ag.config, "w") as f:
                f.write("\n".join(lines) + "\n")
            self.start_agent(ag)
        for ag in self.agents:
            self.wait_agent(ag)
        log(f"{len(self.agents)} agents enrolled and heartbeating")

    def start_agent(self, ag):
        ag.proc = self.spawn(f"agent-{ag.name}", self.agent_cmd(ag, "run"), ns=ag.ns,
                             log_path=os.path.join(ag.dir, "agent.log"), env=self.clean_env())

    def wait_agent(self, ag):
        deadline = time.time() + READY_TIMEOUT_S
        while time.time() < deadline:
            if ag.proc.poll() is not None:
                raise Failure(f"agent {ag.name} exited at start: see {ag.dir}/agent.log")
            st = self.agent_json(ag, "status", check=False)
            if st and st.get("site") == ag.site.id:
                ag.agent_id = st.get("agent_id")
                return
            time.sleep(POLL_S)
        raise Failure(f"agent {ag.name} did not come up in site {ag.site.id}: see {ag.dir}/agent.log")

    def stop_agents(self):
        for ag in self.agents:
            if ag.proc:
                self.stop(ag.proc)
                ag.proc = None

    def held(self, ag):
        """(held bytes, ranges) of the package in this agent's cache."""
        items = self.agent_json(ag, "cache", "ls", check=False) or []
        for it in items:
            if it.get("content") == self.content_id:
                return it.get("held_bytes", 0), [tuple(r) for r in it.get("ranges", [])]
        return 0, []

    def rvp_of(self, site):
        try:
            e = self.admin("GET", f"/v1/admin/sites/{site}/content/{self.content_id}/election", check=False)
        except (Failure, ValueError):
            return None
        if not isinstance(e, dict):
            return None
        rvp = e.get("rvp")
        if isinstance(rvp, dict):
            return rvp.get("agent_id") or rvp.get("id")
        return rvp or e.get("rvp_agent_id")

    # ---- measurement ----

    def start_counters(self):
        wanprobe = self.binary("lowtide-wanprobe")
        wan_ifs = ",".join(f"w-{s.id}" for s in self.sites if s.wan)
        taps = [("wan", "r-hq", wan_ifs), ("origin", "org", "eth0"), ("server", "srv", "eth0"),
                ("wifi", "r-b1", "br1")]
        vpn_ports = ",".join(ag.port for ag in self.agents if ag.site.kind == "vpn")
        if vpn_ports:
            taps.append(("vpn", "r-vpn", vpn_ports))
        for name, ns, ifs in taps:
            path = os.path.join(self.work, f"count-{name}.json")
            self.counters[name] = path
            self.spawn(f"count-{name}", [wanprobe, "count", "--iface", ifs, "--every-ms", "250", "--out", path],
                       ns=ns)
        deadline = time.time() + READY_TIMEOUT_S
        while not all(os.path.exists(p) for p in self.counters.values()):
            if time.time() > deadline:
                raise Failure(f"the link counters did not start (logs in {self.work}/logs)")
            time.sleep(0.1)
        if self.args.probe:
            self.spawn("echo", self.rt(5, [wanprobe, "echo", "--listen", f"0.0.0.0:{ECHO_PORT}"]), ns="r-hq")
            self.probes = {}
            for s in self.sites:
                if s.wan:
                    path = os.path.join(self.work, f"probe-{s.id}.csv")
                    self.probes[s.id] = (path, self.spawn(
                        f"probe-{s.id}", self.rt(5, [wanprobe, "probe", "--to", f"10.69.{s.wan['idx']}.1:{ECHO_PORT}",
                                                     "--interval-ms", "10", "--out", path]), ns=f"r-{s.router}"))

    def counts(self):
        """Snapshot of every counter: {counter: {iface: [flow, ...]}}, plus drops."""
        snap = {}
        for name, path in self.counters.items():
            for _ in range(20):
                try:
                    with open(path) as f:
                        snap[name] = json.load(f)["ifaces"]
                    break
                except (OSError, ValueError):
                    time.sleep(0.05)
            else:
                raise Failure(f"cannot read {path}")
        return snap

    @staticmethod
    def total(snap, counter, iface=None, pred=None, field="payload_bytes"):
        n = 0
        for ifname, data in snap.get(counter, {}).items():
            if iface and ifname != iface:
                continue
            for fl in data["flows"]:
                # The latency probe's datagrams between the two WAN routers are the harness's own
                # measurement, not traffic of the method under test.
                if counter == "wan" and fl["src"].startswith(WAN_NET) and fl["dst"].startswith(WAN_NET):
                    continue
                if pred is None or pred(fl):
                    n += fl[field]
        return n

    @staticmethod
    def dropped(snap):
        return sum(d["dropped"] for c in snap.values() for d in c.values())

    def link_bytes(self, snap, s, field="payload_bytes"):
        return self.total(snap, "wan", f"w-{s.id}", field=field)

    def link_content(self, snap, s):
        """UDP payload toward the site less Lowtide's data header per datagram: the content bytes
        that crossed (control datagrams toward the site are few and counted as content)."""
        down_udp = lambda fl: fl["dir"] == "out" and fl["proto"] == 17  # noqa: E731
        return (self.total(snap, "wan", f"w-{s.id}", down_udp)
                - DATA_HEADER_BYTES * self.total(snap, "wan", f"w-{s.id}", down_udp, "frames"))

    def stop_probes(self):
        for sid, (path, p) in getattr(self, "probes", {}).items():
            self.stop(p, signal.SIGINT)

    def delays(self, windows):
        """Per link and per case window [t0, t1] (realtime s): added delay percentiles."""
        out = {}
        for sid, (path, _) in getattr(self, "probes", {}).items():
            rows = []
            try:
                with open(path) as f:
                    next(f)
                    for line in f:
                        t, rtt = line.strip().split(",")
                        rows.append((int(t) / 1e9, int(rtt)))
            except (OSError, StopIteration, ValueError):
                continue
            for case, (t0, t1) in windows.items():
                idle = sorted(r / 1000 for t, r in rows if t0 - IDLE_PROBE_S <= t < t0 and r >= 0)
                busy = [(r / 1000 if r >= 0 else None) for t, r in rows if t0 <= t <= t1]
                if not idle or not busy:
                    continue
                base = idle[len(idle) // 2]
                added = sorted(max(0.0, r - base) for r in busy if r is not None)
                lost = sum(1 for r in busy if r is None)

                def pct(p):
                    if not added:
                        return None
                    return round(added[min(len(added) - 1, max(0, int(-(-p * len(added) // 100)) - 1))], 2)

                out.setdefault(case, {})[sid] = dict(base_rtt_ms=round(base, 2), probes=len(busy), lost=lost,
                                                     p50_ms=pct(50), p95_ms=pct(95), p99_ms=pct(99))
        return out

    # ---- cases ----

    def run_case(self, method):
        size = self.package_bytes
        if method == "lowtide":
            self.start_agents()
        time.sleep(IDLE_PROBE_S)  # idle probes for the base RTT
        before = self.counts()
        t0 = time.time()
        getters = {}
        outdir = os.path.join(self.work, "downloads", method)
        os.makedirs(outdir, exist_ok=True)
        for ag in self.agents:
            out = os.path.join(outdir, f"{ag.name}.out")
            if method == "lowtide":
                cmd = self.agent_cmd(ag, "get", self.content_id, "--json")
                ns = None
            elif method == "origin-http":
                cmd = ["curl", "-sS", "--fail", "-o", os.path.join(outdir, f"{ag.name}.bin"), self.origin_url]
                ns = ag.ns
            else:
                cmd = ["aria2c", "-x8", "-s8", "-k1M", "--file-allocation=none", "--allow-overwrite=true",
                       "--auto-file-renaming=false", "--console-log-level=warn", "--summary-interval=0",
                       "--download-result=hide", "-d", outdir, "-o", f"{ag.name}.bin", self.origin_url]
                ns = ag.ns
            f = open(out, "wb")
            getters[ag.name] = dict(proc=self.spawn(f"get-{method}-{ag.name}", cmd, ns=ns, stdout=f,
                                                    env=self.clean_env()), start=t0, end=None, out=out,
                                    file=os.path.join(outdir, f"{ag.name}.bin"))
            f.close()
        failover = None
        killed = None
        last_view = 0.0
        deadline = t0 + self.args.timeout_s
        while True:
            now = time.time()
            for name, g in getters.items():
                if g["end"] is None and g["proc"].poll() is not None:
                    g["end"] = now
            pending = [n for n, g in getters.items() if g["end"] is None]
            if method == "lowtide" and self.args.kill_rvp and failover is None:
                failover = self.maybe_kill_rvp(getters)
                if failover:
                    killed = failover["killed_agent"]
            if failover and "new_rvp" not in failover:
                new = self.rvp_of(self.args.kill_rvp)
                if new and new != failover["killed_agent_id"]:
                    failover["new_rvp"] = self.name_of(new)
                    failover["new_rvp_after_s"] = round(time.time() - failover["killed_at"], 2)
            if not pending:
                break
            if now > deadline:
                raise Failure(f"{method}: {len(pending)} agent(s) still downloading after {self.args.timeout_s} s: "
                              f"{', '.join(pending)} (logs in {self.work})")
            if self.args.live and now - last_view >= self.args.live_every_s:
                last_view = now
                self.live_view(method, getters, t0, before)
            time.sleep(POLL_S)
        t1 = max(g["end"] for n, g in getters.items() if n != killed) if len(getters) > (1 if killed else 0) else t0
        after = self.counts()
        if failover:
            failover["wan_payload_after_kill_bytes"] = (self.link_bytes(after, self.site(self.args.kill_rvp))
                                                        - failover["wan_payload_at_kill_abs"])
            failover["wan_content_after_kill_bytes"] = (self.link_content(after, self.site(self.args.kill_rvp))
                                                        - failover["wan_content_at_kill_abs"])
            failover["remaining_at_kill_bytes"] = size - failover["held_in_site_at_kill_bytes"]
            # The killed agent comes back and resumes (after the others, so it cannot be picked again).
            ag = self.agent(killed)
            self.start_agent(ag)
            self.wait_agent(ag)
            tk = time.time()
            f = open(getters[killed]["out"], "wb")
            p = self.spawn(f"get-again-{killed}", self.agent_cmd(ag, "get", self.content_id, "--json"), stdout=f,
                           env=self.clean_env())
            f.close()
            try:
                p.wait(timeout=self.args.timeout_s)
            except subprocess.TimeoutExpired:
                raise Failure(f"restarted {killed} did not finish its get")
            getters[killed].update(proc=p, start=tk, end=time.time(), restarted=True)
            failover["wan_payload_after_restart_bytes"] = (self.link_bytes(self.counts(), self.site(self.args.kill_rvp))
                                                           - self.link_bytes(after, self.site(self.args.kill_rvp)))
            del failover["wan_payload_at_kill_abs"]
            del failover["wan_content_at_kill_abs"]
        if self.args.live:
            self.live_view(method, getters, t0, before, final=True)
        result = self.case_result(method, getters, t0, t1, before, after)
        if failover:
            result["failover"] = failover
        if method == "lowtide":
            result["server_traffic"] = self.admin("GET", "/v1/admin/traffic", check=False)
            result["served"] = self.served_by_agent()
            self.stop_agents()
        return result, (t0, t1)

    def served_by_agent(self):
        """Per agent, what its engine served (self-reported, for finding where extra bytes on a
        link come from): payload sent, of it sent again, sessions, requests refused, and the
        peers its fetches dropped. The full `status` is kept in the work directory."""
        out = {}
        for ag in self.agents:
            if not ag.proc or ag.proc.poll() is not None:
                continue
            st = self.agent_json(ag, "status", check=False)
            if not isinstance(st, dict):
                continue
            with open(os.path.join(ag.dir, "status-end.json"), "w") as f:
                json.dump(st, f, indent=1)
            served = st.get("served") or {}
            out[ag.name] = dict(
                payload_bytes=served.get("payload_bytes"), resent_bytes=served.get("resent_bytes"),
                sessions_opened=served.get("sessions_opened"),
                requests_refused=(st.get("serving") or {}).get("requests_refused"),
                dropped_peers=[f"{d.get('addr')}: {d.get('reason')}" for d in st.get("dropped_peers") or []])
        return out

    def site(self, sid):
        return next(s for s in self.sites if s.id == sid)

    def agent(self, name):
        return next(a for a in self.agents if a.name == name)

    def name_of(self, agent_id):
        for ag in self.agents:
            if ag.agent_id == agent_id:
                return ag.name
        return agent_id

    def maybe_kill_rvp(self, getters):
        sid = self.args.kill_rvp
        rvp = self.rvp_of(sid)
        if not rvp:
            return None
        name = self.name_of(rvp)
        if name == rvp:  # not one of ours (yet)
            return None
        ag = self.agent(name)
        held, _ = self.held(ag)
        size = self.package_bytes
        if held < self.args.kill_at * size or held >= size:
            return None
        site = self.site(sid)
        snap = self.counts()
        wan = self.link_bytes(snap, site)
        content = self.link_content(snap, site)
        ag.proc.kill()
        ag.proc.wait()
        killed_at = time.time()
        ranges = []
        for other in self.agents:
            if other.site.id == sid and other is not ag:
                ranges += self.held(other)[1]
        in_site = 0
        end = 0
        for a, b in sorted(ranges):
            a = max(a, end)
            if b > a:
                in_site += b - a
                end = b
        log(f"killed {name}, the RVP of {sid}, holding {held} of {size} bytes; "
            f"{in_site} bytes are in the site's other agents")
        return dict(site=sid, killed_agent=name, killed_agent_id=rvp, killed_held_bytes=held,
                    held_in_site_at_kill_bytes=in_site, wan_payload_at_kill_bytes=wan,
                    wan_payload_at_kill_abs=wan, wan_content_at_kill_abs=content, killed_at=killed_at)

    def live_view(self, method, getters, t0, before, final=False):
        now = time.time()
        snap = self.counts()
        lines = [f"== {method}  t={now - t0:6.1f} s  package {self.package_bytes / 1e6:.0f} MB"]
        for s in self.sites:
            if s.wan:
                b = self.link_bytes(snap, s) - self.link_bytes(before, s)
                lines.append(f"   WAN {s.id:<4} {b / 1e6:8.1f} MB = {b / self.package_bytes:5.2f} x package")
        o = self.total(snap, "origin") - self.total(before, "origin")
        lines.append(f"   origin   {o / 1e6:8.1f} MB = {o / self.package_bytes:5.2f} x package")
        row = []
        for ag in self.agents:
            g = getters[ag.name]
            if g["end"] is not None and g["proc"].returncode == 0:
                state = f"done {g['end'] - g['start']:5.1f}s"
            elif g["end"] is not None:
                state = "stopped"
            else:
                if method == "lowtide":
                    held = self.held(ag)[0] if ag.proc and ag.proc.poll() is None else 0
                else:
                    try:
                        held = os.path.getsize(g["file"])
                    except OSError:
                        held = 0
                state = f"{100 * held / self.package_bytes:5.1f} %   "
            row.append(f"{ag.name:<6} {state}")
        for i in range(0, len(row), 4):
            lines.append("   " + "  |  ".join(row[i:i + 4]))
        text = "\n".join(lines)
        if sys.stdout.isatty() and not final:
            print("\033[H\033[J" + text, flush=True)
        else:
            print(text, flush=True)

    def case_result(self, method, getters, t0, t1, before, after):
        size = self.package_bytes
        links = {}
        for s in self.sites:
            if not s.wan:
                continue
            d = {}
            for field in ("payload_bytes", "frame_bytes"):
                d[field] = self.link_bytes(after, s, field) - self.link_bytes(before, s, field)
            out_big = lambda fl: fl["dir"] == "out" and fl["proto"] == 17  # noqa: E731
            d["down_payload_bytes"] = (self.total(after, "wan", f"w-{s.id}", lambda fl: fl["dir"] == "out")
                                       - self.total(before, "wan", f"w-{s.id}", lambda fl: fl["dir"] == "out"))
            d["up_payload_bytes"] = d["payload_bytes"] - d["down_payload_bytes"]
            d["udp_down_payload_bytes"] = (self.total(after, "wan", f"w-{s.id}", out_big)
                                           - self.total(before, "wan", f"w-{s.id}", out_big))
            # Datagrams of at least 1000 bytes toward the site: Lowtide's data datagrams (1424 content bytes each).
            d["udp_down_big_frames"] = (self.total(after, "wan", f"w-{s.id}", out_big, "big_frames")
                                        - self.total(before, "wan", f"w-{s.id}", out_big, "big_frames"))
            tcp = lambda fl: fl["proto"] == 6  # noqa: E731
            d["tcp_payload_bytes"] = (self.total(after, "wan", f"w-{s.id}", tcp)
                                      - self.total(before, "wan", f"w-{s.id}", tcp))
            d["udp_down_frames"] = (self.total(after, "wan", f"w-{s.id}", out_big, "frames")
                                    - self.total(before, "wan", f"w-{s.id}", out_big, "frames"))
            d["content_down_bytes"] = self.link_content(after, s) - self.link_content(before, s)
            d["ratio"] = round(d["payload_bytes"] / size, 4)
            d["frame_ratio"] = round(d["frame_bytes"] / size, 4)
            d["rate_bps"] = s.wan["rate_bps"]
            d["rtt_ms"] = s.wan["rtt_ms"]
            d["kind"] = s.kind
            links[s.id] = d
        origin = {f: self.total(after, "origin", field=f, pred=lambda fl: fl["dir"] == "out")
                  - self.total(before, "origin", field=f, pred=lambda fl: fl["dir"] == "out")
                  for f in ("payload_bytes", "frame_bytes")}
        origin["ratio"] = round(origin["payload_bytes"] / size, 4)
        server = {f: self.total(after, "server", field=f, pred=lambda fl: fl["dir"] == "out")
                  - self.total(before, "server", field=f, pred=lambda fl: fl["dir"] == "out")
                  for f in ("payload_bytes", "frame_bytes")}
        parent = self.site("b1w").parent if any(s.id == "b1w" for s in self.sites) else None
        wifi = {}
        if parent:
            pnet = self.site(parent).net + "."
            into = lambda fl, from_parent: (fl["dir"] == "out" and fl["dst"].startswith(self.site("b1w").net + ".")  # noqa: E731
                                            and fl["src"].startswith(pnet) == from_parent)
            wifi = dict(
                site="b1w", parent=parent,
                from_parent_payload_bytes=self.total(after, "wifi", pred=lambda fl: into(fl, True))
                - self.total(before, "wifi", pred=lambda fl: into(fl, True)),
                from_elsewhere_payload_bytes=self.total(after, "wifi", pred=lambda fl: into(fl, False))
                - self.total(before, "wifi", pred=lambda fl: into(fl, False)),
            )
        agents = []
        verified = 0
        for ag in self.agents:
            g = getters[ag.name]
            rec = dict(name=ag.name, site=ag.site.id, kind=ag.site.kind, addr=ag.addr,
                       ok=g["proc"].returncode == 0,
                       time_s=round(g["end"] - g["start"], 2) if g["end"] else None)
            if g.get("restarted"):
                rec["restarted_after_kill"] = True
            path = g["file"]
            if method == "lowtide" and rec["ok"]:
                try:
                    with open(g["out"]) as f:
                        done = json.load(f)
                    rec.update(bytes_from_peers=done.get("bytes_from_peers"),
                               bytes_from_parent=done.get("bytes_from_parent"),
                               bytes_from_origin=done.get("bytes_from_origin"),
                               bytes_already_held=done.get("bytes_already_held"),
                               you_are_rvp=done.get("you_are_rvp"), sources=done.get("sources"),
                               site_reported=done.get("site"), received=done.get("received"))
                    path = done.get("path")
                except (OSError, ValueError) as e:
                    rec["ok"] = False
                    rec["error"] = f"get --json output: {e}"
            elif not rec["ok"]:
                try:
                    rec["error"] = open(g["out"], errors="replace").read()[-500:]
                except OSError:
                    pass
            if ag.site.kind == "vpn":
                port_out = lambda fl, a=ag: (fl["dir"] == "in" and fl["src"] == a.addr and fl["proto"] == 17)  # noqa: E731
                rec["sent_udp_payload_bytes"] = (
                    self.total(after, "vpn", ag.port, port_out) - self.total(before, "vpn", ag.port, port_out))
                big = lambda fl, a=ag: port_out(fl, a)  # noqa: E731
                rec["sent_udp_big_frames"] = (self.total(after, "vpn", ag.port, big, "big_frames")
                                              - self.total(before, "vpn", ag.port, big, "big_frames"))
            rec["verified"] = bool(rec["ok"] and path and sha256_of(path, size) == self.package_sha256)
            verified += rec["verified"]
            if method != "lowtide" and path and os.path.exists(path):
                os.unlink(path)  # keep the disk free for the next case
            agents.append(rec)
        branch = [d["ratio"] for d in links.values() if d["kind"] != "vpn"]
        slowest = min(s.wan["rate_bps"] for s in self.sites if s.wan and s.kind != "vpn")
        return dict(
            method=method,
            time_to_last_s=round(t1 - t0, 2),
            wan_bytes_per_link_max_ratio=max(branch) if branch else None,
            origin_bytes_ratio=origin["ratio"],
            added_delay_p95_ms=None,
            agents_verified=verified,
            agents=len(self.agents),
            wan_floor_s=round(size * 8 / slowest, 2),
            links=links,
            origin=origin,
            server=server,
            wifi=wifi,
            counter_drops=self.dropped(after) - self.dropped(before),
            agent_results=agents,
        )


def sha256_of(path, size):
    try:
        if os.path.getsize(path) != size:
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                b = f.read(4 << 20)
                if not b:
                    break
                h.update(b)
        return h.hexdigest()
    except OSError:
        return None


def print_report(report):
    size = report["package_bytes"]
    print(f"\nLowtide multi-site distribution: package {size / 1e6:.0f} MB, "
          f"{report['cases'][0]['agents']} agents, branch WAN {report['topology']['rate']} "
          f"{report['topology']['rtt_ms']} ms RTT, VPN {report['topology']['vpn_rate']}")
    for c in report["cases"]:
        print(f"\n== {c['method']}: time to last agent {c['time_to_last_s']} s "
              f"(WAN floor size/rate {c['wan_floor_s']} s), {c['agents_verified']}/{c['agents']} copies verified "
              f"(SHA-256 of each agent's copy)")
        print(f"   {'link':<5} {'payload MB':>10} {'x pkg':>6} {'frames MB':>10} {'down MB':>8} {'up MB':>7} "
              f"{'tcp MB':>7} {'delay p50/p95/p99 ms':>22}")
        for sid, d in c["links"].items():
            dl = (c.get("delay") or {}).get(sid)
            ds = f"{dl['p50_ms']} / {dl['p95_ms']} / {dl['p99_ms']}" if dl else "-"
            print(f"   {sid:<5} {d['payload_bytes'] / 1e6:10.2f} {d['ratio']:6.3f} {d['frame_bytes'] / 1e6:10.2f} "
                  f"{d['down_payload_bytes'] / 1e6:8.2f} {d['up_payload_bytes'] / 1e6:7.2f} "
                  f"{d['tcp_payload_bytes'] / 1e6:7.2f} {ds:>22}")
        o = c["origin"]
        print(f"   origin egress {o['payload_bytes'] / 1e6:.2f} MB = {o['ratio']:.3f} x package; "
              f"metadata server egress {c['server']['payload_bytes'] / 1e6:.2f} MB")
        if c.get("wifi"):
            w = c["wifi"]
            print(f"   Wi-Fi site {w['site']}: {w['from_parent_payload_bytes'] / 1e6:.2f} MB in from its parent "
                  f"{w['parent']}, {w['from_elsewhere_payload_bytes'] / 1e6:.2f} MB from elsewhere")
        if c.get("failover"):
            f = c["failover"]
            print(f"   RVP failover in {f['site']}: killed {f['killed_agent']} at {f['killed_held_bytes'] / 1e6:.1f} MB "
                  f"held ({f['held_in_site_at_kill_bytes'] / 1e6:.1f} MB in the site's other agents); new RVP "
                  f"{f.get('new_rvp', 'NONE')} after {f.get('new_rvp_after_s', '-')} s; WAN after the kill "
                  f"{f['wan_payload_after_kill_bytes'] / 1e6:.2f} MB ({f['wan_content_after_kill_bytes'] / 1e6:.2f} MB "
                  f"of content) for {f['remaining_at_kill_bytes'] / 1e6:.2f} MB not yet in the site")
        print(f"   {'agent':<7} {'site':<4} {'ok':<3} {'time s':>7} {'site MB':>8} {'parent MB':>9} {'origin MB':>9}"
              "  sources (get --json)")
        for a in c["agent_results"]:
            peers = f"{a['bytes_from_peers'] / 1e6:8.2f}" if a.get("bytes_from_peers") is not None else f"{'-':>8}"
            parent = f"{a['bytes_from_parent'] / 1e6:9.2f}" if a.get("bytes_from_parent") is not None else f"{'-':>9}"
            orig = f"{a['bytes_from_origin'] / 1e6:9.2f}" if a.get("bytes_from_origin") is not None else f"{'-':>9}"
            srcs = "; ".join(a.get("sources") or [])
            extra = ""
            if "sent_udp_payload_bytes" in a:
                extra = f" [sent {a['sent_udp_payload_bytes']} B UDP]"
            ok = "yes" if a["verified"] else "NO"
            t = f"{a['time_s']:7.1f}" if a["time_s"] is not None else f"{'-':>7}"
            print(f"   {a['name']:<7} {a['site']:<4} {ok:<3} {t} {peers} {parent} {orig}  {srcs[:100]}{extra}")


def cleanup_stale():
    names = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, text=True).stdout.split()
    gone = 0
    for n in names:
        if not n.startswith("ltd-"):
            continue
        try:
            pid = int(n.split("-")[1])
        except (IndexError, ValueError):
            continue
        if os.path.exists(f"/proc/{pid}"):
            continue
        # Processes still inside (agents of a killed run): stop them first.
        pids = subprocess.run(["ip", "netns", "pids", n], stdout=subprocess.PIPE, text=True).stdout.split()
        for p in pids:
            try:
                os.kill(int(p), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", n])
        gone += 1
    log(f"removed {gone} stale namespaces")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cleanup", help="remove namespaces left by runs that were killed")
    r = sub.add_parser("run", help="build the sites, distribute one package, report")
    r.add_argument("--size-mb", type=int, default=200)
    r.add_argument("--methods", default="lowtide", help="comma-separated: lowtide, origin-http, parallel-http")
    r.add_argument("--rate", default="20mbit", help="branch WAN rate")
    r.add_argument("--rtt-ms", type=int, default=40)
    r.add_argument("--vpn-rate", default="100mbit")
    r.add_argument("--vpn-rtt-ms", type=int, default=30)
    r.add_argument("--queue-ms", type=int, default=200)
    r.add_argument("--agents", type=int, default=4, help="agents per branch site (3-5)")
    r.add_argument("--wifi-agents", type=int, default=3)
    r.add_argument("--vpn-agents", type=int, default=3)
    r.add_argument("--hq-agents", type=int, default=2)
    r.add_argument("--heartbeat-secs", type=int, default=2)
    r.add_argument("--inactive-after-secs", type=int, default=6)
    r.add_argument("--agent-config", action="append", default=[], help="extra agent.toml line (repeatable)")
    r.add_argument("--server-env", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                   help="extra KEY=VALUE for the metadata server (repeatable)")
    r.add_argument("--kill-rvp", metavar="SITE", help="kill SITE's RVP mid-transfer (lowtide case)")
    r.add_argument("--kill-at", type=float, default=0.3, help="...once it holds this share of the package")
    r.add_argument("--no-probe", dest="probe", action="store_false")
    r.add_argument("--rt-prio", type=int, default=60,
                   help="SCHED_FIFO priority of the delay lines (the probes and their echo: 5 less); 0: normal")
    r.add_argument("--live", action="store_true", help="print a live view")
    r.add_argument("--live-every-s", type=float, default=2.0)
    r.add_argument("--timeout-s", type=int, default=1800)
    r.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")),
                                                     "release"))
    r.add_argument("--work")
    r.add_argument("--keep-work", action="store_true")
    r.add_argument("--json", help="write the full report here")
    args = ap.parse_args()
    if args.cmd == "cleanup":
        cleanup_stale()
        return 0
    if os.geteuid() != 0:
        log("needs root (network namespaces, qdiscs, packet taps)")
        return 2
    if not 0 <= args.rt_prio <= 99:
        log(f"--rt-prio {args.rt_prio}: use 0 (normal scheduling) to 99")
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("lowtide", "origin-http", "parallel-http"):
            log(f"unknown method {m}: use lowtide, origin-http, parallel-http")
            return 2
    if "parallel-http" in methods and not shutil.which("aria2c"):
        log("parallel-http needs aria2c (apt-get install aria2; scripts/setup.sh does it)")
        return 2

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    tb = Testbed(args)
    os.makedirs(os.path.join(tb.work, "logs"), exist_ok=True)
    try:
        tb.build()
        tb.start_servers()
        tb.start_counters()
        cases, windows = [], {}
        for m in methods:
            log(f"case {m}: every agent gets the package")
            res, win = tb.run_case(m)
            cases.append(res)
            windows[m] = win
        tb.stop_probes()
        delays = tb.delays(windows)
        for c in cases:
            c["delay"] = delays.get(c["method"], {})
            p95 = [d["p95_ms"] for d in c["delay"].values() if d["p95_ms"] is not None]
            c["added_delay_p95_ms"] = max(p95) if p95 else None
        report = dict(
            package_bytes=tb.package_bytes,
            content_id=tb.content_id,
            topology=dict(rate=args.rate, rtt_ms=args.rtt_ms, vpn_rate=args.vpn_rate, vpn_rtt_ms=args.vpn_rtt_ms,
                          queue_ms=args.queue_ms, csv=tb.topology_csv,
                          sites={s.id: dict(kind=s.kind, parent=s.parent, cidr=s.cidr, agents=s.agents)
                                 for s in tb.sites}),
            cases=cases,
        )
        print_report(report)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
            log(f"report written to {args.json}")
        return 0
    except Failure as e:
        log(f"FAILED: {e}")
        args.keep_work = True
        log(f"logs kept in {tb.work}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        log("tearing down")
        tb.teardown()


if __name__ == "__main__":
    sys.exit(main())
