"""TCP/TLS load client: parallel streams, each ``CONNECT <tag>`` then bulk up or both ways.

Reads JSON on stdin: host, port, lines (one CONNECT line per stream), mode ("up" or "duplex"),
seconds, warmup. Prints JSON: bytes sent/received inside the measured window, its length, the
negotiated TLS version and cipher, and this process's CPU seconds. One thread per stream (OpenSSL
encrypts without the GIL, so several streams use several cores); a both-ways stream pumps both
directions from its one thread (bench.duplex), never one SSL socket from two threads.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import threading
import time

from bench.duplex import CHUNK, pump


def main() -> None:
    job = json.loads(sys.stdin.read())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    streams: list[ssl.SSLSocket] = []
    # "sources": the client address of each line (default: the kernel's choice).
    sources = job.get("sources") or [None] * len(job["lines"])
    for line, source in zip(job["lines"], sources, strict=True):
        bind = (source, 0) if source else None
        raw = socket.create_connection((job["host"], job["port"]), timeout=20, source_address=bind)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ctx.wrap_socket(raw)
        conn.sendall(line.encode())
        answer = b""
        while not answer.endswith(b"\n"):
            data = conn.recv(1)
            if not data:
                raise SystemExit(f"closed before the answer to CONNECT ({answer!r})")
            answer += data
        if answer != b"200 OK\r\n":
            raise SystemExit(f"CONNECT answered {answer!r}")
        conn.settimeout(None)
        streams.append(conn)

    start = time.monotonic() + job["warmup"]
    end = start + job["seconds"]
    counts = {"sent": 0, "received": 0}
    lock = threading.Lock()

    def count(what: str, n: int) -> None:
        now = time.monotonic()
        if start <= now <= end:
            with lock:
                counts[what] += n

    def send(conn: ssl.SSLSocket) -> None:
        block = b"u" * CHUNK
        try:
            while time.monotonic() < end:
                conn.sendall(block)
                count("sent", CHUNK)
        except OSError:
            pass

    def both(conn: ssl.SSLSocket) -> None:
        try:
            pump(
                conn,
                lambda: time.monotonic() < end,
                lambda n: count("sent", n),
                lambda n: count("received", n),
            )
        except OSError:
            pass

    target = both if job["mode"] == "duplex" else send
    threads = [threading.Thread(target=target, args=(conn,)) for conn in streams]
    cpu0 = os.times()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(job["warmup"] + job["seconds"] + 30)
    cpu1 = os.times()
    cipher = streams[0].cipher()
    for conn in streams:
        conn.close()
    print(
        json.dumps(
            {
                "sent": counts["sent"],
                "received": counts["received"],
                "seconds": job["seconds"],
                "tls": f"{cipher[1]} {cipher[0]}" if cipher else "",
                "cpu": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
            }
        )
    )


if __name__ == "__main__":
    main()
