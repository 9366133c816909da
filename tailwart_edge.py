#!/usr/bin/env python3
"""tailwart-edge: a layer-4 edge proxy for self-hosted mail.

It listens on the public mail ports of a small server and pipes every TCP
connection, byte for byte, to the mail server (say Stalwart inside a Tailscale
tailnet). TLS is never terminated here; a PROXY protocol header, written before
the first byte, tells the mail server who the real client is.

usage: tailwart_edge.py [OPTIONS] MAPPING [MAPPING ...]

  MAPPING  [BIND_ADDR:]LISTEN_PORT=UPSTREAM_HOST:UPSTREAM_PORT[,HOST:PORT ...]
           or [BIND_ADDR:]LISTEN_PORT alone, together with --upstream HOST

examples:
  tailwart_edge.py 25=stalwart.tail7b1641.ts.net:25 993=stalwart.tail7b1641.ts.net:993
  tailwart_edge.py --upstream stalwart.tail7b1641.ts.net 25 465 587 143 993 4190
  tailwart_edge.py --proxy-protocol off 127.0.0.1:2525=10.0.0.5:25
  tailwart_edge.py '[::1]:993=[fd7a:115c:a1e0::1]:993' --user nobody

Without BIND_ADDR it listens on every interface, IPv4 and IPv6. BIND_ADDR is an
IPv4 address or an IPv6 address in brackets. Several upstreams are tried in
order. Signals: TERM and INT stop accepting, let sessions finish (up to
--drain-timeout) and exit 0; USR1 logs counters. Exit codes: 0 stopped, 1 could
not start (e.g. a port is taken), 2 bad command line.
"""

import argparse
import collections
import errno
import heapq
import itertools
import os
import queue
import re
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import _socket      # the C socket type under socket.socket: half the memory per connection

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None
try:
    import resource
except ImportError:  # not on Windows
    resource = None

__version__ = "0.1.0"
PROG = "tailwart_edge.py"

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 3600.0   # > IMAP IDLE's 29 minutes (RFC 2177), so IDLE is never cut
DEFAULT_DRAIN_TIMEOUT = 30.0
PREREAD_LIMIT = 64 * 1024       # client bytes held while the upstream connect is in flight
CHUNK = 256 * 1024              # most bytes moved per read (and the size of a splice pipe)
RESOLVE_TTL = 30.0              # getaddrinfo() tells no TTL; re-resolve this often
RESOLVER_THREADS = 4
ACCEPT_BATCH = 64               # accepts per listener per loop turn: fair to live sessions
ACCEPT_PAUSE = 0.5              # on EMFILE stop accepting this long, as nginx does
RESERVED_FDS = 16               # stdio, selector, wake-up pair, notify socket, resolver...
PIPE_POOL = 32                  # idle splice pipes kept for reuse
PULL_ROUNDS = 4                 # chunks moved per readable event while the source stays full
SPLICE_AFTER = 64 * 1024        # bytes in one event that turn a direction to splice (bulk)
WARN_INTERVAL = 10.0            # at most one "out of file descriptors" line this often
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 15, 4  # a dead peer found in ~2 min

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
CONNECT_PENDING = {0, errno.EINPROGRESS, getattr(errno, "WSAEWOULDBLOCK", errno.EINPROGRESS)}
FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
LINGER_RST = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends a reset
SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)     # Linux: non-blocking from the start
STREAM_NONBLOCK = socket.SOCK_STREAM | SOCK_NONBLOCK


# ----------------------------------------------------------------------------------------------
# Command line: argv -> options and a list of Mapping
# ----------------------------------------------------------------------------------------------

class ConfigError(Exception):
    """A mistake on the command line. main() prints it as one line and exits 2."""


class StartupError(Exception):
    """The configuration is valid but cannot be put in place. main() exits 1."""


class Mapping:
    """One listen address and the upstreams its connections are piped to, plus its counters."""

    __slots__ = ("bind", "port", "upstreams", "spec", "label",
                 "active", "sessions", "failed", "up", "down")

    def __init__(self, bind, port, upstreams, spec=""):
        self.bind = bind            # None (all interfaces) or an IP address without brackets
        self.port = port
        self.upstreams = upstreams  # [(host, port)], host without brackets
        self.spec = spec
        self.label = format_address(bind or "", port)
        self.active = self.sessions = self.failed = self.up = self.down = 0

    def __repr__(self):
        return "Mapping(%r, %r, %r)" % (self.bind, self.port, self.upstreams)


PORT_RE = re.compile(r"[0-9]{1,5}\Z")
HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})\Z")


def is_ip(text, family):
    try:
        socket.inet_pton(family, text)
    except (OSError, ValueError):
        return False
    return True


def format_address(host, port):
    """('::1', 25) -> '[::1]:25'; ('', 25) -> ':25' (every interface)."""
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def parse_port(text, what, spec):
    if not PORT_RE.match(text):
        if not text:
            raise ConfigError("%s is missing in %r; ports are numbers from 1 to 65535" % (what, spec))
        raise ConfigError("%s %r in %r is not a number; ports are numbers from 1 to 65535"
                          % (what, text, spec))
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError("%s %d in %r is out of range; ports are numbers from 1 to 65535"
                          % (what, port, spec))
    return port


def split_address(text, what, spec):
    """'host:port', 'a.b.c.d:port' or '[v6]:port' -> (host, port_text, bracketed)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ConfigError("%s %r in %r lacks its closing ']'; write IPv6 as [ADDRESS]:PORT"
                              % (what, text, spec))
        if not is_ip(host, socket.AF_INET6):
            raise ConfigError("%r in %r is not an IPv6 address; brackets are only for IPv6, "
                              "as in [::1]:993" % (host, spec))
        if not rest.startswith(":"):
            raise ConfigError("%s [%s] in %r has no port; write it as [%s]:PORT"
                              % (what, host, spec, host))
        return host, rest[1:], True
    host, _, port = text.rpartition(":")
    if ":" in host:
        raise ConfigError("IPv6 address %r in %r needs brackets; write it as [%s]:%s"
                          % (host, spec, host, port))
    return host, port, False


def parse_upstream(text, spec):
    if not text:
        raise ConfigError("mapping %r has an empty upstream; separate upstreams with one comma, "
                          "as in 25=mx1:25,mx2:25" % spec)
    if not text.startswith("[") and ":" not in text:
        raise ConfigError("upstream %r in %r has no port; write it as %s:PORT, e.g. %s:25"
                          % (text, spec, text, text))
    host, port_text, bracketed = split_address(text, "upstream", spec)
    if not host:
        raise ConfigError("upstream %r in %r has no host; write it as HOST:PORT" % (text, spec))
    if not bracketed and not HOST_RE.match(host):
        raise ConfigError("upstream host %r in %r is not a host name or IP address"
                          % (host, spec))
    return host, parse_port(port_text, "upstream port", spec)


def parse_mapping(text, default_upstream=None):
    """'[BIND:]PORT=HOST:PORT[,HOST:PORT...]' (or '[BIND:]PORT' with a default upstream)."""
    listen, eq, target = text.partition("=")
    if not listen:
        raise ConfigError("mapping %r has no listen port before '='; write it as "
                          "PORT=HOST:PORT, e.g. 25=mail.example.net:25" % text)
    bind = None
    port_text = listen
    if listen.startswith("[") or ":" in listen:
        bind, port_text, bracketed = split_address(listen, "listen address", text)
        if not bind:
            bind = None          # ':25' = every interface, as if no address were given
        elif not bracketed and not is_ip(bind, socket.AF_INET):
            raise ConfigError("bind address %r in %r is not an IP address; use an IPv4 address, "
                              "an IPv6 address in brackets, or none to listen everywhere"
                              % (bind, text))
    port = parse_port(port_text, "listen port", text)
    if not eq:
        if default_upstream is None:
            raise ConfigError("mapping %r has no upstream; write it as %s=HOST:PORT, or give "
                              "--upstream HOST to forward to the same port there" % (text, text))
        upstreams = [(default_upstream, port)]
    elif not target:
        raise ConfigError("mapping %r has nothing after '='; write it as %s=HOST:PORT, e.g. "
                          "%s=stalwart.tail7b1641.ts.net:%d" % (text, listen, listen, port))
    else:
        upstreams = [parse_upstream(part, text) for part in target.split(",")]
    return Mapping(bind, port, upstreams, text)


def overlapping(a, b):
    """Would these two listen addresses collide when both are bound?"""
    if a.port != b.port:
        return False
    families = lambda bind: {4, 6} if bind is None else {6} if ":" in bind else {4}
    if not families(a.bind) & families(b.bind):
        return False
    return a.bind == b.bind or a.bind in (None, "0.0.0.0", "::") or b.bind in (None, "0.0.0.0", "::")


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake becomes a ConfigError: one line, no usage block."""

    def error(self, message):
        raise ConfigError(message)


def seconds(text, allow_zero=False):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError("%r is not a %s number of seconds, e.g. 10"
                                         % (text, "non-negative" if allow_zero else "positive"))
    return value


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("%r is not a positive whole number" % text)
    return int(text)


def build_parser():
    head, _, tail = __doc__.partition("\nusage:")
    tail = tail.partition("\n\n")[2]        # the docstring's usage line is argparse's job
    parser = Parser(prog=PROG, description=head.strip(), epilog=tail,
                    usage="%(prog)s [OPTIONS] MAPPING [MAPPING ...]",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mappings", nargs="*", metavar="MAPPING",
                        help="[BIND_ADDR:]LISTEN_PORT=UPSTREAM_HOST:UPSTREAM_PORT")
    parser.add_argument("--proxy-protocol", choices=("v2", "v1", "off"), default="v2",
                        help="PROXY protocol header sent to the upstream (default: v2)")
    parser.add_argument("--upstream", metavar="HOST",
                        help="upstream host for mappings given as a bare [BIND_ADDR:]PORT")
    parser.add_argument("--connect-timeout", type=seconds, default=DEFAULT_CONNECT_TIMEOUT,
                        metavar="SECS", help="per upstream connect attempt (default: 10)")
    parser.add_argument("--idle-timeout", type=seconds, default=DEFAULT_IDLE_TIMEOUT,
                        metavar="SECS", help="close a session silent both ways this long "
                        "(default: 3600, longer than IMAP IDLE's 29 minutes)")
    parser.add_argument("--drain-timeout", type=lambda t: seconds(t, allow_zero=True),
                        default=DEFAULT_DRAIN_TIMEOUT, metavar="SECS",
                        help="on TERM/INT, let open sessions finish this long (default: 30)")
    parser.add_argument("--max-connections", type=positive_int, metavar="N",
                        help="most sessions at once; more wait in the listen backlog "
                        "(default: as many as the open-file limit allows)")
    parser.add_argument("--relay", choices=("auto", "splice", "copy"), default="auto",
                        help="how bytes move: splice (zero-copy, Linux with Python >= 3.10), "
                        "copy, or auto (default: the fastest this system has)")
    parser.add_argument("--user", metavar="NAME",
                        help="when started as root: bind, then run as this user")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="log more (debug)")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="no line per session: only start, stop, counters and problems")
    parser.add_argument("--version", action="version", version="tailwart-edge " + __version__)
    return parser


def parse_args(argv=None):
    """argv -> (options, [Mapping]); raises ConfigError."""
    options = build_parser().parse_args(argv)
    upstream = options.upstream
    if upstream is not None:
        if upstream.startswith("[") and upstream.endswith("]"):
            upstream = upstream[1:-1]
            valid = is_ip(upstream, socket.AF_INET6)
        else:
            valid = HOST_RE.match(upstream) and ":" not in upstream
        if not valid:
            raise ConfigError("--upstream %r is not a host name or IP address (IPv6 goes in "
                              "brackets, as in [fd7a:115c:a1e0::1])" % options.upstream)
    if not options.mappings:
        raise ConfigError("no MAPPING given; usage: %s [OPTIONS] [BIND_ADDR:]PORT=HOST:PORT ... "
                          "e.g. %s 25=stalwart.tail7b1641.ts.net:25 (see --help)" % (PROG, PROG))
    mappings = []
    for text in options.mappings:
        mapping = parse_mapping(text, upstream)
        for other in mappings:
            if overlapping(mapping, other):
                raise ConfigError("listen address %s in %r collides with %r; each address "
                                  "and port may be listened on once"
                                  % (mapping.label, mapping.spec, other.spec))
        mappings.append(mapping)
    return options, mappings


# ----------------------------------------------------------------------------------------------
# PROXY protocol header (HAProxy doc/proxy-protocol.txt): pure functions, bytes out
# ----------------------------------------------------------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"      # section 2.2: the 12-byte signature
V2_VERSION_PROXY = 0x21                        # high nibble: version 2; low nibble: PROXY
V2_TCP4, V2_TCP6, V2_UNSPEC = 0x11, 0x21, 0x00  # family << 4 | transport (STREAM = 1)


def plain_ip(ip):
    """A v4-mapped IPv6 address becomes plain IPv4; an IPv6 zone (%eth0) is dropped.

    A dual-stack listener reports an IPv4 client as ::ffff:a.b.c.d; the header must
    still say TCP4 with a.b.c.d, as a receiver compares it with IPv4 rules and lists.
    """
    ip = ip.partition("%")[0]
    if ip[:7].lower() == "::ffff:" and "." in ip:
        return ip[7:]
    return ip


def proxy_header_v1(src, dst):
    """The human-readable header (section 2.1), e.g. b'PROXY TCP4 1.2.3.4 5.6.7.8 5000 25\\r\\n'.

    `src` is the client's address, `dst` the address it connected to: (ip, port, ...)
    tuples as getpeername() and getsockname() return them.
    """
    src_ip, dst_ip = plain_ip(src[0]), plain_ip(dst[0])
    src6, dst6 = ":" in src_ip, ":" in dst_ip
    if src6 != dst6:
        return b"PROXY UNKNOWN\r\n"     # the spec has no mixed-family form
    return ("PROXY %s %s %s %d %d\r\n" % ("TCP6" if src6 else "TCP4", src_ip, dst_ip,
                                           src[1], dst[1])).encode("ascii")


def proxy_header_v2(src, dst):
    """The binary header (section 2.2): signature, version/command, family, length, addresses."""
    src_ip, dst_ip = plain_ip(src[0]), plain_ip(dst[0])
    src6, dst6 = ":" in src_ip, ":" in dst_ip
    if src6 != dst6:
        # UNSPEC with PROXY: the receiver must accept the connection and use its own address
        return V2_SIGNATURE + struct.pack("!BBH", V2_VERSION_PROXY, V2_UNSPEC, 0)
    family, length = (socket.AF_INET6, 36) if src6 else (socket.AF_INET, 12)
    return b"".join((
        V2_SIGNATURE,
        struct.pack("!BBH", V2_VERSION_PROXY, V2_TCP6 if src6 else V2_TCP4, length),
        socket.inet_pton(family, src_ip), socket.inet_pton(family, dst_ip),
        struct.pack("!HH", src[1], dst[1]),
    ))


HEADERS = {"v2": proxy_header_v2, "v1": proxy_header_v1, "off": None}


# ----------------------------------------------------------------------------------------------
# Logging: one line per event, key=value; journald priorities under systemd
# ----------------------------------------------------------------------------------------------

ERROR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7
LEVEL_NAMES = {ERROR: "error", WARNING: "warning", NOTICE: "notice", INFO: "info", DEBUG: "debug"}


class Log:
    """Writes lines to stderr: `date time level message`, or `<N>message` for the journal."""

    __slots__ = ("threshold", "journal")

    def __init__(self):
        self.threshold = INFO
        self.journal = False

    def configure(self, verbose=False, quiet=False):
        self.threshold = DEBUG if verbose else NOTICE if quiet else INFO
        self.journal = stderr_is_journal()

    def __call__(self, priority, message):
        if priority > self.threshold:
            return
        if self.journal:
            line = "<%d>%s\n" % (priority, message)
        else:
            line = "%s %s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), LEVEL_NAMES[priority],
                                   message)
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass            # stderr is gone: keep relaying all the same


def stderr_is_journal():
    """sd-daemon(3): JOURNAL_STREAM=dev:ino names the stream stderr is connected to."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == "%d:%d" % (st.st_dev, st.st_ino)


log = Log()


# ----------------------------------------------------------------------------------------------
# Resolver: getaddrinfo() in worker threads, answers posted back to the event loop
# ----------------------------------------------------------------------------------------------

class Resolver:
    """Resolves upstream names off the event loop and caches the answers.

    A fresh answer (younger than RESOLVE_TTL) is used at once; otherwise a worker
    thread asks getaddrinfo() and posts the answer to `done`, waking the loop. When
    DNS fails, the last good answer is used instead, so a DNS outage does not stop
    mail to an upstream whose address has not changed. Lookups of the same name
    in flight together are made once.
    """

    def __init__(self, wake):
        self.wake = wake
        self.cache = {}                 # host -> (expires, [(family, sockaddr)], {port: addrs})
        self.waiting = {}               # host -> [(port, callback)]
        self.jobs = queue.Queue()
        self.done = collections.deque()
        self.threads = []

    def resolve(self, host, port, callback):
        """Call callback(host, addrs, error) from the loop: now if cached, else later.
        `addrs` is a list of (family, sockaddr) with `port` in each sockaddr."""
        hit = self.cache.get(host)
        if hit is None:
            literal = literal_address(host, 0)
            if literal is not None:
                hit = self.cache[host] = (float("inf"), [literal], {})
        if hit is not None and hit[0] > time.monotonic():
            callback(host, with_port(hit, port), None)
            return
        if host in self.waiting:
            self.waiting[host].append((port, callback))
            return
        self.waiting[host] = [(port, callback)]
        if len(self.threads) < RESOLVER_THREADS and len(self.waiting) > len(self.threads):
            thread = threading.Thread(target=self.work, name="resolver", daemon=True)
            thread.start()
            self.threads.append(thread)
        self.jobs.put(host)

    def work(self):
        while True:
            host = self.jobs.get()
            try:
                infos = socket.getaddrinfo(host, 0, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                result = ([(info[0], info[4]) for info in infos], None)
            except (OSError, UnicodeError) as e:
                result = (None, getattr(e, "strerror", None) or str(e))
            self.done.append((host, result))
            self.wake()

    def dispatch(self):
        """Deliver finished lookups to those waiting for them (called from the loop)."""
        while self.done:
            host, (addrs, error) = self.done.popleft()
            entry = None
            if addrs:
                entry = self.cache[host] = (time.monotonic() + RESOLVE_TTL, addrs, {})
            else:
                stale = self.cache.get(host)
                if stale is not None:
                    log(WARNING, "resolve host=%s error=%r; using the last good answer"
                        % (host, error))
                    entry = self.cache[host] = (time.monotonic() + RESOLVE_TTL / 3,) + stale[1:]
                    error = None
                elif not error:
                    error = "no address"
            for port, callback in self.waiting.pop(host, ()):
                callback(host, entry and with_port(entry, port), error)


def with_port(entry, port):
    """A cache entry's addresses with `port` set, made once per port and shared by every
    session (a sockaddr tuple per session would cost memory for nothing)."""
    addrs = entry[2].get(port)
    if addrs is None:
        addrs = entry[2][port] = [(family, (sockaddr[0], port) + sockaddr[2:])
                                  for family, sockaddr in entry[1]]
    return addrs


def literal_address(host, port):
    """An IP literal needs no lookup: (family, sockaddr), or None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        if is_ip(host, family):
            return family, ((host, port) if family == socket.AF_INET else (host, port, 0, 0))
    return None


# ----------------------------------------------------------------------------------------------
# Relay: a Session per client, a Flow per direction
# ----------------------------------------------------------------------------------------------

BUFFER = bytearray(CHUNK)       # one read buffer for every copy: the loop is single-threaded
VIEW = memoryview(BUFFER)
SPLICE = getattr(os, "splice", None)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


class PeerError(Exception):
    """A socket call failed; `sock` is the side that broke."""

    def __init__(self, sock, error):
        Exception.__init__(self, sock, error)
        self.sock = sock
        self.error = error


class Flow:
    """The state of one direction of a session: what `src` sends is written to `dst`.
    (The session owns the two sockets and hands them to each step.)

    `pending` holds bytes `dst` would not take yet (the PROXY header and early client
    bytes start there); it is None whenever the flow is idle, so an idle session owns
    no buffer. While anything is pending, `src` is not read: that is the backpressure.
    `eof` is set when `src` has sent FIN; `shut` once the FIN has been passed on to
    `dst` with shutdown(SHUT_WR), after everything before it.
    """

    __slots__ = ("pending", "pipe", "piped", "count", "eof", "shut")

    def __init__(self):
        self.pending = None     # a memoryview of bytes not yet sent to dst
        self.pipe = None        # splice: (read_fd, write_fd) holding `piped` bytes
        self.piped = 0
        self.count = 0          # bytes read from src
        self.eof = False
        self.shut = False

    def pull(self, src, dst):
        """`src` is readable and nothing is pending: move what it has to `dst`. A read that
        fills the whole buffer means more is waiting: read again now (a few times) rather
        than after another trip through the loop."""
        for _ in range(PULL_ROUNDS):
            try:
                n = src.recv_into(BUFFER)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise PeerError(src, e)
            if not n:
                self.eof = True
                self.finish(dst)
                return
            self.count += n
            try:
                sent = dst.send(VIEW[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                raise PeerError(dst, e)
            if sent != n:
                # buffer only what the kernel would not take
                self.pending = memoryview(VIEW[sent:n].tobytes())
                return
            if n < CHUNK:
                return

    def push(self, dst):
        """`dst` is writable again: send what is pending, then pass on a FIN if one came."""
        pending = self.pending
        if pending is not None:
            try:
                sent = dst.send(pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise PeerError(dst, e)
            if sent != len(pending):
                self.pending = pending[sent:]
                return
            self.pending = None
        if self.eof:
            self.finish(dst)

    def finish(self, dst):
        """Pass `src`'s FIN on to `dst` once everything before it has been delivered."""
        if self.shut or self.pending is not None or self.piped:
            return
        self.shut = True
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass            # dst is already gone; reading from it will tell

    def release(self):
        """The session is closing: free the pipe, whatever it still holds."""
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None


class SpliceFlow(Flow):
    """A Flow that moves bytes socket -> pipe -> socket with splice(2), never through Python.

    A pipe is borrowed from the pool for each pull and given back once empty, so idle
    sessions hold no pipe (and no file descriptors beyond their two sockets).
    """

    __slots__ = ()

    def pull(self, src, dst):
        for _ in range(PULL_ROUNDS):
            pipe = PIPES.take()
            if pipe is None:        # no descriptors left for a pipe: copy this chunk instead
                return Flow.pull(self, src, dst)
            try:
                n = SPLICE(src.fileno(), pipe[1], CHUNK, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                PIPES.give(pipe)
                return
            except OSError as e:
                PIPES.give(pipe)
                if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    return self.unsupported(e, src, dst)
                raise PeerError(src, e)
            if not n:
                PIPES.give(pipe)
                self.eof = True
                self.finish(dst)
                return
            self.count += n
            self.pipe = pipe
            self.piped = n
            self.drain_pipe(dst)        # gives the pipe back once it is empty
            if self.piped or n < CHUNK // 4:
                return      # dst is full (the pipe stays lent until it drains), or src is empty

    def push(self, dst):
        if self.pending is not None or not self.piped:
            return Flow.push(self, dst)
        self.drain_pipe(dst)

    def drain_pipe(self, dst):
        try:
            sent = SPLICE(self.pipe[0], dst.fileno(), self.piped, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            raise PeerError(dst, e)
        self.piped -= sent
        if not self.piped:
            PIPES.give(self.pipe)
            self.pipe = None
            if self.eof:
                self.finish(dst)

    def unsupported(self, error, src, dst):
        # some kernels and sandboxes refuse splice on sockets: copy from here on
        log(WARNING, "splice unavailable (%s); relaying with recv/send" % error.strerror)
        Session.flow_class = Flow
        self.__class__ = Flow
        return self.pull(src, dst)


class AutoFlow(Flow):
    """The flow of --relay splice: a direction starts out copying, and turns to splice for
    good once one event brings SPLICE_AFTER bytes (bulk data). For an SMTP line or an IMAP
    command, two splices through a pipe cost more than one copy (as HAProxy's splice-auto)."""

    __slots__ = ()

    def pull(self, src, dst):
        before = self.count
        Flow.pull(self, src, dst)
        if self.count - before >= SPLICE_AFTER and Session.flow_class is AutoFlow:
            self.__class__ = SpliceFlow     # same slots: only the methods change


class PipePool:
    """Empty pipes for splice, sized to CHUNK, kept for reuse up to PIPE_POOL of them."""

    __slots__ = ("free", "limit")

    def __init__(self, limit=PIPE_POOL):
        self.free = []
        self.limit = limit

    def take(self):
        if self.free:
            return self.free.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK)
        except OSError:
            pass            # over the user's pipe quota: the default 64 KiB works too
        return r, w

    def give(self, pipe):
        if len(self.free) < self.limit:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


PIPES = PipePool()

# session stages
RESOLVING, CONNECTING, STREAMING, CLOSED = "resolving", "connecting", "streaming", "closed"


class Attempt:
    """Where a session's upstream connect stands. Dropped once connected.

    `deadline` bounds the current step (resolving a name, or one connect); the
    server's sweep checks it, so a session needs no timer object of its own."""

    __slots__ = ("next_upstream", "host", "port", "addrs", "deadline", "error")

    def __init__(self):
        self.next_upstream = 0
        self.host = self.port = self.addrs = None
        self.deadline = 0.0
        self.error = "no upstream"


class Session:
    """One client connection and its upstream connection.

    Stages: RESOLVING the upstream name, CONNECTING to one of its addresses, then
    STREAMING until both directions have ended (or a reset, an error, the idle
    timeout or the end of a drain), then CLOSED. While not yet STREAMING, what
    the client sends is read into the `up` flow's pending buffer (up to
    PREREAD_LIMIT) and goes out right behind the PROXY header, in the same send.
    """

    __slots__ = ("server", "mapping", "client", "upstream", "peer", "target",
                 "stage", "started", "active_at", "up", "down", "attempt", "end",
                 "cmask", "umask")

    flow_class = Flow

    def __init__(self, server, mapping, client, peer):
        self.server = server
        self.mapping = mapping
        self.client = client
        self.peer = peer
        self.upstream = None
        self.target = None              # the upstream address connected (or tried) to
        self.stage = RESOLVING
        self.started = self.active_at = server.now
        self.up = self.flow_class()         # client -> upstream
        self.down = self.flow_class()       # upstream -> client
        self.attempt = Attempt()
        self.end = None                 # how it ended; the first FIN sets it
        self.cmask = self.umask = 0     # what the selector watches on each socket

    # -- events --------------------------------------------------------------------------------

    def on_event(self, fd, mask):
        if self.stage is CLOSED:
            return
        self.active_at = self.server.now
        # Act only on what was asked for: selectors reports an error or hang-up as READ|WRITE,
        # and reading a side whose bytes cannot be passed on yet would reorder the stream.
        try:
            if fd == self.client.fileno():
                mask &= self.cmask
                if mask & READ:
                    if self.stage is STREAMING:
                        self.up.pull(self.client, self.upstream)
                    else:
                        self.preread()
                if mask & WRITE:
                    self.down.push(self.client)
            elif self.upstream is not None and fd == self.upstream.fileno():
                mask &= self.umask
                if self.stage is CONNECTING:
                    if not self.connected():
                        return
                if mask & READ:
                    self.down.pull(self.upstream, self.client)
                if mask & WRITE:
                    self.up.push(self.upstream)
            else:
                return          # an event for a socket this session has already closed
        except PeerError as e:
            return self.broken(e.sock, e.error)
        up, down = self.up, self.down
        if self.end is None and (up.eof or down.eof):
            self.end = "client-fin" if up.eof else "upstream-fin"
        if up.shut and down.shut:
            return self.close(self.end)
        self.update()

    def update(self):
        """The one place that decides what to wait for on each socket."""
        up, down = self.up, self.down
        if self.stage is STREAMING:
            cmask = ((0 if up.eof or up.pending is not None or up.piped else READ)
                     | (WRITE if down.pending is not None or down.piped else 0))
            umask = ((0 if down.eof or down.pending is not None or down.piped else READ)
                     | (WRITE if up.pending is not None or up.piped else 0))
        else:
            full = up.pending is not None and len(up.pending) >= PREREAD_LIMIT
            cmask = 0 if up.eof or full else READ
            umask = WRITE if self.stage is CONNECTING else 0
        if cmask != self.cmask:
            self.server.watch(self.client.fileno(), self.cmask, cmask, self)
            self.cmask = cmask
        if umask != self.umask:
            self.server.watch(self.upstream.fileno(), self.umask, umask, self)
            self.umask = umask

    def preread(self):
        """Before the upstream is there: keep what the client sends (TLS ClientHello...)."""
        try:
            n = self.client.recv_into(BUFFER, PREREAD_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            raise PeerError(self.client, e)
        up = self.up
        if not n:
            up.eof = True
            return
        up.count += n
        data = VIEW[:n].tobytes()
        up.pending = memoryview(data if up.pending is None else up.pending.tobytes() + data)

    # -- connecting ----------------------------------------------------------------------------

    def start(self):
        self.update()
        self.next_upstream()

    def next_upstream(self):
        attempt = self.attempt
        upstreams = self.mapping.upstreams
        if attempt.next_upstream >= len(upstreams):
            return self.close("connect-failed", attempt.error)
        attempt.host, attempt.port = upstreams[attempt.next_upstream]
        attempt.next_upstream += 1
        self.stage = RESOLVING
        attempt.deadline = self.server.now + self.server.connect_timeout
        self.server.resolver.resolve(attempt.host, attempt.port, self.resolved)

    def resolved(self, host, addrs, error):
        attempt = self.attempt
        if self.stage is not RESOLVING or host != attempt.host:
            return              # closed meanwhile, or this lookup already timed out
        if error is not None:
            attempt.error = "cannot resolve %s: %s" % (attempt.host, error)
            return self.next_upstream()
        attempt.addrs = collections.deque(addrs)
        self.next_address()

    def timed_out(self):
        """The current step ran past its deadline (called by the server's sweep)."""
        if self.stage is RESOLVING:
            self.attempt.error = "resolving %s timed out" % self.attempt.host
            self.next_upstream()
        elif self.stage is CONNECTING:
            self.attempt_failed("timed out after %gs" % self.server.connect_timeout)

    def next_address(self):
        """Start a connect to the next address of the current upstream, or move on."""
        attempt = self.attempt
        while attempt.addrs:
            family, sockaddr = attempt.addrs.popleft()
            try:
                sock = _socket.socket(family, STREAM_NONBLOCK)
            except OSError as e:
                attempt.error = "cannot open a socket: %s" % e.strerror
                if e.errno in FD_EXHAUSTED:
                    self.server.out_of_fds("connect to %s" % attempt.host, e)
                continue
            if not SOCK_NONBLOCK:
                sock.setblocking(False)
            tune_socket(sock)
            err = sock.connect_ex(sockaddr)
            if err in CONNECT_PENDING:
                self.upstream = sock
                self.target = sockaddr
                self.stage = CONNECTING
                attempt.deadline = self.server.now + self.server.connect_timeout
                self.update()
                return
            sock.close()
            attempt.error = "connect to %s: %s" % (format_address(*sockaddr[:2]), os.strerror(err))
        self.next_upstream()

    def attempt_failed(self, why):
        attempt = self.attempt
        attempt.error = "connect to %s: %s" % (format_address(*self.target[:2]), why)
        self.server.watch(self.upstream.fileno(), self.umask, 0, self)
        self.umask = 0
        self.upstream.close()
        self.upstream = self.target = None
        self.next_address()

    def connected(self):
        """The connect finished: check how, then send the header and the early client bytes."""
        err = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.attempt_failed(os.strerror(err))
            return False
        self.attempt = None
        self.stage = STREAMING
        up = self.up
        header = self.server.header
        if header is not None:
            # the header and what the client sent so far leave in one send (one segment)
            head = header(self.peer, self.client.getsockname())
            up.pending = memoryview(head + up.pending.tobytes() if up.pending is not None else head)
        up.push(self.upstream)
        return True

    # -- ending --------------------------------------------------------------------------------

    def broken(self, sock, error):
        """A socket call failed: close both sides, passing a reset on where one came in."""
        side, other = ("client", self.upstream) if sock is self.client else ("upstream", self.client)
        reason = None if error.errno in (errno.ECONNRESET, errno.EPIPE) else error.strerror
        if other is not None:
            try:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            except OSError:
                pass
        self.close(side + "-reset", reason)

    def close(self, end, reason=None):
        if self.stage is CLOSED:
            return
        server = self.server
        if self.cmask:
            server.watch(self.client.fileno(), self.cmask, 0, self)
        if self.umask:
            server.watch(self.upstream.fileno(), self.umask, 0, self)
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self.up.release()
        self.down.release()
        self.stage = CLOSED
        server.session_ended(self, end, reason)

    def describe(self, end, reason):
        mapping = self.mapping
        if self.target is not None:
            upstream = format_address(*self.target[:2])
        elif self.attempt is not None and self.attempt.host is not None:
            upstream = format_address(self.attempt.host, self.attempt.port)
        else:
            upstream = "-"
        line = ("session client=%s listen=%s upstream=%s up=%d down=%d secs=%.2f end=%s"
                % (format_address(plain_ip(self.peer[0]), self.peer[1]), mapping.label, upstream,
                   self.up.count, self.down.count, self.server.now - self.started, end))
        if reason:
            line += ' reason="%s"' % reason.replace('"', "'")
        return line


def tune_socket(sock):
    """TCP_NODELAY: pass small writes (SMTP replies) on at once, as the peers wrote them.
    Keepalive: find peers that vanished from long silent sessions (IMAP IDLE) and free them."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in KEEPALIVE_OPTIONS:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        pass


KEEPALIVE_OPTIONS = [(getattr(socket, name), value) for name, value in (
    ("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
    ("TCP_KEEPCNT", KEEPALIVE_COUNT)) if hasattr(socket, name)]
# Linux copies these options from a listener to the sockets it accepts: set them once there.
ACCEPTED_INHERIT_OPTIONS = sys.platform.startswith("linux")


# ----------------------------------------------------------------------------------------------
# Server: listeners, the selectors loop, timers, signals, counters
# ----------------------------------------------------------------------------------------------

class Listener:
    """A listening socket of a mapping."""

    __slots__ = ("server", "sock", "mapping", "fd", "family", "inherited")

    def __init__(self, server, sock, mapping, inherited=False):
        self.server = server
        self.sock = sock
        self.mapping = mapping
        self.fd = sock.fileno()
        self.family = int(sock.family)      # the property builds an enum member on each read
        self.inherited = inherited

    def on_event(self, fd, mask):
        self.server.accept(self)

    def describe(self):
        host, port = self.sock.getsockname()[:2]
        if self.mapping.bind is None and self.sock.family == socket.AF_INET6:
            host = "[::]" if dual_stack(self.sock) is False else "*"
        elif ":" in host:
            host = "[%s]" % host
        return "%s:%d" % (host, port)


class Waker:
    """A socketpair that wakes the loop for signals (set_wakeup_fd) and resolver answers."""

    __slots__ = ("server", "rsock", "wsock")

    def __init__(self, server):
        self.server = server
        self.rsock, self.wsock = socket.socketpair()
        self.rsock.setblocking(False)
        self.wsock.setblocking(False)

    def __call__(self):
        try:
            self.wsock.send(b"\0")
        except OSError:
            pass            # full: the loop has a wake-up pending anyway

    def on_event(self, fd, mask):
        try:
            while self.rsock.recv(4096):
                pass
        except OSError:
            pass
        self.server.resolver.dispatch()


class Server:
    """Listens, accepts and runs every session from one selectors loop."""

    def __init__(self, options, mappings):
        self.mappings = mappings
        self.connect_timeout = options.connect_timeout
        self.idle_timeout = options.idle_timeout
        self.drain_timeout = options.drain_timeout
        self.header = HEADERS[options.proxy_protocol]
        self.proxy_protocol = options.proxy_protocol
        self.selector = selectors.DefaultSelector()
        self.now = time.monotonic()
        self.timers = []                # heap of [when, seq, callback, argument]
        self.timer_seq = itertools.count()
        self.listeners = []
        self.sessions = set()
        self.signals = collections.deque()
        self.running = False
        self.accepting = False
        self.stopping = False
        self.warned_at = -WARN_INTERVAL
        self.waker = Waker(self)
        self.resolver = Resolver(self.waker)
        self.selector.register(self.waker.rsock.fileno(), READ, self.waker)
        self.relay = choose_relay(options.relay)
        Session.flow_class = AutoFlow if self.relay == "splice" else Flow
        self.max_sessions = options.max_connections or max_sessions_for(len(mappings))
        self.watchdog_interval = watchdog_interval()
        # deadlines are checked this often: to a quarter of the shortest timeout, at most 1 s
        self.sweep_interval = max(0.05, min(1.0, self.idle_timeout / 4, self.connect_timeout / 4))

    # -- timers --------------------------------------------------------------------------------

    def call_later(self, delay, callback, argument=None):
        """Run callback(argument) from the loop after `delay` seconds. Returns an entry
        whose [2] may be set to None to cancel it."""
        entry = [self.now + delay, next(self.timer_seq), callback, argument]
        heapq.heappush(self.timers, entry)
        return entry

    def run_timers(self):
        """Run what is due; return how long the loop may sleep."""
        timers = self.timers
        self.now = now = time.monotonic()
        while timers and timers[0][0] <= now:
            entry = heapq.heappop(timers)
            if entry[2] is not None:
                try:
                    entry[2](entry[3])
                except Exception:
                    self.handle_error(getattr(entry[2], "__self__", None))
        while timers and timers[0][2] is None:
            heapq.heappop(timers)
        return max(0.0, timers[0][0] - now) if timers else None

    # -- listeners -----------------------------------------------------------------------------

    def open_listeners(self):
        """Bind every mapping (or adopt sockets from systemd). Raises StartupError."""
        inherited = systemd_sockets()
        activated = bool(inherited)
        for mapping in self.mappings:
            socks = [s for s in inherited if listens_for(s, mapping)]
            if socks:
                for sock in socks:
                    inherited.remove(sock)
                    self.listeners.append(Listener(self, sock, mapping, inherited=True))
                continue
            if activated:
                log(WARNING, "listen addr=%s has no socket from systemd; binding it here"
                    % mapping.label)
            for sock in bind_listeners(mapping):
                self.listeners.append(Listener(self, sock, mapping))
        for sock in inherited:
            log(WARNING, "socket %s from systemd matches no mapping; closing it"
                % format_address(*sock.getsockname()[:2]))
            sock.close()
        for listener in self.listeners:
            sock = listener.sock
            sock.setblocking(False)
            if ACCEPTED_INHERIT_OPTIONS:
                tune_socket(sock)
            mapping = listener.mapping
            log(NOTICE, "listen addr=%s upstream=%s proxy=%s%s" % (
                listener.describe(), ",".join(format_address(*u) for u in mapping.upstreams),
                self.proxy_protocol, " (from systemd)" if listener.inherited else ""))

    def resume_accept(self, _=None):
        if self.accepting or self.stopping or len(self.sessions) >= self.max_sessions:
            return
        for listener in self.listeners:
            self.selector.register(listener.fd, READ, listener)
        self.accepting = True

    def pause_accept(self):
        if self.accepting:
            for listener in self.listeners:
                self.selector.unregister(listener.fd)
            self.accepting = False

    def accept(self, listener):
        """Accept until the backlog is empty (or a batch is done, to stay fair)."""
        sock, mapping, sessions = listener.sock, listener.mapping, self.sessions
        if not self.accepting:
            return                      # paused while this event was waiting in the batch
        for _ in range(ACCEPT_BATCH):
            if len(sessions) >= self.max_sessions:
                self.pause_accept()     # resumed when a session ends; clients wait in the backlog
                self.warn("max connections (%d) reached; new clients wait in the listen backlog"
                          % self.max_sessions)
                return
            try:
                fd, peer = sock._accept()   # socket.accept() minus its Python wrapper
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue            # that client is gone already; the next one may not be
                self.out_of_fds("accept on %s" % mapping.label, e)
                return
            client = _socket.socket(listener.family, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            if not ACCEPTED_INHERIT_OPTIONS:
                tune_socket(client)
            session = Session(self, mapping, client, peer)
            sessions.add(session)
            mapping.active += 1
            mapping.sessions += 1
            session.start()

    def out_of_fds(self, what, error):
        """Out of descriptors or memory: stop polling the listeners for a moment, so the loop
        does not spin on a backlog it cannot take (HAProxy and nginx do the same)."""
        self.pause_accept()
        self.call_later(ACCEPT_PAUSE, self.resume_accept)
        self.warn("%s: %s; pausing accepts for %gs" % (what, error.strerror, ACCEPT_PAUSE))

    def warn(self, message):
        if self.now - self.warned_at >= WARN_INTERVAL:
            self.warned_at = self.now
            log(WARNING, message)

    # -- sessions ------------------------------------------------------------------------------

    def watch(self, fd, old, new, data):
        """Change what the selector waits for on fd (0 = nothing)."""
        if not old:
            self.selector.register(fd, new, data)
        elif not new:
            self.selector.unregister(fd)
        else:
            self.selector.modify(fd, new, data)

    def session_ended(self, session, end, reason):
        mapping = session.mapping
        self.sessions.discard(session)
        mapping.active -= 1
        mapping.up += session.up.count
        mapping.down += session.down.count
        if end == "connect-failed":
            mapping.failed += 1
            log(WARNING, session.describe(end, reason))
        elif log.threshold >= INFO:
            log(INFO, session.describe(end, reason))
        if self.stopping:
            if not self.sessions:
                self.running = False
        elif not self.accepting:
            self.resume_accept()

    def sweep(self, _=None):
        """Every sweep interval: close sessions silent both ways for idle_timeout, and move
        on those whose resolve or connect ran past its deadline. One pass over all sessions
        a second is cheaper, in time and memory, than a timer per session."""
        now = self.now
        cutoff = now - self.idle_timeout
        late = [s for s in self.sessions
                if (s.active_at < cutoff if s.stage is STREAMING else s.attempt.deadline < now)]
        for session in late:
            if session.stage is STREAMING:
                session.close("idle-timeout")
            else:
                session.timed_out()
        self.call_later(self.sweep_interval, self.sweep)

    def handle_error(self, data):
        """A bug, not a bad peer: log it loudly, close the session it happened in, carry on."""
        kind, error, _ = sys.exc_info()
        log(ERROR, "internal error: %s: %s" % (kind.__name__, error))
        for line in traceback.format_exc().rstrip().splitlines():
            log(DEBUG, line)
        if isinstance(data, Session):
            try:
                data.close("error", "%s: %s" % (kind.__name__, error))
            except Exception:
                pass

    # -- running -------------------------------------------------------------------------------

    def serve_forever(self):
        self.install_signals()
        self.running = True
        self.resume_accept()
        self.call_later(self.sweep_interval, self.sweep)
        if self.watchdog_interval:
            self.call_later(self.watchdog_interval, self.feed_watchdog)
        for host in {host for m in self.mappings for host, _ in m.upstreams}:
            if literal_address(host, 0) is None:
                self.resolver.resolve(host, 0, self.log_resolved)   # warm the cache, tell the admin
        log(NOTICE, "ready pid=%d listeners=%d relay=%s max-connections=%d"
            % (os.getpid(), len(self.listeners), self.relay, self.max_sessions))
        sd_notify("READY=1", "STATUS=" + self.status())
        select = self.selector.select
        handle_error = self.handle_error
        while self.running:
            timeout = self.run_timers()
            if not self.running:
                break
            events = select(timeout)
            self.now = time.monotonic()
            for key, mask in events:
                try:
                    key.data.on_event(key.fd, mask)
                except Exception:
                    handle_error(key.data)
            while self.signals:
                self.on_signal(self.signals.popleft())
        log(NOTICE, "stopped sessions=%d" % sum(m.sessions for m in self.mappings))

    def log_resolved(self, host, addrs, error):
        if error is not None:
            log(WARNING, "resolve host=%s error=%r; will retry for each connection"
                % (host, error))
        else:
            ips = sorted({sockaddr[0] for _, sockaddr in addrs})
            log(NOTICE, "resolve host=%s addresses=%s" % (host, ",".join(ips)))

    def status(self):
        return "%d active, %d sessions; listening on %s" % (
            len(self.sessions), sum(m.sessions for m in self.mappings),
            " ".join(m.label for m in self.mappings))

    def feed_watchdog(self, _=None):
        # sent from the loop: a loop that is stuck stops feeding, and systemd restarts us
        sd_notify("WATCHDOG=1", "STATUS=" + self.status())
        self.call_later(self.watchdog_interval, self.feed_watchdog)

    def install_signals(self):
        def handler(signum, frame):
            self.signals.append(signum)     # the loop does the work; see on_signal
        signal.set_wakeup_fd(self.waker.wsock.fileno())
        for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), handler)

    def on_signal(self, signum):
        if signum == getattr(signal, "SIGUSR1", None):
            self.log_stats()
        else:
            self.begin_drain()

    def begin_drain(self):
        if self.stopping:
            log(NOTICE, "second stop signal; closing %d sessions now" % len(self.sessions))
            return self.finish_drain()
        self.stopping = True
        self.pause_accept()
        for listener in self.listeners:
            listener.sock.close()
        sd_notify("STOPPING=1", "STATUS=draining %d sessions" % len(self.sessions))
        log(NOTICE, "stopping active=%d drain=%gs" % (len(self.sessions), self.drain_timeout))
        if not self.sessions:
            self.running = False
        else:
            self.call_later(self.drain_timeout, self.finish_drain)

    def finish_drain(self, _=None):
        for session in list(self.sessions):
            session.close("drain")
        self.running = False

    def log_stats(self):
        live = collections.defaultdict(lambda: [0, 0])
        for session in self.sessions:
            counts = live[session.mapping]
            counts[0] += session.up.count
            counts[1] += session.down.count
        parts, totals = [], [0, 0, 0, 0, 0]
        for m in self.mappings:
            row = (m.active, m.sessions, m.failed, m.up + live[m][0], m.down + live[m][1])
            totals = [a + b for a, b in zip(totals, row)]
            parts.append("%s active=%d sessions=%d failed=%d up=%d down=%d" % ((m.label,) + row))
        log(NOTICE, "stats active=%d sessions=%d failed=%d up=%d down=%d | %s"
            % (tuple(totals) + (" | ".join(parts),)))


def choose_relay(wanted):
    """splice where the platform has it (Linux, Python >= 3.10), else copy."""
    available = SPLICE is not None and fcntl is not None and hasattr(os, "pipe2")
    if wanted == "copy" or not available:
        if wanted == "splice":
            log(WARNING, "--relay splice needs Linux and Python >= 3.10; using copy")
        return "copy"
    return "splice"


def max_sessions_for(listeners):
    """Sessions that fit in the open-file limit: two sockets each, plus headroom for
    the splice pipe pool, listeners and the loop's own descriptors."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource else 512
    if limit == getattr(resource, "RLIM_INFINITY", -1):
        limit = 1 << 20
    spare = limit - RESERVED_FDS - 2 * listeners
    PIPES.limit = max(1, min(PIPE_POOL, spare // 64))
    return max(1, (spare - 2 * PIPES.limit) // 2)


def raise_fd_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit, as Go does at start."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass        # macOS refuses more than OPEN_MAX; keep what we have


def dual_stack(sock):
    try:
        return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except (OSError, AttributeError):
        return None


def bind_listeners(mapping):
    """Listening sockets for a mapping: one dual-stack socket for 'every interface' where
    the OS allows it (else IPv6 + IPv4 sockets, or IPv4 alone when IPv6 is off)."""
    if mapping.bind is not None:
        family = socket.AF_INET6 if ":" in mapping.bind else socket.AF_INET
        # an explicit [::] means IPv6 only, as in nginx, so 0.0.0.0 can be bound beside it
        return [open_listener(family, mapping.bind, mapping.port, v6only=True)]
    if socket.has_ipv6:
        try:
            return [open_listener(socket.AF_INET6, "::", mapping.port, v6only=False)]
        except StartupError as e:
            if e.args[1] not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.ENOPROTOOPT,
                                 errno.EINVAL, errno.EPROTONOSUPPORT):
                raise
            if e.args[1] in (errno.ENOPROTOOPT, errno.EINVAL):   # no dual-stack sockets here
                v6 = open_listener(socket.AF_INET6, "::", mapping.port, v6only=True)
                return [v6, open_listener(socket.AF_INET, "0.0.0.0", mapping.port)]
    return [open_listener(socket.AF_INET, "0.0.0.0", mapping.port)]


def open_listener(family, host, port, v6only=True):
    where = format_address(host, port)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise StartupError("cannot listen on %s: %s" % (where, e.strerror), e.errno)
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            except OSError as e:
                raise StartupError("cannot listen on %s: %s" % (where, e.strerror), e.errno)
        sock.bind((host, port))
        sock.listen(4096)       # the kernel caps it at net.core.somaxconn
    except OSError as e:
        sock.close()
        hint = ""
        if e.errno in (errno.EACCES, errno.EPERM) and port < 1024:
            hint = (" (ports below 1024 need root or CAP_NET_BIND_SERVICE: run as root with "
                    "--user NAME, or use the systemd unit)")
        elif e.errno == errno.EADDRINUSE:
            hint = " (another program listens there; `ss -ltnp 'sport = :%d'` shows which)" % port
        elif e.errno == errno.EADDRNOTAVAIL:
            hint = " (no interface of this machine has that address)"
        raise StartupError("cannot listen on %s: %s%s" % (where, e.strerror, hint), e.errno)
    except StartupError:
        sock.close()
        raise
    return sock


# ----------------------------------------------------------------------------------------------
# systemd glue: sd_notify, watchdog, socket activation, privilege drop
# ----------------------------------------------------------------------------------------------

def sd_notify(*lines):
    """Tell systemd how we are (sd_notify(3)); a no-op when not started by it."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not hasattr(socket, "AF_UNIX"):
        return False
    if path[0] == "@":
        path = "\0" + path[1:]          # an abstract socket
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.sendto("\n".join(lines).encode("utf-8", "replace"), path)
        finally:
            sock.close()
    except OSError as e:
        log(DEBUG, "sd_notify %s: %s" % (path, e))
        return False
    return True


def watchdog_interval():
    """Half of WATCHDOG_USEC (when it is meant for this process), or None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


SD_LISTEN_FDS_START = 3


def systemd_sockets():
    """Listening sockets passed by systemd (sd_listen_fds(3)), as socket objects."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)      # not for any child process
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count or 0)):
        # Python < 3.7 does not detect a descriptor's family: ask the kernel (SO_DOMAIN)
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
        try:
            family = probe.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_DOMAIN", 39))
            kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        except OSError:
            family = kind = None
        probe.detach()
        if kind != socket.SOCK_STREAM or family not in (socket.AF_INET, socket.AF_INET6):
            log(WARNING, "descriptor %d from systemd is not a TCP socket; ignoring it" % fd)
            continue
        socks.append(socket.socket(family, socket.SOCK_STREAM, 0, fd))
    return socks


def listens_for(sock, mapping):
    host, port = sock.getsockname()[:2]
    if port != mapping.port:
        return False
    if mapping.bind is None:
        return host in ("::", "0.0.0.0")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (":" in mapping.bind) == (family == socket.AF_INET6) and \
        socket.inet_pton(family, host) == socket.inet_pton(family, mapping.bind)


def lookup_user(name):
    try:
        import pwd
        return pwd.getpwnam(name)
    except ImportError:
        raise StartupError("--user works only on Unix")
    except KeyError:
        raise StartupError("--user %s: no such user; create one (e.g. `useradd --system "
                           "--no-create-home %s`) or name an existing one" % (name, name))


def drop_privileges(user):
    """Become `user` (a pwd entry), with its group and no supplementary groups."""
    if os.getuid() != 0:
        if os.getuid() == user.pw_uid:
            return
        raise StartupError("--user %s needs root to switch users; start as root or leave "
                           "--user out" % user.pw_name)
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    log(INFO, "user name=%s uid=%d gid=%d" % (user.pw_name, user.pw_uid, user.pw_gid))


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    """Parse, bind, drop privileges, serve. Returns the exit code."""
    try:
        options, mappings = parse_args(argv)
    except ConfigError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return 2
    log.configure(options.verbose, options.quiet)
    raise_fd_limit()
    try:
        user = lookup_user(options.user) if options.user else None
        server = Server(options, mappings)
        server.open_listeners()
        if user is not None:
            drop_privileges(user)
    except StartupError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e.args[0]))
        return 1
    if hasattr(os, "getuid") and os.getuid() == 0 and user is None:
        log(WARNING, "running as root; pass --user NAME to drop privileges once the "
            "listeners are bound")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
