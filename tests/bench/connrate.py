#!/usr/bin/env python3
"""New-connection rate: clients open, use and close TCP connections back to back.

  connrate.py serve <ip> <port>                  accept forever; answer each connection's byte
  connrate.py run <ip> <port> <seconds> [n]      print connections completed per second, by
                                                 one client, or n at once (processes)

Each connection is a full handshake, one byte each way and an abortive close (RST, so the
client never runs out of ports to TIME_WAIT). What is measured is the cost of a connection's
first packets, which is where an NFQUEUE policy (or any per-flow setup) shows up.
"""
import multiprocessing
import socket
import struct
import sys
import threading
import time


def serve(ip, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(1024)

    def one(c):
        try:
            if c.recv(1):
                c.sendall(b"y")
        except OSError:
            pass
        finally:
            c.close()

    while True:
        c, _ = s.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()


def client(ip, port, seconds, results):
    linger = struct.pack("ii", 1, 0)
    done = failed = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        c.settimeout(2)
        try:
            c.connect((ip, port))
            c.sendall(b"x")
            if c.recv(1) == b"y":
                done += 1
            else:
                failed += 1
        except OSError:
            failed += 1
        finally:
            c.close()
    results.put((done, failed))


def run(ip, port, seconds, clients):
    results = multiprocessing.Queue()
    start = time.monotonic()
    procs = [multiprocessing.Process(target=client, args=(ip, port, seconds, results)) for _ in range(clients)]
    for p in procs:
        p.start()
    counts = [results.get() for _ in procs]
    for p in procs:
        p.join()
    done, failed = sum(d for d, _ in counts), sum(f for _, f in counts)
    rate = done / (time.monotonic() - start)
    if failed:
        print(f"{failed} connections failed", file=sys.stderr)
    print(f"{rate:.0f}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        run(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 1)
