"""A bulk stand-in for the agent's session endpoint (TLS ``CONNECT <tag>`` then sink/source) + UDP counter.

The agent stand-in echoes, which ties both directions together; a throughput figure needs a sink
(one way) and a source. The tag chooses the mode: ``sink-*`` reads and discards, ``duplex-*``
reads and writes at the same time (from its one thread, bench.duplex), ``echo-*`` echoes. One
thread per connection: OpenSSL runs without the GIL, so the backend costs the same on both paths
and little. ``tls`` on stdin answers the protocol and cipher of the newest relay connection.
UDP datagrams to the same port are counted (and echoed with ``--udp-echo``).

    python -m bench.backend --port P --cert C --key K   (prints "ready", then answers "udp" on stdin)
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import threading

from bench.duplex import CHUNK, pump
from gatehouse import tls

udp_count = 0
last_tls = ""


def _serve(raw: socket.socket, ctx: ssl.SSLContext) -> None:
    global last_tls
    try:
        conn = ctx.wrap_socket(raw, server_side=True)
        line = b""
        while not line.endswith(b"\n"):
            data = conn.recv(1)
            if not data:
                return
            line += data
        tag = line.decode().split()[1]
        conn.sendall(b"200 OK\r\n")
        cipher = conn.cipher()
        last_tls = f"{cipher[1]} {cipher[0]}" if cipher else ""
        mode = tag.split("-", 1)[0]
        if mode == "duplex":
            pump(conn, lambda: True)
        elif mode == "echo":
            while data := conn.recv(CHUNK):
                conn.sendall(data)
        else:
            while conn.recv(CHUNK):
                pass
    except (OSError, ValueError, IndexError):
        pass
    finally:
        raw.close()


def _udp(port: int, echo: bool) -> None:
    global udp_count
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", port))
    while True:
        data, addr = sock.recvfrom(2048)
        udp_count += 1
        if echo:
            sock.sendto(data, addr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--udp-echo", action="store_true")
    parser.add_argument("--no-udp", action="store_true", help="leave the UDP port to another counter")
    args = parser.parse_args()
    ctx = tls.server_context(args.cert, args.key, role="agent")
    listener = socket.create_server(("127.0.0.1", args.port), backlog=1024)
    if not args.no_udp:
        threading.Thread(target=_udp, args=(args.port, args.udp_echo), daemon=True).start()

    def accept() -> None:
        while True:
            raw, _ = listener.accept()
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_serve, args=(raw, ctx), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("ready", flush=True)
    for command in sys.stdin:  # the parent's commands; EOF (parent gone) ends the backend
        if command.strip() == "udp":
            print(udp_count, flush=True)
        elif command.strip() == "tls":
            print(last_tls, flush=True)


if __name__ == "__main__":
    main()
