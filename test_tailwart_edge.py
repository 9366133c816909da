"""Tests for tailwart_edge.py: run `python3 -m pytest -q -rs test_tailwart_edge.py`.

The end-to-end tests start the real script as a subprocess on loopback (ephemeral ports) and talk
to it with real sockets. TAILWART_PYTHON=/path/to/python3 runs the script under another
interpreter; the tests themselves run under the interpreter that runs pytest.

Sections: command line and header codec (unit), the relay end to end, real peers (`interop`:
Postfix, HAProxy, nginx, Dovecot), systemd (`systemd`), then the doctor (`check`), metrics and
visible failures (`metrics`, `visible`), refusals, passive health and per-client limits
(`refusal`, `health`, `limit`), routing by server name and HTTP Host (`routing`). Real-peer and
systemd tests skip when their software is missing, naming the package; TAILWART_REQUIRE_PEERS=1
(set by CI) makes that a failure.
"""

import collections
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import http.client
import imaplib
import inspect
import os
import platform
import poplib
import random
import re
import resource
import select
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

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

def free_port(host="127.0.0.1", hold=False):
    """A port nothing uses right now, below the kernel's ephemeral range (ip_local_port_range):
    no outgoing connection can be given it as its source port, and no socket bound to port 0
    gets it, so only another bind can take it between this probe and the caller's bind (Edge
    retries a start that finds it taken). A port in the ephemeral range was once taken by a
    client connection's source port in CI, between the probe and the script's listen.
    hold=True returns (port, socket) with the socket bound and not listening: nothing can take
    the port while it is held, and a connection to it is refused at once (a dead upstream)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    high = min(ephemeral, 32768)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = random.randrange(max(1024, high - 12000), high)
        if port in HANDED_OUT:
            continue        # given to a caller lately: maybe not bound yet (a "dead" upstream)
        s = socket.socket(family)
        try:
            s.bind((host, port))
        except OSError:
            s.close()
            continue
        if len(HANDED_OUT) >= 4000:
            HANDED_OUT.clear()
        HANDED_OUT.add(port)
        if hold:
            return port, s
        s.close()
        return port
    raise AssertionError("no free port below %d on %s" % (high, host))


# Ports free_port() gave out in this run. Picked at random from ~12,000, two calls of one test
# (a dead upstream's port, then the listen port) once got the same port in CI: the first was
# never bound, so the probe found it free again. A port is not given twice in 4,000 calls.
HANDED_OUT = set()


def test_free_port_gives_no_port_twice():
    """Test helper: a dead upstream's port (never bound) and the listen port picked next were
    once the same random port in CI (3,000 random picks from ~12,000 repeat with near
    certainty); now every pick is a port not given before."""
    ports = [free_port() for _ in range(3000)]
    assert len(set(ports)) == len(ports)


def has_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class PortInUse(AssertionError):
    """The script exited 1 at start: an address it was to listen on is in use."""


class Edge:
    """The script as a subprocess; the constructor returns once it logged `ready`.

    A port from free_port() is below the ephemeral range, but another bind (a parallel test run,
    some other program) can still take it between the probe and the script's bind. When the
    script exits 1 saying an address is "in use", the constructor starts it again with the same
    command line, up to `tries` times with growing pauses (1.5 s in all): enough for a holder
    that lets go soon. A parallel run's listener stays for its test: only another port helps.
    So a test that can take whatever port it is given starts the script with Edge.on_free_port(),
    which retries each start on a fresh port. Either way a taken port ends in PortInUse.
    """

    def __init__(self, *args, env=None, preexec_fn=None, timeout=WAIT, tries=5, pass_fds=()):
        self.args = [PYTHON, SCRIPT] + list(args)
        self.pass_fds = tuple(pass_fds)         # descriptors the script inherits
        for attempt in range(tries):
            try:
                self._start(env, preexec_fn, timeout)
                return
            except PortInUse:
                if attempt == tries - 1:
                    raise
                time.sleep(0.1 * 2 ** attempt)

    @classmethod
    def on_free_port(cls, build, host="127.0.0.1", tries=5, **options):
        """(edge, port): build(port) returns the command line for a port from free_port(host);
        a start that finds the port in use is retried with a fresh one."""
        for attempt in range(tries):
            port = free_port(host)
            try:
                return cls(*build(port), tries=1, **options), port
            except PortInUse:
                if attempt == tries - 1:
                    raise

    def _start(self, env, preexec_fn, timeout):
        self.lines = []
        # a session of its own: kill() ends the processes a reload starts too (one group)
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     universal_newlines=True, preexec_fn=preexec_fn,
                                     env=dict(os.environ, **(env or {})), start_new_session=True,
                                     pass_fds=self.pass_fds)
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self.wait_for(r"\bready\b", timeout)
        except AssertionError as e:
            self.kill()
            lines = self.output().splitlines()
            if self.proc.returncode == 1 and lines and re.search(r"\bin use\b", lines[-1]):
                raise PortInUse(str(e)) from None
            raise
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
        """Kill the script, and every process that took over from it by a reload (HUP): they
        are all in the process group the script was started in."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass                # none left
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


def unavailable(reason):
    """Skip, or fail when CI says every peer tool must be there."""
    if os.environ.get("TAILWART_REQUIRE_PEERS") == "1":
        pytest.fail(reason + " (TAILWART_REQUIRE_PEERS=1)")
    pytest.skip(reason)


def need_tool(name):
    path = shutil.which(name)
    if path is None:
        unavailable("%s is not installed" % name)
    return path


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
    (["25=mx1:25,mx2:2525,[2001:db8::1]:25"],
     [(None, 25, [("mx1", 25), ("mx2", 2525), ("2001:db8::1", 25)])]),
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


MISTAKES_EXPLAINED = [
    # argv, the whole error line after "tailwart_edge.py: error: " (issue 20: each seen)
    (["--idle-timout", "5", "25=h:25"],
     "unrecognized arguments: --idle-timout; did you mean --idle-timeout?"),
    (["--idle-timout=5", "25=h:25"],
     "unrecognized arguments: --idle-timout=5; did you mean --idle-timeout?"),
    (["--up", "mx", "25"], "unrecognized arguments: --up; did you mean --upstream?"),
    (["--idle-timout", "5", "--rlay", "copy", "25=h:25"],
     "unrecognized arguments: --idle-timout --rlay; did you mean --idle-timeout for "
     "--idle-timout, --relay for --rlay?"),
    (["--upstream", "mx:25", "25"], "--upstream 'mx:25' names a port; drop the port: each "
     "port goes to the same port there (--upstream mx)"),
    (["--upstream", "[fd7a::1]:25", "25"], "--upstream '[fd7a::1]:25' names a port; drop the "
     "port: each port goes to the same port there (--upstream [fd7a::1])"),
    (["127.0.0.1:2525:127.0.0.2:25"], "mapping '127.0.0.1:2525:127.0.0.2:25': write it as "
     "127.0.0.1:2525=127.0.0.2:25 (the listen address, '=', then HOST:PORT)"),
    (["[::1]:2525:mx:25"], "mapping '[::1]:2525:mx:25': write it as [::1]:2525=mx:25 (the "
     "listen address, '=', then HOST:PORT)"),
    (["25:mx:25"], "mapping '25:mx:25': write it as 25=mx:25 (a listen port, '=', then "
     "HOST:PORT)"),
    (["127.0.0.3;34243"], "mapping '127.0.0.3;34243': write it as 127.0.0.3:34243 (a colon "
     "before a port, not ';')"),
    (["2525=127.0.0.3;34243"], "mapping '2525=127.0.0.3;34243': write it as "
     "2525=127.0.0.3:34243 (a colon before a port, not ';')"),
    (["25=mx1:25;mx2:25"], "mapping '25=mx1:25;mx2:25': write it as 25=mx1:25,mx2:25 (a "
     "comma between upstreams, not ';')"),
    (["127.0.0.2:25=2525"], "mapping '127.0.0.2:25=2525': write it as 2525=127.0.0.2:25 (the "
     "listen port first, then '=' and the upstream HOST:PORT)"),
    (["mx:25=2525"], "mapping 'mx:25=2525': write it as 2525=mx:25 (the listen port first, "
     "then '=' and the upstream HOST:PORT)"),
]


@pytest.mark.parametrize("argv, message", MISTAKES_EXPLAINED,
                         ids=[" ".join(a) for a, _ in MISTAKES_EXPLAINED])
def test_command_line_mistake_says_how_to_write_it(argv, message):
    """Issue 20: the option meant, the port dropped, the mapping as it is written (before:
    `unrecognized arguments` alone, `is not a host name`, an IPv6 hint for IPv4, `has no
    port; write it as 127.0.0.3;34243:PORT`, `upstream '2525' ... has no port`)."""
    code, out, err = run_script(*argv)
    assert (code, out, err) == (2, "", "tailwart_edge.py: error: %s\n" % message)


def test_command_line_mistake_with_no_likely_meaning_gets_no_guess():
    """A hint only when one reading parses: --bogus is near no option; '25:mx' means nothing
    with a '=' put in; a valid mapping is never rewritten."""
    for argv, message in ((["--bogus", "25=h:25"], "unrecognized arguments: --bogus"),
                          (["127.0.0.1:25"], "mapping '127.0.0.1:25' has no upstream; "
                           "write it as 127.0.0.1:25=HOST:PORT, or give --upstream HOST to "
                           "forward to the same port there")):
        with pytest.raises(edge.ConfigError) as raised:
            edge.parse_args(argv)
        assert str(raised.value) == message
    _, mappings = edge.parse_args(["2525=25:25"])       # a host named 25: as written
    assert [(m.port, m.upstreams) for m in mappings] == [(2525, [("25", 25)])]


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


def test_a_privileged_port_without_root_names_the_fix():
    python, script, unprivileged = PYTHON, SCRIPT, None
    if os.geteuid() == 0:
        # root may bind any port: run as nobody, with a copy of the script nobody can read and
        # the system's python3 (an interpreter under /root is out of nobody's reach)
        python = "/usr/bin/python3"
        if not os.access(python, os.X_OK):
            pytest.skip("running as root and no /usr/bin/python3 to run as nobody")
        directory = tempfile.mkdtemp(prefix="tailwart-nobody-")    # pytest's are root-only
        os.chmod(directory, 0o755)
        script = shutil.copy(SCRIPT, directory)

        def unprivileged():
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

    proc = subprocess.run([python, script, "127.0.0.1:25=127.0.0.1:9"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=WAIT,
                          universal_newlines=True, preexec_fn=unprivileged, cwd="/")
    if unprivileged is not None:
        shutil.rmtree(directory)
    code, err = proc.returncode, proc.stderr
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


def test_header_v2_cached_destination_gives_the_same_bytes():
    """The v2 header's fixed part is kept per local address: the second header for one
    destination, and one for another client family, are what they would be without it."""
    dst = ("198.51.100.7", 4190)
    first = edge.proxy_header_v2(("203.0.113.9", 51234), dst)
    assert dst in edge.V2_DESTINATIONS
    assert edge.proxy_header_v2(("203.0.113.10", 1), dst) == first[:16] + bytes(
        [203, 0, 113, 10, 198, 51, 100, 7, 0, 1, 0x10, 0x5e])
    assert edge.proxy_header_v2(("2001:db8::9", 1, 0, 0), dst) == SIG + b"\x21\x00\x00\x00"


@pytest.mark.parametrize("kind", ["epoll", "selectors"])
def test_poller_keeps_the_selectors_contract(kind, monkeypatch):
    """The loop's Poller: epoll itself on Linux, selectors.DefaultSelector elsewhere (forced
    here by hiding epoll); both give (data, fd, mask) with selectors' READ/WRITE (epoll's not
    narrowed to what was registered: the handlers narrow it), and a forgotten fd gives
    nothing once its socket is closed."""
    if kind == "epoll" and edge.EPOLL is None:
        unavailable("epoll (Linux)")
    if kind == "selectors":
        monkeypatch.setattr(edge, "EPOLL", None)
    poller = edge.Poller()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        owner = object()
        poller.register(a.fileno(), edge.READ, owner)
        assert poller.select(0) == []
        b.send(b"x")
        assert poller.select(1) == [(owner, a.fileno(), edge.READ)]
        poller.modify(a.fileno(), edge.READ | edge.WRITE, "other")
        assert poller.select(1) == [("other", a.fileno(), edge.READ | edge.WRITE)]
        poller.unregister(a.fileno())
        assert poller.select(0) == []
        poller.register(c.fileno(), edge.READ, owner)
        d.close()                       # a hang-up wakes a reader (and, from epoll, a writer)
        [(data, fd, mask)] = poller.select(1)
        assert (data, fd, mask & edge.READ) == (owner, c.fileno(), edge.READ)
        poller.forget(c.fileno())
        c.close()
        assert poller.select(0) == []
    finally:
        for sock in (a, b, c, d):
            sock.close()


# ----------------------------------------------------------------------------------------------
# Egress codec and policy (unit, `egress`): the v2 header the VPS end reads, the refused table
# ----------------------------------------------------------------------------------------------

def v2(command, family, body):
    """A v2 header with a raw command, family and address block (+ TLVs)."""
    return edge.V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


V2_TCP4_BODY = socket.inet_aton("100.64.0.7") + socket.inet_aton("8.8.8.8") + \
    struct.pack("!HH", 40000, 25)
V2_TCP6_BODY = socket.inet_pton(socket.AF_INET6, "fd7a:115c:a1e0::7") + \
    socket.inet_pton(socket.AF_INET6, "2a00:1450:4001::1a") + struct.pack("!HH", 40000, 25)
EGRESS_HEADERS = [
    # (case, bytes, the ProxyHeader's (command, destination), or a refusal's words)
    ("local", v2(0x20, 0x00, b""), ("LOCAL", None)),
    ("local with a block", v2(0x20, 0x11, V2_TCP4_BODY), ("LOCAL", None)),
    ("local unix", v2(0x20, 0x31, b"\0" * 216), ("LOCAL", None)),
    ("tcp4", v2(0x21, 0x11, V2_TCP4_BODY), ("PROXY", ("8.8.8.8", 25))),
    ("tcp6", v2(0x21, 0x21, V2_TCP6_BODY), ("PROXY", ("2a00:1450:4001::1a", 25))),
    ("tcp4 and TLVs", v2(0x21, 0x11, V2_TCP4_BODY + b"\x04\x00\x03abc" + b"\x01\x00\x00"),
     ("PROXY", ("8.8.8.8", 25))),
    ("our encoder", edge.proxy_header_v2(("127.0.0.1", 5), ("198.51.100.25", 25)),
     ("PROXY", ("198.51.100.25", 25))),
    ("unspec", v2(0x21, 0x00, b""), "UNSPEC header"),
    ("udp4", v2(0x21, 0x12, V2_TCP4_BODY), "UDP4 header"),
    ("udp6", v2(0x21, 0x22, V2_TCP6_BODY), "UDP6 header"),
    ("unix", v2(0x21, 0x31, b"\0" * 216), "UNIX stream header"),
    ("unknown family", v2(0x21, 0x41, V2_TCP4_BODY), "family byte 0x41"),
    ("version 1 command", v2(0x11, 0x11, V2_TCP4_BODY), "version/command byte 0x11"),
    ("command 2", v2(0x22, 0x11, V2_TCP4_BODY), "version/command byte 0x22"),
    ("short tcp4 block", v2(0x21, 0x11, V2_TCP4_BODY[:8]), "8 address bytes, not 12"),
    ("tcp6 family, tcp4 block", v2(0x21, 0x21, V2_TCP4_BODY), "12 address bytes, not 36"),
    ("oversized length", edge.V2_SIGNATURE + b"\x21\x11\xff\xff", "over 528"),
    ("just over the limit", v2(0x21, 0x11, V2_TCP4_BODY + b"\x04" + struct.pack("!H", 498) +
                                b"\0" * 498), "529 bytes, over 528"),
    ("at the limit", v2(0x21, 0x11, V2_TCP4_BODY + b"\x04" + struct.pack("!H", 497) +
                         b"\0" * 497), ("PROXY", ("8.8.8.8", 25))),
    ("TLV cut short", v2(0x21, 0x11, V2_TCP4_BODY + b"\x04\x00"), "ends inside a TLV"),
    ("TLV too long", v2(0x21, 0x11, V2_TCP4_BODY + b"\x04\x00\x09abc"), "TLV longer"),
    ("v1 header", b"PROXY TCP4 100.64.0.7 8.8.8.8 40000 25\r\n", "not a PROXY v2 header"),
    ("SMTP instead", b"EHLO mail.example.com\r\n", "not a PROXY v2 header"),
    ("signature off by one byte", b"\r\n\r\n\x00\r\nQUIT\r" + b"\x21\x11\x00\x0c" +
     V2_TCP4_BODY, "not a PROXY v2 header"),
]


def read_header(pieces):
    """Feed the pieces one after another: the ProxyHeader, None (not whole) or ValueError."""
    reader, data = edge.V2Reader(), bytearray()
    for piece in pieces:
        data += piece
        found = reader.read(data)
        if found is not None:
            return found
    return None


def test_egress_source_that_is_no_longer_ours_is_a_failure_not_a_crash():
    """--egress-source is checked at start; should the address leave the VPS later, the bind
    before a connect fails: that connect's failure (the mail server hears 421 4.4.1), named."""
    connector = edge.EgressConnector.__new__(edge.EgressConnector)
    connector.source = "192.0.2.99"             # on no interface here
    with socket.socket() as sock:
        assert connector.bind_source(sock) == "cannot use source 192.0.2.99: %s" \
            % os.strerror(errno.EADDRNOTAVAIL)
    connector.source = "127.0.0.1"
    with socket.socket() as sock:
        assert connector.bind_source(sock) is None and sock.getsockname()[0] == "127.0.0.1"
    assert edge.Connector.source is None        # the inbound relay: the kernel's choice


@pytest.mark.parametrize("case,data,expected", EGRESS_HEADERS,
                         ids=[case for case, _, _ in EGRESS_HEADERS])
def test_egress_header_table(case, data, expected):
    """Every header case, whole and one byte at a time (the same answer), and cut short by
    a byte (never whole). The VPS carries only a TCP4/TCP6 PROXY header; LOCAL is a probe."""
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))]):
        if isinstance(expected, str):
            with pytest.raises(ValueError) as caught:
                read_header(pieces)
            assert expected in str(caught.value)
        else:
            found = read_header(pieces)
            assert (found.command, found.destination) == expected
            assert found.length == len(data)
    if not isinstance(expected, str):
        assert read_header([data[:-1]]) is None         # truncated: waits for the rest


def test_egress_header_bytes_after_it_are_the_clients():
    """What follows the header in the same segment is the mail server's, not the header's."""
    data = v2(0x21, 0x11, V2_TCP4_BODY)
    found = read_header([data + b"\x16\x03\x01 opaque"])
    assert found.length == len(data)


class CountingBytes(bytearray):
    """A stream that counts the bytes its readers slice out of it."""
    sliced = 0

    def __getitem__(self, index):
        part = bytearray.__getitem__(self, index)
        if isinstance(index, slice):
            CountingBytes.sliced += len(part)
        return part


def test_egress_header_work_per_byte_is_flat():
    """The biggest header allowed, one byte per segment: the reader looks at the 12-byte
    signature at most until the length is in, then at nothing until the header is whole,
    so what it slices stays within a few times the header (not its square)."""
    data = v2(0x21, 0x11, V2_TCP4_BODY + b"\x04" + struct.pack("!H", 497) + b"\0" * 497)
    assert len(data) == edge.V2_HEADER_LIMIT
    reader, stream = edge.V2Reader(), CountingBytes()
    CountingBytes.sliced = 0
    found = None
    for i in range(len(data)):
        stream += data[i:i + 1]
        found = reader.read(stream)
    assert found is not None and found.destination == ("8.8.8.8", 25)
    assert CountingBytes.sliced <= 16 * 12 + len(data), CountingBytes.sliced


def test_egress_header_fuzz():
    """Mutated, cut and padded headers (a fixed seed, 3000 of them): the reader answers a
    header, not-yet or ValueError, never anything else, the same whole and in random pieces."""
    rng = random.Random(21)
    seeds = [data for _, data, _ in EGRESS_HEADERS]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            kind = rng.randrange(4)
            if kind == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind == 1:
                del data[rng.randrange(len(data) + 1):]
            elif kind == 2:
                data += bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
            elif len(data) > 15:
                data[14:16] = struct.pack("!H", rng.randrange(65536))
        data = bytes(data)
        results = []
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 5))) if len(data) > 1 \
            else []
        for pieces in ([data], [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]):
            try:
                results.append(read_header(pieces))
            except ValueError:
                results.append("refused")
        assert results[0] == results[1]


EGRESS_DESTINATIONS = [
    # (address, refused because (words), or None: carried)
    ("8.8.8.8", None),
    ("2a00:1450:4001::1a", None),
    ("0.1.2.3", "this network"),
    ("10.1.2.3", "private (10.0.0.0/8)"),
    ("172.31.255.255", "private (172.16.0.0/12)"),
    ("192.168.1.1", "private (192.168.0.0/16)"),
    ("100.101.102.103", "shared (CGNAT, the tailnet)"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.169.254", "link-local"),
    ("192.0.0.8", "IETF protocol assignments"),
    ("192.0.2.25", "documentation"),
    ("198.51.100.25", "documentation"),
    ("203.0.113.25", "documentation"),
    ("192.88.99.1", "6to4 relay anycast"),
    ("198.18.0.1", "benchmarking"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("::8.8.8.8", "IPv4-compatible"),
    ("::ffff:127.0.0.1", "v4-mapped form of 127.0.0.1 loopback"),
    ("::ffff:10.0.0.1", "v4-mapped form of 10.0.0.1 private"),
    ("::ffff:169.254.169.254", "v4-mapped form of 169.254.169.254 link-local"),
    ("::ffff:100.64.0.1", "v4-mapped form of 100.64.0.1 shared"),
    ("::ffff:8.8.8.8", None),
    ("64:ff9b::7f00:1", "NAT64 form of 127.0.0.1 loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64 form of 169.254.169.254 link-local"),
    ("64:ff9b::c0a8:101", "NAT64 form of 192.168.1.1 private"),
    ("64:ff9b::808:808", None),
    ("64:ff9b:1::808:808", "local-use NAT64"),
    ("2002:7f00:1::1", "6to4 form of 127.0.0.1 loopback"),
    ("2002:a9fe:a9fe::", "6to4 form of 169.254.169.254 link-local"),
    ("2002:6440:1::", "6to4 form of 100.64.0.1 shared"),
    ("2002:c000:219::", "6to4 form of 192.0.2.25 documentation"),
    ("2002:808:808::1", None),
    # Teredo (RFC 4380 4): server at bits 32-63, client XORed in the last 32
    ("2001:0:7f00:1::", "Teredo server form of 127.0.0.1 loopback"),
    ("2001:0:808:808:0:0:f5ff:fffe", "Teredo client form of 10.0.0.1 private"),
    ("2001:0:808:808:0:0:5601:5601", "Teredo client form of 169.254.169.254 link-local"),
    ("2001:0:808:808:0:0:f7f7:f7f7", "IETF protocol assignments"),    # both global: still
    ("2001:2::1", "IETF protocol assignments"),
    ("2001:db8::25", "documentation (2001:db8::/32)"),
    ("3fff::25", "documentation (3fff::/20)"),
    ("100::1", "discard-only"),
    ("5f00::1", "segment routing"),
    ("fd7a:115c:a1e0::7", "unique-local"),
    ("fc00::1", "unique-local"),
    ("fe80::1", "link-local"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("1::1", "not global unicast"),
    ("4000::1", "not global unicast"),
]


@pytest.mark.parametrize("ip,refused", EGRESS_DESTINATIONS,
                         ids=[ip for ip, _ in EGRESS_DESTINATIONS])
def test_egress_destination_table(ip, refused):
    """Each refused range, its v4-mapped, NAT64, 6to4 and Teredo forms, and global addresses:
    an explicit table, the same answer under every CPython (no ipaddress.is_global)."""
    version, value = edge.address_value(ip)
    why = edge.address_class(version, value)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why, why


def egress_policy(ports=(25,), sources=None, deny=(), allow=(), own=()):
    """An EgressPolicy as the command line builds it (own: the VPS's fixed addresses)."""
    fixed = [edge.cidr_value(cidr) for cidr in own]
    policy = edge.EgressPolicy([edge.cidr_value("100.64.0.7/32")], dict(sources or {}),
                               frozenset(ports), [(edge.cidr_value(c), c) for c in deny],
                               [edge.cidr_value(c) for c in allow], 100,
                               edge.OwnAddresses(fixed))
    policy.own.networks = []            # only `own`: not this test machine's addresses
    return policy


EGRESS_POLICY_CASES = [
    # (policy options, ip, port, refusal reason or None)
    ({}, "8.8.8.8", 25, None),
    ({}, "8.8.8.8", 587, "egress-port"),
    ({}, "8.8.8.8", 26, "egress-port"),
    ({"ports": (25, 587)}, "8.8.8.8", 587, None),
    ({"ports": (25, 587)}, "8.8.8.8", 465, "egress-port"),
    ({}, "10.0.0.1", 25, "egress-destination"),
    ({}, "198.51.100.25", 25, "egress-destination"),
    ({"allow": ["198.51.100.0/24"]}, "198.51.100.25", 25, None),
    ({"allow": ["198.51.100.0/24"]}, "203.0.113.25", 25, "egress-destination"),
    ({"allow": ["198.51.100.0/24"]}, "2002:c633:6419::", 25, None),   # 6to4 of an allowed
    ({"deny": ["8.8.8.0/24"]}, "8.8.8.8", 25, "egress-denied"),
    ({"deny": ["2a00:1450::/32"]}, "2a00:1450:4001::1a", 25, "egress-denied"),
    ({"own": ["9.9.9.9/32"]}, "9.9.9.9", 25, "egress-own"),
    ({"own": ["2a01:4f8::/64"]}, "2a01:4f8::25", 25, "egress-own"),
    ({"own": ["9.9.9.9/32"]}, "64:ff9b::909:909", 25, "egress-own"),     # NAT64 of our own
    ({"own": ["9.9.9.9/32"]}, "2002:909:909::1", 25, "egress-own"),      # 6to4 of our own
    ({"deny": ["9.9.9.0/24"]}, "64:ff9b::909:909", 25, "egress-denied"),
    ({"sources": {4: "9.9.9.9"}}, "2a00:1450:4001::1a", 25, "egress-family"),
    ({"sources": {4: "9.9.9.9"}}, "8.8.8.8", 25, None),
    ({"sources": {6: "2a01:4f8::1"}}, "8.8.8.8", 25, "egress-family"),
]


@pytest.mark.parametrize("options,ip,port,reason", EGRESS_POLICY_CASES)
def test_egress_policy_table(options, ip, port, reason):
    """Ports (25 unless widened), --egress-deny, --egress-allow (documentation networks
    only), the VPS's own addresses, and the families --egress-source carries."""
    refusal = egress_policy(**options).refusal(ip, port)
    assert (refusal[0] if refusal else None) == reason, refusal


def test_egress_own_addresses_are_read_from_proc():
    """On Linux the VPS's own addresses come from /proc (fib_trie, if_inet6): loopback is
    there, and an address of this machine is refused, a global one is not."""
    networks = edge.local_networks_linux()
    if networks is None:
        unavailable("/proc/net/fib_trie (Linux)")
    own = edge.OwnAddresses([])
    own.refresh(time.monotonic())
    assert own.holds(*edge.address_value("127.0.0.1"))
    assert not own.holds(*edge.address_value("8.8.8.8"))


@pytest.mark.parametrize("missing", ["/proc/net/fib_trie", "/proc/net/if_inet6"])
def test_egress_own_addresses_of_a_family_proc_does_not_list_are_probed(monkeypatch, missing):
    """A /proc table that cannot be read (fib_trie is missing under gVisor) must not make
    that family's own addresses pass as destinations: they are probed with a bind, as off
    Linux. Before, the other table alone counted and 127.0.0.1 (or ::1) was not 'own'."""
    if edge.local_networks_linux() is None:
        unavailable("/proc/net/fib_trie (Linux)")
    real = edge.read_proc
    gone = (missing,) if missing.endswith("fib_trie") else (missing, "/proc/net/ipv6_route")
    monkeypatch.setattr(edge, "read_proc", lambda path: "" if path in gone else real(path))
    loopback = "127.0.0.1" if missing.endswith("fib_trie") else "::1"
    if not edge.bind_probe(loopback):
        unavailable("%s on this machine" % loopback)
    own = edge.OwnAddresses([])
    own.refresh(time.monotonic())
    assert own.holds(*edge.address_value(loopback))
    assert not own.holds(*edge.address_value("8.8.8.8"))
    assert not own.holds(*edge.address_value("2a00:1450:4001::1a"))


EGRESS_COMMAND_LINES = [
    # (arguments, words of the one error line)
    (["--egress", "0.0.0.0:2525", "--egress-peer", "100.64.0.7"], "is every address"),
    (["--egress", "[::]:2525", "--egress-peer", "100.64.0.7"], "is every address"),
    (["--egress", "8.8.8.8:2525", "--egress-peer", "100.64.0.7"], "not a tailnet or private"),
    (["--egress", "198.51.100.1:2525", "--egress-peer", "100.64.0.7"], "not a tailnet"),
    (["--egress", "vps.example.net:2525", "--egress-peer", "100.64.0.7"], "give an IP address"),
    (["--egress", "100.64.0.1:2525"], "without --egress-peer"),
    (["--egress", "100.64.0.1:2525", "--egress-peer", "0.0.0.0/0"], "reaches past the tailnet"),
    (["--egress", "100.64.0.1:2525", "--egress-peer", "100.0.0.0/8"], "reaches past"),
    (["--egress", "100.64.0.1:2525", "--egress-peer", "100.64.0.0/10"],
     "names 4194304 addresses; give the mail host's own tailnet addresses"),
    (["--egress", "100.64.0.1:2525", "--egress-peer", "fd7a:115c:a1e0::/48"], "at most 256"),
    (["--egress", "100.64.0.1:2525", "--egress-peer", "100.64.0.7", "--egress-ports", "25,110"],
     "below 1024 only 25, 465 and 587"),
    (["--egress", "100.64.0.1:2525", "--egress-peer", "100.64.0.7", "--egress-ports", "x"],
     "not a number"),
    (["--egress", "100.64.0.1:2525", "--egress-peer", "100.64.0.7", "--egress-source",
      "10.0.0.1"], "private (10.0.0.0/8), not a public address"),
    (["--egress", "100.64.0.1:2525", "--egress-peer", "100.64.0.7", "--egress-source",
      "8.8.8.8"], "not an address of this machine"),
    (["--egress", "100.64.0.1:2525", "--egress-peer", "100.64.0.7", "--egress-source",
      "8.8.8.8", "--egress-source", "9.9.9.9"], "at most one per family"),
    (["--egress", "100.64.0.1:2525", "--egress-peer", "100.64.0.7", "--egress-allow",
      "10.0.0.0/8"], "not a documentation network"),
    (["--egress-peer", "100.64.0.7"], "--egress-peer is for the VPS end"),
    (["--egress-listen", "127.0.0.1:2525"], "--egress-listen is for the mail host end"),
    (["--egress-via", "100.64.0.1:2525", "--egress-listen", "127.0.0.1:2525",
      "--egress-listen", "127.0.0.2:2526"], "one listener per family"),
    (["--egress-via", "100.64.0.1"], "has no port"),
]


@pytest.mark.parametrize("args,words", EGRESS_COMMAND_LINES,
                         ids=[" ".join(args) for args, _ in EGRESS_COMMAND_LINES])
def test_egress_command_line_refusals(args, words):
    """What would make an open proxy (or nothing at all) is refused before anything
    listens, in one line that names the fix."""
    with pytest.raises(edge.ConfigError) as caught:
        edge.parse_args(args)
    assert words in str(caught.value)


def test_egress_command_line_accepts_both_ends():
    """A VPS end alone, a mail host end alone (its default listener), no MAPPING needed."""
    _, mappings = edge.parse_args(["--egress", "100.64.0.1:2525", "--egress-peer",
                                   "100.64.0.7/32", "--egress-ports", "25,587"])
    [vps] = mappings
    assert (vps.bind, vps.port, vps.egress.ports) == ("100.64.0.1", 2525, {25, 587})
    _, mappings = edge.parse_args(["--egress-via", "100.64.0.1:2525"])
    [home] = mappings
    assert (home.bind, home.port, home.upstreams, home.egress) == (
        "127.0.0.1", 2525, [("100.64.0.1", 2525)], "via")


# ----------------------------------------------------------------------------------------------
# Routing codec: the ClientHello's server name and ALPN, an HTTP request's Host (unit, `routing`)
# ----------------------------------------------------------------------------------------------

def client_hello_bytes(name, alpn=None):
    """The first flight of a real TLS client (Python's ssl): one record holding its ClientHello."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def records(message, sizes):
    """A handshake message cut into TLS records of the given sizes (the rest in the last)."""
    out, pos = [], 0
    for size in list(sizes) + [len(message)]:
        part = message[pos:pos + size]
        if part:
            out.append(b"\x16\x03\x01" + struct.pack("!H", len(part)) + part)
        pos += len(part)
    return b"".join(out)


def test_routing_codec_client_hello_name_and_alpn_only_once_whole():
    hello = client_hello_bytes("Mail.Example.COM.", ["acme-tls/1", "h2"])
    assert edge.client_hello(hello) == ("mail.example.com", ["acme-tls/1", "h2"])
    assert all(edge.client_hello(hello[:n]) is None for n in range(len(hello)))
    assert edge.client_hello(client_hello_bytes(None)) == (None, [])


@pytest.mark.parametrize("sizes", [[1] * (edge.HELLO_RECORDS - 1), [3, 100], [4], [200, 200]],
                         ids=["1-byte-records", "3-100-rest", "4-rest", "200-200-rest"])
def test_routing_codec_client_hello_over_several_records(sizes):
    message = client_hello_bytes("a.b.example.com")[5:]
    data = records(message, sizes)
    assert edge.client_hello(data) == ("a.b.example.com", [])
    assert all(edge.client_hello(data[:n]) is None for n in range(0, len(data), 7))
    reader = edge.HelloReader()         # the same, read as it comes (one byte more each time)
    assert all(reader.read(data[:n]) is None for n in range(len(data)))
    assert reader.read(data) == ("a.b.example.com", [])


@pytest.mark.parametrize("data, why", [
    (b"GET / HTTP/1.1\r\n", "not a TLS ClientHello"),
    (b"\x80\x2e\x01\x00\x02", "not a TLS ClientHello"),                 # SSL 2 hello
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "does not start with a ClientHello"),
    (b"\x16\x03\x01\x00\x09\x01\x00\x50\x00", "over 16384"),  # 20,480: refused from its header
    (b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00", "malformed"),
    (records(b"\x01\x00\x00\x08abcd", [6]) + b"\x17\x03\x03\x00\x01x", "not the ClientHello"),
    # one record more than a ClientHello may span (see HELLO_RECORDS)
    (records(b"\x01\x00\x01\x00" + bytes(256), [1] * edge.HELLO_RECORDS), "in over 64 records"),
])
def test_routing_codec_client_hello_refuses_what_is_not_one(data, why):
    with pytest.raises(ValueError) as raised:
        edge.client_hello(data)
    assert why in str(raised.value)


def test_routing_codec_request_head():
    head = edge.request_head
    assert head(b"GET /.well-known/acme-challenge/t HTTP/1.1\r\nHost: Mail.Example.com:80\r\n\r\n") \
        == ("mail.example.com", "/.well-known/acme-challenge/t")
    assert head(b"GET http://autoconfig.example.com/x HTTP/1.1\r\nHost: other\r\n\r\n") == \
        ("autoconfig.example.com", "/x")
    assert head(b"GET / HTTP/1.0\n\n") == (None, "/")
    assert head(b"GET / HTTP/1.1\r\nhost:[2001:db8::1]:80\r\n\r\n") == (None, "/")
    assert head(b"GET / HTTP/1.1\r\nHost: x") is None and head(b"GE") is None
    for bad in (b"\x16\x03\x01", b"GET /\r\n\r\n", b"HELLO WORLD\r\n\r\n"):
        with pytest.raises(ValueError):
            head(bad)


@pytest.mark.parametrize("head, why", [
    (b"GET / HTTP/1.1\r\nHost: mail.example.com\r\n other.example.com\r\n\r\n", "folded"),
    (b"GET / HTTP/1.1\r\nX: 1\r\n\tHost: mail.example.com\r\n\r\n", "folded"),
    (b"GET / HTTP/1.1\r\nHost : mail.example.com\r\n\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nHost: a.example.com\r\nhost: b.example.com\r\n\r\n", "2 Host fields"),
    (b"GET / HTTP/1.1\r\nHost mail.example.com\r\n\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\n: x\r\nHost: a\r\n\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", "without Host"),
])
def test_routing_codec_request_head_refuses_what_rfc_9112_says_is_400(head, why):
    """A head a server must answer with 400 (RFC 9112 3.2, 5.1, 5.2) is refused, not routed by
    whichever Host line the relay happened to read (the web server behind may read another)."""
    with pytest.raises(ValueError) as raised:
        edge.request_head(head)
    assert why in str(raised.value)


@pytest.mark.parametrize("target, path", [
    ("/.well-known/acme-challenge/../admin", "/.well-known/admin"),
    ("/.well-known/acme-challenge/%2e%2E/../admin", "/admin"),
    ("/.well-known/./acme-challenge/t", "/.well-known/acme-challenge/t"),
    ("/a/b/..", "/a/"), ("/..", "/"), ("/a/b/../../../c?x=/../y", "/c?x=/../y"),
    ("/.well-known/acme-challenge/t.txt", "/.well-known/acme-challenge/t.txt"),
])
def test_routing_codec_path_rules_see_the_path_without_dot_segments(target, path):
    """A path rule matches where the request goes (RFC 3986 5.2.4), not a raw prefix: the ACME
    path's route cannot be reached with ../ to ask its upstream for something else."""
    head = ("GET %s HTTP/1.1\r\nHost: mail.example.com\r\n\r\n" % target).encode()
    assert edge.request_head(head) == ("mail.example.com", path)
    _, [http] = edge.parse_args(["80@/.well-known/acme-challenge/=acme:80", "80=web:80"])
    routed = http.router.pick("mail.example.com", path)[0].upstreams[0][0]
    assert routed == ("acme" if path.startswith("/.well-known/acme-challenge/") else "web")


def lines_run(call, *args):
    """How many lines of tailwart_edge.py a call runs (sys.settrace): a measure of work that
    does not depend on the machine's speed or load."""
    count = [0]
    source = edge.__file__.rstrip("c")

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
        return local

    def trace(frame, event, arg):
        return local if frame.f_code.co_filename == source else None

    sys.settrace(trace)
    try:
        call(*args)
    finally:
        sys.settrace(None)
    return count[0]


def test_routing_codec_the_peek_reads_each_byte_once_however_it_is_cut(monkeypatch):
    """Fault 1 of issue 19: the peek handed the whole buffer to the parser on every read, so a
    ClientHello in one-byte records, one per segment, cost 5.7 s of CPU for 16.9 KB (0.006 s in
    one piece); an HTTP head a byte at a time, 2.4 s. The readers keep their place: the lines
    run per byte are the same for a hello in one record and in HELLO_RECORDS, and the bytes
    the HTTP reader searches add up to what came (plus 3 a read)."""
    message = client_hello_bytes("mail.example.com")[5:]

    def byte_by_byte(reader, data):
        for n in range(1, len(data) + 1):
            found = reader.read(data[:n])
        assert found is not None

    whole = records(message, [])
    cut = records(message, [1] * (edge.HELLO_RECORDS - 2))
    per_byte_whole = lines_run(byte_by_byte, edge.HelloReader(), whole) / len(whole)
    per_byte_cut = lines_run(byte_by_byte, edge.HelloReader(), cut) / len(cut)
    assert per_byte_cut < 2 * per_byte_whole + 4, (per_byte_whole, per_byte_cut)

    searched, pattern = [], edge.HEAD_END_RE

    class Counting:
        def search(self, data, pos=0):
            searched.append(len(data) - pos)
            return pattern.search(data, pos)

    head = b"GET / HTTP/1.1\r\nHost: mail.example.com\r\n" + b"X-Pad: %s\r\n" % (b"p" * 60) * 200
    head += b"\r\n"
    monkeypatch.setattr(edge, "HEAD_END_RE", Counting())
    byte_by_byte(edge.HeadReader(), head)
    assert sum(searched) <= 4 * len(head), (sum(searched), len(head))


def mutations(seed, samples, count):
    """`count` seeded mutations of the sample byte strings: bytes flipped, inserted, deleted,
    repeated, cut short, or a length field set to an extreme."""
    rng = random.Random(seed)
    for _ in range(count):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) + 1)
            kind = rng.randrange(6)
            if kind == 0 and at < len(data):
                data[at] ^= 1 << rng.randrange(8)
            elif kind == 1:
                data[at:at] = bytes([rng.choice((0, 1, 0xff, 0x16, 10, 13, 32, 58, rng.randrange(256)))])
            elif kind == 2:
                del data[at:at + rng.randint(1, 8)]
            elif kind == 3:
                data[at:at] = data[at:at + rng.randint(1, 64)] * rng.randint(1, 3)
            elif kind == 4:
                del data[at:]
            elif at + 2 <= len(data):
                data[at:at + 2] = rng.choice((b"\x00\x00", b"\xff\xff", b"\x40\x00", b"\x00\x01"))
        yield rng, bytes(data)


def outcome(read, data):
    try:
        return read(data)
    except ValueError as e:
        return "ValueError: %s" % e


def test_routing_codec_fuzz_mutated_hellos_and_heads_only_refuse_and_cut_does_not_matter():
    """Tens of thousands of mutated real ClientHellos (in one record and cut into several) and
    HTTP heads: the readers answer a result, None or ValueError, nothing else, and the same
    answer whether the bytes come at once or cut at random places."""
    message = client_hello_bytes("mail.example.com", ["acme-tls/1", "h2"])[5:]
    hellos = [records(message, []), records(message, [3, 100]), records(message, [1] * 20),
              records(client_hello_bytes(None)[5:], [200]),
              client_hello_bytes("x" * 60 + "." + "y" * 60 + ".example.com")]
    heads = [b"GET /.well-known/acme-challenge/t HTTP/1.1\r\nHost: mail.example.com:80\r\n"
             b"User-Agent: curl/8\r\nAccept: */*\r\n\r\n",
             b"GET http://autoconfig.example.com/mail/config-v1.1.xml HTTP/1.1\r\nHost: x\r\n\r\n",
             b"POST /a/../b?x=1 HTTP/1.0\nContent-Length: 0\n\n"]
    cases = 0
    for reader, samples in ((edge.HelloReader, hellos), (edge.HeadReader, heads)):
        for rng, data in mutations(len(samples), samples, 8000):
            whole = outcome(reader().read, data)
            assert whole is None or isinstance(whole, (tuple, str)), whole
            if isinstance(whole, tuple):
                name, extra = whole
                assert name is None or edge.PEEKED_NAME_RE.match(name)
            cuts = sorted(rng.randint(0, len(data)) for _ in range(3)) + [len(data)]
            piecewise, answer = reader(), None
            for cut in cuts:
                answer = outcome(piecewise.read, data[:cut])
                if answer is not None:
                    break
            assert answer == whole, (data, cuts)
            cases += 1
    assert cases == 16000


def test_routing_codec_the_most_specific_rule_wins():
    _, mappings = edge.parse_args([
        "8443/tls@alpn:acme-tls/1=acme:1", "8443/tls@mail.example.com=mail:1",
        "8443/tls@*.example.com=wild:1", "8443/tls@*.b.example.com=deeper:1",
        "8443/tls=web:1"])
    [mapping] = mappings
    pick = lambda name, alpn=(): (lambda r: (r[0].upstreams[0][0], r[1]))(
        mapping.router.pick(name, list(alpn)))
    assert pick("mail.example.com", ["acme-tls/1"]) == ("acme", "alpn:acme-tls/1")
    assert pick("mail.example.com", ["h2"]) == ("mail", "mail.example.com")
    assert pick("x.example.com") == ("wild", "*.example.com")
    assert pick("x.b.example.com") == ("deeper", "*.b.example.com")
    assert pick("example.com") == ("web", "default")
    assert pick(None) == ("web", "default")
    _, [http] = edge.parse_args(["80@mail.example.com/.well-known/acme-challenge/=mail:80",
                                 "80@/.well-known/=any:80", "80@mail.example.com=web:80"])
    route = lambda host, path: http.router.pick(host, path)[0].upstreams[0][0]
    assert route("mail.example.com", "/.well-known/acme-challenge/t") == "mail"
    assert route("www.example.com", "/.well-known/acme-challenge/t") == "any"
    assert route("mail.example.com", "/") == "web"
    assert http.router.pick("www.example.com", "/") == (None, "-")


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
    # dialling 127.0.0.2: only the header can tell the peer (reached on 127.0.0.1) this address
    "dual-stack-ipv4": (None, "127.0.0.77", "127.0.0.2"),
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
            Edge("127.0.0.1:%d=%s" % (port, up.address)):
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
        eventually(lambda: len(upstream_got) == len(upstream_sent) == count)
        for client_port, (sent_sha, (got_sha, got_len)) in results.items():
            assert upstream_got[client_port] == (sent_sha, size)        # client -> upstream
            assert (got_sha, got_len) == (upstream_sent[client_port], size)  # upstream -> client
        proxy.signal(signal.SIGUSR1)
        stats = proxy.wait_for(r"\bstats ")
        assert "sessions=%d " % count in stats
        assert "up=%d down=%d" % (count * size, count * size) in stats


def received_before_the_edge_closed(port, payload, half_close):
    """A client that sends `payload` (then FIN if half_close) and reads until the edge closes:
    what it received (the socket's timeout fails a session the edge never closes).

    When the upstream cannot be reached the edge closes the client without reading what it sent,
    so the close is a FIN or a reset, depending on timing alone: bytes still unread in the edge's
    socket when it closes turn its close into a reset, and bytes that reach it after the close are
    answered with one. On a loaded machine the client can be late enough for either: the reset
    then shows as ECONNRESET/EPIPE on a send or receive, or as ENOTCONN on shutdown() (the socket
    is already closed). Each is the edge's close, as much as EOF is."""
    got = bytearray()
    with connect(("127.0.0.1", port)) as c:
        try:
            c.sendall(payload)
            if half_close:
                c.shutdown(socket.SHUT_WR)
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
    return bytes(got)


def test_upstream_refused_closes_the_client_and_says_why():
    dead = free_port()                          # nothing listens on `dead`
    proxy, port = Edge.on_free_port(lambda port: ["127.0.0.1:%d=127.0.0.1:%d" % (port, dead)])
    with proxy:
        # no FIN from the client: the edge closes on its own
        assert received_before_the_edge_closed(port, b"hello", half_close=False) == b""
        line = proxy.wait_for(r"session client=")
        assert "end=connect-failed" in line and "warning" in line
        assert re.search(r'reason="[^"]*refused', line, re.I), line
        mark = proxy.mark()                     # and it carries on serving
        assert received_before_the_edge_closed(port, b"hello\r\n", half_close=True) == b""
        line = proxy.wait_for(r"session client=", start=mark)
        assert "end=connect-failed" in line, line
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
            Edge("127.0.0.1:%d=127.0.0.1:%d,%s" % (port, dead, up.address)):
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


def tcp_timers(local_port=None, remote_port=None):
    """(timer kind, ticks until it fires) of each established IPv4 connection local_port ->
    remote_port (None: any), from /proc/net/tcp (kind 2: keepalive; 0: none)."""
    found = []
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            local, remote = (int(fields[i].split(":")[1], 16) for i in (1, 2))
            if (fields[3] == "01" and local_port in (None, local)
                    and remote_port in (None, remote)):
                kind, when = fields[5].split(":")
                found.append((int(kind, 16), int(when, 16)))
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs /proc/net/tcp")
def test_both_sockets_of_a_long_session_have_keepalive():
    """A silent session (IMAP IDLE) whose peer vanished is found by TCP keepalive: the relay's
    client socket has it from the accept, its upstream socket once the sweep has seen the
    session streaming (a connection of a few milliseconds never pays for the setsockopts)."""
    port = free_port()
    with Upstream(header_echo) as up, \
            Edge("127.0.0.1:%d=%s" % (port, up.address)):
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
            client_port = c.getsockname()[1]

            def kept_alive():
                client_side = tcp_timers(port, client_port)
                upstream_side = tcp_timers(remote_port=up.port)     # the relay's, to up
                return (client_side and upstream_side
                        and all(kind == 2 for kind, _ in client_side + upstream_side))
            eventually(kept_alive, timeout=5)
            # the relay's idle time (60 s), not the kernel's default (2 hours); in ticks
            when = max(w for _, w in tcp_timers(port, client_port))
            assert when <= 61 * os.sysconf("SC_CLK_TCK"), when


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
    with Upstream(upstream) as up, Edge("127.0.0.1:%d=%s" % (port, up.address)):
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

    with Upstream(echo) as up:
        port = free_port()      # picked with `up` bound: one picked before was once up's (CI)
        with Edge("--proxy-protocol", "off", "--max-connections", "1000",
                  "127.0.0.1:%d=%s" % (port, up.address), preexec_fn=limit) as proxy:
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


# -- the README's forwarding during a migration ------------------------------------------------

MIGRATION_BLOCK = "# on the old host, once its own mail server has stopped"
MIGRATION_NEW_SERVER = ("198.51.100.20", "127.0.0.2")      # the README's placeholder -> loopback


def readme_migration_command():
    """The README's one-line command for the old host, as words (a single line is expected)."""
    lines = [line for line in readme_block(MIGRATION_BLOCK).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0].split()


def test_readme_migration_forwarding_command_hands_clients_to_the_new_server_with_their_address():
    """Issue 20: the README's command for the old host during a migration, read from README.md
    and run as written but for the addresses and ports: `sudo python3 tailwart_edge.py` is
    this interpreter and script, the new server 198.51.100.20 is 127.0.0.2 (a header-reading
    echo server per port), and each port P listens on 127.0.0.1:Q as /PROTO of P (so a port
    keeps its protocol), where Q is free on both addresses, since the bare-port form connects
    to the same port on the upstream. Clients from 127.0.0.77 reach the new server on every
    port with their own address in the v2 header; each leaves a session line, and the USR1
    stats line counts one session per port, as the README says to watch."""
    try:
        with socket.socket() as probe:
            probe.bind((MIGRATION_NEW_SERVER[1], 0))
    except OSError:
        unavailable("127.0.0.2 is not a loopback address here")
    words = readme_migration_command()
    assert words[:3] == ["sudo", "python3", "tailwart_edge.py"], words
    words = words[3:]
    assert "--upstream" in words and words[words.index("--upstream") + 1] == \
        MIGRATION_NEW_SERVER[0], words
    words[words.index("--upstream") + 1] = MIGRATION_NEW_SERVER[1]
    if not is_root():               # --user drops root; a user cannot switch to another
        at = words.index("--user")
        del words[at:at + 2]
    ports = [int(word) for word in words if word.isdigit()]
    assert {25, 587, 993} <= set(ports), words
    greeting = b"hello from the new server\r\n"
    with contextlib.ExitStack() as servers:
        for attempt in range(5):
            listen = {}             # README port -> (test port, new server)
            for port in ports:
                for _ in range(20):
                    test_port = free_port()
                    try:
                        server = ProxyEchoUpstream(MIGRATION_NEW_SERVER[1], test_port,
                                                   greeting=greeting)
                        break
                    except OSError:
                        pass                # taken on 127.0.0.2: another port
                else:
                    raise AssertionError("no port free on both 127.0.0.1 and 127.0.0.2")
                servers.callback(server.close)
                listen[port] = (test_port, server)
            argv = [("127.0.0.1:%d/%s" % (listen[int(word)][0], edge.PORT_PROTOCOLS[int(word)])
                     if word.isdigit() else word) for word in words]
            try:
                proxy = servers.enter_context(Edge(*argv, tries=1))
                break
            except PortInUse:
                if attempt == 4:
                    raise
        for port, (test_port, server) in sorted(listen.items()):
            with connect(("127.0.0.1", test_port), source="127.0.0.77") as c:
                assert recv_exactly(c, len(greeting)) == greeting
                c.sendall(b"EHLO client.example\r\n")
                assert recv_exactly(c, 21) == b"EHLO client.example\r\n"
                client = c.getsockname()
            eventually(lambda: server.headers)
            assert server.headers == [(client, ("127.0.0.1", test_port))], (port, server.headers)
            proxy.wait_for(r"session client=127\.0\.0\.77:%d listen=127\.0\.0\.1:%d "
                           r"upstream=127\.0\.0\.2:%d " % (client[1], test_port, test_port))
            assert not server.errors, server.errors
        mark = proxy.mark()
        proxy.signal(signal.SIGUSR1)
        stats = proxy.wait_for(r"\bstats ", start=mark)
        for port, (test_port, server) in listen.items():
            assert "127.0.0.1:%d active=0 sessions=1 " % test_port in stats, (port, stats)
        assert re.search(r"\bstats active=0 sessions=%d " % len(ports), stats), stats
        print(" ".join(argv))
        print(stats)


# ----------------------------------------------------------------------------------------------
# Egress end to end (`egress`): the VPS end on loopback (refusals that need no other host), then
# three network namespaces the tests make (home, vps, mx; `egress_netns`, root, once in CI)
# ----------------------------------------------------------------------------------------------

def egress_vps_args(port, *more):
    """A VPS end on loopback: 127.0.0.1 is its 'tailnet' address and its one peer. Every
    global destination is denied too (--egress-deny 0.0.0.0/0 and ::/0): a test, or a fuzzed
    header, must never make it connect beyond this machine."""
    return ["--egress", "127.0.0.1:%d" % port, "--egress-peer", "127.0.0.1/32", "-v",
            "--egress-deny", "0.0.0.0/0", "--egress-deny", "::/0"] + list(more)


def egress_ask(port, data, pieces=1, source=None):
    """Send `data` to the egress listener (in `pieces` segments) and read all it answers
    (a reset, as from a close with our bytes unread: nothing)."""
    with connect(("127.0.0.1", port), source) as c:
        step = max(1, -(-len(data) // pieces))
        try:
            for i in range(0, len(data), step):
                c.sendall(data[i:i + step])
                if pieces > 1:
                    time.sleep(0.002)
            return recv_all(c)
        except (ConnectionResetError, BrokenPipeError):
            return b""


V2_LOCAL_PROBE = edge.V2_SIGNATURE + b"\x20\x00\x00\x00"


def egress_header(dst_ip, port=25):
    """A v2 PROXY header naming dst_ip:port, written as given (our encoder would unmap a
    ::ffff: address); the source is a placeholder of the same family."""
    if ":" in dst_ip:
        body = socket.inet_pton(socket.AF_INET6, "fd7a:115c:a1e0:21::1") + \
            socket.inet_pton(socket.AF_INET6, dst_ip)
        return v2(0x21, 0x21, body + struct.pack("!HH", 4000, port))
    body = socket.inet_aton("100.64.21.1") + socket.inet_aton(dst_ip)
    return v2(0x21, 0x11, body + struct.pack("!HH", 4000, port))


def test_egress_probe_answers_one_line_even_one_byte_at_a_time():
    """A v2 LOCAL header is a health probe: one line naming the source, then a close; the
    header cut into one-byte segments gets the same answer."""
    vps, port = Edge.on_free_port(egress_vps_args)
    with vps:
        assert egress_ask(port, V2_LOCAL_PROBE) == b"tailwart-edge egress ok source=auto ports=25\r\n"
        assert egress_ask(port, V2_LOCAL_PROBE, pieces=len(V2_LOCAL_PROBE)).startswith(
            b"tailwart-edge egress ok")
        vps.wait_for(r"session client=127\.0\.0\.1:\d+ listen=127\.0\.0\.1:%d .* end=probe" % port)


def test_egress_refuses_destinations_on_loopback():
    """The VPS end refuses what a peer may not ask, before any connect: loopback, private,
    metadata, documentation, their IPv6 forms, another port; an SMTP port hears 421 4.7.0
    (never a 5xx), another port a plain close; the log names each reason."""
    vps, port = Edge.on_free_port(egress_vps_args)
    with vps:
        for ip, words in [("127.0.0.1", "loopback"), ("10.0.0.1", "private"),
                          ("169.254.169.254", "link-local"), ("192.0.2.25", "documentation"),
                          ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::a9fe:a9fe", "NAT64 form"),
                          ("2002:7f00:1::", "6to4 form"), ("2001:0:7f00:1::", "Teredo server")]:
            answer = egress_ask(port, egress_header(ip))
            assert answer.startswith(b"421 4.7.0 "), (ip, answer)
            vps.wait_for(r"end=egress-destination reason=.*%s" % re.escape(words))
        assert egress_ask(port, edge.proxy_header_v2(("127.0.0.1", 4), ("10.0.0.1", 26))) == b""
        vps.wait_for(r"end=egress-port reason=\"port 26 is not an egress port")
        vps.signal(signal.SIGUSR1)      # counted as any listener's sessions and refusals
        vps.wait_for(r"stats .*127\.0\.0\.1:%d active=0 sessions=9 failed=0 up=0 down=0 "
                     r"refused-egress-destination=8 refused-egress-port=1" % port)


def test_egress_bad_and_slow_headers_are_closed():
    """Not a v2 header (an SMTP client, a v1 header, a UDP header): closed unanswered; no
    header within --peek-timeout: closed as header-timeout."""
    vps, port = Edge.on_free_port(lambda p: egress_vps_args(p, "--peek-timeout", "0.5"))
    with vps:
        assert egress_ask(port, b"EHLO mail.example.com\r\n") == b""
        vps.wait_for(r"end=header-bad reason=\"not a PROXY v2 header\"")
        assert egress_ask(port, b"PROXY TCP4 127.0.0.1 8.8.8.8 4 25\r\n") == b""
        assert egress_ask(port, v2(0x21, 0x12, V2_TCP4_BODY)) == b""
        vps.wait_for(r"end=header-bad reason=\"PROXY v2 UDP4 header")
        with connect(("127.0.0.1", port)) as c:
            c.sendall(V2_LOCAL_PROBE[:7])
            assert recv_all(c) == b""
        vps.wait_for(r"end=header-timeout")


def test_egress_non_peer_is_refused_silently():
    """A client outside --egress-peer is closed at accept without a byte, whatever it sends,
    and the log says so (once per interval, not per connection)."""
    vps, port = Edge.on_free_port(egress_vps_args)
    with vps:
        for _ in range(3):
            assert egress_ask(port, V2_LOCAL_PROBE, source="127.0.0.2") == b""
        vps.wait_for(r"refused client=127\.0\.0\.2:\d+ listen=127\.0\.0\.1:%d reason=not-peer"
                     % port)


def test_egress_limit_per_peer():
    """Over --egress-per-peer, a peer's next session hears 421 4.7.0 (a retry later), and
    once one ends, the next is served again."""
    vps, port = Edge.on_free_port(lambda p: egress_vps_args(p, "--egress-per-peer", "1"))
    with vps:
        held = connect(("127.0.0.1", port))     # its header is still to come
        try:
            vps.wait_for(r"accept client=127\.0\.0\.1")
            answer = egress_ask(port, edge.proxy_header_v2(("127.0.0.1", 4), ("10.0.0.1", 25)))
            assert answer == b"421 4.7.0 Too many egress connections from your address\r\n"
            vps.wait_for(r"end=per-peer")
        finally:
            held.close()
        vps.wait_for(r"end=client-fin")
        assert egress_ask(port, V2_LOCAL_PROBE).startswith(b"tailwart-edge egress ok")


def test_egress_abuse_hostile_peers_and_outsiders():
    """A peer gone bad and outsiders, bounded: 200 non-peer connections, 300 mutated headers
    (the fuzz's mutations, over the wire, some one byte per segment), 100 half headers left
    hanging past --peek-timeout. Afterwards the relay answers a probe, every session has
    ended (active=0), and nothing but refusals was logged: no internal error."""
    vps, port = Edge.on_free_port(lambda p: egress_vps_args(p, "--peek-timeout", "1"))
    with vps:
        rng = random.Random(2121)
        for _ in range(200):
            assert egress_ask(port, os.urandom(rng.randrange(1, 64)), source="127.0.0.2") == b""
        seeds = [data for _, data, _ in EGRESS_HEADERS]
        for i in range(300):
            data = bytearray(rng.choice(seeds))
            data[rng.randrange(len(data))] = rng.randrange(256)
            answer = egress_ask(port, bytes(data), pieces=len(data) if i % 10 == 0 else 1)
            assert answer == b"" or answer.startswith((b"421 4.7.0 ", b"tailwart-edge egress ok")), \
                answer                  # 421 4.7.0: refused; never a connect (4.4.1)
        hanging = []
        try:
            for _ in range(100):
                c = connect(("127.0.0.1", port))
                c.sendall(V2_LOCAL_PROBE[:rng.randrange(1, 16)])
                hanging.append(c)
            for c in hanging:
                assert recv_all(c) == b""       # closed by the header timeout
        finally:
            for c in hanging:
                c.close()
        assert egress_ask(port, V2_LOCAL_PROBE).startswith(b"tailwart-edge egress ok")
        mark = vps.mark()
        vps.signal(signal.SIGUSR1)
        vps.wait_for(r"stats active=0 ", start=mark)
        assert "internal error" not in vps.output() and "Traceback" not in vps.output()


def test_egress_public_bind_and_empty_peer_list_exit_2():
    """The script itself refuses, exit 2 and one line each: a public or wildcard --egress, an
    --egress with no peer."""
    for args, words in [(["--egress", "8.8.8.8:2525", "--egress-peer", "127.0.0.1"],
                         "not a tailnet or private address"),
                        (["--egress", "0.0.0.0:2525", "--egress-peer", "127.0.0.1"],
                         "is every address"),
                        (["--egress", "127.0.0.1:2525"], "without --egress-peer")]:
        code, out, err = run_script(*args)
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_egress_tables_under_the_script_interpreter():
    """The destination table and the header cases give the same answers under the
    interpreter that runs the script (CI: every CPython from 3.6), as under pytest's."""
    cases = [ip for ip, _ in EGRESS_DESTINATIONS]
    headers = [data.hex() for _, data, _ in EGRESS_HEADERS]
    program = (
        "import json, sys; sys.path.insert(0, %r); import tailwart_edge as e\n"
        "out = []\n"
        "for ip in %r:\n"
        "    out.append(e.address_class(*e.address_value(ip)))\n"
        "for h in %r:\n"
        "    try:\n"
        "        r = e.V2Reader().read(bytearray(bytes.fromhex(h)))\n"
        "        out.append(None if r is None else [r.command, r.destination, r.length])\n"
        "    except ValueError as x:\n"
        "        out.append('refused: %%s' %% x)\n"
        "print(json.dumps(out))\n" % (HERE, cases, headers))
    there = subprocess.run([PYTHON, "-c", program], stdout=subprocess.PIPE, timeout=WAIT,
                           check=True, universal_newlines=True).stdout
    here = [edge.address_class(*edge.address_value(ip)) for ip in cases]
    for _, data, _ in EGRESS_HEADERS:
        try:
            r = edge.V2Reader().read(bytearray(data))
            here.append(None if r is None else [r.command, list(r.destination or ()) or None,
                                                r.length])
        except ValueError as x:
            here.append("refused: %s" % x)
    import json
    got = json.loads(there)
    got = [[g[0], g[1] or None, g[2]] if isinstance(g, list) else g for g in got]
    assert got == here


# -- in network namespaces -----------------------------------------------------------------
#
# home (the mail host: 100.64.21.1, fd7a:115c:a1e0:21::1 on its 'tailnet' link; 100.64.21.3
# too, not a peer) -- vps (100.64.21.2 and fd7a:115c:a1e0:21::2 there; 198.51.100.1 and
# 2001:db8:21::1, its 'public' addresses, towards mx) -- mx (198.51.100.25, 2001:db8:21::25).
# The vps forwards, so without the rules home would reach mx directly: a leak the tests see.
# Only these namespaces' own addresses are ever connected to.

CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)


class EgressLab:
    """Three network namespaces, linked by veth pairs; delete() removes them."""

    ADDRESSES = [("home", "twh0", "100.64.21.1/24"), ("home", "twh0", "100.64.21.3/24"),
                 ("home", "twh0", "fd7a:115c:a1e0:21::1/64"),
                 ("vps", "twv0", "100.64.21.2/24"), ("vps", "twv0", "fd7a:115c:a1e0:21::2/64"),
                 ("vps", "twv1", "198.51.100.1/24"), ("vps", "twv1", "2001:db8:21::1/64"),
                 ("mx", "twm0", "198.51.100.25/24"), ("mx", "twm0", "2001:db8:21::25/64")]

    def __init__(self):
        tag = "tw%d" % os.getpid()
        self.ns = {role: "%s-%s" % (tag, role) for role in ("home", "vps", "mx")}
        self.made = []
        try:
            for role in ("home", "vps", "mx"):
                self.ip("netns", "add", self.ns[role])
                self.made.append(self.ns[role])
                self.ip("-n", self.ns[role], "link", "set", "lo", "up")
            self.ip("link", "add", "twh0", "netns", self.ns["home"], "type", "veth", "peer",
                    "name", "twv0", "netns", self.ns["vps"])
            self.ip("link", "add", "twv1", "netns", self.ns["vps"], "type", "veth", "peer",
                    "name", "twm0", "netns", self.ns["mx"])
            for role, dev, address in self.ADDRESSES:
                self.ip("-n", self.ns[role], "addr", "add", address, "dev", dev, *(
                    ("nodad",) if ":" in address else ()))
            for role, dev in (("home", "twh0"), ("vps", "twv0"), ("vps", "twv1"),
                              ("mx", "twm0")):
                self.ip("-n", self.ns[role], "link", "set", dev, "up")
            for role, v4, v6 in (("home", "100.64.21.2", "fd7a:115c:a1e0:21::2"),
                                 ("mx", "198.51.100.1", "2001:db8:21::1")):
                self.ip("-n", self.ns[role], "route", "add", "default", "via", v4)
                self.ip("-n", self.ns[role], "-6", "route", "add", "default", "via", v6)
            self.run("vps", "sysctl", "-qw", "net.ipv4.ip_forward=1",
                     "net.ipv6.conf.all.forwarding=1")
        except BaseException:
            self.delete()
            raise

    def ip(self, *args):
        subprocess.run(["ip"] + list(args), check=True, timeout=WAIT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)

    def run(self, role, *args, check=True):
        """A command in a namespace: (exit code, stdout + stderr)."""
        proc = subprocess.run(["ip", "netns", "exec", self.ns[role]] + list(args),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=WAIT,
                              universal_newlines=True)
        if check and proc.returncode:
            raise AssertionError("%s: %s" % (" ".join(args), proc.stdout))
        return proc.returncode, proc.stdout

    def inside(self, role, function):
        """function() run by a thread that entered the namespace: sockets it makes stay
        there, whichever thread uses them next."""
        result = {}

        def enter():
            fd = os.open("/var/run/netns/" + self.ns[role], os.O_RDONLY)
            try:
                if LIBC.setns(fd, CLONE_NEWNET) != 0:
                    result["error"] = OSError(ctypes.get_errno(), "setns")
                    return
            finally:
                os.close(fd)
            try:
                result["value"] = function()
            except BaseException as e:
                result["error"] = e
        thread = threading.Thread(target=enter, daemon=True)
        thread.start()
        thread.join(WAIT * 2)
        if "error" in result:
            raise result["error"]
        return result["value"]

    def edge(self, role, *args):
        return NetnsEdge(self.ns[role], *args)

    def reset_rules(self):
        for tool in ("iptables", "ip6tables"):
            for table in ("nat", "filter"):
                self.run("home", tool, "-t", table, "-F")
                self.run("home", tool, "-t", table, "-X")

    def apply_rules(self, check_output):
        """Install the rules `--check` printed, as an admin would paste them."""
        self.reset_rules()
        rules = [line for line in check_output.splitlines()
                 if line.startswith(("iptables ", "ip6tables "))]
        assert rules, check_output
        for line in rules:
            self.run("home", *line.split())
        return rules

    def delete(self):
        for name in self.made:
            subprocess.run(["ip", "netns", "del", name], timeout=WAIT)
        self.made = []


class NetnsEdge(Edge):
    """The script in a network namespace (`ip netns exec` execs it: the same pid)."""

    def __init__(self, ns, *args, **options):
        self.ns = ns
        Edge.__init__(self, *args, **options)

    def _start(self, env, preexec_fn, timeout):
        if self.args[0] != "ip":
            self.args = ["ip", "netns", "exec", self.ns] + self.args
        Edge._start(self, env, preexec_fn, timeout)


class Mx:
    """The destination mail server in the mx namespace, on port 25 of both its addresses:
    a greeting, then it reads all the client sends and answers its own blob. `seen` is
    [(peer ip, bytes received)] per connection."""

    def __init__(self, lab, blob):
        self.blob = blob
        self.seen = []
        self.closed = False
        self.socks = lab.inside("mx", lambda: [listening(("198.51.100.25", 25)),
                                               listening(("2001:db8:21::25", 25))])
        self.threads = [threading.Thread(target=self.serve, args=(sock,), daemon=True)
                        for sock in self.socks]
        for thread in self.threads:
            thread.start()

    def serve(self, sock):
        sock.settimeout(0.2)            # a close() from another thread does not wake accept()
        while not self.closed:
            try:
                conn, peer = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(WAIT)
                try:
                    conn.sendall(b"220 mx.test ESMTP\r\n")
                    received = recv_all(conn)
                    conn.sendall(self.blob)
                except OSError:
                    received = None
                self.seen.append((peer[0], received))

    def close(self):
        self.closed = True
        for thread in self.threads:
            thread.join(WAIT)
        for sock in self.socks:
            sock.close()


def listening(address):
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(16)
    return sock


@pytest.fixture(scope="module")
def egress_lab():
    if os.geteuid() != 0:
        unavailable("the egress namespace tests need root (ip netns, iptables)")
    for tool in ("ip", "iptables", "ip6tables"):
        need_tool(tool)
    if not os.path.isdir("/proc/sys/net/ipv6"):
        unavailable("IPv6 in the kernel")
    lab = EgressLab()
    try:
        yield lab
    finally:
        lab.delete()


VPS_ARGS = ["--egress", "100.64.21.2:2525", "--egress-peer", "100.64.21.1/32",
            "--egress-peer", "fd7a:115c:a1e0:21::1/128", "--egress-source", "198.51.100.1",
            "--egress-allow", "198.51.100.0/24", "--connect-timeout", "2", "-v"]
VPS_ARGS_V6 = VPS_ARGS + ["--egress-source", "2001:db8:21::1", "--egress-allow",
                          "2001:db8:21::/48"]


def carry(lab, destination, blob):
    """A client in home (the mail server) connects to destination:25, sends blob, half-closes
    and reads everything back."""
    def dial():
        return connect((destination, 25))
    client = lab.inside("home", dial)
    with client:
        client.sendall(blob)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def test_egress_netns_carries_the_mail_server_through_the_vps(egress_lab):
    """The whole path: the rules `--check` prints, installed in home, send the mail server's
    connection to 198.51.100.25:25 through the VPS: the MX sees the VPS's public address, and
    the bytes (an opaque blob standing in for STARTTLS) are identical both ways; an MX that
    does not answer gets 421 4.4.1; both ends write one line per session."""
    lab = egress_lab
    up_blob, down_blob = os.urandom(300 * 1024), os.urandom(200 * 1024)
    mx = Mx(lab, down_blob)
    try:
        with lab.edge("vps", *VPS_ARGS) as vps:
            code, out = lab.run("home", PYTHON, SCRIPT, "--check", "--egress-via",
                                "100.64.21.2:2525", "--egress-user", "root", check=False)
            assert code == 0, out
            assert "tailwart-edge egress ok source=198.51.100.1 ports=25" in out
            rules = lab.apply_rules(out)
            assert any("REDIRECT --to-ports 2525" in r for r in rules)
            with lab.edge("home", "--egress-via", "100.64.21.2:2525", "-v") as home:
                answer = carry(lab, "198.51.100.25", up_blob)
                assert answer == b"220 mx.test ESMTP\r\n" + down_blob
                eventually(lambda: mx.seen)
                assert mx.seen == [("198.51.100.1", up_blob)]
                vps.wait_for(r"session client=100\.64\.21\.1:\d+ listen=100\.64\.21\.2:2525 "
                             r"upstream=198\.51\.100\.25:25 up=%d down=%d .*end=client-fin"
                             % (len(up_blob), len(down_blob) + 19))
                home.wait_for(r"session client=100\.64\.21\.1:\d+ listen=127\.0\.0\.1:2525 upstream=100\.64\.21\.2:2525 "
                              r".*destination=198\.51\.100\.25:25")
                # nobody at .26: the VPS's connect fails, the mail server hears a 4xx
                answer = carry(lab, "198.51.100.26", b"")
                assert answer.startswith(b"421 4.4.1 "), answer
                vps.wait_for(r"upstream=198\.51\.100\.26:25 .*end=connect-failed")
    finally:
        mx.close()
        lab.reset_rules()


def test_egress_netns_refusals(egress_lab):
    """Straight to the VPS's egress, as a peer: each refused class (own addresses, the
    tailnet, loopback, private, metadata, a documentation network not allowed, mapped and
    embedded forms), another port and IPv6 without a source are refused, the MX never sees a
    connection; a non-peer (home's 100.64.21.3) is closed unanswered, a header or not."""
    lab = egress_lab
    mx = Mx(lab, b"")
    try:
        with lab.edge("vps", *VPS_ARGS) as vps:
            def ask(header, source="100.64.21.1"):
                def dial():
                    return connect(("100.64.21.2", 2525), source)
                with lab.inside("home", dial) as c:
                    try:
                        c.sendall(header)
                        return recv_all(c)
                    except ConnectionResetError:
                        return b""
            for ip, reason in [("198.51.100.1", "egress-own"), ("100.64.21.2", "egress-dest"),
                               ("127.0.0.1", "egress-dest"), ("10.1.2.3", "egress-dest"),
                               ("169.254.169.254", "egress-dest"),
                               ("203.0.113.25", "egress-dest"),
                               ("::ffff:127.0.0.1", "egress-dest"),
                               ("64:ff9b::a9fe:a9fe", "egress-dest"),
                               ("2002:a01:203::", "egress-dest"),
                               ("2001:db8:21::25", "egress-dest"),
                               ("2a00:1450:4001::1a", "egress-family")]:
                answer = ask(egress_header(ip))
                assert answer.startswith(b"421 4.7.0 "), (ip, answer)
                vps.wait_for(r"upstream=%s .*end=%s" % (re.escape(edge.format_address(
                    edge.plain_ip(ip), 25)), reason))
            answer = ask(edge.proxy_header_v2(("100.64.21.1", 4), ("198.51.100.25", 587)))
            assert answer.startswith(b"421 4.7.0 ")     # 587 speaks SMTP: told so, not closed
            vps.wait_for(r"upstream=198\.51\.100\.25:587 .*end=egress-port")
            header = edge.proxy_header_v2(("100.64.21.1", 4), ("198.51.100.25", 25))
            assert ask(header, source="100.64.21.3") == b""
            assert ask(b"", source="100.64.21.3") == b""
            vps.wait_for(r"refused client=100\.64\.21\.3:\d+ .*reason=not-peer")
        assert mx.seen == []
    finally:
        mx.close()


def test_egress_netns_ipv6_is_refused_or_carried_never_leaked(egress_lab):
    """IPv6 port 25 from home: with the default rules (no IPv6 listener) it is rejected at
    home, and the MX sees nothing from home's address; with an IPv6 listener ([::1]:2525) and
    an IPv6 source on the VPS, the rules `--check` prints then carry it, and the MX sees the
    VPS's IPv6 address."""
    lab = egress_lab
    mx = Mx(lab, b"250 ok\r\n")
    try:
        with lab.edge("vps", *VPS_ARGS_V6):
            code, out = lab.run("home", PYTHON, SCRIPT, "--check", "--egress-via",
                                "100.64.21.2:2525", "--egress-user", "root", check=False)
            assert code == 0, out
            lab.apply_rules(out)
            with lab.edge("home", "--egress-via", "100.64.21.2:2525"):
                with pytest.raises(OSError) as refused:
                    carry(lab, "2001:db8:21::25", b"x")
                assert refused.value.errno == errno.ECONNREFUSED
                assert mx.seen == []
            code, out = lab.run("home", PYTHON, SCRIPT, "--check", "--egress-via",
                                "100.64.21.2:2525", "--egress-listen", "127.0.0.1:2525",
                                "--egress-listen", "[::1]:2525", "--egress-user", "root",
                                check=False)
            assert code == 0, out
            lab.apply_rules(out)
            with lab.edge("home", "--egress-via", "100.64.21.2:2525", "--egress-listen",
                          "127.0.0.1:2525", "--egress-listen", "[::1]:2525", "-v") as home:
                answer = carry(lab, "2001:db8:21::25", b"EHLO home\r\n")
                assert answer == b"220 mx.test ESMTP\r\n250 ok\r\n"
                eventually(lambda: mx.seen)
                assert mx.seen == [("2001:db8:21::1", b"EHLO home\r\n")]
                home.wait_for(r"destination=\[2001:db8:21::25\]:25")
    finally:
        mx.close()
        lab.reset_rules()


def test_egress_netns_lab_has_no_route_off_the_machine(egress_lab):
    """The lab's guarantee that nothing a test (or a regression) makes the VPS connect to
    can leave this machine: its namespaces hold only lo and the lab's veth pairs, the vps
    has no route to a global address (it has no default route), and home and mx reach
    anything global only through the vps."""
    lab = egress_lab
    links = {"home": {"lo", "twh0"}, "vps": {"lo", "twv0", "twv1"}, "mx": {"lo", "twm0"}}
    for role, names in links.items():
        _, out = lab.run(role, "ip", "-o", "link", "show")
        assert {line.split(":")[1].strip().partition("@")[0]
                for line in out.splitlines()} == names, out
    for ip in ("8.8.8.8", "2a00:1450:4001::1a"):
        code, out = lab.run("vps", "ip", "route", "get", ip, check=False)
        assert code != 0 and "unreachable" in out, out
        for role, via in (("home", "twh0"), ("mx", "twm0")):
            code, out = lab.run(role, "ip", "route", "get", ip, check=False)
            assert code == 0 and "dev %s" % via in out, out


# ----------------------------------------------------------------------------------------------
# Real peers: HAProxy, nginx and Postfix parse our header and log the real client
# ----------------------------------------------------------------------------------------------
#
# Each peer runs in the foreground from a private directory, behind a fresh edge per test. The
# IPv4 client binds 127.0.0.77, so a header carrying the edge's own address (127.0.0.1) fails;
# the server address the peer logs must be the edge's listening address as the client saw it.

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


class Peer:
    """A peer program in the foreground, its output in a file; stopped by its PID."""

    def __init__(self, argv, directory, name):
        self.log_path = os.path.join(directory, name + ".out")
        self.out = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT, cwd=directory)

    def text(self, path=None):
        with open(path or self.log_path, errors="replace") as f:
            return f.read()

    def wait_log(self, pattern, path=None, timeout=WAIT):
        """The first match of the regular expression in the log (peers log at session end)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text(path) if os.path.exists(path or self.log_path) else ""
            found = re.search(pattern, text, re.M)
            if found:
                return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("no %r in %s:\n%s" % (pattern, path or self.log_path, text))
            time.sleep(0.05)

    def wait_listening(self, port, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("peer not listening on %d:\n%s" % (port, self.text()))
                time.sleep(0.05)

    def stop(self, timeout=WAIT):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def client_kind(kind):
    """(edge listen prefix or '', client source, address dialled), skipping IPv6 if absent."""
    bind, source, dial = CLIENT_KINDS[kind]
    if ":" in source and not has_ipv6():
        unavailable("IPv6 on loopback (::1) is off here")
    return ("%s:" % bind if bind else ""), source, dial


def edge_in_front_of(peer_port, kind, version):
    """An edge relaying to 127.0.0.1:peer_port, and the address a client dials to reach it."""
    listen, source, dial = client_kind(kind)
    port = free_port(dial)
    proxy = Edge("--proxy-protocol", version, "%s%d=127.0.0.1:%d" % (listen, port, peer_port))
    return proxy, source, (dial, port)


def talk_through(address, source, payload=b"hello peer\r\n"):
    """Echo one message through edge and peer; returns (client address, server address)."""
    with connect(address, source=source) as c:
        c.sendall(payload)
        assert recv_exactly(c, len(payload)) == payload
        client, server = c.getsockname()[:2], c.getpeername()[:2]
    assert client[0] == source
    return client, server


def addr(ip_port):
    return "%s:%d" % ip_port


@pytest.fixture(scope="module")
def echo_upstream():
    with Upstream(echo) as up:
        yield up


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory, echo_upstream):
    binary = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if
                                              os.path.exists(p)), None)
    if binary is None:
        unavailable("haproxy is not installed (apt-get install haproxy)")
    directory = str(tmp_path_factory.mktemp("haproxy"))
    port = free_port()
    with open(os.path.join(directory, "haproxy.cfg"), "w") as f:
        f.write("""global
    log stdout format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend from_edge
    bind 127.0.0.1:%d accept-proxy
    log-format "session client=%%ci:%%cp frontend=%%fi:%%fp"
    default_backend echo
backend echo
    server echo %s
""" % (port, echo_upstream.address))
    peer = Peer([binary, "-db", "-f", "haproxy.cfg"], directory, "haproxy")
    try:
        peer.wait_listening(port)
        yield peer, port
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, echo_upstream):
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if
                                            os.path.exists(p)), None)
    if binary is None:
        unavailable("nginx is not installed (apt-get install nginx libnginx-mod-stream)")
    built_in = subprocess.run([binary, "-V"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True).stdout
    load = ""
    if "--with-stream=dynamic" in built_in or "--with-stream " not in built_in + " ":
        if not os.path.exists(NGINX_STREAM_MODULE):
            unavailable("nginx has no stream module (apt-get install libnginx-mod-stream)")
        load = "load_module %s;\n" % NGINX_STREAM_MODULE
    directory = str(tmp_path_factory.mktemp("nginx"))
    port = free_port()
    with open(os.path.join(directory, "nginx.conf"), "w") as f:
        f.write(load + """daemon off;
master_process on;
worker_processes 1;
pid %(d)s/nginx.pid;
error_log %(d)s/error.log info;
events { worker_connections 64; }
stream {
    log_format from_edge 'session client=$proxy_protocol_addr:$proxy_protocol_port '
                         'server=$proxy_protocol_server_addr:$proxy_protocol_server_port';
    server {
        listen 127.0.0.1:%(port)d proxy_protocol;
        access_log %(d)s/access.log from_edge;
        proxy_pass %(echo)s;
    }
}
""" % {"d": directory, "port": port, "echo": echo_upstream.address})
    peer = Peer([binary, "-p", directory, "-e", os.path.join(directory, "error.log"),
                 "-c", os.path.join(directory, "nginx.conf")], directory, "nginx")
    try:
        peer.wait_listening(port)
        yield peer, port, os.path.join(directory, "access.log")
    finally:
        peer.stop()


# the internal services a private Postfix instance needs in its master.cf
POSTFIX_SERVICES = [
    "pickup unix n - n 60 1 pickup", "cleanup unix n - n - 0 cleanup",
    "qmgr unix n - n 300 1 qmgr", "rewrite unix - - n - - trivial-rewrite",
    "bounce unix - - n - 0 bounce", "defer unix - - n - 0 bounce",
    "trace unix - - n - 0 bounce", "verify unix - - n - 1 verify",
    "flush unix n - n 1000? 0 flush", "proxymap unix - - n - - proxymap",
    "smtp unix - - n - - smtp", "relay unix - - n - - smtp", "showq unix n - n - - showq",
    "error unix - - n - - error", "retry unix - - n - - error",
    "discard unix - - n - - discard", "anvil unix - - n - 1 anvil",
    "scache unix - - n - 1 scache", "postlog unix-dgram n - n - 1 postlogd"
]


def private_postfix(prefix, main_cf, listeners, probe_port):
    """A private Postfix instance, run in the foreground from a fresh directory: `main_cf`
    after the common lines (a name it sets replaces the common line: Postfix warns about a
    name given twice, and those warnings, sent to the postlog service by every process,
    once filled its socket until postlogd and smtpd hung), `listeners` (master.cf lines)
    before POSTFIX_SERVICES. Yields the Peer once `probe_port` listens (master opens every
    listener before it serves one); stops it and removes the directory afterwards."""
    binary = shutil.which("postfix") or next((p for p in ("/usr/sbin/postfix",) if
                                              os.path.exists(p)), None)
    if binary is None:
        unavailable("postfix is not installed (apt-get install postfix)")
    # not under pytest's tmp_path: its parents are private to root, and Postfix's own
    # processes (user postfix) must reach the data directory
    directory = tempfile.mkdtemp(prefix=prefix)
    etc, spool, data = (os.path.join(directory, d) for d in ("etc", "spool", "data"))
    for d in (etc, spool, data):
        os.mkdir(d)
    shutil.chown(data, "postfix")
    os.chmod(directory, 0o755)          # postfix's own processes walk into the spool
    common = """compatibility_level = 3.6
queue_directory = %s
data_directory = %s
myhostname = tailwart-test.invalid
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = all
mynetworks = 127.0.0.0/8 [::1]/128
alias_maps =
alias_database =
default_transport = discard
smtpd_client_port_logging = yes
maillog_file = /dev/stdout
""" % (spool, data)
    given = set(re.findall(r"^(\w+)\s*=", main_cf, re.M))
    with open(os.path.join(etc, "main.cf"), "w") as f:
        # a private instance: its own queue, no aliases, accepts mail from loopback clients
        # and delivers it to the discard transport
        f.write("".join(line for line in common.splitlines(True)
                        if line.partition(" =")[0] not in given) + main_cf)
    with open(os.path.join(etc, "master.cf"), "w") as f:
        f.write("\n".join(listeners + POSTFIX_SERVICES) + "\n")
    subprocess.run([binary, "-c", etc, "check"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                   timeout=60)                  # creates the queue directories
    peer = Peer([binary, "-c", etc, "start-fg"], directory, "postfix")
    try:
        peer.wait_listening(probe_port)
        yield peer
    finally:
        try:
            subprocess.run([binary, "-c", etc, "stop"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
        except subprocess.TimeoutExpired:
            pass                        # a hung instance: its processes are killed below
        peer.stop()
        for pid in processes_of_postfix_instance(etc):     # what `postfix stop` left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def postfix():
    """smtpd with the PROXY protocol (the header's address is the client's)."""
    port = free_port()
    for peer in private_postfix("tailwart-postfix-", "smtpd_upstream_proxy_protocol = haproxy\n",
                                ["127.0.0.1:%d inet n - n - - smtpd" % port], port):
        yield peer, port


@pytest.mark.parametrize("kind", sorted(CLIENT_KINDS))
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_interop_haproxy_logs_the_real_client(haproxy, kind, version):
    peer, peer_port = haproxy
    proxy, source, address = edge_in_front_of(peer_port, kind, version)
    with proxy:
        client, server = talk_through(address, source)
        found = peer.wait_log(r"^session client=%s frontend=(\S+)$" % re.escape(addr(client)))
        assert found.group(1) == addr(server)
        proxy.stop()


@pytest.mark.parametrize("kind", sorted(CLIENT_KINDS))
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_interop_nginx_logs_the_real_client(nginx, kind, version):
    peer, peer_port, access_log = nginx
    proxy, source, address = edge_in_front_of(peer_port, kind, version)
    with proxy:
        client, server = talk_through(address, source)
        found = peer.wait_log(r"^session client=%s server=(\S+)$" % re.escape(addr(client)),
                              path=access_log)
        assert found.group(1) == addr(server)
        proxy.stop()


@pytest.mark.parametrize("kind", sorted(CLIENT_KINDS))
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_interop_postfix_accepts_mail_and_logs_the_real_client(postfix, kind, version):
    import smtplib
    peer, peer_port = postfix
    proxy, source, address = edge_in_front_of(peer_port, kind, version)
    with proxy:
        smtp = smtplib.SMTP(timeout=WAIT, source_address=(source, 0))
        smtp.connect(*address)
        client = smtp.sock.getsockname()[:2]
        assert client[0] == source
        assert smtp.ehlo("client.example")[0] == 250
        assert smtp.mail("sender@example.org")[0] == 250
        assert smtp.rcpt("rcpt@example.net")[0] == 250        # relaying: mynetworks, by header
        code, reply = smtp.data(b"Subject: through the edge\r\n\r\nHello.\r\n")
        smtp.quit()
        assert code == 250, reply
        queue_id = re.search(r"queued as (\w+)", reply.decode()).group(1)
        # Postfix logs the client as NAME[ADDRESS]:PORT; the header's address, not the edge's
        shown = "[%s]:%d" % client
        peer.wait_log(r"smtpd\[\d+\]: %s: client=\S*%s$" % (queue_id, re.escape(shown)))
        peer.wait_log(r"%s: to=<rcpt@example.net>.*status=sent" % queue_id)
        proxy.stop()


# -- the README's relay for outgoing mail: Postfix on the VPS --------------------------------

RELAY_MAIN_CF = "# /etc/postfix/main.cf on the VPS: a relay for the mail server's outgoing mail, and nothing else"
RELAY_MASTER_CF = "# /etc/postfix/master.cf on the VPS: the relay's one listener"
# the README's placeholders -> loopback addresses standing in for them
RELAY_TAILNET_ADDRESS = ("100.101.102.103", "127.0.0.1")     # the VPS on the tailnet
RELAY_MAIL_SERVER = ("100.64.0.7", "127.0.0.2")               # the one client allowed
RELAY_STRANGER = "127.0.0.3"                                  # any other client
RELAY_PUBLIC_ADDRESS = ("203.0.113.10", "127.0.0.4")          # where mail leaves from


class SmtpSink:
    """A receiving MX on loopback: answers SMTP (no extensions, so one command at a time) and
    records each message as a Received(peer, helo, sender, recipients, data)."""

    Received = collections.namedtuple("Received", "peer helo sender recipients data")

    def __init__(self, host="127.0.0.1"):
        self.server = Upstream(self.serve, host=host)
        self.messages = []
        self.errors = []

    @property
    def port(self):
        return self.server.port

    def serve(self, conn):
        conn.settimeout(WAIT)
        reader = conn.makefile("rb")
        peer = conn.getpeername()[0]
        helo, sender, recipients = None, None, []
        try:
            conn.sendall(b"220 mx.receiver.test ESMTP sink\r\n")
            for line in reader:
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    helo = line[5:].strip().decode()
                    conn.sendall(b"250 mx.receiver.test\r\n")
                elif verb == b"MAIL":
                    sender, recipients = line.strip().decode(), []
                    conn.sendall(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    recipients.append(line.strip().decode())
                    conn.sendall(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    data = bytearray()
                    for body_line in reader:
                        if body_line == b".\r\n":
                            break
                        data.extend(body_line)
                    self.messages.append(self.Received(peer, helo, sender, recipients,
                                                       bytes(data)))
                    conn.sendall(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 Ok\r\n")      # RSET, NOOP
        except OSError as e:
            self.errors.append(repr(e))

    def close(self):
        self.server.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def readme_relay_config(listen_port, sink_port):
    """The README's main.cf and master.cf line for the relay on the VPS, the placeholders
    swapped for loopback ones; then what stands in for the internet: the sink is every
    domain's MX (relayhost), since the tests resolve no MX."""
    main_cf, master_cf = readme_block(RELAY_MAIN_CF), readme_block(RELAY_MASTER_CF)
    for placeholder, loopback in (RELAY_TAILNET_ADDRESS, RELAY_MAIL_SERVER,
                                  RELAY_PUBLIC_ADDRESS):
        assert placeholder in main_cf + master_cf, (placeholder, main_cf, master_cf)
        main_cf = main_cf.replace(placeholder, loopback)
        master_cf = master_cf.replace(placeholder, loopback)
    assert ":2525 " in master_cf, master_cf
    master_cf = master_cf.replace(":2525 ", ":%d " % listen_port)
    main_cf += ("# the test's stand-in for the internet\ndefault_transport = smtp\n"
                "relayhost = [127.0.0.1]:%d\n" % sink_port)
    listeners = [line for line in master_cf.splitlines() if line.strip()]
    return main_cf, listeners


def test_interop_postfix_relay_from_the_readme_sends_the_mail_servers_mail_and_refuses_others():
    """Issue 20: the README's Postfix relay for outgoing mail, its main.cf and master.cf line
    read from README.md, run in a real Postfix with loopback addresses for the tailnet ones.
    The mail server's address (127.0.0.2, mynetworks' /32) relays a message out: the sink
    (the recipient's MX) gets it from the public address (smtp_bind_address, 127.0.0.4) with
    the PTR name (myhostname) as HELO. Any other address (127.0.0.3) is refused: 554 5.7.1
    Relay access denied."""
    for host in (RELAY_MAIL_SERVER[1], RELAY_STRANGER, RELAY_PUBLIC_ADDRESS[1]):
        try:
            with socket.socket() as probe:
                probe.bind((host, 0))
        except OSError:
            unavailable("%s is not a loopback address here" % host)
    if not is_root():
        unavailable("a private Postfix instance needs root")
    helo = re.search(r"^myhostname = (\S+)$", readme_block(RELAY_MAIN_CF), re.M).group(1)
    with SmtpSink() as sink:
        port = free_port()
        main_cf, listeners = readme_relay_config(port, sink.port)
        relay = contextlib.contextmanager(private_postfix)
        with relay("tailwart-postfix-relay-", main_cf, listeners, port) as peer:
            # the mail server hands a message for an outside domain to the relay
            smtp = smtplib.SMTP(timeout=WAIT, source_address=(RELAY_MAIL_SERVER[1], 0))
            smtp.connect("127.0.0.1", port)
            assert smtp.ehlo("mail-server.tailnet.test")[0] == 250
            assert smtp.mail("alice@example.com")[0] == 250
            assert smtp.rcpt("bob@example.net")[0] == 250
            code, reply = smtp.data(b"Subject: out through the VPS\r\n\r\nHello.\r\n")
            smtp.quit()
            assert code == 250, reply

            # anyone else: refused at RCPT, whatever the domain
            stranger = smtplib.SMTP(timeout=WAIT, source_address=(RELAY_STRANGER, 0))
            stranger.connect("127.0.0.1", port)
            assert stranger.ehlo("stranger.test")[0] == 250
            assert stranger.mail("spam@example.org")[0] == 250
            refused = stranger.rcpt("victim@example.net")
            stranger.quit()
            assert refused[0] == 554, refused
            assert refused[1].startswith(b"5.7.1 ") and b"Relay access denied" in refused[1], \
                refused

            eventually(lambda: sink.messages or "status=" in peer.text())
            assert sink.messages, "nothing reached the sink:\n" + peer.text()
            received = sink.messages[0]
            assert received.peer == RELAY_PUBLIC_ADDRESS[1], received
            assert received.helo == helo, received
            assert received.sender == "MAIL FROM:<alice@example.com>", received
            assert received.recipients == ["RCPT TO:<bob@example.net>"], received
            assert b"Subject: out through the VPS" in received.data, received
            assert len(sink.messages) == 1 and not sink.errors, (sink.messages, sink.errors)
            peer.wait_log(r"NOQUEUE: reject: RCPT from \S*\[%s\]:\d+: 554 5\.7\.1 "
                          r"<victim@example\.net>: Relay access denied"
                          % re.escape(RELAY_STRANGER))


# ----------------------------------------------------------------------------------------------
# systemd: the unit file, sd_notify, socket activation, a real systemd in nspawn
# ----------------------------------------------------------------------------------------------
#
# CI sets TAILWART_REQUIRE_PEERS=1: there a missing tool is a failure, not a skip. The nspawn test
# boots a Debian tree built once by .ci/run (see build_nspawn_tree there) in
# TAILWART_NSPAWN_ROOT (default /var/cache/tailwart-edge-ci/bookworm).

UNIT = os.path.join(HERE, "tailwart-edge.service")
README = os.path.join(HERE, "README.md")
MAX_EXPOSURE = 1.5          # systemd-analyze security: 1.5 and lower reads "OK"
NSPAWN_ROOT = os.environ.get("TAILWART_NSPAWN_ROOT", "/var/cache/tailwart-edge-ci/bookworm")
PRIVILEGED_PORTS = (465, 587, 993, 143, 25, 110, 995, 119, 563, 636)
CAP_NET_BIND_SERVICE = 1 << 10
TEST_OPTIONS = "--idle-timeout 600 --connect-timeout 5 --max-connections 5000"
UPSTREAM_NAME = "stalwart.tailnet.test"     # 127.0.0.2, from the container's /etc/hosts




def runs_on_linux():
    if not sys.platform.startswith("linux"):
        pytest.skip("systemd exists on Linux only")


def unit_copy(directory):
    """The unit, with ExecStart's /usr/bin/python3 swapped for PYTHON where that is missing,
    since `systemd-analyze verify` checks that the program exists."""
    text = open(UNIT).read()
    if not os.access("/usr/bin/python3", os.X_OK):
        text = text.replace("ExecStart=/usr/bin/python3 ", "ExecStart=%s " % PYTHON)
    path = os.path.join(directory, "tailwart-edge.service")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_systemd_unit_file_passes_systemd_analyze_verify(tmp_path):
    runs_on_linux()
    analyze = need_tool("systemd-analyze")
    unit = unit_copy(str(tmp_path))
    result = subprocess.run([analyze, "verify", "--man=no", unit], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    # unknown or misspelt keys are only warnings (exit 0): any line about our unit fails the test
    ours = [l for l in result.stdout.splitlines() if "tailwart-edge" in l or unit in l]
    assert result.returncode == 0 and not ours, result.stdout


def exposure(unit, analyze):
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", unit],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout
    return float(found.group(1)), result.stdout


def test_systemd_unit_file_security_exposure_is_ok(tmp_path):
    runs_on_linux()
    analyze = need_tool("systemd-analyze")
    score, report = exposure(unit_copy(str(tmp_path)), analyze)
    assert score <= MAX_EXPOSURE, report


# -- --install: the unit's text lives in the script, the settings file is written from argv -----

def test_systemd_unit_file_is_what_install_writes():
    # the repository's file and the installer's text are one: --install with /usr/bin/python3
    assert edge.unit_text("/usr/bin/python3") == open(UNIT).read()
    other = edge.unit_text("/opt/python/bin/python3").splitlines()
    changed = [line for line, same in zip(other, open(UNIT).read().splitlines()) if line != same]
    assert [line.partition("=")[0] for line in changed] == ["ExecStart", "ExecReload"], changed
    assert all(line.partition("=")[2].startswith("/opt/python/bin/python3 /usr/local/bin/")
               for line in changed), changed


@pytest.mark.parametrize("argv", [
    ["--upstream", "stalwart.tailnet.test", "25", "465", "587", "143", "993", "4190"],
    # routes on 443 (one word with a comma), a default route with its own header setting
    ["443@mail.example.com,alpn:acme-tls/1=stalwart.tailnet.test:443",
     "443=127.0.0.1:8443/proxy=off", "[::1]:993=[fd7a:115c:a1e0::1]:993", "-q"],
    # quotes, a $ and a # in a path rule; options that repeat, one whose value starts with '-'
    ["80@mail.example.com/it's/\"$x\"/#a=127.0.0.1:8080", "80=127.0.0.1:8081",
     "--deny", "192.0.2.0/24", "--deny=2001:db8::/32", "--exempt", "198.51.100.7",
     "--connect-timeout", "2.5", "--proxy-protocol", "v1", "--metrics", "127.0.0.1:9425",
     "--per-client", "0", "--max-connections", "25"],
], ids=["upstream and ports", "routes", "quotes and options"])
def test_systemd_install_settings_file_reads_back_as_the_command_line(argv, tmp_path):
    parsed = edge.parse_args(argv)
    text = edge.settings_text(argv, parsed)
    path = tmp_path / "tailwart-edge"
    path.write_text(text)
    options, mappings = edge.parse_args(["--settings", str(path)])
    before, after = dict(vars(parsed[0])), dict(vars(options))
    before.pop("settings")
    after.pop("settings")
    assert after == before, text
    assert [m.spec for m in mappings] == [m.spec for m in parsed[1]], text
    assert [[(r.matches, r.upstreams, r.proxy) for r in m.routes] for m in mappings] == \
        [[(r.matches, r.upstreams, r.proxy) for r in m.routes] for m in parsed[1]], text


@pytest.mark.parametrize("argv, message", [
    (["--install", "--user", "nobody", "25=127.0.0.1:2525"], r"DynamicUser=.*leave --user out"),
    (["--install", "--check", "25=127.0.0.1:2525"], r"runs the check itself"),
    (["--install", "--uninstall", "25=127.0.0.1:2525"], r"give one of them"),
    (["--uninstall", "25=127.0.0.1:2525"], r"--uninstall takes no MAPPING"),
    (["--replace-settings", "25=127.0.0.1:2525"], r"goes with --install"),
    (["--install", "25=127.0.0.1:2525/bogus"], r"bogus"),
], ids=["user", "check", "both", "uninstall mapping", "replace alone", "bad mapping"])
def test_systemd_install_mistakes_exit_2_with_one_line(argv, message):
    code, out, err = run_script(*argv)
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), err


def test_systemd_install_as_another_user_than_root_says_sudo():
    python, script, unprivileged = PYTHON, SCRIPT, None
    if os.geteuid() == 0:
        python = "/usr/bin/python3"
        if not os.access(python, os.X_OK):
            pytest.skip("running as root and no /usr/bin/python3 to run as nobody")
        directory = tempfile.mkdtemp(prefix="tailwart-nobody-")
        os.chmod(directory, 0o755)
        script = shutil.copy(SCRIPT, directory)

        def unprivileged():
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
    try:
        proc = subprocess.run([python, script, "--install", "--upstream", "h.test", "25"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=WAIT, universal_newlines=True,
                              preexec_fn=unprivileged, cwd="/")
    finally:
        if unprivileged is not None:
            shutil.rmtree(directory)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert len(lines) == 1 and "run it as root (sudo python3 " in lines[0], proc.stderr


def test_systemd_install_without_systemd_installs_nothing(tmp_path, monkeypatch, capfd):
    # every path the installer writes points into tmp_path: nothing there afterwards
    for name in ("INSTALL_SCRIPT", "INSTALL_UNIT", "INSTALL_SETTINGS"):
        monkeypatch.setattr(edge, name, str(tmp_path / name))
    monkeypatch.setattr(edge, "SYSTEMD_RUNNING", str(tmp_path / "no-systemd"))
    monkeypatch.setattr(edge.os, "geteuid", lambda: 0)
    argv = ["--install", "--upstream", "h.test", "25"]
    options, mappings = edge.parse_args(argv)
    assert edge.install(options, mappings, argv) == 1
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1, (out, err)
    assert "does not run systemd (no %s), so nothing was installed" % (
        tmp_path / "no-systemd") in err, err
    assert os.listdir(str(tmp_path)) == []


def readme_block(first_line):
    """The fenced block of README.md that starts with `first_line` (the path of a file the
    README tells the reader to create), without that line."""
    try:
        text = open(README).read()
    except OSError:
        text = ""
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        lines = block.splitlines(True)
        if lines and lines[0].strip() == first_line:
            return "".join(lines[1:])
    unavailable("README.md has no block starting with %r" % first_line)


SOCKET_UNIT = "# /etc/systemd/system/tailwart-edge.socket"
SOCKET_DROP_IN = "# /etc/systemd/system/tailwart-edge.service.d/socket-activation.conf"


def test_systemd_socket_activated_unit_from_readme_has_lower_exposure(tmp_path):
    runs_on_linux()
    analyze = need_tool("systemd-analyze")
    drop_in = readme_block(SOCKET_DROP_IN)
    unit = unit_copy(str(tmp_path))
    (tmp_path / "tailwart-edge.service.d").mkdir()
    (tmp_path / "tailwart-edge.service.d" / "socket-activation.conf").write_text(drop_in)
    (tmp_path / "tailwart-edge.socket").write_text(readme_block(SOCKET_UNIT))
    plain, _ = exposure(os.path.join(HERE, "tailwart-edge.service"), analyze)
    score, report = exposure(unit, analyze)
    assert score < plain and "CAP_NET_BIND_SERVICE" not in drop_in, report
    socket_unit = str(tmp_path / "tailwart-edge.socket")
    result = subprocess.run([analyze, "verify", "--man=no", socket_unit], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert result.returncode == 0 and "tailwart-edge" not in result.stdout, result.stdout


# -- sd_notify: a datagram socket in the test plays systemd's notify socket ---------------------

class NotifySocket:
    """Binds an AF_UNIX datagram socket and collects what arrives (one message per datagram)."""

    def __init__(self):
        # sockaddr_un holds 108 bytes: pytest's tmp_path may be longer, so a short mkdtemp
        self.dir = tempfile.mkdtemp(prefix="tw-notify-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []

    def next(self, timeout):
        """The next message as a dict of its KEY=VALUE lines, or None after `timeout`."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(message)
        return message

    def wait_for(self, key, count=1, timeout=10):
        """Collect messages until `count` of them carry `key`; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while sum(key in m for m in self.messages) < count:
            left = deadline - time.monotonic()
            assert left > 0, "%d x %s expected, got %r" % (count, key, self.messages)
            self.next(left)

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket():
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("sd_notify needs AF_UNIX")
    notify = NotifySocket()
    yield notify
    notify.close()


def test_systemd_sd_notify_ready_comes_once_the_listeners_accept(notify_socket):
    port = free_port()
    with Edge("127.0.0.1:%d=127.0.0.1:%d" % (port, free_port()),
              env={"NOTIFY_SOCKET": notify_socket.path}) as proxy:
        first = notify_socket.next(timeout=10)
        assert first is not None and first.get("READY") == "1", notify_socket.messages
        assert "STATUS" in first
        # READY=1 is systemd's cue to start what comes After= us: the port must accept by now
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert proxy.stop() == 0


def test_systemd_sd_notify_status_names_the_listeners(notify_socket):
    port = free_port()
    with Edge("127.0.0.1:%d=127.0.0.1:%d" % (port, free_port()),
              env={"NOTIFY_SOCKET": notify_socket.path}) as proxy:
        notify_socket.wait_for("READY")
        status = [m["STATUS"] for m in notify_socket.messages if "STATUS" in m]
        assert status and "127.0.0.1:%d" % port in status[0], notify_socket.messages
        proxy.stop()


def test_systemd_sd_notify_watchdog_is_fed_repeatedly(notify_socket):
    # WATCHDOG_USEC=200 ms: the relay pings every 100 ms. Only ask for several pings within a
    # generous bound, never for an interval.
    with Edge("127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port()),
              env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "200000"}) as proxy:
        notify_socket.wait_for("WATCHDOG", count=4, timeout=20)
        assert all(m["WATCHDOG"] == "1" for m in notify_socket.messages if "WATCHDOG" in m)
        assert "READY" in notify_socket.messages[0]        # pings start once it is ready
        # half of WATCHDOG_USEC, not a flood: over 2 s about 20 pings, never hundreds
        start = len(notify_socket.messages)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            notify_socket.next(max(0.01, deadline - time.monotonic()))
        pings = sum("WATCHDOG" in m for m in notify_socket.messages[start:])
        assert 4 <= pings <= 60, pings
        proxy.stop()


def test_systemd_sd_notify_watchdog_for_another_pid_is_ignored(notify_socket):
    # WATCHDOG_PID names the process the watchdog is meant for (sd_watchdog_enabled(3))
    with Edge("127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port()),
              env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "100000",
                   "WATCHDOG_PID": "1"}) as proxy:
        notify_socket.wait_for("READY")
        proxy.stop()
        while notify_socket.next(timeout=1) is not None:
            pass
        assert not any("WATCHDOG" in m for m in notify_socket.messages), notify_socket.messages


def test_systemd_sd_notify_stopping_on_sigterm(notify_socket):
    with Edge("127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port()),
              env={"NOTIFY_SOCKET": notify_socket.path}) as proxy:
        notify_socket.wait_for("READY")
        assert proxy.stop() == 0
        notify_socket.wait_for("STOPPING", timeout=5)
        stopping = [m for m in notify_socket.messages if "STOPPING" in m]
        assert stopping[0]["STOPPING"] == "1" and "STATUS" in stopping[0]


# -- socket activation: systemd-socket-activate binds, the relay inherits ----------------------

def test_systemd_socket_activation_relays_on_the_inherited_listener():
    runs_on_linux()
    activate = need_tool("systemd-socket-activate")
    port, upstream_port = free_port(), free_port()
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", upstream_port))
    upstream.listen(5)
    upstream.settimeout(10)
    # systemd-socket-activate binds the port, waits for a first client, then execs the relay
    # with the socket as fd 3 (LISTEN_FDS=1); the relay must adopt it, not bind its own
    proc = subprocess.Popen([activate, "-l", "127.0.0.1:%d" % port, PYTHON, SCRIPT,
                             "--proxy-protocol", "off",
                             "127.0.0.1:%d=127.0.0.1:%d" % (port, upstream_port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, universal_newlines=True)
    lines = []
    try:
        lines.append(proc.stderr.readline())
        assert "Listening on 127.0.0.1:%d" % port in lines[0], lines
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            conn, _ = upstream.accept()
            with conn:
                conn.sendall(b"220 upstream ESMTP\r\n")
                assert client.recv(100) == b"220 upstream ESMTP\r\n"
                client.sendall(b"QUIT\r\n")
                assert conn.recv(100) == b"QUIT\r\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines += proc.stderr.readlines()
        proc.stderr.close()
        upstream.close()
    text = "".join(lines)
    assert re.search(r"listen addr=127\.0\.0\.1:%d .*\(from systemd\)" % port, text), text
    assert "session client=127.0.0.1:" in text and "cannot listen" not in text, text


# -- --user: started as root, bind, then run as an ordinary user ---------------------------------

def process_ids(pid):
    status = dict(re.findall(r"^(\w+):[ \t]*(.*)$", open("/proc/%d/status" % pid).read(), re.M))
    return ([int(x) for x in status["Uid"].split()], [int(x) for x in status["Gid"].split()],
            status["Groups"].split())


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_systemd_user_option_drops_root_after_binding():
    import pwd
    nobody = pwd.getpwnam("nobody")
    port = free_port()
    with Upstream(header_echo) as up, \
            Edge("--user", "nobody", "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        uids, gids, groups = process_ids(proxy.pid)
        assert uids == [nobody.pw_uid] * 4          # real, effective, saved, file system
        assert gids == [nobody.pw_gid] * 4
        assert groups == [] or groups == [str(nobody.pw_gid)]   # root's groups are gone
        assert round_trip(port, b"as nobody") == b"as nobody"
        assert "running as root" not in proxy.output()
        assert proxy.stop() == 0


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_systemd_running_as_root_without_user_warns():
    with Edge("127.0.0.1:%d=127.0.0.1:9" % free_port()) as proxy:
        assert "warning" in proxy.wait_for(r"running as root; pass --user NAME")


def test_systemd_unknown_user_is_a_clear_error():
    code, out, err = run_script("--user", "no-such-user-here", "127.0.0.1:%d=h:25" % free_port())
    assert code in (1, 2) and "Traceback" not in err
    assert "no-such-user-here" in err.splitlines()[-1]


# -- a real systemd: boot a Debian tree with systemd-nspawn, run the unit in it -----------------
#
# The container shares the host's network (no --private-network), so its 127.0.0.1 is ours: the
# test runs the upstream on 127.0.0.2 and the client here, and the unit in between. Commands run
# inside with `nsenter -t <container PID 1> -a` (systemd-run -M needs machined on the host).
# Every step is bounded by a timeout; the container is powered off (SIGTERM to nspawn, which asks
# the container's systemd to halt), then killed if it lingers, whatever happens.

NSPAWN_BOOT_TIMEOUT = 60
NSPAWN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}


class ProxyEchoUpstream:
    """An upstream on (host, port; 0 for a free one) that reads a PROXY v2 TCP4 header, records
    (src, dst), says `greeting` first (as a mail server does), then echoes everything back until
    EOF. Connections are known by the client port their header carries: push() sends a line
    unasked on one (an IMAP server's `* 4 EXISTS` during IDLE)."""

    def __init__(self, host, port=0, greeting=b"", timeout=30):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.greeting, self.timeout = greeting, timeout
        self.headers = []
        self.conns = {}         # client port -> connection
        self.errors = []
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self.echo, args=(conn,), daemon=True).start()

    def echo(self, conn):
        conn.settimeout(self.timeout)
        try:
            with conn:
                head = recv_exactly(conn, 16)
                assert head[:12] == SIG and head[12] == 0x21 and head[13] == 0x11, head
                body = recv_exactly(conn, struct.unpack("!H", head[14:16])[0])
                src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
                self.headers.append(((socket.inet_ntoa(src), sport),
                                     (socket.inet_ntoa(dst), dport)))
                self.conns[sport] = conn
                if self.greeting:
                    conn.sendall(self.greeting)
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
        except Exception as e:      # reported by the test, not lost in a thread
            if self.running:
                self.errors.append(repr(e))

    def push(self, client_port, line):
        self.conns[client_port].sendall(line)

    def close(self):
        self.running = False
        self.sock.close()
        for conn in list(self.conns.values()):
            try:
                conn.close()
            except OSError:
                pass
        self.thread.join(5)


def echo_through(port, payload, timeout=30):
    """Send payload to 127.0.0.1:port, half-close, return all that comes back."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        def read():
            while True:
                data = client.recv(65536)
                if not data:
                    return
                received.extend(data)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        reader.join(timeout)
        return client.getsockname(), bytes(received)


def pick_privileged_port():
    """A port below 1024 that neither 127.0.0.1 nor 127.0.0.2 uses here (nor in the container,
    which shares our network)."""
    for port in PRIVILEGED_PORTS:
        try:
            for host in ("127.0.0.1", "127.0.0.2"):
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    unavailable("every candidate port below 1024 is taken on loopback: %s" % (PRIVILEGED_PORTS,))


class Container:
    """A booted systemd-nspawn container of NSPAWN_ROOT. The tree stays untouched
    (--volatile=overlay: writes go to a tmpfs), and `stage` is bind-mounted at /mnt/tailwart."""

    def __init__(self, root, stage):
        self.name = "tailwart-ci-%d" % os.getpid()
        self.console = open(os.path.join(stage, "console.log"), "w+")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--boot", "--directory", root, "--machine", self.name,
             "--volatile=overlay", "--register=no", "--keep-unit", "--console=pipe",
             "--bind-ro=%s:/mnt/tailwart" % stage],
            stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT)
        self.pid1 = None
        self.cursor = None

    def boot(self, timeout=NSPAWN_BOOT_TIMEOUT):
        """Wait for the container's systemd to finish starting up; returns its state."""
        deadline = time.monotonic() + timeout
        while self.pid1 is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("container did not start:\n" + self.output())
            self.pid1 = self.find_init()
            time.sleep(0.05)
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=max(1, deadline - time.monotonic())).stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.2)     # the private bus socket may not exist yet
        raise RuntimeError("container did not finish booting (%r):\n%s" % (state, self.output()))

    def find_init(self):
        """The container's PID 1, as seen from here: the child of nspawn running systemd."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry) as f:
                    stat = f.read()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
            if int(rest.split()[1]) == self.proc.pid and comm == "systemd":
                return int(entry)
        return None

    def run(self, *argv, check=True, timeout=30):
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "--"] + list(argv),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, env=NSPAWN_ENV, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError("%s: exit %d\n%s%s" % (" ".join(argv), result.returncode,
                                                         result.stdout, result.stderr))
        return result

    def sh(self, script, **kwargs):
        return self.run("/bin/sh", "-ec", script, **kwargs)

    def start(self, *units):
        """systemctl start; on failure the assertion carries the units' journal."""
        result = self.run("systemctl", "start", *units, check=False, timeout=60)
        assert result.returncode == 0, "systemctl start %s: %s\n%s" % (
            " ".join(units), result.stderr, self.journal(units[0]))

    def stop(self, *units):
        self.run("systemctl", "stop", *units, timeout=60)

    def show(self, unit, *properties):
        text = self.run("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def mark_journal(self):
        """From now on journal() shows only newer lines (each test reads its own)."""
        text = self.run("journalctl", "--no-pager", "-n", "1", "--show-cursor", "-o", "cat").stdout
        found = re.search(r"^-- cursor: (.+)$", text, re.M)
        self.cursor = found.group(1) if found else None

    def journal(self, unit, *options):
        after = ["--after-cursor", self.cursor] if self.cursor else []
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit,
                        *(after + list(options))).stdout

    def wait_journal(self, unit, pattern, timeout=15):
        """journald may write a moment after the line was logged: poll for it."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.journal(unit)
            if re.search(pattern, text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError("no %r in the journal of %s:\n%s" % (pattern, unit, text))
            time.sleep(0.2)

    def output(self):
        self.console.flush()
        self.console.seek(0)
        return self.console.read()[-4000:]

    def process_status(self, pid):
        text = self.run("cat", "/proc/%s/status" % pid).stdout
        return dict(re.findall(r"^(\w+):\s*(.*)$", text, re.M))

    def poweroff(self, timeout=30):
        """Halt the container (nspawn turns SIGTERM into a clean shutdown); kill it if it
        lingers. Returns nspawn's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.pid1 is not None:
            # nspawn killed: its PID 1 would live on, reparented; killing it ends the whole
            # PID namespace
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.console.close()
        # nspawn leaves this empty directory behind when /run is not a tmpfs
        try:
            os.rmdir("/run/systemd/nspawn/propagate/%s" % self.name)
        except OSError:
            pass
        return self.proc.returncode


def nspawn_can_run():
    runs_on_linux()
    if os.geteuid() != 0:
        unavailable("systemd-nspawn needs root")
    for tool in ("systemd-nspawn", "nsenter"):
        need_tool(tool)
    if not os.path.exists(os.path.join(NSPAWN_ROOT, ".tailwart-ready")):
        unavailable("no container tree at %s: .ci/run builds it (build_nspawn_tree), or set "
                    "TAILWART_NSPAWN_ROOT" % NSPAWN_ROOT)


@pytest.fixture(scope="module")
def booted():
    """One container for the module's nspawn tests: (container, stage dir, port, upstream)."""
    nspawn_can_run()
    port = pick_privileged_port()
    stage = tempfile.mkdtemp(prefix="tw-nspawn-")
    shutil.copy(SCRIPT, os.path.join(stage, "tailwart_edge.py"))
    shutil.copy(UNIT, os.path.join(stage, "tailwart-edge.service"))
    with open(os.path.join(stage, "tailwart-edge.env"), "w") as f:
        # a bare port and --upstream, as the unit is meant to be used; OPTIONS has two options
        # to check that $OPTIONS is split into words
        f.write("UPSTREAM=%s\nPORTS=127.0.0.1:%d\nOPTIONS=%s\n"
                % (UPSTREAM_NAME, port, TEST_OPTIONS))
    with open(os.path.join(stage, "hosts"), "w") as f:
        f.write("127.0.0.1 localhost\n127.0.0.2 %s\n" % UPSTREAM_NAME)
    upstream = ProxyEchoUpstream("127.0.0.2", port)
    container = Container(NSPAWN_ROOT, stage)
    try:
        try:
            container.boot()
        except RuntimeError as e:
            unavailable("systemd-nspawn could not boot %s: %s" % (NSPAWN_ROOT, e))
        # the README's steps: copy the script, the unit and /etc/default/tailwart-edge; the
        # upstream is a name, so getaddrinfo() runs in the sandbox (threads, no AF_NETLINK)
        container.sh("install -m 0644 /mnt/tailwart/hosts /etc/hosts\n"
                     "install -m 0755 /mnt/tailwart/tailwart_edge.py /usr/local/bin/\n"
                     "install -m 0644 /mnt/tailwart/tailwart-edge.service /etc/systemd/system/\n"
                     "install -m 0644 /mnt/tailwart/tailwart-edge.env /etc/default/tailwart-edge\n"
                     "systemctl daemon-reload")
        yield container, stage, port, upstream
    finally:
        code = container.poweroff()
        upstream.close()
        shutil.rmtree(stage, ignore_errors=True)
    assert code == 0, "systemd-nspawn exited %s" % code


def test_systemd_nspawn_unit_relays_as_dynamic_user_and_stops_cleanly(booted):
    container, _, port, upstream = booted
    try:
        check_unit_relays_and_stops(container, port, upstream)
    finally:
        # a failed run must not leave the unit restarting under the next test
        container.sh("systemctl stop tailwart-edge; systemctl reset-failed", check=False)


def check_unit_relays_and_stops(container, port, upstream):
    container.mark_journal()
    container.start("tailwart-edge")
    state = container.show("tailwart-edge", "ActiveState", "MainPID")
    assert state["ActiveState"] == "active", container.journal("tailwart-edge")
    # the script reads /etc/default/tailwart-edge itself (so that a reload re-reads it)
    argv = container.run("cat", "/proc/%s/cmdline" % state["MainPID"]).stdout.split("\0")
    assert argv[1:-1] == ["/usr/local/bin/tailwart_edge.py", "--settings",
                          "/etc/default/tailwart-edge"], argv
    status = container.process_status(state["MainPID"])
    assert status["Uid"].split()[0] != "0" and status["Gid"].split()[0] != "0", status
    # CAP_NET_BIND_SERVICE, and nothing else, in every set that matters
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == CAP_NET_BIND_SERVICE, (field, status)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status

    # 1 MiB each way: the splice path, through the system-call filter
    payload = os.urandom(1 << 20)
    (client_host, client_port), echoed = echo_through(port, payload)
    assert echoed == payload, "%d of %d bytes came back" % (len(echoed), len(payload))
    assert upstream.errors == [] and upstream.headers == [
        ((client_host, client_port), ("127.0.0.1", port))]

    log = container.wait_journal("tailwart-edge", r"session client=")
    assert re.search(r"session client=127\.0\.0\.1:%d listen=127\.0\.0\.1:%d "
                     r"upstream=127\.0\.0\.2:%d up=%d down=%d .*end=client-fin"
                     % (client_port, port, port, len(payload), len(payload)), log), log
    # UPSTREAM= and PORTS= made the mapping; the words of OPTIONS= are options
    assert re.search(r"^listen addr=127\.0\.0\.1:%d upstream=%s:%d "
                     % (port, re.escape(UPSTREAM_NAME), port), log, re.M), log
    assert re.search(r"^ready pid=%s .*max-connections=5000\b" % state["MainPID"], log,
                     re.M), log
    # `<N>` prefixes reached journald as priorities: `ready` is a notice, `session` is info
    notices = container.journal("tailwart-edge", "-p", "notice")
    assert re.search(r"^ready pid=", notices, re.M) and "session client=" not in notices, notices

    container.stop("tailwart-edge")
    state = container.show("tailwart-edge", "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (
        state, container.journal("tailwart-edge"))
    assert re.search(r"^stopped\b", container.journal("tailwart-edge"), re.M)


# -- issue 11: `systemctl reload` with an IMAP IDLE session open, clients arriving all along ----


IMAP_GREETING = b"* OK [CAPABILITY IMAP4rev1 IDLE] tailwart-ci ready\r\n"
RELOAD_WATCHDOG_SEC = 10    # a drop-in shortens WatchdogSec=30s, so waiting it out is cheap


class ImapLikeUpstream(ProxyEchoUpstream):
    """An upstream on (host, a free port) like an IMAP server: it reads the PROXY v2 header,
    speaks first (IMAP_GREETING), then echoes what the client sends, as long as it likes (a
    client in IDLE); push() is new mail during IDLE."""

    def __init__(self, host):
        ProxyEchoUpstream.__init__(self, host, 0, IMAP_GREETING, timeout=300)


class ImapClient:
    """One long IMAP-like session through the relay: connects, reads the greeting."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.port = self.sock.getsockname()[1]
        self.buffer = b""
        greeting = self.line()
        assert greeting == IMAP_GREETING, greeting

    def line(self):
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("session closed; had %r" % self.buffer)
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def relays_both_ways(self, upstream, n):
        """Down: a line the upstream sends unasked arrives; up: a command comes back."""
        unasked = b"* %d EXISTS\r\n" % n
        upstream.push(self.port, unasked)
        assert self.line() == unasked
        command = b"a%d NOOP\r\n" % n
        self.sock.sendall(command)
        assert self.line() == command

    def close(self):
        self.sock.close()


class ConnectLoop:
    """Clients one after another, without pause, each a whole exchange (greeting, a command
    echoed, close). Counts what went wrong by kind; `served` keeps each success's end time."""

    def __init__(self, port):
        self.port = port
        self.served = []
        self.failures = []      # (time, kind, repr)
        self.slowest = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as c:
                    got = b""
                    while not got.endswith(b"\r\n"):
                        data = c.recv(4096)
                        if not data:
                            raise EOFError("closed after %r" % got)
                        got += data
                    assert got == IMAP_GREETING, got
                    c.sendall(b"a1 NOOP\r\n")
                    got = b""
                    while not got.endswith(b"\r\n"):
                        data = c.recv(4096)
                        if not data:
                            raise EOFError("closed after %r" % got)
                        got += data
                    assert got == b"a1 NOOP\r\n", got
            except ConnectionRefusedError as e:
                self.failures.append((time.monotonic(), "refused", repr(e)))
            except (ConnectionResetError, BrokenPipeError, EOFError) as e:
                self.failures.append((time.monotonic(), "cut", repr(e)))
            except socket.timeout as e:
                self.failures.append((time.monotonic(), "timeout", repr(e)))
            except Exception as e:
                self.failures.append((time.monotonic(), "other", repr(e)))
            else:
                now = time.monotonic()
                self.served.append(now)
                self.slowest = max(self.slowest, now - started)

    def served_between(self, start, end):
        return sum(1 for t in self.served if start <= t <= end)

    def stop(self):
        self.stopping.set()
        self.thread.join(WAIT)


def tcp_inode(local, remote):
    """The socket inode of the TCP connection local -> remote (IPv4), from /proc/net/tcp:
    the container shares our network, so its sockets are listed here too."""
    def hexed(address):
        return "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(address[0]))[0], address[1])
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            if fields[1] == hexed(local) and fields[2] == hexed(remote):
                return fields[9]
    raise AssertionError("no TCP connection %s -> %s" % (local, remote))


def holders_in(container, pids, port, client_port):
    """Which of the container's processes pids hold the relay's end of a client's session."""
    inode = tcp_inode(("127.0.0.1", port), ("127.0.0.1", client_port))
    found = set()
    for pid in pids:
        links = container.sh("readlink /proc/%d/fd/* || true" % pid, check=False).stdout
        if "socket:[%s]" % inode in links.split():
            found.add(pid)
    return found


def unit_processes(container, cgroup):
    """The PIDs in the unit's cgroup (cgroup v2, or the name=systemd v1 hierarchy)."""
    out = container.sh("for d in /sys/fs/cgroup /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; "
                       "do if [ -e \"$d%s/cgroup.procs\" ]; then cat \"$d%s/cgroup.procs\"; "
                       "exit 0; fi; done; echo gone" % (cgroup, cgroup)).stdout.split()
    return None if out == ["gone"] else {int(pid) for pid in out}


def relay_processes(container):
    """Every process in the container running the script (`ps` is not in the minimal tree)."""
    # [e]: the pattern does not match this shell's own command line
    out = container.sh("grep -l 'tailwart_edg[e]\\.py' /proc/[0-9]*/cmdline 2>/dev/null || true",
                       check=False).stdout
    return {int(p.split("/")[2]) for p in out.split() if p.split("/")[2].isdigit()}


def pid_alive(container, pid):
    return container.run("test", "-d", "/proc/%d" % pid, check=False).returncode == 0


def reload_unit(container):
    """systemctl reload: (exit code, output, seconds)."""
    started = time.monotonic()
    result = container.run("systemctl", "reload", "tailwart-edge", check=False, timeout=60)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def new_main_pid(container, old, timeout=5):
    """MainPID once it is no longer `old` (it should be at once: the reload waits for it)."""
    deadline = time.monotonic() + timeout
    while True:
        pid = int(container.show("tailwart-edge", "MainPID")["MainPID"])
        if pid not in (0, old) or time.monotonic() > deadline:
            return pid
        time.sleep(0.05)


def settings(upstream_name, ports):
    # unquoted: at 8577bf8 a quoted value (PORTS="25 465") is one word, unlike systemd's
    # EnvironmentFile= + $PORTS that read the same file before
    return ("# /etc/default/tailwart-edge, as the README shows it\n"
            "UPSTREAM=%s\nPORTS=%s\nOPTIONS=--idle-timeout 600 --connect-timeout 5 -q\n"
            % (upstream_name, ports))


def test_systemd_nspawn_reload_keeps_sessions_and_refuses_no_client(booted):
    """Issue 11 under systemd: `systemctl reload` with an IMAP session open and clients
    connecting without pause. The session stays in the old process and relays both ways; the
    new process becomes MainPID and feeds the watchdog; a second and third reload work; a bad
    settings file fails the reload visibly and changes nothing; no client is refused; stop
    ends old and new processes. -q: 1000s of session lines would hit journald's rate limit."""
    container, stage, port, _ = booted
    imap = ImapLikeUpstream("127.0.0.2")
    mapping = "127.0.0.1:%d=%s:%d" % (port, UPSTREAM_NAME, imap.port)
    with open(os.path.join(stage, "reload.env"), "w") as f:
        f.write(settings(UPSTREAM_NAME, mapping))
    with open(os.path.join(stage, "bad.env"), "w") as f:
        f.write(settings(UPSTREAM_NAME, "25,465"))      # a typo: commas
    with open(os.path.join(stage, "watchdog.conf"), "w") as f:
        f.write("[Service]\nWatchdogSec=%ds\n" % RELOAD_WATCHDOG_SEC)
    container.sh("install -m 0644 /mnt/tailwart/reload.env /etc/default/tailwart-edge\n"
                 "install -D -m 0644 /mnt/tailwart/watchdog.conf "
                 "/etc/systemd/system/tailwart-edge.service.d/watchdog.conf\n"
                 "systemctl daemon-reload")
    clients, loop, figures = [], None, {}
    try:
        container.mark_journal()
        container.start("tailwart-edge")
        state = container.show("tailwart-edge", "MainPID", "ControlGroup", "WatchdogUSec")
        first, cgroup = int(state["MainPID"]), state["ControlGroup"]
        assert state["WatchdogUSec"] == "%ds" % RELOAD_WATCHDOG_SEC, state
        assert cgroup and unit_processes(container, cgroup) == {first}, cgroup
        idle = ImapClient(port)                 # IMAP IDLE: open through every reload below
        clients.append(idle)
        idle.relays_both_ways(imap, 1)
        assert holders_in(container, [first], port, idle.port) == {first}
        loop = ConnectLoop(port)
        eventually(lambda: len(loop.served) >= 20)

        # reload 1: a new main PID, the session stays with the old process
        started = time.monotonic()
        code, output, figures["reload 1 s"] = reload_unit(container)
        assert code == 0, (output, container.journal("tailwart-edge"))
        second = new_main_pid(container, first)
        figures["served during reload 1"] = loop.served_between(started, time.monotonic())
        assert second not in (0, first), container.journal("tailwart-edge")
        state = container.show("tailwart-edge", "ActiveState", "SubState")
        assert state == {"ActiveState": "active", "SubState": "running"}, state
        assert "Main PID: %d" % second in container.run(
            "systemctl", "status", "--no-pager", "tailwart-edge", check=False).stdout
        argv = container.run("cat", "/proc/%d/cmdline" % second).stdout.split("\0")
        assert argv[1:-1] == ["/usr/local/bin/tailwart_edge.py", "--settings",
                              "/etc/default/tailwart-edge"], argv
        status = container.process_status(second)
        assert status["Uid"].split()[0] != "0", status
        for field in ("CapEff", "CapPrm", "CapAmb"):     # can bind a port added by a reload
            assert int(status[field], 16) == CAP_NET_BIND_SERVICE, (field, status)
        assert unit_processes(container, cgroup) >= {first, second}
        idle.relays_both_ways(imap, 2)
        assert holders_in(container, [first, second], port, idle.port) == {first}
        fresh = ImapClient(port)                # a session opened now is the new process's
        clients.append(fresh)
        fresh.relays_both_ways(imap, 3)
        assert holders_in(container, [first, second], port, fresh.port) == {second}
        log = container.wait_journal("tailwart-edge", r"took over")
        assert re.search(r"^reload: pid=%d took over; draining \d+ sessions?" % second, log,
                         re.M), log
        assert re.search(r"^ready pid=%d version=\S+ " % second, log, re.M), log

        # the watchdog: fed by the new process (the old one, draining, sends nothing)
        time.sleep(RELOAD_WATCHDOG_SEC + 1)
        state = container.show("tailwart-edge", "ActiveState", "MainPID", "NRestarts")
        assert state == {"ActiveState": "active", "MainPID": str(second), "NRestarts": "0"}, (
            state, container.journal("tailwart-edge"))

        # reload 2: MainPID changes again; both older processes keep their sessions
        started = time.monotonic()
        code, output, figures["reload 2 s"] = reload_unit(container)
        assert code == 0, (output, container.journal("tailwart-edge"))
        third = new_main_pid(container, second)
        figures["served during reload 2"] = loop.served_between(started, time.monotonic())
        assert third not in (0, first, second), container.journal("tailwart-edge")
        assert container.show("tailwart-edge", "ActiveState")["ActiveState"] == "active"
        idle.relays_both_ways(imap, 4)
        fresh.relays_both_ways(imap, 5)
        pids = [first, second, third]
        assert holders_in(container, pids, port, idle.port) == {first}
        assert holders_in(container, pids, port, fresh.port) == {second}

        # their last sessions ended, the old processes exit; the new one alone feeds the
        # watchdog for longer than WatchdogSec
        fresh.close()
        idle.close()
        eventually(lambda: unit_processes(container, cgroup) == {third}, timeout=WAIT)
        time.sleep(RELOAD_WATCHDOG_SEC + 1)
        state = container.show("tailwart-edge", "ActiveState", "MainPID", "NRestarts")
        assert state == {"ActiveState": "active", "MainPID": str(third), "NRestarts": "0"}, (
            state, container.journal("tailwart-edge"))
        assert "Watchdog timeout" not in container.journal("tailwart-edge")

        # a bad settings file: the reload fails visibly, the relay serves on unchanged
        container.run("install", "-m", "0644", "/mnt/tailwart/bad.env",
                      "/etc/default/tailwart-edge")
        started = time.monotonic()
        code, output, figures["bad reload s"] = reload_unit(container)
        figures["served during bad reload"] = loop.served_between(started, time.monotonic())
        figures["bad reload output"] = output.strip()
        assert code != 0, output
        state = container.show("tailwart-edge", "ActiveState", "SubState", "MainPID")
        assert state == {"ActiveState": "active", "SubState": "running",
                         "MainPID": str(third)}, (state, container.journal("tailwart-edge"))
        failure = r"reload failed: .*separate\b.*\bwith spaces"
        log = container.wait_journal("tailwart-edge", failure)
        warnings = container.journal("tailwart-edge", "-p", "warning")
        assert re.search(failure, warnings), warnings           # logged as a warning
        status = container.run("systemctl", "status", "--no-pager", "-n", "20",
                               "tailwart-edge", check=False).stdout
        assert re.search(failure, status) and "Main PID: %d" % third in status, status
        figures["status line"] = re.search(r".*" + failure + r".*", status).group(0).strip()
        eventually(lambda: unit_processes(container, cgroup) == {third}, timeout=WAIT)
        late = ImapClient(port)
        clients.append(late)
        late.relays_both_ways(imap, 6)
        assert holders_in(container, [third], port, late.port) == {third}

        # reload 3, good settings again, `late` left open: stop must end old and new
        container.run("install", "-m", "0644", "/mnt/tailwart/reload.env",
                      "/etc/default/tailwart-edge")
        started = time.monotonic()
        code, output, figures["reload 3 s"] = reload_unit(container)
        assert code == 0, (output, container.journal("tailwart-edge"))
        fourth = new_main_pid(container, third)
        figures["served during reload 3"] = loop.served_between(started, time.monotonic())
        assert fourth not in (0, first, second, third)
        late.relays_both_ways(imap, 7)
        time.sleep(0.5)                         # the loop goes on a moment after the last reload
        loop.stop()
        failures = loop.failures
        figures.update(served=len(loop.served), failures=len(failures),
                       slowest="%.3f s" % loop.slowest, pids=(first, second, third, fourth))
        assert failures == [] and len(loop.served) >= 100, (failures[:10], figures)
        assert imap.errors == [], imap.errors

        before = unit_processes(container, cgroup)
        assert before >= {third, fourth}, before
        started = time.monotonic()
        stopper = threading.Thread(target=container.stop, args=("tailwart-edge",))
        stopper.start()
        ended = {}                              # when each process of the unit was gone
        while stopper.is_alive() or len(ended) < len(before):
            alive = relay_processes(container)
            for pid in before - alive:
                ended.setdefault(pid, round(time.monotonic() - started, 1))
            if time.monotonic() - started > 60:
                break
            time.sleep(0.2)
        stopper.join(WAIT)
        figures["stop s"] = round(time.monotonic() - started, 1)
        figures["gone after s"] = ended
        state = container.show("tailwart-edge", "ActiveState", "Result", "ExecMainStatus")
        assert state == {"ActiveState": "inactive", "Result": "success",
                         "ExecMainStatus": "0"}, (state, container.journal("tailwart-edge"))
        assert unit_processes(container, cgroup) in (None, set())
        assert relay_processes(container) == set()
        try:                                    # the stop closed it: EOF, or a reset
            assert late.sock.recv(1024) == b""
        except ConnectionResetError:
            pass
        log = container.journal("tailwart-edge")
        print(log)                      # the whole journal, should the assertion below fail
        # "Killing process N (n/a)": systemd reached a PID of the cgroup that had already ended
        # (its name unreadable): nothing was killed. Seen once under full-suite load since the
        # old process reaps the new one (before, the unreaped process showed as "(python3)").
        killed = [line for line in re.findall(r".*(?:SIGKILL|timed out|Killing process).*", log)
                  if not re.search(r"Killing process \d+ \(n/a\)", line)]
        assert not killed, (killed, log[-3000:])
        figures["stop log"] = log[log.rindex("reload: pid=%d took over" % fourth):]
        print("\nreload figures: %r" % (figures,))
    finally:
        if loop is not None:
            loop.stop()
        for client in clients:
            client.close()
        container.sh("systemctl stop tailwart-edge || true; systemctl reset-failed\n"
                     "rm -f /etc/systemd/system/tailwart-edge.service.d/watchdog.conf\n"
                     "install -m 0644 /mnt/tailwart/tailwart-edge.env /etc/default/tailwart-edge\n"
                     "systemctl daemon-reload", check=False, timeout=60)
        imap.close()


def test_systemd_nspawn_socket_activation_from_readme_needs_no_capability(booted):
    container, stage, port, upstream = booted
    socket_unit = readme_block(SOCKET_UNIT)
    drop_in = readme_block(SOCKET_DROP_IN)
    # the README's socket with its ListenStream= lines narrowed to the one test port
    socket_unit = re.sub(r"(?m)^ListenStream=.*\n", "", socket_unit).replace(
        "[Socket]\n", "[Socket]\nListenStream=127.0.0.1:%d\n" % port)
    with open(os.path.join(stage, "tailwart-edge.socket"), "w") as f:
        f.write(socket_unit)
    with open(os.path.join(stage, "socket-activation.conf"), "w") as f:
        f.write(drop_in)
    with open(os.path.join(stage, "socket.env"), "w") as f:
        f.write("UPSTREAM=%s\nPORTS=127.0.0.1:%d\n" % (UPSTREAM_NAME, port))  # OPTIONS: default
    container.sh("install -m 0644 /mnt/tailwart/tailwart-edge.socket /etc/systemd/system/\n"
                 "install -D -m 0644 /mnt/tailwart/socket-activation.conf "
                 "/etc/systemd/system/tailwart-edge.service.d/socket-activation.conf\n"
                 "install -m 0644 /mnt/tailwart/socket.env /etc/default/tailwart-edge\n"
                 "systemctl daemon-reload")
    container.mark_journal()
    container.start("tailwart-edge.socket")
    try:
        assert container.show("tailwart-edge", "ActiveState")["ActiveState"] == "inactive"
        # the first client starts the service; it waits in the socket's backlog meanwhile
        payload = os.urandom(256 * 1024)
        _, echoed = echo_through(port, payload)
        assert echoed == payload, "%d of %d bytes came back" % (len(echoed), len(payload))
        state = container.show("tailwart-edge", "ActiveState", "MainPID")
        assert state["ActiveState"] == "active", container.journal("tailwart-edge")
        status = container.process_status(state["MainPID"])
        assert status["Uid"].split()[0] != "0", status
        for field in ("CapEff", "CapPrm", "CapAmb"):
            assert int(status[field], 16) == 0, (field, status)
        log = container.wait_journal("tailwart-edge", r"session client=.* up=%d " % len(payload))
        assert re.search(r"listen addr=127\.0\.0\.1:%d .*\(from systemd\)" % port, log), log
        assert "cannot listen" not in log, log
        container.stop("tailwart-edge.socket", "tailwart-edge.service")
        state = container.show("tailwart-edge", "ActiveState", "Result", "ExecMainStatus")
        assert state == {"ActiveState": "inactive", "Result": "success",
                         "ExecMainStatus": "0"}, (state, container.journal("tailwart-edge"))
    finally:
        container.sh("systemctl stop tailwart-edge.socket tailwart-edge.service || true\n"
                     "rm -rf /etc/systemd/system/tailwart-edge.socket "
                     "/etc/systemd/system/tailwart-edge.service.d\n"
                     "install -m 0644 /mnt/tailwart/tailwart-edge.env /etc/default/tailwart-edge\n"
                     "systemctl daemon-reload; systemctl reset-failed", check=False, timeout=60)


# -- --install: one command, from the script alone ----------------------------------------------

class CheckedImapUpstream(ImapLikeUpstream):
    """ImapLikeUpstream that also answers the doctor: a PROXY v2 LOCAL header (its own
    connection), the greeting, then an echo, as for any client."""

    def echo(self, conn):
        conn.settimeout(self.timeout)
        try:
            with conn:
                head = recv_exactly(conn, 16)
                body = recv_exactly(conn, struct.unpack("!H", head[14:16])[0])
                if head[12] == 0x21:
                    self.headers.append(body[:12])
                    self.conns[struct.unpack("!H", body[8:10])[0]] = conn
                conn.sendall(self.greeting)
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
        except Exception as e:
            if self.running:
                self.errors.append(repr(e))


def install_in(container, script, *words):
    """`python3 SCRIPT --install WORDS` in the container: (exit code, stdout + stderr)."""
    result = container.run("python3", script, "--install", *words, check=False, timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_systemd_nspawn_install_relays_upgrades_without_a_gap_and_uninstalls(booted):
    """Issue 20: only the script is copied in. `--install MAPPING ...` writes the script, the
    unit (the repository's file) and the settings, checks and starts the service; the README's
    doctor line run as a user without the capability passes; `--install` again with a changed
    script is a reload (an IMAP session stays, no client refused); `--uninstall` leaves no
    unit and keeps the settings; a failed check installs and enables nothing."""
    container, stage, port, _ = booted
    imap = CheckedImapUpstream("127.0.0.2")
    closed = free_port("127.0.0.2")             # nothing listens there: the check fails
    os.makedirs(os.path.join(stage, "v1"))
    os.makedirs(os.path.join(stage, "v2"))
    shutil.copy(SCRIPT, os.path.join(stage, "v1", "tailwart_edge.py"))
    with open(SCRIPT) as f, open(os.path.join(stage, "v2", "tailwart_edge.py"), "w") as g:
        g.write(f.read() + "# upgraded\n")
    mapping = "127.0.0.1:%d/imap=%s:%d" % (port, UPSTREAM_NAME, imap.port)
    options = ["--connect-timeout", "5", "--idle-timeout", "600", "-q"]
    container.sh("systemctl stop tailwart-edge; systemctl reset-failed\n"
                 "rm -f /usr/local/bin/tailwart_edge.py /etc/default/tailwart-edge "
                 "/etc/systemd/system/tailwart-edge.service\nsystemctl daemon-reload")
    clients, loop = [], None
    try:
        container.mark_journal()
        code, output = install_in(container, "/mnt/tailwart/v1/tailwart_edge.py", mapping,
                                  *options)
        assert code == 0, (output, container.journal("tailwart-edge"))
        assert "the unit runs /usr/bin/python3 (Python 3." in output, output
        assert "verdict: ok" in output and "journalctl -t tailwart-edge" in output, output
        state = container.show("tailwart-edge", "ActiveState", "UnitFileState", "MainPID")
        assert state["ActiveState"] == "active" and state["UnitFileState"] == "enabled", state
        first = int(state["MainPID"])
        assert container.run("cat", "/etc/systemd/system/tailwart-edge.service").stdout == \
            open(UNIT).read()
        modes = container.run("stat", "-c", "%a %U %n", "/usr/local/bin/tailwart_edge.py",
                              "/etc/systemd/system/tailwart-edge.service",
                              "/etc/default/tailwart-edge").stdout.split("\n")
        assert modes[:3] == ["755 root /usr/local/bin/tailwart_edge.py",
                             "644 root /etc/systemd/system/tailwart-edge.service",
                             "644 root /etc/default/tailwart-edge"], modes
        settings_written = container.run("cat", "/etc/default/tailwart-edge").stdout
        assert "PORTS=%s\n" % mapping in settings_written, settings_written
        # the README's doctor line, as a user who may not bind port < 1024: no FAIL
        doctor = container.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "python3", "/usr/local/bin/tailwart_edge.py", "--check",
                               "--settings", "/etc/default/tailwart-edge", check=False)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert re.search(r"^warn listen 127\.0\.0\.1:%d not checked: .*CAP_NET_BIND_SERVICE"
                         % port, doctor.stdout, re.M), doctor.stdout

        # relaying: an IMAP session, and clients one after another from now on
        idle = ImapClient(port)
        clients.append(idle)
        idle.relays_both_ways(imap, 1)
        loop = ConnectLoop(port)
        eventually(lambda: len(loop.served) >= 10)

        # the upgrade: a changed script, --install alone keeps the settings; a reload, no gap
        code, output = install_in(container, "/mnt/tailwart/v2/tailwart_edge.py")
        assert code == 0, (output, container.journal("tailwart-edge"))
        assert "wrote /usr/local/bin/tailwart_edge.py" in output, output
        assert "wrote /etc/default" not in output and "systemctl reload" in output, output
        second = new_main_pid(container, first)
        assert second not in (0, first), container.journal("tailwart-edge")
        assert container.run("tail", "-n", "1", "/usr/local/bin/tailwart_edge.py").stdout == \
            "# upgraded\n"
        idle.relays_both_ways(imap, 2)
        served = len(loop.served)
        eventually(lambda: len(loop.served) >= served + 10)
        loop.stop()
        assert loop.failures == [], loop.failures[:5]
        idle.close()

        # other mappings without --replace-settings: the difference is shown, nothing changes
        other = "127.0.0.1:%d/imap=%s:%d" % (port, UPSTREAM_NAME, closed)
        code, output = install_in(container, "/mnt/tailwart/v2/tailwart_edge.py", other)
        assert code == 1 and "\n-PORTS=%s\n" % mapping in output, output
        assert "\n+PORTS=%s\n" % other in output and "nothing was changed" in output, output
        assert container.run("cat", "/etc/default/tailwart-edge").stdout == settings_written

        # --uninstall: stopped, disabled, the unit and the script gone, the settings kept
        result = container.run("python3", "/mnt/tailwart/v2/tailwart_edge.py", "--uninstall",
                               timeout=90)
        assert "kept /etc/default/tailwart-edge" in result.stdout, result.stdout
        gone = container.run("ls", "/etc/systemd/system/tailwart-edge.service",
                             "/usr/local/bin/tailwart_edge.py", check=False)
        assert gone.returncode != 0 and gone.stdout == "", gone
        state = container.show("tailwart-edge", "LoadState", "ActiveState")
        assert state == {"LoadState": "not-found", "ActiveState": "inactive"}, state
        assert relay_processes(container) == set()
        assert container.run("cat", "/etc/default/tailwart-edge").stdout == settings_written

        # a check that fails (the upstream refuses): nothing installed, nothing enabled
        code, output = install_in(container, "/mnt/tailwart/v2/tailwart_edge.py", other,
                                  "--replace-settings", *options)
        assert code == 1, output
        assert re.search(r"^FAIL connect .*refused", output, re.M), output
        assert "the check failed (above), so nothing was installed or enabled" in output
        gone = container.run("ls", "/etc/systemd/system/tailwart-edge.service",
                             "/usr/local/bin/tailwart_edge.py", check=False)
        assert gone.returncode != 0 and gone.stdout == "", gone
        assert container.show("tailwart-edge", "LoadState")["LoadState"] == "not-found"
        assert container.run("systemctl", "is-enabled", "tailwart-edge",
                             check=False).returncode != 0
        assert container.run("cat", "/etc/default/tailwart-edge").stdout == settings_written
        assert imap.errors == [], imap.errors
    finally:
        if loop is not None:
            loop.stop()
        for client in clients:
            client.close()
        # back to the module's set-up, for any test after this one
        container.sh("systemctl disable --now tailwart-edge || true; systemctl reset-failed\n"
                     "install -m 0755 /mnt/tailwart/tailwart_edge.py /usr/local/bin/\n"
                     "install -m 0644 /mnt/tailwart/tailwart-edge.service /etc/systemd/system/\n"
                     "install -m 0644 /mnt/tailwart/tailwart-edge.env /etc/default/tailwart-edge\n"
                     "systemctl daemon-reload", check=False, timeout=90)
        imap.close()


# ----------------------------------------------------------------------------------------------
# Unattended for months: faults found running as a hostile internet and a flaky host would
# (issue 10). Each test failed on the code before its fix. `-k abuse` is the heavy group.
# ----------------------------------------------------------------------------------------------

class FakeServer:
    """Just enough of a Server for Timers: a clock and an error hook."""

    def __init__(self):
        self.now = time.monotonic()
        self.errors = []

    def handle_error(self, data):
        self.errors.append(sys.exc_info()[1])


def test_periodic_timer_keeps_running_after_its_callback_raises():
    """Fault 10: the sweep (every idle and connect timeout) rescheduled itself on its last
    line, so one exception inside it switched every timeout off for good."""
    server = FakeServer()
    timers = edge.Timers(server)
    calls = []

    def job():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    timers.every(0.01, job)
    deadline = time.monotonic() + WAIT
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(timers.run_due() or 0)
    assert len(calls) >= 3 and [str(e) for e in server.errors] == ["boom"]


def test_internal_error_is_logged_with_file_and_line_without_verbose(capfd):
    """Fault 10: an internal error said only `internal error: ValueError: boom`; where it
    happened was logged at debug level, invisible without -v."""
    try:
        raise ValueError("boom")
    except ValueError:
        edge.Server.handle_error(None, None)
    err = capfd.readouterr().err
    assert re.search(r"error internal error: ValueError: boom at test_tailwart_edge\.py:\d+ "
                     r"in test_internal_error_is_logged_with_file_and_line_without_verbose\(\)",
                     err), err


def test_sd_notify_uses_one_socket_for_every_message(notify_socket, monkeypatch):
    """Fault 10: each sd_notify message opened a socket of its own, so a watchdog ping near
    the descriptor limit could fail with EMFILE, and systemd would kill a healthy relay."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    notifier = edge.Notifier(None)
    opened = []
    real_socket = socket.socket
    monkeypatch.setattr(edge.socket, "socket", lambda *a: opened.append(a) or real_socket(*a))
    for i in range(20):
        assert notifier.send("STATUS=%d" % i)
        assert notify_socket.next(WAIT) == {"STATUS": str(i)}
    assert opened == []


# -- urgent bytes, a blocked or closed stderr, stray signals, wake-up overflow, half-close;
#    then the opt-in abuse run (`-k abuse`) --------------------------------------------------

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat"),
                                reason="reads CPU time and signal masks from /proc (Linux)")
needs_splice = pytest.mark.skipif(not (sys.platform.startswith("linux")
                                       and hasattr(os, "splice")),
                                  reason="splice needs Linux and Python >= 3.10")
TROUBLE = re.compile(r"Traceback|Exception ignored")     # never on our stderr, whatever happens


def spin_seconds(pid, settle=0.5, window=2.0):
    """CPU seconds a process spends over `window` seconds once `settle` has passed."""
    time.sleep(settle)
    before = cpu_seconds(pid)
    time.sleep(window)
    return cpu_seconds(pid) - before


def settle(predicate, timeout):
    """Waits up to `timeout` for predicate() (no assertion: the caller reports the figures)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def random_bytes(rng, n):
    """n bytes from a seeded random.Random: the same run after run."""
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""


def trouble(text):
    """The lines of stderr that show a traceback or an ignored exception."""
    return [line for line in text.splitlines() if TROUBLE.search(line)]


def send_with_urgent_bytes(sock, parts):
    """Sends each part in order; a part that is an int N is the one byte b"!" sent MSG_OOB
    (TCP urgent data) N times in a row (1 in practice). Returns what the peer must receive."""
    sent = bytearray()
    for part in parts:
        if isinstance(part, int):
            for _ in range(part):
                sock.send(b"!", socket.MSG_OOB)
                sent += b"!"
        else:
            sock.sendall(part)
            sent += part
    return bytes(sent)


class Collector:
    """Reads a socket to EOF in a thread; `data` grows as bytes come (for progress checks)."""

    def __init__(self, sock):
        self.sock = sock
        self.data = bytearray()
        self.error = None
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.data += chunk
        except Exception as e:
            self.error = e
        finally:
            self.done.set()

    def wait_for_length(self, n, timeout):
        """Waits up to `timeout` for n bytes (no assertion: the caller checks the bytes)."""
        deadline = time.monotonic() + timeout
        while len(self.data) < n and not self.done.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)


class UnreadEdge(Edge):
    """The script with stderr to a pipe that nobody reads until drain() (a stalled journald,
    a `| less` left open). The pipe is shrunk to `pipe_size` so a few dozen lines fill it.
    (pipe_size=None: the default, 64 KiB on Linux.) Ready once its port accepts (one session:
    the probe), as no `ready` line can be read.
    closed=True starts it with stderr closed instead (`2>&-`)."""

    def __init__(self, *args, port, pipe_size=4096, closed=False, preexec_fn=None,
                 timeout=WAIT):
        self.lines = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        if closed:
            self.args = ["/bin/sh", "-c", 'exec "$0" "$@" 2>&-', PYTHON, SCRIPT] + list(args)
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, preexec_fn=preexec_fn)
            self.proc.stderr = None
        else:
            self.args = [PYTHON, SCRIPT] + list(args)
            rfd, wfd = os.pipe()
            try:
                if pipe_size:
                    fcntl.fcntl(wfd, getattr(fcntl, "F_SETPIPE_SZ", 1031), pipe_size)
            except OSError:
                pass                    # not Linux: the default pipe fills too, later
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=wfd,
                                         preexec_fn=preexec_fn)
            os.close(wfd)
            self.proc.stderr = open(rfd, "r", errors="replace")
        try:
            wait_accepting(self.proc, port, timeout)
        except BaseException:
            self.kill()
            raise

    def drain(self):
        """Start reading stderr: the lines go to `lines`, wait_for() and output() work."""
        if self.proc.stderr is not None and self.reader.ident is None:
            self.reader.start()

    def wait(self, timeout=WAIT):
        code = self.proc.wait(timeout)
        if self.reader.is_alive():
            self.reader.join(timeout)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.reader.is_alive():
            self.reader.join(WAIT)
        elif self.proc.stderr is not None and not self.reader.ident:
            self.proc.stderr.close()


def wait_accepting(proc, port, timeout=WAIT, host="127.0.0.1"):
    """Polls until the port accepts a connection (closed at once), or fails if proc exits."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise AssertionError("%s exited %d before it accepted on port %d"
                                 % (" ".join(proc.args), code, port))
        try:
            connect((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError("port %d not accepting after %gs" % (port, timeout))
            time.sleep(0.05)


def closed_by_edge(port, timeout=5):
    """Connects and reads to EOF (for sessions the edge ends itself); b"" or an error text."""
    try:
        with connect(("127.0.0.1", port), timeout=timeout) as c:
            return recv_all(c)
    except (OSError, EOFError) as e:
        return "%s: %s" % (type(e).__name__, e)


def exchange(port, payload, timeout=5):
    """One short session: send, FIN, read to EOF; what came back, or an error text."""
    try:
        with connect(("127.0.0.1", port), timeout=timeout) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            return recv_all(c)
    except (OSError, EOFError) as e:
        return "%s: %s" % (type(e).__name__, e)


# -- fault 1: urgent data ----------------------------------------------------------------------

URGENT_BEFORE, URGENT_AFTER = 300000, 100000


def urgent_byte_run(relay, direction):
    """300,000 bytes, one urgent b"!", 100,000 bytes, sent through the edge one way
    ("up": client -> upstream, "down": upstream -> client). Returns (what arrived by the time
    the sender's FIN came through, CPU seconds the edge spent in 2 s once the bytes were out,
    the session's log line, what was sent)."""
    rng = random.Random(1)
    before, after = random_bytes(rng, URGENT_BEFORE), random_bytes(rng, URGENT_AFTER)
    box = {}
    sender_go = threading.Event()

    def upstream(conn):
        read_proxy_header(conn)
        if direction == "up":
            box["collector"] = Collector(conn)
            box["collector"].done.wait(WAIT * 2)
        else:
            sender_go.wait(WAIT)
            conn.sendall(before)
            box["first"].wait_for_length(URGENT_BEFORE, WAIT)
            send_with_urgent_bytes(conn, [1, after])
            box["sent"].set()
            box["fin"].wait(WAIT * 2)
            conn.shutdown(socket.SHUT_WR)
            box["first"].done.wait(WAIT)

    port = free_port()
    with Upstream(upstream) as up, \
            Edge("--relay", relay, "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            if direction == "up":
                c.sendall(before)
                eventually(lambda: "collector" in box)
                far = box["collector"]
                far.wait_for_length(URGENT_BEFORE, WAIT)    # the direction has turned to splice
                send_with_urgent_bytes(c, [1, after])
            else:
                far = box["first"] = Collector(c)
                box["sent"], box["fin"] = threading.Event(), threading.Event()
                sender_go.set()
                assert box["sent"].wait(WAIT)
            far.wait_for_length(URGENT_BEFORE + 1 + URGENT_AFTER, 5)
            spent = spin_seconds(proxy.pid)
            if direction == "up":
                c.shutdown(socket.SHUT_WR)
            else:
                box["fin"].set()
            assert far.done.wait(WAIT), "the FIN never came through"
        line = proxy.wait_for(r"session client=")
        assert not up.errors and far.error is None, (up.errors, far.error)
        bad = trouble(proxy.output())
        assert not bad, bad[:5]
    return bytes(far.data), spent, line, before + b"!" + after


def urgent_report(got, want, spent):
    mark = got.find(b"!", URGENT_BEFORE - 1, URGENT_BEFORE + 1)
    return ("%d of %d bytes delivered, b'!' at offset %s, %.2f CPU s in 2 s"
            % (len(got), len(want), mark if mark >= 0 else "none", spent))


@needs_proc
@needs_splice
@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("relay", ["splice", "auto"])
def test_urgent_byte_in_splice_mode_is_relayed_inline_without_spinning(relay, direction):
    """Fault 1: once a direction turned to splice, one MSG_OOB byte stopped it for good:
    splice(2) stops at the urgent mark, epoll says readable forever, the loop spins at 100 %
    CPU and the bytes after the mark are lost at FIN."""
    got, spent, line, want = urgent_byte_run(relay, direction)
    exact = got == want
    assert exact and spent < 0.5, urgent_report(got, want, spent)
    assert ("up=%d " if direction == "up" else "down=%d ") % len(want) in line, line


@needs_proc
@pytest.mark.parametrize("direction", ["up", "down"])
def test_urgent_byte_in_copy_mode_is_relayed_inline(direction):
    """Fault 1, copy mode: without SO_OOBINLINE, recv() takes the urgent byte out of the stream,
    so the far side got 400,000 of the 400,001 bytes sent."""
    got, spent, line, want = urgent_byte_run("copy", direction)
    exact = got == want
    assert exact and spent < 0.5, urgent_report(got, want, spent)


# -- fault 2: a stderr that blocks, or is closed -----------------------------------------------

def test_a_blocked_stderr_does_not_stop_relaying():
    """Fault 2: with stderr a pipe nobody reads, once it was full (64 KiB, here 4 KiB) the loop
    blocked in write(2): no accepts, no relaying, no timers."""
    port = free_port()
    served = 0
    with Upstream(header_echo) as up, \
            UnreadEdge("127.0.0.1:%d=%s" % (port, up.address), port=port) as proxy:
        for i in range(300):            # ~150 bytes of log each: 10 times what the pipe holds
            payload = b"mail %03d\r\n" % i
            got = exchange(port, payload)
            assert got == payload, "session %d of 300: %r (%d served)" % (i, got, served)
            served += 1
        assert proxy.proc.poll() is None


def test_sigterm_stops_the_edge_while_stderr_is_blocked():
    """Fault 2: blocked in write(2) on a full stderr, the edge could not act on SIGTERM."""
    port = free_port()
    with Upstream(header_echo) as up, \
            UnreadEdge("127.0.0.1:%d=%s" % (port, up.address), port=port) as proxy:
        for _ in range(100):            # enough log lines to fill the pipe many times over
            connect(("127.0.0.1", port)).close()
        time.sleep(1)
        proxy.signal(signal.SIGTERM)
        try:
            code = proxy.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            code = "still running %ds after SIGTERM" % WAIT
        assert code == 0


def test_a_closed_stderr_still_starts_relays_and_exits_0():
    """Fault 2: started with stderr closed (`2>&-`), the edge exited 1 at start, silently."""
    port = free_port()
    with Upstream(header_echo) as up, \
            UnreadEdge("127.0.0.1:%d=%s" % (port, up.address), port=port, closed=True) as proxy:
        assert exchange(port, b"no stderr\r\n") == b"no stderr\r\n"
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0


def test_log_lines_dropped_while_stderr_was_blocked_are_counted_once_it_drains():
    """Fault 2: while stderr is blocked, lines beyond the in-memory queue are dropped, not
    waited for, and once it drains a warning says how many. (The old code stalled instead:
    after a few dozen lines no refused client was closed any more.)"""
    port, dead = free_port(), free_port()       # nothing listens on `dead`: every session fails
    count = 8000                                # ~1.6 MB of log lines, in a few seconds
    with UnreadEdge("127.0.0.1:%d=127.0.0.1:%d" % (port, dead), port=port) as proxy:
        for i in range(count):
            got = closed_by_edge(port)
            assert got == b"", "client %d of %d: %r (the edge never closed it)" % (i, count, got)
        proxy.drain()
        try:        # the queue is written out, then a word on what was dropped (if anything)
            proxy.wait_for(r"lines dropped while stderr was blocked", timeout=5)
        except AssertionError:
            pass
        # one line more once stderr flows again, from an address of its own (among 8,000
        # sessions from 127.0.0.1 its port would not be unique)
        with connect(("127.0.0.1", port), source="127.0.0.99") as c:
            assert recv_all(c) == b""
        proxy.wait_for(r"session client=127\.0\.0\.99:")
        produced = count + 2                    # the readiness probe, the sessions, the last
        if proxy.output().count("session client=") < produced:
            proxy.wait_for(r"lines dropped while stderr was blocked")
        text = proxy.output()
        received = text.count("session client=")
        dropped = sum(int(n) for n in re.findall(
            r"\bwarning\b.*\blog: (\d+) lines dropped while stderr was blocked", text))
        assert received + dropped >= produced, (received, dropped, produced)
        bad = trouble(text)
        assert not bad, bad[:5]
        assert proxy.stop() == 0


# -- fault 4: SIGHUP and early signals ---------------------------------------------------------

def handled_signals(pid):
    """The signals a process catches, ignores or blocks, from /proc/PID/status."""
    mask = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("SigBlk", "SigIgn", "SigCgt"):
                mask |= int(value, 16)
    return {number for number in range(1, 65) if mask >> (number - 1) & 1}


def default_signals():
    """preexec_fn: HUP and USR1 at their default action (terminate) and not blocked, whatever
    the test runner had (nohup ignores HUP), so only the script can make them harmless."""
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGUSR1})


STORM = """
import os, sys, time
pid, seconds, most, gap = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
signums = [int(n) for n in sys.argv[5:]]
sent, deadline = 0, time.monotonic() + seconds
def zombie():
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rpartition(")")[2].split()[0] in "ZX"
try:
    while sent < most and time.monotonic() < deadline:
        os.kill(pid, signums[sent % len(signums)])
        sent += 1
        if gap:
            time.sleep(gap)
        if sent % 1000 == 0 and zombie():
            break
except (ProcessLookupError, FileNotFoundError):
    pass
print(sent)
"""


def signal_storm(pid, signums, seconds=1.0, most=500000, gap=0.0):
    """Sends the signals in turn to pid (as fast as a process can, or `gap` seconds apart) for
    `seconds`, at most `most` of them, from a helper process, off this one's GIL. Returns how
    many went."""
    out = subprocess.run([sys.executable, "-c", STORM, str(pid), str(seconds), str(most),
                          str(gap)] + [str(int(s)) for s in signums], stdout=subprocess.PIPE,
                         timeout=seconds + WAIT, check=True, universal_newlines=True).stdout
    return int(out)


class StormedEdge(Edge):
    """The script, sent HUP and USR1 in turn (every `gap` seconds, at most `most` of them) from
    the moment it has shown it is running its own code (it catches, ignores or blocks both
    signals, or has written a line) until `after` seconds past `ready`. Unlike Edge, the
    constructor returns when it is ready or has exited: `sent` says how many signals went."""

    def __init__(self, *args, gap=0.001, most=5000, after=0.3, timeout=WAIT):
        self.args = [PYTHON, SCRIPT] + list(args)
        self.lines = []
        self.sent = 0
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     universal_newlines=True, preexec_fn=default_signals,
                                     start_new_session=True)     # kill() ends reloads' too
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self._storm(gap, most, after, time.monotonic() + timeout)
        except BaseException:
            self.kill()
            raise

    def _storm(self, gap, most, after, deadline):
        pid, wanted = self.proc.pid, {signal.SIGHUP, signal.SIGUSR1}
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                if wanted <= handled_signals(pid) or self.lines:
                    break
            except OSError:
                break
            time.sleep(0.0005)
        ready_at = None
        while self.sent < most and self.proc.poll() is None and time.monotonic() < deadline:
            try:
                os.kill(pid, signal.SIGUSR1 if self.sent % 2 == 0 else signal.SIGHUP)
            except ProcessLookupError:
                break
            self.sent += 1
            if ready_at is None and any(line and re.search(r"\bready\b", line)
                                        for line in self.lines):
                ready_at = time.monotonic()
            if ready_at is not None and time.monotonic() - ready_at > after:
                break
            time.sleep(gap)
        if self.proc.poll() is None and ready_at is None:
            self.wait_for(r"\bready\b", max(0.1, deadline - time.monotonic()))


def test_sighup_is_a_reload_that_cuts_no_session():
    """Fault 4: SIGHUP (an SSH session closing on a hand-started relay) killed the edge and
    every session with it; under systemd death by HUP is a clean exit, so no restart."""
    port = free_port()
    with Upstream(header_echo) as up, Edge("127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"before")
            assert recv_exactly(c, 6) == b"before"
            mark = proxy.mark()
            proxy.signal(signal.SIGHUP)
            try:
                proxy.wait_for(r"\bnotice reload\b", start=mark)
            except AssertionError:
                try:
                    code = proxy.proc.wait(2)
                except subprocess.TimeoutExpired:
                    code = None
                pytest.fail("no reload line after SIGHUP; exit code %r" % code)
            c.sendall(b"after the reload")          # the open session still relays
            assert recv_exactly(c, 16) == b"after the reload"
            assert round_trip(port, b"new") == b"new"   # and new ones are served
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b""
        assert "end=client-fin" in proxy.wait_for(r"session client=.*up=22 ")


@needs_proc
def test_hup_and_usr1_during_startup_do_not_kill_the_edge():
    """Fault 4: a HUP or USR1 in the first ~50 ms of start-up (before the loop installed its
    handlers) killed the edge."""
    port = free_port()
    with Upstream(header_echo) as up, \
            StormedEdge("127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        got = exchange(port, b"up")
        assert got == b"up", "%r; exit code %r after %d signals in start-up" % (
            got, proxy.proc.poll(), proxy.sent)
        bad = trouble(proxy.output())
        assert not bad, bad[:5]


# -- fault 11: the wake-up socket ---------------------------------------------------------------

UNRESOLVABLE = ",".join("tailwart-nx%d.invalid:25" % i for i in range(8))


@needs_proc
def test_a_usr1_storm_with_lookups_finishing_never_prints_exception_ignored():
    """Fault 11: signals and resolver answers share one wake-up socketpair; a burst of them
    filled it and Python printed `Exception ignored when trying to write to the signal wakeup
    fd` tracebacks on stderr."""
    port, named = free_port(), free_port()
    with Upstream(header_echo) as up, \
            Edge("--connect-timeout", "2", "127.0.0.1:%d=%s" % (port, up.address),
                 "127.0.0.1:%d=%s" % (named, UNRESOLVABLE)) as proxy:
        burst = []                  # 50 sessions, each trying 8 names that never resolve
        try:
            for _ in range(50):
                s = socket.socket()
                burst.append(s)
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", named))
            sent = signal_storm(proxy.pid, [signal.SIGUSR1], seconds=1.5)
        finally:
            for s in burst:
                s.close()
        mark = proxy.mark()
        proxy.signal(signal.SIGUSR1)
        try:
            answered = bool(proxy.wait_for(r"\bstats ", start=mark))
        except AssertionError:
            answered = False            # the old code could deadlock on its stderr lock here
        served = exchange(port, b"still here")
        bad = trouble(proxy.output())
        assert not bad, "%d signals: %d 'Exception ignored' blocks (e.g. %s); USR1 after it " \
            "answered: %s" % (sent, proxy.output().count("Exception ignored"), bad[:3], answered)
        assert answered and served == b"still here", (answered, served)


# -- fault 12: half-closed sessions -------------------------------------------------------------

def test_half_close_timeout_ends_a_session_whose_upstream_never_closes():
    """Fault 12: after the client's FIN, an upstream that stays silent and never closes held
    the session for the whole idle timeout (an hour)."""
    release = threading.Event()

    def upstream(conn):
        read_proxy_header(conn)
        conn.sendall(b"220 hello\r\n")
        assert recv_all(conn) == b"QUIT\r\n"    # the client's FIN came through
        release.wait(WAIT * 2)                  # then silence, the socket left open

    port = free_port()
    try:
        with Upstream(upstream) as up, \
                Edge("--half-close-timeout", "1", "127.0.0.1:%d=%s" % (port, up.address)) \
                as proxy:
            with connect(("127.0.0.1", port)) as c:
                assert recv_exactly(c, 11) == b"220 hello\r\n"
                c.sendall(b"QUIT\r\n")
                c.shutdown(socket.SHUT_WR)
                assert recv_all(c) == b""       # closed by the edge within WAIT
            assert "end=half-close-timeout" in proxy.wait_for(r"session client=")
    finally:
        release.set()


def test_half_close_timeout_ends_a_session_whose_client_never_closes():
    """Fault 12: after the upstream's FIN, a client that stays silent and never closes held
    the session for the whole idle timeout (an hour)."""
    closed = []

    def upstream(conn):
        read_proxy_header(conn)
        conn.sendall(b"221 bye\r\n")
        conn.shutdown(socket.SHUT_WR)
        closed.append(recv_all(conn))           # EOF once the edge ends the session

    port = free_port()
    with Upstream(upstream) as up, \
            Edge("--half-close-timeout", "1", "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            assert recv_all(c) == b"221 bye\r\n"    # the upstream's FIN came through
            line = proxy.wait_for(r"session client=")     # we never close: the edge does
        assert "end=half-close-timeout" in line
        eventually(lambda: closed)
        assert closed == [b""]


# ----------------------------------------------------------------------------------------------
# Abuse run (`-k abuse`, once in CI): a hostile internet on loopback, each part bounded in count
# and time. Whatever comes, no session is lost or cut, no traceback, and the CPU is idle after.
# ----------------------------------------------------------------------------------------------

def stream_with_urgent_bytes(rng, urgent):
    """Parts for send_with_urgent_bytes: bulk runs (some far over 64 KiB, so the direction
    turns to splice) with `urgent` single urgent bytes between them, one at the very start."""
    parts = [1]
    for _ in range(urgent - 1):
        parts += [random_bytes(rng, rng.choice((rng.randint(1, 2000),
                                                rng.randint(70000, 300000)))), 1]
    parts.append(random_bytes(rng, rng.randint(70000, 200000)))
    return parts


@needs_proc
def test_abuse_urgent_bytes_mid_stream_both_directions():
    """8 sessions at once send random bulk both ways with urgent bytes at random points,
    before and after each direction turned to splice: every stream arrives byte for byte,
    urgent bytes inline, and the edge is idle afterwards (fault 1)."""
    count, urgent = 8, 5
    seen_upstream = {}                  # client port -> (bytes the upstream got, bytes it sent)

    def upstream(conn):
        header = read_proxy_header(conn)
        client_port = struct.unpack("!H", header[-4:-2])[0]
        far = Collector(conn)
        sent = send_with_urgent_bytes(conn, stream_with_urgent_bytes(
            random.Random(client_port), urgent))
        conn.shutdown(socket.SHUT_WR)
        far.done.wait(40)
        seen_upstream[client_port] = (bytes(far.data), sent)

    results, failures = {}, []

    def client(port, seed):
        try:
            with connect(("127.0.0.1", port), timeout=40) as c:
                far = Collector(c)
                sent = send_with_urgent_bytes(c, stream_with_urgent_bytes(
                    random.Random(seed), urgent))
                c.shutdown(socket.SHUT_WR)
                far.done.wait(40)
                results[c.getsockname()[1]] = (sent, bytes(far.data))
        except Exception as e:
            failures.append(e)

    port = free_port()
    with Upstream(upstream) as up, Edge("127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        clients = [threading.Thread(target=client, args=(port, seed)) for seed in range(count)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(45)
        settle(lambda: len(seen_upstream) >= len(results), timeout=5)
        exact = [p for p, (sent, got) in results.items() if p in seen_upstream
                 and seen_upstream[p][0] == sent and got == seen_upstream[p][1]]
        short = sum(len(sent) - len(seen_upstream[p][0]) + len(seen_upstream[p][1]) - len(got)
                    for p, (sent, got) in results.items() if p in seen_upstream)
        spent = spin_seconds(proxy.pid)
        assert len(exact) == count and spent < 0.5, (
            "%d of %d sessions exact, %d bytes missing, %.2f CPU s in 2 s after"
            % (len(exact), count, short, spent))
        assert not failures and not up.errors, (failures, up.errors)
        bad = trouble(proxy.output())
        assert not bad, bad[:5]


def nofile(limit):
    """preexec_fn: `limit` descriptors, soft and hard (the edge cannot raise it)."""
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


LINGER_RST = struct.pack("ii", 1, 0)     # SO_LINGER on, 0 s: close() sends a reset


def reset(sock):
    """Close with SO_LINGER 0: the peer gets a TCP reset, not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass
    sock.close()



def busy_mail_server(conn):
    """An upstream for the abuse run: a session that starts with b"BULK" is a big upload to a
    server that is slow to read it (busy for 0.5 s: the relay's pipes fill meanwhile), answered
    with the byte count at its end; any other is echoed. A reset ends it quietly."""
    try:
        read_proxy_header(conn)
        first = recv_exactly(conn, 4)
        if first == b"BULK":
            time.sleep(0.5)
            conn.sendall(b"%d" % len(recv_all(conn)))
        else:
            conn.sendall(first)
            echo(conn)
    except (ConnectionResetError, BrokenPipeError, EOFError):
        pass


def bulk_upload(port, size, timeout=40):
    """A big message to busy_mail_server: None once it says it got every byte, or what broke."""
    try:
        with connect(("127.0.0.1", port), timeout=timeout) as c:
            c.sendall(b"BULK" + b"m" * size)
            c.shutdown(socket.SHUT_WR)
            answer = recv_all(c)
            return None if answer == b"%d" % size else "answer %r to %d bytes" % (answer, size)
    except (OSError, EOFError) as e:
        return "%s: %s" % (type(e).__name__, e)


def wait_for_stats(proxy, pattern, timeout=WAIT):
    """Asks for counters (USR1) until a `stats` line matches; that line."""
    deadline = time.monotonic() + timeout
    while True:
        mark = proxy.mark()
        proxy.signal(signal.SIGUSR1)
        line = proxy.wait_for(r"\bstats ", start=mark)
        if re.search(pattern, line) or time.monotonic() > deadline:
            return line
        time.sleep(0.2)


@needs_proc
def test_abuse_1000_resets_mid_connect_and_mid_transfer():
    """500 clients reset while the edge is still connecting upstream (or before it accepted),
    500 in the middle of bulk transfers both ways (a quarter after an urgent byte), at
    --max-connections 40 with 100 descriptors, while big uploads to a busy mail server go on:
    every echo and upload arrives whole, no session is left behind, the loop is idle after."""
    stuck = Upstream(None, backlog=0, accept=False)     # a full backlog: connects hang
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", stuck.port))
        fillers.append(s)
    port, hanging = free_port(), free_port()
    problems, uploads = [], []

    def mid_connect(i):
        try:
            c = connect(("127.0.0.1", hanging))
            if i % 4 == 1:
                c.sendall(b"EHLO reset.example\r\n")
                time.sleep(0.01)
            reset(c)
        except OSError as e:
            problems.append("mid-connect %d: %s" % (i, e))

    def mid_transfer(i):
        # bulk (spliced), every fourth with an urgent byte in it as an attacker would; once the
        # echo of it all is back, more bulk both ways, and the reset lands in its middle
        rng = random.Random(i)
        parts = [random_bytes(rng, rng.randint(70000, 300000))]
        if i % 4 == 0:
            parts += [1, random_bytes(rng, rng.randint(1, 1000))]
        try:
            with connect(("127.0.0.1", port), timeout=10) as c:
                sent = send_with_urgent_bytes(c, parts)
                try:
                    back = recv_exactly(c, len(sent))
                except (OSError, EOFError) as e:
                    raise AssertionError("echo stalled (%s) after %d bytes%s"
                                         % (e, len(sent), ", an urgent one" if i % 4 == 0 else ""))
                assert back == sent, "echo differs"
                c.sendall(random_bytes(rng, rng.randint(70000, 300000)))
                recv_exactly(c, rng.randint(1, 70000))
                reset(c)
        except (OSError, EOFError, AssertionError) as e:
            problems.append("mid-transfer %d: %s" % (i, e))

    def hostile(worker):
        for i in range(worker, 1000, 8):
            (mid_connect if i % 2 else mid_transfer)(i)
            if problems:
                return              # bounded: the first problem ends the run

    def mail(worker):
        for i in range(4):
            uploads.append(bulk_upload(port, (2 << 20) + worker * 1000 + i))

    try:
        with Upstream(busy_mail_server, backlog=1024) as up, \
                Edge("--connect-timeout", "30", "--max-connections", "40",
                     "127.0.0.1:%d=%s" % (port, up.address),
                     "127.0.0.1:%d=%s" % (hanging, stuck.address), preexec_fn=nofile(100)) \
                as proxy:
            threads = [threading.Thread(target=mail, args=(w,)) for w in range(6)]
            threads += [threading.Thread(target=hostile, args=(w,)) for w in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "clients still running after 60 s"
            stats = wait_for_stats(proxy, r"stats active=0 ")
            spent = spin_seconds(proxy.pid)
            lost = [u for u in uploads if u is not None]
            resets = len(re.findall(r"end=client-reset", proxy.output()))
            assert not problems, problems[:5]
            assert not lost and "stats active=0 " in stats and spent < 0.5, (
                "%d of %d uploads lost (%s); %d client resets logged; %s; %.2f CPU s in 2 s"
                % (len(lost), len(uploads), lost[:2], resets, stats, spent))
            assert round_trip(port, b"after") == b"after"
            bad = trouble(proxy.output())
            assert not bad, bad[:5]
    finally:
        for s in fillers:
            s.close()
        stuck.close()


@needs_proc
def test_abuse_connection_flood_at_40_sessions_under_100_descriptors():
    """At --max-connections 40 with 100 descriptors: 20 big uploads to a busy mail server
    (their splice pipes fill), then a flood of 400 clients, 100 at a time: every client is
    served in its turn, byte for byte, none accepted and then dropped for want of a
    descriptor, and the loop is idle once the flood stops (fault 6 under a flood)."""
    port = free_port()
    uploads, flood = [], []

    def upload(i):
        uploads.append(bulk_upload(port, (4 << 20) + i))

    def client(worker):
        for i in range(worker, 400, 100):
            payload = b"EHLO flood-%03d.example\r\n" % i
            got = exchange(port, payload, timeout=30)
            flood.append(None if got == payload else "client %d: %r" % (i, got))

    with Upstream(busy_mail_server, backlog=1024) as up, \
            Edge("--max-connections", "40", "127.0.0.1:%d=%s" % (port, up.address),
                 preexec_fn=nofile(100)) as proxy:
        for target, count in ((upload, 20), (client, 100)):
            threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "clients still running after 60 s"
        spent = spin_seconds(proxy.pid)
        lost = [why for why in uploads + flood if why is not None]
        dropped = len(re.findall(r"end=connect-failed", proxy.output()))
        assert len(uploads) == 20 and len(flood) == 400
        assert not lost and spent < 0.5, (
            "%d of 420 clients lost (%s); %d sessions ended connect-failed; %.2f CPU s in 2 s"
            % (len(lost), lost[:2], dropped, spent))
        assert round_trip(port, b"after") == b"after"
        bad = trouble(proxy.output())
        assert not bad, bad[:5]


def test_abuse_unread_stderr_for_30_seconds_with_verbose():
    """With -v and stderr a pipe nobody reads for 27 s (a stalled journald): mail is served
    all along and an open session keeps relaying; once read again, the dropped lines are
    counted, and SIGTERM stops it with 0 (fault 2)."""
    port = free_port()
    made, problems = [1], []            # the readiness probe is a session too
    deadline = time.monotonic() + 27

    def mail(worker):
        i = 0
        while time.monotonic() < deadline and not problems:
            payload = b"MAIL FROM:<w%d-%d@example.org>\r\n" % (worker, i)
            got = exchange(port, payload)
            made.append(1)
            if got != payload:
                problems.append("session %d of worker %d: %r" % (i, worker, got))
            i += 1
            time.sleep(0.005)

    with Upstream(header_echo) as up, \
            UnreadEdge("-v", "127.0.0.1:%d=%s" % (port, up.address), port=port,
                       pipe_size=None) as proxy:
        workers = [threading.Thread(target=mail, args=(w,)) for w in range(2)]
        for t in workers:
            t.start()
        with connect(("127.0.0.1", port), timeout=5) as open_session:
            made.append(1)
            n = 0
            while time.monotonic() < deadline and not problems:
                line = b"NOOP %d\r\n" % n
                open_session.sendall(line)
                try:
                    assert recv_exactly(open_session, len(line)) == line
                except (OSError, EOFError) as e:
                    problems.append("the open session stalled at NOOP %d: %s" % (n, e))
                n += 1
                time.sleep(0.5)
        for t in workers:
            t.join(WAIT)
        served = len(made) - len(problems)
        assert not problems, "%d sessions served, then: %s" % (served, problems[:3])
        proxy.drain()
        for i in range(20):                         # some mail once stderr flows again
            assert exchange(port, b"after %d" % i) == b"after %d" % i
            made.append(1)
        # and the last, whose line we wait for: from an address of its own, as among
        # thousands of sessions from 127.0.0.1 its port would not be unique
        with connect(("127.0.0.1", port), source="127.0.0.98") as c:
            c.sendall(b"last")
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b"last"
            made.append(1)
        proxy.wait_for(r"session client=127\.0\.0\.98:")
        produced = len(made)
        if proxy.output().count("session client=") < produced:
            proxy.wait_for(r"lines dropped while stderr was blocked")
        text = proxy.output()
        received = text.count("session client=")
        dropped = sum(int(n) for n in re.findall(
            r"\bwarning\b.*\blog: (\d+) lines dropped while stderr was blocked", text))
        assert received + dropped >= produced, (received, dropped, produced)
        bad = trouble(text)
        assert not bad, bad[:5]
        assert proxy.stop() == 0


@needs_proc
def test_abuse_hup_and_usr1_storm_during_bulk_transfers():
    """8 sessions move 4 MiB each way (over ~2 s) while HUP and USR1 come as fast as a process
    can send them: every byte arrives, no session is cut, the edge reloads and stays up
    (faults 4 and 11)."""
    size, count = 4 << 20, 8
    upstream_got, upstream_sent, started = {}, {}, []
    results, failures = {}, []

    def send_random(sock, seed):
        """4 MiB in 64 KiB steps over about 2 s, so the storm meets every session mid-way."""
        data = random_bytes(random.Random(seed), size)
        try:
            for offset in range(0, size, 65536):
                sock.sendall(data[offset:offset + 65536])
                time.sleep(0.03)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            failures.append("sending: %s" % e)
        return hashlib.sha256(data).hexdigest()

    def drain(sock):
        digest, total = hashlib.sha256(), 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return digest.hexdigest(), total
            digest.update(chunk)
            total += len(chunk)

    def upstream(conn):
        header = read_proxy_header(conn)
        client_port = struct.unpack("!H", header[-4:-2])[0]
        started.append(client_port)
        sender = threading.Thread(target=lambda: upstream_sent.__setitem__(
            client_port, send_random(conn, client_port)))
        sender.start()
        upstream_got[client_port] = drain(conn)
        sender.join(40)

    def client(seed):
        try:
            with connect(("127.0.0.1", port), timeout=40) as c:
                sent = {}
                sender = threading.Thread(target=lambda: sent.__setitem__(
                    "sha", send_random(c, seed)))
                sender.start()
                got = drain(c)
                sender.join(40)
                results[c.getsockname()[1]] = (sent.get("sha"), got)
        except Exception as e:
            failures.append("%s: %s" % (type(e).__name__, e))

    port, other = free_port(), free_port()
    with Upstream(upstream) as up, Upstream(header_echo) as plain, \
            Edge("127.0.0.1:%d=%s" % (port, up.address),
                 "127.0.0.1:%d=%s" % (other, plain.address)) as proxy:
        storm = {}
        stormer = threading.Thread(target=lambda: storm.__setitem__("sent", signal_storm(
            proxy.pid, [signal.SIGHUP, signal.SIGUSR1], seconds=1.5)))
        clients = [threading.Thread(target=client, args=(1000 + i,)) for i in range(count)]
        for t in clients:
            t.start()
        eventually(lambda: len(started) == count)      # every session is moving bytes
        stormer.start()
        for t in clients:
            t.join(45)
        stormer.join(WAIT)
        settle(lambda: min(len(upstream_got), len(upstream_sent)) >= len(results), timeout=5)
        code = proxy.proc.poll()
        exact = sum(1 for p, (sha, got) in results.items()
                    if upstream_got.get(p) == (sha, size) and got == (upstream_sent.get(p), size))
        delivered = sum(got[1] for _, got in results.values())
        assert exact == count and not failures, (
            "exit code %r after %s signals; %d of %d sessions exact, %d of %d bytes down; %s"
            % (code, storm.get("sent"), exact, count, delivered, count * size, failures[:2]))
        proxy.wait_for(r"\bnotice reload\b")
        assert round_trip(other, b"after the storm") == b"after the storm"
        bad = trouble(proxy.output())
        assert not bad, bad[:5]


@needs_proc
def test_abuse_hup_and_usr1_storm_during_startup():
    """Ten start-ups, each sent HUP and USR1 in turn every millisecond from its first own
    line of code until past `ready`: every one comes up and serves (fault 4)."""
    port = free_port()
    with Upstream(header_echo) as up:
        for attempt in range(10):
            with StormedEdge("127.0.0.1:%d=%s" % (port, up.address)) as proxy:
                got = exchange(port, b"up %d" % attempt)
                assert got == b"up %d" % attempt, "start-up %d: %r; exit code %r after %d " \
                    "signals" % (attempt, got, proxy.proc.poll(), proxy.sent)
                bad = trouble(proxy.output())
                assert not bad, bad[:5]


# -- resolver, DNS, descriptors, splice, memory, self-loop, command line ---------------------

def is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


# -- a name server the test controls -----------------------------------------------------------
#
# glibc reads the name server from /etc/resolv.conf, on port 53: the relay runs in a mount
# namespace of its own (created in preexec_fn, root only) where a private resolv.conf names a
# stub on a loopback address of its own, and a private /etc/hosts lacks the test name, so
# getaddrinfo() really asks the stub (nsswitch `hosts: files dns`). The stub answers only
# DNS_NAME (A 127.0.0.1, AAAA no data), and can go silent or answer late.

DNS_NAME = "mx.tailwart.test"
CLONE_NEWNS, MS_BIND, MS_REC, MS_PRIVATE = 0x20000, 0x1000, 0x4000, 1 << 18


class DnsStub:
    """A UDP name server on 127.53.x.y:53. `silent`: drop every query (counted in `dropped`).
    hold(delay, window): the queries arriving within `window` seconds of the next one are
    answered `delay` seconds late; the ones after that at once."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):
            self.address = "127.53.%d.%d" % (random.randrange(256), random.randrange(1, 255))
            try:
                self.sock.bind((self.address, 53))
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    self.sock.close()
                    raise
        else:
            self.sock.close()
            raise OSError(errno.EADDRINUSE, "no free loopback address for the DNS stub")
        self.queries = []           # (time, name, qtype) of every query received
        self.silent = False
        self.dropped = 0
        self.held = None            # (delay, window, first query time or None)
        self.closed = False
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def hold(self, delay, window):
        with self.lock:
            self.held = (delay, window, None)

    def _serve(self):
        while not self.closed:
            try:
                data, peer = self.sock.recvfrom(512)
            except OSError:
                return
            try:
                name, qtype, question_end = self._question(data)
            except (IndexError, struct.error, UnicodeError):
                continue
            now = time.monotonic()
            with self.lock:
                self.queries.append((now, name, qtype))
                if self.silent:
                    self.dropped += 1
                    continue
                delay = 0
                if self.held is not None:
                    hold_for, window, first = self.held
                    if first is None:
                        self.held = (hold_for, window, now)
                        first = now
                    if now - first <= window:
                        delay = hold_for
            reply = self._answer(data, name, qtype, question_end)
            if delay:
                timer = threading.Timer(delay, self._send, (reply, peer))
                timer.daemon = True
                timer.start()
            else:
                self._send(reply, peer)

    def _send(self, reply, peer):
        try:
            self.sock.sendto(reply, peer)
        except OSError:
            pass

    @staticmethod
    def _question(data):
        labels, i = [], 12
        while data[i]:
            labels.append(data[i + 1:i + 1 + data[i]].decode("ascii"))
            i += 1 + data[i]
        qtype, = struct.unpack("!H", data[i + 1:i + 3])
        return ".".join(labels).lower(), qtype, i + 5

    @staticmethod
    def _answer(data, name, qtype, question_end):
        query_id, flags = struct.unpack("!HH", data[:4])
        if name != DNS_NAME:
            return struct.pack("!HHHHHH", query_id, 0x8185 | (flags & 0x0100), 1, 0, 0, 0) + \
                data[12:question_end]                                   # REFUSED
        answers = []
        if qtype == 1:      # A
            answers.append(struct.pack("!HHHIH", 0xc00c, 1, 1, 30, 4)
                           + socket.inet_aton("127.0.0.1"))
        return (struct.pack("!HHHHHH", query_id, 0x8180 | (flags & 0x0100), 1, len(answers), 0, 0)
                + data[12:question_end] + b"".join(answers))

    def close(self):
        self.closed = True
        self.sock.close()


def private_resolver(directory, nameserver, timeout):
    """A preexec_fn: a mount namespace where /etc/resolv.conf names `nameserver` (one try,
    `timeout` seconds) and /etc/hosts knows localhost only."""
    resolv = os.path.join(str(directory), "resolv.conf")
    hosts = os.path.join(str(directory), "hosts")
    with open(resolv, "w") as f:
        f.write("nameserver %s\noptions timeout:%d attempts:1\n" % (nameserver, timeout))
    with open(hosts, "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost\n")
    libc = ctypes.CDLL(None, use_errno=True)

    def enter():
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
        for source, target in ((resolv, "/etc/resolv.conf"), (hosts, "/etc/hosts")):
            if libc.mount(source.encode(), target.encode(), None, MS_BIND, None) != 0:
                raise OSError(ctypes.get_errno(), "mount --bind %s %s" % (source, target))
    return enter


@pytest.fixture
def dns(tmp_path):
    """dns(timeout) -> (stub, preexec_fn); skips where a private resolv.conf cannot be had."""
    if not sys.platform.startswith("linux") or not is_root():
        pytest.skip("a private /etc/resolv.conf needs Linux and root (a mount namespace)")
    stubs = []

    def make(timeout):
        stub = DnsStub()
        stubs.append(stub)
        enter = private_resolver(tmp_path, stub.address, timeout)
        # does glibc, in that namespace, really ask the stub?
        probe = "import socket; print(socket.getaddrinfo(%r, 25)[0][4][0])" % DNS_NAME
        try:
            out = subprocess.run([PYTHON, "-c", probe], preexec_fn=enter, timeout=WAIT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True)
        except subprocess.SubprocessError as e:
            pytest.skip("cannot give the relay a private /etc/resolv.conf: %s" % e)
        if out.stdout.strip() != "127.0.0.1" or not stub.queries:
            pytest.skip("glibc does not ask the stub name server here: %r %r"
                        % (out.stdout, out.stderr[-300:]))
        del stub.queries[:]
        return stub, enter

    yield make
    for stub in stubs:
        stub.close()


# -- fault 3: the resolver thread dies on LookupError ------------------------------------------

@pytest.mark.skipif(not is_root(), reason="needs root (--user nobody)")
def test_resolver_survives_lookup_error_after_dropping_to_nobody():
    """Issue 10 fault 3: as nobody, an interpreter nobody cannot read makes the first lookup
    raise `LookupError: unknown encoding: idna` in the worker; the thread died silently and every
    named upstream then failed `resolving ... timed out`. (Bites when PYTHON lives where nobody
    cannot read, as a pyenv under /root; elsewhere it is a plain check of --user with a name.)"""
    port = free_port()
    with Upstream(header_echo) as up, \
            Edge("--user", "nobody", "--connect-timeout", "3",
                 "127.0.0.1:%d=localhost:%d" % (port, up.port)) as proxy:
        for payload in (b"first by name", b"second by name"):
            assert round_trip(port, payload) == payload, proxy.output()
        assert proxy.proc.poll() is None
        assert "Traceback" not in proxy.output() and "LookupError" not in proxy.output()
        assert "connect-failed" not in proxy.output()


def test_resolver_unit_an_exception_in_getaddrinfo_is_that_lookups_error(monkeypatch):
    """Issue 10 fault 3 (unit): any exception from getaddrinfo (LookupError for idna...) is
    delivered as that lookup's error, and the next lookup is still answered."""
    real = socket.getaddrinfo
    calls = []

    def flaky(host, *args, **kwargs):
        calls.append(host)
        if host == "broken.tailwart.test":
            raise LookupError("unknown encoding: idna")
        if host == "fine.tailwart.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(edge.socket, "getaddrinfo", flaky)
    woken = threading.Event()
    resolver = edge.Resolver(woken.set)
    tagged = len(inspect.signature(resolver.resolve).parameters) >= 4   # resolve(..., tag)
    answers = {}

    def ask(host, port):
        def callback(first, addrs, error):
            answers[host] = (addrs, error)
        if tagged:
            resolver.resolve(host, port, callback, host)
        else:
            resolver.resolve(host, port, callback)

    def answer(host):
        deadline = time.monotonic() + 5
        while host not in answers and time.monotonic() < deadline:
            woken.wait(0.1)
            woken.clear()
            resolver.dispatch()
        assert host in answers, "no answer for %s in 5 s (lookups made: %s)" % (host, calls)
        return answers[host]

    ask("broken.tailwart.test", 25)
    addrs, error = answer("broken.tailwart.test")
    assert not addrs and error and "idna" in str(error)
    for _ in range(8):      # more lookups than worker threads: none may have died
        ask("fine.tailwart.test", 25)
        addrs, error = answer("fine.tailwart.test")
        assert error is None and addrs and "127.0.0.1" in repr(addrs), (addrs, error)
        del answers["fine.tailwart.test"]
        if hasattr(resolver, "cache"):
            resolver.cache.clear()


# -- fault 5: stale DNS used too late; a late answer matched to the wrong attempt --------------

def test_stale_dns_answer_serves_at_once_while_the_name_server_is_silent(dns):
    """Issue 10 fault 5: the name server goes silent after answering; once the answer is older
    than --dns-ttl, a new session is served from it at once (the refresh runs in the
    background), not failed `resolving ... timed out` after the connect timeout."""
    stub, sandbox = dns(timeout=3)          # a silent name server costs glibc 3 s
    port = free_port()
    with Upstream(header_echo) as up, \
            Edge("--dns-ttl", "1", "--connect-timeout", "1.5",
                 "127.0.0.1:%d=%s:%d" % (port, DNS_NAME, up.port), preexec_fn=sandbox) as proxy:
        assert round_trip(port, b"while DNS answers") == b"while DNS answers", proxy.output()
        stub.silent = True
        time.sleep(1.5)                     # the answer is now older than --dns-ttl
        mark = proxy.mark()
        assert round_trip(port, b"while DNS is silent") == b"while DNS is silent", proxy.output()
        line = proxy.wait_for(r"session client=", start=mark)
        assert "connect-failed" not in line, line
        assert stub.dropped, "the edge never asked again: the answer had not expired"
        warning = proxy.wait_for(r"^(?=.*resolve host=%s\b)(?=.*stale)" % re.escape(DNS_NAME),
                                 start=mark)
        assert "warning" in warning or warning.startswith("<4>"), warning
        assert "Traceback" not in proxy.output()


def test_late_dns_answer_goes_to_the_attempt_that_asked_not_the_first_port(dns):
    """Issue 10 fault 5: with 25=mx:25,mx:2525, the lookup for mx:25 times out and mx:2525 is
    tried; the answer that then arrives late must not send the session back to the first port
    (answers were matched by host name only)."""
    stub, sandbox = dns(timeout=6)
    stub.hold(3.4, window=1.0)      # the first lookups (start-up's and the session's) answer late

    def says(tag):
        def handler(conn):
            read_proxy_header(conn)
            conn.sendall(tag)
            recv_all(conn)
        return handler

    port = free_port()
    with Upstream(says(b"first!")) as first, Upstream(says(b"second")) as second, \
            Edge("--connect-timeout", "2", "127.0.0.1:%d=%s:%d,%s:%d"
                 % (port, DNS_NAME, first.port, DNS_NAME, second.port),
                 preexec_fn=sandbox) as proxy:
        # mx:first times out at 2-2.5 s, mx:second is asked for, the answer comes at 3.4 s
        with connect(("127.0.0.1", port)) as c:
            try:
                got = recv_exactly(c, 6)
            except (EOFError, OSError) as e:
                got = e
        line = proxy.wait_for(r"session client=")
        assert got == b"second", (got, line)
        assert "upstream=127.0.0.1:%d" % second.port in line, line
        assert not first.conns, "a connection reached the first upstream"


# -- fault 6: descriptors: lent splice pipes, clients accepted then dropped --------------------

def flood_or_echo(conn):
    """An upstream: after the header, b'flood' gets an endless reply, anything else its echo."""
    read_proxy_header(conn)
    first = recv_exactly(conn, 5)
    if first == b"flood":
        try:
            while True:
                conn.sendall(b"x" * 65536)      # until every buffer on the way is full
        except OSError:
            return
    conn.sendall(first)
    recv_all(conn)


def session_failures(proxy):
    """Session lines of clients that were accepted and then dropped unserved."""
    return [line for line in proxy.output().splitlines()
            if "session client=" in line and "end=connect-failed" in line]


def test_fd_limit_64_stalled_splice_sessions_and_80_clients_every_client_served():
    """Issue 10 fault 6: splice pipes lent to stalled bulk sessions were not counted in the
    session cap: at 18 of 22 sessions each new client was accepted, then dropped
    `connect-failed: Too many open files`. They must wait in the backlog and all be served."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    port = free_port()
    with Upstream(flood_or_echo) as up, \
            Edge("--relay", "splice", "127.0.0.1:%d=%s" % (port, up.address),
                 preexec_fn=limit) as proxy:
        stalled = []
        for _ in range(18):         # bulk replies nobody reads: each direction keeps a pipe lent
            c = connect(("127.0.0.1", port))
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.sendall(b"flood")
            stalled.append(c)
        time.sleep(1)
        clients = []
        for i in range(80):
            c = connect(("127.0.0.1", port))    # the kernel backlog takes them all
            c.sendall(b"c%04d" % i)
            clients.append(c)
        time.sleep(1)
        before = cpu_seconds(proxy.pid)
        time.sleep(2)
        spent = cpu_seconds(proxy.pid) - before
        for c in stalled:
            c.close()
        assert_every_client_echoed(proxy, clients, lambda i: b"c%04d" % i)
        assert spent < 0.5, "%.2f CPU seconds in 2 s while saturated: the loop spins" % spent
        assert round_trip(port, b"after") == b"after"
        assert proxy.proc.poll() is None


def assert_every_client_echoed(proxy, clients, expected):
    """Reads each client's echo in turn, closing it: every one got expected(i) back, and no
    session line says it failed (none was accepted and then dropped)."""
    served = []
    for i, c in enumerate(clients):
        try:
            served.append(recv_exactly(c, len(expected(i))) == expected(i))
        except (EOFError, OSError):
            served.append(False)
        c.close()
    failures = session_failures(proxy)
    assert all(served), "%d of %d clients dropped:\n%s" % (
        served.count(False), len(clients), "\n".join(failures[:5]))
    assert not failures, "\n".join(failures[:5])


def test_forced_fd_exhaustion_serves_every_client_strict():
    """Issue 10 fault 6: the strict form of test_forced_fd_exhaustion_pauses_accepting_without_
    spinning: --max-connections above what the fd limit allows; no client may be accepted and
    then dropped for want of an upstream socket (the old test let `got is None` pass)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    with Upstream(echo) as up:
        port = free_port()      # picked with `up` bound: one picked before was once up's (CI)
        with Edge("--proxy-protocol", "off", "--max-connections", "1000",
                  "127.0.0.1:%d=%s" % (port, up.address), preexec_fn=limit) as proxy:
            clients = [connect(("127.0.0.1", port)) for _ in range(40)]
            for i, c in enumerate(clients):
                c.sendall(b"%03d" % i)
            time.sleep(1)
            before = cpu_seconds(proxy.pid)
            time.sleep(2)
            spent = cpu_seconds(proxy.pid) - before
            assert_every_client_echoed(proxy, clients, lambda i: b"%03d" % i)
            assert spent < 0.5, "%.2f CPU seconds in 2 s while out of fds: the loop spins" % spent
            assert round_trip(port, b"after") == b"after"
            assert proxy.proc.poll() is None


def test_fd_limit_64_with_21_inherited_descriptors_drops_none_of_60_clients():
    """Issue 19 fault 8: the cap counted the open-file limit, not the descriptors already open:
    started with 21 inherited descriptors under a limit of 64 (and --metrics: one more), 43 of
    60 clients were accepted and closed at once (`Too many open files`). Every one must be
    served, or wait."""
    inherited = [os.open(os.devnull, os.O_RDONLY) for _ in range(21)]
    try:
        with Upstream(echo) as up:
            port, mport = free_port(), free_port()
            with Edge("--proxy-protocol", "off", "--metrics", "127.0.0.1:%d" % mport,
                      "127.0.0.1:%d=%s" % (port, up.address),
                      preexec_fn=nofile(64), pass_fds=inherited) as proxy:
                clients = []
                for i in range(60):
                    c = connect(("127.0.0.1", port))    # the kernel backlog takes them all
                    c.sendall(b"%03d" % i)
                    clients.append(c)
                assert_every_client_echoed(proxy, clients, lambda i: b"%03d" % i)
                assert round_trip(port, b"after") == b"after"
                assert proxy.proc.poll() is None
    finally:
        for fd in inherited:
            os.close(fd)


def test_fd_limit_lowered_under_a_running_edge_keeps_accepted_clients_waiting():
    """Issue 19 fault 8: descriptors the cap does not count (here: a limit lowered after the
    start) made the upstream socket() fail with EMFILE, and the client just accepted was closed.
    It must wait for a descriptor instead, the cap come down, and every client be served."""
    with Upstream(echo) as up:
        port = free_port()
        with Edge("--proxy-protocol", "off", "--relay", "copy",
                  "127.0.0.1:%d=%s" % (port, up.address), preexec_fn=nofile(64)) as proxy:
            # room for 5 sessions (2 descriptors each) and the 6th client, not its upstream
            limit = fd_count(proxy.pid) + 2 * 5 + 1
            resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (limit, limit))
            clients = []
            for i in range(20):
                c = connect(("127.0.0.1", port))    # the kernel backlog takes them all
                c.sendall(b"%03d" % i)
                clients.append(c)
            time.sleep(1)
            assert_every_client_echoed(proxy, clients, lambda i: b"%03d" % i)
            assert round_trip(port, b"after") == b"after"
            assert proxy.proc.poll() is None


def test_fd_limit_a_passed_shortage_does_not_shrink_the_cap_for_good():
    """A cap lowered for want of descriptors grows back once they are there again (a full
    system-wide table, ENFILE, passes): later, more sessions than the lowered cap are open
    at once, and the log says the cap is back."""
    with Upstream(echo) as up:
        port = free_port()
        with Edge("--proxy-protocol", "off", "--relay", "copy",
                  "127.0.0.1:%d=%s" % (port, up.address), preexec_fn=nofile(64)) as proxy:
            cap = int(proxy.wait_for(r"max-connections=(\d+)").split("max-connections=")[1]
                      .split()[0])
            limit = fd_count(proxy.pid) + 2 * 3 + 1     # the soft limit: it may go up again
            resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (limit, 64))
            clients = [connect(("127.0.0.1", port)) for _ in range(6)]
            for i, c in enumerate(clients):
                c.sendall(b"%03d" % i)
            proxy.wait_for(r"max-connections lowered to 3")
            assert_every_client_echoed(proxy, clients, lambda i: b"%03d" % i)
            resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (64, 64))
            proxy.wait_for(r"max-connections back to %d" % cap)
            held = [connect(("127.0.0.1", port)) for _ in range(cap)]
            try:
                for i, c in enumerate(held):        # all open at once, each answered
                    c.sendall(b"%03d" % i)
                    assert recv_exactly(c, 3) == b"%03d" % i
            finally:
                for c in held:
                    c.close()
            assert proxy.proc.poll() is None


# -- fault 7: splice refused by a seccomp filter (EPERM) ---------------------------------------

AUDIT_ARCH_SPLICE = {"x86_64": (0xC000003E, 275), "aarch64": (0xC00000B7, 76)}
BPF_LD_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000


def refuse_splice_with_eperm():
    """A preexec_fn: a seccomp filter (as a sandbox or container runtime may install) that
    makes splice(2) fail with EPERM and allows everything else."""
    arch, nr = AUDIT_ARCH_SPLICE[platform.machine()]
    return seccomp_filter([
        (BPF_LD_ABS, 0, 0, 4),                  # seccomp_data.arch
        (BPF_JEQ_K, 1, 0, arch),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),   # another ABI: leave it alone
        (BPF_LD_ABS, 0, 0, 0),                  # seccomp_data.nr
        (BPF_JEQ_K, 0, 1, nr),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ])


def seccomp_filter(program):
    """A preexec_fn that installs the classic BPF `program` ((code, jt, jf, k) tuples) as a
    seccomp filter."""
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*[SockFilter(*op) for op in program])
    prog = SockFprog(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_ulong]
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2

    def install():
        if libc.prctl(pr_set_no_new_privs, 1, None, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.addressof(prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    install.keep = (filters, prog)      # alive until the fork
    return install


def seccomp_refusing_splice():
    """The preexec_fn, once shown to work here (splice -> EPERM in a child), or a skip."""
    if not sys.platform.startswith("linux") or platform.machine() not in AUDIT_ARCH_SPLICE:
        pytest.skip("the seccomp filter is written for Linux on x86_64 and aarch64 only")
    if not hasattr(os, "splice"):
        pytest.skip("no os.splice (Python < 3.10): the relay never splices")
    install = refuse_splice_with_eperm()
    probe = ("import os, socket, errno\n"
             "a, b = socket.socketpair(); r, w = os.pipe(); a.send(b'x')\n"
             "try: os.splice(b.fileno(), w, 1); print('spliced')\n"
             "except OSError as e: print(errno.errorcode[e.errno])\n")
    return proven_filter(install, probe, "EPERM", "make splice fail with EPERM")


def proven_filter(install, probe, expected, what):
    """`install` (a seccomp preexec_fn), once a child under it running `probe` printed
    `expected`; else a skip saying the filter did not `what`."""
    try:
        out = subprocess.run([PYTHON, "-c", probe], preexec_fn=install, timeout=WAIT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True).stdout.strip()
    except subprocess.SubprocessError as e:
        pytest.skip("cannot install a seccomp filter here: %s" % e)
    if out != expected:
        pytest.skip("the seccomp filter did not %s (%r)" % (what, out))
    return install


def test_splice_refused_by_seccomp_falls_back_to_copy_without_a_reset():
    """Issue 10 fault 7: splice(2) refused with EPERM (a seccomp filter) reset every bulk
    session after ~128 KB and blamed the client; it must fall back to copying, no byte lost."""
    install = seccomp_refusing_splice()
    size = 4 << 20
    data = os.urandom(size)
    port = free_port()
    with Upstream(header_echo) as up, \
            Edge("--relay", "splice", "127.0.0.1:%d=%s" % (port, up.address),
                 preexec_fn=install) as proxy:
        with connect(("127.0.0.1", port)) as c:
            def send():
                try:
                    c.sendall(data)
                    c.shutdown(socket.SHUT_WR)
                except OSError:
                    pass            # the old code resets the session: the reader reports it
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            try:
                got = recv_all(c)
            except OSError as e:
                got = e
            sender.join(WAIT)
        line = proxy.wait_for(r"session client=")
        assert isinstance(got, bytes) and len(got) == size, (
            "echoed %s of %d bytes; %s" % (len(got) if isinstance(got, bytes) else got, size, line))
        assert got == data
        assert "end=client-fin" in line and "reset" not in line, line
        assert proxy.wait_for(r"splice unavailable \(.*\); relaying with recv/send")
        assert round_trip(port, b"after") == b"after"


# -- fault 8: memory per session ---------------------------------------------------------------

def vm_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def settled_rss_kib(pid, timeout=WAIT):
    """VmRSS once it has stopped changing for 0.6 s."""
    deadline = time.monotonic() + timeout
    last = vm_rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = vm_rss_kib(pid)
        if now == last:
            time.sleep(0.3)
            if vm_rss_kib(pid) == now:
                return now
        last = now
    return last


def flood(clients, quiet=1.0):
    """Send 1 MiB bursts on every (non-blocking) client until none takes a byte for `quiet`
    seconds. Returns the bytes each client sent."""
    burst = b"x" * (1 << 20)
    sent = [0] * len(clients)
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        moved = 0
        for i, c in enumerate(clients):
            try:
                n = c.send(burst)
            except BlockingIOError:
                continue
            sent[i] += n
            moved += n
        if moved:
            last = time.monotonic()
        else:
            time.sleep(0.05)
    return sent


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_memory_per_session_is_bounded_when_early_talkers_meet_a_silent_upstream():
    """Issue 10 fault 8: clients that talk first against a mail server that accepts and never
    reads (a delayed greeting): copy mode read up to 256 KiB per direction and kept what the
    upstream would not take. The bound is 128 KiB + the header per session (VmRSS growth)."""
    count = 48
    release = threading.Event()
    port = free_port()
    with Upstream(lambda conn: release.wait(WAIT * 2), backlog=256) as up, \
            Edge("--relay", "copy", "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        warm, clients = [], []
        try:
            warm += [connect(("127.0.0.1", port)) for _ in range(4)]    # allocator warmed up
            for c in warm:
                c.setblocking(False)
            flood(warm)
            before = settled_rss_kib(proxy.pid)
            clients += [connect(("127.0.0.1", port)) for _ in range(count)]
            for c in clients:
                c.setblocking(False)
            sent = flood(clients)
            after = settled_rss_kib(proxy.pid)
            per_session = (after - before) / count
            assert min(sent) >= 1 << 20, "a client could not even send 1 MiB: %d" % min(sent)
            # the bound: 128 KiB + the header (< 1 KiB)
            assert per_session <= 128 + 1, (
                "VmRSS grew %.1f KiB per stalled session (%d KiB -> %d KiB for %d sessions)"
                % (per_session, before, after, count))
        finally:
            release.set()
            for c in warm + clients:
                c.close()
        assert proxy.proc.poll() is None


# -- fault 9: an upstream that is the edge itself ----------------------------------------------

SELF_LOOPS = [
    # listen, upstream (PORT stands for the listen port)
    ("127.0.0.1:PORT", "127.0.0.1:PORT"),
    ("PORT", "127.0.0.1:PORT"),             # every interface: 127.0.0.1 is one of them
    ("0.0.0.0:PORT", "127.0.0.1:PORT"),
]


@pytest.mark.parametrize("listen, upstream", SELF_LOOPS, ids=["=".join(x) for x in SELF_LOOPS])
def test_literal_self_loop_is_refused_at_start_with_exit_2(listen, upstream):
    """Issue 10 fault 9: a literal upstream equal to one of our own listen addresses would
    fill every slot from one client; it is refused at start: exit 2, one line."""
    port = free_port()
    mapping = ("%s=%s" % (listen, upstream)).replace("PORT", str(port))
    try:
        code, out, err = run_script("--max-connections", "8", mapping, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("%s was accepted: the relay was still running after 5 s" % mapping)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "own listen address" in lines[0], err
    assert "Traceback" not in err


def test_named_upstream_resolving_to_our_listener_is_refused_at_connect():
    """Issue 10 fault 9: a name that resolves to the edge itself (the VPS's own public name):
    the session ends connect-failed, `own listen address`, logged as an error, and no second
    session is made (the old code connected to itself until every slot was taken)."""
    port = free_port()
    with Edge("--max-connections", "8", "127.0.0.1:%d=localhost:%d" % (port, port)) as proxy:
        with connect(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"EHLO loop\r\n")
            try:
                got = recv_all(c)
            except ConnectionResetError:
                got = b""               # closed with our bytes unread: a reset is a close too
            except socket.timeout:
                got = "no end after 5 s"
        assert got == b"", "%r; log:\n%s" % (got, proxy.output())
        line = proxy.wait_for(r"session client=.*end=connect-failed", timeout=5)
        assert re.search(r'reason="[^"]*own listen address', line), line
        error = proxy.wait_for(r"^(<3>|\S+ \S+ error ).*own listen address", timeout=5)
        assert "localhost" in error, error                                  # and says why
        mark = proxy.mark()
        proxy.signal(signal.SIGUSR1)
        stats = proxy.wait_for(r"\bstats ", start=mark)
        assert re.search(r"stats active=0 sessions=1 ", stats), stats


# -- fault 13: command line --------------------------------------------------------------------

ACCEPTED_MORE = [
    # argv, [(bind, port, upstreams)]: mappings may follow options
    (["25=mx:25", "--relay", "copy", "465=mx:465"],
     [(None, 25, [("mx", 25)]), (None, 465, [("mx", 465)])]),
    (["25=a:25", "--proxy-protocol", "v1", "465=b:465", "--connect-timeout", "3", "587=c:587"],
     [(None, 25, [("a", 25)]), (None, 465, [("b", 465)]), (None, 587, [("c", 587)])]),
    (["25", "--upstream", "mx", "465"], [(None, 25, [("mx", 25)]), (None, 465, [("mx", 465)])]),
    (["--dns-ttl", "5", "25=mx:25"], [(None, 25, [("mx", 25)])]),
    (["--half-close-timeout", "60", "25=mx:25", "-q"], [(None, 25, [("mx", 25)])]),
]


@pytest.mark.parametrize("argv, expected", ACCEPTED_MORE,
                         ids=[" ".join(a) for a, _ in ACCEPTED_MORE])
def test_command_line_accepted_more(argv, expected):
    """Issue 10 fault 13: mappings after options, and the new options."""
    options, mappings = edge.parse_args(argv)
    assert [(m.bind, m.port, m.upstreams) for m in mappings] == expected


def test_command_line_mappings_after_options_keep_the_options():
    """Issue 10 fault 13: an option between mappings still applies."""
    options, _ = edge.parse_args(["25=mx:25", "--relay", "copy", "465=mx:465",
                                  "--connect-timeout", "2.5"])
    assert options.relay == "copy" and options.connect_timeout == 2.5


REFUSED_MORE = [
    # argv, what the one error line must say
    (["--up", "mx", "25"], r"(?<![\w-])--up(?![\w-])"),            # names the unknown option
    (["--rel", "copy", "25=mx:25"], r"(?<![\w-])--rel(?![\w-])"),
    (["25,465", "--upstream", "mx"], r"separate\b.*\bwith spaces"),
    (["25:mx:25"], r"write it as 25=mx:25"),
    (["425250=h:25"], r"listen port 425250 .*out of range"),
    (["25=h:425250"], r"upstream port 425250 .*out of range"),
]


@pytest.mark.parametrize("argv, message", REFUSED_MORE,
                         ids=[" ".join(a) for a, _ in REFUSED_MORE])
def test_command_line_refused_more(argv, message):
    """Issue 10 fault 13: no guessed option prefixes, hints that fit the mistake."""
    with pytest.raises(edge.ConfigError) as raised:
        edge.parse_args(argv)
    assert re.search(message, str(raised.value)), str(raised.value)
    assert "not a number" not in str(raised.value)


NEWLINE_ARGUMENTS = [
    ["--bo\ngus", "25=h:25"],
    ["25=h:25", "--user", "no\nsuch-user"],
    ["25=mx:25", "26=\n"],
]


@pytest.mark.parametrize("argv", NEWLINE_ARGUMENTS, ids=["option", "user", "mapping"])
def test_an_argument_holding_a_newline_gives_a_one_line_error(argv):
    """Issue 10 fault 13: the argument is quoted, so the error stays on one line."""
    code, out, err = run_script(*argv)
    assert code in (1, 2), err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tailwart_edge.py: error: ") and "Traceback" not in err


def test_user_option_misspelt_names_the_user_meant():
    """Issue 20: --user nobdy suggested `useradd nobdy`; a close existing name comes first."""
    pwd = pytest.importorskip("pwd")
    if "nobody" not in [user.pw_name for user in pwd.getpwall()]:
        pytest.skip("no user nobody here")
    code, out, err = run_script("--user", "nobdy", "127.0.0.1:%d=127.0.0.1:25" % free_port())
    assert (code, out, err) == (1, "", "tailwart_edge.py: error: --user nobdy: no such user; "
                                "did you mean nobody?\n")


def test_user_option_unknown_and_near_no_user_suggests_creating_it():
    name = "tailwart-qz7"
    code, out, err = run_script("--user", name, "127.0.0.1:%d=127.0.0.1:25" % free_port())
    assert (code, out, err) == (1, "", "tailwart_edge.py: error: --user %s: no such user; "
                                "create one (e.g. `useradd --system --no-create-home %s`) or "
                                "name an existing one\n" % (name, name))


@pytest.mark.skipif(not is_root(), reason="needs root (switching users)")
def test_user_option_accepts_a_numeric_id():
    """Issue 10 fault 13: --user 65534 runs as uid 65534 (it suggested `useradd 65534`)."""
    port = free_port()
    with Upstream(header_echo) as up, \
            Edge("--user", "65534", "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        with open("/proc/%d/status" % proxy.pid) as f:
            uids = re.search(r"^Uid:\s+(.*)$", f.read(), re.M).group(1).split()
        assert uids == ["65534"] * 4, uids
        assert round_trip(port, b"as 65534") == b"as 65534"
        assert proxy.stop() == 0


def socket_activated_start_error(listens, relay_args, port):
    """systemd-socket-activate with `listens` (-l ADDR:PORT each) runs the relay once the first
    client connects to 127.0.0.1:port: (exit code, stderr text, the error lines)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("socket activation is Linux only")
    activate = need_tool("systemd-socket-activate")
    argv = [activate]
    for listen in listens:
        argv += ["-l", listen]
    proc = subprocess.Popen(argv + [PYTHON, SCRIPT] + list(relay_args),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, universal_newlines=True)
    lines = []
    try:
        for _ in listens:               # one `Listening on` line a socket
            lines.append(proc.stderr.readline())
        assert "Listening on" in "".join(lines), lines
        # the first client makes systemd-socket-activate exec the relay with the sockets
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            try:
                code = proc.wait(5)
            except subprocess.TimeoutExpired:
                code = "still running after 5 s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines += proc.stderr.readlines()
        proc.stderr.close()
    text = "".join(lines)
    assert "Traceback" not in text
    return code, text, [line for line in text.splitlines() if "error" in line]


def test_systemd_socket_activation_extra_socket_is_a_start_error_naming_it():
    """Issue 10 fault 13: a socket from systemd that matches no mapping was closed in our
    process but stayed open in systemd (clients hang there): exit 2 naming the socket."""
    port, extra, upstream_port = free_port(), free_port(), free_port()
    code, text, errors = socket_activated_start_error(
        ["127.0.0.1:%d" % port, "127.0.0.1:%d" % extra],
        ["--proxy-protocol", "off", "127.0.0.1:%d=127.0.0.1:%d" % (port, upstream_port)], port)
    assert code == 2, "%s\n%s" % (code, text)
    assert len(errors) == 1 and "127.0.0.1:%d" % extra in errors[0], text


def test_systemd_socket_activation_of_another_shape_is_a_start_error_naming_the_fix():
    """Issue 19: a socket from systemd was matched by address and port alone: 0.0.0.0:P
    was adopted for the mapping `P` (every interface), which then refused IPv6 clients while
    the log said `:P`... and every reload of it failed. Exit 2 naming the socket and the fix."""
    port, upstream_port = free_port("::"), free_port()
    code, text, errors = socket_activated_start_error(
        ["0.0.0.0:%d" % port], ["%d=127.0.0.1:%d" % (port, upstream_port)], port)
    assert code == 2, "%s\n%s" % (code, text)
    assert len(errors) == 1 and "0.0.0.0:%d from systemd" % port in errors[0], text
    assert "ListenStream=" in errors[0] and "BindIPv6Only=" in errors[0], text


# ----------------------------------------------------------------------------------------------
# Reload (SIGHUP) by hand: a new process takes the ports, the old one finishes its sessions
# ----------------------------------------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36
TOOK_OVER = r"reload: pid=(\d+) took over; draining (\d+) sessions? \(up to ([\d.]+)s\)"


def process_state(pid):
    """The state letter of a process in /proc (R, S, Z...), None when there is none."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def children(pid):
    """The live (not zombie) processes whose parent is pid."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] not in "ZX":
            found.append(int(name))
    return found


def server_side_inode(listen_port, client_port):
    """The inode of the relay's socket for a loopback client (from /proc/net/tcp)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], int(fields[9])
                if (int(local.rpartition(":")[2], 16) == listen_port
                        and int(remote.rpartition(":")[2], 16) == client_port and inode):
                    return inode
    return None


def holders(inode, pids):
    """Which of pids hold the socket `inode` open."""
    found = []
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "socket:[%d]" % inode:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


class EdgeFrom(Edge):
    """Edge, started from another copy of the script (an upgrade changes that copy)."""

    def __init__(self, script, *args, **options):
        self.script = script
        super().__init__(*args, **options)

    def _start(self, env, preexec_fn, timeout):
        self.args = [PYTHON, self.script] + self.args[2:]
        super()._start(env, preexec_fn, timeout)


class Relays:
    """Every relay process a test starts or sees take over, stopped by PID at the end.

    The new process of a reload is the old one's child: when the old one exits, it is handed
    to this test process (a child subreaper), which can then read its exit code."""

    def __init__(self):
        self.edges = []
        self.pids = set()           # processes started by reloads (not the Edge's own)
        self.codes = {}             # pid -> exit code, for those reaped here

    def start(self, *args, script=None, **options):
        proxy = EdgeFrom(script, *args, **options) if script else Edge(*args, **options)
        self.edges.append(proxy)
        return proxy

    def reload(self, proxy, pid, timeout=WAIT):
        """HUP to pid; once it logged `took over` and the new one `ready`: (new pid, draining)."""
        mark = proxy.mark()
        os.kill(pid, signal.SIGHUP)
        line = proxy.wait_for(r"reload: pid=\d+ took over|reload failed", timeout, start=mark)
        new = re.search(r"pid=(\d+)", line)
        if new:
            self.pids.add(int(new.group(1)))
        assert "took over" in line, line
        match = re.search(TOOK_OVER, line)
        assert match, line
        new = int(match.group(1))
        assert new != pid
        proxy.wait_for(r"\bready pid=%d\b" % new, timeout, start=mark)
        return new, int(match.group(2))

    def alive(self, pid):
        for proxy in self.edges:
            if proxy.pid == pid:
                return proxy.proc.poll() is None
        if pid in self.codes:
            return False
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return process_state(pid) not in (None, "Z", "X")
        if got == pid:
            self.codes[pid] = os.waitstatus_to_exitcode(status)
            return False
        return True

    def code(self, pid):
        """The exit code of an ended process, None when another process reaped it."""
        for proxy in self.edges:
            if proxy.pid == pid:
                return proxy.proc.returncode
        return self.codes.get(pid)

    def wait_gone(self, pid, timeout=WAIT):
        eventually(lambda: not self.alive(pid), timeout)
        return self.code(pid)

    def stop(self, pid, timeout=WAIT):
        """SIGTERM, SIGKILL after `timeout`; the exit code (None when not ours to see)."""
        if self.alive(pid):
            os.kill(pid, signal.SIGTERM)
        try:
            return self.wait_gone(pid, timeout)
        except AssertionError:
            if self.alive(pid):
                os.kill(pid, signal.SIGKILL)
            self.wait_gone(pid, timeout)
            raise AssertionError("pid %d ignored SIGTERM for %ss" % (pid, timeout))

    def all_pids(self):
        """Every relay PID known: logged as ready or as taking over, or a child of one."""
        pids = set(self.pids)
        for proxy in self.edges:
            for line in list(proxy.lines):
                for pattern in (r"\bready pid=(\d+)", r"reload: pid=(\d+) took over"):
                    match = line and re.search(pattern, line)
                    if match:
                        pids.add(int(match.group(1)))
        pids -= {proxy.pid for proxy in self.edges}
        grown = True
        while grown:
            grown = False
            for pid in list(pids) + [proxy.pid for proxy in self.edges]:
                for child in children(pid):
                    if child not in pids:
                        pids.add(child)
                        grown = True
        self.pids |= pids
        return pids

    def cleanup(self):
        pids = self.all_pids()
        for pid in pids:
            if self.alive(pid):
                os.kill(pid, signal.SIGTERM)
        for proxy in self.edges:
            if proxy.proc.poll() is None:
                proxy.proc.terminate()
        deadline = time.monotonic() + WAIT
        for pid in pids:
            while self.alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive(pid):
                os.kill(pid, signal.SIGKILL)
        for proxy in self.edges:
            try:
                proxy.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            proxy.kill()
        for pid in pids:
            eventually(lambda: not self.alive(pid), 5)


@pytest.fixture
def relays():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    tracker = Relays()
    try:
        yield tracker
    finally:
        try:
            tracker.cleanup()
        finally:
            libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def hashing_echo(record):
    """An upstream that reads the header and a 16-byte id, then echoes, recording
    record[id] = (sha256 of what it received, sha256 of what it sent)."""
    def handler(conn):
        read_proxy_header(conn)
        ident = recv_exactly(conn, 16)
        got, sent = hashlib.sha256(ident), hashlib.sha256()
        conn.sendall(ident)
        sent.update(ident)
        while True:
            data = conn.recv(65536)
            if not data:
                break
            got.update(data)
            conn.sendall(data)
            sent.update(data)
        record[ident] = (got.hexdigest(), sent.hexdigest())
        conn.shutdown(socket.SHUT_WR)
    return handler


class LongSession:
    """A client streaming random bytes through the relay to hashing_echo, paced, from before a
    reload until finish(); reads the echo in parallel. The relay has accepted it and connected
    it upstream when the constructor returns (the id came back)."""

    CHUNK = 16384

    def __init__(self, port, ident, least=256 * 1024):
        self.port, self.ident, self.least = port, ident.ljust(16, b".")[:16], least
        self.sock = connect(("127.0.0.1", port))
        self.client_port = self.sock.getsockname()[1]
        self.sock.sendall(self.ident)
        assert recv_exactly(self.sock, 16) == self.ident
        self.sent, self.received = hashlib.sha256(self.ident), hashlib.sha256(self.ident)
        self.nsent = self.nreceived = 16
        self.error = None
        self.finishing = threading.Event()
        self.threads = [threading.Thread(target=self._write, daemon=True),
                        threading.Thread(target=self._read, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _write(self):
        try:
            while not self.finishing.is_set() or self.nsent < self.least:
                chunk = os.urandom(self.CHUNK)
                self.sock.sendall(chunk)
                self.sent.update(chunk)
                self.nsent += len(chunk)
                time.sleep(0.01)
            self.sock.shutdown(socket.SHUT_WR)
        except Exception as e:
            self.error = self.error or e

    def _read(self):
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                self.received.update(data)
                self.nreceived += len(data)
        except Exception as e:
            self.error = self.error or e

    def finish(self):
        self.finishing.set()

    def join(self, timeout=WAIT):
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0, deadline - time.monotonic()))
        self.sock.close()
        return not any(thread.is_alive() for thread in self.threads)

    def intact(self, record):
        """Both ways: the upstream got what we sent, we got what the upstream sent."""
        return (self.error is None and self.nsent == self.nreceived
                and record.get(self.ident) == (self.sent.hexdigest(), self.received.hexdigest()))


class Load:
    """One thread per port opening connections without pause: a short echo each, counted
    as ok, refused, reset (RST or broken pipe), cut (EOF before the whole echo), stalled."""

    def __init__(self, ports):
        self.counts = dict(made=0, ok=0, refused=0, reset=0, cut=0, stalled=0, other=0)
        self.failures = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(port,), daemon=True)
                        for port in ports]
        for thread in self.threads:
            thread.start()

    def _loop(self, port):
        n = 0
        while not self.stopping.is_set():
            n += 1
            payload = (b"s%d.%d" % (port, n)).ljust(16, b".") + b"\r\n"
            error = None
            try:
                with connect(("127.0.0.1", port)) as c:
                    c.sendall(payload)
                    c.shutdown(socket.SHUT_WR)
                    got = recv_all(c)
                kind = "ok" if got == payload else "cut"
            except ConnectionRefusedError as e:
                kind, error = "refused", e
            except (ConnectionResetError, BrokenPipeError) as e:
                kind, error = "reset", e
            except socket.timeout as e:
                kind, error = "stalled", e
            except OSError as e:
                kind, error = "other", e
            with self.lock:
                self.counts["made"] += 1
                self.counts[kind] += 1
                if kind != "ok":
                    self.failures.append((time.monotonic(), port, kind, repr(error)))

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(WAIT * 2)
        return dict(self.counts)

    def made(self):
        with self.lock:
            return self.counts["made"]


def write_settings(path, ports, upstream=None, options=(), extra=()):
    """A settings file, replaced in one step (a reload never reads half of it)."""
    lines = ["# tailwart-edge settings for a test", ""]
    if upstream:
        lines.append("UPSTREAM=%s" % upstream)
    lines.append("PORTS=%s" % " ".join(ports))      # unquoted, as in the README
    if options:
        lines.append("OPTIONS=%s" % " ".join(options))
    lines += list(extra)
    temporary = str(path) + ".new"
    with open(temporary, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(temporary, str(path))
    return len(lines)


def copy_script(directory):
    """The script copied into directory (to be started from, then changed on disk)."""
    return shutil.copy(SCRIPT, os.path.join(str(directory), "tailwart_edge.py"))


def edit_script(path, old, new):
    with open(path) as f:
        text = f.read()
    changed = re.sub(old, new, text, count=1, flags=re.M)
    assert changed != text, old
    with open(path, "w") as f:
        f.write(changed)


def make_slow(path, seconds):
    """Makes the script at path sleep `seconds` at start-up, after catching its signals."""
    edit_script(path, r"^(__version__ = .*)$",
                r"\1\nif __name__ == '__main__':\n    time.sleep(%g)  # test: a slow start"
                % seconds)


def since(proxy, mark):
    """The lines logged from `mark` on, as one text."""
    with proxy.cond:
        return "\n".join(line for line in proxy.lines[mark:] if line is not None)


def ended(proxy, timeout=WAIT):
    """The Edge's own process's exit code (Edge.wait would also wait for the end of its
    stderr, which a new process it started holds open)."""
    return proxy.proc.wait(timeout)


def no_children_left(pid, timeout=WAIT):
    eventually(lambda: not children(pid), timeout)


def test_reload_under_steady_load_refuses_nothing_and_cuts_no_session(relays):
    """10 reloads while clients connect to 3 ports without pause: nothing refused or reset;
    every long session opened before a reload is held by the old process and ends intact."""
    record = {}
    ports = [free_port() for _ in range(3)]
    with Upstream(hashing_echo(record)) as up:
        proxy = relays.start(*["127.0.0.1:%d=%s" % (port, up.address) for port in ports])
        load = Load(ports)
        eventually(lambda: load.made() >= 30)
        current, owner, sessions, olds = proxy.pid, {}, [], []
        try:
            for i in range(10):
                if i % 3 == 0:           # a few sessions spanning 3 reloads, one spanning all
                    for j in range(2 if i else 3):
                        session = LongSession(ports[(i + j) % 3], b"L%d.%d" % (i, j))
                        session.until = 10 if (i, j) == (0, 2) else i + 2
                        sessions.append(session)
                        owner[session] = current
                old = current
                current, draining = relays.reload(proxy, old)
                olds.append(old)
                running = [s for s in sessions if not s.finishing.is_set()]
                assert draining >= sum(owner[s] == old for s in running)
                for session in running:     # held by the process that accepted it, only
                    inode = server_side_inode(session.port, session.client_port)
                    assert inode, "no relay socket for %r" % session.ident
                    known = [p for p in olds + [current] if relays.alive(p)]
                    assert holders(inode, known) == [owner[session]], (session.ident, known)
                for session in running:
                    if session.until == i:
                        session.finish()
                time.sleep(0.2)             # the new process serves the load for a moment
        finally:
            counts = load.stop()
            for session in sessions:
                session.finish()
            ended = [session.join() for session in sessions]
        print("\nreload under load: 10 reloads, %s, long sessions=%d" % (counts, len(sessions)))
        cut = [s.ident for s in sessions if not s.intact(record)]
        assert all(ended) and cut == [], (cut, [(s.ident, s.error) for s in sessions])
        assert counts["refused"] == counts["reset"] == counts["cut"] == 0, load.failures[:10]
        assert counts["stalled"] == counts["other"] == 0, load.failures[:10]
        assert counts["ok"] == counts["made"] > 0
        codes = [relays.wait_gone(old) for old in olds]     # once their sessions ended
        print("old processes' exit codes (None: reaped by their parent): %s" % codes)
        assert set(codes) <= {0, None}
        assert relays.code(proxy.pid) == 0
        assert round_trip(ports[0], b"after all".ljust(16, b".")) == b"after all".ljust(16, b".")
        assert relays.stop(current) in (0, None)


def test_upgrade_by_hup_runs_the_script_as_it_is_on_disk(relays, tmp_path):
    """scp + HUP: the new process runs the changed copy (its ready line shows the new
    __version__), and no connection is lost meanwhile."""
    record = {}
    script = copy_script(tmp_path)
    port = free_port()
    with Upstream(hashing_echo(record)) as up:
        proxy = relays.start("127.0.0.1:%d=%s" % (port, up.address), script=script)
        first = proxy.wait_for(r"\bready pid=%d\b" % proxy.pid)
        assert "version=%s " % edge.__version__ in first + " ", first
        load = Load([port])
        session = LongSession(port, b"upgrade")
        try:
            edit_script(script, r'^__version__ = ".*"$', '__version__ = "9.9.9-upgraded"')
            mark = proxy.mark()
            new, draining = relays.reload(proxy, proxy.pid)
            ready = proxy.wait_for(r"\bready pid=%d\b" % new, start=mark)
            assert re.search(r"\bversion=9\.9\.9-upgraded\b", ready), ready
            assert draining >= 1
            time.sleep(0.3)
        finally:
            counts = load.stop()
            session.finish()
            assert session.join()
        print("\nupgrade: %s" % counts)
        assert session.intact(record), session.error
        assert counts["ok"] == counts["made"] > 0, load.failures[:10]
        assert relays.wait_gone(proxy.pid) == 0
        assert relays.stop(new) in (0, None)


def test_reload_in_the_foreground_marks_the_old_process_lines_and_moves_the_pid_file(
        relays, tmp_path):
    """Issue 20: old and new processes write to one stderr, and the old one's `stopped
    sessions=1` read as if the relay had stopped. From the hand-over on, every line of the old
    process ends with old-pid=N; --pid-file names the new process from its take-over on and is
    still there (naming it) after the old one exits; the new one removes it at its stop."""
    pid_file = str(tmp_path / "relay.pid")
    port = free_port()
    with Upstream(echo) as up:
        proxy = relays.start("--proxy-protocol", "off", "--pid-file", pid_file,
                             "127.0.0.1:%d=%s" % (port, up.address))
        proxy.wait_for(r"\bready pid=%d\b" % proxy.pid)
        eventually(lambda: os.path.exists(pid_file))
        assert open(pid_file).read() == "%d\n" % proxy.pid
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"held")
            assert recv_exactly(c, 4) == b"held"
            mark = proxy.mark()
            new, draining = relays.reload(proxy, proxy.pid)
            assert draining == 1
            eventually(lambda: open(pid_file).read() == "%d\n" % new)
        old = " old-pid=%d" % proxy.pid
        session = proxy.wait_for(r"session client=.* end=client-fin", start=mark)
        assert session.endswith(old), session
        stopped = proxy.wait_for(r"\bstopped sessions=1\b", start=mark)
        assert stopped.endswith(old), stopped
        assert relays.wait_gone(proxy.pid) == 0
        assert open(pid_file).read() == "%d\n" % new     # the old one left it alone
        ready = proxy.wait_for(r"\bready pid=%d\b" % new, start=mark)
        assert "old-pid" not in ready
        assert relays.stop(new) in (0, None)
        eventually(lambda: not os.path.exists(pid_file))


BAD_SETTINGS = [
    # a line appended to a good file (PORTS=: words added to its PORTS= line, one PORTS= a
    # file), what `reload failed:` must say ({path}, {line}: the line's number)
    ("FOO=bar", r"{path} line {line}: .*FOO"),
    ("PORTS 2525", r"{path} line {line}: .*PORTS 2525"),
    ("PORTS={p},{q}", r"names several ports"),
    ("OPTIONS=--bogus", r"unrecognized arguments: --bogus"),
    ("OPTIONS=--proxy-protocol v3", r"--proxy-protocol: invalid choice: 'v3'"),
]


def test_reload_the_old_process_reaps_the_new_one_that_ends_first(relays):
    """The new process is the old one's child. Should it end while the old one still drains
    (`systemctl stop` ends both), the old one reaps it: a zombie left in the unit's cgroup
    until the old process's drain ended was SIGKILLed by systemd at stop (seen in the nspawn
    test under load)."""
    port = free_port()
    with Upstream(hashing_echo({})) as up:
        proxy = relays.start("127.0.0.1:%d=%s" % (port, up.address))
        old = proxy.pid
        session = LongSession(port, b"keeps it busy")     # the old process drains it
        try:
            new, draining = relays.reload(proxy, old)
            assert draining == 1
            os.kill(new, signal.SIGTERM)
            eventually(lambda: process_state(new) in (None, "Z", "X"))
            eventually(lambda: process_state(new) is None, timeout=5)   # reaped, not a zombie
            assert relays.alive(old)
        finally:
            session.finish()
            assert session.join()
        assert relays.wait_gone(old) == 0


@pytest.mark.parametrize("bad, message", BAD_SETTINGS, ids=[b for b, _ in BAD_SETTINGS])
def test_reload_with_a_bad_settings_file_fails_and_the_old_process_keeps_serving(
        relays, tmp_path, bad, message):
    """The new process refuses the file: the old one logs `reload failed: <its error line>`,
    leaves no process behind, keeps serving; once the file is fixed, a reload works."""
    port = free_port()
    settings = tmp_path / "tailwart-edge"
    with Upstream(hashing_echo({})) as up:
        good = ["127.0.0.1:%d=%s" % (port, up.address)]
        write_settings(settings, good)
        proxy = relays.start("--settings", str(settings))
        p, q = free_port(), free_port()
        bad = bad.format(p=p, q=q)
        if bad.startswith("PORTS="):
            line = write_settings(settings, good + [bad.partition("=")[2]])
        else:
            line = write_settings(settings, good, extra=[bad])
        mark = proxy.mark()
        os.kill(proxy.pid, signal.SIGHUP)
        failed = proxy.wait_for(r"reload failed", start=mark)
        expected = message.format(path=re.escape(str(settings)), line=line)
        assert re.search(r"\bwarning reload failed: .*" + expected, failed), failed
        assert "error:" not in failed.partition("reload failed:")[2], failed
        assert proxy.wait_for(r"reload: starting a new process", start=mark)
        no_children_left(proxy.pid)
        assert not re.search(r"took over|\bready\b", since(proxy, mark))
        assert proxy.proc.poll() is None
        payload = b"still serving".ljust(16, b".")
        assert round_trip(port, payload) == payload
        write_settings(settings, good)
        new, _ = relays.reload(proxy, proxy.pid)
        assert round_trip(port, payload) == payload
        assert relays.wait_gone(proxy.pid) == 0
        assert relays.stop(new) in (0, None)


def test_reload_with_an_upstream_name_that_does_not_resolve_warns_as_a_start_does(
        relays, tmp_path):
    """Issue 19: a start takes a failover list with a name that does not resolve (a retired
    MX) and warns; a reload refused it (`reload failed: cannot resolve ...`), which blocked
    every upgrade. One rule for both: the new process takes over and warns."""
    port = free_port()
    settings = tmp_path / "tailwart-edge"
    with Upstream(hashing_echo({})) as up:
        upstreams = "%s,%s:25" % (up.address, UNRESOLVABLE_NAME)
        write_settings(settings, ["127.0.0.1:%d=%s" % (port, upstreams)])
        proxy = relays.start("--settings", str(settings))
        start = proxy.wait_for(r"resolve host=%s" % re.escape(UNRESOLVABLE_NAME))
        assert "warning" in start, start
        mark = proxy.mark()
        new, _ = relays.reload(proxy, proxy.pid)
        warned = proxy.wait_for(r"resolve host=%s" % re.escape(UNRESOLVABLE_NAME), start=mark)
        assert "warning" in warned and "until it resolves" in warned, warned
        payload = b"first upstream".ljust(16, b".")
        assert round_trip(port, payload) == payload
        assert relays.wait_gone(proxy.pid) == 0
        assert relays.stop(new) in (0, None)


def test_reload_fails_when_a_new_port_is_taken_and_the_old_process_keeps_serving(
        relays, tmp_path):
    """A mapping added on a port another program listens on: `reload failed: cannot listen
    on 127.0.0.1:PORT: ...`; the old process keeps serving the ports it has."""
    port = free_port()
    settings = tmp_path / "tailwart-edge"
    with Upstream(hashing_echo({})) as up, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        good = ["127.0.0.1:%d=%s" % (port, up.address)]
        write_settings(settings, good)
        proxy = relays.start("--settings", str(settings))
        load = Load([port])
        try:
            write_settings(settings, good + ["127.0.0.1:%d=%s" % (busy, up.address)])
            mark = proxy.mark()
            os.kill(proxy.pid, signal.SIGHUP)
            failed = proxy.wait_for(r"reload failed", start=mark)
            assert re.search(r"\bwarning reload failed: cannot listen on 127\.0\.0\.1:%d: .*in use"
                             % busy, failed), failed
            no_children_left(proxy.pid)
            time.sleep(0.2)
        finally:
            counts = load.stop()
        assert counts["ok"] == counts["made"] > 0, load.failures[:10]
        assert proxy.proc.poll() is None
        assert not re.search(r"took over", since(proxy, mark))


def test_reload_adds_and_removes_mappings(relays, tmp_path):
    """Settings edited from ports A+B to A+C: after the hand-over C serves, B refuses new
    connections (a session open on B still finishes), A was never refused."""
    a, b, c = free_port(), free_port(), free_port()
    settings = tmp_path / "tailwart-edge"
    record = {}
    with Upstream(hashing_echo(record)) as up:
        spec = lambda port: "127.0.0.1:%d=%s" % (port, up.address)     # noqa: E731
        write_settings(settings, [spec(a), spec(b)])
        proxy = relays.start("--settings", str(settings))
        with pytest.raises(ConnectionRefusedError):
            connect(("127.0.0.1", c), timeout=2).close()
        load = Load([a])
        session = LongSession(b, b"on B")
        try:
            write_settings(settings, [spec(a), spec(c)])
            mark = proxy.mark()
            new, draining = relays.reload(proxy, proxy.pid)
            assert draining >= 1
            listens = since(proxy, mark)
            assert "listen addr=127.0.0.1:%d " % c in listens, listens
            payload = b"on C".ljust(16, b".")
            assert round_trip(c, payload) == payload

            def b_refuses():
                try:
                    connect(("127.0.0.1", b), timeout=2).close()
                except ConnectionRefusedError:
                    return True
                return False
            eventually(b_refuses, 5)
            time.sleep(0.2)
        finally:
            counts = load.stop()
            session.finish()
            assert session.join()
        print("\nadd/remove: port A %s" % counts)
        assert session.intact(record), session.error
        assert counts["ok"] == counts["made"] > 0, load.failures[:10]
        assert relays.wait_gone(proxy.pid) == 0
        with pytest.raises(ConnectionRefusedError):
            connect(("127.0.0.1", b), timeout=2).close()
        assert round_trip(a, payload) == payload
        assert relays.stop(new) in (0, None)


def served(port, host):
    """Does a client to host:port get its bytes echoed (True) or is it refused (False)?"""
    payload = b"which family".ljust(16, b".")
    try:
        return round_trip(port, payload, host=host) == payload
    except ConnectionRefusedError:
        return False


# (listen address before, after a reload): a socket of another shape on the same port
RESHAPED = [
    ("0.0.0.0:{p}", "{p}"),             # IPv4 only -> every interface
    ("{p}", "[::]:{p}"),                # dual stack -> IPv6 only
    ("127.0.0.1:{p}", "{p}"),           # one address -> every interface
]


@pytest.mark.parametrize("before, after", RESHAPED, ids=["%s to %s" % r for r in RESHAPED])
def test_reload_that_changes_the_shape_of_a_listen_address_fails_saying_restart(
        relays, tmp_path, before, after):
    """Issue 19: old sockets were adopted by address and port alone. 0.0.0.0:P -> P took
    over and then refused IPv6 clients; P -> [::]:P took over, logged `[::]:P` (IPv6 only)
    and served IPv4; 127.0.0.1:P -> P failed blaming "another program" (the relay itself).
    Now each fails, naming the change and the fix (a restart), and the old process serves on
    as it did."""
    if not has_ipv6():
        pytest.skip("no IPv6 on this host")
    port = free_port("::")                  # free for IPv4 and IPv6 alike
    settings = tmp_path / "tailwart-edge"
    with Upstream(hashing_echo({})) as up:
        write_settings(settings, ["%s=%s" % (before.format(p=port), up.address)])
        proxy = relays.start("--settings", str(settings))
        families = {host: served(port, host) for host in ("127.0.0.1", "::1")}
        write_settings(settings, ["%s=%s" % (after.format(p=port), up.address)])
        mark = proxy.mark()
        os.kill(proxy.pid, signal.SIGHUP)
        line = proxy.wait_for(r"reload failed|took over", start=mark)
        assert re.search(r"\bwarning reload failed: the bind address of :%d changed \(listening "
                         r"on \S+, the settings say \S+\); restart to apply$" % port, line), \
            since(proxy, mark)
        assert "another program" not in line
        no_children_left(proxy.pid)
        assert proxy.proc.poll() is None
        assert {host: served(port, host) for host in families} == families
        assert relays.stop(proxy.pid) == 0


@pytest.mark.parametrize("ports", [["{p}"], ["[::]:{p}", "0.0.0.0:{p}"], ["[::1]:{p}"]],
                         ids=["every interface", "each family", "one IPv6 address"])
def test_reload_adopts_every_listen_address_of_the_same_shape(relays, tmp_path, ports):
    """A reload with the listen addresses unchanged hands every socket over, whatever its
    shape; the new process serves IPv4 and IPv6 as the old one did."""
    if not has_ipv6():
        pytest.skip("no IPv6 on this host")
    port = free_port("::")
    settings = tmp_path / "tailwart-edge"
    with Upstream(hashing_echo({})) as up:
        write_settings(settings, ["%s=%s" % (p.format(p=port), up.address) for p in ports])
        proxy = relays.start("--settings", str(settings))
        families = {host: served(port, host) for host in ("127.0.0.1", "::1")}
        mark = proxy.mark()
        new, _ = relays.reload(proxy, proxy.pid)
        text = since(proxy, mark)
        assert text.count("(handed over)") == len(ports), text
        assert relays.wait_gone(proxy.pid) == 0
        assert {host: served(port, host) for host in families} == families
        assert relays.stop(new) in (0, None)


def catches(pid, signum):
    """Has the process installed a handler for signum (SigCgt in /proc/PID/status)?"""
    try:
        with open("/proc/%d/status" % pid) as f:
            mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", f.read(), re.M).group(1), 16)
    except (OSError, AttributeError):
        return False
    return bool(mask >> (signum - 1) & 1)


def cmdline(pid):
    """A process's command line as one string ('' when it is gone)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def term_during_reload(relays, tmp_path, wait_for_handlers):
    """HUP to a relay whose copy on disk now sleeps 2 s at start-up, TERM to it while the new
    process starts; returns the new process's exit code (None: reaped by the old one)."""
    script = copy_script(tmp_path)
    port = free_port()
    with Upstream(hashing_echo({})) as up:
        proxy = relays.start("127.0.0.1:%d=%s" % (port, up.address), script=script)
        make_slow(script, 2)
        mark = proxy.mark()
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for(r"notice reload: starting a new process", start=mark)
        eventually(lambda: children(proxy.pid), 5)
        new, = children(proxy.pid)
        relays.pids.add(new)
        if wait_for_handlers:               # it sleeps now, its TERM handler in place
            # after the exec: a forked child that has not exec'd yet still shows the old
            # process's handlers, and the exec resets them (a TERM then killed it, rarely)
            eventually(lambda: str(script) in cmdline(new) and catches(new, signal.SIGTERM), 5)
        os.kill(proxy.pid, signal.SIGTERM)
        assert ended(proxy) == 0
        code = relays.wait_gone(new)
        text = since(proxy, mark)
        assert "took over" not in text, text
        print("\nTERM during a reload (handlers in place: %s):\n%s" % (wait_for_handlers, text))
        with pytest.raises(ConnectionRefusedError):
            connect(("127.0.0.1", port), timeout=2).close()
        assert [pid for pid in relays.all_pids() if relays.alive(pid)] == []
        return code


def test_sigterm_while_the_new_process_starts_ends_both(relays, tmp_path):
    """TERM to the old process while the new one is starting (a copy that sleeps 2 s at
    start-up, its signal handlers in place): the new one is stopped without taking over
    and exits 0, the old exits 0, no process is left."""
    assert term_during_reload(relays, tmp_path, wait_for_handlers=True) in (0, None)


def test_sigterm_right_after_hup_ends_both(relays, tmp_path):
    """TERM right after `reload: starting a new process`: the old one exits 0, and the new
    one ends (by the TERM itself if it came before the interpreter caught signals) without
    taking over; no process is left."""
    code = term_during_reload(relays, tmp_path, wait_for_handlers=False)
    print("TERM right after HUP: the new process's exit code %s" % code)
    assert code in (0, None, -signal.SIGTERM)


def test_sigterm_after_the_hand_over_ends_the_old_process_only(relays):
    """TERM to the old process after `took over`: it exits 0, the new one keeps serving, and
    ends with exit 0 on its own TERM."""
    port = free_port()
    payload = b"new one serves".ljust(16, b".")
    with Upstream(hashing_echo({})) as up:
        proxy = relays.start("127.0.0.1:%d=%s" % (port, up.address))
        load = Load([port])
        try:
            new, _ = relays.reload(proxy, proxy.pid)
            proxy.signal(signal.SIGTERM)
            assert ended(proxy) == 0
            time.sleep(0.3)
        finally:
            counts = load.stop()
        assert counts["ok"] == counts["made"] > 0, load.failures[:10]
        assert relays.alive(new)
        assert round_trip(port, payload) == payload
        assert relays.stop(new) == 0            # this test process reaps it (a subreaper)
        with pytest.raises(ConnectionRefusedError):
            connect(("127.0.0.1", port), timeout=2).close()


def test_sigterm_to_a_draining_old_process_ends_it_within_the_drain_timeout(relays):
    """After the hand-over, TERM to the old process (a session still open): it closes what it
    has left (within --drain-timeout 1) and exits 0; the new one keeps serving."""
    port = free_port()
    payload = b"new one serves".ljust(16, b".")
    with Upstream(hashing_echo({})) as up:
        proxy = relays.start("--drain-timeout", "1", "127.0.0.1:%d=%s" % (port, up.address))
        with connect(("127.0.0.1", port)) as held:
            held.sendall(b"held".ljust(16, b"."))
            assert recv_exactly(held, 16) == b"held".ljust(16, b".")
            new, draining = relays.reload(proxy, proxy.pid)
            assert draining == 1
            mark = proxy.mark()
            proxy.signal(signal.SIGTERM)
            assert recv_all(held) == b""            # closed by the old process
            assert ended(proxy) == 0
        assert "end=drain" in proxy.wait_for(r"session client=", start=mark)
        assert relays.alive(new)
        assert round_trip(port, payload) == payload
        assert relays.stop(new) == 0


def test_hup_during_a_reload_is_ignored(relays, tmp_path):
    """A second HUP while the new process starts logs `reload: already in progress`: one
    new process, one hand-over."""
    script = copy_script(tmp_path)
    port = free_port()
    with Upstream(hashing_echo({})) as up:
        proxy = relays.start("127.0.0.1:%d=%s" % (port, up.address), script=script)
        make_slow(script, 1)
        mark = proxy.mark()
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for(r"reload: starting a new process", start=mark)
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for(r"notice reload: already in progress", start=mark)
        took = proxy.wait_for(TOOK_OVER, start=mark)
        new = int(re.search(TOOK_OVER, took).group(1))
        relays.pids.add(new)
        assert relays.wait_gone(proxy.pid) == 0
        text = since(proxy, mark)
        assert text.count("reload: starting a new process") == 1, text
        assert len(re.findall(r"took over", text)) == 1, text
        assert children(new) == []
        assert relays.stop(new) in (0, None)


def test_hup_to_a_draining_old_process_is_ignored(relays):
    """The old process, draining a session after the hand-over, ignores HUP: no new process."""
    port = free_port()
    record = {}
    with Upstream(hashing_echo(record)) as up:
        proxy = relays.start("127.0.0.1:%d=%s" % (port, up.address))
        session = LongSession(port, b"draining")
        try:
            new, draining = relays.reload(proxy, proxy.pid)
            assert draining >= 1
            mark = proxy.mark()
            proxy.signal(signal.SIGHUP)
            time.sleep(1)                   # a start would show within this
            assert "starting a new process" not in since(proxy, mark)
            assert children(proxy.pid) == [new] or children(proxy.pid) == []
            assert proxy.proc.poll() is None
        finally:
            session.finish()
            assert session.join()
        assert session.intact(record), session.error
        assert relays.wait_gone(proxy.pid) == 0
        assert relays.stop(new) in (0, None)


# -- the settings file: grammar, through the real script and parse_args ----------------------

def settings_error(path):
    code, out, err = run_script("--settings", str(path))
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tailwart_edge.py: error: "), lines[0]
    return lines[0]


def test_settings_file_unknown_key_exits_2_naming_file_and_line(tmp_path):
    path = tmp_path / "settings"
    path.write_text("# settings\n\nUPSTREAM=127.0.0.1\nFOO=bar\nPORTS=2525\n")
    line = settings_error(path)
    assert line.startswith("tailwart_edge.py: error: %s line 4: " % path), line
    assert "FOO" in line


def test_settings_file_line_without_equals_exits_2_naming_file_and_line(tmp_path):
    path = tmp_path / "settings"
    path.write_text("UPSTREAM=127.0.0.1\nPORTS 2525\n")
    line = settings_error(path)
    assert line.startswith("tailwart_edge.py: error: %s line 2: " % path), line


def test_settings_file_missing_exits_2_naming_it(tmp_path):
    path = tmp_path / "no-such-file"
    line = settings_error(path)
    assert str(path) in line, line


def test_settings_file_comments_blank_lines_and_quoted_words(tmp_path):
    """# comments, blank lines; "..." and '...' around a value; unquoted values of several
    words (as the README writes PORTS=25 465 ...)."""
    path = tmp_path / "settings"
    path.write_text("# /etc/default/tailwart-edge\n\n   \nUPSTREAM=\"mail.example\"\n"
                    "# PORTS=1 2 3\nPORTS=2525 127.0.0.1:2526 '2527=other:25'\n\n"
                    "OPTIONS=--proxy-protocol v1 --connect-timeout \"2.5\"\n")
    options, mappings = edge.parse_args(["--settings", str(path)])
    assert [(m.bind, m.port, m.upstreams) for m in mappings] == [
        (None, 2525, [("mail.example", 2525)]), ("127.0.0.1", 2526, [("mail.example", 2526)]),
        (None, 2527, [("other", 25)])]
    assert options.proxy_protocol == "v1" and options.connect_timeout == 2.5


def test_settings_file_quoted_values_of_several_words_split_as_systemd_does(tmp_path):
    """The file systemd reads today as EnvironmentFile= (PORTS="25 465" and $PORTS in
    ExecStart=: two words) means the same through --settings."""
    path = tmp_path / "settings"
    path.write_text("UPSTREAM=mail.example\nPORTS=\"2525 127.0.0.1:2526\"\n"
                    "OPTIONS='--proxy-protocol v1 --connect-timeout 2.5'\n")
    options, mappings = edge.parse_args(["--settings", str(path)])
    assert [(m.bind, m.port, m.upstreams) for m in mappings] == [
        (None, 2525, [("mail.example", 2525)]), ("127.0.0.1", 2526, [("mail.example", 2526)])]
    assert options.proxy_protocol == "v1" and options.connect_timeout == 2.5


def test_settings_file_without_ports_means_the_six_mail_ports(tmp_path):
    path = tmp_path / "settings"
    path.write_text("UPSTREAM=mx.example\n")
    _, mappings = edge.parse_args(["--settings", str(path)])
    assert [(m.bind, m.port, m.upstreams) for m in mappings] == [
        (None, port, [("mx.example", port)]) for port in (25, 465, 587, 143, 993, 4190)]


def test_settings_file_then_the_command_line_which_adds_and_wins(tmp_path):
    """The command line adds mappings after the file's; an option given twice: the later."""
    path = tmp_path / "settings"
    path.write_text("UPSTREAM=mx.example\nPORTS=2525\nOPTIONS=--connect-timeout 2.5\n")
    options, mappings = edge.parse_args(["--settings", str(path), "--connect-timeout", "7",
                                         "2600=other:26"])
    assert [(m.bind, m.port, m.upstreams) for m in mappings] == [
        (None, 2525, [("mx.example", 2525)]), (None, 2600, [("other", 26)])]
    assert options.connect_timeout == 7


def settings_words_of(tmp_path, text):
    """settings_words of a file holding `text` (str: written as UTF-8; bytes: as they are)."""
    path = tmp_path / "settings"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return edge.settings_words(str(path))


def test_settings_file_quote_in_a_comment_changes_no_other_line(tmp_path):
    """Issue 19, fault 4: at f50fa61 the one `"` in the comment glued the next lines into it:
    --deny vanished and PORTS=25 587 became the six default ports (143, 465, 993, 4190 open)."""
    path = tmp_path / "settings"
    path.write_text('UPSTREAM=mx # the 12" rack box\nPORTS=25 587\nOPTIONS=--deny 192.0.2.0/24\n')
    options, mappings = edge.parse_args(["--settings", str(path)])
    assert [(m.port, m.upstreams) for m in mappings] == [(25, [("mx", 25)]), (587, [("mx", 587)])]
    assert [str(n) for n in options.deny] == ["192.0.2.0/24"]


SETTINGS_READINGS = [
    # (file text, the words it stands for): as sh reads the values, then split as systemd does
    ('UPSTREAM=mx # the 12" rack box\nPORTS=25\n', ["--upstream", "mx", "25"]),
    ("UPSTREAM=mx # it's\nPORTS=25\n", ["--upstream", "mx", "25"]),
    ('PORTS="25 587" # a "quoted" comment\n', ["25", "587"]),
    ("PORTS=25 a#b\n", ["25", "a#b"]),                    # `#` inside a word: not a comment
    ("PORTS='#x' \"#y\" \\#z #w\n", ["#x", "#y", "#z"]),
    ('PORTS="25\n  # inside quotes: words\n  587"\n', ["25", "#", "inside", "quotes:", "words",
                                                         "587"]),
    ("PORTS=25 \\\n  587\n", ["25", "587"]),               # a backslash goes on
    ("PORTS=2\\\n5\n", ["25"]),                            # ... and vanishes with the break
    ("PORTS='25\\'\n", ["25\\"]),                          # literal in '...'
    ('PORTS="a\\"b\\\\c\\d"\n', ['a"b\\c\\d']),
    ("PORTS=25 \\ \nUPSTREAM=mx\n", ["--upstream", "mx", "25"]),   # `\ `: no backslash at the end
    ("  UPSTREAM = mx\t\n\n   # indented comment\nPORTS=25\n", ["--upstream", "mx", "25"]),
    ("UPSTREAM=mx\r\nPORTS=25 587\r\n", ["--upstream", "mx", "25", "587"]),
    (b"\xef\xbb\xbfUPSTREAM=mx\r\nPORTS=25\r\n", ["--upstream", "mx", "25"]),  # a BOM, as CR
    ("PORTS=\n", []),
]


@pytest.mark.parametrize("text, words", SETTINGS_READINGS, ids=[repr(t) for t, _ in SETTINGS_READINGS])
def test_settings_file_reads_values_as_sh_does(tmp_path, text, words):
    assert settings_words_of(tmp_path, text) == words


SETTINGS_REFUSED = [
    # (file text, what the one error line says after "{path} ")
    ("PORTS=25\nUPSTREAM=mx\nPORTS=587\n", "line 3: a second PORTS= (the first is on line 1)"),
    ("OPTIONS=-q\nOPTIONS=-v\n", "line 2: a second OPTIONS= (the first is on line 1)"),
    ("UPSTREAM=mx\nUPSTREAM = mx2\n", "line 2: a second UPSTREAM= (the first is on line 1)"),
    ('UPSTREAM=mx\nPORTS="25 587\nOPTIONS=-q\n', 'line 2: the value of PORTS= opens a quote (")'),
    ("PORTS='25\n", "line 1: the value of PORTS= opens a quote (')"),
    ("PORTS=25 \\", "line 1: the value of PORTS= ends in a backslash"),
    ("OPTIONS=-q --check\n", "line 1: OPTIONS= may not hold --check"),
    ("OPTIONS=--reload 1\n", "line 1: OPTIONS= may not hold --reload"),
    ("OPTIONS=--settings=/etc/other\n", "line 1: OPTIONS= may not hold --settings"),
    ("OPTIONS=-q -h\n", "line 1: OPTIONS= may not hold -h"),   # the service would exit 0
    (b"PORTS=25\n# caf\xe9\n", "line 2: byte 0xe9 is not UTF-8 text"),
    ("PORTS=25\x00\n", "line 1: control character '\\x00'"),
]


@pytest.mark.parametrize("text, message", SETTINGS_REFUSED, ids=[repr(t) for t, _ in SETTINGS_REFUSED])
def test_settings_file_refused_naming_file_and_line(tmp_path, text, message):
    with pytest.raises(edge.ConfigError) as refused:
        settings_words_of(tmp_path, text)
    assert str(refused.value).startswith("%s %s" % (tmp_path / "settings", message)), refused.value


SETTINGS_MISTAKES = [
    # (file text, the whole error line after "tailwart_edge.py: error: "; {path}: the file)
    ("UPSTREAM=mx:25\n", "{path} line 1: UPSTREAM=mx:25 names a port; drop the port: each "
     "port goes to the same port there (UPSTREAM=mx)"),
    ("# mail\nUPSTREAM=[fd7a::1]:25\n", "{path} line 2: UPSTREAM=[fd7a::1]:25 names a port; "
     "drop the port: each port goes to the same port there (UPSTREAM=[fd7a::1])"),
    ("UPSTREAM=fd7a::1\n", "{path} line 1: UPSTREAM=fd7a::1 is not a host name or IP address "
     "(IPv6 goes in brackets, as in [fd7a:115c:a1e0::1])"),
    ("", "{path}: no UPSTREAM= line; add UPSTREAM=HOST (the mail server)"),
    ("PORTS=25 465\nOPTIONS=-q\n", "{path}: no UPSTREAM= line; add UPSTREAM=HOST (the mail "
     "server)"),
    ("UPSTREAM=mx\n\nOPTIONS=-q --idle-timout 5\n", "unrecognized arguments: --idle-timout "
     "(in OPTIONS= of {path} line 3); did you mean --idle-timeout?"),
    ("OPTIONS=--connect-timeout 0\nUPSTREAM=mx\n", "argument --connect-timeout: '0' is not a "
     "positive number of seconds, e.g. 10 (in OPTIONS= of {path} line 1)"),
]


@pytest.mark.parametrize("text, message", SETTINGS_MISTAKES,
                         ids=[repr(t) for t, _ in SETTINGS_MISTAKES])
def test_settings_file_mistake_names_its_line_and_the_fix(tmp_path, text, message):
    """Issue 20: the file's UPSTREAM= and OPTIONS= errors name the file and line (before:
    `--upstream 'mx:25' is not a host name`, `give --upstream HOST` for an empty file,
    `unrecognized arguments: --idle-timout` from nowhere)."""
    path = tmp_path / "settings"
    path.write_text(text)
    assert settings_error(path) == "tailwart_edge.py: error: " + message.format(path=path)


def test_settings_file_upstream_beside_ports_that_need_none_is_not_asked_for(tmp_path):
    """A file without UPSTREAM= is fine when every PORTS word names its upstream, or when
    the command line gives --upstream."""
    path = tmp_path / "settings"
    path.write_text("PORTS=2525=mx:25\n")
    assert [m.upstreams for m in edge.parse_args(["--settings", str(path)])[1]] == [[("mx", 25)]]
    path.write_text("PORTS=2525\n")
    assert [m.upstreams for m in edge.parse_args(["--settings", str(path), "--upstream",
                                                  "mx"])[1]] == [[("mx", 2525)]]


def test_settings_file_unterminated_quote_exits_2_naming_the_line_it_opened(tmp_path):
    path = tmp_path / "settings"
    path.write_text('UPSTREAM=mx\nPORTS="25 587\nOPTIONS=--deny 192.0.2.0/24\n')
    line = settings_error(path)
    assert line.startswith('tailwart_edge.py: error: %s line 2: the value of PORTS= opens a quote'
                           % path), line


def settings_quoted(word, rng):
    """`word` written for sh in a style rng picks (bare with backslashes, '...', "...", or
    two parts in two styles); sh and the settings file read it back as `word`."""
    style = rng.randrange(4)
    if style == 3 and len(word) > 1:
        cut = rng.randrange(1, len(word))
        return settings_quoted(word[:cut], rng) + settings_quoted(word[cut:], rng)
    if style == 1:
        return "'" + word.replace("'", "'\\''") + "'"
    if style == 2:
        return '"' + re.sub(r'([$`"\\])', r"\\\1", word) + '"'
    bare = re.sub(r"([ \t'\"\\$`])", r"\\\1", word)
    return "\\" + bare if bare.startswith("#") else bare


SETTINGS_VOCABULARY = {
    "PORTS": ["25", "465", "127.0.0.1:2525=10.0.0.5:25", "[::1]:993=[fd7a:115c:a1e0::1]:993",
              "443@mail.example.com,alpn:acme-tls/1", "80=127.0.0.1:8080/proxy=off", "a#b",
              "#hash", '12"', "it's", "back\\slash", "$HOME", "`x`", "x=y", "\u00fc"],
    "OPTIONS": ["--proxy-protocol", "v1", "-q", "--deny", "192.0.2.0/24", "--user", "mail#1",
                "--connect-timeout=2.5", '"', "'", "\\"],
    "UPSTREAM": ["mx", "stalwart.tail7b1641.ts.net", "[fd7a:115c:a1e0::1]", "a#b", "x\"y"],
}


def settings_generated(rng):
    """A settings file of known words, written in the ways sh allows -> (text, its words)."""
    lines, values = [], {}
    keys = [key for key in ("UPSTREAM", "PORTS", "OPTIONS") if rng.random() < 0.8]
    rng.shuffle(keys)
    for key in keys:
        if rng.random() < 0.3:
            lines.append(rng.choice(["", "# a comment with \" and ' and \\", "  #x=\"y"]))
        count = 1 if key == "UPSTREAM" else rng.randrange(5)
        words = [rng.choice(SETTINGS_VOCABULARY[key]) for _ in range(count)]
        if words and key != "UPSTREAM" and rng.random() < 0.3:     # the README's PORTS="..."
            parts = [re.sub(r'([$`"\\])', r"\\\1", w) for w in words]
            value = '"' + "".join(p + rng.choice([" ", "\n  ", "\t"]) for p in parts) + '"'
        else:
            value = "".join(settings_quoted(w, rng) + rng.choice([" ", "\t", " \\\n  ", "  "])
                            for w in words)
        if rng.random() < 0.3:
            value += " # the 12\" rack, it's \\"
        values[key] = words
        lines.append(rng.choice(["", " "]) + key + "=" + value)
    text = rng.choice(["\n", "\r\n"]).join(lines) + rng.choice(["", "\n"])
    words = list(values.get("OPTIONS", []))
    if "UPSTREAM" in values:
        words += ["--upstream"] + values["UPSTREAM"]
    return text, words + values.get("PORTS", edge.DEFAULT_PORTS)


SETTINGS_MUTATIONS = [b'"', b"'", b"\\", b"#", b"=", b"\n", b"\r", b"\r\n", b" ", b"\t",
                      b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\xe2\x80", b"\x00"]


def test_abuse_settings_file_fuzz_refuses_with_config_error_or_means_what_it_says():
    """Seeded: 4,000 files of known words written in the ways sh allows read back as those
    words; 16,000 mutations (quotes, backslashes, #, =, line breaks, BOMs, bytes that are not
    UTF-8) of them and of the README's and these tests' files raise ConfigError or read as
    words, never anything else. `abuse`: ~2 s, in the pytest interpreter: once is enough."""
    rng = random.Random(19)
    seeds = [("UPSTREAM=stalwart.tail7b1641.ts.net\n" + readme_block(
        "UPSTREAM=stalwart.tail7b1641.ts.net")).encode()]
    seeds += [t if isinstance(t, bytes) else t.encode() for t, _ in SETTINGS_READINGS]
    seeds += [t if isinstance(t, bytes) else t.encode() for t, _ in SETTINGS_REFUSED]
    for _ in range(4000):
        text, words = settings_generated(rng)
        assert edge.words_of_settings(text.encode(), "F") == words, text
        seeds.append(text.encode())
    outcomes = collections.Counter()
    for _ in range(16000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data) + 1)
            change = rng.randrange(3)
            if change == 0:
                data[at:at] = rng.choice(SETTINGS_MUTATIONS)
            elif change == 1:
                del data[at:at + 1]
            else:
                data[at:at] = data[at:at + 1]
        try:
            words = edge.words_of_settings(bytes(data), "F")
        except edge.ConfigError as e:
            assert str(e).count("\n") == 0, (bytes(data), e)
            outcomes["refused"] += 1
            continue
        assert all(w and not re.search(r"[ \t\n\r\x00]", w) for w in words), (bytes(data), words)
        outcomes["read"] += 1
    assert outcomes["refused"] > 1000 and outcomes["read"] > 1000, outcomes


# -- --reload PID ------------------------------------------------------------------------------

def reload_client(pid, env):
    proc = subprocess.run([PYTHON, SCRIPT, "--reload", str(pid)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                          universal_newlines=True, timeout=WAIT * 2)
    return proc.returncode, proc.stdout, proc.stderr


def test_reload_option_without_runtime_directory_says_it_cannot_and_exits_2(relays, monkeypatch):
    """Issue 19: outside the unit (no RUNTIME_DIRECTORY) --reload PID sent HUP, printed nothing
    and exited 0, even when the reload then failed. It cannot learn the outcome there: it says
    so in one line, with what to do instead, sends nothing and exits 2."""
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    port = free_port()
    env = dict(os.environ)
    with Upstream(hashing_echo({})) as up:
        proxy = relays.start("127.0.0.1:%d=%s" % (port, up.address))
        mark = proxy.mark()
        code, out, err = reload_client(proxy.pid, env)
        assert code == 2 and out == "", (code, out, err)
        lines = err.splitlines()
        assert len(lines) == 1 and "RUNTIME_DIRECTORY" in lines[0], err
        assert "kill -HUP %d" % proxy.pid in lines[0], err
        time.sleep(0.5)                     # a reload would show within this
        assert "reload" not in since(proxy, mark)
        assert relays.stop(proxy.pid) == 0


def reload_client_started(pid, env):
    """--reload PID as a process of its own (to be waited for with a bound)."""
    return subprocess.Popen([PYTHON, SCRIPT, "--reload", str(pid)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                            universal_newlines=True)


def outcome_of(client, timeout=WAIT):
    """(exit code, stderr) of a --reload process; ("still waiting", "") after `timeout`."""
    try:
        _, err = client.communicate(timeout=timeout)
        return client.returncode, err
    except subprocess.TimeoutExpired:
        client.kill()
        client.communicate()
        return "still waiting", ""


def test_reload_option_to_a_draining_old_process_fails_at_once_naming_the_new_pid(
        relays, tmp_path):
    """Issue 19: a HUP the relay ignores (an old process draining after a hand-over) left
    --reload waiting 90 s for `no reload outcome`. Every HUP gets an outcome: exit 1 at once,
    naming the pid to reload instead."""
    port = free_port()
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = dict(os.environ, RUNTIME_DIRECTORY=str(runtime))
    with Upstream(hashing_echo({})) as up:
        proxy = relays.start("127.0.0.1:%d=%s" % (port, up.address),
                             env={"RUNTIME_DIRECTORY": str(runtime)})
        session = LongSession(port, b"draining")
        try:
            new, draining = relays.reload(proxy, proxy.pid)
            assert draining >= 1
            code, err = outcome_of(reload_client_started(proxy.pid, env))
            assert code == 1, (code, err)
            assert re.search(r"reload failed: pid %d is stopping; nothing was reloaded: pid %d "
                             r"took over from it, reload that one" % (proxy.pid, new), err), err
        finally:
            session.finish()
            assert session.join()
        assert relays.wait_gone(proxy.pid) == 0
        assert relays.stop(new) in (0, None)


def test_reload_option_during_start_up_fails_at_once_saying_reload_again(relays, tmp_path):
    """Issue 19: a HUP during start-up is ignored (it must not kill the relay): --reload
    waited 90 s for `no reload outcome`. Now it exits 1 at once: nothing was reloaded."""
    script = copy_script(tmp_path)
    make_slow(script, 2)
    port = free_port()
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = dict(os.environ, RUNTIME_DIRECTORY=str(runtime))
    with Upstream(hashing_echo({})) as up:
        starting = subprocess.Popen([PYTHON, script, "127.0.0.1:%d=%s" % (port, up.address)],
                                    stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        try:
            # it sleeps now, its HUP handler in place (after the exec: see term_during_reload)
            eventually(lambda: str(script) in cmdline(starting.pid)
                       and catches(starting.pid, signal.SIGHUP), 5)
            code, err = outcome_of(reload_client_started(starting.pid, env))
            assert code == 1, (code, err)
            assert "reload failed: pid %d was starting up; nothing was reloaded: reload again" \
                % starting.pid in err, err
            assert starting.poll() is None
        finally:
            starting.terminate()
            starting.wait(WAIT)


def test_reload_option_when_a_term_aborts_the_reload_fails_at_once(relays, tmp_path):
    """Issue 19: TERM while the new process starts stops both: --reload waited 90 s for `no
    reload outcome`. Now it exits 1 at once, saying the reload was stopped."""
    script = copy_script(tmp_path)
    port = free_port()
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = dict(os.environ, RUNTIME_DIRECTORY=str(runtime))
    with Upstream(hashing_echo({})) as up:
        proxy = relays.start("127.0.0.1:%d=%s" % (port, up.address), script=script,
                             env={"RUNTIME_DIRECTORY": str(runtime)})
        make_slow(script, 2)
        mark = proxy.mark()
        client = reload_client_started(proxy.pid, env)
        proxy.wait_for(r"notice reload: starting a new process", start=mark)
        os.kill(proxy.pid, signal.SIGTERM)
        code, err = outcome_of(client)
        assert code == 1, (code, err)
        assert "reload failed: stopped (TERM or INT) before the new process took over" in err, err
        assert ended(proxy) == 0
        assert "took over" not in since(proxy, mark)


def test_reload_option_with_runtime_directory_waits_and_reports(relays, tmp_path):
    """RUNTIME_DIRECTORY for relay and client: --reload exits 0 once the new process took
    over, 1 printing the failure line when the settings file is bad."""
    port = free_port()
    runtime = tmp_path / "run"
    runtime.mkdir()
    settings = tmp_path / "tailwart-edge"
    env = dict(os.environ, RUNTIME_DIRECTORY=str(runtime))
    with Upstream(hashing_echo({})) as up:
        good = ["127.0.0.1:%d=%s" % (port, up.address)]
        write_settings(settings, good)
        proxy = relays.start("--settings", str(settings), env={"RUNTIME_DIRECTORY": str(runtime)})
        mark = proxy.mark()
        code, out, err = reload_client(proxy.pid, env)
        assert code == 0, (out, err)
        took = proxy.wait_for(TOOK_OVER, timeout=2, start=mark)   # already logged: it waited
        new = int(re.search(TOOK_OVER, took).group(1))
        relays.pids.add(new)
        said = re.search(r"pid=(\d+)", out + err)
        assert said is None or int(said.group(1)) == new, (out, err)
        assert relays.alive(new)

        line = write_settings(settings, good, extra=["FOO=bar"])
        mark = proxy.mark()
        code, out, err = reload_client(new, env)
        assert code == 1, (out, err)
        assert re.search(r"%s line %d: .*FOO" % (re.escape(str(settings)), line), err), err
        proxy.wait_for(r"reload failed: ", start=mark)
        payload = b"still serving".ljust(16, b".")
        assert round_trip(port, payload) == payload
        assert relays.alive(new)
        no_children_left(new)
        assert relays.wait_gone(proxy.pid) == 0
        assert relays.stop(new) in (0, None)


def test_abuse_dns_goes_silent_during_a_stream_of_sessions(dns):
    """The abuse run's silent name server: sessions keep coming, to a named upstream, while the
    name server answers, then goes silent for a few seconds (many times --dns-ttl), then
    answers again. Every session is served from the last good answer, none waits out a
    lookup, and the relay is idle afterwards (fault 5)."""
    stub, sandbox = dns(timeout=2)
    port = free_port()
    with Upstream(header_echo) as up, \
            Edge("--dns-ttl", "0.3", "--connect-timeout", "1",
                 "127.0.0.1:%d=%s:%d" % (port, DNS_NAME, up.port), preexec_fn=sandbox) as proxy:
        served, started = 0, time.monotonic()
        while time.monotonic() - started < 6:
            elapsed = time.monotonic() - started
            stub.silent = 1.5 < elapsed < 4.5
            payload = b"session %d" % served
            assert round_trip(port, payload) == payload, (served, proxy.output()[-2000:])
            served += 1
            time.sleep(0.02)
        assert stub.dropped, "the name server was never asked while silent"
        assert "connect-failed" not in proxy.output(), proxy.output()[-2000:]
        assert spin_seconds(proxy.pid) < 0.5
        assert not trouble(proxy.output())
        print("%d sessions, %d lookups dropped by the silent name server" % (served, stub.dropped))


def test_default_connection_cap_fits_memory_as_well_as_descriptors(monkeypatch):
    """Fault 8: the cap came from the open-file limit alone: LimitNOFILE=262144 sized the relay
    to ~130,000 sessions, which a 1 GB VPS cannot hold at up to 128 KiB each. Now the smaller of
    what the descriptors allow and what half the memory holds (less the splice pipes, full);
    an explicit --max-connections
    above the descriptors is lowered to them."""
    monkeypatch.setattr(edge.resource, "getrlimit", lambda which: (262144, 262144))
    monkeypatch.setattr(edge, "memory_budget", lambda: (1 << 30) // 2)     # a 1 GiB VPS
    sessions, pipes = edge.capacity(6)
    assert pipes == edge.MAX_PIPES      # full, they hold 64 MiB: not there for sessions
    assert sessions == ((1 << 29) - pipes * edge.PIPE_SIZE) // edge.SESSION_MEMORY
    assert 3300 < sessions < 3600
    monkeypatch.setattr(edge, "memory_budget", lambda: (64 << 30) // 2)    # 64 GiB: descriptors
    sessions, pipes = edge.capacity(6)
    assert 120000 < sessions < 131072 and pipes == edge.MAX_PIPES
    assert edge.capacity(6, wanted=500000)[0] == sessions    # lowered to the descriptors
    assert edge.capacity(6, wanted=10)[0] == 10


# ----------------------------------------------------------------------------------------------
# Refusals in the client's protocol, and passive upstream health (issue 13)
# ----------------------------------------------------------------------------------------------

def refusing_edge(protocol, *options):
    """An edge whose one mapping (PORT/protocol) goes to a port where nothing listens."""
    dead = free_port()
    return Edge.on_free_port(lambda port: list(options) + [
        "127.0.0.1:%d/%s=127.0.0.1:%d" % (port, protocol, dead)])


def test_refusal_smtp_client_reads_421():
    proxy, port = refusing_edge("smtp")
    with proxy:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", port, timeout=WAIT)
        assert refused.value.smtp_code == 421
        assert refused.value.smtp_error == b"4.3.2 Service not available, closing transmission channel"
        line = proxy.wait_for(r"session client=")
        assert "end=connect-failed" in line and "told the client 421 4.3.2" in line, line


def test_start_with_an_unresolvable_upstream_warns_that_clients_are_refused():
    """Issue 20: the relay comes up `ready` and answers every client 421 until the name
    resolves; the start-up warning said only `will retry for each connection`."""
    proxy, port = Edge.on_free_port(lambda port: [
        "127.0.0.1:%d/smtp=%s:25" % (port, UNRESOLVABLE_NAME)])
    with proxy:
        line = proxy.wait_for(r"resolve host=%s " % re.escape(UNRESOLVABLE_NAME))
        assert re.search(r"warning resolve host=%s error='[^']+'; until it resolves, clients "
                         r"sent to it are refused \(SMTP 421, TLS ports closed\) unless a next "
                         r"upstream serves them; run --check to see why$"
                         % re.escape(UNRESOLVABLE_NAME), line), line
        with connect(("127.0.0.1", port)) as c:
            assert recv_all(c).startswith(b"421 4.3.2 ")     # as it says
        assert proxy.stop() == 0


def test_refusal_imap_client_reads_bye():
    proxy, port = refusing_edge("imap")
    with proxy:
        with pytest.raises(imaplib.IMAP4.error) as refused:
            imaplib.IMAP4("127.0.0.1", port)
        assert "[UNAVAILABLE] Service not available" in str(refused.value)
        assert "told the client * BYE" in proxy.wait_for(r"session client=")


def test_refusal_pop3_client_reads_err():
    proxy, port = refusing_edge("pop3")
    with proxy:
        with pytest.raises(poplib.error_proto) as refused:
            poplib.POP3("127.0.0.1", port, timeout=WAIT)
        assert str(refused.value.args[0], "ascii").startswith("-ERR [SYS/TEMP] ")


def test_refusal_managesieve_greeting_is_bye():
    proxy, port = refusing_edge("sieve")
    with proxy, connect(("127.0.0.1", port)) as c:
        assert recv_all(c) == b'BYE (TRYLATER) "Service not available, try again later"\r\n'


@pytest.mark.parametrize("protocol", ["smtps", "imaps", "pop3s", "tcp"])
def test_refusal_is_a_plain_close_on_tls_and_unknown_ports(protocol):
    proxy, port = refusing_edge(protocol)
    with proxy, connect(("127.0.0.1", port)) as c:
        assert recv_all(c) == b""           # no plaintext into a TLS stream
        line = proxy.wait_for(r"session client=")
        assert "end=connect-failed" in line and "told the client" not in line, line


def test_refusal_reaches_a_client_that_spoke_first():
    # the client's EHLO is still unread when the edge gives up: a close() then would send a
    # reset, which can destroy the 421 before the client reads it
    up, fillers = blackhole()
    try:
        proxy, port = Edge.on_free_port(lambda port: [
            "--connect-timeout", "1", "127.0.0.1:%d/smtp=%s" % (port, up.address)])
        with up, proxy, connect(("127.0.0.1", port)) as c:
            c.sendall(b"EHLO early.example\r\n")
            time.sleep(0.2)
            # more than the edge reads ahead (PREREAD_LIMIT): the rest stays unread in the
            # kernel until the refusal
            c.sendall(b"X" * (edge.PREREAD_LIMIT + 32 * 1024))
            assert recv_all(c).startswith(b"421 4.3.2 ")
    finally:
        for s in fillers:
            s.close()


def test_refusal_never_follows_bytes_from_the_mail_server():
    def greet_then_reset(conn):
        conn.sendall(b"220 mx.example ESMTP\r\n")
        time.sleep(0.3)             # a reset overtaking the greeting would discard it
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with Upstream(greet_then_reset) as up:
        proxy, port = Edge.on_free_port(lambda port: [
            "--proxy-protocol", "off", "127.0.0.1:%d/smtp=%s" % (port, up.address)])
        with proxy, connect(("127.0.0.1", port)) as c:
            data = b""
            try:
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                pass
            assert data == b"220 mx.example ESMTP\r\n"      # and no 421 behind it


def edge_stats(proxy):
    """The `stats` line SIGUSR1 writes now."""
    mark = proxy.mark()
    proxy.signal(signal.SIGUSR1)
    return proxy.wait_for(r"notice stats ", start=mark)


def blackhole():
    """(upstream, fillers): a listener whose backlog is full, so a connect to it hangs."""
    up = Upstream(None, backlog=0, accept=False)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", up.port))
        fillers.append(s)
    time.sleep(0.2)
    return up, fillers


@contextlib.contextmanager
def dead_then_live():
    """(edge, port, dead, live): a mapping to a blackhole first, then a live upstream."""
    dead, fillers = blackhole()
    try:
        with dead, Upstream(header_echo) as live:
            proxy, port = Edge.on_free_port(lambda port: [
                "--connect-timeout", "2", "127.0.0.1:%d=%s,%s" % (port, dead.address,
                                                                   live.address)])
            with proxy:
                yield proxy, port, dead, live
    finally:
        for s in fillers:
            s.close()


def test_health_a_dead_first_upstream_is_skipped_after_it_failed():
    with dead_then_live() as (proxy, port, dead, live):
        took = []
        for payload in (b"first", b"second", b"third"):
            started = time.monotonic()
            assert round_trip(port, payload) == payload
            took.append(time.monotonic() - started)
        stats = edge_stats(proxy)
        # the first session waited out the connect timeout; the next two went straight to
        # the live upstream (within the 1 s the dead one is skipped)
        assert "upstream %s attempts=1 failed=1 skipped=2 down" % dead.address in stats, stats
        assert "upstream %s attempts=3 failed=0" % live.address in stats, stats
        print("time to serve: %s s" % ", ".join("%.3f" % t for t in took))


def test_health_a_probe_brings_the_upstream_back():
    with Upstream(header_echo) as live:
        # picked with `live` bound: a port picked before could be the one `live` then got (CI)
        back = free_port()
        proxy, port = Edge.on_free_port(lambda port: [
            "127.0.0.1:%d=127.0.0.1:%d,%s" % (port, back, live.address)])
        with proxy:
            assert round_trip(port, b"one") == b"one"               # 'back' refused: down
            proxy.wait_for(r"connect upstream=127\.0\.0\.1:%d .*refused" % back)
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", back))
            server.listen(16)
            try:
                threading.Thread(target=lambda: [header_echo(server.accept()[0])
                                                 for _ in range(50)], daemon=True).start()
                deadline = time.monotonic() + WAIT
                while not re.search(r"upstream 127\.0\.0\.1:%d is back" % back, proxy.output()):
                    assert time.monotonic() < deadline, proxy.output()
                    assert round_trip(port, b"again") == b"again"
                    time.sleep(0.2)
                mark = proxy.mark()
                assert round_trip(port, b"home") == b"home"
                assert "upstream=127.0.0.1:%d " % back in proxy.wait_for(r"session client=",
                                                                          start=mark)
            finally:
                server.close()


def test_health_all_upstreams_down_still_tries_one():
    dead = free_port()
    proxy, port = Edge.on_free_port(lambda port: ["127.0.0.1:%d=127.0.0.1:%d" % (port, dead)])
    with proxy:
        for _ in range(3):                  # within the 1 s it is marked down
            with connect(("127.0.0.1", port)) as c:
                assert recv_all(c) == b""
        stats = edge_stats(proxy)
        assert "upstream 127.0.0.1:%d attempts=3 failed=3 skipped=0" % dead in stats, stats
        for line in re.findall(r".*session client=.*", proxy.output()):
            assert "refused" in line, line          # each one tried, none refused unasked


def test_health_a_probe_whose_client_left_frees_the_probe():
    with dead_then_live() as (proxy, port, dead, live):
        assert round_trip(port, b"first") == b"first"      # dead: down for 1 s
        time.sleep(1.2)
        mark = proxy.mark()
        with connect(("127.0.0.1", port)) as c:           # the probe, whose client
            time.sleep(0.3)                                # resets mid-connect
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        proxy.wait_for(r"session client=.*end=client-reset", start=mark)
        with connect(("127.0.0.1", port)):                # a probe again, not a skip
            time.sleep(0.3)
        stats = edge_stats(proxy)
        assert re.search(r"upstream %s attempts=3 " % re.escape(dead.address), stats), stats


def test_health_unit_usable_is_a_question_and_claim_probe_claims_once():
    """Issue 19 (readability): usable(now) only answers, however often it is asked; the
    probe of a down upstream whose time is up is taken by claim_probe(), once, until the
    probe ends (here: abandoned). A healthy upstream has nothing to claim."""
    upstream = edge.Upstream("127.0.0.1", 25)
    assert upstream.usable(0.0) and upstream.usable(0.0)
    assert upstream.claim_probe() is False and not upstream.probing
    upstream.streak, upstream.down_until = 1, 10.0          # failed once: down until t=10
    assert not upstream.usable(5.0) and not upstream.probing
    assert upstream.usable(10.0) and upstream.usable(10.0) and not upstream.probing
    assert upstream.claim_probe() is True and upstream.probing
    assert not upstream.usable(11.0)                        # the others skip it meanwhile
    assert upstream.claim_probe() is False                  # claimed once
    upstream.probe_abandoned()
    assert upstream.usable(11.0) and upstream.claim_probe() is True


# ----------------------------------------------------------------------------------------------
# Refusals: a real Postfix defers through a down upstream (issue 13)
# ----------------------------------------------------------------------------------------------

def processes_of_postfix_instance(config_directory):
    """PIDs of the processes that run with this instance's configuration (the master and
    the daemons it starts all carry MAIL_CONFIG in their environment)."""
    mark = ("MAIL_CONFIG=%s" % config_directory).encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open("/proc/%s/environ" % name, "rb") as f:
                    if mark in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                pass                    # gone meanwhile, or not ours to read
    return found


def test_interop_postfix_defers_mail_when_no_upstream_serves():
    """Issue 13, item 1, with a real sending MTA: Postfix's smtp delivery agent relays a mail
    through the edge (an SMTP mapping, PORT/smtp) whose only upstream refuses connections. The
    edge answers `421 4.3.2` before closing, so Postfix logs the 421 and defers the mail
    (status=deferred, retried later), where a bare close would read as "lost connection", and
    a 5xx would bounce it. A private Postfix instance: its own configuration, queue, data and
    log file in a temporary directory, no listener, started and stopped here."""
    binary = shutil.which("postfix") or next((p for p in ("/usr/sbin/postfix",) if
                                              os.path.exists(p)), None)
    if binary is None:
        unavailable("postfix is not installed (apt-get install postfix)")
    sbin = os.path.dirname(binary)
    sendmail, postqueue = (shutil.which(name) or os.path.join(sbin, name)
                           for name in ("sendmail", "postqueue"))
    if not (os.path.exists(sendmail) and os.path.exists(postqueue)):
        unavailable("postfix's sendmail or postqueue is missing (apt-get install postfix)")
    if not is_root():
        unavailable("a private Postfix instance needs root")
    started = time.monotonic()
    dead_port, dead = free_port(hold=True)    # bound, never listening: refused
    directory = tempfile.mkdtemp(prefix="tailwart-postfix-defer-")
    etc, spool, data = (os.path.join(directory, d) for d in ("etc", "spool", "data"))
    maillog = os.path.join(directory, "maillog")
    proxy = None
    try:
        for attempt in range(5):
            edge_port = free_port()
            try:
                proxy = Edge("--connect-timeout", "2",
                             "127.0.0.1:%d/smtp=127.0.0.1:%d" % (edge_port, dead_port), tries=1)
                break
            except PortInUse:
                if attempt == 4:
                    raise
        for d in (etc, spool, data):
            os.mkdir(d)
        shutil.chown(data, "postfix")
        os.chmod(directory, 0o755)          # postfix's own processes walk into the spool
        with open(os.path.join(etc, "main.cf"), "w") as f:
            # a private instance that only sends: everything goes to the relay host, the edge
            f.write("""compatibility_level = 3.6
queue_directory = %(spool)s
data_directory = %(data)s
myhostname = tailwart-sender.invalid
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
relayhost = [127.0.0.1]:%(port)d
smtp_tls_security_level = none
maillog_file = %(log)s
maillog_file_prefixes = %(dir)s
""" % {"spool": spool, "data": data, "port": edge_port, "log": maillog, "dir": directory})
        services = list(POSTFIX_SERVICES)
        with open(os.path.join(etc, "master.cf"), "w") as f:
            f.write("\n".join(services) + "\n")
        run = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                   timeout=WAIT)
        subprocess.run([binary, "-c", etc, "check"], **run)     # creates the queue directories
        start = subprocess.run([binary, "-c", etc, "start"], **run)
        assert start.returncode == 0, start.stdout

        message = ("From: sender@example.org\nTo: rcpt@example.net\n"
                   "Subject: through a down upstream\n\nHello.\n")
        submit = subprocess.run([sendmail, "-C", etc, "-f", "sender@example.org",
                                 "rcpt@example.net"], input=message, **run)
        assert submit.returncode == 0, submit.stdout
        flush = subprocess.run([postqueue, "-c", etc, "-f"], **run)
        assert flush.returncode == 0, flush.stdout

        deadline = time.monotonic() + 20
        while True:
            text = ""
            if os.path.exists(maillog):
                with open(maillog, errors="replace") as f:
                    text = f.read()
            deferred = re.search(r"^.* postfix/smtp\[\d+\]: (\w+): to=<rcpt@example\.net>.*"
                                 r"status=deferred \(.*421 4\.3\.2 Service not available, "
                                 r"closing transmission channel.*\)$", text, re.M)
            if deferred or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert deferred, "no deferral with the 421 in %s:\n%s\nedge:\n%s" % (
            maillog, text, proxy.output())
        assert "status=bounced" not in text, text
        assert not re.search(r"%s: .*status=(sent|bounced)" % deferred.group(1), text), text
        print("postfix: " + deferred.group(0))

        line = proxy.wait_for(r"session client=127\.0\.0\.1:\d+ listen=\S*:%d\b.*"
                              r"end=connect-failed" % edge_port)
        assert "told the client 421 4.3.2" in line, line
        print("edge: " + line)
        print("%.1f s" % (time.monotonic() - started))
    finally:
        if proxy is not None:
            proxy.kill()
        dead.close()
        if os.path.exists(os.path.join(etc, "main.cf")):
            pids = processes_of_postfix_instance(etc)
            subprocess.run([binary, "-c", etc, "stop"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
            deadline = time.monotonic() + 5
            while True:
                left = [pid for pid in pids if os.path.exists("/proc/%d" % pid) and
                        pid in processes_of_postfix_instance(etc)]
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            for pid in left:                # what `postfix stop` left behind, by PID
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# --check: the doctor, against real servers (issue 12)
# ----------------------------------------------------------------------------------------------
#
# `--check` runs as a user would run it, to its end: stdout is one finding per line (a status
# word padded to 5 characters, a topic, the finding) and a verdict line; exit 0, 1 or 2. The real
# servers run from private directories with short PROXY timeouts, so that a missing header ends
# in a second: one Postfix (smtpd with and without the PROXY protocol, and postscreen) and two
# Dovecots (the edge trusted, and not). `test_interop_check_*` need them and run once in CI;
# `test_check_*` use Python servers, a refused port, a name under .invalid and the relay itself.

CHECK_TIMEOUT = 3           # --connect-timeout: bounds the doctor's connect and each read
SILENT_TIMEOUT = 1          # the same, where the server is expected to say nothing
PEER_PROXY_TIMEOUT = "1s"   # how long Postfix and Dovecot wait for a header that never comes
STATUS_WORDS = ("ok   ", "warn ", "FAIL ")
UNRESOLVABLE_NAME = "no-such-host.invalid"      # RFC 6761: .invalid never resolves
CERT_NAMES = ("mail.tailwart.test", "imap.tailwart.test")
SERVER_GREETINGS = {
    # PROTO: (greeting, the answer to the doctor's goodbye)
    "smtp": (b"220 mail.tailwart.test ESMTP test\r\n", b"221 2.0.0 Bye\r\n"),
    "imap": (b"* OK [CAPABILITY IMAP4rev1] test ready.\r\n",
             b"* BYE Logging out\r\na OK Logout completed.\r\n"),
}


class Doctor:
    """One `--check --connect-timeout T ARGS` run to its end, read against the contract: after
    a title, every line but the last is a finding, the last is the verdict, whose counts and
    exit code agree with the FAIL lines. Its repr() is the whole output, for assertion
    messages."""

    def __init__(self, *args, timeout=CHECK_TIMEOUT, preexec_fn=None, script=SCRIPT):
        argv = [PYTHON, script, "--check", "--connect-timeout", str(timeout)] + list(args)
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=WAIT,
                              preexec_fn=preexec_fn)
        self.code, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        assert "Traceback" not in self.stderr, self
        lines = []
        for line in self.stdout.splitlines():
            if line.startswith(" ") and lines:
                lines[-1] += "\n" + line       # a finding's hint lines, indented under it
            else:
                lines.append(line)
        # a title line first: `tailwart-edge VERSION check: N listeners, M mappings, ...`
        self.title = lines.pop(0) if lines and lines[0].startswith("tailwart-edge ") else None
        assert lines, self
        self.findings, self.verdict = lines[:-1], lines[-1]
        assert all(line[:5] in STATUS_WORDS for line in self.findings), self
        failed = sum(line.startswith("FAIL ") for line in self.findings)
        if self.code == 0:
            ok = re.fullmatch(r"verdict: ok, (\d+) checks passed", self.verdict)
            assert ok and failed == 0 and int(ok.group(1)) == len(self.findings), self
        else:
            bad = re.fullmatch(r"verdict: (\d+) of (\d+) checks failed", self.verdict)
            assert self.code == 1 and bad, self
            assert (int(bad.group(1)), int(bad.group(2))) == (failed, len(self.findings)), self

    def __repr__(self):
        return "exit %s\n--- stdout\n%s--- stderr\n%s" % (self.code, self.stdout, self.stderr)

    __str__ = __repr__

    def topics(self):
        """The topic of each finding, in order: ['listen', 'connect', 'smtp']."""
        return [line[5:].split(" ", 1)[0] for line in self.findings]

    def finding(self, status, topic, *phrases, pattern=None):
        """The one finding of this status and topic holding every phrase (substrings) and
        matching `pattern` (a regular expression) if given."""
        prefix = status.ljust(5) + topic + " "
        found = [line for line in self.findings if line.startswith(prefix)
                 and all(phrase in line for phrase in phrases)
                 and (pattern is None or re.search(pattern, line))]
        assert len(found) == 1, "%d findings %r with %r %r in:\n%s" % (
            len(found), prefix, phrases, pattern, self)
        return found[0]


def mapping(proto, upstream_port, listen_port=None, upstream_host="127.0.0.1"):
    """`127.0.0.1:LISTEN/PROTO=HOST:PORT` on a free listen port (--check never binds it)."""
    return "127.0.0.1:%d/%s=%s:%d" % (listen_port or free_port(), proto, upstream_host,
                                      upstream_port)


def read_line(conn):
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def greeter(proto, tls=None, headers=None):
    """An Upstream handler that greets like a mail server of `proto`: it reads the PROXY header
    (appended to `headers`; none when `headers` is None), does the TLS handshake when `tls` (a
    server SSLContext) is given, greets, reads one command and answers it as a goodbye."""
    greeting, goodbye = SERVER_GREETINGS[proto]

    def handler(conn):
        if headers is not None:
            headers.append(read_proxy_header(conn))
        if tls is not None:
            conn = tls.wrap_socket(conn, server_side=True)
        conn.sendall(greeting)
        if read_line(conn):
            conn.sendall(goodbye)
        conn.close()
    return handler


def v2_local(header):
    """Is this the 16-byte v2 header of a LOCAL command (a proxy's own health check)?"""
    return header[:12] == edge.V2_SIGNATURE and header[12] == 0x20 and header[13:] == b"\0\0\0"


# -- the relay's side: the command line, ports, names, refused ports --------------------------

@pytest.mark.parametrize("argv, message", [
    (["127.0.0.1:2525/bogus=127.0.0.1:25"], r"bogus.*smtp.*smtps.*imap.*imaps.*pop3.*sieve.*tcp"),
    ([], r"no MAPPING given"),
], ids=["bad PROTO", "no mapping"])
def test_check_bad_command_line_exits_2_with_one_line(argv, message):
    code, out, err = run_script("--check", *argv)
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tailwart_edge.py: error: "), err
    assert re.search(message, lines[0]), lines[0]


# A listener in a process of its own: not pytest, whose command line names this file, and
# so looks like the relay's to a doctor that reads command lines.
HOLD_A_PORT = """import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""


def test_check_title_counts_listeners_and_mappings():
    """Issue 20: two routes on one port were counted as one mapping ('2 mappings' for three
    words); the title names the listeners and the mappings."""
    port, other, (dead, held) = free_port(), free_port(), free_port(hold=True)
    with held:
        doctor = Doctor("127.0.0.1:%d/tls@mail.example.com=127.0.0.1:%d" % (port, dead),
                        "127.0.0.1:%d/tls=127.0.0.1:%d" % (port, dead),
                        "127.0.0.1:%d=127.0.0.1:%d" % (other, dead))
    assert doctor.title.startswith("tailwart-edge %s check: 2 listeners, 3 mappings, PROXY "
                                   "header v2, timeout " % edge.__version__), doctor


def test_check_a_free_listen_port_is_ok_and_a_taken_one_fails():
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_PORT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, universal_newlines=True)
    try:
        busy, free = int(holder.stdout.readline()), free_port()
        with Upstream(greeter("smtp", headers=[])) as up:
            doctor = Doctor(mapping("smtp", up.port, listen_port=busy),
                            mapping("smtp", up.port, listen_port=free))
    finally:
        holder.kill()
        holder.wait(WAIT)
        holder.stdin.close()
        holder.stdout.close()
    assert doctor.code == 1, doctor
    assert doctor.topics()[:2] == ["listen", "listen"], doctor      # the ports come first
    doctor.finding("ok", "listen", "127.0.0.1:%d is free" % free)
    line = doctor.finding("FAIL", "listen", "127.0.0.1:%d is in use" % busy)
    if os.path.exists("/proc/net/tcp"):                             # the holder, found
        assert " by pid %d (" % holder.pid in line, line
    # both mappings go to one upstream: checked once, on one connection
    assert doctor.topics()[2:] == ["connect", "smtp"], doctor
    assert len(up.conns) == 1, doctor


def test_check_a_port_held_by_a_running_relay_is_ok():
    with Upstream(header_echo) as up:
        proxy, port = Edge.on_free_port(lambda port: ["127.0.0.1:%d=%s" % (port, up.address)])
        with proxy:
            doctor = Doctor("127.0.0.1:%d=%s" % (port, up.address))
    assert doctor.code == 0, doctor
    doctor.finding("ok", "listen", "127.0.0.1:%d is served by a running tailwart-edge" % port)


def test_check_a_port_held_by_the_relay_installed_under_another_name_is_ok(tmp_path):
    """Issue 19: the relay was recognised by its file name only; installed as
    /usr/local/bin/tailwart-edge, --check said `in use by pid N (python3); stop that
    program`. The same file, whatever its name, is the relay."""
    installed = tmp_path / "tailwart-edge"
    shutil.copy(SCRIPT, str(installed))
    with Upstream(header_echo) as up:
        port = free_port()
        with EdgeFrom(str(installed), "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
            doctor = Doctor("127.0.0.1:%d=%s" % (port, up.address), script=str(installed))
    assert doctor.code == 0, doctor
    doctor.finding("ok", "listen", "127.0.0.1:%d is served by a running tailwart-edge (pid %d)"
                   % (port, proxy.pid))


AUDIT_ARCH_SOCKET = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}


def seccomp_without_ipv6():
    """A preexec_fn that makes socket(AF_INET6, ...) fail with EAFNOSUPPORT, as it does on a
    kernel booted with ipv6.disable=1 (common on VPS images), once shown to work here; or a
    skip. (A network namespace with disable_ipv6=1 is no stand-in: there, binding "::" still
    works, and takes IPv4.)"""
    if not sys.platform.startswith("linux") or platform.machine() not in AUDIT_ARCH_SOCKET:
        pytest.skip("the seccomp filter is written for Linux on x86_64 and aarch64 only")
    arch, nr = AUDIT_ARCH_SOCKET[platform.machine()]
    install = seccomp_filter([
        (BPF_LD_ABS, 0, 0, 4),                  # seccomp_data.arch
        (BPF_JEQ_K, 1, 0, arch),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),   # another ABI: leave it alone
        (BPF_LD_ABS, 0, 0, 0),                  # seccomp_data.nr
        (BPF_JEQ_K, 0, 3, nr),
        (BPF_LD_ABS, 0, 0, 16),                 # seccomp_data.args[0], low half: the family
        (BPF_JEQ_K, 0, 1, socket.AF_INET6),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ])
    probe = ("import socket, errno\n"
             "try: socket.socket(socket.AF_INET6); print('opened')\n"
             "except OSError as e: print(errno.errorcode[e.errno])\n"
             "socket.socket(socket.AF_INET).close()\n")
    return proven_filter(install, probe, "EAFNOSUPPORT", "make AF_INET6 sockets fail")


def test_check_a_bare_port_on_a_host_without_ipv6_is_ok_on_ipv4():
    """Issue 19: without IPv6 (socket(AF_INET6) fails with EAFNOSUPPORT) the relay listens
    on 0.0.0.0, but --check tried [::] alone: `FAIL listen :P cannot be bound: Address family
    not supported by protocol` for every bare port, verdict 1. It binds what the relay binds."""
    no_ipv6 = seccomp_without_ipv6()
    port = free_port()
    with Upstream(greeter("smtp", headers=[])) as up:
        doctor = Doctor("%d/smtp=127.0.0.1:%d" % (port, up.port), preexec_fn=no_ipv6)
        # the relay under the same filter: it starts, on IPv4, as --check said it would
        with Edge("%d=127.0.0.1:%d" % (port, up.port), preexec_fn=no_ipv6) as proxy:
            listening = proxy.wait_for(r"listen addr=")
    assert doctor.code == 0, doctor
    doctor.finding("ok", "listen", ":%d is free" % port, "IPv4 only: this host has no IPv6")
    assert "listen addr=0.0.0.0:%d " % port in listening, listening


def test_check_a_refused_port_fails_connect():
    port = free_port()                  # nothing listens there
    doctor = Doctor(mapping("smtp", port))
    assert doctor.code == 1, doctor
    doctor.finding("FAIL", "connect", "127.0.0.1:%d refused" % port)
    assert "smtp" not in doctor.topics(), doctor          # nothing to greet


@pytest.mark.parametrize("dialogue, greeting, named", [
    ("smtp", ["220 mx.example.com ESMTP Postfix (Debian/GNU)"], ["Postfix"]),
    ("smtp", ["220 mail.example.com Stalwart ESMTP at your service"], ["Stalwart"]),
    ("imap", ["* OK [CAPABILITY IMAP4rev1 SASL-IR] Dovecot (Debian) ready."], ["Dovecot"]),
    ("imap", ["* OK Stalwart IMAP4rev2 at your service."], ["Stalwart"]),
    ("imap", None, ["Dovecot", "Stalwart"]),        # closed before greeting: no Postfix on IMAP
    ("smtp", ["220 mx.example.com ESMTP"], ["Postfix", "Dovecot", "Stalwart"]),
])
def test_check_trust_hint_fits_the_server_that_greeted(dialogue, greeting, named):
    """Issue 20: the trust hint was one ~560-character line naming every server (Postfix's fix
    on an IMAP port) and suggesting --proxy-protocol off without its danger."""
    hints = edge.trust_fixes(dialogue, greeting, "100.64.0.1", "v2")
    said = [name for name in ("Postfix", "Dovecot", "Stalwart")
            if any(line.startswith(name) for line in hints)]
    assert said == named, hints
    assert all(len(line) <= 94 for line in hints), hints        # + 6 of indent: 100
    assert any("100.64.0.1" in line for line in hints) and "SOURCE" not in "".join(hints)
    assert hints[-2].startswith("(--proxy-protocol off instead: every client would look like")
    assert edge.trust_fixes(dialogue, greeting, "100.64.0.1", "off") is None


def test_check_an_address_whose_socket_cannot_be_made_is_a_fail_line(monkeypatch):
    """socket() itself failing (an IPv6 address on a host without IPv6, no descriptor left)
    killed the check's thread with an AttributeError (close() on None), so the doctor said
    only 'did not answer in time'; now it is that address's FAIL line, and the next address
    is tried."""
    real = socket.socket

    def no_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    with Upstream(None, accept=False) as up:
        lines = []
        addrs = [(socket.AF_INET6, ("2001:db8::1", up.port, 0, 0)),
                 (socket.AF_INET, ("127.0.0.1", up.port))]
        sock, address = edge.check_connect("mx.example", up.port, addrs, "v2", [], 5, lines)
        sock.close()
    assert address == "127.0.0.1:%d" % up.port
    assert lines[0] == ("warn", "connect", "[2001:db8::1]:%d failed: %s"
                        % (up.port, os.strerror(errno.EAFNOSUPPORT))), lines
    assert lines[1][0] == "ok", lines


class RefusedBind:
    """A socket whose bind() fails as an unprivileged user's does on a port below 1024."""

    def __init__(self, *args):
        pass

    def setsockopt(self, *args):
        pass

    def bind(self, address):
        raise PermissionError(errno.EACCES, "Permission denied")

    def close(self):
        pass


def test_check_a_low_port_the_unit_may_bind_is_a_warning_not_a_failure(tmp_path, monkeypatch):
    # the README's `--check --settings /etc/default/tailwart-edge` without sudo: FAILed every
    # port below 1024, though the unit grants CAP_NET_BIND_SERVICE
    settings, unit = tmp_path / "tailwart-edge", tmp_path / "tailwart-edge.service"
    settings.write_text("UPSTREAM=h.test\nPORTS=127.0.0.1:25\n")
    monkeypatch.setattr(edge, "INSTALL_SETTINGS", str(settings))
    monkeypatch.setattr(edge, "INSTALL_UNIT", str(unit))
    monkeypatch.setattr(edge.socket, "socket", RefusedBind)
    options, (low,) = edge.parse_args(["--settings", str(settings)])
    high = edge.parse_mapping("127.0.0.1:2525=h.test:25", None)
    assert edge.unit_grants_low_ports(options)       # the unit --install will write
    status, topic, text = edge.check_listen(low, edge.unit_grants_low_ports(options))
    assert (status, topic) == ("warn", "listen") and "CAP_NET_BIND_SERVICE" in text, text
    assert edge.check_listen(high, True)[0] == "FAIL"       # the capability is for < 1024
    unit.write_text(edge.unit_text("/usr/bin/python3"))
    assert edge.unit_grants_low_ports(options)
    unit.write_text(edge.unit_text("/usr/bin/python3").replace(
        "AmbientCapabilities=CAP_NET_BIND_SERVICE\n", ""))    # an admin's unit without it
    assert not edge.unit_grants_low_ports(options)
    other, _ = edge.parse_args(["127.0.0.1:25=h.test:25"])    # not the service's settings
    assert not edge.unit_grants_low_ports(other)
    assert edge.check_listen(low, False)[0] == "FAIL"


def test_check_an_unresolvable_name_fails_resolve():
    # The machine's own resolver: a name under .invalid fails at once where there is a name
    # server (NXDOMAIN) or none (no route); a resolver that drops queries would take its
    # timeout, which the run's WAIT bounds.
    doctor = Doctor(mapping("smtp", 25, upstream_host=UNRESOLVABLE_NAME))
    assert doctor.code == 1, doctor
    doctor.finding("FAIL", "resolve", "%s does not resolve" % UNRESOLVABLE_NAME)
    assert doctor.topics() == ["listen", "resolve"], doctor


def test_check_a_name_that_resolves_is_timed_and_then_connected(dns):
    _, private_names = dns(1)            # DNS_NAME is 127.0.0.1, from a stub name server
    with Upstream(greeter("smtp", headers=[])) as up:
        doctor = Doctor(mapping("smtp", up.port, upstream_host=DNS_NAME),
                        preexec_fn=private_names)
    assert doctor.code == 0, doctor
    assert doctor.topics() == ["listen", "resolve", "connect", "smtp"], doctor
    doctor.finding("ok", "resolve", pattern=r"^ok   resolve %s: 127\.0\.0\.1 in \d+ ms"
                   % re.escape(DNS_NAME))
    doctor.finding("ok", "connect", pattern=r"^ok   connect 127\.0\.0\.1:%d in \d+ ms from "
                   r"127\.0\.0\.1\b" % up.port)


def test_check_an_upstream_that_is_the_relay_itself_fails():
    port = free_port()
    # a name, so the mapping passes the literal self-loop refusal and the doctor must see it
    doctor = Doctor("%d/smtp=localhost:%d" % (port, port))
    assert doctor.code == 1, doctor
    doctor.finding("FAIL", "connect", pattern=r"^FAIL connect (127\.0\.0\.1|\[::1\]):%d is this "
                   r"relay itself" % port)


# -- a mail server of our own: greetings, headers, TLS ------------------------------------------

ACCEPTED_HEADER = {"v2": "PROXY v2 LOCAL accepted", "v1": "PROXY v1 accepted"}


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_check_sends_a_header_naming_no_client_then_greets_and_quits(version):
    headers = []
    with Upstream(greeter("smtp", headers=headers)) as up:
        doctor = Doctor("--proxy-protocol", version, mapping("smtp", up.port))
        eventually(lambda: up.errors or len(headers) == 1)
    assert doctor.code == 0 and not up.errors, (doctor, up.errors)
    assert doctor.topics() == ["listen", "connect", "smtp"], doctor
    connected = doctor.finding("ok", "connect", pattern=r"^ok   connect 127\.0\.0\.1:%d in \d+ ms "
                               r"from 127\.0\.0\.1\b" % up.port)
    assert "the mail server must trust PROXY headers from 127.0.0.1" in connected, doctor
    doctor.finding("ok", "smtp", '127.0.0.1:%d greeted "220 mail.tailwart.test' % up.port,
                   ACCEPTED_HEADER[version], 'QUIT answered "221 ')
    # no client made up: v2 LOCAL; v1 (Postfix refuses `PROXY UNKNOWN`) names the doctor itself
    if version == "v2":
        assert v2_local(headers[0]), headers
    else:
        assert re.fullmatch(br"PROXY TCP4 127\.0\.0\.1 127\.0\.0\.1 \d+ %d\r\n" % up.port,
                            headers[0]), headers


def test_check_with_proxy_protocol_off_sends_no_header():
    with Upstream(greeter("smtp")) as up:                       # reads no header
        doctor = Doctor("--proxy-protocol", "off", mapping("smtp", up.port))
    assert doctor.code == 0 and not up.errors, (doctor, up.errors)
    assert "trust PROXY" not in doctor.finding("ok", "connect", "from 127.0.0.1"), doctor
    doctor.finding("ok", "smtp", 'greeted "220 ')


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """days -> (certificate, key) paths: self-signed for CERT_NAMES (P-256, openssl CLI)."""
    openssl = need_tool("openssl")
    directory = tmp_path_factory.mktemp("certificates")
    made = {}

    def make(days):
        if days not in made:
            cert, key = (str(directory / ("%d.%s" % (days, kind))) for kind in ("crt", "key"))
            subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:prime256v1", "-nodes", "-days", str(days),
                            "-subj", "/CN=%s" % CERT_NAMES[0], "-addext",
                            "subjectAltName=" + ",".join("DNS:" + n for n in CERT_NAMES),
                            "-keyout", key, "-out", cert], check=True, timeout=WAIT,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
            made[days] = cert, key
        return made[days]
    return make


def tls_server(certificate):
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


@pytest.mark.parametrize("proto, topic", [("smtps", "smtp"), ("imaps", "imap")])
def test_check_implicit_tls_names_version_certificate_and_days(certificates, proto, topic):
    headers = []
    tls = tls_server(certificates(30))
    with Upstream(greeter(topic, tls=tls, headers=headers)) as up:
        doctor = Doctor(mapping(proto, up.port))
        eventually(lambda: up.errors or len(headers) == 1)
    assert doctor.code == 0 and not up.errors, (doctor, up.errors)
    assert doctor.topics() == ["listen", "connect", "tls", topic], doctor
    line = doctor.finding("ok", "tls", "127.0.0.1:%d TLSv1." % up.port)
    assert re.search(r"certificate for %s\b" % re.escape(",".join(CERT_NAMES)), line), line
    assert re.search(r"expires in (29|30) days", line), line
    greeting = SERVER_GREETINGS[topic][0].decode().split(" ")[0]
    doctor.finding("ok", topic, '127.0.0.1:%d greeted "%s ' % (up.port, greeting))
    assert v2_local(headers[0]), headers            # the header, then the handshake


def test_check_a_certificate_that_expires_within_14_days_warns(certificates):
    tls = tls_server(certificates(7))
    with Upstream(greeter("imap", tls=tls, headers=[])) as up:
        doctor = Doctor(mapping("imaps", up.port))
    assert doctor.code == 0, doctor                             # a warning is not a failure
    line = doctor.finding("warn", "tls", "127.0.0.1:%d" % up.port)
    assert re.search(r"expires in [67] days", line), line


def test_check_plain_text_on_an_implicit_tls_port_fails_tls():
    with Upstream(greeter("imap", headers=[])) as up:
        doctor = Doctor(mapping("imaps", up.port))
    assert doctor.code == 1, doctor
    doctor.finding("FAIL", "tls", "127.0.0.1:%d answered in plain text" % up.port, "* OK")


def test_check_tls_on_a_plain_port_is_named(certificates):
    tls = tls_server(certificates(30))
    with Upstream(greeter("imap", tls=tls, headers=[])) as up:
        doctor = Doctor(mapping("imap", up.port), timeout=SILENT_TIMEOUT)
    assert doctor.code == 1, doctor
    doctor.finding("FAIL", "imap", "speaks TLS on this port", pattern=r"127\.0\.0\.1:%d sent no "
                   r"greeting within %d ?s\b" % (up.port, SILENT_TIMEOUT))


# -- Postfix: smtpd with and without the PROXY protocol, postscreen ----------------------------

@pytest.fixture(scope="module")
def postfix_doctor():
    """A private Postfix with three listeners, named by their syslog_name in its log:
    `proxied` (smtpd, smtpd_upstream_proxy_protocol = haproxy), `plain` (smtpd, no PROXY
    protocol) and `screened` (postscreen with postscreen_upstream_proxy_protocol = haproxy,
    handing over to smtpd). Yields (peer, {name: port})."""
    ports = {name: free_port() for name in ("proxied", "plain", "screened")}
    proxy = "_upstream_proxy_protocol=haproxy -o %%s_upstream_proxy_timeout=%s" % \
        PEER_PROXY_TIMEOUT
    listeners = [
        "127.0.0.1:%d inet n - n - - smtpd -o syslog_name=postfix/proxied -o smtpd%s"
        % (ports["proxied"], proxy % "smtpd"),
        "127.0.0.1:%d inet n - n - - smtpd -o syslog_name=postfix/plain" % ports["plain"],
        "127.0.0.1:%d inet n - n - 1 postscreen -o syslog_name=postfix/screened -o postscreen%s"
        % (ports["screened"], proxy % "postscreen"),
        "smtpd pass - - n - - smtpd -o syslog_name=postfix/screened",
        "dnsblog unix - - n - 0 dnsblog", "tlsproxy unix - - n - 0 tlsproxy",
    ]
    # probing the plain listener keeps header-less probes (logged as warnings) away from the
    # other two
    for peer in private_postfix("tailwart-postfix-doctor-", "", listeners, ports["plain"]):
        yield peer, ports


def log_since(peer, start, pattern, timeout=WAIT):
    """Waits for `pattern` in the peer's log after character `start`; returns that part."""
    deadline = time.monotonic() + timeout
    while True:
        text = peer.text()[start:]
        if re.search(pattern, text, re.M):
            return text
        assert time.monotonic() < deadline, "no %r in the log of %s:\n%s" % (
            pattern, peer.log_path, text)
        time.sleep(0.05)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_interop_check_postfix_smtpd_with_proxy_protocol_passes(postfix_doctor, version):
    peer, ports = postfix_doctor
    start = len(peer.text())
    doctor = Doctor("--proxy-protocol", version, mapping("smtp", ports["proxied"]))
    assert doctor.code == 0, doctor
    doctor.finding("ok", "connect", "from 127.0.0.1",
                   "the mail server must trust PROXY headers from 127.0.0.1")
    doctor.finding("ok", "smtp", '127.0.0.1:%d greeted "220 tailwart-test.invalid ESMTP Postfix'
                   % ports["proxied"], ACCEPTED_HEADER[version], 'QUIT answered "221 2.0.0 Bye"')
    # no client made up: Postfix logs the doctor's own address, and a session ended by QUIT
    log = log_since(peer, start, r"postfix/proxied/smtpd\[\d+\]: disconnect from ")
    assert re.search(r"disconnect from localhost\[127\.0\.0\.1\]:\d+ quit=1 commands=1$", log,
                     re.M), log
    assert set(re.findall(r"connect from \S*\[([^]]+)\]", log)) == {"127.0.0.1"}, log


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_interop_check_postfix_smtpd_without_proxy_protocol_reads_the_header_as_a_command(
        postfix_doctor, version):
    peer, ports = postfix_doctor
    start = len(peer.text())
    doctor = Doctor("--proxy-protocol", version, mapping("smtp", ports["plain"]))
    assert doctor.code == 1, doctor
    line = doctor.finding("FAIL", "smtp", "127.0.0.1:%d read the PROXY header as a command"
                          % ports["plain"], "trust PROXY headers from 127.0.0.1")
    assert "smtpd_upstream_proxy_protocol" in line, line                    # the fix, named
    # fitted to the server that greeted, in short lines, and `off` only with what it costs
    assert "Dovecot" not in line and "Stalwart" not in line, line
    assert "every client would look like 127.0.0.1 there;" in line, line
    assert "never list it in the mail server's trusted or relay networks" in line, line
    assert all(len(hint) <= 100 for hint in line.splitlines()[1:]), line
    # Postfix's view: the header came as commands. v2 holds `QUIT\n`, so the bytes after it are
    # pipelined after a QUIT (or after CONNECT, when they came before the greeting); v1 is one
    # unknown command. (Log lines from Postfix 3.7.)
    log_since(peer, start, {
        "v2": r"postfix/plain/smtpd\[\d+\]: improper command pipelining after (CONNECT|QUIT) "
              r"from localhost\[127\.0\.0\.1\]:\d+: .*\\000",
        "v1": r"postfix/plain/smtpd\[\d+\]: disconnect from localhost\[127\.0\.0\.1\]:\d+ "
              r"quit=1 unknown=0/1 commands=1/2$"}[version])


def test_interop_check_postfix_expecting_a_header_that_is_off(postfix_doctor):
    peer, ports = postfix_doctor
    start = len(peer.text())
    doctor = Doctor("--proxy-protocol", "off", mapping("smtp", ports["proxied"]))
    assert doctor.code == 1, doctor
    # Postfix 3.7 waits smtpd_upstream_proxy_timeout, then greets with a 421 and closes
    doctor.finding("FAIL", "smtp", '127.0.0.1:%d greeted "421 ' % ports["proxied"],
                   "expects a PROXY header")
    log_since(peer, start, r"postfix/proxied/smtpd\[\d+\]: warning: haproxy read: timeout error")


def test_interop_check_postscreen_with_proxy_protocol_passes(postfix_doctor):
    peer, ports = postfix_doctor
    start = len(peer.text())
    doctor = Doctor(mapping("smtp", ports["screened"]))
    assert doctor.code == 0, doctor
    doctor.finding("ok", "smtp", '127.0.0.1:%d greeted "220 tailwart-test.invalid ESMTP Postfix'
                   % ports["screened"], "PROXY v2 LOCAL accepted")
    log = log_since(peer, start, r"postfix/screened/smtpd\[\d+\]: disconnect from ")
    assert re.search(r"postfix/screened/postscreen\[\d+\]: CONNECT from \[127\.0\.0\.1\]:\d+ to "
                     r"\[127\.0\.0\.1\]:%d$" % ports["screened"], log, re.M), log


# -- Dovecot: haproxy = yes, trusted and not; a listener without it ----------------------------

DOVECOT_LOGIN = {"imap-login": "dovecot-imapd", "pop3-login": "dovecot-pop3d",
                 "managesieve-login": "dovecot-managesieved"}


def start_dovecot(trusted):
    """A private Dovecot (as root: it drops to its own users) on free loopback ports, logging
    to its stderr: `imap`, `pop3` and `sieve` listeners with `haproxy = yes` and a PROXY
    timeout of PEER_PROXY_TIMEOUT, and `imap_plain` without. (peer, {listener: port}, directory)"""
    binary = shutil.which("dovecot") or next((p for p in ("/usr/sbin/dovecot",) if
                                              os.path.exists(p)), None)
    if binary is None:
        unavailable("dovecot is not installed (apt-get install %s)" % " ".join(
            sorted(DOVECOT_LOGIN.values())))
    libexec = next((d for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot") if
                    os.path.isdir(d)), "/usr/lib/dovecot")
    for login, package in sorted(DOVECOT_LOGIN.items()):
        if not os.path.exists(os.path.join(libexec, login)):
            unavailable("dovecot has no %s (apt-get install %s)" % (login, package))
    if not is_root():
        pytest.skip("a private Dovecot needs root here (its login processes chroot)")
    directory = tempfile.mkdtemp(prefix="tailwart-dovecot-")   # its users walk into base_dir
    os.chmod(directory, 0o755)
    ports = {name: free_port() for name in ("imap", "imap_plain", "pop3", "sieve")}
    users = os.path.join(directory, "users")
    open(users, "w").close()                    # nobody can log in: the doctor never does
    conf = os.path.join(directory, "dovecot.conf")
    with open(conf, "w") as f:
        f.write("""base_dir = %(d)s/run
state_dir = %(d)s/state
log_path = /dev/stderr
instance_name = tailwart-test
protocols = imap pop3 sieve
listen = 127.0.0.1
ssl = no
haproxy_trusted_networks = %(trusted)s
haproxy_timeout = %(timeout)s
passdb {
  driver = passwd-file
  args = %(users)s
}
userdb {
  driver = passwd-file
  args = %(users)s
}
service imap-login {
  inet_listener imap {
    port = %(imap)d
    haproxy = yes
  }
  inet_listener imap_plain {
    port = %(imap_plain)d
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  inet_listener pop3 {
    port = %(pop3)d
    haproxy = yes
  }
  inet_listener pop3s {
    port = 0
  }
}
service managesieve-login {
  inet_listener sieve {
    port = %(sieve)d
    haproxy = yes
  }
}
""" % dict(ports, d=directory, trusted=trusted, timeout=PEER_PROXY_TIMEOUT, users=users))
    peer = Peer([binary, "-F", "-c", conf], directory, "dovecot")
    try:
        # Every listener opens at start. Until the auth process answers, a login process
        # greets with `* OK Waiting for authentication process to respond..` first: wait for
        # the real greeting on the listener without haproxy (a probe elsewhere is logged).
        deadline = time.monotonic() + WAIT
        while True:
            peer.wait_listening(ports["imap_plain"])
            with connect(("127.0.0.1", ports["imap_plain"]), timeout=5) as probe:
                probe.sendall(b"a LOGOUT\r\n")
                if b"ready." in recv_all(probe).split(b"\r\n", 1)[0]:
                    break
            assert time.monotonic() < deadline, "dovecot never ready:\n" + peer.text()
            time.sleep(0.1)
    except BaseException:
        stop_dovecot(peer, directory)
        raise
    return peer, ports, directory


def stop_dovecot(peer, directory):
    peer.stop()                 # TERM to the master, by its PID: it ends its children
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def dovecot_trusting():
    """Dovecot trusting PROXY headers from 127.0.0.1, the doctor's source address."""
    peer, ports, directory = start_dovecot("127.0.0.1")
    try:
        yield peer, ports
    finally:
        stop_dovecot(peer, directory)


@pytest.fixture(scope="module")
def dovecot_distrusting():
    """Dovecot trusting PROXY headers from 10.9.9.9 only: not from the doctor."""
    peer, ports, directory = start_dovecot("10.9.9.9")
    try:
        yield peer, ports
    finally:
        stop_dovecot(peer, directory)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_interop_check_dovecot_trusting_the_edge_passes_imap_pop3_sieve(dovecot_trusting, version):
    peer, ports = dovecot_trusting
    start = len(peer.text())
    doctor = Doctor("--proxy-protocol", version, mapping("imap", ports["imap"]),
                    mapping("pop3", ports["pop3"]), mapping("sieve", ports["sieve"]))
    assert doctor.code == 0, doctor
    assert doctor.topics() == ["listen"] * 3 + ["connect", "imap", "connect", "pop3",
                                                "connect", "sieve"], doctor
    for proto, greeting, goodbye in (("imap", '"* OK [CAPABILITY ', 'LOGOUT answered "a OK'),
                                     ("pop3", '"+OK Dovecot', 'QUIT answered "+OK'),
                                     # its greeting is capability lines, then OK
                                     ("sieve", '"', 'LOGOUT answered "OK')):
        doctor.finding("ok", proto, "127.0.0.1:%d greeted %s" % (ports[proto], greeting),
                       ACCEPTED_HEADER[version], goodbye)
    # each login process saw a polite client that logged out without trying to log in
    for login in ("imap-login", "pop3-login", "managesieve-login"):
        log_since(peer, start, r"%s: Info: Disconnected: Aborted login by logging out \(no auth "
                               r"attempts.*rip=127\.0\.0\.1" % login)


def test_interop_check_dovecot_not_trusting_the_edge_closes_without_a_greeting(
        dovecot_distrusting):
    peer, ports = dovecot_distrusting
    start = len(peer.text())
    doctor = Doctor(mapping("imap", ports["imap"]))
    assert doctor.code == 1, doctor
    # Dovecot closes at once, without reading: a reset when the header came first (it had
    # unread bytes), else a plain close
    doctor.finding("FAIL", "imap", "does not trust PROXY headers from 127.0.0.1",
                   "or has banned 127.0.0.1", "haproxy_trusted_networks",
                   pattern=r"127\.0\.0\.1:%d (closed the connection without|reset the connection "
                   r"before) a greeting" % ports["imap"])
    log_since(peer, start, r"imap-login: Warning: haproxy: Client not trusted "
                           r"\(rip=127\.0\.0\.1\)")


def test_interop_check_dovecot_listener_without_haproxy_reads_the_header_as_a_command(
        dovecot_trusting):
    peer, ports = dovecot_trusting
    doctor = Doctor(mapping("imap", ports["imap_plain"]))
    assert doctor.code == 1, doctor
    line = doctor.finding("FAIL", "imap", "127.0.0.1:%d read the PROXY header as a command"
                          % ports["imap_plain"], "trust PROXY headers from 127.0.0.1")
    assert "haproxy_trusted_networks = 127.0.0.1" in line, line         # Dovecot's fix
    # and no Postfix on IMAP (Stalwart's is named too when the greeting did not say Dovecot:
    # `* OK Waiting for authentication process to respond..` while its auth starts)
    assert "Postfix" not in line, line


def test_interop_check_dovecot_expecting_a_header_that_is_off(dovecot_trusting):
    peer, ports = dovecot_trusting
    start = len(peer.text())
    doctor = Doctor("--proxy-protocol", "off", mapping("imap", ports["imap"]))
    assert doctor.code == 1, doctor
    doctor.finding("FAIL", "imap", "127.0.0.1:%d closed the connection without a greeting"
                   % ports["imap"], "expects a PROXY header")
    log_since(peer, start, r"imap-login: Error: haproxy: Client timed out \(rip=127\.0\.0\.1\)")


# ----------------------------------------------------------------------------------------------
# Per-client limits, allow and deny (issue 13)
# ----------------------------------------------------------------------------------------------

def connect_from(source, port, timeout=WAIT):
    """A client socket bound to `source` (another 127.0.0.x is another client)."""
    c = socket.socket()
    c.settimeout(timeout)
    c.bind((source, 0))
    c.connect(("127.0.0.1", port))
    return c


def limited_edge(*options, protocol="smtp"):
    """(edge, port, upstream): an SMTP mapping to an echo upstream, with `options`; loopback
    is not exempt (--exempt names a network no test client is in)."""
    up = Upstream(echo)
    proxy, port = Edge.on_free_port(lambda port: [
        "--proxy-protocol", "off", "--exempt", "192.0.2.0/24"] + list(options) + [
        "127.0.0.1:%d/%s=%s" % (port, protocol, up.address)])
    return proxy, port, up


def test_limit_per_client_refuses_the_next_one_and_lets_others_in():
    proxy, port, up = limited_edge("--per-client", "3")
    with up, proxy:
        held = [connect_from("127.0.0.2", port) for _ in range(3)]
        for c in held:
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", port, timeout=WAIT, source_address=("127.0.0.2", 0))
        assert refused.value.smtp_code == 421
        assert refused.value.smtp_error == b"4.7.0 Too many connections from your address"
        other = connect_from("127.0.0.3", port)         # another client is not held back
        other.sendall(b"y")
        assert recv_exactly(other, 1) == b"y"
        other.close()
        line = proxy.wait_for(r"refused client=127\.0\.0\.2:")
        assert "reason=per-client" in line, line
        held.pop().close()                              # one ends: room for one again
        proxy.wait_for(r"session client=127\.0\.0\.2:")
        again = connect_from("127.0.0.2", port)
        again.sendall(b"z")
        assert recv_exactly(again, 1) == b"z"
        for c in held + [again]:
            c.close()
        stats = edge_stats(proxy)
        assert "refused-per-client=1" in stats, stats


def test_limit_per_client_rate_counts_new_connections_a_minute():
    proxy, port, up = limited_edge("--per-client-rate", "5", protocol="imap")
    with up, proxy:
        for _ in range(5):
            with connect_from("127.0.0.4", port) as c:
                c.sendall(b"x")
                assert recv_exactly(c, 1) == b"x"
        with connect_from("127.0.0.4", port) as c:          # the sixth this minute
            assert recv_all(c) == b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
        with connect_from("127.0.0.6", port) as c:          # another client: its own minute
            c.sendall(b"y")
            assert recv_exactly(c, 1) == b"y"
        assert "reason=per-client-rate" in proxy.wait_for(r"refused client=127\.0\.0\.4:")


def test_limit_exempt_clients_are_never_limited():
    up = Upstream(echo)
    proxy, port = Edge.on_free_port(lambda port: [
        "--proxy-protocol", "off", "--per-client", "2", "--exempt", "127.0.0.7",
        "127.0.0.1:%d/smtp=%s" % (port, up.address)])
    with up, proxy:
        held = [connect_from("127.0.0.7", port) for _ in range(6)]
        for c in held:
            c.sendall(b"e")
            assert recv_exactly(c, 1) == b"e"
        for c in held:
            c.close()
        assert "refused client=" not in proxy.output()


def test_limit_loopback_is_exempt_by_default():
    up = Upstream(echo)
    proxy, port = Edge.on_free_port(lambda port: [
        "--proxy-protocol", "off", "--per-client", "1",
        "127.0.0.1:%d/smtp=%s" % (port, up.address)])
    with up, proxy:
        held = [connect_from("127.0.0.8", port) for _ in range(3)]
        for c in held:
            c.sendall(b"l")
            assert recv_exactly(c, 1) == b"l"
            c.close()


def test_deny_and_allow_refuse_at_accept_without_a_word():
    proxy, port, up = limited_edge("--deny", "127.0.0.9", "--allow", "127.0.0.0/29")
    with up, proxy:
        for source in ("127.0.0.9", "127.0.0.9", "127.0.0.10"):   # denied; outside the allow
            with connect_from(source, port) as c:
                assert recv_all(c) == b""
        with connect_from("127.0.0.2", port) as c:
            c.sendall(b"a")
            assert recv_exactly(c, 1) == b"a"
        stats = edge_stats(proxy)
        assert "refused-denied=3" in stats, stats
        # logged once per client a minute: 127.0.0.9 once, 127.0.0.10 once
        assert len(re.findall(r"refused client=127\.0\.0\.9:", proxy.output())) == 1
        assert len(re.findall(r"refused client=127\.0\.0\.10:", proxy.output())) == 1
        assert len(up.conns) == 1               # the refused never reached the upstream


def client_table(per_client=0, rate=0, exempt=(), deny=(), allow=()):
    """A Clients table (the unit under the per-client limits) with these lists."""
    class Options:
        pass
    options = Options()
    options.per_client, options.per_client_rate = per_client, rate
    options.exempt, options.deny, options.allow = [
        [edge.network(text) for text in texts] for texts in (exempt, deny, allow)]
    return edge.Clients(options)


def test_deny_written_ipv4_mapped_refuses_the_ipv4_client():
    # a dual-stack listener reports 127.0.0.9 as ::ffff:127.0.0.9; either way it is an IPv4
    # client, and a rule written in the mapped form means the IPv4 network
    proxy, port, up = limited_edge("--deny", "::ffff:127.0.0.9", "--allow", "::ffff:127.0.0.0/125")
    with up, proxy:
        for source in ("127.0.0.9", "127.0.0.10"):      # denied; outside the allow
            with connect_from(source, port) as c:
                assert recv_all(c) == b""
        with connect_from("127.0.0.2", port) as c:
            c.sendall(b"m")
            assert recv_exactly(c, 1) == b"m"
        assert "refused-denied=2" in edge_stats(proxy)
        assert len(up.conns) == 1


def test_abuse_a_full_client_table_still_limits_each_client():
    # 65,536 short connections from as many addresses (127.1.0.0/16, denied so that they cost
    # no upstream) fill the per-client table; a client arriving after them is still limited
    flooders, per_thread = 4, edge.CLIENTS_MAX // 4

    def greeter(conn):
        conn.sendall(b"220 upstream\r\n")
        echo(conn)
    up = Upstream(greeter)
    proxy, port = Edge.on_free_port(lambda port: [
        "--proxy-protocol", "off", "--exempt", "192.0.2.0/24", "--per-client", "5",
        "--per-client-rate", "0", "--deny", "127.1.0.0/16",
        "127.0.0.1:%d/smtp=%s" % (port, up.address)])

    def flood(first):
        for i in range(first, first + per_thread):
            for attempt in range(3):            # a SYN dropped by a full backlog: try again
                try:
                    with connect_from("127.1.%d.%d" % (i >> 8, i & 255), port, timeout=5) as c:
                        c.recv(1)               # closed without a word: paced by the relay
                    break
                except OSError:
                    pass
    with up, proxy:
        mark = proxy.mark()
        threads = [threading.Thread(target=flood, args=(n * per_thread,), daemon=True)
                   for n in range(flooders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert "refused-denied=%d" % edge.CLIENTS_MAX in edge_stats(proxy)
        held, greetings = [], []
        try:
            for _ in range(8):                  # one at a time: the relay answers each first
                held.append(connect_from("127.0.0.2", port))
                greetings.append(held[-1].recv(100))
        finally:
            for c in held:
                c.close()
        admitted = greetings.count(b"220 upstream\r\n")
        assert admitted == 5, "127.0.0.2 held %d sessions (--per-client 5): %r" % (admitted,
                                                                                  greetings)
        assert greetings[5:] == [b"421 4.7.0 Too many connections from your address\r\n"] * 3
        proxy.wait_for(r"clients: 65536 tracked; the oldest with nothing open are forgotten",
                       start=mark)


def test_limit_ipv6_clients_are_grouped_by_64():
    clients = client_table(per_client=2)
    assert clients.admit("2001:db8:1:2::1", 0.0)[1] is None
    assert clients.admit("2001:db8:1:2:ffff::9", 0.0)[1] is None
    assert clients.admit("2001:db8:1:2:abcd::7", 0.0)[1] == "per-client"   # same /64
    assert clients.admit("2001:db8:1:3::1", 0.0)[1] is None                 # next /64
    assert clients.admit("::ffff:192.0.2.1", 0.0)[0] is clients.entries["192.0.2.1"]


@pytest.mark.parametrize("lists, first, then", [
    ({"deny": ["2001:db8::bad"]}, "2001:db8::1", [("2001:db8::bad", "denied"),
                                                  ("2001:db8::2", None)]),
    ({"allow": ["2001:db8::5"]}, "2001:db8::6", [("2001:db8::5", None),
                                                 ("2001:db8::7", "denied")]),
    ({"allow": ["2001:db8::5"]}, "2001:db8::5", [("2001:db8::6", "denied"),
                                                 ("2001:db8:0:1::5", "denied")]),
    ({"deny": ["2001:db8::/64"], "allow": ["::/0"]}, "2001:db8::1", [("2001:db8::2", "denied"),
                                                                     ("2001:db8:0:1::1", None)]),
])
def test_limit_deny_and_allow_judge_the_whole_ipv6_address_not_who_came_first(lists, first,
                                                                               then):
    clients = client_table(**lists)
    clients.admit(first, 0.0)                   # the first of its /64 sets up the entry
    assert [(ip, clients.admit(ip, 0.0)[1]) for ip, _ in then] == then


def test_limit_an_exempt_address_is_not_counted_against_its_64():
    clients = client_table(per_client=1, exempt=["2001:db8::e"])
    assert [clients.admit("2001:db8::e", 0.0) for _ in range(3)] == [(None, None)] * 3
    assert clients.admit("2001:db8::1", 0.0)[1] is None
    assert clients.admit("2001:db8::2", 0.0)[1] == "per-client"        # the /64's one


@pytest.mark.parametrize("text, meant", [
    ("::ffff:192.0.2.0/120", "192.0.2.0/24"), ("::ffff:192.0.2.7", "192.0.2.7/32"),
    ("[::ffff:0:0/96]", "0.0.0.0/0"), ("::/0", "::/0"), ("2001:db8::/32", "2001:db8::/32")])
def test_limit_ipv4_mapped_rules_mean_their_ipv4_network(text, meant):
    assert str(edge.network(text)) == meant


def flood_one_48(clients, now=0.0):
    """CLIENTS_MAX short connections, one from each /64 of 2001:db8:77::/48."""
    for i in range(edge.CLIENTS_MAX):
        entry, refusal = clients.admit("2001:db8:77:%x::1" % i, now)
        assert refusal is None
        clients.release(entry)                  # the session ends at once


def held(clients, ip, tries=200):
    """How many of `tries` sessions at once `ip` is let in to hold."""
    return sum(clients.admit(ip, 1.0)[1] is None for _ in range(tries))


def test_limit_per_client_holds_after_a_flood_fills_the_client_table():
    clients = client_table(per_client=5)
    assert held(clients, "192.0.2.1") == 5      # holding its 5 while the flood comes
    flood_one_48(clients)
    assert len(clients.entries) == edge.CLIENTS_MAX
    assert held(clients, "192.0.2.1") == 0      # its entry, with sessions open, was kept
    assert held(clients, "192.0.2.2") == 5      # a new one is tracked, not let in unlimited
    assert held(clients, "2001:db8:77:1::1") == 5


def test_limit_a_table_full_of_open_sessions_grows_rather_than_fail_open():
    clients = client_table(per_client=5)
    for i in range(edge.CLIENTS_MAX):           # every entry holds a session
        assert clients.admit("2001:db8:77:%x::1" % i, 0.0)[1] is None
    assert held(clients, "192.0.2.1") == 5      # tracked all the same: one entry more
    assert len(clients.entries) == edge.CLIENTS_MAX + 1
    for entry in list(clients.entries.values()):
        while entry.open:
            clients.release(entry)
    clients.sweep(2 * edge.CLIENT_WINDOW)       # a minute on, nothing open: all forgotten
    assert not clients.entries and not clients.idle


def test_abuse_client_table_stays_bounded_under_address_cycling():
    import tracemalloc
    clients = client_table(per_client=50, rate=300)
    tracemalloc.start()
    now = 0.0
    for i in range(3 * edge.CLIENTS_MAX):       # an attacker cycling through /64s
        entry, refusal = clients.admit("2001:db8:%x:%x::1" % (i >> 16, i & 0xffff), now)
        if entry is not None:
            clients.release(entry)              # the session ends at once
        now += 0.001
    size, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(clients.entries) == len(clients.idle) == edge.CLIENTS_MAX
    print("clients tracked: %d, peak memory %.1f MiB" % (len(clients.entries), peak / 2**20))
    assert peak < 40 * 2**20, peak


def test_limit_a_flood_from_one_address_never_stops_another():
    proxy, port, up = limited_edge("--per-client", "10")
    with up, proxy:
        stop = threading.Event()
        refused = [0]

        def flood():
            while not stop.is_set() and refused[0] < 3000:
                try:
                    with connect_from("127.0.0.11", port, timeout=5) as c:
                        if c.recv(100).startswith(b"421"):
                            refused[0] += 1
                except OSError:
                    pass
        hold = [connect_from("127.0.0.11", port) for _ in range(10)]
        flooders = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
        for t in flooders:
            t.start()
        try:
            for i in range(50):                # the other client, throughout the flood
                with connect_from("127.0.0.12", port) as c:
                    c.sendall(b"%d" % i)
                    assert recv_exactly(c, len(b"%d" % i)) == b"%d" % i
        finally:
            stop.set()
            for t in flooders:
                t.join(WAIT)
            for c in hold:
                c.close()
        assert refused[0] > 0
        assert proxy.proc.poll() is None


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on loopback")
def test_limit_per_client_over_ipv6():
    up = Upstream(echo)
    proxy, port = Edge.on_free_port(lambda port: [
        "--proxy-protocol", "off", "--per-client", "1", "--exempt", "192.0.2.0/24",
        "[::1]:%d/pop3=%s" % (port, up.address)], host="::1")
    with up, proxy:
        first = socket.create_connection(("::1", port), timeout=WAIT)
        first.sendall(b"6")
        assert recv_exactly(first, 1) == b"6"
        with pytest.raises(poplib.error_proto) as refused:
            poplib.POP3("::1", port, timeout=WAIT)
        assert b"Too many connections from your address" in refused.value.args[0]
        first.close()
        assert "reason=per-client" in proxy.wait_for(r"refused client=\[::1\]:")


# ----------------------------------------------------------------------------------------------
# Visible failures and --metrics (issue 12)
# ----------------------------------------------------------------------------------------------

# -- a strict parser of the Prometheus text exposition format 0.0.4 -----------------------------
# https://prometheus.io/docs/instrumenting/exposition_formats/ ("Text format details"), read
# strictly: every family declares # HELP and # TYPE once each, both before its first sample;
# a family's samples form one group; a sample's name must be its family's (plus _sum/_count/
# _bucket for summaries and histograms); no series twice; the text ends with a line feed.

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
LABEL_VALUE = re.compile(r'"((?:[^"\\\n]|\\[\\"n])*)"')     # escapes: \\ \" \n, nothing else
FLOAT = re.compile(r"(?:[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]Inf|NaN)\Z")
HELP_LINE = re.compile(r"# HELP (%s)(?:[ \t]+((?:[^\\\n]|\\[\\n])*))?\Z" % METRIC_NAME.pattern)
TYPE_LINE = re.compile(r"# TYPE (%s)[ \t]+(counter|gauge|histogram|summary|untyped)[ \t]*\Z"
                       % METRIC_NAME.pattern)
SAMPLE_SUFFIXES = {"counter": ("",), "gauge": ("",), "untyped": ("",),
                   "summary": ("", "_sum", "_count"), "histogram": ("_bucket", "_sum", "_count")}


class ExpositionError(ValueError):
    """The text breaks the format (the message names the line)."""


def unescape(text):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), text)


def series_key(name, labels):
    return name, tuple(sorted(labels.items()))


class Exposition:
    """A parsed exposition: `families` (name -> {"help", "type", "samples"}) and `series`
    ((name, sorted label items) -> value)."""

    def __init__(self, text):
        if not text.endswith("\n"):
            raise ExpositionError("the text does not end with a line feed")
        self.families, self.series = {}, {}
        current = None
        for number, line in enumerate(text[:-1].split("\n"), 1):
            try:
                current = self.parse_line(line, current)
            except ExpositionError as e:
                raise ExpositionError("line %d: %s: %r" % (number, e, line)) from None
        if current is not None:
            self.check_declared(current)

    def check_declared(self, name):
        family = self.families[name]
        for kind in ("help", "type"):
            if family[kind] is None:
                raise ExpositionError("family %s has no # %s" % (name, kind.upper()))

    def parse_line(self, line, current):
        """Takes one line; returns the family now current."""
        if line == "":
            return current                              # the format ignores empty lines
        if line.startswith("#"):
            declaration = re.match(r"#[ \t]*(HELP|TYPE)\b", line)
            if not declaration:
                return current                          # a comment
            match = (HELP_LINE if declaration.group(1) == "HELP" else TYPE_LINE).match(line)
            if not match:
                raise ExpositionError("malformed # %s" % declaration.group(1))
            return self.declare(match.group(1), declaration.group(1).lower(),
                                unescape(match.group(2) or ""), current)
        name, labels, value = self.parse_sample(line)
        if current is None or None in (self.families[current]["help"],
                                       self.families[current]["type"]):
            raise ExpositionError("sample %s before its family's # HELP and # TYPE" % name)
        family = self.families[current]
        if name not in [current + suffix for suffix in SAMPLE_SUFFIXES[family["type"]]]:
            raise ExpositionError("sample %s is not of family %s (%s)"
                                  % (name, current, family["type"]))
        key = series_key(name, labels)
        if key in self.series:
            raise ExpositionError("series %s%r given twice" % (name, labels))
        self.series[key] = family["samples"][key] = value
        return current

    def declare(self, name, kind, value, current):
        if name != current:
            if name in self.families:
                raise ExpositionError("family %s declared again after another family" % name)
            if current is not None:
                self.check_declared(current)
            self.families[name] = {"help": None, "type": None, "samples": {}}
        family = self.families[name]
        if family[kind] is not None:
            raise ExpositionError("a second # %s for %s" % (kind.upper(), name))
        if family["samples"]:
            raise ExpositionError("# %s for %s after its samples" % (kind.upper(), name))
        family[kind] = value
        return name

    @staticmethod
    def parse_sample(line):
        """(name, {label: value}, float) of a sample line."""
        match = METRIC_NAME.match(line)
        if not match:
            raise ExpositionError("no metric name")
        name, at, labels = match.group(), match.end(), {}
        if line[at:at + 1] == "{":
            at += 1
            while line[at:at + 1] != "}":
                label = LABEL_NAME.match(line, at)
                if not label or line[label.end():label.end() + 1] != "=":
                    raise ExpositionError("malformed label at column %d" % (at + 1))
                if label.group().startswith("__"):
                    raise ExpositionError("label name %s is reserved" % label.group())
                value = LABEL_VALUE.match(line, label.end() + 1)
                if not value:
                    raise ExpositionError("malformed label value at column %d" % (label.end() + 2))
                if label.group() in labels:
                    raise ExpositionError("label %s given twice" % label.group())
                labels[label.group()] = unescape(value.group(1))
                at = value.end()
                if line[at:at + 1] == ",":
                    at += 1
                elif line[at:at + 1] != "}":
                    raise ExpositionError("',' or '}' expected at column %d" % (at + 1))
            at += 1
        fields = line[at:].split()
        if not re.match(r"[ \t]", line[at:at + 1]) or len(fields) not in (1, 2):
            raise ExpositionError("a value (and an optional timestamp) expected after %s" % name)
        if not FLOAT.match(fields[0]):
            raise ExpositionError("value %r is not a float" % fields[0])
        if len(fields) == 2 and not re.match(r"-?[0-9]+\Z", fields[1]):
            raise ExpositionError("timestamp %r is not an integer" % fields[1])
        return name, labels, float(fields[0])

    def value(self, name, **labels):
        """One series' value, or None when it is absent."""
        return self.series.get(series_key(name, labels))

    def samples(self, name):
        """[(labels, value)] of every series named `name`."""
        return [(dict(items), value) for (each, items), value in self.series.items()
                if each == name]


GOOD_EXPOSITION = (
    '# A comment line\n'
    '# HELP demo_requests_total Requests, with a \\\\ and a\\nsecond line.\n'
    '# TYPE demo_requests_total counter\n'
    'demo_requests_total{path="/a \\"b\\" \\\\ \\n",code="200"} 1027 1395066363000\n'
    'demo_requests_total{code="200",path="/c",} 3\n'
    '\n'
    '# TYPE demo_temperature gauge\n'
    '# HELP demo_temperature\n'
    'demo_temperature +Inf\n'
    '# HELP demo_other Others.\n'
    '# TYPE demo_other gauge\n'
    'demo_other{a="1"} -Inf\n'
    'demo_other{a="2"} NaN\n'
    'demo_other{a="3"} -1.5e-3\n'
    '# HELP demo_rpc_seconds A summary.\n'
    '# TYPE demo_rpc_seconds summary\n'
    'demo_rpc_seconds{quantile="0.5"} 4773\n'
    'demo_rpc_seconds_sum 1.7560473e+07\n'
    'demo_rpc_seconds_count 2693\n'
    '# HELP demo_empty A family with no samples yet.\n'
    '# TYPE demo_empty counter\n')


def test_metrics_parser_accepts_the_format_with_escapes_and_special_values():
    parsed = Exposition(GOOD_EXPOSITION)
    assert parsed.families["demo_requests_total"]["help"] == \
        "Requests, with a \\ and a\nsecond line."
    assert parsed.value("demo_requests_total", path='/a "b" \\ \n', code="200") == 1027
    assert parsed.value("demo_requests_total", path="/c", code="200") == 3
    assert parsed.value("demo_temperature") == float("inf")
    assert parsed.value("demo_other", a="1") == float("-inf")
    assert parsed.value("demo_other", a="2") != parsed.value("demo_other", a="2")     # NaN
    assert parsed.value("demo_rpc_seconds_count") == 2693
    assert parsed.families["demo_empty"] == {"help": "A family with no samples yet.",
                                             "type": "counter", "samples": {}}


def declared(name, kind="counter"):
    return "# HELP %s h\n# TYPE %s %s\n" % (name, name, kind)


BAD_EXPOSITIONS = [
    # text, what the error must say
    (declared("a") + "a 1", r"does not end with a line feed"),
    ("a 1\n", r"sample a before its family's # HELP and # TYPE"),
    ("# TYPE a counter\na 1\n", r"before its family's # HELP"),
    ("# HELP a h\na 1\n", r"before its family's # HELP and # TYPE"),
    (declared("a") + "# HELP a again\na 1\n", r"a second # HELP for a"),
    (declared("a") + "# TYPE a gauge\n", r"a second # TYPE for a"),
    (declared("a") + "a 1\n# HELP a late\n", r"a second # HELP"),
    (declared("a") + "b 1\n", r"sample b is not of family a"),
    (declared("a") + "a_sum 1\n", r"sample a_sum is not of family a \(counter\)"),
    (declared("a") + declared("b") + "a 1\n", r"sample a is not of family b"),
    (declared("a") + "a 1\n" + declared("b") + declared("a"), r"a declared again"),
    ("# HELP a h\n# HELP b h\n# TYPE b gauge\n", r"family a has no # TYPE"),
    ("# HELP a h\n", r"family a has no # TYPE"),
    (declared("a") + 'a{x="1",y="2"} 1\na{y="2",x="1"} 2\n', r"given twice"),
    (declared("a") + "a 1\na 2\n", r"series a\{\} given twice"),
    (declared("a") + 'a{x="1",x="2"} 1\n', r"label x given twice"),
    (declared("a") + 'a{x="\\t"} 1\n', r"malformed label value"),
    (declared("a") + 'a{x="1} 1\n', r"malformed label value"),
    (declared("a") + 'a{x=1} 1\n', r"malformed label value"),
    (declared("a") + 'a{1x="1"} 1\n', r"malformed label"),
    (declared("a") + 'a{__x="1"} 1\n', r"label name __x is reserved"),
    (declared("a") + 'a{x="1" y="2"} 1\n', r"',' or '}' expected"),
    (declared("a") + 'a{x="1"}1\n', r"a value .* expected"),
    (declared("a") + "a\n", r"a value .* expected"),
    (declared("a") + "a 1 2 3\n", r"a value .* expected"),
    (declared("a") + "a 1,5\n", r"value '1,5' is not a float"),
    (declared("a") + "a Infinity\n", r"value 'Infinity' is not a float"),
    (declared("a") + "a 1 1.5\n", r"timestamp '1.5' is not an integer"),
    ("# HELP 1a h\n", r"malformed # HELP"),
    ("# HELP a bad \\t escape\n", r"malformed # HELP"),
    ("# TYPE a countr\n", r"malformed # TYPE"),
    (declared("a-b"), r"malformed # HELP"),
    ("-a 1\n", r"no metric name"),
]


@pytest.mark.parametrize("text, message", BAD_EXPOSITIONS, ids=[t for t, _ in BAD_EXPOSITIONS])
def test_metrics_parser_refuses(text, message):
    with pytest.raises(ExpositionError) as raised:
        Exposition(text)
    assert re.search(message, str(raised.value)), str(raised.value)


# -- the endpoint, read by real HTTP clients -----------------------------------------------------

METRIC_FAMILIES = {
    # every family the contract names, and its TYPE
    "tailwart_edge_info": "gauge",
    "tailwart_edge_start_time_seconds": "gauge",
    "tailwart_edge_uptime_seconds": "gauge",
    "tailwart_edge_sessions_total": "counter",
    "tailwart_edge_sessions_active": "gauge",
    "tailwart_edge_bytes_total": "counter",
    "tailwart_edge_upstream_attempts_total": "counter",
    "tailwart_edge_upstream_failures_total": "counter",
    "tailwart_edge_refusals_total": "counter",
    "tailwart_edge_resolver_failures_total": "counter",
    "tailwart_edge_open_fds": "gauge",
    "tailwart_edge_max_fds": "gauge",
    "tailwart_edge_max_sessions": "gauge",
    "tailwart_edge_log_dropped_lines_total": "counter",
}
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLOSE_BOUND = 30        # seconds a stuck scraper may keep its connection, at the very most


def http_get(port, path="/metrics", host="127.0.0.1", timeout=5):
    """(status, headers, body) of one GET by urllib, with no proxy from the environment."""
    url = "http://%s:%d%s" % ("[%s]" % host if ":" in host else host, port, path)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def scrape(port, host="127.0.0.1"):
    """The exposition at /metrics, parsed strictly (a 200 with the format's content type)."""
    status, headers, body = http_get(port, host=host)
    assert status == 200, (status, body)
    assert headers["Content-Type"] == METRICS_TYPE
    return Exposition(body.decode("utf-8"))


def session_lines(proxy):
    return sum(1 for line in list(proxy.lines) if line and "session client=" in line)


def wait_sessions(proxy, count):
    """Until `count` sessions have ended (their counters are final then)."""
    eventually(lambda: session_lines(proxy) >= count)


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def soft_fd_limit(pid):
    with open("/proc/%d/limits" % pid) as f:
        line = next(line for line in f if line.startswith("Max open files"))
    return int(line.split()[3])


def counted(metrics, name):
    """The series of `name` that counted something (a label set may be listed at 0 or not)."""
    return [(labels, value) for labels, value in metrics.samples(name) if value != 0]


def test_metrics_count_sessions_bytes_and_a_refused_upstream():
    port, failing, mport, dead = free_port(), free_port(), free_port(), free_port()
    started = time.time()
    with Upstream(echo) as up, \
            Edge("--proxy-protocol", "off", "--metrics", "127.0.0.1:%d" % mport,
                 "127.0.0.1:%d=%s" % (port, up.address),
                 "127.0.0.1:%d=127.0.0.1:%d" % (failing, dead)) as proxy:
        payloads = [b"a", b"b" * 100, b"c" * 5000, bytes(range(256)) * 300]
        for payload in payloads:
            assert round_trip(port, payload) == payload
        with connect(("127.0.0.1", failing)) as c:
            assert recv_all(c) == b""                   # every upstream refused: closed
        wait_sessions(proxy, 5)
        metrics = scrape(mport)
        cap = int(re.search(r"max-connections=(\d+)", proxy.wait_for(r"\bready\b")).group(1))
        fds, limit = fd_count(proxy.pid), soft_fd_limit(proxy.pid)
        scraped = time.time()
    for name, kind in METRIC_FAMILIES.items():
        assert metrics.families[name]["type"] == kind, name
        assert metrics.families[name]["help"], name
    listen, other, sent = "127.0.0.1:%d" % port, "127.0.0.1:%d" % failing, sum(map(len, payloads))
    assert metrics.value("tailwart_edge_sessions_total", listen=listen) == 4
    assert metrics.value("tailwart_edge_sessions_total", listen=other) == 1
    assert metrics.value("tailwart_edge_sessions_active", listen=listen) in (0, None)
    assert metrics.value("tailwart_edge_bytes_total", listen=listen, direction="up") == sent
    assert metrics.value("tailwart_edge_bytes_total", listen=listen, direction="down") == sent
    assert metrics.value("tailwart_edge_upstream_attempts_total", upstream=up.address) == 4
    assert metrics.value("tailwart_edge_upstream_attempts_total",
                         upstream="127.0.0.1:%d" % dead) == 1
    assert counted(metrics, "tailwart_edge_upstream_failures_total") == [
        ({"upstream": "127.0.0.1:%d" % dead, "reason": "refused"}, 1)]
    assert counted(metrics, "tailwart_edge_refusals_total") == [
        ({"listen": other, "reason": "no-upstream"}, 1)]
    assert counted(metrics, "tailwart_edge_resolver_failures_total") == []
    assert metrics.samples("tailwart_edge_info") == [({"version": edge.__version__}, 1)]
    assert started - 1 <= metrics.value("tailwart_edge_start_time_seconds") <= scraped
    assert 0 < metrics.value("tailwart_edge_uptime_seconds") <= scraped - started + 1
    assert abs(metrics.value("tailwart_edge_open_fds") - fds) <= 3, fds
    assert metrics.value("tailwart_edge_max_fds") == limit
    assert metrics.value("tailwart_edge_max_sessions") == cap
    assert metrics.value("tailwart_edge_log_dropped_lines_total") == 0
    for (name, _), value in metrics.series.items():
        if metrics.families.get(name, {}).get("type") == "counter":
            assert value >= 0 and value == int(value), (name, value)


def test_metrics_active_sessions_and_their_bytes_while_they_are_open():
    port, mport = free_port(), free_port()
    listen = "127.0.0.1:%d" % port
    with Upstream(echo) as up, Edge("--proxy-protocol", "off", "--metrics", "127.0.0.1:%d"
                                    % mport, "%s=%s" % (listen, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as first, connect(("127.0.0.1", port)) as second:
            for c, payload in ((first, b"12345"), (second, b"x" * 7000)):
                c.sendall(payload)
                assert recv_exactly(c, len(payload)) == payload
            metrics = scrape(mport)
            assert metrics.value("tailwart_edge_sessions_active", listen=listen) == 2
            assert metrics.value("tailwart_edge_sessions_total", listen=listen) == 2
            for direction in ("up", "down"):
                assert metrics.value("tailwart_edge_bytes_total", listen=listen,
                                     direction=direction) == 7005
        wait_sessions(proxy, 2)
        metrics = scrape(mport)
        assert metrics.value("tailwart_edge_sessions_active", listen=listen) == 0
        assert metrics.value("tailwart_edge_bytes_total", listen=listen, direction="up") == 7005


def test_metrics_answer_is_http_1_0_with_type_and_length_then_closes():
    mport = free_port()
    with Edge("--metrics", "127.0.0.1:%d" % mport,
              "127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port())):
        client = http.client.HTTPConnection("127.0.0.1", mport, timeout=5)
        try:
            client.request("GET", "/metrics")
            response = client.getresponse()
            body = response.read()
        finally:
            client.close()
        assert (response.version, response.status, response.reason) == (10, 200, "OK")
        assert response.getheader("Content-Type") == METRICS_TYPE
        assert int(response.getheader("Content-Length")) == len(body)
        Exposition(body.decode("utf-8"))
        with connect(("127.0.0.1", mport), timeout=5) as raw:    # as Prometheus asks, raw
            raw.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain;"
                        b"version=0.0.4\r\nConnection: keep-alive\r\n\r\n")
            answer = recv_all(raw)                  # to EOF: the edge closes after the answer
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.0 200 OK"
        assert b"\r\ncontent-length: %d" % len(body) in head.lower()
        Exposition(body.decode("utf-8"))


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/x", "/favicon.ico"])
def test_metrics_another_path_is_404(path):
    mport = free_port()
    with Edge("--metrics", "127.0.0.1:%d" % mport,
              "127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port())):
        status, _, _ = http_get(mport, path)
        assert status == 404
        assert scrape(mport).value("tailwart_edge_info", version=edge.__version__) == 1


def test_metrics_read_by_curl():
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    mport = free_port()
    with Edge("--metrics", "127.0.0.1:%d" % mport,
              "127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port())):
        result = subprocess.run([curl, "-sS", "--noproxy", "*", "--max-time", "5", "-D", "-",
                                 "http://127.0.0.1:%d/metrics" % mport], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.decode("utf-8").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200 OK\r\n"), head
    assert "Content-Type: %s" % METRICS_TYPE in head.split("\r\n")
    assert Exposition(body).value("tailwart_edge_info", version=edge.__version__) == 1


def test_metrics_on_ipv6_loopback():
    if not has_ipv6():
        pytest.skip("no IPv6 loopback")
    mport = free_port("::1")
    with Edge("--metrics", "[::1]:%d" % mport,
              "127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port())):
        assert scrape(mport, host="::1").value("tailwart_edge_info",
                                                version=edge.__version__) == 1


def test_metrics_on_a_wildcard_address_warns_at_start():
    mport = free_port("0.0.0.0")
    with Edge("--metrics", "0.0.0.0:%d" % mport,
              "127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port())) as proxy:
        assert "0.0.0.0:%d" % mport in proxy.wait_for(r" warning .*metrics")
        assert scrape(mport).value("tailwart_edge_info", version=edge.__version__) == 1


@pytest.mark.parametrize("value", ["99999", "nohost:x", "127.0.0.1:99999", "127.0.0.1:x",
                                   "127.0.0.1", "::1:9100", ""])
def test_metrics_bad_address_exits_2_with_one_line(value):
    code, out, err = run_script("--metrics", value,
                                "127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port()))
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tailwart_edge.py: error: "), err
    assert "--metrics" in lines[0] or "'%s'" % value in lines[0], err
    assert "Traceback" not in err


# -- scrapers that misbehave: each holds only its own connection, and not for long -------------

def silent_scraper(port, result):
    """Connects and sends nothing: how long until the edge closes."""
    start = time.monotonic()
    with connect(("127.0.0.1", port), timeout=CLOSE_BOUND) as s:
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except socket.timeout:
            return
    result["secs"] = time.monotonic() - start


def trickling_scraper(port, result):
    """Sends a request one byte a second, never ending it."""
    start = time.monotonic()
    request = b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * CLOSE_BOUND * 2
    with connect(("127.0.0.1", port), timeout=CLOSE_BOUND) as s:
        for byte in request:
            if time.monotonic() - start > CLOSE_BOUND:
                return
            if select.select([s], [], [], 1.0)[0]:
                try:
                    if not s.recv(65536):
                        break               # an answer (a 408 or so) is fine; EOF is the end
                except ConnectionResetError:
                    break
                continue
            try:
                s.send(bytes([byte]))
            except OSError:
                break
        else:
            return
    result["secs"] = time.monotonic() - start


def huge_scraper(port, result):
    """Sends a request header of up to 64 MiB."""
    start = time.monotonic()
    with connect(("127.0.0.1", port), timeout=2) as s:
        try:
            s.sendall(b"GET /metrics HTTP/1.0\r\nX-Big: ")
            for _ in range(1024):
                s.sendall(b"a" * 65536)
                if time.monotonic() - start > CLOSE_BOUND:
                    return
        except socket.timeout:
            pass                            # the edge reads no more: it must close, then
        except OSError:
            result["secs"] = time.monotonic() - start
            return
        s.settimeout(max(0.1, CLOSE_BOUND - (time.monotonic() - start)))
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except socket.timeout:
            return
    result["secs"] = time.monotonic() - start


def test_metrics_stuck_scrapers_do_not_stop_relaying_and_are_closed_in_bounded_time():
    port, mport = free_port(), free_port()
    with Upstream(echo) as up, Edge("--proxy-protocol", "off", "--metrics", "127.0.0.1:%d"
                                    % mport, "127.0.0.1:%d=%s" % (port, up.address)) as proxy:
        scrape(mport)
        before = fd_count(proxy.pid)
        results = {kind: {} for kind in ("silent", "trickling", "huge")}
        threads = [threading.Thread(target=scraper, args=(mport, results[kind]), daemon=True)
                   for kind, scraper in (("silent", silent_scraper),
                                         ("trickling", trickling_scraper),
                                         ("huge", huge_scraper))]
        for thread in threads:
            thread.start()
        time.sleep(1.5)                     # each has its connection and is stuck
        for i in range(20):
            assert round_trip(port, b"relayed %d" % i) == b"relayed %d" % i
        assert scrape(mport).value("tailwart_edge_sessions_total",
                                   listen="127.0.0.1:%d" % port) == 20
        for thread in threads:
            thread.join(CLOSE_BOUND + 5)
        assert all("secs" in result for result in results.values()), \
            "not closed within %d s: %r" % (CLOSE_BOUND, results)
        assert round_trip(port, b"after") == b"after"
        eventually(lambda: fd_count(proxy.pid) <= before)
        assert proxy.proc.poll() is None


def test_metrics_idle_and_slow_connections_holding_every_slot_lock_no_scrape_out():
    """Issue 19 fault 7: 8 connections that send nothing (or a request line cut short) held
    every slot, and each newer connection, Prometheus' scrape too, was closed at accept: 0 of
    14 scrapes served while they were renewed. The oldest of those that have not sent a whole
    request must make room instead."""
    mport = free_port()
    with Edge("--metrics", "127.0.0.1:%d" % mport,
              "127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port())) as proxy:
        scrape(mport)
        held, served, rounds = [], [], 10
        try:
            for _ in range(rounds):
                for i in range(8):          # 8 fresh ones each round, all kept open
                    s = connect(("127.0.0.1", mport))
                    if i % 2:
                        s.sendall(b"GET /met")      # slow: a request line cut short
                    held.append(s)
                try:
                    status, _, body = http_get(mport)
                except (OSError, http.client.HTTPException):
                    status = None
                served.append(status == 200)
        finally:
            for s in held:
                s.close()
        assert served.count(True) == rounds, "%d of %d scrapes served" % (
            served.count(True), rounds)
        assert proxy.proc.poll() is None


def test_metrics_200_scrapes_and_20_aborted_ones_leave_no_descriptor_behind():
    mport = free_port()
    with Edge("--metrics", "127.0.0.1:%d" % mport,
              "127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port())) as proxy:
        scrape(mport)
        before = fd_count(proxy.pid)
        for _ in range(200):
            status, _, body = http_get(mport)
            assert status == 200 and body.endswith(b"\n")
        for i in range(20):                 # gone before the answer: mid-request or at once
            with connect(("127.0.0.1", mport)) as s:
                if i % 2:
                    s.sendall(b"GET /met")
        eventually(lambda: fd_count(proxy.pid) <= before)
        assert scrape(mport).value("tailwart_edge_info", version=edge.__version__) == 1


# -- failures you can see in the log, in stats and in STATUS= ------------------------------------

def dead_upstream_counts(proxy, dead):
    """(attempts, failed, skipped) of upstream 127.0.0.1:dead in a fresh stats line; skipped
    is 0 where the edge does not skip a failed upstream for a while."""
    mark = proxy.mark()
    proxy.signal(signal.SIGUSR1)
    line = proxy.wait_for(r"\bstats ", start=mark)
    found = re.search(r"\| upstream 127\.0\.0\.1:%d attempts=(\d+) failed=(\d+)"
                      r"(?: skipped=(\d+))?" % dead, line)
    assert found, line
    return int(found.group(1)), int(found.group(2)), int(found.group(3) or 0)


def test_visible_refused_first_upstream_is_a_warning_once_per_10s_then_says_suppressed():
    port, dead = free_port(), free_port()
    with Upstream(echo) as up, Edge("--proxy-protocol", "off", "127.0.0.1:%d=127.0.0.1:%d,%s"
                                    % (port, dead, up.address)) as proxy:
        began = time.monotonic()            # the edge's 10 s begin after this
        assert round_trip(port, b"first") == b"first"
        warning = r"\bconnect upstream=127\.0\.0\.1:%d\b" % dead
        line = proxy.wait_for(warning)
        seen = time.monotonic()             # ... and before this
        assert re.search(r' warning connect upstream=127\.0\.0\.1:%d( address=127\.0\.0\.1:%d)? '
                         r'error="Connection refused" next=%s$'
                         % (dead, dead, re.escape(up.address)), line), line
        while time.monotonic() - began < 3.5:   # more failures (or probes, if it skips a
            assert round_trip(port, b"more") == b"more"     # failed upstream for a while)
            time.sleep(0.02)
        attempts, failed, skipped = dead_upstream_counts(proxy, dead)
        assert failed == attempts >= 2, (attempts, failed, skipped)
        if time.monotonic() - began < 9.5:      # else too slow a machine to tell
            assert len([l for l in list(proxy.lines) if l and re.search(warning, l)]) == 1
        time.sleep(max(0, seen + 10.5 - time.monotonic()))       # the 10 s are over
        mark = proxy.mark()
        assert round_trip(port, b"later") == b"later"
        line = proxy.wait_for(warning, start=mark)
        assert " warning " in line and line.endswith(" suppressed=%d" % (failed - 1)), line


def test_visible_stats_count_attempts_and_failures_per_upstream():
    port, dead = free_port(), free_port()
    with Upstream(echo) as up, Edge("--proxy-protocol", "off", "127.0.0.1:%d=127.0.0.1:%d,%s"
                                    % (port, dead, up.address)) as proxy:
        for i in range(21):
            assert round_trip(port, b"%d" % i) == b"%d" % i
        wait_sessions(proxy, 21)
        proxy.signal(signal.SIGUSR1)
        line = proxy.wait_for(r"\bstats ")
    assert re.search(r"stats active=0 sessions=21 failed=0 ", line), line
    # Every session tried the dead upstream first and failed over; an edge that skips a failed
    # upstream for a while counts the sessions that went past it as skipped.
    found = re.search(r" \| upstream 127\.0\.0\.1:%d attempts=(\d+) failed=(\d+)"
                      r"(?: skipped=(\d+))?(?: down)?"
                      r" \| upstream %s attempts=21 failed=0(?: skipped=0)?$"
                      % (dead, re.escape(up.address)), line)
    assert found, line
    attempts, failed, skipped = (int(n or 0) for n in found.groups())
    assert attempts == failed and attempts + skipped == 21, line


def test_visible_timed_out_first_upstream_is_a_warning_and_a_timeout_metric():
    # A listener with a full backlog: Linux drops further SYNs, so connect() hangs.
    with Upstream(None, backlog=0, accept=False) as full, Upstream(echo) as up:
        fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", full.port))
            fillers.append(s)
        time.sleep(0.2)
        port, mport = free_port(), free_port()
        try:
            with Edge("--connect-timeout", "1", "--proxy-protocol", "off", "--metrics",
                      "127.0.0.1:%d" % mport, "127.0.0.1:%d=%s,%s"
                      % (port, full.address, up.address)) as proxy:
                assert round_trip(port, b"second") == b"second"
                line = proxy.wait_for(r"\bconnect upstream=%s\b" % full.address)
                assert " warning " in line and line.endswith(" next=%s" % up.address), line
                assert re.search(r'error="[^"]*tim', line, re.I), line
                metrics = scrape(mport)
                assert counted(metrics, "tailwart_edge_upstream_failures_total") == [
                    ({"upstream": full.address, "reason": "timeout"}, 1)]
        finally:
            for s in fillers:
                s.close()


def test_visible_verbose_shows_accept_connect_and_session_start():
    port = free_port()
    with Upstream(echo) as up, Edge("-v", "--proxy-protocol", "off", "127.0.0.1:%d=%s"
                                    % (port, up.address)) as proxy:
        with connect(("127.0.0.1", port)) as c:
            client = "127.0.0.1:%d" % c.getsockname()[1]
            c.sendall(b"v")
            assert recv_exactly(c, 1) == b"v"
        wait_sessions(proxy, 1)
        lines = list(proxy.lines)
    found = []
    for pattern in (r" debug accept client=%s listen=127\.0\.0\.1:%d\b" % (client, port),
                    r" debug connect client=%s upstream=%s address=%s secs=[0-9.]+\b"
                    % (client, up.address, up.address),
                    r" debug session-start client=%s listen=127\.0\.0\.1:%d upstream=%s\b"
                    % (client, port, up.address),
                    r" session client=%s " % client):
        found.append(next((i for i, line in enumerate(lines)
                           if line and re.search(pattern, line)), None))
        assert found[-1] is not None, "no line matching %r in\n%s" % (pattern, proxy.output())
    assert found == sorted(found), proxy.output()         # in the order they happen


def test_visible_verbose_shows_a_lookup_with_its_time():
    port = free_port()
    with Upstream(echo) as up, Edge("-v", "--dns-ttl", "0.2", "--proxy-protocol", "off",
                                    "127.0.0.1:%d=localhost:%d" % (port, up.port)) as proxy:
        time.sleep(0.5)                     # the answer from the start is stale now
        assert round_trip(port, b"name") == b"name"
        line = proxy.wait_for(r" debug resolve host=localhost addresses=\S*127\.0\.0\.1")
        assert re.search(r" secs=[0-9.]+\b", line), line


def status_messages(notify, pattern, timeout):
    """Collect until a STATUS= matching `pattern` arrives; the matching message, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = notify.next(deadline - time.monotonic())
        if message and re.search(pattern, message.get("STATUS", "")):
            return message
    return None


def test_visible_status_follows_a_session_start_and_end_without_a_watchdog(notify_socket):
    port = free_port()
    with Upstream(echo) as up, Edge("--proxy-protocol", "off", "127.0.0.1:%d=%s"
                                    % (port, up.address),
                                    env={"NOTIFY_SOCKET": notify_socket.path}) as proxy:
        notify_socket.wait_for("READY")
        assert re.search(r"\b0 active\b", notify_socket.messages[0]["STATUS"])
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"s")
            assert recv_exactly(c, 1) == b"s"
            started = status_messages(notify_socket, r"\b1 active\b", timeout=4)
            assert started is not None, notify_socket.messages
        ended = status_messages(notify_socket, r"\b0 active\b", timeout=4)
        assert ended is not None, notify_socket.messages
        assert not any("WATCHDOG" in m for m in notify_socket.messages), notify_socket.messages
        assert proxy.stop() == 0


def test_visible_status_comes_at_most_about_once_a_second(notify_socket):
    port = free_port()
    with Upstream(echo) as up, Edge("--proxy-protocol", "off", "127.0.0.1:%d=%s"
                                    % (port, up.address),
                                    env={"NOTIFY_SOCKET": notify_socket.path}) as proxy:
        notify_socket.wait_for("READY")
        start, sessions = time.monotonic(), 0
        while time.monotonic() - start < 2:
            assert round_trip(port, b"r") == b"r"
            sessions += 1
        last = status_messages(notify_socket, r"\b0 active, %d sessions\b" % sessions, 4)
        spent = time.monotonic() - start
        assert last is not None, notify_socket.messages[-5:]
        statuses = sum("STATUS" in m for m in notify_socket.messages[1:])
        assert 1 <= statuses <= spent + 3, (statuses, spent, sessions)
        assert proxy.stop() == 0


def test_visible_one_session_is_singular_in_status_and_log(notify_socket):
    port = free_port()
    with Upstream(echo) as up, Edge("--proxy-protocol", "off", "127.0.0.1:%d=%s"
                                    % (port, up.address),
                                    env={"NOTIFY_SOCKET": notify_socket.path}) as proxy:
        notify_socket.wait_for("READY")
        assert round_trip(port, b"one") == b"one"           # 1 session in all, none open
        assert status_messages(notify_socket, r"\b0 active\b", timeout=4) is not None
        with connect(("127.0.0.1", port)) as c:             # 1 open as the drain begins
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
            assert status_messages(notify_socket, r"\b1 active\b", timeout=4) is not None
            proxy.signal(signal.SIGUSR1)
            proxy.wait_for(r"\bstats ")
            proxy.signal(signal.SIGTERM)
            proxy.wait_for(r"\bstopping active=1 ")
            notify_socket.wait_for("STOPPING", timeout=5)
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b""
        assert proxy.wait() == 0
        while notify_socket.next(timeout=0.5) is not None:
            pass
    said = proxy.output().splitlines() + [m["STATUS"] for m in notify_socket.messages
                                          if "STATUS" in m]
    plural_one = re.compile(r"(?<![\w=.])1 (sessions|mappings|listeners|upstreams)\b(?!=)")
    assert not [text for text in said if plural_one.search(text)], said


@pytest.mark.parametrize("open_sessions, them, sessions", [(1, "it", "1 session"),
                                                          (2, "them", "2 sessions")])
def test_visible_stopping_says_a_second_term_closes_them(open_sessions, them, sessions):
    port = free_port()
    with Upstream(echo) as up, Edge("--proxy-protocol", "off", "127.0.0.1:%d=%s"
                                    % (port, up.address)) as proxy:
        clients = [connect(("127.0.0.1", port)) for _ in range(open_sessions)]
        for c in clients:
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
        proxy.signal(signal.SIGTERM)
        line = proxy.wait_for(r"\bstopping active=")
        assert line.endswith(" notice stopping active=%d drain=30s; a second TERM/INT (Ctrl-C) "
                             "closes %s now" % (open_sessions, them)), line
        mark = proxy.mark()
        proxy.signal(signal.SIGTERM)
        line = proxy.wait_for(r"\bsecond stop signal\b", start=mark)
        assert re.search(r"\bclosing %s now$" % sessions, line), line
        for c in clients:
            c.settimeout(5)
            assert recv_all(c) == b""
            c.close()
        assert proxy.wait() == 0


def test_visible_stopping_without_sessions_adds_no_hint():
    with Edge("127.0.0.1:%d=127.0.0.1:%d" % (free_port(), free_port())) as proxy:
        assert proxy.stop() == 0
        assert proxy.wait_for(r"\bstopping active=").endswith(" stopping active=0 drain=30s")


# -- Routing by server name (SNI) and HTTP Host (issue 14) -------------------------------------
#
# One listener, several routes: real TLS servers (Python's ssl, each with its own self-signed
# certificate; the mail one behind a PROXY v2 parser) and small HTTP servers as the routes'
# upstreams, real clients (Python's ssl, openssl s_client, urllib, curl) in front. A client sees
# the certificate (or the answer) of the server its name picks; the log and `stats` say which
# rule did. The unit tests of the codec are above (`Routing codec`).

try:
    import ssl
except ImportError:             # a Python built without it: the TLS routing tests skip
    ssl = None

ROUTING_NAMES = {"mail": "mail.example.com", "web": "www.example.net"}
TLS_UNRECOGNIZED_NAME_ALERT = b"\x15\x03\x03\x00\x02\x02\x70"   # RFC 6066 section 3, fatal
PEEK_BOUND = 10                 # seconds within which --peek-timeout 1 must have closed


@pytest.fixture(scope="module")
def routing_certificates(tmp_path_factory):
    """{role: (certificate path, key path, certificate DER)} for the two TLS servers, made by
    the openssl command-line tool (self-signed, CN and subjectAltName the role's name)."""
    if ssl is None:
        unavailable("this Python has no ssl module")
    openssl = need_tool("openssl")
    directory = tmp_path_factory.mktemp("routing-certificates")
    made = {}
    for role, name in ROUTING_NAMES.items():
        certificate, key = str(directory / (role + ".pem")), str(directory / (role + ".key"))
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        "/CN=" + name, "-addext", "subjectAltName=DNS:" + name,
                        "-keyout", key, "-out", certificate], check=True, timeout=WAIT,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with open(certificate) as f:
            made[role] = (certificate, key, ssl.PEM_cert_to_DER_cert(f.read()))
    return made


def proxy_v2_addresses(header):
    """((client ip, port), (server ip, port)) of a v2 PROXY TCP4 header; AssertionError else."""
    assert header[:12] == SIG and header[12:16] == b"\x21\x11\x00\x0c", header
    ports = struct.unpack("!HH", header[24:28])
    return ((socket.inet_ntop(socket.AF_INET, header[16:20]), ports[0]),
            (socket.inet_ntop(socket.AF_INET, header[20:24]), ports[1]))


class TlsServer(Upstream):
    """A TLS server with its own certificate, as a route's upstream. With proxy=True it first
    reads a PROXY v2 header and records the addresses in it (`headers`); without, it checks the
    stream starts with a TLS record (no header). After the handshake it says `ROLE SNI ALPN\\n`
    (as it saw them, '-' for none), then reads until the client closes."""

    def __init__(self, role, certificate, proxy, host="127.0.0.1"):
        path, key, self.der = certificate
        self.role, self.proxy = role, proxy
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(path, key)
        self.context.set_alpn_protocols(["acme-tls/1", "http/1.1"])     # what routes may offer
        self.context.sni_callback = self._server_name
        self.seen = threading.local()       # the SNI of this thread's handshake
        self.headers = []                   # (client, server) of each PROXY header
        self.served = []                    # (SNI, ALPN) of each completed handshake
        super().__init__(self._serve_tls, host=host)

    def _server_name(self, tls, name, context):
        self.seen.name = name

    def _serve_tls(self, conn):
        if self.proxy:
            self.headers.append(proxy_v2_addresses(read_proxy_header(conn)))
        else:
            first = conn.recv(1, socket.MSG_PEEK)
            assert first == b"\x16", "%s: a stream that is not TLS: %r" % (self.role, first)
        self.seen.name = None
        with self.context.wrap_socket(conn, server_side=True) as tls:
            alpn = tls.selected_alpn_protocol()
            self.served.append((self.seen.name, alpn))
            tls.sendall(("%s %s %s\n" % (self.role, self.seen.name or "-", alpn or "-")).encode())
            try:
                while tls.recv(4096):
                    pass
            except OSError:
                pass                        # a client gone without close_notify


@pytest.fixture
def tls_upstreams(routing_certificates):
    """{"mail": TLS server behind a PROXY v2 parser, "web": TLS server taking no header}."""
    with TlsServer("mail", routing_certificates["mail"], proxy=True) as mail, \
            TlsServer("web", routing_certificates["web"], proxy=False) as web:
        yield {"mail": mail, "web": web}
        assert not mail.errors and not web.errors, mail.errors + web.errors


def client_context(alpn=None):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False          # self-signed: the test compares certificates
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def line_from(read, limit=4096):
    line = b""
    while not line.endswith(b"\n"):
        chunk = read(limit - len(line))
        if not chunk:
            raise EOFError("closed after %r" % line)
        line += chunk
        assert len(line) < limit, line
    return line.decode()


def tls_client(port, name, alpn=None):
    """One session through the edge by Python's ssl client: (the server certificate's DER,
    the server's line, the client's address)."""
    with connect(("127.0.0.1", port)) as raw:
        with client_context(alpn).wrap_socket(raw, server_hostname=name) as tls:
            return tls.getpeercert(binary_form=True), line_from(tls.recv), tls.getsockname()


class TlsOverMemory:
    """A TLS client (ssl.SSLObject over memory) on a socket the test writes itself: its first
    flight can be sent in any shape, then the handshake goes on as usual."""

    def __init__(self, sock, name, alpn=None):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context(alpn).wrap_bio(self.incoming, self.outgoing,
                                                 server_hostname=name)
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self.hello = self.outgoing.read()       # the ClientHello, in one record
        assert self.hello[0] == 0x16 and len(self.hello) == 5 + struct.unpack(
            "!H", self.hello[3:5])[0], self.hello[:5]

    def _pump(self, step):
        """step() until it stops wanting to read: bytes out to the socket, socket to bytes in."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                return step()
            except ssl.SSLWantReadError:
                pass
            pending = self.outgoing.read()
            if pending:
                self.sock.sendall(pending)
            assert time.monotonic() < deadline, "no progress in %ds" % WAIT
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the connection closed during TLS")
            self.incoming.write(data)

    def finish_handshake(self):
        self._pump(self.tls.do_handshake)
        self.sock.sendall(self.outgoing.read())     # the client's Finished
        return self.tls.getpeercert(binary_form=True)

    def read_line(self):
        return line_from(lambda n: self._pump(lambda: self.tls.read(n)))


def routed_tls_edge(up, *options, default=True, protocol="tls"):
    """(edge, port): one TLS listener whose names mail.example.com and alpn:acme-tls/1, and
    *.example.com (a route of its own), go to up["mail"] (global v2 header), the rest (default
    route) to up["web"] with /proxy=off; without a default route when default=False."""
    def build(port):
        listen, mail = "127.0.0.1:%d/%s" % (port, protocol), up["mail"].address
        words = ["%s@mail.example.com,alpn:acme-tls/1=%s" % (listen, mail),
                 "%s@*.example.com=%s" % (listen, mail)]
        if default:
            words.append("%s=%s/proxy=off" % (listen, up["web"].address))
        return list(options) + words
    return Edge.on_free_port(build)


def session_of(proxy, client, timeout=WAIT):
    """The session line of the client at (ip, port)."""
    return proxy.wait_for(r"\bsession client=%s:%d " % (re.escape(client[0]), client[1]),
                          timeout)


def routing_fields(line):
    """(sni or host, NAME, ITEM): the fields a routed session's line ends with."""
    found = re.search(r" end=\S+(?: reason=\"[^\"]*\")? (sni|host)=(\S+) route=(\S+)$", line)
    assert found, line
    return found.groups()


def listener_stats(line, port):
    """The part of a `stats` line about the listener on 127.0.0.1:port."""
    for part in line.split(" | "):
        if part.startswith("127.0.0.1:%d " % port):
            return part
    raise AssertionError("no 127.0.0.1:%d in %s" % (port, line))


def closed_quietly(sock, timeout=PEEK_BOUND):
    """What the edge sent before it closed the connection (EOF within `timeout`)."""
    sock.settimeout(timeout)
    return recv_all(sock)


# -- TLS: which certificate each client sees ---------------------------------------------------

TLS_ROUTES = [
    # server_hostname, ALPN offered, the server expected, sni= and route= in the session line
    ("mail.example.com", None, "mail", "mail.example.com", "mail.example.com"),
    ("Mail.Example.COM.", None, "mail", "mail.example.com", "mail.example.com"),
    ("a.example.com", None, "mail", "a.example.com", "*.example.com"),
    ("a.b.example.com", None, "mail", "a.b.example.com", "*.example.com"),
    ("example.com", None, "web", "example.com", "default"),
    ("www.example.net", None, "web", "www.example.net", "default"),
    (None, None, "web", "-", "default"),
    ("www.example.net", ["acme-tls/1"], "mail", "www.example.net", "alpn:acme-tls/1"),
    ("www.example.net", ["h2", "http/1.1"], "web", "www.example.net", "default"),
]


@pytest.mark.parametrize("name, alpn, role, sni, item", TLS_ROUTES,
                         ids=["%s-%s" % (n, ",".join(a or ["no-alpn"])) for n, a, *_ in TLS_ROUTES])
def test_routing_tls_python_client_sees_its_routes_certificate(tls_upstreams, name, alpn, role,
                                                               sni, item):
    proxy, port = routed_tls_edge(tls_upstreams)
    with proxy:
        der, line, client = tls_client(port, name, alpn)
        assert der == tls_upstreams[role].der
        assert line.split()[0] == role, line
        if alpn == ["acme-tls/1"]:
            assert line.split()[2] == "acme-tls/1", line
        assert routing_fields(session_of(proxy, client)) == ("sni", sni, item)


@pytest.mark.parametrize("protocol", ["https", "smtps", "imaps", "pop3s"])
def test_routing_tls_on_each_tls_first_protocol(tls_upstreams, protocol):
    proxy, port = routed_tls_edge(tls_upstreams, protocol=protocol)
    with proxy:
        for name, role in [("mail.example.com", "mail"), ("www.example.net", "web")]:
            der, line, _ = tls_client(port, name)
            assert der == tls_upstreams[role].der and line.startswith(role + " "), line


OPENSSL_ROUTES = [
    (["-servername", "mail.example.com"], "mail"),
    (["-servername", "Www.Example.NET"], "web"),
    (["-servername", "x.y.example.com"], "mail"),
    (["-noservername"], "web"),
    (["-servername", "www.example.net", "-alpn", "acme-tls/1"], "mail"),
]


@pytest.mark.parametrize("arguments, role", OPENSSL_ROUTES,
                         ids=[" ".join(a) for a, _ in OPENSSL_ROUTES])
def test_routing_tls_openssl_s_client_sees_its_routes_certificate(tls_upstreams, arguments, role):
    openssl = need_tool("openssl")
    proxy, port = routed_tls_edge(tls_upstreams)
    with proxy:
        done = subprocess.run([openssl, "s_client", "-connect", "127.0.0.1:%d" % port]
                              + arguments, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=WAIT)
        found = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n",
                          done.stdout, re.S)
        assert found, done.stdout
        assert ssl.PEM_cert_to_DER_cert(found.group(0)) == tls_upstreams[role].der
        assert re.search(r"^subject=\s*CN\s*=\s*%s$" % re.escape(ROUTING_NAMES[role]),
                         done.stdout, re.M), done.stdout
        if "-alpn" in arguments:
            assert "ALPN protocol: acme-tls/1" in done.stdout, done.stdout
        proxy.wait_for(r"\bsession client=.* sni=\S+ route=\S+$")


def test_routing_tls_proxy_header_on_one_route_and_not_the_other(tls_upstreams):
    """The mail route takes the global v2 header, with the real client and the address it
    dialled; the default route (/proxy=off) gets the ClientHello first (TlsServer checks)."""
    proxy, port = routed_tls_edge(tls_upstreams)
    mail, web = tls_upstreams["mail"], tls_upstreams["web"]
    with proxy:
        _, line, client = tls_client(port, "mail.example.com")
        assert line.startswith("mail ")
        assert mail.headers == [(client, ("127.0.0.1", port))]
        _, line, client = tls_client(port, "www.example.net")
        assert line.startswith("web ") and web.served == [("www.example.net", None)]
        assert len(mail.headers) == 1


def test_routing_tls_start_up_log_has_a_line_per_route(tls_upstreams):
    proxy, port = routed_tls_edge(tls_upstreams)
    mail, web = tls_upstreams["mail"].address, tls_upstreams["web"].address
    with proxy:
        listen = proxy.wait_for(r"\blisten addr=127\.0\.0\.1:%d " % port)
        assert re.search(r" upstream=%s,%s proxy=v2\b" % (re.escape(mail), re.escape(web)),
                         listen), listen
        for match, upstream, version in [("mail.example.com,alpn:acme-tls/1", mail, "v2"),
                                         ("*.example.com", mail, "v2"), ("default", web, "off")]:
            line = proxy.wait_for(r"\broute listen=127\.0\.0\.1:%d match=%s " % (
                port, re.escape(match)))
            assert line.endswith(" upstream=%s proxy=%s" % (upstream, version)), line


# -- TLS: the ClientHello in pieces ------------------------------------------------------------

def test_routing_tls_client_hello_one_byte_per_segment_arrives_whole(tls_upstreams):
    received = []

    def recorder(conn):
        header = read_proxy_header(conn)
        received.append((header, recv_exactly(conn, len(hello))))
        conn.sendall(b"ok")
    hello = client_hello_bytes("mail.example.com")
    with Upstream(recorder) as up:
        proxy, port = Edge.on_free_port(lambda port: [
            "--peek-timeout", "60", "127.0.0.1:%d/tls@mail.example.com=%s" % (port, up.address),
            "127.0.0.1:%d/tls=%s/proxy=off" % (port, tls_upstreams["web"].address)])
        with proxy, connect(("127.0.0.1", port)) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(hello)):         # at most a few KiB: a few seconds at most
                c.sendall(hello[i:i + 1])
                time.sleep(0.001)
            assert recv_exactly(c, 2) == b"ok"
            client = c.getsockname()
            assert received == [(expected_v2(client, ("127.0.0.1", port)), hello)]
            c.close()
            assert routing_fields(session_of(proxy, client)) == \
                ("sni", "mail.example.com", "mail.example.com")


@pytest.mark.parametrize("name, role, item", [("mail.example.com", "mail", "mail.example.com"),
                                              ("www.example.net", "web", "default")])
def test_routing_tls_client_hello_over_three_records_completes_the_handshake(
        tls_upstreams, name, role, item):
    """The ClientHello cut into three TLS records (its 4-byte message header split too): the
    edge routes by it and relays it unchanged, so the server's handshake completes."""
    proxy, port = routed_tls_edge(tls_upstreams)
    with proxy, connect(("127.0.0.1", port)) as c:
        client = TlsOverMemory(c, name)
        message = client.hello[5:]
        c.sendall(records(message, [3, len(message) // 2]))
        assert client.finish_handshake() == tls_upstreams[role].der
        assert client.read_line().startswith(role + " " + name + " ")
        address = c.getsockname()
        c.close()
        assert routing_fields(session_of(proxy, address)) == ("sni", name, item)


def padded_client_hello(name, size):
    """A real ClientHello message (handshake header and body) grown by a padding extension
    (RFC 7685) to a body of `size` bytes."""
    body = client_hello_bytes(name)[9:]
    pos = 2 + 32                                            # legacy_version, random
    pos += 1 + body[pos]                                    # legacy_session_id
    pos += 2 + struct.unpack_from("!H", body, pos)[0]       # cipher_suites
    pos += 1 + body[pos]                                    # legacy_compression_methods
    extensions = body[pos + 2:]
    assert len(extensions) == struct.unpack_from("!H", body, pos)[0]
    pad = size - pos - 2 - len(extensions) - 4
    extensions += struct.pack("!HH", 21, pad) + bytes(pad)
    body = body[:pos] + struct.pack("!H", len(extensions)) + extensions
    assert len(body) == size
    return b"\x01" + struct.pack("!I", size)[1:] + body


@pytest.mark.parametrize("size", [edge.HELLO_LIMIT, edge.HELLO_LIMIT + 1],
                         ids=["16384", "16385"])
def test_routing_tls_client_hello_of_16_kib_routes_and_one_byte_more_is_peek_bad(
        tls_upstreams, size):
    """The bound: a ClientHello of 16 KiB (two records, as it must be) is routed and relayed
    whole; one byte more is refused from its header."""
    received = []
    data = records(padded_client_hello("mail.example.com", size), [16384])

    def recorder(conn):
        header = read_proxy_header(conn)
        received.append((header, recv_exactly(conn, len(data))))
        conn.sendall(b"ok")
    with Upstream(recorder) as up:
        proxy, port = Edge.on_free_port(lambda port: [
            "127.0.0.1:%d/tls@mail.example.com=%s" % (port, up.address),
            "127.0.0.1:%d/tls=%s/proxy=off" % (port, tls_upstreams["web"].address)])
        with proxy, connect(("127.0.0.1", port)) as c:
            try:
                c.sendall(data)
                answer = closed_quietly(c, WAIT) if size > edge.HELLO_LIMIT else recv_exactly(c, 2)
            except (ConnectionResetError, BrokenPipeError):
                answer = "reset"                # refused before it read the rest: fine too
            client = c.getsockname()
            c.close()
            line = session_of(proxy, client)
            if size == edge.HELLO_LIMIT:
                assert answer == b"ok"
                assert received == [(expected_v2(client, ("127.0.0.1", port)), data)]
                assert routing_fields(line) == ("sni", "mail.example.com", "mail.example.com")
            else:
                assert answer in (b"", "reset")
                assert " end=peek-bad" in line and not up.conns, line


@pytest.mark.parametrize("relay", ["auto", "copy"])
def test_routing_tls_bytes_after_the_client_hello_stream_intact(tls_upstreams, relay):
    """What the client sends with and after its ClientHello (read with it by the peek, or
    not) reaches the route's upstream in order, and 1 MiB streams back intact."""
    rng = random.Random(1414)
    hello = client_hello_bytes("mail.example.com")
    payload = hello + rng.getrandbits(8 << 20).to_bytes(1 << 20, "big")
    with Upstream(header_echo) as up:
        proxy, port = Edge.on_free_port(lambda port: [
            "--relay", relay, "127.0.0.1:%d/tls@mail.example.com=%s" % (port, up.address),
            "127.0.0.1:%d/tls=%s/proxy=off" % (port, tls_upstreams["web"].address)])
        with proxy, connect(("127.0.0.1", port)) as c:

            def send():
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            assert recv_all(c) == payload
            sender.join(WAIT)
            client = c.getsockname()
            c.close()
            line = session_of(proxy, client)
            assert " up=%d down=%d " % (len(payload), len(payload)) in line, line
            assert routing_fields(line) == ("sni", "mail.example.com", "mail.example.com")


# -- TLS: clients that cannot be routed --------------------------------------------------------

@pytest.mark.parametrize("payload", [b"GET / HTTP/1.0\r\n\r\n",
                                     bytes([7]) + random.Random(14).randbytes(63)
                                     if hasattr(random.Random, "randbytes") else b"\x07" * 64],
                         ids=["http-request", "random-bytes"])
def test_routing_tls_garbage_is_closed_as_peek_bad(tls_upstreams, payload):
    proxy, port = routed_tls_edge(tls_upstreams, "--peek-timeout", "1")
    with proxy, connect(("127.0.0.1", port)) as c:
        c.sendall(payload)
        assert closed_quietly(c) == b""         # no plaintext into a TLS stream
        line = session_of(proxy, c.getsockname())
        assert re.search(r" end=peek-bad reason=\"[^\"]+\"", line), line
        assert not tls_upstreams["mail"].conns and not tls_upstreams["web"].conns


@pytest.mark.parametrize("sent", [0, 40], ids=["nothing", "part-of-a-client-hello"])
def test_routing_tls_silence_is_closed_at_the_peek_timeout(tls_upstreams, sent):
    proxy, port = routed_tls_edge(tls_upstreams, "--peek-timeout", "1")
    with proxy, connect(("127.0.0.1", port)) as c:
        c.sendall(client_hello_bytes("mail.example.com")[:sent])
        assert closed_quietly(c) == b""
        assert " end=peek-timeout" in session_of(proxy, c.getsockname())
        assert not tls_upstreams["mail"].conns and not tls_upstreams["web"].conns


def test_routing_tls_client_closing_before_its_client_hello_is_whole(tls_upstreams):
    proxy, port = routed_tls_edge(tls_upstreams)
    with proxy, connect(("127.0.0.1", port)) as c:
        c.sendall(client_hello_bytes("mail.example.com")[:40])
        c.shutdown(socket.SHUT_WR)
        assert closed_quietly(c) == b""
        assert " end=client-fin" in session_of(proxy, c.getsockname())
        assert not tls_upstreams["mail"].conns and not tls_upstreams["web"].conns
        assert re.search(r" unrouted-client-fin=1\b", listener_stats(edge_stats(proxy), port))


def test_routing_tls_upstream_down_is_a_plain_close(tls_upstreams):
    dead = free_port()
    proxy, port = Edge.on_free_port(lambda port: [
        "--connect-timeout", "2", "127.0.0.1:%d/tls@mail.example.com=127.0.0.1:%d" % (port, dead),
        "127.0.0.1:%d/tls=%s/proxy=off" % (port, tls_upstreams["web"].address)])
    with proxy, connect(("127.0.0.1", port)) as c:
        c.sendall(client_hello_bytes("mail.example.com"))
        assert closed_quietly(c, WAIT) == b""       # no plaintext into a TLS stream
        line = session_of(proxy, c.getsockname())
        assert " end=connect-failed" in line, line
        assert routing_fields(line) == ("sni", "mail.example.com", "mail.example.com")


@pytest.mark.parametrize("name", ["www.example.net", None], ids=["unknown-name", "no-sni"])
def test_routing_tls_no_route_and_no_default_sends_unrecognized_name(tls_upstreams, name):
    proxy, port = routed_tls_edge(tls_upstreams, default=False)
    with proxy:
        with connect(("127.0.0.1", port)) as c:
            c.sendall(client_hello_bytes(name))
            assert closed_quietly(c, WAIT) == TLS_UNRECOGNIZED_NAME_ALERT
            line = session_of(proxy, c.getsockname())
        assert " end=no-route" in line and re.search(r" sni=%s " % re.escape(name or "-"), line), \
            line
        with pytest.raises(ssl.SSLError) as refused:
            tls_client(port, name)
        assert "UNRECOGNIZED_NAME" in str(refused.value).upper(), refused.value
        assert not tls_upstreams["mail"].conns and not tls_upstreams["web"].conns


def test_routing_stats_count_routed_items_and_unrouted_reasons(tls_upstreams):
    """USR1: per listener, routed-ITEM=N for each rule that matched (default too) and
    unrouted-REASON=N for each way a client went unrouted (client-fin: in its own tests)."""
    strict = []                                 # the listener without a default route

    def build(port):
        strict[:] = [free_port()]
        return ["--peek-timeout", "1",
                "127.0.0.1:%d/tls@mail.example.com=%s" % (port, tls_upstreams["mail"].address),
                "127.0.0.1:%d/tls@*.example.com=%s" % (port, tls_upstreams["mail"].address),
                "127.0.0.1:%d/tls=%s/proxy=off" % (port, tls_upstreams["web"].address),
                "127.0.0.1:%d/tls@mail.example.com=%s" % (strict[0],
                                                         tls_upstreams["mail"].address)]
    proxy, port = Edge.on_free_port(build)
    with proxy:
        clients = [tls_client(port, name)[2] for name in
                   ("mail.example.com", "mail.example.com", "a.example.com", None)]
        for payload in (b"GET / HTTP/1.0\r\n\r\n", b""):      # peek-bad, peek-timeout
            with connect(("127.0.0.1", port)) as c:
                c.sendall(payload)
                assert closed_quietly(c) == b""
                clients.append(c.getsockname())
        with connect(("127.0.0.1", strict[0])) as c:
            c.sendall(client_hello_bytes("www.example.net"))
            assert closed_quietly(c) == TLS_UNRECOGNIZED_NAME_ALERT
            clients.append(c.getsockname())
        for client in clients:
            session_of(proxy, client)
        line = edge_stats(proxy)
    routed = listener_stats(line, port)
    for count in ("routed-mail.example.com=2", "routed-*.example.com=1", "routed-default=1",
                  "unrouted-peek-bad=1", "unrouted-peek-timeout=1"):
        assert " %s" % count in routed + " ", line
    assert "no-route" not in routed, line
    assert re.search(r" unrouted-no-route=1\b", listener_stats(line, strict[0])), line


def test_routing_exposition_counts_routed_items_and_unrouted_reasons(tls_upstreams):
    """/metrics: tailwart_edge_routed_total{listen,route} per rule that matched, and the
    refusal reasons no-route and peek-bad in tailwart_edge_refusals_total."""
    ports = {}

    def build(port):
        ports.update(strict=free_port(), metrics=free_port())
        return ["--metrics", "127.0.0.1:%d" % ports["metrics"],
                "127.0.0.1:%d/tls@mail.example.com=%s" % (port, tls_upstreams["mail"].address),
                "127.0.0.1:%d/tls@*.example.com=%s" % (port, tls_upstreams["mail"].address),
                "127.0.0.1:%d/tls=%s/proxy=off" % (port, tls_upstreams["web"].address),
                "127.0.0.1:%d/tls@mail.example.com=%s" % (ports["strict"],
                                                         tls_upstreams["mail"].address)]
    proxy, port = Edge.on_free_port(build)
    with proxy:
        for name in ("mail.example.com", "a.example.com", "a.example.com", None):
            tls_client(port, name)
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert closed_quietly(c) == b""
        with connect(("127.0.0.1", ports["strict"])) as c:
            c.sendall(client_hello_bytes("www.example.net"))
            assert closed_quietly(c) == TLS_UNRECOGNIZED_NAME_ALERT
        wait_sessions(proxy, 6)
        metrics = scrape(ports["metrics"])
    listen, strict = "127.0.0.1:%d" % port, "127.0.0.1:%d" % ports["strict"]
    assert metrics.families["tailwart_edge_routed_total"]["type"] == "counter"
    assert sorted(counted(metrics, "tailwart_edge_routed_total"), key=repr) == sorted([
        ({"listen": listen, "route": "mail.example.com"}, 1),
        ({"listen": listen, "route": "*.example.com"}, 2),
        ({"listen": listen, "route": "default"}, 1)], key=repr)
    assert sorted(counted(metrics, "tailwart_edge_refusals_total"), key=repr) == sorted([
        ({"listen": listen, "reason": "peek-bad"}, 1),
        ({"listen": strict, "reason": "no-route"}, 1)], key=repr)


# -- HTTP: Host routing on a plain HTTP listener -----------------------------------------------

class HttpServer(Upstream):
    """A small HTTP/1.1 server as a route's upstream: it answers each request (keep-alive)
    with `ROLE HOST PATH\\n`. With proxy=True it first reads a PROXY v2 header and records its
    addresses (`headers`); without, it checks the stream starts with a request line."""

    def __init__(self, role, proxy, host="127.0.0.1"):
        self.role, self.proxy = role, proxy
        self.headers = []
        self.requests = []                  # (Host header, path) of each request
        super().__init__(self._serve_http, host=host)

    def _serve_http(self, conn):
        if self.proxy:
            self.headers.append(proxy_v2_addresses(read_proxy_header(conn)))
        data = b""
        for _ in range(100):                # requests on one connection, at most
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
                assert len(data) < 65536, data[:200]
            head, _, data = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            request = re.match(r"([A-Z]+) (\S+) HTTP/1\.[01]$", lines[0])
            assert request, "%s: not a request line: %r" % (self.role, lines[0])
            fields = dict((name.strip().lower(), value.strip()) for name, _, value in
                          (line.partition(":") for line in lines[1:]))
            host, path = fields.get("host", "-"), request.group(2)
            self.requests.append((host, path))
            body = ("%s %s %s\n" % (self.role, host, path)).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d"
                         b"\r\n\r\n" % len(body) + body)
            if fields.get("connection", "").lower() == "close":
                return


@pytest.fixture
def http_upstreams():
    """{"mail": HTTP server behind a PROXY v2 parser, "web": one taking no header}."""
    with HttpServer("mail", proxy=True) as mail, HttpServer("web", proxy=False) as web:
        yield {"mail": mail, "web": web}
        assert not mail.errors and not web.errors, mail.errors + web.errors


HTTP_MAIL_MATCHES = ("mail.example.com/.well-known/acme-challenge/,autoconfig.example.com,"
                     "*.example.org")


def routed_http_edge(up, *options, default=True, mail=None):
    """(edge, port): one HTTP listener whose mail names (the ACME path of mail.example.com,
    autoconfig.example.com, *.example.org) go to up["mail"] (global v2 header), the rest
    (default route) to up["web"] with /proxy=off."""
    def build(port):
        words = ["127.0.0.1:%d/http@%s=%s" % (port, HTTP_MAIL_MATCHES, mail or up["mail"].address)]
        if default:
            words.append("127.0.0.1:%d/http=%s/proxy=off" % (port, up["web"].address))
        return list(options) + words
    return Edge.on_free_port(build)


def urllib_get(port, host, path, timeout=WAIT):
    """(status, body) of a GET by urllib to the edge with that Host header, no proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path),
                                     headers={"Host": host})
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


HTTP_ROUTES = [
    # Host, path, the server expected, host= and route= in the session line
    ("autoconfig.example.com", "/mail/config-v1.1.xml", "mail", "autoconfig.example.com",
     "autoconfig.example.com"),
    ("Autoconfig.Example.COM:80", "/", "mail", "autoconfig.example.com", "autoconfig.example.com"),
    ("mail.example.com", "/.well-known/acme-challenge/Zm9v", "mail", "mail.example.com",
     "mail.example.com/.well-known/acme-challenge/"),
    ("mail.example.com", "/", "web", "mail.example.com", "default"),
    ("mail.example.com", "/.well-known/other", "web", "mail.example.com", "default"),
    ("a.b.example.org", "/", "mail", "a.b.example.org", "*.example.org"),
    ("example.org", "/", "web", "example.org", "default"),
    ("www.example.net", "/.well-known/acme-challenge/Zm9v", "web", "www.example.net", "default"),
]


@pytest.mark.parametrize("host, path, role, name, item", HTTP_ROUTES,
                         ids=["%s%s" % (h, p) for h, p, *_ in HTTP_ROUTES])
def test_routing_http_urllib_host_picks_the_upstream(http_upstreams, host, path, role, name,
                                                     item):
    proxy, port = routed_http_edge(http_upstreams)
    with proxy:
        status, body = urllib_get(port, host, path)
        assert (status, body) == (200, "%s %s %s\n" % (role, host, path))
        line = proxy.wait_for(r"\bsession client=.* host=%s route=%s$" % (
            re.escape(name), re.escape(item)))
        client = re.search(r"client=(\S+):(\d+) ", line).groups()
    headers = http_upstreams["mail"].headers
    assert headers == ([((client[0], int(client[1])), ("127.0.0.1", port))] if role == "mail"
                       else [])


def test_routing_http_curl_host_picks_the_upstream(http_upstreams):
    curl = need_tool("curl")
    proxy, port = routed_http_edge(http_upstreams)
    with proxy:
        for path, role in [("/.well-known/acme-challenge/Zm9v", "mail"), ("/", "web")]:
            url = "http://mail.example.com:%d%s" % (port, path)
            done = subprocess.run([curl, "-sS", "--noproxy", "*", "--max-time", str(WAIT),
                                   "--resolve", "mail.example.com:%d:127.0.0.1" % port, url],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, universal_newlines=True,
                                  timeout=WAIT + 5)
            assert done.returncode == 0, done.stderr
            assert done.stdout == "%s mail.example.com:%d %s\n" % (role, port, path)
        assert len(http_upstreams["mail"].requests) == len(http_upstreams["web"].requests) == 1


def test_routing_http_first_request_decides_the_whole_connection(http_upstreams):
    proxy, port = routed_http_edge(http_upstreams)
    with proxy:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        try:
            for host in ("autoconfig.example.com", "www.example.net"):
                connection.request("GET", "/", headers={"Host": host})
                response = connection.getresponse()
                assert response.read().decode() == "mail %s /\n" % host
        finally:
            connection.close()
        assert len(http_upstreams["mail"].headers) == 1 and not http_upstreams["web"].requests
        line = proxy.wait_for(r"\bsession client=")
        assert routing_fields(line) == ("host", "autoconfig.example.com", "autoconfig.example.com")


def test_routing_http_absolute_form_target_names_the_host(http_upstreams):
    """A request to a proxy names its host in the target (RFC 9112 3.2.2): that host routes,
    whatever the Host header says."""
    proxy, port = routed_http_edge(http_upstreams)
    with proxy, connect(("127.0.0.1", port)) as c:
        c.sendall(b"GET http://autoconfig.example.com/x HTTP/1.1\r\nHost: www.example.net\r\n"
                  b"Connection: close\r\n\r\n")
        assert recv_all(c).endswith(
            b"\r\n\r\nmail www.example.net http://autoconfig.example.com/x\n")
        client = c.getsockname()
        c.close()                               # the session ends, its line is written
        assert routing_fields(session_of(proxy, client)) == \
            ("host", "autoconfig.example.com", "autoconfig.example.com")


def test_routing_http_client_closing_before_its_head_is_whole(http_upstreams):
    proxy, port = routed_http_edge(http_upstreams)
    with proxy, connect(("127.0.0.1", port)) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: mail.exa")
        c.shutdown(socket.SHUT_WR)
        assert closed_quietly(c) == b""         # nobody left to read an answer
        assert " end=client-fin" in session_of(proxy, c.getsockname())
        assert not http_upstreams["mail"].conns and not http_upstreams["web"].conns
        assert re.search(r" unrouted-client-fin=1\b", listener_stats(edge_stats(proxy), port))


def test_routing_http_no_route_and_no_default_is_421(http_upstreams):
    proxy, port = routed_http_edge(http_upstreams, default=False)
    with proxy:
        assert urllib_get(port, "www.example.net", "/") == (421, "")
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: mail.example.com\r\n\r\n")
            assert closed_quietly(c, WAIT) == (b"HTTP/1.1 421 Misdirected Request\r\n"
                                               b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            line = session_of(proxy, c.getsockname())
        assert " end=no-route" in line and " host=mail.example.com " in line, line
        assert not http_upstreams["mail"].conns and not http_upstreams["web"].conns


@pytest.mark.parametrize("payload", [
    b"HELLO WORLD\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00",
    b"GET / HTTP/1.1\r\nHost: web.example.com\r\nHost: mail.example.com\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: web.example.com\r\n mail.example.com\r\n\r\n"],
    ids=["not-a-request", "tls-to-http", "two-hosts", "folded-host"])
def test_routing_http_garbage_is_400(http_upstreams, payload):
    proxy, port = routed_http_edge(http_upstreams, "--peek-timeout", "1")
    with proxy, connect(("127.0.0.1", port)) as c:
        c.sendall(payload)
        assert closed_quietly(c).startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert " end=peek-bad" in session_of(proxy, c.getsockname())
        assert not http_upstreams["mail"].conns and not http_upstreams["web"].conns


@pytest.mark.parametrize("payload", [b"", b"GET / HTTP/1.1\r\nHost: mail.exa"],
                         ids=["nothing", "part-of-a-head"])
def test_routing_http_silence_is_408(http_upstreams, payload):
    proxy, port = routed_http_edge(http_upstreams, "--peek-timeout", "1")
    with proxy, connect(("127.0.0.1", port)) as c:
        c.sendall(payload)
        assert closed_quietly(c).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert " end=peek-timeout" in session_of(proxy, c.getsockname())
        assert not http_upstreams["mail"].conns and not http_upstreams["web"].conns


def test_routing_http_head_over_the_bound_is_431(http_upstreams):
    proxy, port = routed_http_edge(http_upstreams)
    head = b"GET / HTTP/1.1\r\nHost: mail.example.com\r\nX-Filler: "
    with proxy, connect(("127.0.0.1", port)) as c:
        c.sendall(head + b"a" * (edge.PEEK_LIMIT + 1024 - len(head)))   # over the bound, no end
        assert closed_quietly(c, WAIT).startswith(b"HTTP/1.1 431 ")
        assert " end=peek-bad" in session_of(proxy, c.getsockname())


def test_routing_http_head_of_16_kib_routes(http_upstreams):
    proxy, port = routed_http_edge(http_upstreams)
    head = b"GET / HTTP/1.1\r\nHost: autoconfig.example.com\r\nConnection: close\r\nX-Filler: "
    head += b"a" * (16 * 1024 - len(head) - 4) + b"\r\n\r\n"
    with proxy, connect(("127.0.0.1", port)) as c:
        c.sendall(head)
        assert recv_all(c).endswith(b"\r\n\r\nmail autoconfig.example.com /\n")


def test_routing_http_upstream_down_is_503(http_upstreams):
    proxy, port = routed_http_edge(http_upstreams, "--connect-timeout", "2",
                                   mail="127.0.0.1:%d" % free_port())
    with proxy:
        assert urllib_get(port, "autoconfig.example.com", "/") == (503, "")
        assert routing_fields(proxy.wait_for(r"\bsession client=.* end=connect-failed\b")) == \
            ("host", "autoconfig.example.com", "autoconfig.example.com")


def test_routing_proxy_option_on_a_plain_mapping_sets_its_header():
    """/proxy=... after the upstreams works without routes too: v1 here, off there, while
    --proxy-protocol says v2."""
    got, other = [], []
    with Upstream(lambda conn: capture_header(conn, got)) as v1, Upstream(echo) as off:

        def build(port):
            other[:] = [free_port()]
            return ["127.0.0.1:%d=%s/proxy=v1" % (port, v1.address),
                    "127.0.0.1:%d=%s/proxy=off" % (other[0], off.address)]
        proxy, port = Edge.on_free_port(build)
        with proxy:
            with connect(("127.0.0.1", port)) as c:
                c.sendall(b"hello\r\n")
                assert recv_exactly(c, 2) == b"ok"
                client = c.getsockname()
            assert got == [(edge.proxy_header_v1(client, ("127.0.0.1", port)), b"hello\r\n")]
            assert round_trip(other[0], b"no header\r\n") == b"no header\r\n"


# -- configuration: refused at start -----------------------------------------------------------

ROUTING_REFUSED = [
    (["25@mail.example.com=127.0.0.1:25"], r"PORT/tls.*PORT/http"),
    (["143@mail.example.com=127.0.0.1:143"], r"PORT/tls.*PORT/http"),
    (["2525/tcp@mail.example.com=127.0.0.1:25"], r"PORT/tls.*PORT/http"),
    (["8443/tls@mail.example.com=127.0.0.1:1", "8443/tls=127.0.0.1:2", "8443/tls=127.0.0.1:3"],
     r"both the default route"),
    (["8443/tls@mail.example.com,Mail.Example.com.=127.0.0.1:1"], r"mail\.example\.com.* twice"),
    (["8443/tls@mail.example.com=127.0.0.1:1", "8443/tls@mail.example.com=127.0.0.1:2"],
     r"mail\.example\.com"),
    (["8443/tls@mail.example.com=127.0.0.1:1/proxy=v3"], r"/proxy=v2, /proxy=v1 or /proxy=off"),
    (["8443/tls=127.0.0.1:1", "8443/tls=127.0.0.1:2"], r"collides"),    # two defaults, no route
    (["80@alpn:acme-tls/1=127.0.0.1:1"], r"ALPN is TLS's"),
    (["8443/tls@mail.example.com/.well-known/=127.0.0.1:1"], r"a path is HTTP's"),
    (["--peek-timeout", "0", "8443/tls@mail.example.com=127.0.0.1:1"],
     r"--peek-timeout: '0' is not a positive number"),
]


@pytest.mark.parametrize("argv, message", ROUTING_REFUSED,
                         ids=[" ".join(a) for a, _ in ROUTING_REFUSED])
def test_routing_config_error_exits_2_with_one_line(argv, message):
    code, out, err = run_script(*argv)
    assert (code, out) == (2, ""), (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tailwart_edge.py: error: "), lines[0]
    assert re.search(message, lines[0]), lines[0]


# -- real peers: HAProxy and nginx parse the header of their route only ------------------------

@pytest.mark.parametrize("peer_name", ["haproxy", "nginx"])
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_interop_routing_peer_logs_the_real_client_of_its_route_only(request, peer_name, version):
    """The TLS listener's mail.example.com route goes to the peer with a header (the global
    --proxy-protocol is off, the route says /proxy=VERSION); the peer echoes the ClientHello
    back and logs the real client; the default route's upstream gets no header."""
    fixture = request.getfixturevalue(peer_name)
    peer, peer_port = fixture[:2]
    log_path = fixture[2] if len(fixture) > 2 else None
    others = []

    def headerless(conn):
        others.append(recv_exactly(conn, len(other_hello)))
        conn.sendall(b"ok")
    hello, other_hello = client_hello_bytes("mail.example.com"), client_hello_bytes("other.example")
    with Upstream(headerless) as default:
        proxy, port = Edge.on_free_port(lambda port: [
            "--proxy-protocol", "off",
            "127.0.0.1:%d/tls@mail.example.com=127.0.0.1:%d/proxy=%s" % (port, peer_port, version),
            "127.0.0.1:%d/tls=%s" % (port, default.address)])
        with proxy:
            with connect(("127.0.0.1", port), source="127.0.0.77") as c:
                c.sendall(hello)
                assert recv_exactly(c, len(hello)) == hello         # the peer's echo
                client, server = c.getsockname(), c.getpeername()
            found = peer.wait_log(r"^session client=%s (?:frontend|server)=(\S+)$"
                                  % re.escape(addr(client)), path=log_path)
            assert found.group(1) == addr(server)
            with connect(("127.0.0.1", port), source="127.0.0.77") as c:
                c.sendall(other_hello)
                assert recv_exactly(c, 2) == b"ok"
            assert others == [other_hello]
            proxy.stop()


# -- the README's case in a settings file ------------------------------------------------------

def test_routing_settings_file_from_the_readme_parses_and_serves(tmp_path, routing_certificates):
    """The README's /etc/default/tailwart-edge for sharing 443 and 80 (PORTS= over several
    lines), with the mail ports left out, 443 and 80 moved to free ports on 127.0.0.1, the
    local web servers at their 127.0.0.1 ports and UPSTREAM=127.0.0.2 (where the mail
    servers listen on the same port numbers, as Stalwart does on the tailnet)."""
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        unavailable("127.0.0.2 is not a loopback address here")
    block = readme_block("UPSTREAM=stalwart.tail7b1641.ts.net")
    web_tls = TlsServer("web", routing_certificates["web"], proxy=False)
    web_http = HttpServer("web", proxy=False)
    with web_tls, web_http, contextlib.ExitStack() as servers:
        for attempt in range(5):                # a mail server's port taken on 127.0.0.1: again
            mail_tls = servers.enter_context(TlsServer(
                "mail", routing_certificates["mail"], proxy=True, host="127.0.0.2"))
            mail_http = servers.enter_context(HttpServer("mail", proxy=True, host="127.0.0.2"))
            ports = block
            for old, new in [("25 465 587 143 993 4190", ""),
                             ("443@", "127.0.0.1:%d/https@" % mail_tls.port),
                             ("443=127.0.0.1:8443", "127.0.0.1:%d/https=%s" % (
                                 mail_tls.port, web_tls.address)),
                             ("80@", "127.0.0.1:%d/http@" % mail_http.port),
                             ("80=127.0.0.1:8080", "127.0.0.1:%d/http=%s" % (
                                 mail_http.port, web_http.address))]:
                assert old in ports, (old, block)
                ports = ports.replace(old, new, 1)
            path = tmp_path / "tailwart-edge"
            path.write_text("UPSTREAM=127.0.0.2\n" + ports)
            try:
                proxy = Edge("--settings", str(path), tries=1)
                break
            except PortInUse:
                if attempt == 4:
                    raise
        with proxy:
            for name, alpn, server in [("mail.example.com", None, mail_tls),
                                       ("autoconfig.example.com", None, mail_tls),
                                       ("mta-sts.example.com", None, mail_tls),
                                       ("www.example.net", ["acme-tls/1"], mail_tls),
                                       ("www.example.net", None, web_tls), (None, None, web_tls)]:
                der, line, client = tls_client(mail_tls.port, name, alpn)
                assert der == server.der and line.startswith(server.role + " "), (name, line)
            assert len(mail_tls.headers) == 4 and len(web_tls.served) == 2
            for host, role in [("mail.example.com", "mail"), ("mta-sts.example.com", "mail"),
                               ("www.example.net", "web")]:
                status, body = urllib_get(mail_http.port, host, "/.well-known/x")
                assert (status, body) == (200, "%s %s /.well-known/x\n" % (role, host))
            assert len(mail_http.headers) == 2
            assert not mail_tls.errors and not mail_http.errors
        assert not web_tls.errors and not web_http.errors
