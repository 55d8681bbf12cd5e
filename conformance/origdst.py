#!/usr/bin/env python3
"""Live-traffic helper for the conformance suite; run inside a pod netns.

  origdst.py listen ADDR PORT READY_FILE [TIMEOUT]
      Listen on ADDR:PORT, create READY_FILE once listening, accept one connection and print
      its original destination (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST) as ip:port or [ip]:port.
  origdst.py connect ADDR PORT [TIMEOUT]
      Open one TCP connection to ADDR:PORT and send a short probe.

Exit status is non-zero when nothing arrives (or the connection fails) within TIMEOUT seconds.
"""

import socket
import struct
import sys

SO_ORIGINAL_DST = 80  # same value for IPv4 and for IP6T_SO_ORIGINAL_DST
SOL_IPV6 = 41  # the socket module names only IPPROTO_IPV6, which has this value


def family_of(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def original_destination(conn, family):
    if family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return "%s:%d" % (socket.inet_ntop(socket.AF_INET, packed), port)
    raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
    port, packed = struct.unpack_from("!2xH4x16s", raw)
    return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, packed), port)


def listen(addr, port, ready_file, timeout):
    family = family_of(addr)
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((addr, port))
        server.listen(1)
        server.settimeout(timeout)
        open(ready_file, "w").close()
        conn, _ = server.accept()
        with conn:
            print(original_destination(conn, family), flush=True)


def connect(addr, port, timeout):
    with socket.create_connection((addr, port), timeout=timeout) as conn:
        conn.sendall(b"icni-probe\n")


def main(argv):
    try:
        if len(argv) in (5, 6) and argv[1] == "listen":
            timeout = float(argv[5]) if len(argv) == 6 else 5.0
            listen(argv[2], int(argv[3]), argv[4], timeout)
        elif len(argv) in (4, 5) and argv[1] == "connect":
            timeout = float(argv[4]) if len(argv) == 5 else 3.0
            connect(argv[2], int(argv[3]), timeout)
        else:
            sys.stderr.write(__doc__)
            return 2
    except OSError as err:
        sys.stderr.write("origdst.py %s: %s\n" % (argv[1], err))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
