#!/usr/bin/env python3
"""How fast an agent answers a backlog on its NFQUEUE: the queue's own throughput.

  nfqburst.py send <ip> <first port> <count>   one UDP datagram to each of <count> ports
                                                from <first port> on: each a new flow
  nfqburst.py drain <agent pid> <count> <queue> run in the node's namespace with the agent
                                                stopped (SIGSTOP): waits until <count>
                                                packets wait on <queue>, wakes the agent
                                                and prints the packets it answered per second
                                                (thousands) and the agent's CPU time per
                                                packet (us, all its threads)

Runs in the namespaces the bench script made; sends only to the pod address it is given.
"""
import os
import signal
import socket
import sys
import time


def send(ip, first, count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for port in range(first, first + count):
        s.sendto(b"x", (ip, port))


def waiting(queue):
    """Packets waiting on `queue` (queue_total, /proc/net/netfilter/nfnetlink_queue)."""
    with open("/proc/net/netfilter/nfnetlink_queue") as f:
        for line in f:
            cols = line.split()
            if int(cols[0]) == queue:
                return int(cols[2])
    return 0


def cpu_ns(pid):
    """CPU time all of `pid`'s threads have run, in ns (schedstat: exact, not in ticks)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # a thread that ended meanwhile
    return total


def drain(pid, count, queue):
    deadline = time.monotonic() + 10
    while waiting(queue) < count:
        if time.monotonic() > deadline:
            sys.exit(f"only {waiting(queue)} of {count} packets reached queue {queue}")
        time.sleep(0.01)
    cpu = cpu_ns(pid)
    start = time.monotonic()
    os.kill(pid, signal.SIGCONT)
    while waiting(queue) > 0:
        if time.monotonic() - start > 10:
            sys.exit(f"{waiting(queue)} packets still wait on queue {queue} after 10 s")
        # Polling without a pause would take a core from the agent on a small machine.
        time.sleep(0.0002)
    took = time.monotonic() - start
    print(f"{count / took / 1000:.1f} {(cpu_ns(pid) - cpu) / count / 1000:.2f}")


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        drain(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
