#!/usr/bin/env python3
"""Plain TCP streams through the lab's shaped links (tools/lab.sh): what a bare TCP
payload gets through the same tbf shaping, the yardstick of issue 16's link goal.

  tcp_stream.py LINKS BYTES     LINKS: nfs-iscsi | nfs-ram | ram-iscsi

The NFS link carries BYTES from the NFS host (netns bclab-nfs, 198.18.0.2) to this
host, as READ replies do; the iSCSI link from this host to the iSCSI host (netns
bclab-iscsi, 198.18.0.6), as WRITEs do; nfs-iscsi runs both streams at once. Prints
{"elapsedMs": N}: from the moment the senders start to the last byte received (the
receivers listen before that, so connection set-up is inside, as it is for a copy).

Internal subcommands (run inside a namespace): recv IP PORT, send IP PORT BYTES.
"""
import json
import socket
import subprocess
import sys
import time

LINKS = {
    # (sending netns or "" for this host, receiver's netns, receiver's address)
    "nfs": ("bclab-nfs", "", "198.18.0.1"),
    "iscsi": ("", "bclab-iscsi", "198.18.0.6"),
}
PORT = 5399
CHUNK = 1 << 20


def recv(ip, port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, int(port)))
    srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    buf = memoryview(bytearray(CHUNK))
    total = 0
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        total += n
    print(total, flush=True)


def send(ip, port, count):
    count = int(count)
    data = memoryview(bytes(CHUNK))
    s = socket.create_connection((ip, int(port)))
    left = count
    while left > 0:
        n = min(left, CHUNK)
        s.sendall(data[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)
    s.close()


def in_ns(ns, args):
    me = [sys.executable, __file__] + args
    return (["ip", "netns", "exec", ns] + me) if ns else me


def main():
    if sys.argv[1:2] == ["recv"]:
        return recv(*sys.argv[2:4])
    if sys.argv[1:2] == ["send"]:
        return send(*sys.argv[2:5])
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    links = {"nfs-iscsi": ["nfs", "iscsi"], "nfs-ram": ["nfs"], "ram-iscsi": ["iscsi"]}.get(sys.argv[1])
    if not links:
        sys.exit(f"tcp_stream: unknown links {sys.argv[1]!r} (nfs-iscsi, nfs-ram, ram-iscsi)")
    count = int(sys.argv[2])
    receivers = []
    for i, link in enumerate(links):
        _, rns, ip = LINKS[link]
        p = subprocess.Popen(in_ns(rns, ["recv", ip, str(PORT + i)]), stdout=subprocess.PIPE, text=True)
        if p.stdout.readline().strip() != "ready":
            sys.exit(f"tcp_stream: the {link} receiver did not start")
        receivers.append(p)
    start = time.monotonic()
    senders = [subprocess.Popen(in_ns(LINKS[link][0], ["send", LINKS[link][2], str(PORT + i), str(count)]))
               for i, link in enumerate(links)]
    got = [int(p.stdout.readline()) for p in receivers]
    elapsed = time.monotonic() - start
    for p in senders + receivers:
        if p.wait() != 0:
            sys.exit("tcp_stream: a stream failed")
    if any(g != count for g in got):
        sys.exit(f"tcp_stream: received {got}, expected {count} each")
    print(json.dumps({"elapsedMs": round(elapsed * 1000)}, separators=(",", ":")))


if __name__ == "__main__":
    main()
