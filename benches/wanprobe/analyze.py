#!/usr/bin/env python3
"""Turns the raw files of scripts/bench-wan.sh into the table, the JSON and the plots.

Each case directory (OUT/case-*) holds:
  meta.env                 RATE_BPS, RTT_MS, BOTTLENECK, TOOLS, SECOND_HOST (1/0), ...
  events                   "NAME REALTIME_NS [VALUE]" lines written by the bench script
  tap.csv                  per-flow frame bytes arriving at the receiver, 10 ms bins (lowtide-wanprobe tap)
  probe-base.csv           idle probe RTTs (lowtide-wanprobe probe)
  probe-TOOL.csv           probe RTTs while TOOL runs

Throughput is counted in wire bytes as TBF counts them (IP length + 14-byte
Ethernet header) for every tool, at the receiver's interface (after the
bottleneck and the delay line). Standard library only.
"""

import argparse
import csv
import glob
import json
import os
import subprocess
import sys

BIN_NS = 10_000_000
# Centred window for the rate over time used by yield/reclaim detection.
RATE_WINDOW_BINS = 5  # 50 ms
YIELD_FRACTION = 0.10
RECLAIM_FRACTION = 0.90

SND = "10.77.1.2"
SND2 = "10.77.3.2"
LOWTIDE_PORT = 7000
PORT_BG_TCP = 5201
PORT_FG_SND = 5202
PORT_FG_SND2 = 5203


def read_meta(path):
    meta = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and "=" in line:
                k, v = line.split("=", 1)
                meta[k] = v
    return meta


def read_events(path):
    ev = {}
    if not os.path.exists(path):
        return ev
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                ev[parts[0]] = [int(p) for p in parts[1:]]
    return ev


def flow_of(row):
    src, proto, sport, dport = row["src"], int(row["proto"]), int(row["sport"]), int(row["dport"])
    if proto == 17 and src == SND and sport == LOWTIDE_PORT:
        return "bg-lowtide"
    if proto == 6 and src == SND and dport == PORT_BG_TCP:
        return "bg-tcp-cubic"
    if proto == 6 and src == SND and dport == PORT_FG_SND:
        return "fg-snd"
    if proto == 6 and src == SND2 and dport == PORT_FG_SND2:
        return "fg-snd2"
    return "other"


def read_tap(path):
    """flow -> {bin_ns: [bytes, big_frames]}"""
    flows = {}
    if not os.path.exists(path):
        return flows
    with open(path) as f:
        for row in csv.DictReader(f):
            fl = flow_of(row)
            b = int(row["bin_start_realtime_ns"])
            d = flows.setdefault(fl, {})
            cur = d.setdefault(b, [0, 0])
            cur[0] += int(row["bytes"])
            cur[1] += int(row["big_frames"])
    return flows


def read_probe(path):
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for row in csv.DictReader(f):
            out.append((int(row["send_realtime_ns"]), int(row["rtt_us"])))
    return out


def pct(values, p):
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def bytes_between(bins, t0, t1):
    return sum(v[0] for b, v in bins.items() if t0 <= b < t1)


def big_span(bins, t0, t1):
    """First and last bin with bulk frames of a flow within [t0, t1)."""
    hits = sorted(b for b, v in bins.items() if t0 <= b < t1 and v[1] > 0)
    if not hits:
        return None
    return hits[0], hits[-1] + BIN_NS


def rate_series(bins, t0, t1):
    """[(bin_start_ns, bits_per_s)] over [t0, t1): the rate over RATE_WINDOW_BINS bins centred on each bin."""
    start = t0 // BIN_NS * BIN_NS
    n = max(0, (t1 - start) // BIN_NS)
    raw = [bins.get(start + i * BIN_NS, [0, 0])[0] for i in range(n)]
    half = RATE_WINDOW_BINS // 2
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        # Every window covers RATE_WINDOW_BINS bins; at the edges use what exists.
        out.append((start + i * BIN_NS, sum(raw[lo:hi]) * 8 / ((hi - lo) * BIN_NS / 1e9)))
    return out


def first_time(series, t_from, pred):
    for t, r in series:
        if t >= t_from and pred(r):
            return t
    return None


def ms(ns):
    return None if ns is None else ns / 1e6


def fmt(v, spec="{:.0f}", none="never"):
    return none if v is None else spec.format(v)


def analyse_case(case_dir):
    meta = read_meta(os.path.join(case_dir, "meta.env"))
    ev = read_events(os.path.join(case_dir, "events"))
    flows = read_tap(os.path.join(case_dir, "tap.csv"))
    rate = int(meta["RATE_BPS"])
    hosts = ["snd", "snd2"] if meta.get("SECOND_HOST") == "1" else ["snd"]
    base = [r for _, r in read_probe(os.path.join(case_dir, "probe-base.csv")) if r >= 0]
    base_us = pct(base, 50)
    res = {
        "rate_mbit": rate // 1_000_000,
        "rtt_ms": int(meta["RTT_MS"]),
        "bottleneck": meta["BOTTLENECK"],
        "queue_limit_bytes": int(meta.get("QUEUE_LIMIT_BYTES", "0") or 0),
        "base_rtt_ms": None if base_us is None else base_us / 1000,
        "base_rtt_min_ms": None if not base else min(base) / 1000,
        # The testbed's own floor: idle probe RTT - its median, as for added delay.
        "idle_jitter_ms": {
            p: None if base_us is None else (pct(base, n) - base_us) / 1000 for p, n in (("p95", 95), ("p99", 99))
        },
        "fg_solo_mbit": {},
        "tools": {},
    }
    for h in hosts:
        s, e = ev.get(f"fgsolo_{h}_start"), ev.get(f"fgsolo_{h}_end")
        bins = flows.get(f"fg-{h}", {})
        if s and e:
            span = big_span(bins, s[0], e[0] + 2_000_000_000)
            if span:
                res["fg_solo_mbit"][h] = bytes_between(bins, *span) * 8 / ((span[1] - span[0]) / 1e9) / 1e6
    for tool in meta["TOOLS"].split(","):
        if f"bg_start_{tool}" not in ev:
            continue
        bg = flows.get(f"bg-{tool}", {})
        t_bg0, t_bg1 = ev[f"bg_start_{tool}"][0], ev[f"bg_end_{tool}"][0]
        s0, s1 = ev[f"solo_start_{tool}"][0], ev[f"solo_end_{tool}"][0]
        r = {"fg": {}}
        r["solo_utilisation"] = bytes_between(bg, s0, s1) * 8 / (rate * (s1 - s0) / 1e9)
        tc0, tc1 = ev.get(f"tc_solo_start_{tool}"), ev.get(f"tc_solo_end_{tool}")
        if tc0 and tc1 and len(tc0) > 1 and len(tc1) > 1:
            r["link_utilisation_tc"] = (tc1[1] - tc0[1]) * 8 / (rate * (tc1[0] - tc0[0]) / 1e9)
        probes = read_probe(os.path.join(case_dir, f"probe-{tool}.csv"))
        win = [(t, rt) for t, rt in probes if s0 <= t < s1]
        added = [(rt - base_us) / 1000 for _, rt in win if rt >= 0] if base_us is not None else []
        r["added_delay_ms"] = {p: pct(added, n) for p, n in (("p50", 50), ("p95", 95), ("p99", 99))}
        r["probes_solo"] = len(win)
        r["probes_lost_solo"] = sum(1 for _, rt in win if rt < 0)
        series = rate_series(bg, t_bg0, t_bg1 + 1_000_000_000)
        for h in hosts:
            fs, fe = ev.get(f"fg_{h}_start_{tool}"), ev.get(f"fg_{h}_end_{tool}")
            if not fs or not fe:
                continue
            fbins = flows.get(f"fg-{h}", {})
            # Phase ends where the next one starts (or the background stops).
            nxt = t_bg1
            for k in (f"fg_snd2_start_{tool}",):
                if k in ev and ev[k][0] > fe[0]:
                    nxt = min(nxt, ev[k][0])
            span = big_span(fbins, fs[0], fe[0] + 2_000_000_000)
            f = {}
            if span:
                f0, f1 = span
                f["mbit"] = bytes_between(fbins, f0, f1) * 8 / ((f1 - f0) / 1e9) / 1e6
                solo = res["fg_solo_mbit"].get(h)
                f["share_of_solo"] = f["mbit"] / solo if solo else None
                f["bg_share_during"] = bytes_between(bg, f0, f1) * 8 / (rate * (f1 - f0) / 1e9)
                # Background rate in the second before the foreground: yielding is trivial below the threshold.
                f["bg_share_before"] = bytes_between(bg, f0 - 1_000_000_000, f0) * 8 / rate
                t_y = first_time(series, f0, lambda v: v < YIELD_FRACTION * rate)
                f["yield_ms"] = ms(t_y - f0) if t_y is not None and t_y < f1 else None
                t_r = first_time(series, f1, lambda v: v >= RECLAIM_FRACTION * rate)
                f["reclaim_ms"] = ms(t_r - f1) if t_r is not None and t_r < nxt else None
                f["start_ns"], f["end_ns"] = f0, f1
            r["fg"][h] = f
        r["t0_ns"], r["t1_ns"] = t_bg0, t_bg1
        phases = [("solo", s0), ("/solo", s1)]
        for h in hosts:
            f = r["fg"].get(h, {})
            if "start_ns" in f:
                who = "fg" if h == "snd" else "fg2"
                phases += [(who, f["start_ns"]), ("/" + who, f["end_ns"])]
        r["phases"] = phases
        res["tools"][tool] = r
        write_series(case_dir, tool, r, series, flows, hosts, probes, base_us, t_bg0, t_bg1)
    return res


def write_series(case_dir, tool, r, series, flows, hosts, probes, base_us, t0, t1):
    with open(os.path.join(case_dir, f"rate-{tool}.dat"), "w") as f:
        f.write("# t_s bg_mbit " + " ".join(f"fg_{h}_mbit" for h in hosts) + "\n")
        fser = {h: dict(rate_series(flows.get(f"fg-{h}", {}), t0, t1 + 1_000_000_000)) for h in hosts}
        for t, v in series:
            f.write(f"{(t - t0) / 1e9:.3f} {v / 1e6:.3f} " + " ".join(f"{fser[h].get(t, 0) / 1e6:.3f}" for h in hosts) + "\n")
    with open(os.path.join(case_dir, f"delay-{tool}.dat"), "w") as f:
        f.write("# t_s added_delay_ms (probe RTT - idle median RTT)\n")
        for t, rt in probes:
            if rt >= 0 and base_us is not None and t >= t0:
                f.write(f"{(t - t0) / 1e9:.3f} {(rt - base_us) / 1000:.3f}\n")


def plot(case_dir, tool, res, png):
    r = res["tools"][tool]
    hosts = list(r["fg"].keys())
    title = f"{tool}: {res['rate_mbit']} Mbit/s, RTT {res['rtt_ms']} ms, bottleneck on {res['bottleneck']}"
    rate_dat = os.path.join(case_dir, f"rate-{tool}.dat")
    delay_dat = os.path.join(case_dir, f"delay-{tool}.dat")
    lines = [f"'{rate_dat}' using 1:2 with lines lw 2 title 'background ({tool})'"]
    for i, h in enumerate(hosts):
        who = "same host" if h == "snd" else "second host"
        lines.append(f"'{rate_dat}' using 1:{3 + i} with lines lw 2 title 'foreground TCP ({who})'")
    t0 = r["t0_ns"]
    marks = []
    for name, t in r.get("phases", []):
        x = (t - t0) / 1e9
        marks.append(f"set arrow from {x:.3f}, graph 0 to {x:.3f}, graph 1 nohead dt 3 lc rgb 'black'")
        y = 0.91 if name.startswith("/") else 0.97
        marks.append(f"set label '{name}' at {x:.3f}, graph {y} offset 0.3,0 font ',8'")
    xmax = (r["t1_ns"] - t0) / 1e9 + 1
    script = f"""
set terminal pngcairo size 1200,800 font ',10'
set output '{png}'
set multiplot layout 2,1 title "{title}"
set grid
set key top right opaque box font ',9'
set lmargin 10
set xrange [0:{xmax:.1f}]
{chr(10).join(marks)}
set ylabel 'Mbit/s (50 ms window, wire bytes)'
set yrange [0:{res['rate_mbit'] * 1.25}]
plot {', '.join(lines)}, {res['rate_mbit']} with lines dt 2 lc rgb 'gray' title 'bottleneck'
set xlabel 's since background start'
set ylabel 'added delay, ms'
set yrange [*:*]
plot '{delay_dat}' using 1:2 with points pt 7 ps 0.3 title 'probe RTT - idle RTT (10 ms probe)'
unset multiplot
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--json")
    ap.add_argument("--plot-all", dest="plot_all", action="store_true", help="a PNG per case and tool (else the first case per tool)")
    args = ap.parse_args()
    cases = []
    for d in sorted(glob.glob(os.path.join(args.out, "case-*"))):
        if os.path.exists(os.path.join(d, "meta.env")) and os.path.exists(os.path.join(d, "events")):
            try:
                cases.append((d, analyse_case(d)))
            except (KeyError, ValueError, ZeroDivisionError) as e:
                print(f"analyze: {d}: incomplete ({e!r})", file=sys.stderr)
    out_cases = []
    hdr = (
        f"{'tool':<10} {'rate':>4} {'rtt':>3} {'bneck':<6} {'base':>6} {'idle95/99':>9} {'util':>6} {'tc':>6} "
        f"{'d50':>6} {'d95':>6} {'d99':>6} {'lost':>4} | {'fg%':>5} {'bg%':>5} {'yield':>6} {'reclm':>6} "
        f"| {'fg2%':>5} {'bg%':>5} {'yield2':>6} {'reclm2':>6}"
    )
    table = [hdr, "-" * len(hdr)]
    plotted = set()
    for d, res in cases:
        for tool, r in res["tools"].items():
            fgs = [r["fg"].get(h, {}) for h in ("snd", "snd2")]
            shares = [f.get("share_of_solo") for f in fgs if f]
            yields = [f.get("yield_ms") for f in fgs if f]
            reclaims = [f.get("reclaim_ms") for f in fgs if f]
            out_cases.append({
                "tool": tool,
                "rate_mbit": res["rate_mbit"],
                "rtt_ms": res["rtt_ms"],
                "bottleneck": res["bottleneck"],
                "solo_utilisation": round(r["solo_utilisation"], 4),
                "added_delay_ms": {k: None if v is None else round(v, 3) for k, v in r["added_delay_ms"].items()},
                "idle_jitter_ms": {k: None if v is None else round(v, 3) for k, v in res["idle_jitter_ms"].items()},
                "foreground_yield": None if not shares or None in shares else round(min(shares), 4),
                "yield_ms": None if not yields or None in yields else round(max(yields), 1),
                "reclaim_ms": None if not reclaims or None in reclaims else round(max(reclaims), 1),
            })
            a = r["added_delay_ms"]
            row = (
                f"{tool:<10} {res['rate_mbit']:>4} {res['rtt_ms']:>3} {res['bottleneck']:<6} "
                f"{fmt(res['base_rtt_ms'], '{:.2f}', '-'):>6} "
                f"{fmt(res['idle_jitter_ms']['p95'], '{:.1f}', '-') + '/' + fmt(res['idle_jitter_ms']['p99'], '{:.1f}', '-'):>9} "
                f"{r['solo_utilisation'] * 100:>5.1f}% "
                f"{fmt(r.get('link_utilisation_tc'), '{:.1%}', '-'):>6} "
                f"{fmt(a['p50'], '{:.2f}', '-'):>6} {fmt(a['p95'], '{:.2f}', '-'):>6} {fmt(a['p99'], '{:.2f}', '-'):>6} "
                f"{r['probes_lost_solo']:>4}"
            )
            for h in ("snd", "snd2"):
                f = r["fg"].get(h)
                if not f:
                    row += f" | {'n/a':>5} {'':>5} {'':>6} {'':>6}"
                    continue
                row += (
                    f" | {fmt(f.get('share_of_solo'), '{:.1%}', '-'):>5} {fmt(f.get('bg_share_during'), '{:.0%}', '-'):>5} "
                    f"{fmt(f.get('yield_ms')) + ('*' if (f.get('bg_share_before') or 0) < YIELD_FRACTION else ''):>6} "
                    f"{fmt(f.get('reclaim_ms')):>6}"
                )
            table.append(row)
            key = tool
            if args.plot_all or key not in plotted:
                png = os.path.join(args.out, f"plot-{os.path.basename(d)}-{tool}.png")
                try:
                    plot(d, tool, res, png)
                    plotted.add(key)
                    r["png"] = png
                except (OSError, subprocess.CalledProcessError) as e:
                    print(f"analyze: plot {png}: {e}", file=sys.stderr)
        with open(os.path.join(d, "result.json"), "w") as f:
            json.dump(res, f, indent=1)
    print("\n".join(table))
    print(
        "\nutil = background wire bytes (IP length + 14 B Ethernet, at the receiver) / bottleneck rate, solo window;"
        "\ntc = all bytes the bottleneck TBF sent in that window (tc -s qdisc) / rate;"
        "\nbase = idle probe RTT median (ms); idle95/99 = p95/p99 of idle probe RTT - base (ms): the testbed's own floor;"
        "\nd50/d95/d99 = probe RTT - base (ms) in the solo window; lost = probes lost there;"
        "\nfg% = foreground TCP CUBIC throughput / its solo throughput (same host | second host behind the router);"
        "\nbg% = background wire rate / bottleneck rate while the foreground ran;"
        f"\nyield = ms from the foreground's first bulk frame until the background's 50 ms rate < {YIELD_FRACTION:.0%} of the link;"
        f"\nreclm = ms from the foreground's last bulk frame until the background's 50 ms rate >= {RECLAIM_FRACTION:.0%} of the link;"
        f"\n* = the background was already below {YIELD_FRACTION:.0%} of the link in the second before the foreground started;"
        "\n'never' = not within the phase. JSON: foreground_yield = worst share, yield_ms/reclaim_ms = worst (null if never)."
    )
    for d, res in cases:
        for tool, r in res["tools"].items():
            if "png" in r:
                print(f"plot: {r['png']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": out_cases}, f, indent=1)
            f.write("\n")
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
