#!/usr/bin/env python3
"""What one round trip between two processes costs on this machine, when both ends share
a core and when they sit on different cores (issue 18: the added latency at C=1).

The side-by-side harness (../shared/bench/) pins its client and the sink to one core and
the contender to the other. `direct` (client to sink) therefore never crosses cores,
while every round trip through a proxy does: six between the client and the proxy
(banner, EHLO, MAIL, RCPT, DATA, end of data) and three between the proxy and the sink
(MAIL+RCPT, DATA, the content). Whatever a proxy does, its added p50 at C=1 cannot be
below about nine times the difference this script measures. It also reports the CPU
time the echoing process spends per round trip (user + system, from getrusage): being
woken from another core costs CPU too, not only time, which weighs most at C=1 where the
proxy is woken for every step.

Usage: python3 benches/cross_core_rtt.py [round trips per pair, default 5000]
Needs two CPUs. Run it on an otherwise idle machine, as the harness is.
"""

import os
import resource
import socket
import sys
import time

CLIENT_STEPS = 6  # banner, EHLO, MAIL, RCPT, DATA, end of data
NEXT_HOP_STEPS = 3  # MAIL+RCPT (pipelined), DATA, content


def echo_server(listener, cpu, report):
    os.sched_setaffinity(0, {cpu})
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = resource.getrusage(resource.RUSAGE_SELF)
    while True:
        data = conn.recv(512)
        if not data:
            end = resource.getrusage(resource.RUSAGE_SELF)
            spent = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
            os.write(report, repr(spent).encode())
            os._exit(0)
        conn.sendall(data)


def round_trips(client_cpu, server_cpu, n):
    """Median and 90th percentile of n 64-byte TCP round trips over loopback, and the
    echoing process's CPU per round trip, in µs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        echo_server(listener, server_cpu, report_w)
    os.sched_setaffinity(0, {client_cpu})
    s = socket.create_connection(listener.getsockname())
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    line = b"x" * 62 + b"\r\n"
    times = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(line)
        got = 0
        while got < len(line):
            got += len(s.recv(512))
        times.append(time.perf_counter() - t)
    s.close()
    os.waitpid(pid, 0)
    echo_cpu = float(os.read(report_r, 64).decode()) / n
    times.sort()
    return times[n // 2] * 1e6, times[n * 9 // 10] * 1e6, echo_cpu * 1e6


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two CPUs")
    cpus = sorted(os.sched_getaffinity(0))[:2]
    same = [round_trips(cpus[0], cpus[0], n), round_trips(cpus[1], cpus[1], n)]
    cross = [round_trips(cpus[0], cpus[1], n), round_trips(cpus[1], cpus[0], n)]
    for name, rows in (("same core", same), ("across cores", cross)):
        for (p50, p90, cpu), pair in zip(rows, ("A", "B")):
            print(f"{name:13} pair {pair}: p50 {p50:6.1f} us   p90 {p90:6.1f} us"
                  f"   echo CPU {cpu:5.1f} us per round trip")
    extra = sum(r[0] for r in cross) / 2 - sum(r[0] for r in same) / 2
    extra_cpu = sum(r[2] for r in cross) / 2 - sum(r[2] for r in same) / 2
    steps = CLIENT_STEPS + NEXT_HOP_STEPS
    print(f"a round trip across cores costs {extra:.1f} us more (p50),"
          f" and the woken process {extra_cpu:.1f} us more CPU")
    print(f"floor for a proxy's added p50 at C=1 in the harness: {steps} x {extra:.1f} us"
          f" = {steps * extra / 1000:.2f} ms")


if __name__ == "__main__":
    main()
