"""Tests for tailwart_edge.py: run `python3 -m pytest -q test_tailwart_edge.py`.

The end-to-end tests start the real script as a subprocess on loopback (ephemeral ports) and talk
to it with real sockets. TAILWART_PYTHON=/path/to/python3 runs the script under another
interpreter; the tests themselves run under the interpreter that runs pytest.

Sections: command line and header codec (unit), the relay end to end, real peers (`interop`:
Postfix, HAProxy, nginx), systemd (`systemd`). Real-peer and systemd tests skip when their
software is missing, naming the package; TAILWART_REQUIRE_PEERS=1 (set by CI) makes that a failure.
"""

import hashlib
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tailwart_edge as edge  # noqa: E402  (the unit tests call its functions directly)

PYTHON = os.environ.get("TAILWART_PYTHON", sys.executable)
SCRIPT = os.path.join(HERE, "tailwart_edge.py")
WAIT = 15           # seconds any single wait may take before a test gives up


# ----------------------------------------------------------------------------------------------
# Helpers: the script as a subprocess, upstream servers, clients
# ----------------------------------------------------------------------------------------------

def free_port(host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def has_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Edge:
    """The script as a subprocess; the constructor returns once it logged `ready`."""

    def __init__(self, *args, env=None, preexec_fn=None, timeout=WAIT):
        self.args = [PYTHON, SCRIPT] + list(args)
        self.lines = []
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     universal_newlines=True, preexec_fn=preexec_fn,
                                     env=dict(os.environ, **(env or {})))
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self.wait_for(r"\bready\b", timeout)
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self):
        return self.proc.pid

    def _read(self):
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)         # end of output
            self.cond.notify_all()

    def wait_for(self, pattern, timeout=WAIT, start=0):
        """The first line (from line number `start` on) matching the regular expression."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    if line is not None and re.search(pattern, line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or None in self.lines:
                    raise AssertionError("no line matching %r from %s:\n%s" % (
                        pattern, " ".join(self.args), self.output()))
                self.cond.wait(min(left, 0.2))

    def mark(self):
        """Where the next line will be: wait_for(..., start=mark) skips what came before."""
        with self.cond:
            return len(self.lines)

    def output(self):
        return "\n".join(line for line in self.lines if line is not None)

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=WAIT):
        code = self.proc.wait(timeout)
        self.reader.join(timeout)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(WAIT)

    def stop(self, timeout=WAIT):
        """SIGTERM; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def run_script(*args, timeout=WAIT):
    """Runs the script to its end: (exit code, stdout, stderr)."""
    proc = subprocess.run([PYTHON, SCRIPT] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          universal_newlines=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


class Upstream:
    """A loopback TCP server running handler(conn) in a thread per connection."""

    def __init__(self, handler, host="127.0.0.1", backlog=128, accept=True):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.handler = handler
        self.conns = []
        self.errors = []
        self.closed = False
        if accept:
            threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self):
        return ("[%s]:%d" if ":" in self.host else "%s:%d") % (self.host, self.port)

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.settimeout(WAIT * 2)
            self.handler(conn)
        except Exception as e:          # reported by the test through self.errors
            self.errors.append(e)
        finally:
            conn.close()

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def recv_exactly(conn, n):
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed after %d of %d bytes" % (len(data), n))
        data += chunk
    return bytes(data)


def recv_all(conn):
    """Everything until EOF."""
    data = bytearray()
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


def read_proxy_header(conn):
    """The PROXY header as received, byte for byte (v1 or v2, told apart by the first byte)."""
    first = recv_exactly(conn, 1)
    if first == b"P":               # v1: a line of at most 107 bytes
        line = first
        while not line.endswith(b"\r\n"):
            line += recv_exactly(conn, 1)
            assert len(line) <= 107, line
        return line
    head = first + recv_exactly(conn, 15)
    assert head[:12] == edge.V2_SIGNATURE, head
    return head + recv_exactly(conn, struct.unpack("!H", head[14:16])[0])


def echo(conn):
    """An upstream that echoes everything back (for --proxy-protocol off)."""
    while True:
        data = conn.recv(65536)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


def header_echo(conn):
    """An upstream that reads the header, then echoes."""
    read_proxy_header(conn)
    echo(conn)


def connect(address, source=None, timeout=WAIT):
    """A client socket connected to (host, port), from the source address if given."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family)
    sock.settimeout(timeout)
    if source:
        sock.bind((source, 0))
    sock.connect(address)
    return sock


def round_trip(port, payload=b"hello\r\n", host="127.0.0.1"):
    with connect((host, port)) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        return recv_all(c)


def eventually(predicate, timeout=WAIT):
    """Waits until predicate() is true (for what other threads finish)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)


def cpu_seconds(pid):
    """utime + stime of a process, from /proc (Linux)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------
# Command line: every accepted and refused form
# ----------------------------------------------------------------------------------------------

ACCEPTED = [
    # argv, [(bind, port, upstreams)]
    (["25=stalwart.tail7b1641.ts.net:25"], [(None, 25, [("stalwart.tail7b1641.ts.net", 25)])]),
    (["127.0.0.1:2525=10.0.0.5:25"], [("127.0.0.1", 2525, [("10.0.0.5", 25)])]),
    (["[::1]:993=[fd7a:115c:a1e0::1]:993"], [("::1", 993, [("fd7a:115c:a1e0::1", 993)])]),
    (["[::]:143=mail:143", "0.0.0.0:143=mail:143"],
     [("::", 143, [("mail", 143)]), ("0.0.0.0", 143, [("mail", 143)])]),
    ([":587=mail:587"], [(None, 587, [("mail", 587)])]),
    (["65535=h:1"], [(None, 65535, [("h", 1)])]),
    (["25=mx1:25,mx2:2525,[::1]:25"], [(None, 25, [("mx1", 25), ("mx2", 2525), ("::1", 25)])]),
    (["--upstream", "stalwart.tail7b1641.ts.net", "25", "465", "127.0.0.1:587"],
     [(None, 25, [("stalwart.tail7b1641.ts.net", 25)]),
      (None, 465, [("stalwart.tail7b1641.ts.net", 465)]),
      ("127.0.0.1", 587, [("stalwart.tail7b1641.ts.net", 587)])]),
    (["--upstream", "[fd7a:115c:a1e0::1]", "993"], [(None, 993, [("fd7a:115c:a1e0::1", 993)])]),
    (["--upstream", "mx", "25", "2525=other:25"], [(None, 25, [("mx", 25)]),
                                                  (None, 2525, [("other", 25)])]),
    (["127.0.0.1:25=a:25", "127.0.0.2:25=b:25"],
     [("127.0.0.1", 25, [("a", 25)]), ("127.0.0.2", 25, [("b", 25)])]),
    (["--proxy-protocol", "v1", "--connect-timeout", "2.5", "--idle-timeout", "60",
      "--drain-timeout", "0", "--max-connections", "100", "--relay", "copy", "-q",
      "25=my_host.example:25"], [(None, 25, [("my_host.example", 25)])]),
]


@pytest.mark.parametrize("argv, expected", ACCEPTED, ids=[" ".join(a) for a, _ in ACCEPTED])
def test_command_line_accepted(argv, expected):
    options, mappings = edge.parse_args(argv)
    assert [(m.bind, m.port, m.upstreams) for m in mappings] == expected


def test_command_line_defaults():
    options, _ = edge.parse_args(["25=h:25"])
    assert options.proxy_protocol == "v2"
    assert options.connect_timeout == 10
    assert options.idle_timeout > 29 * 60       # never cuts an IMAP IDLE
    assert options.drain_timeout == 30
    assert options.relay == "auto"


REFUSED = [
    # argv, what the one error line must say
    ([], r"no MAPPING given; usage: .*25=stalwart"),
    (["25="], r"'25=' has nothing after '='; write it as 25=HOST:PORT"),
    (["25=host"], r"upstream 'host' in '25=host' has no port; write it as host:PORT"),
    (["=host:25"], r"no listen port before '='"),
    (["25"], r"'25' has no upstream; write it as 25=HOST:PORT, or give --upstream"),
    (["abc=host:25"], r"listen port 'abc' in 'abc=host:25' is not a number; ports are numbers "
                      r"from 1 to 65535"),
    (["70000=h:25"], r"listen port 70000 .* out of range; ports are numbers from 1 to 65535"),
    (["0=h:25"], r"listen port 0 .* out of range"),
    (["25=h:0"], r"upstream port 0 in '25=h:0' is out of range"),
    (["25=h:99999"], r"upstream port 99999 .* out of range"),
    (["25=h:x"], r"upstream port 'x' .* is not a number"),
    (["25=h:"], r"upstream port is missing in '25=h:'"),
    (["25=:25"], r"upstream ':25' in '25=:25' has no host"),
    (["25=h:25,"], r"empty upstream; separate upstreams with one comma"),
    (["25=fd7a::1:25"], r"IPv6 address 'fd7a::1' in '25=fd7a::1:25' needs brackets; write it as "
                        r"\[fd7a::1\]:25"),
    (["::1:25=h:25"], r"IPv6 address '::1' in '::1:25=h:25' needs brackets"),
    (["[::1:25=h:25"], r"lacks its closing '\]'"),
    (["[::1]=h:25"], r"has no port; write it as \[::1\]:PORT"),
    (["[127.0.0.1]:25=h:25"], r"not an IPv6 address; brackets are only for IPv6"),
    (["25=[10.0.0.1]:25"], r"not an IPv6 address; brackets are only for IPv6"),
    (["localhost:25=h:25"], r"bind address 'localhost' .* is not an IP address"),
    (["25=bad/host:25"], r"upstream host 'bad/host' .* is not a host name or IP address"),
    (["--proxy-protocol", "v3", "25=h:25"], r"--proxy-protocol: invalid choice: 'v3'"),
    (["--connect-timeout", "0", "25=h:25"], r"--connect-timeout: '0' is not a positive number"),
    (["--idle-timeout", "soon", "25=h:25"], r"--idle-timeout: 'soon' is not a positive number"),
    (["--max-connections", "-5", "25=h:25"], r"--max-connections: '-5' is not a positive whole"),
    (["--relay", "fast", "25=h:25"], r"--relay: invalid choice: 'fast'"),
    (["--upstream", "fd7a::1", "25"], r"--upstream 'fd7a::1' is not a host name .*brackets"),
    (["--bogus", "25=h:25"], r"unrecognized arguments: --bogus"),
    (["25=a:25", "25=b:25"], r"listen address :25 in '25=b:25' collides with '25=a:25'"),
    (["127.0.0.1:25=a:25", "25=b:25"], r"collides with '127.0.0.1:25=a:25'"),
    (["[::1]:25=a:25", "[::]:25=b:25"], r"collides"),
    (["-v", "-q", "25=h:25"], r"not allowed with argument"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[" ".join(a) or "(none)" for a, _ in REFUSED])
def test_command_line_refused(argv, message):
    with pytest.raises(edge.ConfigError) as raised:
        edge.parse_args(argv)
    assert re.search(message, str(raised.value)), str(raised.value)


@pytest.mark.parametrize("argv, message", REFUSED[:6] + REFUSED[14:15] + REFUSED[22:23],
                         ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_command_line_exits_2_with_one_line(argv, message):
    code, out, err = run_script(*argv)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tailwart_edge.py: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err


def test_help_and_version():
    code, out, err = run_script("--help")
    assert code == 0 and "usage: tailwart_edge.py [OPTIONS] MAPPING" in out
    assert "25=stalwart.tail7b1641.ts.net:25" in out and "--proxy-protocol" in out
    code, out, err = run_script("--version")
    assert code == 0 and (out + err).startswith("tailwart-edge " + edge.__version__)


def test_a_port_in_use_exits_1_naming_address_and_fix():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, err = run_script("127.0.0.1:%d=127.0.0.1:9" % port)
    assert code == 1
    last = err.splitlines()[-1]
    assert last.startswith("tailwart_edge.py: error: cannot listen on 127.0.0.1:%d: " % port)
    assert "in use" in last and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may bind any port")
def test_a_privileged_port_without_root_names_the_fix():
    code, out, err = run_script("127.0.0.1:25=127.0.0.1:9")
    assert code == 1
    assert "CAP_NET_BIND_SERVICE" in err.splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# PROXY header codec, byte by byte against HAProxy's doc/proxy-protocol.txt
# ----------------------------------------------------------------------------------------------

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"     # section 2.2, the 12 bytes


def test_header_v1_tcp4():
    assert edge.proxy_header_v1(("203.0.113.9", 51234), ("198.51.100.1", 25)) == \
        b"PROXY TCP4 203.0.113.9 198.51.100.1 51234 25\r\n"


def test_header_v1_tcp6():
    assert edge.proxy_header_v1(("2001:db8::9", 51234, 0, 0), ("2001:db8::1", 993, 0, 0)) == \
        b"PROXY TCP6 2001:db8::9 2001:db8::1 51234 993\r\n"


def test_header_v1_v4_mapped_is_tcp4():
    assert edge.proxy_header_v1(("::ffff:203.0.113.9", 65535, 0, 0), ("::ffff:10.0.0.1", 1, 0, 0)) \
        == b"PROXY TCP4 203.0.113.9 10.0.0.1 65535 1\r\n"


def test_header_v1_mixed_families_is_unknown():
    assert edge.proxy_header_v1(("203.0.113.9", 1), ("2001:db8::1", 2, 0, 0)) == \
        b"PROXY UNKNOWN\r\n"


def test_header_v2_tcp4():
    assert edge.proxy_header_v2(("203.0.113.9", 51234), ("198.51.100.1", 25)) == (
        SIG + b"\x21"               # version 2, command PROXY
        + b"\x11"                   # AF_INET, STREAM
        + b"\x00\x0c"               # 12 address bytes follow
        + b"\xcb\x00\x71\x09"       # 203.0.113.9
        + b"\xc6\x33\x64\x01"       # 198.51.100.1
        + b"\xc8\x22"               # 51234
        + b"\x00\x19")              # 25


def test_header_v2_tcp6():
    assert edge.proxy_header_v2(("2001:db8::9", 51234, 0, 0), ("2001:db8::1", 993, 0, 0)) == (
        SIG + b"\x21"
        + b"\x21"                   # AF_INET6, STREAM
        + b"\x00\x24"               # 36 address bytes follow
        + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x09"
        + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01"
        + b"\xc8\x22" + b"\x03\xe1")


def test_header_v2_v4_mapped_is_tcp4():
    assert edge.proxy_header_v2(("::ffff:127.0.0.77", 40000, 0, 0),
                                ("::ffff:127.0.0.1", 2525, 0, 0)) == (
        SIG + b"\x21\x11\x00\x0c" + b"\x7f\x00\x00\x4d" + b"\x7f\x00\x00\x01"
        + b"\x9c\x40" + b"\x09\xdd")


def test_header_v2_mixed_families_is_unspec():
    assert edge.proxy_header_v2(("203.0.113.9", 1), ("2001:db8::1", 2, 0, 0)) == \
        SIG + b"\x21\x00\x00\x00"


# ----------------------------------------------------------------------------------------------
# End to end: the real script on loopback
# ----------------------------------------------------------------------------------------------

def capture_header(conn, into):
    """An upstream that stores the header it received plus what followed, then says 'ok'."""
    header = read_proxy_header(conn)
    into.append((header, conn.recv(65536)))
    conn.sendall(b"ok")


def expected_v2(client, server):
    family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
    return (SIG + (b"\x21\x21\x00\x24" if family == socket.AF_INET6 else b"\x21\x11\x00\x0c")
            + socket.inet_pton(family, client[0]) + socket.inet_pton(family, server[0])
            + struct.pack("!HH", client[1], server[1]))


CLIENT_KINDS = {
    # name: (bind address or None for dual-stack, client source, address the client dials)
    "ipv4": ("127.0.0.1", "127.0.0.77", "127.0.0.1"),
    "ipv6": ("[::1]", "::1", "::1"),
    "dual-stack-ipv4": (None, "127.0.0.77", "127.0.0.1"),
}


@pytest.mark.parametrize("kind", sorted(CLIENT_KINDS))
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_header_received_byte_exact(kind, version):
    bind, source, dial = CLIENT_KINDS[kind]
    if ":" in source and not has_ipv6():
        pytest.skip("no IPv6 on loopback")
    received = []
    port = free_port(dial)
    listen = "%s:%d" % (bind, port) if bind else str(port)
    with Upstream(lambda conn: capture_header(conn, received)) as up, \
            Edge("--proxy-protocol", version, "%s=%s" % (listen, up.address)) as proxy:
        with connect((dial, port), source=source) as c:
            c.sendall(b"EHLO client.example\r\n")
            assert recv_exactly(c, 2) == b"ok"
            client, server = c.getsockname()[:2], c.getpeername()[:2]
        proxy.stop()
    assert client[0] == source              # the client really came from 127.0.0.77 / ::1
    header, rest = received[0]
    if version == "v2":
        assert header == expected_v2(client, server)
    else:
        assert header == ("PROXY %s %s %s %d %d\r\n" % (
            "TCP6" if ":" in client[0] else "TCP4", client[0], server[0], client[1],
            server[1])).encode()
    assert rest == b"EHLO client.example\r\n"
    assert not up.errors


def test_header_off_is_plain_forwarding():
    port = free_port()
    with Upstream(echo) as up, \
            Edge("--proxy-protocol", "off", "127.0.0.1:%d=%s" % (port, up.address)):
        assert round_trip(port, b"no header\r\n") == b"no header\r\n"


def test_client_bytes_sent_during_connect_follow_the_header():
    """The upstream accepts late: what the client sent meanwhile comes right after the header."""
    port = free_port()
    with Upstream(None, accept=False) as up, \
            Edge("127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"\x16\x03\x01 client hello first")     # a TLS client speaks first
            time.sleep(0.3)         # the edge connected (kernel backlog); nobody accepted yet
            c.sendall(b" and more")
            conn, _ = up.sock.accept()
            with conn:
                conn.settimeout(WAIT)
                header = read_proxy_header(conn)
                assert header == expected_v2(c.getsockname(), c.getpeername())
                early = b"\x16\x03\x01 client hello first and more"
                assert recv_exactly(conn, len(early)) == early


def test_half_close_client_finishes_first_then_gets_1mib_reply():
    reply = os.urandom(1 << 20)

    def upstream(conn):
        read_proxy_header(conn)
        request = recv_all(conn)                # until the client's FIN arrives
        conn.sendall(hashlib.sha256(request).digest() + reply)
        conn.shutdown(socket.SHUT_WR)

    request = os.urandom(300000)
    port = free_port()
    with Upstream(upstream) as up, Edge("127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            c.sendall(request)
            c.shutdown(socket.SHUT_WR)
            answer = recv_all(c)
        assert answer == hashlib.sha256(request).digest() + reply
        line = proxy.wait_for(r"session client=")
        assert "end=client-fin" in line and "up=300000 " in line
        assert "down=%d " % (32 + len(reply)) in line
    assert not up.errors


def test_half_close_upstream_finishes_first_client_keeps_sending():
    got = []

    def upstream(conn):                         # a greeting, FIN, then it still reads
        read_proxy_header(conn)
        conn.sendall(b"220 bye for now\r\n")
        conn.shutdown(socket.SHUT_WR)
        got.append(recv_all(conn))

    port = free_port()
    with Upstream(upstream) as up, Edge("127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            assert recv_all(c) == b"220 bye for now\r\n"      # EOF arrived: upstream FIN
            data = os.urandom(500000)
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            line = proxy.wait_for(r"session client=")
        eventually(lambda: got)                 # the upstream thread has read to the end
        assert got == [data]
        assert "end=upstream-fin" in line


@pytest.mark.parametrize("relay", ["auto", "copy"])
def test_integrity_16_connections_8mib_each_way(relay):
    """16 sessions at once, 8 MiB of random bytes each way in random-size chunks."""
    size, count = 8 << 20, 16
    upstream_got, upstream_sent = {}, {}

    def send_random(sock, total, rng):
        digest = hashlib.sha256()
        left = total
        while left:
            chunk = os.urandom(min(left, rng.randint(1, 256 * 1024)))
            sock.sendall(chunk)
            digest.update(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        return digest.hexdigest()

    def drain(sock):
        digest, total = hashlib.sha256(), 0
        while True:
            chunk = sock.recv(rng_size())
            if not chunk:
                return digest.hexdigest(), total
            digest.update(chunk)
            total += len(chunk)

    def rng_size():
        return random.randint(1, 128 * 1024)

    def upstream(conn):
        header = read_proxy_header(conn)
        client_port = struct.unpack("!H", header[-4:-2])[0]
        sender = threading.Thread(target=lambda: upstream_sent.__setitem__(
            client_port, send_random(conn, size, random.Random(client_port))))
        sender.start()
        upstream_got[client_port] = drain(conn)
        sender.join()

    results, failures = {}, []

    def client(port):
        try:
            with connect(("127.0.0.1", port), timeout=60) as c:
                sent = {}
                sender = threading.Thread(target=lambda: sent.__setitem__(
                    "sha", send_random(c, size, random.Random())))
                sender.start()
                got = drain(c)
                sender.join()
                results[c.getsockname()[1]] = (sent["sha"], got)
        except Exception as e:
            failures.append(e)

    port = free_port()
    with Upstream(upstream) as up, \
            Edge("--relay", relay, "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        clients = [threading.Thread(target=client, args=(port,)) for _ in range(count)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(120)
        assert not failures and not up.errors, (failures, up.errors)
        assert len(results) == count
        eventually(lambda: len(upstream_got) == count)
        for client_port, (sent_sha, (got_sha, got_len)) in results.items():
            assert upstream_got[client_port] == (sent_sha, size)        # client -> upstream
            assert (got_sha, got_len) == (upstream_sent[client_port], size)  # upstream -> client
        proxy.signal(signal.SIGUSR1)
        stats = proxy.wait_for(r"\bstats ")
        assert "sessions=%d " % count in stats
        assert "up=%d down=%d" % (count * size, count * size) in stats


def test_upstream_refused_closes_the_client_and_says_why():
    port, dead = free_port(), free_port()       # nothing listens on `dead`
    with Edge("127.0.0.1:%d=127.0.0.1:%d" % (port, dead)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"hello")
            assert recv_all(c) == b""
        line = proxy.wait_for(r"session client=")
        assert "end=connect-failed" in line and "warning" in line
        assert re.search(r'reason="[^"]*refused', line, re.I), line
        assert round_trip(port) == b""          # and it carries on serving
        assert proxy.proc.poll() is None


def test_upstream_that_never_accepts_hits_the_connect_timeout():
    # A listener with a full backlog: Linux drops further SYNs, so connect() hangs.
    with Upstream(None, backlog=0, accept=False) as up:
        fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", up.port))
            fillers.append(s)
        time.sleep(0.2)
        port = free_port()
        try:
            with Edge("--connect-timeout", "1", "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
                with connect(("127.0.0.1", port)) as c:
                    assert recv_all(c) == b""
                line = proxy.wait_for(r"session client=")
                assert "end=connect-failed" in line
                assert re.search(r'reason="[^"]*tim', line, re.I), line
        finally:
            for s in fillers:
                s.close()


def test_upstream_by_name_localhost():
    port = free_port()
    with Upstream(header_echo) as up, Edge("127.0.0.1:%d=localhost:%d" % (port, up.port)) as proxy:
        assert round_trip(port, b"by name") == b"by name"
        line = proxy.wait_for(r"session client=")
        assert "upstream=127.0.0.1:%d" % up.port in line        # ::1 refused first, if listed


def test_failover_to_the_second_upstream():
    port, dead = free_port(), free_port()
    with Upstream(header_echo) as up, \
            Edge("127.0.0.1:%d=127.0.0.1:%d,%s" % (port, dead, up.address)) as proxy:
        assert round_trip(port, b"second") == b"second"


def test_idle_timeout_closes_a_silent_session():
    port = free_port()
    with Upstream(header_echo) as up, \
            Edge("--idle-timeout", "1", "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
            assert recv_all(c) == b""               # closed by the edge, not by us
        assert "end=idle-timeout" in proxy.wait_for(r"session client=")


def test_sigterm_drains_open_sessions_then_exits_0():
    port = free_port()
    with Upstream(header_echo) as up, Edge("127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"before")
            assert recv_exactly(c, 6) == b"before"
            proxy.signal(signal.SIGTERM)
            proxy.wait_for(r"stopping active=1 ")
            with pytest.raises(OSError):            # listeners are closed
                connect(("127.0.0.1", port), timeout=2).close()
            c.sendall(b"during the drain")           # the open session still relays
            assert recv_exactly(c, 16) == b"during the drain"
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b""
        assert proxy.wait() == 0
        assert "end=client-fin" in proxy.wait_for(r"session client=")
        proxy.wait_for(r"stopped sessions=1")


def test_drain_timeout_closes_what_is_left_and_exits_0():
    port = free_port()
    with Upstream(header_echo) as up, \
            Edge("--drain-timeout", "1", "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
            proxy.signal(signal.SIGTERM)
            assert recv_all(c) == b""
        assert proxy.wait() == 0
        assert "end=drain" in proxy.wait_for(r"session client=")


def test_sigusr1_logs_counters_per_mapping():
    port, other = free_port(), free_port()
    with Upstream(header_echo) as up, \
            Edge("127.0.0.1:%d=%s" % (port, up.address), "127.0.0.1:%d=%s" % (other, up.address)) \
            as proxy:
        assert round_trip(port, b"12345") == b"12345"
        proxy.wait_for(r"session client=")
        with connect(("127.0.0.1", other)) as open_session:
            open_session.sendall(b"ab")
            assert recv_exactly(open_session, 2) == b"ab"
            proxy.signal(signal.SIGUSR1)
            line = proxy.wait_for(r"\bstats ")
        assert re.search(r"stats active=1 sessions=2 failed=0 up=\d+ down=\d+", line), line
        assert "127.0.0.1:%d active=0 sessions=1" % port in line
        assert "127.0.0.1:%d active=1 sessions=1" % other in line


def test_reset_from_the_upstream_resets_the_client():
    def upstream(conn):
        read_proxy_header(conn)
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    port = free_port()
    with Upstream(upstream) as up, Edge("127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"x")
            with pytest.raises(ConnectionResetError):
                while c.recv(100):
                    pass
        assert "end=upstream-reset" in proxy.wait_for(r"session client=")


def test_a_slow_reader_does_not_delay_others():
    """A client that never reads a big reply must not hold up another session."""
    def upstream(conn):
        read_proxy_header(conn)
        first = conn.recv(5)
        if first == b"flood":
            try:
                while True:
                    conn.sendall(b"x" * 65536)      # until every buffer is full
            except OSError:
                return
        conn.sendall(first)

    port = free_port()
    with Upstream(upstream) as up, Edge("127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as stuck:
            stuck.sendall(b"flood")
            time.sleep(0.5)
            for _ in range(20):
                assert round_trip(port, b"quick") == b"quick"


def test_fd_limit_64_with_80_clients_no_spin_and_recovers():
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    port = free_port()
    with Upstream(echo) as up, Edge("--proxy-protocol", "off", "127.0.0.1:%d=%s"
                                    % (port, up.address), preexec_fn=limit) as proxy:
        ready = proxy.wait_for(r"\bready\b")
        cap = int(re.search(r"max-connections=(\d+)", ready).group(1))
        assert 0 < cap < 40
        clients = []
        for i in range(80):
            c = connect(("127.0.0.1", port))    # the kernel backlog takes them all
            c.sendall(b"%03d" % i)
            clients.append(c)
        time.sleep(1)
        before = cpu_seconds(proxy.pid)
        time.sleep(2)
        spent = cpu_seconds(proxy.pid) - before
        assert spent < 0.5, "%.2f CPU seconds in 2 s while saturated: the loop spins" % spent
        # Served in turns: as the first sessions close, the waiting ones are accepted.
        for i, c in enumerate(clients):
            assert recv_exactly(c, 3) == b"%03d" % i
            c.close()
        assert round_trip(port, b"after") == b"after"
        assert proxy.proc.poll() is None


def test_forced_fd_exhaustion_pauses_accepting_without_spinning():
    """--max-connections above what the fd limit allows: accept() meets EMFILE."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    port = free_port()
    with Upstream(echo) as up, Edge("--proxy-protocol", "off", "--max-connections", "1000",
                                    "127.0.0.1:%d=%s" % (port, up.address),
                                    preexec_fn=limit) as proxy:
        clients = [connect(("127.0.0.1", port)) for _ in range(40)]
        for i, c in enumerate(clients):
            c.sendall(b"%03d" % i)
        proxy.wait_for(r"out of file descriptors|EMFILE|Too many open files")
        before = cpu_seconds(proxy.pid)
        time.sleep(2)
        spent = cpu_seconds(proxy.pid) - before
        assert spent < 0.5, "%.2f CPU seconds in 2 s while out of fds: the loop spins" % spent
        for i, c in enumerate(clients):
            try:
                got = recv_exactly(c, 3)
            except (EOFError, ConnectionResetError):
                got = None              # a session that lost its upstream connect to EMFILE
            assert got in (b"%03d" % i, None)
            c.close()
        mark = proxy.mark()
        proxy.signal(signal.SIGUSR1)        # the descriptors of the closed sessions are free
        while "stats active=0 " not in proxy.wait_for(r"\bstats ", start=mark):
            time.sleep(0.1)
            mark = proxy.mark()
            proxy.signal(signal.SIGUSR1)
        assert round_trip(port, b"after") == b"after"
        assert proxy.proc.poll() is None


def test_sessions_log_lines_under_journal_have_priorities_and_no_time():
    port = free_port()
    # JOURNAL_STREAM must name stderr's own device:inode, known only once the pipe exists:
    # a small launcher sets it from its own stderr, then becomes the script.
    code = ("import os, sys; st = os.fstat(2); os.environ['JOURNAL_STREAM'] = '%d:%d' % "
            "(st.st_dev, st.st_ino); os.execv(sys.argv[1], sys.argv[1:])")
    with Upstream(header_echo) as up:
        proc = subprocess.Popen([PYTHON, "-c", code, PYTHON, SCRIPT,
                                 "127.0.0.1:%d=%s" % (port, up.address)],
                                stderr=subprocess.PIPE, universal_newlines=True)
        try:
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if "ready" in line:
                    break
            assert round_trip(port, b"j") == b"j"
            proc.send_signal(signal.SIGTERM)
            rest = proc.stderr.read()           # to its end: the script exits after the drain
            assert proc.wait(WAIT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        proc.stderr.close()
    lines += rest.splitlines(True)
    assert any(line.startswith("<5>ready pid=") for line in lines), lines
    assert any(line.startswith("<6>session client=127.0.0.1:") for line in lines), lines
    assert all(re.match(r"<\d>", line) for line in lines), lines
