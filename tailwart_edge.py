#!/usr/bin/env python3
"""tailwart-edge: a layer-4 edge proxy for self-hosted mail.

It listens on the public mail ports of a small server and pipes every TCP
connection, byte for byte, to the mail server (say Stalwart inside a Tailscale
tailnet). TLS is never terminated here; a PROXY protocol header, written before
the first byte, tells the mail server who the real client is.

usage: tailwart_edge.py [OPTIONS] MAPPING [MAPPING ...]

  MAPPING  [BIND_ADDR:]LISTEN_PORT[/PROTO][@MATCH,...]=UPSTREAM_HOST:UPSTREAM_PORT[,HOST:PORT ...]
           [/proxy=v2|v1|off]
           or [BIND_ADDR:]LISTEN_PORT[/PROTO][@MATCH,...] alone, together with --upstream HOST

examples:
  tailwart_edge.py 25=stalwart.tail7b1641.ts.net:25 993=stalwart.tail7b1641.ts.net:993
  tailwart_edge.py --upstream stalwart.tail7b1641.ts.net 25 465 587 143 993 4190
  tailwart_edge.py --proxy-protocol off 127.0.0.1:2525=10.0.0.5:25
  tailwart_edge.py '[::1]:993=[fd7a:115c:a1e0::1]:993' --user nobody
  tailwart_edge.py 443@mail.example.com,alpn:acme-tls/1=stalwart.tail7b1641.ts.net:443 \
                   443=127.0.0.1:8443/proxy=off

Without BIND_ADDR it listens on every interface, IPv4 and IPv6. BIND_ADDR is an
IPv4 address or an IPv6 address in brackets. Several upstreams are tried in
order. PROTO is what clients of the port speak: smtp, smtps, imap, imaps, pop3,
pop3s, sieve, http, https, tls or tcp (none known); by default the port's usual
one (25, 587 and 2525 smtp; 465 smtps; 143 imap; 993 imaps; 110 pop3; 995 pop3s;
4190 sieve; 80 http; 443 https; others tcp). --check uses it to greet the mail
server as a client would. /proxy=... sets the PROXY header of that mapping's
upstreams (default: --proxy-protocol).

Routing by name (a port shared with a web server): several mappings on one
listen address, each with @MATCH,... , and at most one without (the default
route). TLS ports (https, tls, smtps, imaps, pop3s) route by the ClientHello's
server name, HTTP ports by the first request's Host; TLS is never terminated.
MATCH is a name (mail.example.com), a wildcard (*.example.com: any name below),
alpn:PROTO (TLS: alpn:acme-tls/1) or, on HTTP, NAME/PATH (a path prefix, as
mail.example.com/.well-known/acme-challenge/). alpn and paths win, then exact
names, then the longest wildcard, then the default route; with none, a client
is closed (TLS: alert unrecognized_name; HTTP: 421).

--check checks every mapping as the relay would use it, without listening: the
ports, each upstream's name, connect and source address, and its greeting to a
PROXY LOCAL header (a TLS handshake on implicit-TLS ports); it names what is
wrong and how to fix it, and exits 0 when all is well, 1 when not.

--install (as root, under systemd) makes it the service tailwart-edge: the
script in /usr/local/bin, the unit, and /etc/default/tailwart-edge written from
the mappings and options given; it runs --check first and enables nothing that
fails it. Again with a newer script: an upgrade, no gap. --uninstall removes
the service and the script, and keeps the settings file.

Signals: TERM and INT stop accepting, let sessions finish (up to --drain-timeout)
and exit 0; HUP reloads (a new process, the script as it is on disk now, takes
the ports over, and this one finishes its sessions); USR1 logs counters. Exit
codes: 0 stopped, 1 could not start (e.g. a port is taken), 2 bad command line.
"""

# Copyright (c) 2026 the tailwart-edge authors. MIT License: see the LICENSE file.

# The file reads in the order of a connection's life; each banner is a section:
#   Command line ........ argv, --settings FILE -> options    parse_args, settings_words
#   Mappings ............ the mapping grammar -> Mapping      parse_mapping, overlapping,
#                         (its Routes), self-loops refused    refuse_self_loops
#   Logging ............. one key=value line per event       Log, log
#   Listeners ........... binding, systemd socket adoption   Listener, open_listeners
#   Accept .............. batches, the connection cap,       Acceptor, capacity
#                         the out-of-descriptors pause       (Server.starve: an accepted
#                                                            client waits for a descriptor)
#   Routing ............. a shared port: the ClientHello's   Router, client_hello,
#                         server name or the HTTP Host       request_head
#                         -> the route (Route)
#   PROXY header ........ the codec: pure functions          proxy_header_v1, proxy_header_v2
#   Resolver ............ names off the event loop           Resolver, Answer
#   Connecting .......... resolve, connect, failover,        Connector, Upstream
#                         connect timeout, the header,
#                         per-upstream counters and warnings
#   Relay ............... flows, half-close, splice, pipes   Flow, Relay, PipePool
#   Session ............. events -> flows, ending, the line  Session
#   The loop ............ timers, the sweep (idle and half-  Timers, Timeouts, Waker,
#                         close timeouts), signals, drain,   Server
#                         stats
#   Metrics ............. --metrics: Prometheus text over    Metrics, Scrape
#                         HTTP, served from the loop
#   Reload .............. HUP: a new process takes the       Reload, reload_client
#                         listeners, the old one drains
#   systemd ............. notify, watchdog, privileges       Notifier, drop_privileges
#   Doctor .............. --check: ports, names, connects,   Doctor, check_listen,
#                         header, greetings, TLS; the fixes  check_upstream, talk
#   Install ............. --install: the script, the unit     install, uninstall,
#                         (its text is here) and settings;   settings_text, unit_text
#                         the check first; --uninstall
#   main ................ parse, bind, serve                 main

import collections
import signal

# Signals are caught first thing, before the imports below take their ~20 ms: a HUP or
# USR1 during start-up must not kill the relay (their default action), nor a Ctrl-C print
# a traceback. The handler only queues the number; the loop acts on it (Server.on_signals).
SIGNALS = collections.deque()
CAUGHT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1")


def queue_signal(signum, frame):
    """The handler of every signal we act on (see catch_signals)."""
    SIGNALS.append(signum)


def take_signals():
    """The signals queued since the last call, each kind once, in the order they came."""
    kinds = []
    while SIGNALS:
        signum = SIGNALS.popleft()
        if signum not in kinds:
            kinds.append(signum)
    return kinds


def catch_signals():
    """Queue TERM, INT, HUP and USR1 for the loop instead of their default actions."""
    for name in CAUGHT_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), queue_signal)


if __name__ == "__main__":
    catch_signals()

import argparse     # noqa: E402  (after catch_signals, on purpose)
import errno
import heapq
import itertools
import os
import queue
import re
import select
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import _socket      # the C socket type under socket.socket: half the memory per connection

try:
    import resource
except ImportError:  # not on Windows
    resource = None
try:
    import fcntl        # a splice pipe's size (splice itself is Linux only)
except ImportError:  # not on Windows
    fcntl = None

__version__ = "0.3.0"
PROG = "tailwart_edge.py"
SCRIPT = os.path.abspath(__file__)      # what a reload runs again, as it is on disk then


# ----------------------------------------------------------------------------------------------
# Command line: argv -> options and a list of Mapping
# ----------------------------------------------------------------------------------------------

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 3600.0   # > IMAP IDLE's 29 minutes (RFC 2177), so IDLE is never cut
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_HALF_CLOSE_TIMEOUT = 60.0   # HAProxy's `timeout client-fin`/`server-fin`
DEFAULT_RELOAD_DRAIN = 1800.0   # after a reload the old process ends its sessions after this
                                # long: past IMAP IDLE's 29 minutes, as servers cut IDLE at 30
DEFAULT_PORTS = ["25", "465", "587", "143", "993", "4190"]
DEFAULT_PER_CLIENT = 50         # Postfix's anvil allows 50 at once per client by default
DEFAULT_PER_CLIENT_RATE = 300   # a minute; Postfix has no default rate: 5 a second is far above
                                # a real sender (a big provider uses a handful of connections)
SETTINGS_KEYS = ("UPSTREAM", "PORTS", "OPTIONS")


class ConfigError(Exception):
    """A mistake on the command line. main() prints it as one line and exits 2."""


class NoUpstream(ConfigError):
    """A bare [BIND_ADDR:]PORT with no --upstream to go to."""


class StartupError(Exception):
    """The configuration is valid but cannot be put in place. main() exits 1."""


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake becomes a ConfigError: one line, no usage block."""

    def error(self, message):
        raise ConfigError(message)


def seconds(text, allow_zero=False):
    """An option's value as a number of seconds (argparse type); finite, > 0 (or >= 0)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError("%r is not a %s number of seconds, e.g. 10"
                                         % (text, "non-negative" if allow_zero else "positive"))
    return value


def positive_int(text):
    """An option's value as a whole number >= 1 (argparse type)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("%r is not a positive whole number" % text)
    return int(text)


def build_parser():
    """The argparse parser; its --help text is the module docstring."""
    head, _, tail = __doc__.partition("\nusage:")
    tail = tail.partition("\n\n")[2]        # the docstring's usage line is argparse's job
    parser = Parser(prog=PROG, description=head.strip(), epilog=tail,
                    usage="%(prog)s [OPTIONS] MAPPING [MAPPING ...]", allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mappings", nargs="*", metavar="MAPPING",
                        help="[BIND_ADDR:]LISTEN_PORT[/PROTO]=UPSTREAM_HOST:UPSTREAM_PORT")
    add_relaying(parser.add_argument_group("relaying"))
    add_clients(parser.add_argument_group("clients"))
    add_timeouts(parser.add_argument_group("timeouts"))
    add_egress(parser.add_argument_group("egress (outbound mail through the VPS)"))
    add_running(parser.add_argument_group("running"))
    add_install(parser.add_argument_group("service"))
    return parser


def add_relaying(group):
    """--proxy-protocol, --upstream, --max-connections, --relay."""
    group.add_argument("--proxy-protocol", choices=("v2", "v1", "off"), default="v2",
                       help="PROXY protocol header sent to the upstream (default: v2)")
    group.add_argument("--upstream", metavar="HOST",
                       help="upstream host for mappings given as a bare [BIND_ADDR:]PORT")
    group.add_argument("--max-connections", type=positive_int, metavar="N",
                       help="most sessions at once; more wait in the listen backlog "
                       "(default: what the open-file limit and memory allow)")
    group.add_argument("--relay", choices=("auto", "splice", "copy"), default="auto",
                       help="how bytes move: splice (zero-copy, Linux with Python >= 3.10), "
                       "copy, or auto (default: the fastest this system has)")


def add_clients(group):
    """The per-client limits and who they spare; --deny and --allow."""
    group.add_argument("--per-client", type=non_negative_int, default=DEFAULT_PER_CLIENT,
                       metavar="N", help="most sessions at once from one client (an IPv4 "
                       "address, an IPv6 /64); 0: no limit (default: %d, as Postfix's anvil)"
                       % DEFAULT_PER_CLIENT)
    group.add_argument("--per-client-rate", type=non_negative_int, metavar="N",
                       default=DEFAULT_PER_CLIENT_RATE, help="most new connections from one "
                       "client per minute; 0: no limit (default: %d)" % DEFAULT_PER_CLIENT_RATE)
    group.add_argument("--exempt", type=network, action="append", metavar="CIDR",
                       help="clients the two limits above never apply to (your own networks, "
                       "monitoring); may be repeated (default: loopback, 127.0.0.0/8 and ::1; "
                       "giving --exempt replaces it)")
    group.add_argument("--deny", type=network, action="append", default=[], metavar="CIDR",
                       help="refuse clients from CIDR at accept; may be repeated")
    group.add_argument("--allow", type=network, action="append", default=[], metavar="CIDR",
                       help="refuse every client not in CIDR (and not denied); may be repeated")


def add_running(group):
    """--settings, --check, --reload, --metrics, --user, -v/-q, --version."""
    group.add_argument("--settings", metavar="FILE",
                       help="read UPSTREAM=, PORTS= and OPTIONS= lines from FILE (as "
                       "/etc/default/tailwart-edge); a reload (HUP) reads it again")
    group.add_argument("--check", action="store_true",
                       help="check the mappings as the relay would use them, without "
                       "listening: ports, upstream names, connects, greetings; exit 0 when "
                       "all is well, 1 when not")
    group.add_argument("--reload", type=positive_int, metavar="PID",
                       help="reload the relay running as PID (SIGHUP) and, under systemd, "
                       "wait for the outcome: exit 0 when the new process took over")
    group.add_argument("--metrics", metavar="ADDR:PORT", type=metrics_address,
                       help="serve Prometheus metrics at http://ADDR:PORT/metrics (off by "
                       "default; a loopback or tailnet address, e.g. 127.0.0.1:9425)")
    group.add_argument("--pid-file", metavar="FILE",
                       help="write the relay's pid to FILE once it listens (a reload's new "
                       "process writes its own as it takes over); removed at the stop")
    group.add_argument("--user", metavar="NAME",
                       help="when started as root: bind, then run as this user (a name or "
                       "a numeric uid)")
    loud = group.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="log more (debug)")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="no line per session: only start, stop, counters and problems")
    group.add_argument("--version", action="version", version="tailwart-edge " + __version__)


def metrics_address(text):
    """--metrics ADDR:PORT -> (ip, port); the address is an IP: no lookup at start."""
    try:
        host, port, _ = split_address(text, "--metrics address", text)
    except ConfigError as e:
        raise ConfigError("--metrics: %s" % e)
    if not host or not (is_ip(host, socket.AF_INET) or is_ip(host, socket.AF_INET6)):
        raise argparse.ArgumentTypeError("%r is not IP:PORT; write e.g. 127.0.0.1:9425 or "
                                         "[::1]:9425" % text)
    return host, parse_port(port, "--metrics port", text)


def non_negative_int(text):
    """A whole number >= 0 (0 turns a limit off)."""
    if not DIGITS_RE.match(text):
        raise argparse.ArgumentTypeError("%r is not a whole number >= 0" % text)
    return int(text)


def network(text):
    """A CIDR (or a bare address) -> ipaddress network; host bits set are refused.

    An IPv4-mapped one (::ffff:192.0.2.0/120) becomes the IPv4 network it means
    (192.0.2.0/24): clients are judged by their plain address (plain_ip), so as written
    it could never match."""
    import ipaddress
    try:
        net = ipaddress.ip_network(text.strip("[]"), strict=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError("%r is not a network: %s (write e.g. 192.0.2.0/24, "
                                         "2001:db8::/32 or 192.0.2.7)" % (text, e))
    mapped = net.network_address.ipv4_mapped if net.version == 6 else None
    if mapped is not None and net.prefixlen >= 96:
        return ipaddress.ip_network("%s/%d" % (mapped, net.prefixlen - 96))
    return net


def add_timeouts(group):
    """The --*-timeout, --dns-ttl and --reload-drain options."""
    non_negative = lambda text: seconds(text, allow_zero=True)     # noqa: E731
    for option, kind, default, meaning in (
            ("--connect-timeout", seconds, DEFAULT_CONNECT_TIMEOUT, "per upstream connect "
             "attempt"),
            ("--idle-timeout", seconds, DEFAULT_IDLE_TIMEOUT, "close a session silent both "
             "ways this long (longer than IMAP IDLE's 29 minutes)"),
            ("--half-close-timeout", seconds, DEFAULT_HALF_CLOSE_TIMEOUT, "once one side has "
             "closed, end the session after this long with no traffic"),
            ("--peek-timeout", seconds, DEFAULT_PEEK_TIMEOUT, "a listener that routes by name "
             "waits this long for the client's TLS ClientHello or HTTP request head"),
            ("--drain-timeout", non_negative, DEFAULT_DRAIN_TIMEOUT, "on TERM/INT, let open "
             "sessions finish this long"),
            ("--reload-drain", non_negative, DEFAULT_RELOAD_DRAIN, "after a reload (HUP), the "
             "old process lets its sessions finish this long"),
            ("--dns-ttl", seconds, DEFAULT_DNS_TTL, "look upstream names up again after this "
             "long; an older answer is still used while a lookup is slow or failing")):
        group.add_argument(option, type=kind, default=default, metavar="SECS",
                           help="%s (default: %g)" % (meaning, default))


def parse_args(argv=None):
    """argv -> (options, [Mapping]); raises ConfigError. Mappings may come before, after
    and between the options. With --settings FILE, the file's words come first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    path = settings_file(argv)
    settings = None
    if path is not None:
        settings = read_settings_file(path)
        check_settings(parser, settings)
        argv = settings.words() + argv
    options, rest = parser.parse_known_args(argv)
    refuse_unknown_options(parser, rest)
    options.mappings += rest
    if options.reload is not None or options.uninstall:
        return options, []
    upstream = options.upstream
    if upstream is not None:
        upstream = upstream_host(upstream)
        if upstream is None:
            raise ConfigError(upstream_refusal("--upstream %r" % options.upstream,
                                               options.upstream, "--upstream %s"))
    if not options.mappings and not egress_given(options):
        raise ConfigError("no MAPPING given; usage: %s [OPTIONS] [BIND_ADDR:]PORT=HOST:PORT ... "
                          "e.g. %s 25=stalwart.tail7b1641.ts.net:25 (see --help)" % (PROG, PROG))
    mappings = []
    for text in options.mappings:
        try:
            mapping = parse_mapping(text, upstream)
        except NoUpstream:
            if settings is None:
                raise
            raise ConfigError("%s: no UPSTREAM= line; add UPSTREAM=HOST (the mail server)"
                              % settings.path)
        # words on one listen address are the routes of one listener, if any of them routes
        same = [m for m in mappings if m.label == mapping.label]
        if same and (len(same[0].routes) > 1 or same[0].default is None or
                     mapping.default is None):
            same[0].add_route(mapping, "/" in text.partition("=")[0].partition("@")[0])
            continue
        for other in mappings:
            if overlapping(mapping, other):
                raise ConfigError("listen address %s in %r collides with %r; each address "
                                  "and port may be listened on once (or give each word "
                                  "@NAME,... to route by name)"
                                  % (mapping.label, mapping.spec, other.spec))
        mappings.append(mapping)
    for mapping in mappings:
        mapping.finish()
    mappings += egress_mappings(options, mappings)
    refuse_self_loops(mappings)
    return options, mappings


def settings_file(argv):
    """The FILE of `--settings FILE` (or `--settings=FILE`) in argv, or None."""
    for i, arg in enumerate(argv):
        if arg == "--settings" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--settings="):
            return arg.partition("=")[2]
    return None


def refuse_unknown_options(parser, rest, where=None):
    """ConfigError for the words in `rest` (what parse_known_args left) that look like
    options, naming the option each most likely meant; `where` says where they were written."""
    unknown = [word for word in rest if word.startswith("-")]
    if not unknown:
        return
    meant = [(word.partition("=")[0], options_near(parser, word.partition("=")[0]))
             for word in unknown]
    meant = [(word, near) for word, near in meant if near]
    hint = ""
    if len(unknown) == 1 and meant:
        hint = "; did you mean %s?" % or_list(meant[0][1])
    elif meant:
        hint = "; did you mean %s?" % ", ".join("%s for %s" % (or_list(near), word)
                                               for word, near in meant)
    raise ConfigError("unrecognized arguments: %s%s%s" % (
        " ".join(unknown), " (%s)" % where if where else "", hint))


def options_near(parser, word):
    """The options `word` most likely meant: those it begins (--up: --upstream; prefixes are
    not taken, allow_abbrev=False), else the one closest in spelling (--idle-timout)."""
    import difflib      # only on this error path
    # argparse has no public list of its option strings: read them off its actions
    known = [option for action in parser._actions for option in action.option_strings]
    begun = [option for option in known if len(word) > 2 and option.startswith(word)]
    return begun[:3] or difflib.get_close_matches(word, known, n=1, cutoff=0.75)


def or_list(words):
    """['a'] -> 'a'; ['a', 'b', 'c'] -> 'a, b or c'."""
    return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


def check_settings(parser, settings):
    """Check the file's UPSTREAM= and OPTIONS= alone before the whole command line, so that
    a mistake in them names the file and line they are on (ConfigError)."""
    upstream = settings.values.get("UPSTREAM")
    if upstream is not None and upstream_host(upstream[0]) is None:
        raise ConfigError(upstream_refusal("%s line %d: UPSTREAM=%s" % (
            settings.path, settings.lines["UPSTREAM"], upstream[0]), upstream[0], "UPSTREAM=%s"))
    words = settings.values.get("OPTIONS")
    if not words:
        return
    where = "in OPTIONS= of %s line %d" % (settings.path, settings.lines["OPTIONS"])
    try:
        _, rest = parser.parse_known_args(words)
    except ConfigError as e:
        raise ConfigError("%s (%s)" % (e, where))
    refuse_unknown_options(parser, rest, where)


def upstream_host(text):
    """--upstream's HOST (a name, an IPv4 address, an IPv6 one in brackets) without its
    brackets, or None when `text` is none of these."""
    if text.startswith("[") and text.endswith("]"):
        return text[1:-1] if is_ip(text[1:-1], socket.AF_INET6) else None
    return text if HOST_RE.match(text) else None


def upstream_refusal(subject, text, spelling):
    """Why `text`, given as `subject`, is no --upstream HOST; `spelling` % host is how to
    write it (the line to write instead, when it only has a port too many)."""
    head, colon, port = text.rpartition(":")
    if colon and DIGITS_RE.match(port) and upstream_host(head) is not None:
        return ("%s names a port; drop the port: each port goes to the same port there (%s)"
                % (subject, spelling % head))
    return ("%s is not a host name or IP address (IPv6 goes in brackets, as in "
            "[fd7a:115c:a1e0::1])" % subject)


SETTINGS_MAX_BYTES = 1 << 20       # a few lines in practice; --settings /dev/zero must not hang
SETTINGS_LINE_BREAK_RE = re.compile(r"\r\n|\r|\n")     # CR too: a file saved on Windows
SETTINGS_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # tab is whitespace
SETTINGS_PLAIN_RE = re.compile(r"[^ \t'\"\\]+")    # unquoted characters (a # too, in a word)
SETTINGS_DOUBLE_RE = re.compile(r'[^"\\]+')        # inside "...", up to a quote or backslash
SETTINGS_SPLIT_RE = re.compile(r"[ \t\n]+")        # where systemd splits "$PORTS" into words
# options that make no sense as the service's own: they would turn it into another command
SETTINGS_REFUSED_OPTIONS = ("--settings", "--check", "--reload", "--help", "-h", "--version",
                            "--install", "--uninstall", "--replace-settings")


class Settings:
    """A settings file as read: its values and the line each is on."""

    __slots__ = ("path", "values", "lines")

    def __init__(self, path):
        self.path = path
        self.values = {}            # KEY -> [word]
        self.lines = {}             # KEY -> the number of the line it is on

    def ports(self):
        """The PORTS words (default: the six mail ports)."""
        return list(self.values.get("PORTS", DEFAULT_PORTS))

    def words(self):
        """The command-line words the file stands for: OPTIONS, then --upstream UPSTREAM,
        then PORTS."""
        upstream = self.values.get("UPSTREAM")
        return (list(self.values.get("OPTIONS", ())) +
                (["--upstream", upstream[0]] if upstream else []) + self.ports())


def settings_words(path):
    """The command-line words a settings file stands for (Settings.words). See
    read_settings for the file's grammar."""
    return read_settings_file(path).words()


def read_settings_file(path):
    """The Settings of the file at `path`; raises ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read(SETTINGS_MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError("--settings %s: %s" % (path, e.strerror or e))
    if len(data) > SETTINGS_MAX_BYTES:
        raise ConfigError("--settings %s: larger than %d bytes; is it the settings file?"
                          % (path, SETTINGS_MAX_BYTES))
    return settings_of(data, path)


def words_of_settings(data, path):
    """settings_words of a file's bytes (`path` names it in errors)."""
    return settings_of(data, path).words()


def settings_of(data, path):
    """The Settings of a file's bytes (ConfigError when it cannot be read as one)."""
    settings = read_settings(data, path)
    upstream = settings.values.get("UPSTREAM")
    if upstream is not None:
        if len(upstream) != 1:
            raise ConfigError("%s: UPSTREAM= takes one host name or address, not %r"
                              % (path, " ".join(upstream)))
    return settings


def read_settings(data, path):
    """A settings file's bytes -> Settings; raises ConfigError naming the file and line.

    UTF-8 text (a BOM at the start is ignored) of KEY=VALUE lines, # comment lines and blank
    lines; each of UPSTREAM, PORTS and OPTIONS at most once. A value is read as sh reads a
    word list (see value_words), and goes on over the next lines only while a quote is open
    or a line ends in a backslash. The words are then split at whitespace, as systemd splits
    "$PORTS" (this file's first reader): PORTS="25 465" is two words."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        number = len(SETTINGS_LINE_BREAK_RE.split(data[:e.start].decode("latin-1")))
        raise ConfigError("%s line %d: byte 0x%02x is not UTF-8 text; save the file as UTF-8"
                          % (path, number, data[e.start]))
    lines = SETTINGS_LINE_BREAK_RE.split(text)
    for number, line in enumerate(lines, 1):
        control = SETTINGS_CONTROL_RE.search(line)
        if control:
            raise ConfigError("%s line %d: control character %r in the text; remove it"
                              % (path, number, control.group()))
    settings = Settings(path)
    values, first = settings.values, settings.lines
    index = 0
    while index < len(lines):
        number = index + 1
        line = lines[index].lstrip(" \t")
        if not line.rstrip(" \t") or line.startswith("#"):
            index += 1
            continue
        key, eq, value = line.partition("=")    # the value as written: `\ ` at its end counts
        key = key.strip(" \t")
        if not eq or key not in SETTINGS_KEYS:
            raise ConfigError("%s line %d: %r is not a setting; write UPSTREAM=HOST, PORTS=... "
                              "or OPTIONS=..." % (path, number, line.rstrip(" \t")))
        if key in first:
            raise ConfigError("%s line %d: a second %s= (the first is on line %d); give each "
                              "setting once" % (path, number, key, first[key]))
        first[key] = number
        words, index = value_words(lines, index, value, path, key)
        if key == "OPTIONS":
            refused = [w for w in words if w.partition("=")[0] in SETTINGS_REFUSED_OPTIONS]
            if refused:
                raise ConfigError("%s line %d: OPTIONS= may not hold %s; give it on the command "
                                  "line" % (path, number, refused[0].partition("=")[0]))
        values[key] = words
    return settings


def value_words(lines, index, value, path, key):
    """The words of `value`, which follows KEY= on lines[index], and the index of the line
    after it. As sh: '...' is literal; in "..." a backslash escapes $ ` " \\ and a line
    break; outside quotes it escapes any character; a backslash-line break vanishes (the
    value goes on); # begins a comment only at the start of a word, outside quotes."""
    words, word, in_word, quote = [], [], False, None
    start = index + 1
    while True:
        position, end, continued = 0, len(value), False
        while position < end:
            char = value[position]
            if quote == "'":
                close = value.find("'", position)
                if close < 0:
                    word.append(value[position:])
                    break
                word.append(value[position:close])
                quote, position = None, close + 1
            elif quote == '"':
                if char == '"':
                    quote, position = None, position + 1
                elif char == "\\":
                    if position + 1 == end:
                        continued = True
                        break
                    following = value[position + 1]
                    word.append(following if following in '$`"\\' else "\\" + following)
                    position += 2
                else:
                    run = SETTINGS_DOUBLE_RE.match(value, position)
                    word.append(run.group())
                    position = run.end()
            elif char in " \t":
                if in_word:
                    words.append("".join(word))
                    word, in_word = [], False
                position += 1
            elif char == "#" and not in_word:
                break                       # a comment, to the end of the line
            elif char in "'\"":
                quote, in_word, position = char, True, position + 1
            elif char == "\\":
                if position + 1 == end:
                    continued = True
                    break
                word.append(value[position + 1])
                in_word, position = True, position + 2
            else:
                run = SETTINGS_PLAIN_RE.match(value, position)
                word.append(run.group())
                in_word, position = True, run.end()
        index += 1
        if quote is None and not continued:
            break
        if index == len(lines):
            raise ConfigError("%s line %d: the value of %s= %s and the file ends; %s"
                              % (path, start, key, "opens a quote (%s)" % quote if quote else
                                 "ends in a backslash", "close the quote" if quote else
                                 "remove the backslash"))
        if not continued:
            word.append("\n")               # a line break inside quotes: whitespace below
        value = lines[index]
    if in_word:
        words.append("".join(word))
    return [part for word in words for part in SETTINGS_SPLIT_RE.split(word) if part], index


# ----------------------------------------------------------------------------------------------
# Mappings: '[BIND:]PORT=HOST:PORT[,HOST:PORT...]' -> Mapping
# ----------------------------------------------------------------------------------------------

DIGITS_RE = re.compile(r"[0-9]+\Z")
HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})\Z")
# what clients of a port speak, unless the mapping says (25/smtp); `s`: TLS from the first byte
PROTOCOLS = ("smtp", "smtps", "imap", "imaps", "pop3", "pop3s", "sieve", "http", "https", "tls",
             "tcp")
PORT_PROTOCOLS = {25: "smtp", 587: "smtp", 2525: "smtp", 465: "smtps", 143: "imap",
                  993: "imaps", 110: "pop3", 995: "pop3s", 4190: "sieve", 80: "http",
                  443: "https"}
# what a routed listener reads to choose a route: the TLS ClientHello's server name on ports
# where the client speaks first in TLS, the Host of the first request on plain HTTP
ROUTE_BY = {"https": "tls", "tls": "tls", "smtps": "tls", "imaps": "tls", "pop3s": "tls",
            "http": "http"}
PROXY_VERSIONS = ("v2", "v1", "off")
# what a client is told, in its protocol, when it cannot be served (as nginx's mail module
# would, but nothing is terminated); TLS ports and unknown ones get a plain close: no
# plaintext into a TLS stream. IMAP's [UNAVAILABLE] is RFC 5530, POP3's [SYS/TEMP] RFC 3206,
# ManageSieve's (TRYLATER) RFC 5804: each tells the client to try again later.
REFUSALS = {
    "smtp": b"421 4.3.2 Service not available, closing transmission channel\r\n",
    "imap": b"* BYE [UNAVAILABLE] Service not available, try again later\r\n",
    "pop3": b"-ERR [SYS/TEMP] Service not available, try again later\r\n",
    "sieve": b'BYE (TRYLATER) "Service not available, try again later"\r\n',
    "http": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
}
LIMIT_REFUSALS = {         # over a per-client limit
    "smtp": b"421 4.7.0 Too many connections from your address\r\n",
    "imap": b"* BYE [UNAVAILABLE] Too many connections from your address\r\n",
    "pop3": b"-ERR [SYS/TEMP] Too many connections from your address\r\n",
    "sieve": b'BYE (TRYLATER) "Too many connections from your address"\r\n',
    "http": b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
}


class Route:
    """Where sessions go: upstreams tried in order, and the PROXY header they read.

    A plain mapping has one route, its default. A routed listener (443 shared with a web
    server) has one per word of the command line, chosen per session by the client's server
    name (see Router); `matches` are the MATCH items of the word, none for the default.
    """

    __slots__ = ("matches", "upstreams", "proxy", "header", "spec")

    def __init__(self, matches, upstreams, proxy, spec):
        self.matches = matches      # ["mail.example.com", "*.example.com", "alpn:acme-tls/1"]
        self.upstreams = upstreams  # [(host, port)], host without brackets
        self.proxy = proxy          # "v2", "v1", "off", or None: --proxy-protocol
        self.header = None          # the header function, set when the server starts
        self.spec = spec


class Mapping:
    """One listen address, the routes its connections take, plus its counters."""

    __slots__ = ("bind", "port", "routes", "default", "router", "spec", "label", "protocol",
                 "active", "sessions", "failed", "up", "down", "refused", "routed", "unrouted",
                 "local", "egress")

    def __init__(self, bind, port, upstreams, spec="", protocol=None, matches=(), proxy=None):
        self.bind = bind            # None (all interfaces) or an IP address without brackets
        self.port = port
        route = Route(list(matches), upstreams, proxy, spec)
        self.routes = [route]
        self.default = None if matches else route   # where an unmatched session goes
        self.router = None          # a Router once a route has MATCH items (finish())
        self.spec = spec
        self.label = format_address(bind or "", port)
        self.protocol = protocol or PORT_PROTOCOLS.get(port, "tcp")     # what clients speak
        self.active = self.sessions = self.failed = self.up = self.down = 0
        self.refused = {}           # reason -> clients refused at accept
        self.routed = {}            # MATCH item (or "default") -> sessions it routed
        self.unrouted = {}          # why -> sessions closed before a route was found
        self.local = None           # (ip, port) every client reaches, when bound to one address
        self.egress = None          # an egress listener: EgressPolicy (VPS) or "via" (mail host)

    @property
    def upstreams(self):
        """Every upstream of every route, in order, once each."""
        found = []
        for route in self.routes:
            found += [u for u in route.upstreams if u not in found]
        return found

    def __repr__(self):
        return "Mapping(%r, %r, %r)" % (self.bind, self.port, self.upstreams)

    def add_route(self, other, protocol_given):
        """Take the route of `other`, a word for the same listen address (ConfigError when
        the two cannot share it)."""
        route = other.routes[0]
        if protocol_given and other.protocol != self.protocol:
            if self.protocol == PORT_PROTOCOLS.get(self.port, "tcp"):
                self.protocol = other.protocol      # the first word did not say; this one does
            else:
                raise ConfigError("%r and %r listen on %s with different protocols (%s, %s); "
                                  "the routes of one listener speak one" % (
                                      self.spec, other.spec, self.label, self.protocol,
                                      other.protocol))
        if not route.matches:
            if self.default is not None:
                raise ConfigError("%r and %r are both the default route of %s; give one of "
                                  "them @NAME,... (the names it takes)" % (
                                      self.default.spec, other.spec, self.label))
            self.default = route
        for item in route.matches:
            for mine in self.routes:
                if item in mine.matches:
                    raise ConfigError("%r is in both %r and %r; a name goes to one route"
                                      % (item, mine.spec, other.spec))
        self.routes.append(route)

    def finish(self):
        """Build the router once every word is in (ConfigError when the port cannot route)."""
        if self.default is not None and len(self.routes) == 1:
            return
        kind = ROUTE_BY.get(self.protocol)
        if kind is None:
            raise ConfigError(
                "%r routes by name, but port %d speaks %s: %s; route a TLS port (PORT/tls, "
                "443 is https) or an HTTP one (PORT/http)" % (
                    self.routes[0].spec if self.routes[0].matches else self.routes[-1].spec,
                    self.port, self.protocol, "the server speaks first, so there is no name "
                    "to route by" if self.protocol in DIALOGUES else "nothing known to read"))
        for route in self.routes:
            for item in route.matches:
                if item.startswith("alpn:") and kind != "tls":
                    raise ConfigError("%r in %r: ALPN is TLS's; an HTTP listener routes by "
                                      "host and path" % (item, route.spec))
                if "/" in item and not item.startswith("alpn:") and kind != "http":
                    raise ConfigError("%r in %r: a path is HTTP's; a TLS listener routes by "
                                      "server name and alpn:PROTO" % (item, route.spec))
        self.router = Router(kind, self.routes, self.default)


def is_ip(text, family):
    """Is `text` an address of `family` (AF_INET or AF_INET6)?"""
    try:
        socket.inet_pton(family, text)
    except (OSError, ValueError):
        return False
    return True


def format_address(host, port):
    """('::1', 25) -> '[::1]:25'; ('', 25) -> ':25' (every interface)."""
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def parse_port(text, what, spec):
    """A port number 1-65535; raises ConfigError naming `what` and the mapping `spec`."""
    if not DIGITS_RE.match(text):
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
    """'HOST:PORT' or '[V6]:PORT' -> (host, port)."""
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
    """'[BIND:]PORT[/PROTO][@MATCH,...]=HOST:PORT[,HOST:PORT...][/proxy=V]' (or without
    '=...' with a default upstream) -> Mapping. A mistake with one likely meaning (25:host:25,
    the two sides swapped, ';' for ':') is told how to write it."""
    try:
        return read_mapping(text, default_upstream)
    except ConfigError:
        meant = respelling(text, default_upstream)
        if meant is None:
            raise
    raise ConfigError("mapping %r: write it as %s (%s)" % (text, meant.text, meant.why))


Respelling = collections.namedtuple("Respelling", "text why")


def respellings(text):
    """What a mapping that does not parse may have meant, each a Respelling."""
    listen, eq, target = text.partition("=")
    if not eq:                                  # ssh -L style: 25:host:25, BIND:25:host:25
        for at in [i for i, char in enumerate(text) if char == ":"]:
            said = text[:at]
            yield Respelling(said + "=" + text[at + 1:], "%s, '=', then HOST:PORT" % (
                "the listen address" if ":" in said else "a listen port"))
    elif DIGITS_RE.match(target) and ":" in listen:     # HOST:PORT=PORT
        yield Respelling(target + "=" + listen, "the listen port first, then '=' and the "
                         "upstream HOST:PORT")
    if ";" in text:
        yield Respelling(text.replace(";", ":"), "a colon before a port, not ';'")
        yield Respelling(text.replace(";", ","), "a comma between upstreams, not ';'")


def respelling(text, default_upstream):
    """The one Respelling of `text` that parses, or None (none, or several: no guess)."""
    fits = []
    for meant in respellings(text):
        try:
            # whether it is spelt right, not whether an upstream is given: if none is,
            # that is the error the next try says
            read_mapping(meant.text, default_upstream or "mx")
        except ConfigError:
            continue
        if meant.text not in [fit.text for fit in fits]:
            fits.append(meant)
    return fits[0] if len(fits) == 1 else None


def read_mapping(text, default_upstream=None):
    """parse_mapping of the text as written (no guesses at what a mistake meant)."""
    listen, eq, target = text.partition("=")
    listen, at, match_text = listen.partition("@")
    matches = parse_matches(match_text, text) if at else ()
    listen, slash, protocol = listen.partition("/")
    if slash and protocol not in PROTOCOLS:
        raise ConfigError("protocol %r in %r is not one of %s; write it as PORT/PROTO, e.g. "
                          "2525/smtp" % (protocol, text, ", ".join(PROTOCOLS)))
    if "," in listen:
        raise ConfigError("mapping %r names several ports; separate mappings with spaces, "
                          "as in %s" % (text, " ".join(listen.split(","))))
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
    proxy = None
    if not eq:
        if default_upstream is None:
            raise NoUpstream("mapping %r has no upstream; write it as %s=HOST:PORT, or give "
                             "--upstream HOST to forward to the same port there" % (text, text))
        upstreams = [(default_upstream, port)]
    elif not target:
        raise ConfigError("mapping %r has nothing after '='; write it as %s=HOST:PORT, e.g. "
                          "%s=stalwart.tail7b1641.ts.net:%d" % (text, listen, listen, port))
    else:
        head, slash, option = target.rpartition("/")
        if slash and "=" in option:         # HOST:PORT,.../proxy=V
            target = head
        else:
            slash = option = ""
        name, _, value = option.partition("=")
        if slash and (name != "proxy" or value not in PROXY_VERSIONS):
            raise ConfigError("%r in %r is not an option; the one after the upstreams is "
                              "/proxy=v2, /proxy=v1 or /proxy=off" % ("/" + option, text))
        proxy = value if slash else None
        upstreams = [parse_upstream(part, text) for part in target.split(",")]
    return Mapping(bind, port, upstreams, text, protocol or None, matches, proxy)


NAME_RE = re.compile(r"(?:\*\.)?[a-z0-9_](?:[a-z0-9_.-]{0,252})\Z")


def parse_matches(text, spec):
    """The MATCH items after '@', lower-cased: NAME, *.SUFFIX, alpn:PROTO, and (HTTP)
    NAME/PATH, *.SUFFIX/PATH or /PATH."""
    items = []
    for item in text.lower().split(","):
        if item.startswith("alpn:"):
            valid = 5 < len(item) <= 260 and item.isprintable() and " " not in item
        else:
            host, slash, path = item.partition("/")
            valid = (not host or NAME_RE.match(host.rstrip(".")) and ".." not in host) and \
                (not slash or ("/" + path).isprintable() and " " not in path) and \
                (host or slash)
            item = host.rstrip(".") + slash + path
        if not valid:
            raise ConfigError("%r in %r is not a name to route by; write names (mail.example.com),"
                              " wildcards (*.example.com), alpn:PROTO (alpn:acme-tls/1) or, for "
                              "HTTP, NAME/PATH, separated by commas after '@'" % (item, spec))
        if item in items:
            raise ConfigError("%r is twice in %r" % (item, spec))
        items.append(item)
    return items


def refuse_self_loops(mappings):
    """A literal upstream that is one of our own listen addresses would make every session
    connect to the relay itself, again and again: refuse it (ConfigError)."""
    for route in [route for mapping in mappings for route in mapping.routes]:
        for host, port in route.upstreams:
            if literal_address(host, port) is None:
                continue            # a name: checked each time it resolves (Connector)
            own = own_listener(mappings, host, port)
            if own is not None:
                raise ConfigError("upstream %s in %r is this relay's own listen address "
                                  "(%s); point it at the mail server instead"
                                  % (format_address(host, port), route.spec, own.spec))


def own_listener(mappings, ip, port):
    """The mapping that listens on ip:port (an IP address string), or None."""
    for mapping in mappings:
        if mapping.port == port and listens_on(mapping.bind, ip):
            return mapping
    return None


def listens_on(bind, ip):
    """Does a listener bound to `bind` (None = every interface) take connections to `ip`?"""
    ip = plain_ip(ip)
    six = ":" in ip
    if bind is None or bind in ("0.0.0.0", "::"):
        if bind is not None and (":" in bind) != six:
            return False
        return is_local_address(ip)
    if (":" in bind) != six:
        return False
    family = socket.AF_INET6 if six else socket.AF_INET
    return socket.inet_pton(family, bind) == socket.inet_pton(family, ip)


LOCAL_ADDRESSES = {}            # ip -> is it an address of this machine? (asked once each)


def is_local_address(ip):
    """Is `ip` an address of this machine? Loopback always is; else the kernel lets us bind
    a socket to it only if an interface has it. (An IP literal that is not valid: False.)"""
    local = LOCAL_ADDRESSES.get(ip)
    if local is None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((ip, 0))
            local = True
        except (OSError, ValueError, OverflowError):
            local = False
        if len(LOCAL_ADDRESSES) < 1024:
            LOCAL_ADDRESSES[ip] = local
    return local


def overlapping(a, b):
    """Would these two listen addresses collide when both are bound?"""
    if a.port != b.port:
        return False
    families = lambda bind: {4, 6} if bind is None else {6} if ":" in bind else {4}
    if not families(a.bind) & families(b.bind):
        return False
    return a.bind == b.bind or a.bind in (None, "0.0.0.0", "::") or b.bind in (None, "0.0.0.0", "::")


# ----------------------------------------------------------------------------------------------
# Logging: one line per event, key=value; journald priorities under systemd
# ----------------------------------------------------------------------------------------------

ERROR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7
LEVEL_NAMES = {ERROR: "error", WARNING: "warning", NOTICE: "notice", INFO: "info", DEBUG: "debug"}


LOG_BACKLOG = 2000             # lines held for a slow stderr before lines are dropped
LOG_EXIT_WAIT = 2.0            # at exit, how long a blocked stderr may hold the last lines


class Log:
    """Writes lines to stderr: `date time level message`, or `<N>message` for the journal.
    `threshold` is the least important priority written (DEBUG with -v, NOTICE with -q).

    Once start()ed, the loop never writes to stderr itself: a line goes onto `lines` and
    a writer thread writes it out, so a stderr that blocks (a pipe nobody reads, a stalled
    journald) cannot stop the relay. While it blocks, at most LOG_BACKLOG lines wait; the
    ones after are counted, and a line says how many once stderr takes lines again.
    """

    __slots__ = ("threshold", "journal", "mark", "lines", "dropped", "dropped_total", "lock",
                 "wake", "writer")

    def __init__(self):
        self.threshold = INFO
        self.journal = False
        self.mark = ""                  # ' old-pid=N' once another process took over (Reload)
        self.lines = collections.deque()
        self.dropped = 0                # lines dropped since the last word about it (under lock)
        self.dropped_total = 0          # lines dropped since start (for the metrics)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.writer = None

    def configure(self, verbose=False, quiet=False):
        """Set the threshold from -v/-q, and the format from where stderr goes."""
        self.threshold = DEBUG if verbose else NOTICE if quiet else INFO
        self.journal = stderr_is_journal()

    def start(self):
        """From now on, lines are written by a thread of their own."""
        if self.writer is None:
            self.writer = threading.Thread(target=self.write_lines, name="log", daemon=True)
            self.writer.start()

    def __call__(self, priority, message):
        """Write `message` at `priority` (ERROR ... DEBUG), unless it is below the threshold."""
        if priority > self.threshold:
            return
        line = self.format(priority, message)
        if self.writer is None:
            return write_stderr(line)
        lines = self.lines
        if len(lines) >= LOG_BACKLOG:
            with self.lock:
                self.dropped += 1
                self.dropped_total += 1
            return
        lines.append(line)
        if not self.wake.is_set():
            self.wake.set()

    def format(self, priority, message):
        """One line, as __call__ writes it."""
        if self.journal:
            return "<%d>%s%s\n" % (priority, message, self.mark)
        return "%s %s %s%s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), LEVEL_NAMES[priority],
                                  message, self.mark)

    def write_lines(self):
        """The writer thread: write what is queued, many lines per write."""
        lines, wake = self.lines, self.wake
        while True:
            wake.wait()
            wake.clear()
            while lines:
                batch = []
                while lines and len(batch) < 256:
                    batch.append(lines[0])
                    lines.popleft()
                write_stderr("".join(batch))
                if self.dropped:        # stderr takes lines again: say what it missed
                    with self.lock:
                        dropped, self.dropped = self.dropped, 0
                    write_stderr(self.format(WARNING, "log: %d lines dropped while stderr was "
                                             "blocked" % dropped))

    def flush(self, timeout=LOG_EXIT_WAIT):
        """At exit: give the writer a moment to write what is left (never longer)."""
        deadline = time.monotonic() + timeout
        while self.writer is not None and self.lines and time.monotonic() < deadline:
            time.sleep(0.01)


def write_stderr(text):
    """Write all of `text` to file descriptor 2 (blocking; a non-blocking stderr is waited
    for), or nothing if stderr is gone. Never raises."""
    data = text.encode("utf-8", "replace")
    while data:
        try:
            data = data[os.write(2, data):]
        except (BlockingIOError, InterruptedError):
            select_writable(2)
        except OSError:
            return


def select_writable(fd):
    """Wait up to a second for fd to take data (someone made stderr non-blocking)."""
    try:
        select.select([], [fd], [], 1.0)
    except (OSError, ValueError):
        time.sleep(0.1)


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
# Listeners: binding each mapping, or adopting the sockets systemd passed (socket activation)
# ----------------------------------------------------------------------------------------------

SD_LISTEN_FDS_START = 3
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 15, 4  # a dead peer found in ~2 min
KEEPALIVE_OPTIONS = [(getattr(socket, name), value) for name, value in (
    ("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
    ("TCP_KEEPCNT", KEEPALIVE_COUNT)) if hasattr(socket, name)]
# Linux copies these options from a listener to the sockets it accepts: set them once there.
ACCEPTED_INHERIT_OPTIONS = sys.platform.startswith("linux")


class Listener:
    """A listening socket of a mapping: bound here, or passed by systemd or by the process
    this one replaced (`origin`)."""

    __slots__ = ("sock", "mapping", "fd", "family", "origin")

    def __init__(self, sock, mapping, origin=None):
        self.sock = sock
        self.mapping = mapping
        self.fd = sock.fileno()
        self.family = int(sock.family)      # the property builds an enum member on each read
        self.origin = origin                # None (bound here), "from systemd", "handed over"

    def describe(self):
        """Where it listens, as the log says it: '127.0.0.1:25', '[::1]:993', ':25' (dual
        stack) or '[::]:25' (IPv6 only)."""
        host, port = self.sock.getsockname()[:2]
        if self.mapping.bind is None and self.sock.family == socket.AF_INET6:
            host = "[::]" if dual_stack(self.sock) is False else ""
        elif ":" in host:
            host = "[%s]" % host
        return "%s:%d" % (host, port)


def open_listeners(mappings, proxy_protocol):
    """Listeners for every mapping: the sockets systemd or the replaced process passed where
    one has the shape the mapping wants (listen_shapes), else bound here. Each is
    non-blocking and carries the options accepted sockets inherit.
    Raises StartupError when a port cannot be bound or a reload finds a listen address
    changed in a way only a restart can apply, ConfigError when a socket from systemd
    matches no mapping."""
    handed_over = inherited_sockets("TAILWART_LISTENERS")     # a reload: the old process's
    inherited = handed_over or systemd_sockets()
    origin = "handed over" if handed_over else "from systemd"
    listeners = []
    missing = []                # (mapping, shape) that no inherited socket has
    for mapping in mappings:
        for shape in listen_shapes(mapping):
            sock = next((s for s in inherited if socket_shape(s) == shape
                         and s.getsockname()[1] == mapping.port), None)
            if sock is None:
                missing.append((mapping, shape))
                continue
            inherited.remove(sock)
            listeners.append(Listener(sock, mapping, origin))
    for mapping, shape in missing:
        # an inherited socket no mapping took that holds this port on an overlapping
        # address: binding beside it fails with EADDRINUSE, and the program in the way is
        # this relay (a reload keeps the old socket open until the new process is ready)
        clash = next((s for s in inherited if s.getsockname()[1] == mapping.port
                      and shapes_collide(socket_shape(s), shape)), None)
        if clash is not None:
            held = describe_shape(socket_shape(clash), mapping.port)
            wanted = describe_shape(shape, mapping.port)
            if handed_over:
                raise StartupError("the bind address of :%d changed (listening on %s, the "
                                   "settings say %s); restart to apply"
                                   % (mapping.port, held, wanted))
            raise ConfigError("socket %s from systemd is not the %s that mapping %r listens "
                              "on; make the ListenStream= line (and BindIPv6Only=) match it"
                              % (held, wanted, mapping.spec))
        if inherited and not handed_over:
            log(WARNING, "listen addr=%s has no socket from systemd; binding it here"
                % mapping.label)
        listeners.append(Listener(open_shape(shape, mapping.port), mapping))
    for sock in inherited:
        host, port = sock.getsockname()[:2]
        if not handed_over:
            # closing it here would leave it open in systemd, where clients would hang
            raise ConfigError("socket %s from systemd matches no mapping; add a mapping for "
                              "it (e.g. %d=HOST:%d) or remove its ListenStream= line"
                              % (format_address(host, port), port, port))
        log(NOTICE, "listen addr=%s is no longer in the settings; closing it"
            % format_address(host, port))
        sock.close()        # the old process closes its own copy when it hands over
    for listener in listeners:
        sock = listener.sock
        sock.setblocking(False)
        if ACCEPTED_INHERIT_OPTIONS:
            tune_socket(sock)
        mapping = listener.mapping
        local = sock.getsockname()[:2]
        # a mapping with one listener on one address: that address is the header's
        # destination for every client (no getsockname per session)
        mapping.local = (local if local[0] not in ("0.0.0.0", "::")
                         and sum(other.mapping is mapping for other in listeners) == 1 else None)
        if mapping.egress is not None and mapping.egress != "via":
            # the VPS end of egress: each peer's header names where to go; nothing is sent
            upstream, proxy = "from-header", "off"
        else:
            upstream = ",".join(format_address(*u) for u in mapping.upstreams)
            proxy = mapping.routes[0].proxy or proxy_protocol if mapping.router is None \
                else proxy_protocol
        log(NOTICE, "listen addr=%s upstream=%s proxy=%s%s" % (
            listener.describe(), upstream, proxy,
            " (%s)" % listener.origin if listener.origin else ""))
        for route in mapping.routes if mapping.router is not None else ():
            log(NOTICE, "route listen=%s match=%s upstream=%s proxy=%s" % (
                listener.describe(), ",".join(route.matches) or "default",
                ",".join(format_address(*u) for u in route.upstreams),
                route.proxy or proxy_protocol))
    return listeners


# The shape of a listening socket: its family, its address (canonical text) and, for an IPv6
# socket on "::", whether it takes IPv4 too (IPV6_V6ONLY off). Two sockets with one shape and
# port take the same clients; a reload adopts an old socket only if it has the wanted shape.
ListenShape = collections.namedtuple("ListenShape", "family host dual")

IPV6_UNSUPPORTED = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)
IPV6_SUPPORT = {}               # "every interface" -> how this host listens there (asked once)


def ipv6_support():
    """How this host listens on every interface: "dual" (one IPv6 socket takes IPv4 too),
    "separate" (IPv6 sockets cannot take IPv4: one socket per family) or None (no IPv6 at
    all: a kernel booted with ipv6.disable=1, as on many VPS images, or a Python built without
    it). Found once, with a socket on port 0; the relay and --check both follow it."""
    if "every interface" in IPV6_SUPPORT:
        return IPV6_SUPPORT["every interface"]
    support = "dual"
    if not socket.has_ipv6:
        support = None
    else:
        try:
            probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError as e:
            if e.errno not in IPV6_UNSUPPORTED:
                return support          # e.g. out of descriptors: the real bind will say so
            support = None
        else:
            with probe:
                try:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                except OSError:
                    support = "separate"
                try:
                    probe.bind(("::", 0))
                except OSError as e:
                    if e.errno not in IPV6_UNSUPPORTED:
                        return support
                    support = None
    IPV6_SUPPORT["every interface"] = support
    return support


def listen_shapes(mapping):
    """The sockets a mapping listens with: its address; for every interface (no BIND_ADDR)
    one dual-stack socket where the host allows it, else an IPv6 and an IPv4 one, or IPv4
    alone where there is no IPv6. An explicit [::] is IPv6 only, as in nginx, so 0.0.0.0 can
    be bound beside it."""
    if mapping.bind is not None:
        family = socket.AF_INET6 if ":" in mapping.bind else socket.AF_INET
        return [ListenShape(family, canonical_ip(family, mapping.bind), False)]
    support = ipv6_support()
    if support == "dual":
        return [ListenShape(socket.AF_INET6, "::", True)]
    v4 = ListenShape(socket.AF_INET, "0.0.0.0", False)
    return [ListenShape(socket.AF_INET6, "::", False), v4] if support == "separate" else [v4]


def canonical_ip(family, host):
    """An IP address in one spelling ('::0:1' -> '::1'); a scope (%eth0) is dropped."""
    return socket.inet_ntop(family, socket.inet_pton(family, host.partition("%")[0]))


def socket_shape(sock):
    """The ListenShape of a bound socket."""
    family = int(sock.family)
    host = canonical_ip(family, sock.getsockname()[0])
    return ListenShape(family, host, family == socket.AF_INET6 and host == "::"
                       and dual_stack(sock) is True)


def shapes_collide(a, b):
    """Would sockets of these shapes on one port collide (EADDRINUSE)? A wildcard address
    collides with every address of the families it takes."""
    families = lambda shape: {socket.AF_INET6, socket.AF_INET} if shape.dual else {shape.family}
    if not families(a) & families(b):
        return False
    wildcard = ("::", "0.0.0.0")
    return a.host in wildcard or b.host in wildcard or a.host == b.host


def describe_shape(shape, port):
    """A shape as the log names a listener: ':25', '[::]:25', '0.0.0.0:25', '[::1]:25'."""
    if shape.dual:
        return ":%d" % port
    return format_address(shape.host, port)


def bind_listeners(mapping, listen=True):
    """Bound sockets for a mapping (listening, unless `listen` is False: --check), one per
    shape it wants. Raises StartupError(line, errno) as open_listener does."""
    socks = []
    try:
        for shape in listen_shapes(mapping):
            socks.append(open_shape(shape, mapping.port, listen))
    except StartupError:
        for sock in socks:
            sock.close()
        raise
    return socks


def open_shape(shape, port, listen=True):
    """A socket of this shape bound to port (see open_listener)."""
    return open_listener(shape.family, shape.host, port, v6only=not shape.dual, listen=listen)


def open_listener(family, host, port, v6only=True, listen=True):
    """One bound, listening socket. Raises StartupError(line, errno) with the fix in the line."""
    where = format_address("" if host == "::" and not v6only else host, port)    # ':25'

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
        if listen:
            sock.listen(4096)   # the kernel caps it at net.core.somaxconn
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


def dual_stack(sock):
    """True for an IPv6 socket that takes IPv4 too, False for IPv6 only, None if unknown."""
    try:
        return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except (OSError, AttributeError):
        return None


def systemd_sockets():
    """Listening sockets passed by systemd (sd_listen_fds(3)), as socket objects."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)      # not for any child process
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count or 0))
    return [sock for sock in map(tcp_socket, fds) if sock is not None]


def inherited_sockets(variable):
    """The listening sockets named in an environment variable ("5,6,7") by the process
    that started this one (a reload), as socket objects. The variable is removed."""
    fds = os.environ.pop(variable, "")
    return [sock for sock in (tcp_socket(int(fd)) for fd in fds.split(",") if fd.isdigit())
            if sock is not None]


def tcp_socket(fd):
    """A socket object for an inherited descriptor, or None (and a warning) if it is not a
    TCP socket."""
    # Python < 3.7 does not detect a descriptor's family: ask the kernel (SO_DOMAIN)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        family = probe.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_DOMAIN", 39))
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    except OSError:
        family = kind = None
    probe.detach()
    if kind != socket.SOCK_STREAM or family not in (socket.AF_INET, socket.AF_INET6):
        log(WARNING, "descriptor %d passed to us is not a TCP socket; ignoring it" % fd)
        return None
    return socket.socket(family, socket.SOCK_STREAM, 0, fd)


def tune_socket(sock, keepalive=True):
    """TCP_NODELAY: pass small writes (SMTP replies) on at once, as the peers wrote them.
    SO_OOBINLINE: a byte sent as TCP urgent data is relayed in its place in the stream, as
    RFC 6093 advises, instead of being dropped (a relay cannot pass urgency on).
    Keepalive (see keep_alive), unless the caller sets it later."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    if keepalive:
        keep_alive(sock)


def keep_alive(sock):
    """Keepalive: find peers that vanished from long silent sessions (IMAP IDLE) and free
    them. An upstream socket gets it from the sweep, once its session has lived through one
    (Timeouts.sweep): four setsockopt calls per connection are ~2 us of CPU that a session
    of a few milliseconds never needs, and the first probe is minutes away anyway."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in KEEPALIVE_OPTIONS:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# Accept: batches fair to live sessions, the connection cap, the out-of-descriptors pause
# ----------------------------------------------------------------------------------------------

ACCEPT_BATCH = 64               # accepts per listener per loop turn: fair to live sessions
ACCEPT_PAUSE = 0.5              # on EMFILE stop accepting this long, as nginx does
CAP_REGROW = 3.0                # after a shortage, the cap doubles this often up to the start's
RESERVED_FDS = 24               # stdio, selector, wake-up pipe, notify socket, resolver...
LATER_FDS = 20                  # opened after start, beside what is open then: the metrics
                                # port and its 8 scrapes, resolver lookups, the notify socket,
                                # a reload's channel (24 + 2 a listener in all, as before)
PIPE_SIZE = 256 * 1024          # a splice pipe's size, and the most one splice moves:
                                # 0.29 CPU s/GB against 0.52 with the default 64 KiB (README)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)    # named in fcntl from Python 3.10
MAX_PIPES = 256                 # splice pipes open at once, at most (2 descriptors each):
                                # only stalled spliced directions hold one (64 MiB at most)
SESSION_MEMORY = 2 * 64 * 1024 + 4096   # the most a session holds: 2 x CHUNK (see Relay)
WARN_INTERVAL = 10.0            # at most one "out of file descriptors" line this often
ACCEPT_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}   # that client left already
FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


CLIENTS_MAX = 65536             # idle clients kept at most (~330 bytes each: 21 MiB at most)
CLIENT_WINDOW = 60.0            # the per-client rate is counted per minute
DENIED, EXEMPT = "denied", "exempt"
BY_ADDRESS = "by-address"       # a /64 the lists split: each address is judged on its own


class Client:
    """One client's entry in the per-client table."""

    __slots__ = ("key", "open", "minute_began", "this_minute", "refusals", "verdict")

    def __init__(self, key, now, verdict):
        self.key = key
        self.open = 0                   # its sessions open now (exempt ones are not counted)
        self.minute_began = now
        self.this_minute = 0            # connections since minute_began
        self.refusals = 0               # refusals since minute_began (only the first is logged)
        self.verdict = verdict          # DENIED, EXEMPT, None, or BY_ADDRESS


class Clients:
    """Per-client limits and the allow/deny lists, checked at accept in O(1).

    A client is an IPv4 address or an IPv6 /64 (one host can hold a whole /64): the unit
    the limits count. The lists judge the whole address: a /64 gets one verdict, worked
    out once and kept on its entry so the CIDR lists cost nothing on later accepts, unless
    a rule narrower than /64 lies inside it; then each of its addresses is judged on
    every accept (BY_ADDRESS).

    The table is bounded without ever failing open: a new client always gets an entry.
    Entries with nothing open are kept in `idle`, in the order they became idle; past
    CLIENTS_MAX entries the oldest idle one is forgotten (O(1)), so a flood of new
    addresses costs the clients it pushes out their minute's counts, never a client its limit.
    Entries with sessions open are never dropped: when every entry has one, the table
    grows past CLIENTS_MAX, bounded by the connection cap (one session per such entry).
    """

    __slots__ = ("per_client", "rate", "exempt", "deny", "allow", "split", "entries", "idle",
                 "full_warned")

    def __init__(self, options):
        self.per_client = options.per_client
        self.rate = options.per_client_rate
        self.exempt, self.deny, self.allow = options.exempt, options.deny, options.allow
        if self.exempt is None:         # this machine itself: a local webmail, monitoring
            self.exempt = [network("127.0.0.0/8"), network("::1")]
        # the /64s a rule narrower than /64 lies in: only there do addresses differ
        self.split = {net.network_address.packed[:8] for net in self.exempt + self.deny +
                      self.allow if net.version == 6 and net.prefixlen > 64}
        self.entries = {}               # key -> Client
        self.idle = collections.OrderedDict()   # key -> Client with nothing open, oldest first
        self.full_warned = -WARN_INTERVAL

    @staticmethod
    def key(ip):
        """The client an address belongs to: itself (IPv4), or its /64 (IPv6)."""
        ip = plain_ip(ip)
        if ":" not in ip:
            return ip
        return socket.inet_pton(socket.AF_INET6, ip)[:8]

    def verdict(self, ip):
        """denied, exempt or None for one address, from the lists."""
        import ipaddress
        address = ipaddress.ip_address(plain_ip(ip))
        if any(address in net for net in self.deny) or \
                (self.allow and not any(address in net for net in self.allow)):
            return DENIED
        if any(address in net for net in self.exempt):
            return EXEMPT
        return None

    def admit(self, ip, now):
        """(entry or None, refusal reason or None) for a client connecting now. The entry
        counts the session (release() it when the session ends); None: nothing to count
        (an exempt client), or refused."""
        key = self.key(ip)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.add(key, ip, now)
        if now - entry.minute_began >= CLIENT_WINDOW:
            entry.minute_began, entry.this_minute, entry.refusals = now, 0, 0
        verdict = entry.verdict
        if verdict is BY_ADDRESS:
            verdict = self.verdict(ip)
        if verdict is DENIED:
            return None, "denied"
        entry.this_minute += 1
        if verdict is EXEMPT:
            return None, None           # never limited, and not counted against its /64
        if self.per_client and entry.open >= self.per_client:
            return None, "per-client"
        if self.rate and entry.this_minute > self.rate:
            return None, "per-client-rate"
        if not entry.open:
            del self.idle[key]
        entry.open += 1
        return entry, None

    def release(self, entry):
        """A session admit() counted on `entry` has ended."""
        entry.open -= 1
        if not entry.open:
            self.idle[entry.key] = entry

    def add(self, key, ip, now):
        """A new client's entry, making room first by forgetting the oldest idle one."""
        tracked = len(self.entries)
        if tracked >= CLIENTS_MAX:
            if self.idle:
                self.entries.pop(self.idle.popitem(last=False)[0])
                message = "the oldest with nothing open are forgotten"
            else:
                message = "all have sessions open; tracking more (the connection cap bounds it)"
            if now - self.full_warned >= WARN_INTERVAL:
                self.full_warned = now
                log(WARNING, "clients: %d tracked; %s" % (tracked, message))
        verdict = BY_ADDRESS if key in self.split else self.verdict(ip)
        entry = self.entries[key] = self.idle[key] = Client(key, now, verdict)
        return entry

    def sweep(self, now):
        """Drop the clients with nothing open whose minute is over (O(idle), once a minute)."""
        old = now - CLIENT_WINDOW
        for key in [key for key, entry in self.idle.items() if entry.minute_began < old]:
            del self.idle[key]
            del self.entries[key]


class Acceptor:
    """Owns the listeners and decides when to accept.

    It accepts in batches of ACCEPT_BATCH per event (fair to live sessions), stops polling
    the listeners while `max_sessions` are open (clients then wait in the kernel's listen
    backlog; the server resumes it when a session ends), and stops for ACCEPT_PAUSE when
    the process runs out of descriptors, instead of spinning on a backlog it cannot take.
    """

    __slots__ = ("server", "listeners", "by_fd", "max_sessions", "cap", "accepting",
                 "warned_at")

    def __init__(self, server, listeners, max_sessions):
        self.server = server
        self.listeners = listeners
        self.by_fd = {listener.fd: listener for listener in listeners}
        self.max_sessions = max_sessions    # now: lowered while descriptors ran short
        self.cap = max_sessions             # as computed at start (capacity)
        self.accepting = False
        self.warned_at = -WARN_INTERVAL

    def resume(self, _=None):
        """Poll the listeners again, unless stopping or full."""
        server = self.server
        if self.accepting or server.stopping or len(server.sessions) >= self.max_sessions:
            return
        for listener in self.listeners:
            server.selector.register(listener.fd, READ, self)
        self.accepting = True

    def pause(self):
        """Stop polling the listeners; connecting clients wait in the backlog."""
        if self.accepting:
            for listener in self.listeners:
                self.server.selector.unregister(listener.fd)
            self.accepting = False

    def close(self):
        """Stop for good (the drain): the ports are released."""
        self.pause()
        for listener in self.listeners:
            listener.sock.close()

    def on_event(self, fd, mask):
        """A listener is readable: accept until its backlog is empty or a batch is done."""
        if not self.accepting:
            return                      # paused while this event was waiting in the batch
        listener = self.by_fd[fd]
        sock, mapping, server = listener.sock, listener.mapping, self.server
        sessions = server.sessions
        for _ in range(ACCEPT_BATCH):
            if not self.accepting:
                return                  # the last client found no descriptor (Server.starve)
            if len(sessions) >= self.max_sessions:
                self.pause()            # resumed when a session ends
                self.throttled_warning("max connections (%d) reached; new clients wait in "
                                       "the listen backlog" % self.max_sessions)
                return
            try:
                fd, peer = sock._accept()   # socket.accept() minus its Python wrapper
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in ACCEPT_GONE:
                    continue            # that client is gone already; the next one may not be
                self.out_of_fds("accept on %s" % mapping.label, e)
                return
            client = _socket.socket(listener.family, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            if not ACCEPTED_INHERIT_OPTIONS:
                tune_socket(client)
            server.start_session(mapping, client, peer)

    def out_of_fds(self, what, error):
        """Out of descriptors or memory: stop polling the listeners for a moment, so the loop
        does not spin on a backlog it cannot take (HAProxy and nginx do the same). `error`
        None: `what` says it all."""
        self.pause()
        self.server.timers.call_later(ACCEPT_PAUSE, self.resume)
        self.throttled_warning("%s%s; pausing accepts for %gs" % (
            what, "" if error is None else ": " + error.strerror, ACCEPT_PAUSE))

    def throttled_warning(self, message):
        """Log a warning, at most one per WARN_INTERVAL: a full server says so once, not per
        client."""
        now = self.server.now
        if now - self.warned_at >= WARN_INTERVAL:
            self.warned_at = now
            log(WARNING, message)


def capacity(listeners, wanted=None):
    """(sessions, pipes): how many sessions may be open at once, and splice pipes beside them.

    Every session needs two descriptors (client and upstream) and may hold 2 x CHUNK of
    data; a client that cannot be given both is never accepted (it waits in the backlog).
    So the cap is what the open-file limit allows after the descriptors open now (stdio, the
    listeners, the loop's own, and any a parent left open to us: counted, not guessed), those
    opened later (LATER_FDS) and the pipes (a sixteenth of the rest, MAX_PIPES at most), and,
    unless --max-connections says otherwise, what half the memory this process may use holds
    once every pipe is full. --max-connections above the descriptor cap is lowered to it,
    with a warning. Should descriptors run out anyway, Server.starve() lowers it further.
    """
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource else 512
    if limit == getattr(resource, "RLIM_INFINITY", -1):
        limit = 1 << 20
    held = open_fds()
    reserved = RESERVED_FDS + 2 * listeners
    if held is not None:
        reserved = max(reserved, held + LATER_FDS)
    spare = max(0, limit - reserved)
    pipes = min(MAX_PIPES, spare // 32)
    by_fds = max(1, (spare - 2 * pipes) // 2)
    if wanted:
        if wanted > by_fds:
            log(WARNING, "max-connections=%d is more than the open-file limit (%d) allows with "
                "%d descriptors open: out of file descriptors past %d sessions; using %d (raise "
                "it with ulimit -n or LimitNOFILE=)" % (wanted, limit, held or 0, by_fds, by_fds))
        return min(wanted, by_fds), pipes
    budget = memory_budget()
    by_memory = max(0, budget - pipes * PIPE_SIZE) // SESSION_MEMORY if budget else by_fds
    return max(1, min(by_fds, by_memory)), pipes


def memory_budget():
    """Half of the memory this process may use: physical memory, or its cgroup's limit
    (systemd's MemoryMax=, a container) when lower. None when unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    paths = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::/"):
                    paths.append("/sys/fs/cgroup%s/memory.max" % line[3:].strip().rstrip("/"))
    except OSError:
        pass
    for path in paths:
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total // 2


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


# ----------------------------------------------------------------------------------------------
# Routing: a shared port (443 with a web server) -> the route its client's server name picks
# ----------------------------------------------------------------------------------------------
#
# Without terminating TLS: the relay reads the ClientHello (RFC 8446 4.1.2; RFC 6066 section 3
# server_name; RFC 7301 ALPN) or, on plain HTTP, the first request's head (RFC 9112), keeps
# every byte it read and sends them on, behind the route's header, once the route is known.
# What a session may hold meanwhile is bounded (PEEK_LIMIT), and so is the time (--peek-timeout).

HELLO_LIMIT = 16 * 1024         # the ClientHello message, at most (Python's: 517 bytes)
HELLO_RECORDS = 64              # the TLS records it may span, at most
PEEK_LIMIT = HELLO_LIMIT + 512  # bytes read to find it or an HTTP head: + record headers
DEFAULT_PEEK_TIMEOUT = 5.0      # HAProxy's usual `tcp-request inspect-delay 5s`
TLS_HANDSHAKE, TLS_CLIENT_HELLO = 22, 1
EXT_SERVER_NAME, EXT_ALPN = 0, 16
# the fatal TLS alert unrecognized_name (RFC 6066 section 3): "no site of that name here"
TLS_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"
REQUEST_START_RE = re.compile(br"[!#$%&'*+.^_`|~0-9A-Za-z-]{0,20}(?: |\Z)")   # METHOD SP
HEAD_END_RE = re.compile(br"\r?\n\r?\n")
PEEKED_NAME_RE = re.compile(r"[a-z0-9_-][a-z0-9_.-]{0,252}\Z")
# what a client that cannot be routed hears, by how the peek ended (HTTP: a status line; TLS:
# an alert where one fits, else a close)
HTTP_ANSWERS = {status: ("HTTP/1.1 %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                         % status).encode() for status in (
    "400 Bad Request", "408 Request Timeout", "421 Misdirected Request",
    "431 Request Header Fields Too Large")}


class Router:
    """A routed listener's rules: the server name (TLS SNI, or the HTTP Host) -> a route.

    The most specific rule wins: alpn:PROTO (TLS) or a path (HTTP, the longest first), then
    the exact name, then the longest *.SUFFIX wildcard, then the default route (a word with
    no '@'), if any. `kind` is "tls" or "http": what parse() reads.
    """

    __slots__ = ("kind", "names", "wildcards", "extras", "default")

    def __init__(self, kind, routes, default):
        self.kind = kind
        self.names = {}             # name -> (route, item)
        self.wildcards = []         # [(".example.com", route, item)], the longest first
        self.extras = []            # [(proto, None, route, item)] or [(path, host, route, item)]
        self.default = default
        for route in routes:
            for item in route.matches:
                if item.startswith("alpn:"):
                    self.extras.append((item[5:], None, route, item))
                elif "/" in item:
                    host, _, path = item.partition("/")
                    self.extras.append(("/" + path, host or None, route, item))
                elif item.startswith("*."):
                    self.wildcards.append((item[1:], route, item))
                else:
                    self.names[item] = (route, item)
        self.wildcards.sort(key=lambda rule: -len(rule[0]))
        if kind == "http":
            self.extras.sort(key=lambda rule: -len(rule[0]))

    def reader(self):
        """A new session's parser of what its client sends first (see HelloReader and
        HeadReader): read(data) -> (name or None, ALPN list or request path) once `data`
        holds the whole ClientHello or request head; None while it does not; ValueError when
        it never will."""
        return HelloReader() if self.kind == "tls" else HeadReader()

    def pick(self, name, extra):
        """(route, the item that matched) for a server name; (None, '-') when no route
        takes it."""
        for value, host, route, item in self.extras:
            if (value in extra if self.kind == "tls" else extra.startswith(value)) and \
                    (host is None or name is not None and name_matches(host, name)):
                return route, item
        if name is not None:
            found = self.names.get(name)
            if found is not None:
                return found
            for suffix, route, item in self.wildcards:
                if name.endswith(suffix):
                    return route, item
        if self.default is not None:
            return self.default, "default"
        return None, "-"


def name_matches(pattern, name):
    """Does `name` match a rule's name: itself, or *.SUFFIX (any depth below SUFFIX)?"""
    return name.endswith(pattern[1:]) if pattern.startswith("*.") else name == pattern


def peeked_name(raw):
    """A server name as sent (bytes) -> lower-case text without a trailing dot, or None when it
    is no host name (then only the default route can take it)."""
    name = raw.decode("ascii", "replace").lower().rstrip(".")
    return name if PEEKED_NAME_RE.match(name) else None


class HelloReader:
    """The ClientHello at the start of a TLS stream, read as it comes: each call looks only at
    what arrived since the last one (a record is copied once, when it is whole), so a hello cut
    into one-byte segments or records costs what it costs in one piece. The handshake message
    may span several records (RFC 8446 5.1); more than HELLO_RECORDS is refused: real clients
    use one (two past 16 KiB; a few where a tool cuts the hello to dodge inspection)."""

    __slots__ = ("pos", "message", "need")

    def __init__(self):
        self.pos = 0                    # where the next record starts in the stream
        self.message = bytearray()      # the handshake bytes of the records read so far
        self.need = None                # the whole message's length, once its header is in

    def read(self, data):
        """(server name or None, [ALPN protocols]) once the whole ClientHello is in `data`
        (the stream from its first byte, grown since the last call); None until then.
        ValueError when it is not a TLS handshake, or the ClientHello is malformed, over
        HELLO_LIMIT or over HELLO_RECORDS records."""
        if data and data[0] != TLS_HANDSHAKE:
            raise ValueError("not a TLS ClientHello")
        message = self.message
        while True:
            pos = self.pos
            if len(data) < pos + 5:
                return None
            kind, major, length = data[pos], data[pos + 1], data[pos + 3] << 8 | data[pos + 4]
            if kind != TLS_HANDSHAKE or major != 3 or not 0 < length <= 16384:
                raise ValueError("not a TLS ClientHello" if pos == 0 else
                                 "a record that is not the ClientHello's")
            if self.need is None:       # the message's 4-byte header, from a part record too
                head = message + data[pos + 5:pos + 5 + min(length, 4 - len(message))]
                if len(head) == 4:
                    self.need = self.message_length(head)
            if len(data) < pos + 5 + length:
                return None             # the rest of the record is to come (nothing copied)
            message += data[pos + 5:pos + 5 + length]
            self.pos = pos + 5 + length
            if self.need is not None and len(message) >= self.need:
                try:
                    return hello_fields(bytes(message[4:self.need]))
                except (struct.error, IndexError):
                    raise ValueError("a malformed ClientHello")
            records = (self.pos - len(message)) // 5
            if records >= HELLO_RECORDS:
                raise ValueError("a ClientHello in over %d records" % HELLO_RECORDS)

    @staticmethod
    def message_length(head):
        """A handshake message's length with its header (RFC 8446 4), if a ClientHello."""
        if head[0] != TLS_CLIENT_HELLO:
            raise ValueError("a TLS handshake that does not start with a ClientHello")
        need = 4 + (head[1] << 16 | head[2] << 8 | head[3])
        if need > HELLO_LIMIT + 4:
            raise ValueError("a ClientHello of %d bytes, over %d" % (need - 4, HELLO_LIMIT))
        return need


def client_hello(data):
    """(server name or None, [ALPN protocols]) of the ClientHello at the start of `data`, read
    at once (HelloReader.read)."""
    return HelloReader().read(data)


def hello_fields(message):
    """(server name or None, [ALPN protocols]) of a ClientHello message's body."""
    pos = 2 + 32                            # legacy_version, random
    pos += 1 + message[pos]                 # legacy_session_id
    pos += 2 + struct.unpack_from("!H", message, pos)[0]    # cipher_suites
    pos += 1 + message[pos]                 # legacy_compression_methods
    if pos > len(message):
        raise IndexError
    name, protocols = None, []
    if pos == len(message):
        return name, protocols              # no extensions (SSL 3-style)
    end = pos + 2 + struct.unpack_from("!H", message, pos)[0]
    pos += 2
    if end > len(message):
        raise IndexError
    while pos + 4 <= end:
        kind, length = struct.unpack_from("!HH", message, pos)
        body = message[pos + 4:pos + 4 + length]
        pos += 4 + length
        if len(body) != length:
            raise IndexError
        if kind == EXT_SERVER_NAME:         # server_name_list: (type 0 = host_name, name)
            at = 2
            while at + 3 <= len(body):
                size = struct.unpack_from("!H", body, at + 1)[0]
                if body[at] == 0:
                    name = peeked_name(body[at + 3:at + 3 + size])
                    break
                at += 3 + size
        elif kind == EXT_ALPN:              # protocol_name_list: (length, name)...
            at = 2
            while at < len(body):
                size = body[at]
                protocols.append(body[at + 1:at + 1 + size].decode("ascii", "replace"))
                at += 1 + size
    return name, protocols


class HeadReader:
    """The first HTTP request's head, read as it comes: each call searches only the bytes that
    arrived since the last one for the blank line that ends the head (RFC 9112 2.1)."""

    __slots__ = ("searched",)

    def __init__(self):
        self.searched = 0               # bytes of the stream already searched for the end

    def read(self, data):
        """(host or None, path) once `data` (the stream from its first byte, grown since the
        last call) holds the whole head; None until then; ValueError when it is no HTTP
        request, or a malformed one (see request_fields)."""
        if not REQUEST_START_RE.match(data):        # looks at 21 bytes at most
            raise ValueError("not an HTTP request")
        # the end is \r?\n\r?\n: one that ends in the new bytes starts at most 3 before them
        end = HEAD_END_RE.search(data, max(0, self.searched - 3))
        self.searched = len(data)
        if end is None:
            return None
        return request_fields(bytes(data[:end.start()]).decode("latin-1"))


def request_head(data):
    """(host or None, path) of the HTTP request head at the start of `data`, read at once
    (HeadReader.read)."""
    return HeadReader().read(data)


def request_fields(head):
    """(host or None, path) of a request head (without its blank line). The host is the
    Host field's, or the authority of an absolute-form target (RFC 9112 3.2.2); the path is
    the target with its dot segments removed, so a path rule sees where the request goes.
    ValueError for what RFC 9112 says a server must answer with 400: a request line not of
    three words, a field line folded (5.2), without a colon or with white space before it
    (5.1), two Host fields, or none in an HTTP/1.1 request (3.2)."""
    lines = head.split("\n")
    parts = lines[0].rstrip("\r").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request line")
    hosts = []
    for line in lines[1:]:
        line = line.rstrip("\r")
        if line[:1] in (" ", "\t"):
            raise ValueError("a folded header line (obsolete line folding)")
        field, colon, value = line.partition(":")
        if not colon or not field or field != field.strip():
            raise ValueError("a malformed header line")
        if field.lower() == "host":
            hosts.append(value.strip())
    if len(hosts) > 1:
        raise ValueError("%d Host fields" % len(hosts))
    target, host = parts[1], hosts[0] if hosts else None
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        authority, slash, path = rest.partition("/")
        host, target = authority, slash + path or "/"
    elif host is None and parts[2] != "HTTP/1.0":
        raise ValueError("an HTTP/1.1 request without Host")
    if host is not None:
        host = host.rpartition("@")[2]
        if host.startswith("["):
            host = host.partition("]")[0] + "]"
        elif host.rpartition(":")[2].isdigit() or host.endswith(":"):
            host = host.rpartition(":")[0]
        host = peeked_name(host.encode("latin-1"))
    return host, without_dot_segments(target)


def without_dot_segments(target):
    """A request target's path with its . and .. segments (also written %2e) removed, as the
    server will read it (RFC 3986 5.2.4), and the query kept: /a/../b?x -> /b?x."""
    path, query, rest = target.partition("?")
    if "." not in path and "%" not in path:
        return target
    out = []
    segments = re.sub("%2[eE]", ".", path).split("/")
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")
    return segments[0] + "/" + "/".join(out) + query + rest


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
    src_ip = plain_ip(src[0])
    # everything but the client's part, made once per local address (a relay has a few)
    fixed = V2_DESTINATIONS.get(dst)
    if fixed is None:
        fixed = v2_destination(dst)
    if (":" in src_ip) != fixed.ipv6:
        # UNSPEC with PROXY: the receiver must accept the connection and use its own address
        return V2_SIGNATURE + struct.pack("!BBH", V2_VERSION_PROXY, V2_UNSPEC, 0)
    return b"".join((fixed.prefix, socket.inet_pton(fixed.family, src_ip), fixed.packed_ip,
                     struct.pack("!HH", src[1], fixed.port)))


class V2Destination:
    """The part of a v2 header that depends only on the address the client connected to."""

    __slots__ = ("ipv6", "family", "prefix", "packed_ip", "port")

    def __init__(self, dst):
        dst_ip = plain_ip(dst[0])
        self.ipv6 = ":" in dst_ip       # a TCP6 header: the client's address must be IPv6 too
        self.family = socket.AF_INET6 if self.ipv6 else socket.AF_INET
        # signature, version/command, family/transport, length of the address block
        self.prefix = V2_SIGNATURE + struct.pack(
            "!BBH", V2_VERSION_PROXY, V2_TCP6 if self.ipv6 else V2_TCP4, 36 if self.ipv6 else 12)
        self.packed_ip = socket.inet_pton(self.family, dst_ip)
        self.port = dst[1]


V2_DESTINATIONS = {}            # dst (ip, port, ...) -> v2_destination(dst)
V2_DESTINATIONS_MAX = 256       # a wildcard listener on many local addresses: the rest uncached


def v2_destination(dst):
    """The V2Destination of `dst` (an (ip, port, ...) tuple), kept for the next header."""
    fixed = V2Destination(dst)
    if len(V2_DESTINATIONS) < V2_DESTINATIONS_MAX:
        V2_DESTINATIONS[dst] = fixed
    return fixed


HEADERS = {"v2": proxy_header_v2, "v1": proxy_header_v1, "off": None}


# ----------------------------------------------------------------------------------------------
# Resolver: getaddrinfo() in worker threads, answers posted back to the event loop
# ----------------------------------------------------------------------------------------------

DEFAULT_DNS_TTL = 30.0          # getaddrinfo() tells no TTL; re-resolve this often
STALE_LIMIT = 86400.0           # serve an expired answer this long at most (RFC 8767: 1-3 days)
RESOLVER_THREADS = 4
INFINITY = float("inf")


class Answer:
    """A cached answer for one name: its addresses, and until when it is fresh (used as it
    is) and usable (served stale while a new lookup runs). An IP literal's never expires."""

    __slots__ = ("fresh_until", "addrs", "by_port", "usable_until")

    def __init__(self, fresh_until, addrs, usable_until):
        self.fresh_until = fresh_until
        self.addrs = addrs              # [(family, sockaddr)] as getaddrinfo() gave them
        self.by_port = {}               # port -> addrs with that port (see with_port)
        self.usable_until = usable_until

    def with_port(self, port):
        """The addresses with `port` set, made once per port and shared by every session
        (a sockaddr tuple per session would cost memory for nothing)."""
        addrs = self.by_port.get(port)
        if addrs is None:
            addrs = self.by_port[port] = [(family, (sockaddr[0], port) + sockaddr[2:])
                                          for family, sockaddr in self.addrs]
        return addrs


class Resolver:
    """Resolves upstream names off the event loop and caches the answers.

    An answer younger than `ttl` is used at once. An older one is still used at once
    (serve-stale, RFC 8767), up to STALE_LIMIT, while a worker thread looks the name up
    again in the background: a name server that goes silent delays no session. With no
    usable answer, the caller waits for the lookup. Lookups of one name run once at a
    time. A worker thread posts each answer to `done` and wakes the loop, which calls
    dispatch(); whatever getaddrinfo() raises becomes that lookup's error, so a worker
    never dies. Each caller passes a `tag` that comes back with its answer: a session
    tells an answer for its current attempt from a late one for an earlier attempt.
    """

    def __init__(self, wake, ttl=DEFAULT_DNS_TTL):
        self.wake = wake
        self.ttl = ttl
        self.cache = {}                 # host -> Answer
        self.waiting = {}               # host -> [(port, callback, tag)]
        self.in_flight = {}             # host -> when its lookup began
        self.failures = {}              # host -> lookups that failed (stale answer or not)
        self.jobs = queue.Queue()
        self.done = collections.deque()
        self.threads = []

    def resolve(self, host, port, callback, tag):
        """Call callback(tag, addrs, error) from the loop: now if an answer is cached,
        else once the lookup ends. `addrs` is a list of (family, sockaddr) with `port` in
        each sockaddr."""
        hit = self.cache.get(host)
        if hit is None:
            literal = literal_address(host, 0)
            if literal is not None:
                hit = self.cache[host] = Answer(INFINITY, [literal], INFINITY)
        if hit is not None:
            if hit.fresh_until == INFINITY:     # an IP literal: no clock, no lookup
                return callback(tag, hit.with_port(port), None)
            now = time.monotonic()
            if hit.fresh_until <= now < hit.usable_until:
                self.look_up(host)          # in the background; this session takes the old answer
                log(DEBUG, "resolve host=%s stale=yes age=%ds" % (
                    host, now - hit.fresh_until + self.ttl))
            if now < hit.usable_until:
                return callback(tag, hit.with_port(port), None)
        self.waiting.setdefault(host, []).append((port, callback, tag))
        self.look_up(host)

    def look_up(self, host):
        """Ask a worker thread for `host`, unless a lookup of it is under way."""
        if host in self.in_flight:
            return
        self.in_flight[host] = time.monotonic()
        if len(self.threads) < RESOLVER_THREADS and len(self.in_flight) > len(self.threads):
            thread = threading.Thread(target=self.work, name="resolver", daemon=True)
            thread.start()
            self.threads.append(thread)
        self.jobs.put(host)

    def work(self):
        """A worker thread: look names up for ever, posting each answer to `done`."""
        while True:
            host = self.jobs.get()
            try:
                infos = socket.getaddrinfo(host, 0, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                result = ([(info[0], info[4]) for info in infos], None)
            except Exception as e:      # the lookup's error, whatever it is: never die here
                result = (None, getattr(e, "strerror", None) or "%s: %s" % (type(e).__name__, e))
            self.done.append((host, result))
            self.wake()

    def expire(self):
        """Treat every cached answer as expired: the next use looks the name up again."""
        for answer in self.cache.values():
            if answer.fresh_until != INFINITY:
                answer.fresh_until = 0.0

    def warm(self, hosts):
        """Look the upstream names up once at start: fills the cache, and the admin sees
        the addresses (or the error) in the log."""
        for host in hosts:
            if literal_address(host, 0) is None:
                self.resolve(host, 0, log_resolved, host)

    def dispatch(self):
        """Deliver finished lookups to those waiting for them (called from the loop)."""
        while self.done:
            host, (addrs, error) = self.done.popleft()
            began = self.in_flight.pop(host, None)
            now = time.monotonic()
            answer = None
            if addrs:
                answer = self.cache[host] = Answer(now + self.ttl, addrs,
                                                   now + self.ttl + STALE_LIMIT)
                if log.threshold >= DEBUG:
                    log(DEBUG, "resolve host=%s addresses=%s secs=%.3f" % (
                        host, ",".join(sorted({sockaddr[0] for _, sockaddr in addrs})),
                        now - (began or now)))
            else:
                self.failures[host] = self.failures.get(host, 0) + 1
                stale = self.cache.get(host)
                if stale is not None and now < stale.usable_until:
                    log(WARNING, "resolve host=%s error=%r; serving the stale answer, %ds old"
                        % (host, error, now - stale.fresh_until + self.ttl))
                    # ask again after a third of the TTL, not for every new session
                    stale.fresh_until = now + self.ttl / 3
                    answer = stale
                    error = None
                elif not error:
                    error = "no address"
            for port, callback, tag in self.waiting.pop(host, ()):
                callback(tag, answer and answer.with_port(port), error)


def log_resolved(host, addrs, error):
    """The answer to a lookup made at start, for the admin to see."""
    if error is not None:
        # the relay starts all the same (the name may come back, a tailnet come up): say
        # what its clients meet meanwhile, and where to look
        log(WARNING, "resolve host=%s error=%r; until it resolves, clients sent to it are "
            "refused (SMTP 421, TLS ports closed) unless a next upstream serves them; run "
            "--check to see why" % (host, error))
    else:
        ips = sorted({sockaddr[0] for _, sockaddr in addrs})
        log(NOTICE, "resolve host=%s addresses=%s" % (host, ",".join(ips)))


def literal_address(host, port):
    """An IP literal needs no lookup: (family, sockaddr), or None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        if is_ip(host, family):
            return family, ((host, port) if family == socket.AF_INET else (host, port, 0, 0))
    return None


# ----------------------------------------------------------------------------------------------
# Connecting: resolve, connect to each address of each upstream in turn, then the header
# ----------------------------------------------------------------------------------------------

CONNECT_PENDING = {0, errno.EINPROGRESS, getattr(errno, "WSAEWOULDBLOCK", errno.EINPROGRESS)}
SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)     # Linux: non-blocking from the start
STREAM_NONBLOCK = socket.SOCK_STREAM | SOCK_NONBLOCK

# session stages (Session.stage)
PEEKING, RESOLVING, CONNECTING = "peeking", "resolving", "connecting"
STARVED = "starved"             # no descriptor for the upstream socket: waits for one
STREAMING, CLOSED = "streaming", "closed"

# why an upstream attempt failed, as counted (the metrics' `reason` label)
FAILURE_REASONS = {errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout",
                   errno.ENETUNREACH: "unreachable", errno.EHOSTUNREACH: "unreachable"}


HEALTH_BASE = 1.0               # an upstream that failed is skipped this long, doubling with
HEALTH_MAX = 30.0               # each failure in a row up to this (nginx: fail_timeout=10s)


class Upstream:
    """One upstream HOST:PORT as the sessions of every mapping that names it found it:
    attempts, failures by reason, and the warning a failure writes, at most one per
    WARN_INTERVAL (a dead first upstream of a failover list must not flood the log).

    Passive health: after a failure the upstream is `down` for HEALTH_BASE seconds,
    doubling with each failure in a row up to HEALTH_MAX; sessions skip it meanwhile (and
    go to the next upstream at once instead of waiting out a connect timeout). When the time
    is up, one session probes it (claim_probe() sets `probing`) while the others still skip
    it; a success makes it healthy again. A mapping whose upstreams are all down still tries
    one.
    """

    __slots__ = ("label", "attempts", "failures", "warned_at", "suppressed", "streak",
                 "down_until", "probing", "skipped")

    def __init__(self, host, port):
        self.label = format_address(host, port)
        self.attempts = 0
        self.failures = {}              # reason -> count
        self.warned_at = -WARN_INTERVAL
        self.suppressed = 0             # warnings left out since the last one written
        self.streak = 0                 # failures in a row
        self.down_until = 0.0
        self.probing = False            # a session is trying it after a failure
        self.skipped = 0                # sessions that went past it while it was down

    def usable(self, now):
        """May a new session try it? Yes if healthy, or if it is down, its time is up and
        no session probes it yet (then the caller must claim_probe())."""
        return not self.streak or not (self.probing or now < self.down_until)

    def claim_probe(self):
        """The caller tries it while it is down: it is the probe, and the others keep
        skipping it until the probe ends. True if claimed; False if it is healthy (nothing
        to probe) or another session probes it already."""
        if not self.streak or self.probing:
            return False
        self.probing = True
        return True

    def probe_abandoned(self):
        """The probing session ended before its attempt did: let another one probe."""
        self.probing = False

    def succeeded(self):
        """A connect completed: healthy again."""
        if self.streak:
            log(NOTICE, "upstream %s is back after %s" % (self.label, plural(self.streak,
                                                                             "failure")))
        self.streak = 0
        self.probing = False

    def failed(self, connector, next_upstream, now):
        """An attempt on this upstream failed: count it, mark it down, and warn
        (rate-limited)."""
        reason = connector.reason
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self.streak += 1
        self.probing = False
        self.down_until = now + min(HEALTH_MAX, HEALTH_BASE * 2 ** min(self.streak - 1, 16))
        if now - self.warned_at < WARN_INTERVAL:
            self.suppressed += 1
            return
        line = "connect upstream=%s" % self.label
        if connector.address is not None:
            line += " address=%s" % connector.address
        line += ' error="%s"' % connector.why.replace('"', "'")
        if next_upstream is not None:
            line += " next=%s" % format_address(*next_upstream)
        if self.suppressed:
            line += " suppressed=%d" % self.suppressed
        self.warned_at, self.suppressed = now, 0
        log(WARNING, line)


class Connector:
    """The connecting half of a session: failover through the mapping's upstreams.

    For each upstream in order: resolve its name (RESOLVING), then try each address in
    turn (CONNECTING, one non-blocking connect at a time). The first connect that
    completes hands the socket to the session, which starts STREAMING; when every
    address of every upstream has failed, the session closes as connect-failed with the
    last error. `deadline` bounds the current step (one lookup, or one connect); the
    server's sweep checks it and calls timed_out(), so no timer object exists per session.
    The session drops its Connector once connected.
    """

    __slots__ = ("session", "route", "upstream_index", "host", "port", "addrs", "deadline",
                 "error", "reason", "why", "address", "probe")
    source = None       # the address to connect from: EgressConnector's slot; here the kernel's

    def __init__(self, session, route):
        self.session = session
        self.route = route              # whose upstreams to try (None: not routed yet)
        self.upstream_index = 0         # the next upstream of the mapping to try
        self.host = self.port = self.addrs = None
        self.deadline = 0.0
        self.error = "no upstream"      # the last failure, for the session line
        self.reason, self.why, self.address = "other", "no address", None   # ... its parts
        self.probe = False              # this session probes an upstream that was down

    def failure(self, reason, why, address=None):
        """Note why the current upstream (or its address `address`) failed."""
        self.reason, self.why, self.address = reason, why, address
        self.error = "connect to %s: %s" % (address, why) if address is not None else why

    def try_next_upstream(self):
        """Resolve the next upstream (its addresses come to resolved()), or give up. The
        one tried before, if any, has failed: its Upstream counts it."""
        session = self.session
        server = session.server
        upstreams = self.route.upstreams
        index = self.upstream_index
        table = server.upstreams
        if self.host is not None:
            table[self.host, self.port].failed(
                self, upstreams[index] if index < len(upstreams) else None, server.now)
        self.probe = False
        while index < len(upstreams):
            upstream = table[upstreams[index]]
            if upstream.usable(server.now):
                if upstream.streak:     # down, its time up: this session is its probe
                    self.probe = upstream.claim_probe()
                break
            upstream.skipped += 1
            index += 1                  # down: the next one, at once
        if index >= len(upstreams):
            if self.host is None and upstreams:
                index = self.least_down(upstreams, table)   # all down: try one anyway
            else:
                return session.refuse("connect-failed", self.error)
        self.host, self.port = upstreams[index]
        table[self.host, self.port].attempts += 1
        self.upstream_index = index + 1
        self.reason, self.why, self.address = "other", "no address", None
        session.stage = RESOLVING
        self.deadline = server.now + server.connect_timeout
        server.resolver.resolve(self.host, self.port, self.resolved, self.upstream_index)

    @staticmethod
    def least_down(upstreams, table):
        """Every upstream is down: the index of the one due back first (its skip undone)."""
        index = min(range(len(upstreams)), key=lambda i: table[upstreams[i]].down_until)
        table[upstreams[index]].skipped -= 1
        return index

    def resolved(self, tag, addrs, error):
        """The resolver's answer to lookup number `tag` (a callback from the loop)."""
        if self.session.stage is not RESOLVING or tag != self.upstream_index:
            return              # closed meanwhile, or an answer for an attempt given up on
        if error is not None:
            self.failure("resolve", "cannot resolve %s: %s" % (self.host, error))
            return self.try_next_upstream()
        self.addrs = collections.deque(addrs)
        self.connect_next_address()

    def timed_out(self):
        """The current step ran past its deadline (called by the server's sweep)."""
        session = self.session
        if session.stage is PEEKING:
            session.unrouted("peek-timeout", "no complete %s within %gs" % (
                session.mapping.router.kind == "tls" and "ClientHello" or "request head",
                session.server.peek_timeout), "408 Request Timeout")
        elif session.stage is RESOLVING:
            self.failure("resolve", "resolving %s timed out" % self.host)
            self.try_next_upstream()
        elif session.stage is CONNECTING:
            self.address_failed("timed out after %gs" % session.server.connect_timeout,
                                "timeout")

    def connect_next_address(self):
        """Start a connect to the next address of the current upstream, or move on."""
        session = self.session
        server = session.server
        while self.addrs:
            family, sockaddr = self.addrs.popleft()
            if sockaddr[1] in server.listen_ports and server.is_own_address(sockaddr):
                self.failure("self", "this relay's own listen address; point %s at the mail "
                             "server" % self.host, format_address(*sockaddr[:2]))
                log(ERROR, "upstream %s resolves to %s, this relay's own listen address: not "
                    "connecting to itself" % (self.host, format_address(*sockaddr[:2])))
                continue
            try:
                sock = _socket.socket(family, STREAM_NONBLOCK)
            except OSError as e:
                if e.errno in FD_EXHAUSTED:
                    # the client has heard nothing yet: it waits for a descriptor, as the
                    # clients in the backlog do, instead of being dropped
                    self.addrs.appendleft((family, sockaddr))
                    return server.starve(session, e)
                self.failure("other", "cannot open a socket: %s" % e.strerror)
                continue
            if not SOCK_NONBLOCK:
                sock.setblocking(False)
            tune_socket(sock, keepalive=False)     # set by the sweep (see keep_alive)
            if self.source is not None:             # egress (EgressConnector) only
                why = self.bind_source(sock)
                if why is not None:
                    sock.close()
                    self.failure("other", why)
                    continue
            err = sock.connect_ex(sockaddr)
            if err in CONNECT_PENDING:
                session.upstream = sock
                session.target = sockaddr
                session.stage = CONNECTING
                self.deadline = server.now + server.connect_timeout
                session.update_events()
                return
            sock.close()
            self.failure(FAILURE_REASONS.get(err, "other"), os.strerror(err),
                         format_address(*sockaddr[:2]))
        self.try_next_upstream()

    def address_failed(self, why, reason):
        """The connect in flight failed: drop its socket and try the next address."""
        session = self.session
        self.failure(reason, why, format_address(*session.target[:2]))
        if session.upstream_events:
            session.server.selector.forget(session.upstream.fileno())   # closed next
        session.upstream_events = 0
        session.upstream.close()
        session.upstream = session.target = None
        self.connect_next_address()

    def check_connected(self):
        """The upstream socket is writable: did the connect succeed? If so, start
        streaming and return True; if not, move on to the next address."""
        session = self.session
        err = session.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.address_failed(os.strerror(err), FAILURE_REASONS.get(err, "other"))
            return False
        server = session.server
        server.upstreams[self.host, self.port].succeeded()
        if log.threshold >= DEBUG:
            log(DEBUG, "connect client=%s upstream=%s address=%s secs=%.3f" % (
                format_address(plain_ip(session.peer[0]), session.peer[1]), self.describe(),
                format_address(*session.target[:2]),
                server.now - self.deadline + server.connect_timeout))
        session.start_streaming()
        return True

    def describe(self):
        """The upstream being tried, for the session line."""
        return format_address(self.host, self.port) if self.host is not None else "-"


# ----------------------------------------------------------------------------------------------
# Relay: a Flow per direction; copy or splice; half-close
# ----------------------------------------------------------------------------------------------
#
# The life of a connection:
#
#   accept ──▶ [PEEKING] ──▶ RESOLVING ──▶ CONNECTING ──▶ STREAMING ──▶ CLOSED
#   (Acceptor)  (a routed     (Connector: each upstream,   (two Flows)    (Session.close,
#               listener:     each address, the header)                  the session line)
#               Session.peek)
#
# The Acceptor accepts a client and the server starts a Session for it. On a listener that
# routes by name, the session first reads the ClientHello or request head (PEEKING) and
# picks the route whose upstreams the connector will try. The session's
# Connector resolves the first upstream and connects to its addresses one at a time,
# moving on to the next upstream when all fail; meanwhile what the client sends is kept
# (preread). When a connect completes, the PROXY header and those early bytes leave in one
# send, and the session streams: `up` moves client -> upstream, `down` upstream -> client.
#
# Every socket event goes to Session.on_event, which lets the flows move bytes and then
# calls Session.update_events(): the one place that decides what to poll for on each
# socket. A flow with bytes pending does not read (backpressure); a FIN from one side is
# passed on with shutdown(SHUT_WR) once everything before it is delivered (half-close),
# and the other direction keeps flowing. The session ends when both FINs have been passed
# on, on a reset or error (passed on as a reset), on the idle timeout (the server's sweep),
# or when a drain runs out. Session.close() may be called any number of times; the first
# call closes both sockets, frees the pipes and writes the session line.

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
CHUNK = 64 * 1024               # most bytes read at once, and so held per direction: the
                                # memory bound of a session (a spliced one's is its pipe's)
PULL_ROUNDS = 16                # chunks moved per readable event while the source stays full
SPLICE_AFTER = 64 * 1024        # bytes in one event that turn a direction to splice (bulk)
PIPE_POOL = 32                  # idle splice pipes kept for reuse
os_splice = getattr(os, "splice", None)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
# splice(2) on sockets refused by this kernel or sandbox (EPERM: a seccomp filter): copy instead
SPLICE_REFUSED = {errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


class PeerError(Exception):
    """A socket call failed; `sock` is the side that broke."""

    def __init__(self, sock, error):
        Exception.__init__(self, sock, error)
        self.sock = sock
        self.error = error


def io(call, side, *args):
    """One non-blocking socket or splice call: its result, or None when it would block.

    This is the relay's one errno policy: any other OSError means the peer on `side`
    broke (a reset, a timeout from keepalive...), raised as PeerError(side) so the session
    closes both sides and passes a reset on.
    """
    try:
        return call(*args)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        raise PeerError(side, e)


class Relay:
    """How one server moves bytes: its mode, the read buffer, and the splice pipes.

    `mode` is "copy" (recv_into/send through `buffer`, one buffer for every session: the
    loop is single-threaded) or "splice": then each direction starts out copying and
    turns to splice (socket -> pipe -> socket, never through Python) once one event
    brings SPLICE_AFTER bytes, as HAProxy's splice-auto does: for an SMTP line or an IMAP
    command, two splices through a pipe cost more than one copy. When the kernel refuses
    splice, the mode turns to "copy" for good (splice_refused) and every flow that was
    splicing copies from its next read on.
    """

    __slots__ = ("mode", "buffer", "view", "pipes")

    def __init__(self, wanted):
        self.mode = choose_relay(wanted)
        self.buffer = bytearray(CHUNK)
        self.view = memoryview(self.buffer)
        self.pipes = PipePool()

    def splice_refused(self, error):
        """The kernel or a sandbox refused splice(2) (`error`): copy from now on."""
        if self.mode == "splice":
            log(WARNING, "splice unavailable (%s); relaying with recv/send" % error.strerror)
            self.mode = "copy"


def choose_relay(wanted):
    """splice where the platform has it (Linux, Python >= 3.10), else copy."""
    available = os_splice is not None and hasattr(os, "pipe2")
    if wanted == "copy" or not available:
        if wanted == "splice":
            log(WARNING, "--relay splice needs Linux and Python >= 3.10; using copy")
        return "copy"
    return "splice"


class Flow:
    """One direction of a session: what `src` sends is written to `dst`.
    (The session owns the two sockets and hands them to each step.)

    `pending` holds bytes `dst` would not take yet (the PROXY header and early client
    bytes start there); it is None whenever the flow is idle, so an idle session owns
    no buffer. `pipe` is a splice pipe lent while it holds `piped` bytes. While anything
    is pending or piped, `src` is not read: that is the backpressure. `eof` is set when
    `src` has sent FIN; `shut` once the FIN has been passed on to `dst` with
    shutdown(SHUT_WR), after everything before it. `splicing`: this direction has
    turned to splice (see Relay).
    """

    __slots__ = ("pending", "pipe", "piped", "count", "eof", "shut", "splicing")

    def __init__(self):
        self.pending = None     # a memoryview of bytes not yet sent to dst
        self.pipe = None        # splice: (read_fd, write_fd) holding `piped` bytes
        self.piped = 0
        self.count = 0          # bytes read from src
        self.eof = False
        self.shut = False
        self.splicing = False

    def pull(self, src, dst, relay, copy=False):
        """`src` is readable and nothing is pending: move what it has to `dst`. By splice
        once this direction has turned to it (and not `copy`), else through the relay's
        buffer: recv_into, send at once, keep only what `dst` would not take. A read that
        fills the whole buffer means more is waiting: read again now (a few times) rather
        than after another trip through the loop. Raises PeerError when a side broke."""
        if self.splicing and not copy and relay.mode == "splice":
            return self.pull_spliced(src, dst, relay)
        buffer, view, moved = relay.buffer, relay.view, 0
        for _ in range(PULL_ROUNDS):
            # io()'s policy, written out: this is the path of every small exchange (an SMTP
            # line, an IMAP command), where two calls through io() cost ~10 % more CPU per
            # request (bench_tailwart_edge.py, keep-alive, copy mode: 18.8 vs 17.1 us)
            try:
                n = src.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                raise PeerError(src, e)
            if not n:
                self.eof = True
                self.pass_fin(dst)
                return
            self.count += n
            moved += n
            try:
                sent = dst.send(view[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                raise PeerError(dst, e)
            if sent != n:
                # buffer only what the kernel would not take
                self.pending = memoryview(view[sent:n].tobytes())
                break
            if n < CHUNK:
                break
        if moved >= SPLICE_AFTER and relay.mode == "splice":
            self.splicing = True

    def pull_spliced(self, src, dst, relay):
        """splice src -> pipe -> dst. A pipe is borrowed from the pool for each pull and
        given back once empty, so idle sessions hold no pipe (and no descriptors beyond
        their two sockets)."""
        pipes = relay.pipes
        for turn in range(PULL_ROUNDS):
            pipe = pipes.take()
            if pipe is None:        # no pipe to spare: copy this chunk instead
                return self.pull(src, dst, relay, copy=True)
            try:
                n = io(os_splice, src, src.fileno(), pipe[1], PIPE_SIZE, None, None,
                       SPLICE_FLAGS)
            except PeerError as e:
                pipes.give(pipe)
                if e.error.errno in SPLICE_REFUSED:
                    relay.splice_refused(e.error)
                    return self.pull(src, dst, relay, copy=True)
                raise
            if not n:
                pipes.give(pipe)
                # None (EAGAIN) on a socket said to be readable, or 0 (EOF): splice stops at
                # TCP urgent data for good (the kernel's tcp_read_sock), saying EAGAIN, or 0
                # once the peer's FIN is in too. recv() reads past the mark, and tells a true
                # EOF (it then passes the FIN on).
                if n == 0 or not turn:
                    self.pull(src, dst, relay, copy=True)
                return
            self.count += n
            self.pipe = pipe
            self.piped = n
            self.send_piped(dst, relay)     # gives the pipe back once it is empty
            if self.piped or n < PIPE_SIZE // 4:
                return      # dst is full (the pipe stays lent until it drains), or src is empty

    def push(self, dst, relay):
        """`dst` is writable again: send what is pending or piped, then pass on a FIN if
        one came. Raises PeerError when `dst` broke."""
        pending = self.pending
        if pending is not None:
            sent = io(dst.send, dst, pending)
            if sent is None:
                return
            if sent != len(pending):
                self.pending = pending[sent:]
                return
            self.pending = None
        elif self.piped:
            return self.send_piped(dst, relay)
        if self.eof:
            self.pass_fin(dst)

    def send_piped(self, dst, relay):
        """splice what the pipe holds on to `dst`; give the pipe back once it is empty."""
        sent = io(os_splice, dst, self.pipe[0], dst.fileno(), self.piped, None, None,
                  SPLICE_FLAGS)
        if sent is None:
            return
        self.piped -= sent
        if not self.piped:
            relay.pipes.give(self.pipe)
            self.pipe = None
            if self.eof:
                self.pass_fin(dst)

    def pass_fin(self, dst):
        """Pass `src`'s FIN on to `dst` once everything before it has been delivered."""
        if self.shut or self.pending is not None or self.piped:
            return
        self.shut = True
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass            # dst is already gone; reading from it will tell

    def release(self, relay):
        """The session is closing: free the pipe, whatever it still holds."""
        if self.pipe is not None:
            relay.pipes.close(self.pipe)
            self.pipe = None


class PipePool:
    """The splice pipes: at most `limit` open at once (lent or idle), the descriptors the
    connection cap left for them, and up to PIPE_POOL idle ones kept for reuse. A pipe
    is made PIPE_SIZE (256 KiB) big, what a spliced direction may hold: its kernel memory
    is counted in the connection cap (capacity) for every pipe that may be open. Where
    the kernel refuses that size (over fs.pipe-max-size, or the user's pipe pages), the
    pipe keeps its default 64 KiB."""

    __slots__ = ("free", "open", "limit")

    def __init__(self, limit=PIPE_POOL):
        self.free = []
        self.open = 0
        self.limit = limit

    def take(self):
        """An empty pipe (read_fd, write_fd), or None when no more may be open (or the
        process is out of descriptors): the caller copies instead."""
        if self.free:
            return self.free.pop()
        if self.open >= self.limit:
            return None
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.fcntl(pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass            # over fs.pipe-max-size or the user's pipe pages: the default size
        self.open += 1
        return pipe

    def give(self, pipe):
        """Take an empty pipe back: kept for the next pull, or closed when enough are kept."""
        if len(self.free) < PIPE_POOL:
            self.free.append(pipe)
        else:
            self.close(pipe)

    def close(self, pipe):
        """Close a pipe for good (a closing session's, whatever it holds)."""
        os.close(pipe[0])
        os.close(pipe[1])
        self.open -= 1


# ----------------------------------------------------------------------------------------------
# Session: one client, its upstream, two flows; ending and the session line
# ----------------------------------------------------------------------------------------------

PREREAD_LIMIT = 64 * 1024       # client bytes held while the upstream connect is in flight
LINGER_RST = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends a reset


class Session:
    """One client connection and its upstream connection.

    Stages: PEEKING (a routed listener only: reading the client's server name, see
    peek()), RESOLVING the upstream name and CONNECTING to one of its addresses (both
    driven by `connector`; STARVED while no descriptor is left for the upstream socket),
    then STREAMING until both directions have ended (or a
    reset, an error, the idle timeout or the end of a drain), then CLOSED. While not yet
    STREAMING, what the client sends is read into the `up` flow's pending buffer (up to
    PREREAD_LIMIT) and goes out right behind the PROXY header, in the same send.
    `client_events` and `upstream_events` are what the selector watches on each socket.
    """

    __slots__ = ("server", "mapping", "client", "upstream", "peer", "target",
                 "stage", "started", "active_at", "up", "down", "connector", "end",
                 "client_events", "upstream_events", "client_entry", "routing", "reader",
                 "kept_alive")

    def __init__(self, server, mapping, client, peer):
        self.server = server
        self.mapping = mapping
        self.client = client
        self.peer = peer
        self.upstream = None
        self.target = None              # the upstream address connected (or tried) to
        self.stage = RESOLVING
        self.started = self.active_at = server.now
        self.up = Flow()                # client -> upstream
        self.down = Flow()              # upstream -> client
        self.connector = Connector(self, mapping.default)    # None once connected
        self.end = None                 # how it ended; the first FIN sets it
        self.client_events = self.upstream_events = 0
        self.client_entry = None        # the Clients entry counting this session
        self.routing = None             # ' sni=NAME route=ITEM' for the line, once routed
        self.reader = None              # while PEEKING: the parser of the client's first bytes
        self.kept_alive = False         # the upstream socket's keepalive is on (the sweep)

    def start(self):
        """Read the client while the connector looks for an upstream; on a routed listener,
        read its ClientHello (or request head) first, for its name (peek)."""
        if self.mapping.router is not None:
            self.stage = PEEKING
            self.up.pending = bytearray()
            self.reader = self.mapping.router.reader()
            self.connector.deadline = self.server.now + self.server.peek_timeout
            return self.update_events()
        self.update_events()
        self.connector.try_next_upstream()

    # -- events --------------------------------------------------------------------------------

    def on_event(self, fd, mask):
        """A socket of this session is ready: move bytes, then decide what to wait for."""
        if self.stage is CLOSED:
            return
        self.active_at = self.server.now
        relay = self.server.relay
        # Act only on what was asked for: selectors reports an error or hang-up as READ|WRITE,
        # and reading a side whose bytes cannot be passed on yet would reorder the stream.
        try:
            if fd == self.client.fileno():
                mask &= self.client_events
                if mask & READ:
                    if self.stage is STREAMING:
                        self.up.pull(self.client, self.upstream, relay)
                    elif self.stage is PEEKING:
                        self.peek()
                    else:
                        self.preread()
                if mask & WRITE:
                    self.down.push(self.client, relay)
            elif self.upstream is not None and fd == self.upstream.fileno():
                mask &= self.upstream_events
                if self.stage is CONNECTING:
                    if not self.connector.check_connected():
                        return
                if mask & READ:
                    self.down.pull(self.upstream, self.client, relay)
                if mask & WRITE:
                    self.up.push(self.upstream, relay)
            else:
                return          # an event for a socket this session has already closed
        except PeerError as e:
            return self.broken(e.sock, e.error)
        up, down = self.up, self.down
        if self.end is None and (up.eof or down.eof):
            self.end = "client-fin" if up.eof else "upstream-fin"
        if up.shut and down.shut:
            return self.close(self.end)
        self.update_events()

    def update_events(self):
        """The one place that decides what to wait for on each socket: read a side only
        while its bytes can be passed on, write a side only while bytes wait for it."""
        up, down = self.up, self.down
        if self.stage is STREAMING:
            client_events = ((0 if up.eof or up.pending is not None or up.piped else READ)
                             | (WRITE if down.pending is not None or down.piped else 0))
            upstream_events = ((0 if down.eof or down.pending is not None or down.piped else READ)
                               | (WRITE if up.pending is not None or up.piped else 0))
        else:
            full = up.pending is not None and len(up.pending) >= PREREAD_LIMIT
            client_events = 0 if up.eof or full else READ
            upstream_events = WRITE if self.stage is CONNECTING else 0
        if client_events != self.client_events:
            self.server.watch(self.client.fileno(), self.client_events, client_events, self)
            self.client_events = client_events
        if upstream_events != self.upstream_events:
            self.server.watch(self.upstream.fileno(), self.upstream_events, upstream_events, self)
            self.upstream_events = upstream_events

    def preread(self):
        """Before the upstream is there: keep what the client sends (TLS ClientHello...)."""
        relay, up = self.server.relay, self.up
        held = len(up.pending) if up.pending is not None else 0
        n = io(self.client.recv_into, self.client, relay.buffer, PREREAD_LIMIT - held)
        if n is None:
            return
        if not n:
            up.eof = True
            return
        up.count += n
        data = relay.view[:n].tobytes()
        up.pending = memoryview(data if up.pending is None else up.pending.tobytes() + data)

    def peek(self):
        """A routed listener: read what the client sends until its ClientHello (or request
        head) is whole, then pick the route by its name and start connecting. What was read
        is kept in `up.pending` and relayed, not consumed; at most PEEK_LIMIT bytes."""
        up, relay, router = self.up, self.server.relay, self.mapping.router
        held = up.pending
        n = io(self.client.recv_into, self.client, relay.buffer, PEEK_LIMIT - len(held))
        if n is None:
            return
        what = "ClientHello" if router.kind == "tls" else "request head"
        if not n:
            up.eof = True
            return self.unrouted("client-fin", "the client closed before its %s was whole"
                                 % what)
        up.count += n
        held += relay.view[:n]
        try:
            found = self.reader.read(held)
        except ValueError as e:
            return self.unrouted("peek-bad", str(e), "400 Bad Request")
        if found is None:
            if len(held) >= PEEK_LIMIT:
                self.unrouted("peek-bad", "no whole %s in %d bytes" % (what, PEEK_LIMIT),
                              "431 Request Header Fields Too Large")
            return
        self.reader = None
        name, extra = found
        route, item = router.pick(name, extra)
        self.routing = " %s=%s route=%s" % ("sni" if router.kind == "tls" else "host",
                                            name or "-", item)
        if route is None:
            return self.unrouted("no-route", None, "421 Misdirected Request",
                                 TLS_UNRECOGNIZED_NAME)
        routed = self.mapping.routed
        routed[item] = routed.get(item, 0) + 1
        up.pending = memoryview(bytes(held))
        self.connector.route = route
        self.connector.try_next_upstream()

    def unrouted(self, end, reason, status=None, alert=None):
        """The client cannot be routed: an HTTP client hears `status`, a TLS client `alert`
        (if any; else a plain close); count it, close."""
        answer = alert if self.mapping.router.kind == "tls" else HTTP_ANSWERS.get(status)
        if answer is not None and end != "client-fin":
            try:
                self.client.send(answer)
                self.client.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        unrouted = self.mapping.unrouted
        unrouted[end] = unrouted.get(end, 0) + 1
        self.close(end, reason)

    def start_streaming(self):
        """The connect completed: the header and what the client sent so far leave in one
        send (one segment), then both directions stream."""
        header = self.connector.route.header
        self.connector = None
        self.stage = STREAMING
        up = self.up
        if header is not None:
            head = header(self.peer, self.mapping.local or self.client.getsockname())
            up.pending = memoryview(head + up.pending.tobytes() if up.pending is not None else head)
        if log.threshold >= DEBUG:
            log(DEBUG, "session-start client=%s listen=%s upstream=%s" % (
                format_address(plain_ip(self.peer[0]), self.peer[1]), self.mapping.label,
                format_address(*self.target[:2])))
        up.push(self.upstream, self.server.relay)

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

    def refuse(self, end, reason):
        """The client cannot be served: tell it so in its protocol (REFUSALS), if the
        mapping's protocol has words for it, then close. Only ever before streaming, so
        never into a stream the mail server has spoken in; one send on a socket that has
        sent nothing, so it fits the send buffer and cannot block."""
        text = REFUSALS.get(self.mapping.protocol)
        if text is not None and self.stage is not STREAMING and self.stage is not CLOSED:
            try:
                sent = self.client.send(text)
                self.client.shutdown(socket.SHUT_WR)
            except OSError:
                sent = 0
            if sent:
                reason = "%s; told the client %s" % (reason, " ".join(
                    text.decode().split()[:2]))
        self.close(end, reason)

    def close(self, end, reason=None):
        """End the session (idempotent): stop watching, close both sockets, free the pipes,
        and let the server count it and write the session line."""
        if self.stage is CLOSED:
            return
        server = self.server
        connector = self.connector
        if connector is not None and connector.probe:
            server.upstreams[connector.host, connector.port].probe_abandoned()
        if self.client_events:
            server.selector.forget(self.client.fileno())     # closed next: no epoll_ctl
        if self.upstream_events:
            server.selector.forget(self.upstream.fileno())
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self.up.release(server.relay)
        self.down.release(server.relay)
        self.stage = CLOSED
        server.session_ended(self, end, reason)


def session_line(session, end, reason):
    """`session client=... listen=... upstream=... up=N down=N secs=S end=HOW [reason="..."]`:
    one line per session, written when it ends."""
    if session.target is not None:
        upstream = format_address(*session.target[:2])
    elif session.connector is not None:
        upstream = session.connector.describe()
    else:
        upstream = "-"
    line = ("session client=%s listen=%s upstream=%s up=%d down=%d secs=%.2f end=%s"
            % (format_address(plain_ip(session.peer[0]), session.peer[1]), session.mapping.label,
               upstream, session.up.count, session.down.count,
               session.server.now - session.started, end))
    if reason:
        line += ' reason="%s"' % reason.replace('"', "'")
    if session.routing is not None:
        line += session.routing
    original = getattr(session, "original", None)     # the egress of a mail host
    if original is not None:
        line += " destination=%s" % format_address(*original[:2])
    return line


# ----------------------------------------------------------------------------------------------
# Egress: outbound mail leaves from the VPS (--egress there, --egress-via on the mail host)
# ----------------------------------------------------------------------------------------------
#
# The mail server keeps choosing the MX (and DANE, MTA-STS, its one queue); only the TCP
# connection leaves from the VPS, so the recipient sees the VPS's address. As commercial MTAs
# do with HAProxy (`server x 0.0.0.0`), the destination travels in a PROXY v2 header:
#
#   mail server ──▶ REDIRECT (the admin's netfilter rule; --check prints it)
#     ──▶ --egress-listen: RedirectedSession reads SO_ORIGINAL_DST, connects to --egress-via
#         and sends v2 (source: the mail server, destination: the MX it chose)
#     ──▶ --egress on the VPS (a tailnet address): EgressSession reads that header (HEADER,
#         strict, within --peek-timeout), checks the peer, the port and the destination
#         against an explicit table (EgressPolicy), connects from --egress-source, relays.
#
# Both are Sessions: the relay, half-close, timeouts, the session line and the metrics are
# the inbound ones. What the VPS end must never become is an open proxy: it refuses to
# listen on a public or wildcard address or without --egress-peer, checks the peer on
# accept, and refuses every destination in the table below whatever form it is written in.

# session ends worth a warning: the VPS end refused what a peer asked for
EGRESS_WARNINGS = ("egress-port", "egress-destination", "egress-denied", "egress-own",
                   "egress-family", "header-bad", "per-peer", "not-redirected")
HEADER = "header"               # stage of an EgressSession reading the mail host's header
DEFAULT_EGRESS_LISTEN = "127.0.0.1:2525"
DEFAULT_EGRESS_PER_PEER = 100   # a mail server's outbound concurrency (Postfix: 100 processes)
EGRESS_LOW_PORTS = (25, 465, 587)   # the only ports below 1024 --egress-ports may name
V2_HEADER_LIMIT = 16 + 512      # a header's most: 16 fixed bytes + addresses (36) and TLVs
V2_LOCAL_COMMAND, V2_PROXY_COMMAND = 0x20, 0x21
V2_FAMILIES = {0x00: "UNSPEC", 0x11: "TCP4", 0x12: "UDP4", 0x21: "TCP6", 0x22: "UDP6",
               0x31: "UNIX stream", 0x32: "UNIX datagram"}     # section 2.2, 14th byte
SO_ORIGINAL_DST = 80            # linux/netfilter_ipv4.h, at SOL_IP; IPv6: ip6_tables.h's
SOL_IPV6 = 41                   # IP6T_SO_ORIGINAL_DST is 80 too, at SOL_IPV6
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)   # Linux >= 4.2
OWN_REFRESH = 5.0               # the VPS's own addresses are read again after this long
PROC_LIMIT = 4 << 20            # the most read of a /proc table (a full BGP table is ~100 MB)
# what the mail server hears when its connection cannot be carried (SMTP ports only: on 465
# the client speaks TLS first, and plain text would be garbage to it): always a 4xx, a
# temporary failure it retries, never a 5xx that would bounce the message
EGRESS_UNREACHABLE = b"421 4.4.1 No answer from the destination (via the egress relay)\r\n"
EGRESS_REFUSED = b"421 4.7.0 Destination refused by the egress relay's policy\r\n"
EGRESS_BUSY = b"421 4.7.0 Too many egress connections from your address\r\n"
EGRESS_NOT_REDIRECTED = b"421 4.3.0 Not a redirected connection; see tailwart_edge.py --check\r\n"

# Destinations never connected to: an explicit table, not ipaddress.is_global (whose answers
# changed between CPython versions). IANA's special-purpose registries (RFC 6890 and later).
EGRESS_REFUSED_V4 = (
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (CGNAT, the tailnet)"),      # RFC 6598; Tailscale's 100.x
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),           # 169.254.169.254: a cloud's metadata service
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),                # 255.255.255.255 (broadcast) too
)
EGRESS_REFUSED_V6 = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),  # RFC 4291 2.5.5.1
    ("64:ff9b:1::/48", "local-use NAT64"),      # RFC 8215: never global
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignments"),     # Teredo (2001::/32) among them
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),             # RFC 9637
    ("5f00::/16", "segment routing (SRv6)"),
    ("fc00::/7", "unique-local (the tailnet's fd7a:115c:a1e0::/48)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
DOCUMENTATION = "documentation"
# where the egress listener and its peers may be: never reachable from the internet
EGRESS_INSIDE = ("loopback", "private", "shared (CGNAT, the tailnet)",
                 "unique-local (the tailnet's fd7a:115c:a1e0::/48)")
MASK32 = 0xffffffff
NAT64_PREFIX = 0x64ff9b << 64       # 64:ff9b::/96, the top 96 bits
V4_MAPPED_PREFIX = 0xffff           # ::ffff:0:0/96, the top 96 bits
SIX_TO_FOUR = 0x2002                # 2002::/16, the top 16 bits
TEREDO = 0x20010000                 # 2001::/32, the top 32 bits


def address_value(ip):
    """'192.0.2.1' -> (4, int); '2001:db8::1' -> (6, int). ValueError when no IP literal."""
    ip = ip.partition("%")[0]
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        packed = socket.inet_pton(family, ip)
    except (OSError, ValueError):
        raise ValueError("%r is not an IP address" % ip)
    return (6 if family == socket.AF_INET6 else 4), int.from_bytes(packed, "big")


def cidr_value(text):
    """'10.0.0.0/8' -> (version, network int, prefix length)."""
    ip, _, prefix = text.partition("/")
    version, value = address_value(ip)
    return version, value, int(prefix) if prefix else (32 if version == 4 else 128)


def in_cidr(version, value, cidr):
    """Is address (version, value) inside cidr (version, network, prefix)?"""
    bits = 32 if version == 4 else 128
    return version == cidr[0] and value >> (bits - cidr[2]) == cidr[1] >> (bits - cidr[2])


EGRESS_TABLE = [(cidr_value(cidr), cidr, name) for cidr, name in
                EGRESS_REFUSED_V4 + EGRESS_REFUSED_V6]


def value_text(version, value):
    """(4, int) -> '192.0.2.1'; (6, int) -> '2001:db8::1'."""
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def address_class(version, value, allow=()):
    """Why an address can never be a destination (or the VPS's public source): its refused
    class, e.g. 'private (10.0.0.0/8)' or '6to4 form of loopback (127.0.0.0/8)'; None for a
    global address. `allow` (cidr_value tuples) lets documentation networks pass: a lab's
    stand-in for the internet. A question only: no side effects.

    An IPv6 address that carries an IPv4 one is judged by it too: v4-mapped (::ffff:0:0/96),
    NAT64 (64:ff9b::/96), 6to4 (2002::/16: bits 16-47) and Teredo (2001::/32: the server at
    bits 32-63, the client, XORed, in the last 32 bits, RFC 4380 4)."""
    if version == 6:
        top96 = value >> 32
        embedded = []
        if top96 == V4_MAPPED_PREFIX:
            embedded.append(("v4-mapped", value & MASK32))
        elif top96 == NAT64_PREFIX:
            embedded.append(("NAT64", value & MASK32))
        elif value >> 112 == SIX_TO_FOUR:
            embedded.append(("6to4", (value >> 80) & MASK32))
        elif value >> 96 == TEREDO:
            embedded.append(("Teredo server", (value >> 64) & MASK32))
            embedded.append(("Teredo client", (value & MASK32) ^ MASK32))
        for form, inner in embedded:
            why = address_class(4, inner, allow)
            if why is not None:
                return "%s form of %s %s" % (form, value_text(4, inner), why)
        if embedded and embedded[0][0] in ("v4-mapped", "NAT64"):
            return None         # a global IPv4 address, written in IPv6
    for cidr, text, name in EGRESS_TABLE:
        if in_cidr(version, value, cidr):
            if name == DOCUMENTATION and any(in_cidr(version, value, a) for a in allow):
                return None
            return "%s (%s)" % (name, text)
    if version == 6 and value >> 125 != 1:
        return "not global unicast (outside 2000::/3)"
    return None


def embedded_v4(version, value):
    """[(4, int)]: the IPv4 addresses a NAT64 or 6to4 IPv6 address leads to (none else)."""
    if version == 6 and value >> 32 == NAT64_PREFIX:
        return [(4, value & MASK32)]
    if version == 6 and value >> 112 == SIX_TO_FOUR:
        return [(4, (value >> 80) & MASK32)]
    return []


def inside_class(version, value):
    """The EGRESS_INSIDE class name an address is in (never reachable from the internet),
    or None."""
    for cidr, text, name in EGRESS_TABLE:
        if name in EGRESS_INSIDE and in_cidr(version, value, cidr):
            return name
    return None


class ProxyHeader(collections.namedtuple("ProxyHeader", "command source destination length")):
    """A PROXY v2 header read: command "LOCAL" or "PROXY"; source and destination (ip, port)
    (None for LOCAL); length: its bytes in the stream (what follows is the client's)."""
    __slots__ = ()


class V2Reader:
    """A PROXY v2 header at the start of a stream, read as it comes and strictly (section
    2.2): each call looks at the 16 fixed bytes at most until the length is known, then at
    nothing until the whole header is in, so a header cut into one-byte segments costs what
    it costs in one piece. Refused (ValueError): another signature, version or command, a
    family other than TCP4/TCP6 for PROXY (UNSPEC has no destination, UDP and UNIX are not
    carried), an address block shorter than its family's, TLVs that do not fill the rest
    exactly, or a length over V2_HEADER_LIMIT."""

    __slots__ = ("need",)

    def __init__(self):
        self.need = None                # the header's length, once its first 16 bytes are in

    def read(self, data):
        """A ProxyHeader once `data` (the stream from its first byte, grown since the last
        call) holds the whole header; None until then; ValueError when it never will."""
        if self.need is None:
            have = len(data)
            if bytes(data[:12]) != V2_SIGNATURE[:min(have, 12)]:
                raise ValueError("not a PROXY v2 header")
            if have > 12 and data[12] not in (V2_LOCAL_COMMAND, V2_PROXY_COMMAND):
                raise ValueError("PROXY v2 version/command byte 0x%02x is not 0x20 (LOCAL) "
                                 "or 0x21 (PROXY)" % data[12])
            if have > 13:
                family = data[13]
                if family not in V2_FAMILIES:
                    raise ValueError("PROXY v2 family byte 0x%02x is unknown" % family)
                if data[12] == V2_PROXY_COMMAND and family not in (V2_TCP4, V2_TCP6):
                    raise ValueError("PROXY v2 %s header: only TCP4 and TCP6 name a "
                                     "destination to carry" % V2_FAMILIES[family])
            if have < 16:
                return None
            length = data[14] << 8 | data[15]
            if 16 + length > V2_HEADER_LIMIT:
                raise ValueError("PROXY v2 header of %d bytes, over %d"
                                 % (16 + length, V2_HEADER_LIMIT))
            self.need = 16 + length
        if len(data) < self.need:
            return None
        return v2_fields(bytes(data[:self.need]))


def v2_fields(header):
    """The ProxyHeader of a whole v2 header whose first 14 bytes V2Reader has checked."""
    command, family, length = header[12], header[13], len(header)
    if command == V2_LOCAL_COMMAND:
        return ProxyHeader("LOCAL", None, None, length)     # the block is ignored (2.2)
    six = family == V2_TCP6
    size = 36 if six else 12
    if length - 16 < size:
        raise ValueError("PROXY v2 %s header with %d address bytes, not %d"
                         % (V2_FAMILIES[family], length - 16, size))
    pos = 16 + size
    while pos < length:                 # TLVs (2.2.7): type, 2-byte length, value
        if pos + 3 > length:
            raise ValueError("PROXY v2 header ends inside a TLV")
        pos += 3 + (header[pos + 1] << 8 | header[pos + 2])
        if pos > length:
            raise ValueError("PROXY v2 TLV longer than the header")
    af = socket.AF_INET6 if six else socket.AF_INET
    width = 16 if six else 4
    src = socket.inet_ntop(af, header[16:16 + width])
    dst = socket.inet_ntop(af, header[16 + width:16 + 2 * width])
    src_port, dst_port = struct.unpack_from("!HH", header, 16 + 2 * width)
    return ProxyHeader("PROXY", (src, src_port), (dst, dst_port), length)


def read_proc(path):
    """A /proc table's text, at most PROC_LIMIT bytes; '' when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(PROC_LIMIT).decode("ascii", "replace")
    except OSError:
        return ""


def local_networks_linux():
    """The VPS's own addresses and local routes, [(version, value, prefix)], from /proc
    (no getifaddrs in the standard library, no subprocess): IPv4 from /proc/net/fib_trie
    (the LOCAL entries: its addresses, and any `ip route add local` block), IPv6 from
    /proc/net/if_inet6 (its addresses) and /proc/net/ipv6_route (RTF_LOCAL routes).
    None when /proc has none of them (not Linux)."""
    found, seen_any = [], False
    trie = read_proc("/proc/net/fib_trie")
    if trie:
        seen_any = True
        last = None
        for line in trie.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("|--", "+--"):
                last = words[1].partition("/")[0]
            elif len(words) >= 3 and words[0].startswith("/") and words[-1] == "LOCAL" and last:
                try:
                    found.append((4, address_value(last)[1], int(words[0][1:])))
                except ValueError:
                    pass
    for line in read_proc("/proc/net/if_inet6").splitlines():
        seen_any = True
        words = line.split()
        if words and len(words[0]) == 32:
            found.append((6, int(words[0], 16), 128))
    for line in read_proc("/proc/net/ipv6_route").splitlines():
        words = line.split()
        if len(words) >= 9 and len(words[0]) == 32 and int(words[8], 16) & 0x80000000:
            found.append((6, int(words[0], 16), int(words[1], 16)))     # RTF_LOCAL
    return found if seen_any else None


def bind_probe(ip):
    """Off Linux: is `ip` an address of this machine? The kernel lets a socket bind to it only
    then (uncached: addresses come and go)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((ip, 0))
        return True
    except (OSError, ValueError, OverflowError):
        return False


class OwnAddresses:
    """The VPS's own addresses, refused as destinations (a peer must not reach the VPS's
    own services, nor loop back into this relay). Read from /proc at most every OWN_REFRESH
    seconds (reading procfs does not block); the configured sources and listen addresses
    always count. Off Linux, and for a family /proc named no address of, each destination
    is probed with a bind instead."""

    __slots__ = ("fixed", "networks", "probed", "read_at")

    def __init__(self, fixed):
        self.fixed = list(fixed)        # [(version, value, prefix)]
        self.networks = None            # from /proc; None: not Linux (bind_probe)
        self.probed = ()                # the families /proc named none of (bind_probe)
        self.read_at = -INFINITY

    def refresh(self, now):
        """Read /proc again if the last reading is older than OWN_REFRESH."""
        if now - self.read_at >= OWN_REFRESH:
            self.read_at = now
            self.networks = local_networks_linux()
            # loopback is always among them when a family's table was read: none at all
            # means it was not (fib_trie missing, as under gVisor, or unreadable), and an
            # empty answer must not pass the VPS's own public address as a destination
            self.probed = tuple(v for v in (4, 6) if not any(
                n[0] == v for n in self.networks or ()))

    def holds(self, version, value):
        """Is the address one of this machine's (as of the last refresh)?"""
        if any(in_cidr(version, value, n) for n in self.fixed):
            return True
        if self.networks is None or version in self.probed:
            return bind_probe(value_text(version, value))
        return any(in_cidr(version, value, n) for n in self.networks)


class EgressPolicy:
    """The VPS end's rules: who may ask (peers), where to (ports, the refused table, --egress-
    deny, the VPS's own addresses), from where (sources), and how many at once per peer.
    `open` counts each peer's sessions: it only holds peers with one open, so the connection
    cap bounds it (peers are an explicit list, nobody else gets an entry)."""

    __slots__ = ("peers", "sources", "ports", "deny", "allow", "own", "per_peer", "open",
                 "warned_at", "suppressed")

    def __init__(self, peers, sources, ports, deny, allow, per_peer, own):
        self.peers = peers              # [cidr_value]
        self.sources = sources          # {4: ip, 6: ip}: the families carried, from where;
                                        # empty: both, from the kernel's choice
        self.ports = ports              # frozenset of destination ports
        self.deny = deny                # [(cidr_value, text)]
        self.allow = allow              # [cidr_value] (documentation networks only)
        self.own = own                  # OwnAddresses
        self.per_peer = per_peer
        self.open = {}                  # peer ip -> its sessions open now
        self.warned_at = -WARN_INTERVAL
        self.suppressed = 0

    def is_peer(self, ip):
        """May this client (an IP text) use the egress at all?"""
        try:
            version, value = address_value(plain_ip(ip))
        except ValueError:
            return False
        return any(in_cidr(version, value, peer) for peer in self.peers)

    def refusal(self, ip, port):
        """None when ip:port may be connected to, else (reason, why): reason is the refusals
        counter's label. Call own.refresh() first (this question has no side effects)."""
        if port not in self.ports:
            return "egress-port", "port %d is not an egress port (--egress-ports %s)" % (
                port, ",".join(map(str, sorted(self.ports))))
        try:
            version, value = address_value(ip)
        except ValueError:
            return "egress-destination", "%r is not an IP address" % ip
        why = address_class(version, value, self.allow)
        if why is not None:
            return "egress-destination", "%s is %s" % (ip, why)
        # an IPv4 address carried in an IPv6 one (NAT64, 6to4) reaches that IPv4 host too
        for inner_version, inner in [(version, value)] + embedded_v4(version, value):
            for cidr, text in self.deny:
                if in_cidr(inner_version, inner, cidr):
                    return "egress-denied", "%s is in --egress-deny %s" % (ip, text)
            if self.own.holds(inner_version, inner):
                return "egress-own", "%s is an address of this machine%s" % (ip, "" if (
                    inner == value) else " (%s)" % value_text(4, inner))
        if self.sources and version not in self.sources:
            return "egress-family", "no --egress-source for IPv%d: IPv%d is not carried" % (
                version, version)
        return None

    def source_line(self):
        """The probe's answer: where egress connections come from."""
        sources = ",".join(self.sources[v] for v in (4, 6) if v in self.sources) or "auto"
        return ("tailwart-edge egress ok source=%s ports=%s\r\n" % (
            sources, ",".join(map(str, sorted(self.ports))))).encode("ascii")

    def throttled_warning(self, now, message):
        """One warning per WARN_INTERVAL at most; the rest are counted in the next one."""
        if now - self.warned_at < WARN_INTERVAL:
            self.suppressed += 1
            return
        if self.suppressed:
            message += " (%d more like it not logged)" % self.suppressed
        self.warned_at, self.suppressed = now, 0
        log(WARNING, message)


EGRESS_ROUTE = Route([], [], "off", "egress")     # no header towards the destination
EGRESS_ROUTE.header = None


class EgressConnector(Connector):
    """The VPS end's connecting half: one address, the one the header named, from the
    family's --egress-source. It never resolves a name, and touches no Upstream: a mail
    server's destinations are many, and none of them is ours to mark down."""

    __slots__ = ("source",)

    def __init__(self, session):
        Connector.__init__(self, session, EGRESS_ROUTE)
        self.source = None

    def connect_to(self, family, sockaddr, source):
        """Connect to sockaddr from `source` (an IP, or None: the kernel's choice)."""
        self.addrs = collections.deque([(family, sockaddr)])
        self.source = source
        self.deadline = self.session.server.now + self.session.server.connect_timeout
        self.connect_next_address()

    def bind_source(self, sock):
        """Bind `sock` to the family's --egress-source before its connect; why not, or None."""
        try:
            try:        # no source port taken at bind: connect() picks it per destination
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            except OSError:
                pass
            sock.bind((self.source, 0))
        except OSError as e:
            return "cannot use source %s: %s" % (self.source, e.strerror)
        return None

    def try_next_upstream(self):
        """The one address failed: the mail server hears a temporary failure."""
        self.session.answer("connect-failed", self.error, EGRESS_UNREACHABLE)

    def check_connected(self):
        """The socket is writable: connected (stream) or failed (give up)."""
        session = self.session
        err = session.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.address_failed(os.strerror(err), FAILURE_REASONS.get(err, "other"))
            return False
        session.start_streaming()
        return True

    def timed_out(self):
        """The header did not come in time, or the connect did not complete."""
        session = self.session
        if session.stage is HEADER:
            session.answer("header-timeout", "no whole PROXY v2 header within %gs"
                           % session.server.peek_timeout, None)
        elif session.stage is CONNECTING:
            self.address_failed("timed out after %gs" % session.server.connect_timeout,
                                "timeout")


class EgressSession(Session):
    """The VPS end: a peer's connection, whose PROXY v2 header names the destination.
    HEADER (read it, strictly, within --peek-timeout) -> CONNECTING (EgressConnector) ->
    STREAMING, as any session. A LOCAL header is a health probe: it is answered with one
    line naming the source address, and closed. `peer_key` counts it against its peer's
    cap (EgressPolicy.open) until it ends."""

    __slots__ = ("peer_key",)

    def __init__(self, server, mapping, client, peer):
        Session.__init__(self, server, mapping, client, peer)
        self.connector = EgressConnector(self)
        self.peer_key = None

    def start(self):
        """Wait for the header; the sweep ends a session that sends none in time."""
        self.stage = HEADER
        self.up.pending = bytearray()
        self.reader = V2Reader()
        self.connector.deadline = self.server.now + self.server.peek_timeout
        self.update_events()

    def preread(self):
        """The client is readable before streaming: the header first, then as any session."""
        if self.stage is not HEADER:
            return Session.preread(self)
        up, relay = self.up, self.server.relay
        held = up.pending
        n = io(self.client.recv_into, self.client, relay.buffer, PREREAD_LIMIT - len(held))
        if n is None:
            return
        if not n:
            up.eof = True
            return self.answer("client-fin", "the peer closed before its header was whole",
                               None)
        up.count += n
        held += relay.view[:n]
        try:
            header = self.reader.read(held)
        except ValueError as e:
            return self.answer("header-bad", str(e), None)
        if header is None:
            if len(held) >= PREREAD_LIMIT:      # unreachable: the reader refuses earlier
                self.answer("header-bad", "no whole header in %d bytes" % len(held), None)
            return
        self.reader = None
        rest = bytes(held[header.length:])
        up.pending = memoryview(rest) if rest else None
        up.count -= header.length       # the header is ours, not the mail server's bytes
        self.header_read(header)

    def header_read(self, header):
        """The header is whole: answer a probe, or check the destination and connect."""
        policy = self.mapping.egress
        if header.command == "LOCAL":
            try:
                self.client.send(policy.source_line())
                self.client.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return self.close("probe")
        ip, port = header.destination
        ip = plain_ip(ip)               # ::ffff:a.b.c.d is IPv4: its table, its source
        connector = self.connector
        connector.host, connector.port = ip, port      # the session line names it
        smtp = PORT_PROTOCOLS.get(port) == "smtp"
        if self.peer_key is None:       # over its peer's cap (egress_accept)
            return self.answer("per-peer", "over --egress-per-peer %d" % policy.per_peer,
                               EGRESS_BUSY if smtp else None)
        policy.own.refresh(self.server.now)
        refusal = policy.refusal(ip, port)
        if refusal is not None:
            reason, why = refusal
            return self.answer(reason, why, EGRESS_REFUSED if smtp else None)
        six = ":" in ip
        family = socket.AF_INET6 if six else socket.AF_INET
        sockaddr = (ip, port, 0, 0) if six else (ip, port)
        connector.connect_to(family, sockaddr, policy.sources.get(6 if six else 4))

    def answer(self, end, reason, text):
        """End unserved: tell the mail server `text` (an SMTP reply, or None: a plain close),
        count the reason (except a connect failure: counted as no-upstream), close."""
        if text is not None and self.stage is not CLOSED and self.stage is not STREAMING:
            if PORT_PROTOCOLS.get(self.connector.port) != "smtp":
                text = None
        if text is not None:
            try:
                self.client.send(text)
                self.client.shutdown(socket.SHUT_WR)
                reason = "%s; told the client %s" % (reason, " ".join(
                    text.decode().split()[:2]))
            except OSError:
                pass
        if end != "connect-failed":
            refused = self.mapping.refused
            refused[end] = refused.get(end, 0) + 1
        self.close(end, reason)

    def close(self, end, reason=None):
        """As Session.close, and the peer's count goes down."""
        if self.stage is CLOSED:
            return
        if self.peer_key is not None:
            policy_release(self.mapping.egress, self.peer_key)
            self.peer_key = None
        Session.close(self, end, reason)


def policy_release(policy, key):
    """One session of peer `key` ended."""
    count = policy.open[key] - 1
    if count:
        policy.open[key] = count
    else:
        del policy.open[key]


class RedirectedSession(Session):
    """The mail host end: a connection the admin's netfilter rule redirected here. Its
    original destination (SO_ORIGINAL_DST) goes to the VPS in the v2 header, with the mail
    server as the source; then it relays as any session. A connection that was not
    redirected (no original destination, or this listener itself) is refused."""

    __slots__ = ("original",)

    def __init__(self, server, mapping, client, peer):
        Session.__init__(self, server, mapping, client, peer)
        self.original = None

    def start(self):
        """Find where the mail server meant to connect, then connect to the VPS."""
        self.original = original_destination(self.client, ":" in self.peer[0])
        local = self.client.getsockname()[:2]
        if self.original is None or (plain_ip(self.original[0]), self.original[1]) == \
                (plain_ip(local[0]), local[1]):
            self.update_events()
            return self.refuse("not-redirected", "no original destination: the connection "
                               "came to %s directly, not through the REDIRECT rule (see "
                               "--check)" % format_address(*local))
        Session.start(self)

    def start_streaming(self):
        """As Session.start_streaming, with the original destination in the header."""
        self.connector = None
        self.stage = STREAMING
        up = self.up
        head = proxy_header_v2(self.peer, self.original)
        up.pending = memoryview(head + up.pending.tobytes() if up.pending is not None else head)
        up.push(self.upstream, self.server.relay)

    def refuse(self, end, reason):
        """The VPS cannot be reached (or this is no redirected connection): an SMTP port
        hears a 421, a temporary failure; anything else a plain close."""
        port = self.original[1] if self.original is not None else 25
        text = EGRESS_UNREACHABLE if end == "connect-failed" else EGRESS_NOT_REDIRECTED
        if PORT_PROTOCOLS.get(port) == "smtp" and self.stage is not STREAMING and \
                self.stage is not CLOSED:
            try:
                self.client.send(text)
                self.client.shutdown(socket.SHUT_WR)
                reason = "%s; told the client %s" % (reason, " ".join(text.decode().split()[:2]))
            except OSError:
                pass
        if end != "connect-failed":
            refused = self.mapping.refused
            refused[end] = refused.get(end, 0) + 1
        self.close(end, reason)


def original_destination(sock, six):
    """(ip, port) the client connected to before netfilter's REDIRECT (or DNAT) sent it here,
    or None when nothing redirected it (ENOENT) or the kernel cannot tell."""
    try:
        if six:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)    # struct sockaddr_in6
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)   # struct sockaddr_in
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]
    except (OSError, ValueError, struct.error):
        return None


def egress_accept(server, mapping, client, peer):
    """A client on an egress listener (Server.start_session): on the VPS, refuse one that
    is no peer (silently: it learns nothing) and count it against its peer's cap; on the
    mail host, every local client is the mail server. Then start its session as usual."""
    policy = mapping.egress
    key = None
    if isinstance(policy, EgressPolicy):
        ip = plain_ip(peer[0])
        if not policy.is_peer(ip):
            client.close()
            mapping.refused["not-peer"] = mapping.refused.get("not-peer", 0) + 1
            return policy.throttled_warning(server.now, "refused client=%s listen=%s "
                                            "reason=not-peer (not in --egress-peer)" % (
                                                format_address(ip, peer[1]), mapping.label))
        if policy.open.get(ip, 0) < policy.per_peer:
            key = ip
            policy.open[ip] = policy.open.get(ip, 0) + 1
        session = EgressSession(server, mapping, client, peer)
        session.peer_key = key          # None: over the cap, answered once its header is in
    else:
        session = RedirectedSession(server, mapping, client, peer)
    server.sessions.add(session)
    mapping.active += 1
    mapping.sessions += 1
    if server.notifier.sock is not None:
        server.notifier.changed()
    session.start()


# -- the command line of both ends -------------------------------------------------------------

def add_egress(group):
    """The --egress* options: the VPS end (--egress ...) and the mail host end (--egress-via)."""
    group.add_argument("--egress", metavar="ADDR:PORT",
                       help="VPS: carry the mail host's outbound connections: listen on this "
                       "tailnet address for PROXY v2 headers naming where to connect")
    group.add_argument("--egress-peer", action="append", default=[], metavar="CIDR",
                       type=network, help="VPS: who may use --egress (the mail host's tailnet "
                       "address, /32 and /128); required, may be repeated")
    group.add_argument("--egress-source", action="append", default=[], metavar="IP",
                       help="VPS: connect from this public address (one per family; a family "
                       "without one is not carried; none: both, from the kernel's choice)")
    group.add_argument("--egress-ports", default="25", metavar="PORT,...",
                       help="VPS: destination ports carried (default: 25; below 1024 only 25, "
                       "465 and 587)")
    group.add_argument("--egress-deny", action="append", default=[], metavar="CIDR",
                       type=network, help="VPS: refuse these destinations too; may be repeated")
    group.add_argument("--egress-allow", action="append", default=[], metavar="CIDR",
                       type=network, help="VPS, labs and tests only: let a documentation "
                       "network (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, "
                       "3fff::/20) stand in for the internet")
    group.add_argument("--egress-per-peer", type=positive_int, metavar="N",
                       default=DEFAULT_EGRESS_PER_PEER, help="VPS: most egress sessions at "
                       "once per peer address (default: %d)" % DEFAULT_EGRESS_PER_PEER)
    group.add_argument("--egress-via", metavar="HOST:PORT",
                       help="mail host: carry the connections the REDIRECT rule sends to "
                       "--egress-listen to the VPS's --egress at HOST:PORT")
    group.add_argument("--egress-listen", action="append", metavar="ADDR:PORT",
                       help="mail host: where the REDIRECT rule sends the mail server's "
                       "port-25 connections (default: %s; one per family: [::1]:2525 "
                       "carries IPv6 too)" % DEFAULT_EGRESS_LISTEN)
    group.add_argument("--egress-user", metavar="NAME",
                       help="mail host: the user the mail server runs as, for the rules "
                       "--check prints (default: stalwart)")


def egress_listen_address(text, option):
    """'ADDR:PORT' (an IP literal, IPv6 in brackets) -> (ip, port); ConfigError."""
    host, port, _ = split_address(text, option, text)
    if not host or not (is_ip(host, socket.AF_INET) or is_ip(host, socket.AF_INET6)):
        raise ConfigError("%s %r: give an IP address and port, e.g. %s (a name would need a "
                          "lookup at start, and may resolve to a public address)"
                          % (option, text, "100.101.102.103:2525" if option == "--egress"
                             else DEFAULT_EGRESS_LISTEN))
    return host, parse_port(port, "%s port" % option, text)


EGRESS_PEER_ADDRESSES = 256     # an --egress-peer network names hosts, not a tailnet


def egress_given(options):
    """Is any --egress* option on the command line (then no MAPPING is needed)?"""
    return any((options.egress, options.egress_peer, options.egress_source,
                options.egress_deny, options.egress_allow, options.egress_via,
                options.egress_listen, options.egress_user, options.egress_ports != "25"))


def egress_mappings(options, mappings):
    """The listeners of the egress options, as Mappings (their `egress`: an EgressPolicy on
    the VPS, "via" on the mail host); ConfigError for what would make an open proxy or a
    leak, naming the fix."""
    found = []
    vps_only = [name for name, given in (
        ("--egress-peer", options.egress_peer), ("--egress-source", options.egress_source),
        ("--egress-deny", options.egress_deny), ("--egress-allow", options.egress_allow),
        ("--egress-ports", options.egress_ports != "25")) if given]
    if options.egress is None and vps_only:
        raise ConfigError("%s is for the VPS end: give --egress ADDR:PORT (its tailnet address) "
                          "too" % vps_only[0])
    if options.egress_via is None and (options.egress_listen or options.egress_user):
        raise ConfigError("%s is for the mail host end: give --egress-via VPS:PORT too" % (
            "--egress-listen" if options.egress_listen else "--egress-user"))
    if options.egress is not None:
        found.append(vps_mapping(options))
    if options.egress_via is not None:
        via = parse_upstream(options.egress_via, "--egress-via " + options.egress_via)
        families = set()
        for text in options.egress_listen or [DEFAULT_EGRESS_LISTEN]:
            ip, port = egress_listen_address(text, "--egress-listen")
            family = 6 if ":" in ip else 4
            if family in families:
                raise ConfigError("--egress-listen %s: one listener per family (the REDIRECT "
                                  "rule names one port)" % text)
            families.add(family)
            mapping = Mapping(ip, port, [via], "--egress-listen " + text, "smtp", (), "v2")
            mapping.egress = "via"
            found.append(mapping)
    for index, mapping in enumerate(found):
        for other in mappings + found[:index]:
            if overlapping(mapping, other):
                raise ConfigError("%s collides with %r; give it another address or port"
                                  % (mapping.spec, other.spec))
    return found


def vps_mapping(options):
    """The --egress listener and its EgressPolicy, checked (ConfigError)."""
    ip, port = egress_listen_address(options.egress, "--egress")
    version, value = address_value(ip)
    if value == 0:
        raise ConfigError("--egress %s is every address: give the VPS's tailnet address (as "
                          "`tailscale ip` prints it), never a wildcard" % options.egress)
    if inside_class(version, value) is None:
        raise ConfigError("--egress %s is not a tailnet or private address: anyone could ask "
                          "it to connect anywhere; give the VPS's tailnet address (`tailscale "
                          "ip`)" % options.egress)
    if not options.egress_peer:
        raise ConfigError("--egress without --egress-peer: give the mail host's tailnet "
                          "addresses, e.g. --egress-peer 100.64.0.7/32 --egress-peer "
                          "fd7a:115c:a1e0::7/128")
    peers = []
    for net in options.egress_peer:
        first = address_value(str(net.network_address))
        last = address_value(str(net.broadcast_address))
        if inside_class(*first) is None or inside_class(*first) != inside_class(*last):
            raise ConfigError("--egress-peer %s reaches past the tailnet and private networks; "
                              "give the mail host's tailnet address (/32, /128)" % net)
        if net.num_addresses > EGRESS_PEER_ADDRESSES:
            # a whole tailnet (100.64.0.0/10) or a provider's shared private network would
            # make every node of it, other tenants' too, a peer that may send mail as the VPS
            raise ConfigError("--egress-peer %s names %d addresses; give the mail host's own "
                              "tailnet addresses (/32 and /128), at most %d addresses a network"
                              % (net, net.num_addresses, EGRESS_PEER_ADDRESSES))
        peers.append((first[0], first[1], net.prefixlen))
    allow = []
    for net in options.egress_allow:
        first = address_value(str(net.network_address))
        last = address_value(str(net.broadcast_address))
        if not any(in_cidr(first[0], first[1], c) and in_cidr(last[0], last[1], c) and
                   name == DOCUMENTATION for c, _, name in EGRESS_TABLE):
            raise ConfigError("--egress-allow %s is not a documentation network: only those "
                              "(192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, "
                              "3fff::/20) may stand in for the internet, in a lab" % net)
        allow.append((first[0], first[1], net.prefixlen))
    sources, given = {}, {}
    for text in options.egress_source:
        try:
            source_version, source_value = address_value(text)
        except ValueError:
            raise ConfigError("--egress-source %r is not an IP address; give the VPS's public "
                              "address" % text)
        if source_version in given:
            raise ConfigError("--egress-source %s: IPv%d has one already (%s); give at "
                              "most one per family" % (text, source_version,
                                                       given[source_version]))
        given[source_version] = text
    for text in options.egress_source:
        source_version, source_value = address_value(text)
        why = address_class(source_version, source_value, allow)
        if why is not None:
            raise ConfigError("--egress-source %s is %s, not a public address; give the "
                              "address the VPS's PTR record names" % (text, why))
        if not bind_probe(text):
            raise ConfigError("--egress-source %s is not an address of this machine; give "
                              "one `ip -brief address` lists" % text)
        sources[source_version] = text
    ports = set()
    for word in options.egress_ports.split(","):
        carried = parse_port(word.strip(), "--egress-ports port", options.egress_ports)
        if carried < 1024 and carried not in EGRESS_LOW_PORTS:
            raise ConfigError("--egress-ports %d: below 1024 only 25, 465 and 587 may be "
                              "carried" % carried)
        ports.add(carried)
    deny = [((6 if n.version == 6 else 4, address_value(str(n.network_address))[1],
              n.prefixlen), str(n)) for n in options.egress_deny]
    fixed = [(version, value, 32 if version == 4 else 128)] + [
        (v, address_value(ip_text)[1], 32 if v == 4 else 128) for v, ip_text in sources.items()]
    policy = EgressPolicy(peers, sources, frozenset(ports), deny, allow,
                          options.egress_per_peer, OwnAddresses(fixed))
    mapping = Mapping(ip, port, [], "--egress " + options.egress, "tcp")
    mapping.egress = policy
    return mapping


# -- --check on either end ---------------------------------------------------------------------

EGRESS_PRIVATE_V4 = ("0.0.0.0/8,10.0.0.0/8,100.64.0.0/10,127.0.0.0/8,169.254.0.0/16,"
                     "172.16.0.0/12,192.168.0.0/16")
EGRESS_PRIVATE_V6 = "::1/128,fc00::/7,fe80::/10"
SIOCGIFADDR = 0x8915            # linux/sockios.h: an interface's IPv4 address


def run_check(options, mappings):
    """--check: the Doctor for the mappings, then the egress listeners (egress_check)."""
    plain = [m for m in mappings if m.egress is None]
    code = Doctor(options, plain).run() if plain else 0
    egress = [m for m in mappings if m.egress is not None]
    return max(code, egress_check(options, egress)) if egress else code


def egress_check(options, mappings):
    """Check the egress listeners: bind, and on the mail host print the netfilter rules to
    install and probe the VPS with a v2 LOCAL header. Exit code 0 or 1."""
    doctor = Doctor(options, mappings)
    print("tailwart-edge %s egress check, timeout %gs" % (__version__, options.connect_timeout))
    for mapping in mappings:
        doctor.report([check_listen(mapping)])
        policy = mapping.egress
        if isinstance(policy, EgressPolicy):
            doctor.report([("ok", "egress", "%s carries ports %s for peers %s from %s" % (
                mapping.label, ",".join(map(str, sorted(policy.ports))),
                ",".join("%s/%d" % (value_text(v, n), p) for v, n, p in policy.peers),
                ",".join(policy.sources.values()) or "the address the kernel picks"))])
    via = [m for m in mappings if m.egress == "via"]
    if via:
        print("# the rules to install on the mail host, as root (the script never runs them):")
        for line in egress_rules(via, options.egress_user or "stalwart"):
            print(line)
        host, port = via[0].upstreams[0]
        doctor.report(probe_egress(host, port, options.connect_timeout))
    if doctor.failures:
        print("verdict: %d of %d egress checks failed" % (doctor.failures, doctor.found))
        return 1
    print("verdict: ok, %d egress checks passed" % doctor.found)
    return 0


def egress_rules(mappings, user):
    """The iptables/ip6tables commands that send the mail server's port-25 connections to the
    egress listeners: IPv4 REDIRECT (the mail server's user only, on a bare-metal host; what
    comes in on the listener's interface, for a Docker bridge), private and tailnet
    destinations excluded; IPv6 port 25 rejected, unless an IPv6 listener carries it."""
    v4 = next((m for m in mappings if ":" not in m.bind), None)
    v6 = next((m for m in mappings if ":" in m.bind), None)
    lines = []
    if v4 is not None:
        lines += ["iptables -t nat -N TAILWART_EGRESS",
                  "iptables -t nat -A TAILWART_EGRESS -d %s -j RETURN" % EGRESS_PRIVATE_V4,
                  "iptables -t nat -A TAILWART_EGRESS -p tcp -j REDIRECT --to-ports %d" % v4.port]
        if v4.bind.startswith("127."):
            # REDIRECT sends what this host itself sends to 127.0.0.1 (iptables-extensions(8))
            lines.append("iptables -t nat -A OUTPUT -p tcp --dport 25 -m owner --uid-owner %s "
                         "-j TAILWART_EGRESS" % user)
        else:
            # a container's connection comes in on the bridge; REDIRECT sends it to the
            # bridge's own address, where the listener is
            lines.append("iptables -t nat -A PREROUTING -i %s -p tcp --dport 25 -j "
                         "TAILWART_EGRESS" % (interface_of(v4.bind) or "BRIDGE"))
    if v6 is not None:
        lines += ["ip6tables -t nat -N TAILWART_EGRESS",
                  "ip6tables -t nat -A TAILWART_EGRESS -d %s -j RETURN" % EGRESS_PRIVATE_V6,
                  "ip6tables -t nat -A TAILWART_EGRESS -p tcp -j REDIRECT --to-ports %d"
                  % v6.port,
                  "ip6tables -t nat -A OUTPUT -p tcp --dport 25 -m owner --uid-owner %s -j "
                  "TAILWART_EGRESS" % user]
    else:
        lines += ["ip6tables -N TAILWART_NO_EGRESS6",
                  "ip6tables -A TAILWART_NO_EGRESS6 -d %s -j RETURN" % EGRESS_PRIVATE_V6,
                  "ip6tables -A TAILWART_NO_EGRESS6 -p tcp -j REJECT --reject-with tcp-reset",
                  "ip6tables -A OUTPUT -p tcp --dport 25 -j TAILWART_NO_EGRESS6",
                  "ip6tables -A FORWARD -p tcp --dport 25 -j TAILWART_NO_EGRESS6"]
    return lines


def interface_of(ip):
    """The name of the interface that has IPv4 address `ip` (Linux), or None."""
    if fcntl is None or not hasattr(socket, "if_nameindex"):
        return None
    try:
        names = [name for _, name in socket.if_nameindex()]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for name in names:
                try:
                    raw = fcntl.ioctl(sock.fileno(), SIOCGIFADDR,
                                      struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue
                if socket.inet_ntoa(raw[20:24]) == ip:
                    return name
    except OSError:
        pass
    return None


def probe_egress(host, port, timeout):
    """Ask the VPS's egress with a v2 LOCAL header; [(status, topic, text)]."""
    try:
        sock = socket.create_connection((host, port), timeout)
    except OSError as e:
        return [("FAIL", "egress", "%s: %s; is the VPS's --egress listening there, and this "
                 "host in its --egress-peer?" % (format_address(host, port),
                                                  getattr(e, "strerror", None) or e))]
    try:
        sock.settimeout(timeout)
        sock.sendall(V2_SIGNATURE + struct.pack("!BBH", V2_LOCAL_COMMAND, V2_UNSPEC, 0))
        answer = LineReader(sock, timeout).readline()
    except OSError:
        answer = None
    finally:
        sock.close()
    if answer and answer.startswith("tailwart-edge egress ok"):
        return [("ok", "egress", "%s answers: %s" % (format_address(host, port),
                                                      answer.strip()))]
    return [("FAIL", "egress", "%s did not answer the probe (%s); is this host in the VPS's "
             "--egress-peer?" % (format_address(host, port),
                                 "closed" if answer is None or not answer else quote(answer)))]


# ----------------------------------------------------------------------------------------------
# The loop: timers, the sweep (timeouts), signals, drain, stats
# ----------------------------------------------------------------------------------------------

class Timers:
    """Callbacks due at a time, kept on a heap and run from the loop.

    call_later() returns the entry, which cancel() cancels. A callback that
    raises is reported through server.handle_error() and the others still run. every()
    schedules the next run before the callback runs, so a periodic job that raises once
    (the sweep: every idle and connect timeout) still runs next time.
    """

    __slots__ = ("server", "heap", "seq")

    def __init__(self, server):
        self.server = server
        self.heap = []              # [when, seq, callback, argument]
        self.seq = itertools.count()

    def call_later(self, delay, callback, argument=None):
        """Run callback(argument) from the loop after `delay` seconds."""
        entry = [self.server.now + delay, next(self.seq), callback, argument]
        heapq.heappush(self.heap, entry)
        return entry

    @staticmethod
    def cancel(entry):
        """The callback of a call_later() entry will not run (it leaves the heap when due)."""
        entry[2] = None

    def every(self, interval, callback):
        """Run callback() from the loop every `interval` seconds, whatever it raises."""
        def periodic(_):
            self.call_later(interval, periodic)
            callback()
        self.call_later(interval, periodic)

    def run_due(self):
        """Run what is due (setting server.now); return how long the loop may sleep."""
        heap, server = self.heap, self.server
        server.now = now = time.monotonic()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if entry[2] is not None:
                try:
                    entry[2](entry[3])
                except Exception:
                    server.handle_error(getattr(entry[2], "__self__", None))
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
        return max(0.0, heap[0][0] - now) if heap else None


class Waker:
    """Wakes the loop: for signals (set_wakeup_fd writes a byte on each) and for resolver
    answers (called from the worker threads).

    A pipe, where the OS has one: it holds 64 KiB of wake-ups, where a socketpair fills
    after a few hundred. The resolver writes at most one byte per trip through the loop
    (`pending`), and a wake-up lost to a full pipe changes nothing: the loop empties the
    whole pipe and then looks at every queue anyway. So it never overflows noisily.
    """

    __slots__ = ("server", "fd", "wfd", "read", "write", "pending", "keep")

    def __init__(self, server):
        self.server = server
        self.pending = False
        if os.name == "posix":
            self.fd, self.wfd = os.pipe()
            self.read = lambda fd=self.fd: os.read(fd, 4096)
            self.write = lambda fd=self.wfd: os.write(fd, b"\0")
            self.keep = None
            for fd in (self.fd, self.wfd):
                os.set_blocking(fd, False)
        else:                       # Windows: select() and set_wakeup_fd() take sockets only
            rsock, wsock = self.keep = socket.socketpair()
            rsock.setblocking(False)
            wsock.setblocking(False)
            self.fd, self.wfd = rsock.fileno(), wsock.fileno()
            self.read = lambda: rsock.recv(4096)
            self.write = lambda: wsock.send(b"\0")

    def __call__(self):
        """Wake the loop (from a resolver thread)."""
        if not self.pending:
            self.pending = True
            try:
                self.write()
            except OSError:
                pass            # full: the loop has a wake-up coming anyway

    def for_signals(self):
        """Let signals wake the loop too; no warning (from Python >= 3.7) if the pipe fills."""
        try:
            signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)
        except TypeError:       # Python 3.6
            signal.set_wakeup_fd(self.wfd)

    def on_event(self, fd, mask):
        """Empty the pipe, then hand finished lookups to those waiting for them."""
        try:
            while self.read():
                pass
        except OSError:
            pass
        self.pending = False    # before dispatch: an answer posted from now on wakes us again
        self.server.resolver.dispatch()


class Timeouts:
    """The connect, idle and half-close timeouts, checked for every session by one sweep.

    One pass over all sessions every `sweep_interval` (a quarter of the shortest timeout,
    at most 1 s) is cheaper, in time and memory, than a timer per session: a session only
    notes when it was last active (`active_at`) or when its current connect step is due
    (`connector.deadline`).
    """

    __slots__ = ("idle", "half_close", "sweep_interval")

    def __init__(self, options):
        self.idle = options.idle_timeout
        self.half_close = options.half_close_timeout
        self.sweep_interval = max(0.05, min(1.0, options.idle_timeout / 4,
                                            options.connect_timeout / 4,
                                            options.half_close_timeout / 4,
                                            options.peek_timeout / 4))

    def sweep(self, sessions, now):
        """Close sessions silent both ways for the idle timeout (or, once one side has sent
        FIN, for the half-close timeout); move on those whose peek, lookup or connect is
        late. Turn keepalive on for the upstream socket of a session seen streaming."""
        for s in sessions:
            if not s.kept_alive and s.stage is STREAMING:
                s.kept_alive = True
                keep_alive(s.upstream)
        idle, half_closed = now - self.idle, now - self.half_close
        late = [s for s in sessions
                if (s.active_at < (idle if s.end is None else half_closed)
                    if s.stage is STREAMING else s.connector.deadline < now)]
        for session in late:
            if session.stage is not STREAMING:
                session.connector.timed_out()
            elif session.end is None:
                session.close("idle-timeout")
            else:
                session.close("half-close-timeout")


EPOLL = getattr(select, "epoll", None)
POLL_MAX = 1024                 # events taken per loop turn; the rest stay ready for the next


class Poller:
    """What the loop waits for: `selectors`' register/modify/unregister/select, trimmed for
    a relay that changes what it waits for several times per connection.

    On Linux it is epoll itself, with each fd's data in a dict: selectors' EpollSelector
    builds a SelectorKey namedtuple per register and modify (and keeps one per fd: 72
    bytes, two per session) and looks each ready fd's key up through a method call, which
    was ~4 us of the ~30 us of Python per relayed connection (profile in the closing note
    of issue 15). forget() drops an fd whose socket is about to be closed with
    no epoll_ctl: closing it takes it out of the epoll set (sessions' sockets are never
    duplicated). Elsewhere the platform's selectors.DefaultSelector does the work behind
    the same calls. select() returns (data, fd, mask) with selectors' masks: an error or a
    hang-up is READ|WRITE, as there, but not narrowed to what was registered (selectors
    does that): every handler ignores the mask or narrows it itself (Session.on_event).
    """

    __slots__ = ("epoll", "data", "selector")

    def __init__(self):
        self.data = {}                  # fd -> what its events go to (on_event(fd, mask))
        self.epoll = EPOLL() if EPOLL is not None else None
        self.selector = selectors.DefaultSelector() if EPOLL is None else None

    def register(self, fd, events, data):
        if self.epoll is None:
            self.selector.register(fd, events, data)
        else:
            self.epoll.register(fd, TO_EPOLL[events])
        self.data[fd] = data

    def modify(self, fd, events, data):
        if self.epoll is None:
            self.selector.modify(fd, events, data)
        else:
            self.epoll.modify(fd, TO_EPOLL[events])
        self.data[fd] = data

    def unregister(self, fd):
        del self.data[fd]
        if self.epoll is None:
            self.selector.unregister(fd)
        else:
            self.epoll.unregister(fd)

    def forget(self, fd):
        """fd's socket is closed next: stop delivering its events, at no syscall."""
        if self.epoll is None:
            return self.unregister(fd)
        del self.data[fd]

    def select(self, timeout=None):
        """[(data, fd, mask)] of the fds ready within `timeout` seconds (None: no limit)."""
        if self.epoll is None:
            return [(key.data, key.fd, mask) for key, mask in self.selector.select(timeout)]
        if timeout is None:
            timeout = -1
        elif timeout > 0:
            # epoll_wait() counts milliseconds: round up, to wait at least `timeout`
            timeout = -(-timeout * 1000 // 1) / 1000
        else:
            timeout = 0
        data = self.data
        ready = []
        for fd, event in self.epoll.poll(timeout, POLL_MAX):
            owner = data.get(fd)
            if owner is not None:
                ready.append((owner, fd, FROM_EPOLL[event & EPOLL_MASK]))
        return ready


if EPOLL is not None:
    TO_EPOLL = (0, select.EPOLLIN, select.EPOLLOUT, select.EPOLLIN | select.EPOLLOUT)
    EPOLL_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
    # selectors' rule: anything but EPOLLIN alone means writable, anything but EPOLLOUT
    # alone readable (so an error or a hang-up wakes both a reader and a writer)
    FROM_EPOLL = [(WRITE if event & ~select.EPOLLIN else 0) | (READ if event & ~select.EPOLLOUT
                                                                 else 0)
                  for event in range(EPOLL_MASK + 1)]


class Server:
    """Runs every session from one selectors loop.

    It owns the selector, the timers and timeouts, the acceptor, the resolver and the relay
    mode, and keeps the set of live sessions. serve_forever() runs until a drain ends: timers first,
    then the ready sockets (each key's data has on_event(fd, mask)), then the signals
    that arrived. Errors that are bugs, not bad peers, are logged by handle_error() and
    close only the session they happened in.
    """

    def __init__(self, options, mappings, listeners, argv=()):
        self.argv = list(argv)          # as given: a reload starts the new process with them
        self.mappings = mappings
        self.listen_ports = {m.port for m in mappings}
        self.upstreams = {}             # (host, port) -> Upstream, shared by the mappings
        for mapping in mappings:
            for route in mapping.routes:
                route.header = HEADERS[route.proxy or options.proxy_protocol]
            for host, port in mapping.upstreams:
                if (host, port) not in self.upstreams:
                    self.upstreams[host, port] = Upstream(host, port)
        self.own_addresses = {}         # (ip, port) -> is it our own listener?
        self.connect_timeout = options.connect_timeout
        self.peek_timeout = options.peek_timeout
        self.drain_timeout = options.drain_timeout
        self.reload_drain = options.reload_drain
        self.pid_file = options.pid_file and os.path.abspath(options.pid_file)
        self.drain_end = None           # the timer that ends the drain
        self.timeouts = Timeouts(options)
        self.selector = Poller()
        self.now = time.monotonic()
        self.timers = Timers(self)
        self.sessions = set()
        self.starved = collections.deque()  # STARVED sessions, first come first served
        self.starved_timer = None       # retries them while no session ends
        self.running = False
        self.stopping = False
        self.waker = Waker(self)
        self.resolver = Resolver(self.waker, options.dns_ttl)
        self.selector.register(self.waker.fd, READ, self.waker)
        self.relay = Relay(options.relay)
        max_sessions, self.relay.pipes.limit = capacity(len(mappings), options.max_connections)
        self.acceptor = Acceptor(self, listeners, max_sessions)
        self.clients = Clients(options)
        self.notifier = Notifier(self)
        self.reload = Reload(self)
        self.metrics = None             # Metrics, with --metrics

    # -- sessions ------------------------------------------------------------------------------

    def watch(self, fd, old, new, data):
        """Change what the selector waits for on fd (0 = nothing)."""
        if not old:
            self.selector.register(fd, new, data)
        elif not new:
            self.selector.unregister(fd)
        else:
            self.selector.modify(fd, new, data)

    def is_own_address(self, sockaddr):
        """Is this upstream address one of our own listeners (a self-loop)? Asked on every
        connect whose port we listen on too (25=mx:25), so the answer is kept per address."""
        own = self.own_addresses.get(sockaddr[:2])
        if own is None:
            own = own_listener(self.mappings, sockaddr[0], sockaddr[1]) is not None
            if len(self.own_addresses) < 1024:
                self.own_addresses[sockaddr[:2]] = own
        return own

    def start_session(self, mapping, client, peer):
        """A client was accepted: refuse it if the lists or its limits say so, else count
        it and start its session."""
        if log.threshold >= DEBUG:
            log(DEBUG, "accept client=%s listen=%s"
                % (format_address(plain_ip(peer[0]), peer[1]), mapping.label))
        if mapping.egress is not None:
            return egress_accept(self, mapping, client, peer)
        entry, refusal = self.clients.admit(peer[0], self.now)
        if refusal is not None:
            return self.refuse_client(mapping, client, peer, refusal)
        session = Session(self, mapping, client, peer)
        session.client_entry = entry
        self.sessions.add(session)
        mapping.active += 1
        mapping.sessions += 1
        if self.notifier.sock is not None:
            self.notifier.changed()
        session.start()

    def refuse_client(self, mapping, client, peer, reason):
        """Close a client the lists or its limits refuse, before any upstream is tried:
        over a limit it is told so in its protocol; a denied one hears nothing. One line
        per client and reason a minute at most."""
        text = LIMIT_REFUSALS.get(mapping.protocol) if reason != "denied" else None
        try:
            if text is not None:
                client.send(text)
                client.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        client.close()
        mapping.refused[reason] = mapping.refused.get(reason, 0) + 1
        entry = self.clients.entries.get(self.clients.key(peer[0]))
        first = entry is None or not entry.refusals
        if entry is not None:
            entry.refusals += 1
        if first:
            log(WARNING, "refused client=%s listen=%s reason=%s%s" % (
                format_address(plain_ip(peer[0]), peer[1]), mapping.label, reason,
                " (more from this client this minute are counted, not logged)"
                if entry is not None else ""))

    def session_ended(self, session, end, reason):
        """Called once by Session.close(): count it, write its line, make room for the next."""
        mapping = session.mapping
        self.sessions.discard(session)
        if session.client_entry is not None:
            self.clients.release(session.client_entry)
        mapping.active -= 1
        mapping.up += session.up.count
        mapping.down += session.down.count
        if end == "connect-failed":
            mapping.failed += 1
            log(WARNING, session_line(session, end, reason))
        elif end in EGRESS_WARNINGS:
            log(WARNING, session_line(session, end, reason))
        elif log.threshold >= INFO:
            log(INFO, session_line(session, end, reason))
        if self.notifier.sock is not None:
            self.notifier.changed()
        if self.starved:
            self.feed_starved()         # its descriptors go to those waiting first
        if self.stopping:
            if not self.sessions:
                self.running = False
        elif not self.acceptor.accepting:
            self.acceptor.resume()

    def starve(self, session, error):
        """No descriptor for `session`'s upstream socket (EMFILE: some were held that the
        cap did not count). Its client waits (it has been told nothing) while the cap is
        lowered to the sessions that have their descriptors and accepting pauses; each
        session that ends, or failing that a retry every ACCEPT_PAUSE, feeds the waiting."""
        connector = session.connector
        connector.deadline = INFINITY      # no connect timeout while it waits
        if session.stage is STARVED:
            return                      # a retry that failed again: still first in line
        session.stage = STARVED
        self.starved.append(session)
        acceptor = self.acceptor
        fed = len(self.sessions) - len(self.starved)
        if fed < acceptor.max_sessions:
            acceptor.max_sessions = max(1, fed)
        acceptor.out_of_fds("connect to %s: %s; max-connections lowered to %d, accepted "
                            "clients wait for a descriptor" % (
                                connector.host, error.strerror, acceptor.max_sessions), None)
        if self.starved_timer is None:
            self.starved_timer = self.timers.call_later(ACCEPT_PAUSE, self.retry_starved)

    def feed_starved(self):
        """Give the STARVED sessions, oldest first, the descriptors that are free now."""
        starved = self.starved
        while starved:
            session = starved[0]
            if session.stage is STARVED:
                session.connector.deadline = self.now + self.connect_timeout
                session.connector.connect_next_address()
                if session.stage is STARVED:
                    return              # none free yet
            starved.popleft()           # connecting, or closed meanwhile

    def retry_starved(self, _=None):
        """The timer: descriptors may have been freed by other than a session (a lookup,
        a scrape): feed the waiting, and come back while some still wait. Once none wait,
        the lowered cap grows back, doubling every CAP_REGROW seconds up to the start's:
        a shortage that has passed (ENFILE: the whole system's table, full for a while)
        must not shrink the relay for the rest of its life; should it come again, the
        clients it meets wait again, and the cap comes down again."""
        self.starved_timer = None
        self.feed_starved()
        if not self.running:
            return
        acceptor = self.acceptor
        if self.starved:
            self.starved_timer = self.timers.call_later(ACCEPT_PAUSE, self.retry_starved)
        elif acceptor.max_sessions < acceptor.cap:
            acceptor.max_sessions = min(acceptor.cap, 2 * acceptor.max_sessions)
            if acceptor.max_sessions == acceptor.cap:
                log(NOTICE, "max-connections back to %d" % acceptor.cap)
            acceptor.resume()
            self.starved_timer = self.timers.call_later(CAP_REGROW, self.retry_starved)

    def handle_error(self, data):
        """A bug, not a bad peer: log it loudly, close the session it happened in, carry on."""
        why = log_internal_error()
        if isinstance(data, Session):
            try:
                data.close("error", why)
            except Exception:
                pass

    # -- running -------------------------------------------------------------------------------

    def serve_forever(self, predecessor=None):
        """Start, then run the loop until the drain ends: timers first, then the ready
        sockets (each key's data has on_event(fd, mask)), then the signals that came."""
        self.start(predecessor)
        select = self.selector.select
        run_due = self.timers.run_due
        handle_error = self.handle_error
        if SIGNALS:
            self.on_signals(starting=True)      # those that came during start-up
        while self.running:
            timeout = run_due()
            if not self.running:
                break
            events = select(timeout)
            self.now = time.monotonic()
            for data, fd, mask in events:
                try:
                    data.on_event(fd, mask)
                except Exception:
                    handle_error(data)
            if SIGNALS:
                self.on_signals()
        log(NOTICE, "stopped sessions=%d" % sum(m.sessions for m in self.mappings))
        if self.pid_file is not None:
            remove_pid_file(self.pid_file)

    def start(self, predecessor):
        """Accept, start the sweep, look the names up, and say `ready`: in the log, to the
        process this one replaces (on `predecessor`, a reload), and to systemd."""
        catch_signals()
        self.waker.for_signals()
        self.running = True
        self.acceptor.resume()
        timeouts = self.timeouts
        self.timers.every(timeouts.sweep_interval, lambda: timeouts.sweep(self.sessions, self.now))
        self.timers.every(CLIENT_WINDOW, lambda: self.clients.sweep(self.now))
        self.resolver.warm({host for m in self.mappings for host, _ in m.upstreams})
        log(NOTICE, "ready pid=%d version=%s listeners=%d relay=%s max-connections=%d"
            % (os.getpid(), __version__, len(self.acceptor.listeners), self.relay.mode,
               self.acceptor.max_sessions))
        if predecessor is not None:
            take_over(predecessor)
        if self.pid_file is not None:
            write_pid_file(self.pid_file)
        self.notifier.ready()

    # -- signals, drain, stats -----------------------------------------------------------------

    def on_signals(self, starting=False):
        """Act once on each kind of signal queued since the last time (a storm of USR1
        writes one stats line): USR1 logs the counters, HUP reloads (not while `starting`:
        a HUP in start-up only must not kill us), TERM and INT drain."""
        for signum in take_signals():
            if signum == getattr(signal, "SIGUSR1", None):
                log(NOTICE, stats_line(self.mappings, self.sessions, self.upstreams.values()))
            elif signum == getattr(signal, "SIGHUP", None):
                if starting:
                    log(NOTICE, "reload: a HUP came during start-up; ignoring it")
                    write_reload_status("failed pid %d was starting up; nothing was reloaded: "
                                        "reload again" % os.getpid())
                else:
                    self.reload.start()
            else:
                self.reload.abort()
                self.begin_drain(self.drain_timeout)

    def begin_drain(self, timeout, handed_over=False):
        """Stop accepting and release the ports; let open sessions finish, up to `timeout`.
        TERM/INT: the drain timeout; a second one closes what is left at once. A hand-over
        (reload): the reload drain, which a TERM/INT then shortens to the drain timeout."""
        if self.stopping:
            if self.drain_end is not None and self.drain_end[0] - self.now > timeout:
                log(NOTICE, "stopping active=%d drain=%gs" % (len(self.sessions), timeout))
                Timers.cancel(self.drain_end)
                self.drain_end = self.timers.call_later(timeout, self.end_drain)
                return
            log(NOTICE, "second stop signal; closing %s now" % plural(len(self.sessions),
                                                                      "session"))
            return self.end_drain()
        self.stopping = True
        self.acceptor.close()
        if self.metrics is not None:
            self.metrics.close()
        if not handed_over:
            self.notifier.stopping()
            log(NOTICE, "stopping active=%d drain=%gs%s" % (
                len(self.sessions), timeout, "; a second TERM/INT (Ctrl-C) closes %s now"
                % ("it" if len(self.sessions) == 1 else "them") if self.sessions else ""))
        if not self.sessions:
            self.running = False
        else:
            self.drain_end = self.timers.call_later(timeout, self.end_drain)

    def end_drain(self, _=None):
        """The drain ran out: close every session left, and leave the loop."""
        for session in list(self.sessions):
            session.close("drain")
        self.running = False


def write_pid_file(path):
    """Our pid into `path`, replaced whole (a reader never sees half a pid). A file that
    cannot be written is a warning: the relay serves on without it."""
    try:
        temporary = "%s.%d" % (path, os.getpid())
        with open(temporary, "w") as f:
            f.write("%d\n" % os.getpid())
        os.rename(temporary, path)
    except OSError as e:
        log(WARNING, "--pid-file %s: %s; make its directory writable by the relay's user"
            % (path, e.strerror))


def remove_pid_file(path):
    """At the stop: remove `path` if it still names us (after a reload it names the new
    process, and stays)."""
    try:
        with open(path) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(path)
    except (OSError, ValueError):
        pass


def plural(count, noun):
    """plural(1, "session") -> '1 session'; plural(3, "session") -> '3 sessions'."""
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def log_internal_error():
    """Log the exception being handled as an internal error, where it happened included
    (the whole traceback at debug level); returns `Kind: message`."""
    kind, error, trace = sys.exc_info()
    where = traceback.extract_tb(trace)[-1]
    log(ERROR, "internal error: %s: %s at %s:%d in %s()" % (
        kind.__name__, error, os.path.basename(where[0]), where[1], where[2]))
    for line in traceback.format_exc().rstrip().splitlines():
        log(DEBUG, line)
    return "%s: %s" % (kind.__name__, error)


def live_bytes(sessions):
    """{mapping: [up, down]}: the bytes open sessions have moved so far."""
    live = collections.defaultdict(lambda: [0, 0])
    for session in sessions:
        counts = live[session.mapping]
        counts[0] += session.up.count
        counts[1] += session.down.count
    return live


def stats_line(mappings, sessions, upstreams=()):
    """The `stats` line of SIGUSR1: totals, then per mapping (live sessions' bytes
    included), then per upstream (attempts, and failed ones)."""
    live = live_bytes(sessions)
    parts, totals = [], [0, 0, 0, 0, 0]
    for m in mappings:
        row = (m.active, m.sessions, m.failed, m.up + live[m][0], m.down + live[m][1])
        totals = [a + b for a, b in zip(totals, row)]
        parts.append("%s active=%d sessions=%d failed=%d up=%d down=%d" % ((m.label,) + row)
                     + "".join(" refused-%s=%d" % item for item in sorted(m.refused.items()))
                     + "".join(" routed-%s=%d" % item for item in sorted(m.routed.items()))
                     + "".join(" unrouted-%s=%d" % item for item in sorted(m.unrouted.items())))
    for upstream in upstreams:
        parts.append("upstream %s attempts=%d failed=%d skipped=%d%s" % (
            upstream.label, upstream.attempts, sum(upstream.failures.values()),
            upstream.skipped, " down" if upstream.streak else ""))
    return ("stats active=%d sessions=%d failed=%d up=%d down=%d | %s"
            % (tuple(totals) + (" | ".join(parts),)))


# ----------------------------------------------------------------------------------------------
# Metrics: --metrics ADDR:PORT, the Prometheus text format over HTTP, served from the loop
# ----------------------------------------------------------------------------------------------

METRICS_CLIENTS = 8             # scrapes served at once; a 9th makes room (Metrics.on_event)
METRICS_REQUEST = 8192          # the most of a request read (the request line and headers)
METRICS_LINE_TIMEOUT = 1.0      # a scrape whose request line is not whole by then is closed
METRICS_TIMEOUT = 5.0           # ... and one not answered by then (a whole request, a reader)
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# one metric family of the exposition: its name (after tailwart_edge_), counter or gauge, its
# HELP text, and its samples as (labels text, value)
Family = collections.namedtuple("Family", "name kind help samples")


class Metrics:
    """The --metrics listener. A scrape is read, answered and closed by the loop itself,
    without blocking it: a scraper that sends slowly or never reads holds its own small
    buffers until METRICS_TIMEOUT (METRICS_LINE_TIMEOUT for its request line), never the
    relay. The socket is handed to the new process on a reload (TAILWART_METRICS_FD), as
    the listeners are."""

    __slots__ = ("server", "sock", "scrapes", "started")

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.scrapes = collections.OrderedDict()   # Scrape -> None, oldest first
        self.started = time.time()
        sock.setblocking(False)
        server.selector.register(sock.fileno(), READ, self)

    def on_event(self, fd, mask):
        """Accept the scrapes waiting. When METRICS_CLIENTS are open, the oldest that has not
        sent a whole request makes room: closing the newest instead let a few idle
        connections, renewed, lock Prometheus out (up == 0 on a healthy relay)."""
        for _ in range(METRICS_CLIENTS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                return log(DEBUG, "metrics: accept: %s" % e.strerror)
            if len(self.scrapes) >= METRICS_CLIENTS:
                waiting = next((scrape for scrape in self.scrapes if scrape.answer is None),
                               None)
                if waiting is None:     # all are being answered: each ends soon
                    conn.close()
                    continue
                waiting.close()
            conn.setblocking(False)
            scrape = Scrape(self, conn)
            self.scrapes[scrape] = None

    def close(self):
        """Stop serving metrics (the drain): the port is released."""
        for scrape in list(self.scrapes):
            scrape.close()
        if self.sock.fileno() >= 0:
            self.server.selector.unregister(self.sock.fileno())
            self.sock.close()

    def page(self):
        """The exposition: every counter and gauge, as text (format 0.0.4)."""
        lines = []
        for part in (self.process_families, self.listener_families, self.upstream_families,
                     self.resource_families):
            for family in part():
                lines.append("# HELP tailwart_edge_%s %s" % (family.name, family.help))
                lines.append("# TYPE tailwart_edge_%s %s" % (family.name, family.kind))
                for labelled, value in family.samples:
                    lines.append("tailwart_edge_%s%s %s" % (family.name, labelled, value))
        return "\n".join(lines) + "\n"

    def process_families(self):
        """The version and the process's age."""
        yield Family("info", "gauge", "The relay's version.", [(labels(version=__version__), 1)])
        yield Family("start_time_seconds", "gauge", "When the process started, in Unix time.",
                     [("", "%.3f" % self.started)])
        yield Family("uptime_seconds", "gauge", "Seconds since the process started.",
                     [("", "%.3f" % (time.time() - self.started))])

    def listener_families(self):
        """Per listener: its sessions, their bytes, the clients refused, the routes taken."""
        server = self.server
        mappings = server.mappings
        live = live_bytes(server.sessions)
        yield Family("sessions_total", "counter", "Client connections accepted.",
                     [(labels(listen=m.label), m.sessions) for m in mappings])
        yield Family("sessions_active", "gauge", "Sessions open now.",
                     [(labels(listen=m.label), m.active) for m in mappings])
        yield Family("bytes_total", "counter", "Bytes relayed: up is client to upstream, down is "
                     "upstream to client (open sessions included).",
                     [(labels(listen=m.label, direction=way), total + live[m][i] if m in live
                       else total) for m in mappings
                      for i, (way, total) in enumerate((("up", m.up), ("down", m.down)))])
        yield Family("refusals_total", "counter", "Clients closed unserved, by reason "
                     "(no-upstream: every upstream failed; per-client, per-client-rate: a limit; "
                     "denied: the lists; no-route, peek-timeout, peek-bad, client-fin: a "
                     "listener routing by name found no route, no whole ClientHello or request "
                     "head, or the client left first).",
                     [(labels(listen=m.label, reason=reason), count) for m in mappings
                      for reason, count in sorted(refusals(m).items())])
        yield Family("routed_total", "counter", "Sessions of a listener routing by name, by the "
                     "rule that matched (default: the default route).",
                     [(labels(listen=m.label, route=item), count) for m in mappings
                      for item, count in sorted(m.routed.items())])

    def upstream_families(self):
        """Per upstream: attempts, passive health, failures by reason."""
        upstreams = list(self.server.upstreams.values())
        yield Family("upstream_attempts_total", "counter", "Sessions that tried this upstream.",
                     [(labels(upstream=u.label), u.attempts) for u in upstreams])
        yield Family("upstream_up", "gauge", "1 while sessions may use this upstream, 0 while "
                     "it is skipped after failures (passive health).",
                     [(labels(upstream=u.label), int(not u.streak)) for u in upstreams])
        yield Family("upstream_skipped_total", "counter", "Sessions that went past this "
                     "upstream while it was down.",
                     [(labels(upstream=u.label), u.skipped) for u in upstreams])
        yield Family("upstream_failures_total", "counter", "Attempts on this upstream that "
                     "failed, by reason.",
                     [(labels(upstream=u.label, reason=reason), count)
                      for u in upstreams for reason, count in sorted(u.failures.items())])

    def resource_families(self):
        """What the relay holds against its limits: clients, lookups, sessions, descriptors,
        the log."""
        server = self.server
        yield Family("clients_tracked", "gauge", "Clients (IPv4 addresses, IPv6 /64s) in the "
                     "per-client table.", [("", len(server.clients.entries))])
        yield Family("resolver_failures_total", "counter", "Upstream name lookups that failed.",
                     [(labels(host=host), count)
                      for host, count in sorted(server.resolver.failures.items())])
        yield Family("max_sessions", "gauge", "Sessions allowed at once (--max-connections).",
                     [("", server.acceptor.max_sessions)])
        fds = open_fds()
        yield Family("open_fds", "gauge", "File descriptors open.", [("", fds)] if fds else [])
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource else None
        yield Family("max_fds", "gauge", "The open-file limit.",
                     [("", limit)] if limit is not None and limit >= 0 else [])
        yield Family("log_dropped_lines_total", "counter", "Log lines dropped while stderr was "
                     "blocked.", [("", log.dropped_total)])


class Scrape:
    """One HTTP connection to the metrics port: read the request, answer, close."""

    __slots__ = ("metrics", "conn", "request", "line_end", "answer", "timer", "events")

    def __init__(self, metrics, conn):
        self.metrics = metrics
        self.conn = conn
        self.request = bytearray()      # at most METRICS_REQUEST bytes
        self.line_end = -1              # where the request line ends, once it has
        self.answer = None
        self.timer = metrics.server.timers.call_later(METRICS_LINE_TIMEOUT, self.line_due)
        self.events = READ
        metrics.server.selector.register(conn.fileno(), READ, self)

    def line_due(self, _=None):
        """The timer: no whole request line yet, close; else allow the rest of
        METRICS_TIMEOUT for the headers and the answer."""
        if self.line_end < 0:
            return self.close()
        self.timer = self.metrics.server.timers.call_later(
            METRICS_TIMEOUT - METRICS_LINE_TIMEOUT, self.close)

    def on_event(self, fd, mask):
        """Read until the request is whole, then write the answer, then close."""
        try:
            if self.answer is None:
                if not self.read_request():
                    return
                self.respond(*self.route())
            sent = self.conn.send(self.answer)
            self.answer = self.answer[sent:]
            if not self.answer:
                self.close()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close()

    def read_request(self):
        """Read what came; True once the request is whole (or answered: 431). Only the new
        bytes are searched, so a request sent a byte at a time costs what it costs whole."""
        request = self.request
        data = self.conn.recv(min(4096, METRICS_REQUEST - len(request)))
        if not data:
            self.close()
            return False
        old = len(request)
        request += data
        if self.line_end < 0:
            self.line_end = request.find(b"\n", old)
        # the head ends at an empty line: LF LF, or CR LF CR LF (which contains LF CR LF)
        if request.find(b"\n\n", max(0, old - 1)) >= 0 or \
                request.find(b"\n\r\n", max(0, old - 2)) >= 0:
            return True
        if len(request) >= METRICS_REQUEST:
            self.respond("431 Request Header Fields Too Large", "too large\n")
        return False

    def route(self):
        """(status, body[, content type]) for the request read."""
        words = bytes(self.request[:self.line_end]).split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return "400 Bad Request", "bad request\n"
        if words[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "GET /metrics\n"
        if words[1].split(b"?")[0] != b"/metrics":
            return "404 Not Found", "not found: try /metrics\n"
        return "200 OK", self.metrics.page(), METRICS_TYPE, words[0] == b"HEAD"

    def respond(self, status, body, kind="text/plain; charset=utf-8", head=False):
        """Queue the answer and switch to writing."""
        body = body.encode("utf-8")
        self.answer = memoryview(("HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                                  "Connection: close\r\n\r\n" % (status, kind, len(body))
                                  ).encode("ascii") + (b"" if head else body))
        self.events = WRITE
        self.metrics.server.selector.modify(self.conn.fileno(), WRITE, self)

    def close(self, _=None):
        """Done, or timed out (idempotent)."""
        if self.conn is None:
            return
        Timers.cancel(self.timer)
        self.metrics.server.selector.unregister(self.conn.fileno())
        self.conn.close()
        self.conn = None
        self.metrics.scrapes.pop(self, None)


def refusals(mapping):
    """A listener's clients closed unserved, by reason: refused at accept, unrouted, and
    no-upstream (every upstream failed)."""
    counts = dict(mapping.refused)
    counts.update(mapping.unrouted)
    counts["no-upstream"] = mapping.failed
    return counts


def labels(**pairs):
    """{name="value",...} with the format's escapes (backslash, quote, newline)."""
    return "{%s}" % ",".join('%s="%s"' % (name, str(value).replace("\\", "\\\\")
                                          .replace('"', '\\"').replace("\n", "\\n"))
                             for name, value in sorted(pairs.items()))


def open_fds():
    """How many descriptors this process has open (Linux: /proc/self/fd), or None."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1     # less the one listdir opened
    except OSError:
        return None


def open_metrics(address):
    """The --metrics listening socket: the one a reload handed over if it is still wanted,
    else bound here. Warns when the address is reachable from the internet."""
    fd = os.environ.pop("TAILWART_METRICS_FD", "")
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = tcp_socket(int(fd)) if fd.isdigit() else None
    if sock is not None:
        try:
            if sock.getsockname()[:2] == (host, port):
                log(NOTICE, "metrics addr=%s (handed over)" % format_address(host, port))
                return sock
            sock.close()
        except OSError:
            pass
    import ipaddress
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified or ip.is_global:
        log(WARNING, "metrics addr=%s is reachable from the internet; bind it to 127.0.0.1 "
            "or the tailnet address" % format_address(host, port))
    sock = open_listener(family, host, port)
    log(NOTICE, "metrics addr=%s path=/metrics" % format_address(host, port))
    return sock


def close_handed_metrics():
    """A reload handed over a metrics socket that the settings no longer want: close it."""
    fd = os.environ.pop("TAILWART_METRICS_FD", "")
    if fd.isdigit():
        try:
            os.close(int(fd))
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------
# Reload: on SIGHUP a new process, started from the script on disk, takes the listeners over
# ----------------------------------------------------------------------------------------------

RELOAD_WAIT = 90.0              # `--reload PID` waits this long for the outcome (systemd's own)
RELOAD_ACK_WAIT = 10.0          # a new process waits this long to be made the main process
REAP_EVERY, REAP_TRIES = 0.5, 20    # a failed new process is waited for this often, this long


class Reload:
    """SIGHUP: replace this process with a fresh one, cutting nothing and refusing no one.

    The new process is the script as it is on disk now (so `scp` + HUP is an upgrade), run
    with this process's arguments (so --settings FILE is read again). It inherits the
    listening sockets (TAILWART_LISTENERS: their descriptors; no port is ever closed, and
    a connecting client is served by one process or the other), binds only what is new,
    closes what its settings dropped (a listen address whose shape changed, 0.0.0.0:25 to
    :25 say, needs a restart: the old socket stays open until the hand-over), starts its
    upstream lookups as a start does (a name that does not resolve is a warning, not a
    refusal: one retired MX in a failover list must not block every upgrade), and writes
    `ready PID` on a socketpair (TAILWART_REPORT_FD). Only then does this process stop
    accepting, make the new one systemd's main process (MAINPID=, answered with `main` on
    the socketpair, after which the new one talks to systemd and this one falls silent) and
    drain, up to --reload-drain. If the new process fails, its one error line comes back instead:
    `reload failed: ...` is logged, and this process serves on as if nothing happened.
    Under systemd the outcome is also written to $RUNTIME_DIRECTORY/reload-status, where
    `--reload PID` (the unit's ExecReload=) waits for it.
    """

    __slots__ = ("server", "child", "channel", "received", "successor")

    def __init__(self, server):
        self.server = server
        self.child = self.channel = None
        self.received = b""
        self.successor = None           # the pid that took over from this process

    # Every HUP gets an outcome in the reload status, which `--reload PID` waits for: a HUP
    # while a reload is in progress gets that reload's.

    def start(self):
        """Start the new process (once at a time; not while stopping)."""
        server = self.server
        if self.child is not None:
            return log(NOTICE, "reload: already in progress")
        if server.stopping:
            log(NOTICE, "reload: this process is stopping; ignoring HUP")
            return write_reload_status("failed pid %d is stopping; nothing was reloaded%s" % (
                os.getpid(), ": pid %d took over from it, reload that one" % self.successor
                if self.successor else ""))
        ours, theirs = socket.socketpair()
        fds = [listener.fd for listener in server.acceptor.listeners]
        env = dict(os.environ, TAILWART_LISTENERS=",".join(map(str, fds)),
                   TAILWART_REPORT_FD=str(theirs.fileno()))
        env.pop("WATCHDOG_PID", None)       # the watchdog goes with MAINPID to the new one
        if server.metrics is not None:
            fds.append(server.metrics.sock.fileno())
            env["TAILWART_METRICS_FD"] = str(fds[-1])
        log(NOTICE, "reload: starting a new process")
        try:
            self.child = subprocess.Popen([sys.executable, SCRIPT] + server.argv, env=env,
                                          pass_fds=fds + [theirs.fileno()],
                                          stdin=subprocess.DEVNULL)
        except OSError as e:
            ours.close()
            return self.finished("failed cannot start %s: %s" % (sys.executable, e.strerror))
        finally:
            theirs.close()
        ours.setblocking(False)
        self.channel = ours
        server.selector.register(ours.fileno(), READ, self)

    def on_event(self, fd, mask):
        """The new process said something, or ended: `ready PID` or `failed LINE`."""
        try:
            data = self.channel.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.received += data
        if data and b"\n" not in self.received:
            return
        line = self.received.partition(b"\n")[0].decode("utf-8", "replace")
        if not line:
            line = "failed the new process ended without a word (see the lines above)"
        self.finished(line)

    def finished(self, line):
        """The outcome: hand over to the new process, or carry on after logging why not."""
        server, child = self.server, self.child
        word, _, rest = line.partition(" ")
        took_over = word == "ready" and rest.isdigit()
        if took_over:
            server.notifier.hand_over(int(rest))
            send_line(self.channel, "main")     # it may talk to systemd now
        self.close_channel()
        self.child = None
        if took_over:
            self.successor = int(rest)
            write_reload_status("ok pid=%s" % rest)
            # from here on both processes write to one stderr (in the foreground): the old
            # one's `stopped sessions=7` must not read as if the relay had stopped
            log.mark = " old-pid=%d" % os.getpid()
            log(NOTICE, "reload: pid=%s took over; draining %s (up to %gs)"
                % (rest, plural(len(server.sessions), "session"), server.reload_drain))
            # the new process is our child: should it end before our drain does (a stop),
            # it must not stay a zombie in the unit's cgroup, where systemd SIGKILLs it
            server.timers.call_later(REAP_EVERY, self.reap, [child, None])
            return server.begin_drain(server.reload_drain, handed_over=True)
        write_reload_status("failed %s" % rest)
        log(WARNING, "reload failed: %s" % rest)
        if child is not None:
            server.timers.call_later(REAP_EVERY, self.reap, [child, REAP_TRIES])

    def close_channel(self):
        if self.channel is not None:
            self.server.selector.unregister(self.channel.fileno())
            self.channel.close()
        self.channel, self.received = None, b""

    def reap(self, state):
        """Collect a new process's exit status once it ends (never blocking): a failed one,
        killed if it lingers past `tries` turns, or (tries None) the one that took over."""
        child, tries = state
        if child is not None and child.poll() is None:
            if tries is not None:
                if tries <= 0:
                    child.kill()
                state[1] -= 1
            self.server.timers.call_later(REAP_EVERY, self.reap, state)

    def abort(self):
        """TERM/INT while a new process is starting: stop it too."""
        if self.child is not None:
            log(NOTICE, "reload: stopping the new process pid=%d" % self.child.pid)
            try:
                self.child.terminate()
            except OSError:
                pass
            self.close_channel()
            self.child = None
            write_reload_status("failed stopped (TERM or INT) before the new process took over")


def take_over(predecessor):
    """The new process of a reload is ready: tell the old one, and wait until it has told
    systemd that we are the main process now (before that, systemd drops what we send)."""
    send_line(predecessor, "ready %d" % os.getpid())
    try:
        predecessor.settimeout(RELOAD_ACK_WAIT)
        predecessor.recv(64)
    except OSError:
        pass            # the old process is gone: we are the relay all the same
    predecessor.close()


def send_line(sock, line):
    """One line to the process that started this one (a reload); failures are ignored."""
    try:
        sock.sendall(line.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass


def reload_status_path():
    """$RUNTIME_DIRECTORY/reload-status (systemd's RuntimeDirectory=), or None."""
    directory = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(directory, "reload-status") if directory else None


def write_reload_status(outcome):
    """Tell `--reload PID` how the reload went: a fresh stamp, the pid that was signalled
    (`for=PID`), then `ok ...` or `failed ...`."""
    path = reload_status_path()
    if path is None:
        return
    try:
        with open(path + ".new", "w") as f:
            f.write("%.6f for=%d %s\n" % (time.time(), os.getpid(), outcome))
        os.replace(path + ".new", path)
    except OSError as e:
        log(WARNING, "reload: cannot write %s: %s" % (path, e.strerror))


def read_text(path):
    """A file's text, or None."""
    try:
        with open(path) as f:
            return f.read()
    except (OSError, TypeError):
        return None


def reload_client(pid):
    """`--reload PID`: send SIGHUP and wait for the outcome that the relay writes where the
    unit's RuntimeDirectory= is. Returns the exit code: 0 taken over, 1 failed or no outcome,
    2 outside the unit (nothing sent: the outcome could not be learnt)."""
    path = reload_status_path()
    if path is None:
        write_stderr("%s: error: --reload waits for the outcome in the unit's RuntimeDirectory= "
                     "($RUNTIME_DIRECTORY), not set here; outside the unit, run `kill -HUP %d` "
                     "and read the relay's log (`reload: pid=N took over` or `reload failed: "
                     "...`)\n" % (PROG, pid))
        return 2
    before = read_text(path)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        write_stderr("%s: error: cannot signal pid %d: %s\n" % (PROG, pid, e.strerror))
        return 1
    deadline = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < deadline:
        outcome = reload_outcome(read_text(path), before, pid)
        if outcome is not None:
            if outcome.startswith("ok "):
                write_stderr("reload: %s took over\n" % outcome[3:])
                return 0
            write_stderr("%s: error: reload failed: %s\n" % (PROG, outcome[7:]))
            return 1
        if not process_exists(pid):
            # one last look: its outcome may have come with its end
            outcome = reload_outcome(read_text(path), before, pid)
            if outcome is None:
                write_stderr("%s: error: pid %d ended without a reload outcome\n" % (PROG, pid))
                return 1
            continue
        time.sleep(0.05)
    write_stderr("%s: error: pid %d gave no reload outcome in %gs\n" % (PROG, pid, RELOAD_WAIT))
    return 1


def reload_outcome(status, before, pid):
    """The outcome (`ok ...`, `failed ...`) in a reload status other than `before` that
    answers a HUP to pid, or None. A status without `for=` (from a relay older than this
    script: an upgrade) answers any."""
    if status is None or status == before:
        return None
    outcome = status.strip().partition(" ")[2]
    if outcome.startswith("for="):
        target, _, outcome = outcome.partition(" ")
        if target != "for=%d" % pid:
            return None
    return outcome if outcome.startswith(("ok ", "failed ")) else None


def process_exists(pid):
    """Is there a process `pid` (a zombie counts as none)?"""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[:1] not in (["Z"], ["X"])
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


# ----------------------------------------------------------------------------------------------
# systemd glue: notify, watchdog, privilege drop (socket activation is with the listeners)
# ----------------------------------------------------------------------------------------------

STATUS_INTERVAL = 1.0           # STATUS= follows session starts and ends at most this often

class Notifier:
    """Tells systemd how the server is (sd_notify(3)): READY once the listeners accept,
    STATUS lines for `systemctl status`, WATCHDOG pings, STOPPING when the drain begins.

    The pings are sent from the loop, at half of WatchdogSec: a loop that is stuck stops
    feeding the watchdog, and systemd restarts us. One datagram socket, opened at start,
    serves every message (a ping must not need a new descriptor when they run out).
    Without NOTIFY_SOCKET every call is a no-op.
    """

    __slots__ = ("server", "watchdog_interval", "path", "sock", "status_at", "status_timer")

    def __init__(self, server):
        self.server = server
        self.watchdog_interval = watchdog_interval()
        self.path = notify_socket_path()
        self.sock = None
        self.status_at = -STATUS_INTERVAL   # when STATUS= was last sent for a change
        self.status_timer = None
        if self.path is not None:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.setblocking(False)
            except OSError as e:
                log(WARNING, "sd_notify: cannot open a socket: %s" % e.strerror)

    def send(self, *lines):
        """One notification; failures are logged at debug level and otherwise ignored."""
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.path)
        except OSError as e:
            log(DEBUG, "sd_notify %s: %s" % (self.path, e))
            return False
        return True

    def status(self):
        """The one-line STATUS= for systemctl status."""
        server = self.server
        return "%d active, %s; listening on %s" % (
            len(server.sessions), plural(sum(m.sessions for m in server.mappings), "session"),
            " ".join(m.label for m in server.mappings))

    def ready(self):
        """The listeners accept: READY=1, and the watchdog pings begin."""
        self.send("READY=1", "STATUS=" + self.status())
        if self.watchdog_interval:
            self.server.timers.every(self.watchdog_interval, self.feed_watchdog)

    def changed(self):
        """A session started or ended: a fresh STATUS=, at most once per STATUS_INTERVAL."""
        if self.status_timer is None:
            delay = max(0.0, self.status_at + STATUS_INTERVAL - self.server.now)
            self.status_timer = self.server.timers.call_later(delay, self.send_status)

    def send_status(self, _=None):
        """STATUS= now (the timer changed() set)."""
        self.status_timer = None
        self.status_at = self.server.now
        if self.sock is not None:
            self.send("STATUS=" + self.status())

    def feed_watchdog(self):
        """WATCHDOG=1, with a fresh STATUS."""
        self.send("WATCHDOG=1", "STATUS=" + self.status())

    def stopping(self):
        """The drain began."""
        self.send("STOPPING=1", "STATUS=draining %s" % plural(len(self.server.sessions),
                                                              "session"))

    def hand_over(self, pid):
        """A reload's new process is ready: make it the service's main process (MAINPID=,
        which the main process may send), then say nothing more to systemd."""
        self.send("MAINPID=%d" % pid, "STATUS=handed over to pid %d" % pid)
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def notify_socket_path():
    """NOTIFY_SOCKET as an address for sendto(), or None when systemd did not set one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not hasattr(socket, "AF_UNIX"):
        return None
    return "\0" + path[1:] if path[0] == "@" else path    # @: an abstract socket


def watchdog_interval():
    """Half of WATCHDOG_USEC (when it is meant for this process), or None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def lookup_user(name):
    """The pwd entry of --user NAME (or a numeric uid: then its entry, or that uid with a
    group of the same number when none exists); raises StartupError."""
    try:
        import pwd
        if DIGITS_RE.match(name):
            try:
                return pwd.getpwuid(int(name))
            except KeyError:
                return pwd.struct_passwd((name, "x", int(name), int(name), "", "/", ""))
        return pwd.getpwnam(name)
    except ImportError:
        raise StartupError("--user works only on Unix")
    except KeyError:
        pass
    import difflib      # only on this error path
    near = difflib.get_close_matches(name, [user.pw_name for user in pwd.getpwall()], n=1)
    if near:
        raise StartupError("--user %s: no such user; did you mean %s?" % (name, near[0]))
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
    # a reload starts the interpreter and the script again, as this user
    for path, mode in ((sys.executable, os.X_OK), (SCRIPT, os.R_OK)):
        if not os.access(path, mode):
            log(WARNING, "--user %s cannot %s %s: a reload (HUP) will fail; install the "
                "script and an interpreter where %s can (e.g. /usr/local/bin, /usr/bin/python3)"
                % (user.pw_name, "run" if mode == os.X_OK else "read", path, user.pw_name))


# ----------------------------------------------------------------------------------------------
# Doctor: --check, the whole path as the relay would use it, and what to fix
# ----------------------------------------------------------------------------------------------
#
# The doctor is a mode of its own, not part of the loop: it may block (each wait is bounded by
# --connect-timeout), checks the upstreams in parallel threads, and prints what it found.

SCRIPT_NAME = "tailwart_edge.py"     # in a command line: a running relay
V2_LOCAL = 0x20                 # version 2, command LOCAL: the proxy's own connection (a check)
# A protocol's dialogue as a check holds it: is the greeting complete (after this line), is it
# good, the goodbye to send, is the goodbye answered (by this line), is a line an error
Dialogue = collections.namedtuple("Dialogue", "complete good goodbye answered error")
DIALOGUES = {
    "smtp": Dialogue(lambda line: line[3:4] != "-", lambda line: line.startswith("220"), "QUIT",
                     lambda line: line.startswith("221"), lambda line: line[:1] in ("4", "5")),
    "imap": Dialogue(lambda line: True, lambda line: line.startswith(("* OK", "* PREAUTH")),
                     "a LOGOUT", lambda line: line.startswith("a "),
                     lambda line: " BAD " in line + " " or " NO " in line + " "),
    "pop3": Dialogue(lambda line: True, lambda line: line.startswith("+OK"), "QUIT",
                     lambda line: line.startswith("+OK"), lambda line: line.startswith("-ERR")),
    "sieve": Dialogue(lambda line: line.startswith(("OK", "NO", "BYE")),
                      lambda line: line.startswith("OK"), "LOGOUT",
                      lambda line: line.startswith("OK"),
                      lambda line: line.startswith(("NO", "BYE"))),
}
IMPLICIT_TLS = {"smtps": "smtp", "imaps": "imap", "pop3s": "pop3"}
PLAIN_WAIT = 1.0                # on an implicit-TLS port, text within this long: a plain port
CERT_WARN_DAYS = 14
# How each mail server is told to read the header from the edge (SOURCE: the edge's address
# as the mail server sees it), as short lines under a finding; the server is known by its
# greeting, else each that may serve the protocol is named
TRUST_FIXES = {
    "Postfix": [
        "Postfix: in master.cf, on the smtpd line of that port:",
        "  -o smtpd_upstream_proxy_protocol=haproxy",
        "  (port 25 behind postscreen: postscreen_upstream_proxy_protocol = haproxy instead)",
        "  and let only the edge reach that port (Postfix reads the header from any client)"],
    "Dovecot": [
        "Dovecot: haproxy_trusted_networks = SOURCE, and haproxy = yes on that port's",
        "  inet_listener (in the service imap-login, pop3-login, managesieve-login... block)"],
    "Stalwart": [
        "Stalwart 0.16: Settings > Network > General > Proxy > Trusted Networks: add SOURCE",
        "  (0.15: server.proxy.trusted-networks = [\"SOURCE\"] in config.toml)",
        "  a ban from before outlasts the fix: Settings > Security > Blocked IPs (0.15:",
        "  the server.blocked-ip.SOURCE key)"],
}
MAIL_SERVERS = {"smtp": ("Postfix", "Dovecot", "Stalwart"), "imap": ("Dovecot", "Stalwart"),
                "pop3": ("Dovecot", "Stalwart"), "sieve": ("Dovecot", "Stalwart")}


class Doctor:
    """--check: prints one line per finding (`ok`, `warn` or `FAIL`, a topic, what was found
    and, for a failure, the fix), then a verdict. One connection per distinct upstream, so
    a check never looks like a flood to the mail server's abuse counters."""

    __slots__ = ("options", "mappings", "found", "failures")

    def __init__(self, options, mappings):
        self.options = options
        self.mappings = mappings
        self.found = 0
        self.failures = 0

    def report(self, lines):
        """Print (status, topic, text) findings, with (..., [hint]) short indented lines
        under them (how to fix it), and count them."""
        for finding in lines:
            status, topic, text = finding[:3]
            self.found += 1
            self.failures += status == "FAIL"
            print("%-5s%s %s" % (status, topic, one_line(text)))
            for hint in finding[3] or () if len(finding) > 3 else ():
                print("      " + one_line(hint))
        sys.stdout.flush()

    def run(self):
        """Check everything; the exit code (0 all well, 1 something failed)."""
        options = self.options
        routes = sum(len(mapping.routes) for mapping in self.mappings)
        print("tailwart-edge %s check: %s, %s, PROXY header %s, timeout %gs" % (
            __version__, plural(len(self.mappings), "listener"), plural(routes, "mapping"),
            options.proxy_protocol, options.connect_timeout))
        granted = unit_grants_low_ports(options)
        for mapping in self.mappings:
            self.report([check_listen(mapping, granted)])
        # each upstream once per protocol its clients speak and header it reads
        upstreams = []
        for mapping in self.mappings:
            for route in mapping.routes:
                # a routed TLS upstream is greeted with the route's first name, as its
                # clients are: the certificate it shows for them is the one to check
                name = next((item for item in route.matches if NAME_RE.match(item) and
                             not item.startswith("*")), None)
                for host, port in route.upstreams:
                    check = (host, port, mapping.protocol, route.proxy or options.proxy_protocol,
                             name)
                    if check not in upstreams:
                        upstreams.append(check)
        results = [[] for _ in upstreams]
        threads = []
        for (host, port, protocol, kind, name), found in zip(upstreams, results):
            thread = threading.Thread(target=check_upstream, daemon=True, args=(
                host, port, protocol, kind, name, options, self.mappings, found))
            thread.start()
            threads.append(thread)
        # each step of a check is bounded; a lookup that hangs is the one thing that is not
        deadline = time.monotonic() + 4 * options.connect_timeout + 2 * PLAIN_WAIT + 5
        for (host, port, _, _, _), thread, found in zip(upstreams, threads, results):
            thread.join(max(0.0, deadline - time.monotonic()))
            lines = list(found)
            if thread.is_alive():
                lines.append(("FAIL", "resolve" if not lines else "connect", "%s did not "
                              "answer in time" % format_address(host, port)))
            self.report(lines)
        if self.failures:
            print("verdict: %d of %d checks failed" % (self.failures, self.found))
            return 1
        print("verdict: ok, %d checks passed" % self.found)
        return 0


def check_listen(mapping, granted=False):
    """Could the relay bind this mapping's address? (status, topic, text). It binds what the
    relay would (bind_listeners), without listening: on a host without IPv6, every interface
    is 0.0.0.0 for both. `granted`: the service will have CAP_NET_BIND_SERVICE, whoever runs
    the check."""
    label = mapping.label
    try:
        for sock in bind_listeners(mapping, listen=False):
            sock.close()
    except StartupError as e:
        code = e.args[1] if len(e.args) > 1 else None
        if code == errno.EADDRINUSE:
            owner = port_owner(mapping.port)
            if owner is not None and is_relay(owner):
                return "ok", "listen", "%s is served by a running tailwart-edge (pid %d)" % (
                    label, owner.pid)
            return "FAIL", "listen", "%s is in use%s; stop that program or choose another " \
                "address" % (label, " by pid %d (%s)" % (owner.pid, owner.command.split()[0])
                             if owner else "")
        if code == errno.EACCES and granted and mapping.port < 1024:
            return "warn", "listen", "%s not checked: this user may not bind ports below " \
                "1024, the service may (its unit grants CAP_NET_BIND_SERVICE); as root, " \
                "--check also checks that it is free" % label
        if code == errno.EACCES:
            return "FAIL", "listen", "%s needs privileges (ports below 1024): run as root " \
                "with --user NAME, or with CAP_NET_BIND_SERVICE as the unit does" % label
        return "FAIL", "listen", "%s cannot be bound: %s" % (
            label, os.strerror(code) if code else e.args[0])
    note = "; IPv4 only: this host has no IPv6" if mapping.bind is None \
        and ipv6_support() is None else ""
    return "ok", "listen", "%s is free (%s, to %s%s)" % (
        label, mapping.protocol, ",".join(format_address(*u) for u in mapping.upstreams), note)


# A process listening on a port --check wants: its pid, its command line (words) and its
# working directory (where a relative script path in that command line starts)
class PortOwner(collections.namedtuple("PortOwner", "pid argv cwd")):
    __slots__ = ()

    @property
    def command(self):
        return " ".join(self.argv) or "?"


def unit_grants_low_ports(options):
    """Will the relay these options describe bind ports below 1024 whoever checks it? Yes for
    the service's settings file, while its unit grants CAP_NET_BIND_SERVICE (the unit --install
    writes does; one that is not installed yet will be that one)."""
    if options.settings is None or os.path.realpath(options.settings) != INSTALL_SETTINGS:
        return False
    try:
        unit = read_bytes(INSTALL_UNIT)
    except OSError:
        return False
    return unit is None or b"\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n" in unit


def port_owner(port):
    """The PortOwner of a process listening on TCP `port`, or None (Linux: /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for row in f.readlines()[1:]:
                    fields = row.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add("socket:[%s]" % fields[9])
        except (OSError, ValueError, IndexError):
            pass
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir("/proc/%s/fd" % pid):
                if os.readlink("/proc/%s/fd/%s" % (pid, fd)) in inodes:
                    with open("/proc/%s/cmdline" % pid, "rb") as f:
                        argv = f.read().decode("utf-8", "replace").split("\0")
                    return PortOwner(int(pid), tuple(word for word in argv if word),
                                     "/proc/%s/cwd" % pid)
        except OSError:
            continue
    return None


def is_relay(owner):
    """Is this process a tailwart-edge: running this very script file (whatever it is called
    where it was installed, /usr/local/bin/tailwart-edge say), or a file named as ours is?"""
    try:
        ours = os.stat(SCRIPT)
    except OSError:
        ours = None
    for word in owner.argv[1:4]:            # python3 [-u] [-X opt] SCRIPT ...
        if os.path.basename(word) == SCRIPT_NAME:
            return True
        try:
            theirs = os.stat(os.path.join(owner.cwd, word))
        except (OSError, ValueError):
            continue
        if ours is not None and (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
            return True
    return False


def check_upstream(host, port, protocol, kind, name, options, mappings, lines):
    """Resolve, connect, send the header a check sends (`kind`), and hold the dialogue of
    `protocol` (a TLS one with server name `name`, if not None); append a (status, topic,
    text) to `lines` for each finding."""
    timeout = options.connect_timeout
    addrs = check_resolve(host, port, lines)
    if not addrs:
        return
    sock, address = check_connect(host, port, addrs, kind, mappings, timeout, lines)
    if sock is None:
        return
    try:
        talk(sock, address, plain_ip(sock.getsockname()[0]), protocol, kind, timeout, lines,
             name)
    finally:
        sock.close()


def check_resolve(host, port, lines):
    """The addresses of `host` as [(family, sockaddr)], or None after a FAIL line."""
    literal = literal_address(host, port)
    if literal is not None:
        return [literal]
    started = time.monotonic()
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as e:
        lines.append(("FAIL", "resolve", "%s does not resolve (%s): check the name; a tailnet "
                      "name needs this machine in the tailnet with MagicDNS (`tailscale "
                      "status`)" % (host, getattr(e, "strerror", e))))
        return None
    addrs = [(info[0], info[4]) for info in infos]
    lines.append(("ok", "resolve", "%s: %s in %d ms" % (
        host, ",".join(sorted({sockaddr[0] for _, sockaddr in addrs})),
        (time.monotonic() - started) * 1000)))
    return addrs


def check_connect(host, port, addrs, kind, mappings, timeout, lines):
    """Connect to each address in turn until one answers: (blocking socket, its address as
    text), or (None, None) when none did; a FAIL line for each that did not (a warning once
    a later one works), and an ok line for the one that did."""
    sock = None
    for family, sockaddr in addrs:
        address = format_address(*sockaddr[:2])
        if own_listener(mappings, sockaddr[0], port) is not None:
            lines.append(("FAIL", "connect", "%s is this relay itself (%s resolves to one of "
                          "its listen addresses): point it at the mail server" % (address, host)))
            continue
        started = time.monotonic()
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            break
        except socket.timeout:
            why = "timed out after %gs: is the mail server up, and this machine in the " \
                "tailnet (`tailscale ping %s`)?" % (timeout, host)
        except OSError as e:
            if e.errno == errno.ECONNREFUSED:
                why = "refused: nothing listens on port %d there; is the mail server's " \
                    "listener on that port, and up?" % port
            else:
                why = "failed: %s" % (e.strerror or e)
        if sock is not None:        # None when socket() itself failed (no IPv6, no descriptor)
            sock.close()
            sock = None
        lines.append(("FAIL", "connect", "%s %s" % (address, why)))
    if sock is None:
        return None, None
    for i, line in enumerate(lines):        # a failed address before one that works: a warning
        if line[0] == "FAIL" and line[1] == "connect":
            lines[i] = ("warn",) + line[1:]
    source = plain_ip(sock.getsockname()[0])
    text = "%s in %d ms from %s" % (address, (time.monotonic() - started) * 1000, source)
    if kind != "off":
        text += "; the mail server must trust PROXY headers from %s (exactly that address)" \
            % source
    lines.append(("ok", "connect", text))
    return sock, address


def check_header(sock, kind):
    """The header a check sends: v2 LOCAL (the spec's way for a proxy's own connections);
    v1 names this relay itself as the client (Postfix refuses `PROXY UNKNOWN` on purpose)."""
    if kind == "v2":
        return V2_SIGNATURE + struct.pack("!BBH", V2_LOCAL, V2_UNSPEC, 0), "PROXY v2 LOCAL"
    if kind == "v1":
        return proxy_header_v1(sock.getsockname(), sock.getpeername()), "PROXY v1"
    return b"", None


def talk(sock, address, source, protocol, kind, timeout, lines, name=None):
    """Send the header, then greet the server as a client of `protocol` would, and end
    politely; names what went wrong."""
    header, header_name = check_header(sock, kind)
    if header:
        sock.sendall(header)
    dialogue_name = IMPLICIT_TLS.get(protocol, protocol)
    if protocol in IMPLICIT_TLS or protocol in ("https", "tls"):
        sock = check_tls(sock, address, dialogue_name, kind, timeout, lines, name)
        if sock is None or protocol not in IMPLICIT_TLS:
            return              # https, tls: the handshake is the check
    if protocol in ("tcp", "http"):
        return lines.append(("ok", "tcp", "%s accepted the connection%s (no greeting to check "
                             "for an unknown protocol; name it as PORT/smtp, /imap ... to check "
                             "one)" % (address, " and the %s header" % kind if header else "")))
    reader = LineReader(sock, timeout)
    greeting = check_greeting(reader, address, source, protocol, kind, lines)
    if greeting is not None:
        check_goodbye(reader, address, source, dialogue_name, header_name, greeting, lines)


def check_greeting(reader, address, source, protocol, kind, lines):
    """Read the server's greeting in the dialogue of `protocol`: its lines, or None after a
    FAIL line that says why there was none, or why it is not one a client accepts."""
    dialogue_name = IMPLICIT_TLS.get(protocol, protocol)
    dialogue = DIALOGUES[dialogue_name]
    greeting = []
    try:
        reader.read_until(dialogue.complete, greeting)
    except socket.timeout:
        greeting = None
    except OSError as e:
        lines.append(("FAIL", dialogue_name, "%s closed the connection without a greeting "
                      "(%s)%s" % (address, e.strerror, untrusted(source, kind)),
                      trust_fixes(dialogue_name, None, source, kind)))
        return None
    if greeting is None:
        text = "%s sent no greeting within %gs" % (address, reader.timeout)
        if kind != "off":
            text += "; is it the mail server's %s port, and does it expect the %s header?" % (
                dialogue_name, kind)
        else:
            text += "; it expects a PROXY header? (this relay sends none: --proxy-protocol off)"
        if protocol not in IMPLICIT_TLS and speaks_tls(reader.sock, reader.timeout):
            text += "; it speaks TLS on this port: point the mapping at the server's plain " \
                "%s port, or name it PORT/%ss" % (dialogue_name, dialogue_name)
        lines.append(("FAIL", dialogue_name, text))
        return None
    if not greeting:
        lines.append(("FAIL", dialogue_name, "%s closed the connection without a greeting%s"
                      % (address, untrusted(source, kind)),
                      trust_fixes(dialogue_name, None, source, kind)))
        return None
    if not dialogue.good(greeting[-1]):
        text = "%s greeted %s" % (address, quote(greeting[0]))
        if kind == "off":
            text += ": it expects a PROXY header? (this relay sends none: --proxy-protocol off)"
        elif not greeting[0].isprintable():
            text += ": not a %s greeting (binary: TLS?)" % dialogue_name
        lines.append(("FAIL", dialogue_name, text))
        return None
    return greeting


def check_goodbye(reader, address, source, dialogue_name, header_name, greeting, lines):
    """After a good greeting, end the dialogue politely; an error answer when a header was
    sent means the server read the header as a command. The finding for the dialogue."""
    dialogue = DIALOGUES[dialogue_name]
    answers = []
    try:
        reader.sock.sendall(dialogue.goodbye.encode("ascii") + b"\r\n")
        reader.read_until(dialogue.answered, answers)
    except (socket.timeout, OSError):
        pass
    errors = [line for line in answers if dialogue.error(line)]
    if errors and header_name:
        return lines.append(("FAIL", dialogue_name, "%s read the PROXY header as a command (it "
                             "answered %s): trust PROXY headers from %s on the mail server"
                             % (address, quote(errors[0]), source),
                             trust_fixes(dialogue_name, greeting, source, header_name)))
    # the line that says it: SMTP's first (the host name), ManageSieve's last (after the
    # capabilities)
    text = "%s greeted %s" % (address, quote(greeting[-1] if dialogue_name == "sieve"
                                             else greeting[0]))
    if header_name:
        text += "; %s accepted" % header_name
    command = dialogue.goodbye.split()[-1]        # IMAP's without its tag
    if answers and dialogue.answered(answers[-1]) and not errors:
        text += "; %s answered %s" % (command, quote(answers[-1]))
        return lines.append(("ok", dialogue_name, text))
    text += "; but %s was answered %s" % (command, quote(answers[-1]) if answers else
                                          "by nothing")
    lines.append(("warn" if not errors else "FAIL", dialogue_name, text))


def untrusted(source, kind):
    """Why a server closes at once, for the line that says it did."""
    if kind == "off":
        return (": it expects a PROXY header (this relay sends none: --proxy-protocol off), "
                "or has banned %s" % source)
    return ": it does not trust PROXY headers from %s, or has banned %s" % (source, source)


def trust_fixes(dialogue_name, greeting, source, kind):
    """The short lines that say how to make the mail server read the header from `source`:
    for the server that greeted (Postfix, Dovecot, Stalwart), else each that may serve this
    protocol. None with --proxy-protocol off (the server wants a header: send one)."""
    if kind == "off":
        return None
    said = " ".join(greeting or ()).lower()
    servers = [name for name in TRUST_FIXES if name.lower() in said] or \
        MAIL_SERVERS.get(dialogue_name, list(TRUST_FIXES))
    hints = [line.replace("SOURCE", source) for name in servers for line in TRUST_FIXES[name]]
    # the way out that is not one: said with what it costs
    hints += ["(--proxy-protocol off instead: every client would look like %s there;" % source,
              "  never list it in the mail server's trusted or relay networks)"]
    return hints


def quote(line):
    """A server's line, quoted and cut short for a finding."""
    line = line if len(line) <= 72 else line[:69] + "..."
    return '"%s"' % line.replace('"', "'")


def check_tls(sock, address, protocol, kind, timeout, lines, name=None):
    """The TLS handshake of an implicit-TLS port (no verification needed to pass): the
    TLS socket, or None after a FAIL line."""
    import ssl
    readable = select.select([sock], [], [], PLAIN_WAIT)[0]
    if readable:
        first = LineReader(sock, timeout).readline()
        lines.append(("FAIL", "tls", "%s answered in plain text (%s) before TLS: a plain %s "
                      "port; point the mapping at the server's implicit-TLS port, or name it "
                      "PORT/%s" % (address, quote(first or ""), protocol, protocol)))
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if hasattr(ssl, "PROTOCOL_TLS_CLIENT")
                             else ssl.PROTOCOL_SSLv23)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        tls = context.wrap_socket(sock, do_handshake_on_connect=False, server_hostname=name)
        tls.settimeout(timeout)
        tls.do_handshake()
    except socket.timeout:
        lines.append(("FAIL", "tls", "%s: the TLS handshake timed out after %gs" % (address,
                                                                                   timeout)))
        return None
    except (ssl.SSLError, OSError) as e:
        text = "%s: the TLS handshake failed (%s)" % (address, getattr(e, "reason", None) or e)
        if "WRONG_VERSION" in str(e) or "wrong version" in str(e):
            text = "%s answered in plain text, not TLS (%s): a plain %s port? point the " \
                "mapping at the server's implicit-TLS port, or name it PORT/%s" % (
                    address, getattr(e, "reason", e), protocol, protocol)
            if kind == "off":   # Postfix answers a ClientHello it did not expect with a 421
                text += "; or it expects a PROXY header (this relay sends none: " \
                    "--proxy-protocol off)"
        lines.append(("FAIL", "tls", text))
        return None
    names, days = certificate_names(tls.getpeercert(binary_form=True))
    text = "%s %s, certificate for %s" % (address, tls.version(), ",".join(names) or "no name")
    if name is not None:
        text += " (asked for %s)" % name
    status = "ok"
    if days is not None:
        text += ", expires in %d days" % days if days >= 0 else ", EXPIRED %d days ago" % -days
        if days < CERT_WARN_DAYS:
            status = "warn"
    lines.append((status, "tls", text))
    return tls


def certificate_names(der):
    """([DNS names, else the subject's CN], days to expiry) of a DER certificate; the
    ssl module decodes only files, so it goes through a temporary one."""
    import ssl
    import tempfile
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if not der or decode is None:
        return [], None
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
        f.write(ssl.DER_cert_to_PEM_cert(der))
        f.flush()
        try:
            cert = decode(f.name)
        except Exception:
            return [], None
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        names = [value for rdn in cert.get("subject", ()) for key, value in rdn
                 if key == "commonName"]
    days = None
    if "notAfter" in cert:
        days = int((ssl.cert_time_to_seconds(cert["notAfter"]) - time.time()) // 86400)
    return names, days


def speaks_tls(sock, timeout):
    """After a silence: does the server complete a TLS handshake on this connection?"""
    import ssl
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if hasattr(ssl, "PROTOCOL_TLS_CLIENT")
                                 else ssl.PROTOCOL_SSLv23)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        tls = context.wrap_socket(sock, do_handshake_on_connect=False)
        tls.settimeout(min(timeout, 5.0))
        tls.do_handshake()
        return True
    except (ssl.SSLError, OSError, ValueError):
        return False


class LineReader:
    """Lines from a blocking socket, each wait bounded by `timeout` (raises socket.timeout);
    readline() returns None at the end of the stream."""

    __slots__ = ("sock", "timeout", "data")

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout
        self.data = b""

    def readline(self):
        """The next line without its end, or None at the end of the stream."""
        self.sock.settimeout(self.timeout)
        while b"\n" not in self.data:
            if len(self.data) > 4096:
                break
            chunk = self.sock.recv(4096)
            if not chunk:
                if not self.data:
                    return None
                break
            self.data += chunk
        line, _, self.data = self.data.partition(b"\n")
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def read_until(self, done, lines):
        """Append lines to `lines` until one for which done(line) is true, or the end of
        the stream (a timeout raises, leaving what came in `lines`)."""
        while True:
            line = self.readline()
            if line is None:
                return
            lines.append(line)
            if done(line):
                return


# ----------------------------------------------------------------------------------------------
# Install: --install puts the service in place from this file alone, --uninstall takes it away
# ----------------------------------------------------------------------------------------------
#
# Only the script is copied to a server (scp): the unit's text lives here, and the settings file
# is written from the command line's mappings and options. Written as root, at fixed paths, with
# modes set here; an admin's settings file is never replaced unasked, and a service whose check
# failed is never enabled.

INSTALL_SCRIPT = "/usr/local/bin/tailwart_edge.py"
INSTALL_UNIT = "/etc/systemd/system/tailwart-edge.service"
INSTALL_SETTINGS = "/etc/default/tailwart-edge"
SERVICE = "tailwart-edge"
SYSTEMD_RUNNING = "/run/systemd/system"     # sd_booted(3): present when systemd is PID 1
UNIT_PYTHON = "/usr/bin/python3"            # the interpreter the text below names
# where the unit looks for an interpreter, before this one's own (sys.executable)
SERVICE_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
# what the unit's ProtectHome=yes hides from the service: an interpreter there cannot start it
HIDDEN_FROM_SERVICE = ("/root/", "/home/", "/run/user/")
# the options the settings file is written without: the installer's own, the doctor's and the
# reload's (refused there), and those UPSTREAM= and PORTS= hold
NOT_SETTINGS = ("help", "version", "mappings", "upstream", "settings", "check", "reload",
                "install", "uninstall", "replace_settings")
PLAIN_WORD_RE = re.compile(r"[A-Za-z0-9_@%+=:,./\[\]*-]+\Z")    # needs no quotes in the file
CHECK_SLACK = 60                # on top of the doctor's own bound, which its timeouts set

UNIT_TEXT = """\
# tailwart-edge: relays the public mail ports to a mail server in the tailnet.
# `sudo python3 tailwart_edge.py --install MAPPING ...` writes this file (the script holds its
# text; ExecStart= and ExecReload= name the python3 it chose), the script and the settings.
# By hand: tailwart_edge.py in /usr/local/bin, this file in /etc/systemd/system, and the settings
# in /etc/default/tailwart-edge (only UPSTREAM= is required; the relay reads the file itself, so
# it must be readable by the service's user: mode 0644, no secrets in it):
#   UPSTREAM=stalwart.tail7b1641.ts.net
#   PORTS=25 465 587 143 993 4190
#   OPTIONS=--proxy-protocol v1
# Check it first: sudo python3 /usr/local/bin/tailwart_edge.py --check --settings /etc/default/tailwart-edge
# After editing it: systemctl reload tailwart-edge (no session is cut, no connection refused;
# a mistake in the file fails the reload and the running relay carries on).
# Sandbox report: systemd-analyze security tailwart-edge.service (1.4 "OK" with systemd 252)

[Unit]
Description=tailwart-edge mail port relay (TCP + PROXY protocol to the tailnet)
# After tailscaled when it is there, but never starting it (an admin may have stopped it on
# purpose) nor needing it: the relay binds wildcard addresses and resolves the upstream for each
# connection, so it may start before the tailnet is up and keeps running if tailscaled restarts.
Wants=network-online.target
After=network-online.target tailscaled.service
# A missing settings file is named in `systemctl status`, not left to fail as an empty UPSTREAM
AssertPathExists=/etc/default/tailwart-edge

[Service]
Type=notify
# The relay reads the settings itself, so that a reload reads them again
ExecStart=/usr/bin/python3 /usr/local/bin/tailwart_edge.py --settings /etc/default/tailwart-edge
# Reload: a new process (the script as it is on disk now: an upgrade too) takes the listening
# sockets over, and the old one, still the main process, hands it that role (MAINPID=; so the
# default NotifyAccess=main suffices) and lets its sessions finish. This command waits for the
# outcome, so a failed reload fails visibly.
ExecReload=/usr/bin/python3 /usr/local/bin/tailwart_edge.py --reload $MAINPID
# where the relay leaves the outcome of a reload for the command above
RuntimeDirectory=tailwart-edge
# Stop: TERM to every process of the service, the old ones of a reload included
KillMode=control-group
# SIGTERM lets open sessions finish for up to --drain-timeout (30 s), then the relay exits 0
# (an old process of a reload too); raise this with a longer --drain-timeout
TimeoutStopSec=45s
# The relay pings from its event loop every 15 s: a loop stuck for 30 s is killed and restarted
WatchdogSec=30s
Restart=on-failure
RestartSec=2s
# Exit status 2 is a bad command line: a restart cannot help; fix /etc/default/tailwart-edge
RestartPreventExitStatus=2
# The journal says tailwart-edge, not python3 (journalctl -t tailwart-edge)
SyslogIdentifier=tailwart-edge
# Two descriptors per session: room for about 130,000 sessions (the relay sizes itself to this)
LimitNOFILE=262144

# No fixed account: a transient uid/gid that exists only while the service runs
DynamicUser=yes
# One privilege, binding ports below 1024; no other capability, and no way to gain one
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
RestrictSUIDSGID=yes
# No writable file system: / read-only, home directories hidden, a private /tmp and mounts
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
UMask=0077
# No SysV IPC or kernel keyring shared with other services
PrivateIPC=yes
RemoveIPC=yes
KeyringMode=private
# No devices but pseudo-devices such as /dev/null and /dev/urandom
PrivateDevices=yes
DevicePolicy=closed
# No changes to the kernel: sysctls, modules, kernel log, cgroups, clock, host name
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# No view of other processes, nor of /proc beyond its own
ProtectProc=invisible
ProcSubset=pid
# Sockets: IPv4 and IPv6 for the relay; AF_UNIX for sd_notify, the event loop's wake-up pair
# and name lookups through nscd or systemd-resolved. No netlink, packet or other families.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
# No new namespaces, realtime scheduling, personality changes or writable+executable memory
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
# System calls: those of ordinary services (splice, epoll, threads included), minus the
# privileged ones and resource controls (setrlimit: LimitNOFILE above sets the limit instead)
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def unit_text(python):
    """The unit, running the script with `python` (tailwart-edge.service is unit_text of
    /usr/bin/python3)."""
    return UNIT_TEXT.replace("=%s " % UNIT_PYTHON, "=%s " % python)


def add_install(group):
    """--install, --uninstall, --replace-settings."""
    group.add_argument("--install", action="store_true",
                       help="as root, under systemd: install the script, the unit and %s "
                       "(written from the mappings and options given), check them, and start "
                       "the service; again with a newer script: an upgrade (a reload)"
                       % INSTALL_SETTINGS)
    group.add_argument("--uninstall", action="store_true",
                       help="stop and disable the service, remove the unit and the script "
                       "(the settings file is kept)")
    group.add_argument("--replace-settings", action="store_true",
                       help="with --install: replace a settings file that says something else "
                       "(without it, --install shows the difference and stops)")


def install_argv(argv):
    """A bare `--install` keeps the settings file there is: an upgrade."""
    if argv == ["--install"] and os.path.exists(INSTALL_SETTINGS):
        return argv + ["--settings", INSTALL_SETTINGS]
    return argv


def settings_text(words, parsed):
    """The settings file that stands for these command-line words (a settings file's words
    expanded), which parse_args read as `parsed`; raises ConfigError if it cannot say the
    same."""
    parser = build_parser()
    # the words as given, not as converted (a CIDR, a number of seconds): no type conversion
    for action in parser._actions:
        action.type = None
    given = parser.parse_known_args(words)
    options, rest = given[0], [word for word in given[1] if not word.startswith("-")]
    option_words = []
    for action in parser._actions:
        value = getattr(options, action.dest, None)
        if action.dest in NOT_SETTINGS or not action.option_strings or value is None:
            continue
        name = action.option_strings[-1]
        if action.nargs == 0:
            if value is True:
                option_words.append(name)
        elif value is not action.default:
            for item in value if isinstance(value, list) else [value]:
                # `--deny=-x`: a value that starts with a dash is not read as an option
                option_words += ["%s=%s" % (name, item)] if item.startswith("-") else [name, item]
    lines = ["# written by `%s --install`: the relay reads it at each start and reload" % PROG,
             "# (after an edit: sudo systemctl reload %s)" % SERVICE]
    if options.upstream is not None:
        lines.append("UPSTREAM=" + settings_quote(options.upstream))
    lines.append("PORTS=" + " ".join(settings_quote(w) for w in options.mappings + rest))
    if option_words:
        lines.append("OPTIONS=" + " ".join(settings_quote(w) for w in option_words))
    text = "\n".join(lines) + "\n"
    # read back by the relay's own reader, the file must mean what the words meant
    if not same_meaning(parsed, parse_args(words_of_settings(text.encode(), INSTALL_SETTINGS))):
        raise ConfigError("--install: these options cannot be written to %s as they are (a "
                          "value with a space or a control character?); write the file by hand"
                          % INSTALL_SETTINGS)
    return text


def settings_quote(word):
    """`word` as a settings file value reads it back (sh quoting: '...', ' as '\\'')."""
    if SETTINGS_SPLIT_RE.search(word) or SETTINGS_CONTROL_RE.search(word):
        raise ConfigError("--install: %r has a space or a control character, which a settings "
                          "file cannot hold in one word; leave it out" % word)
    if PLAIN_WORD_RE.match(word):
        return word
    return "'%s'" % word.replace("'", "'\\''")


def same_meaning(first, second):
    """Do two parse_args results run the same relay (the installer's options aside)?"""
    def meaning(parsed):
        options = dict(vars(parsed[0]))
        for dest in NOT_SETTINGS:
            options.pop(dest, None)
        return options, [mapping.spec for mapping in parsed[1]]
    return meaning(first) == meaning(second)


def service_python():
    """(path, version, why others were passed over): the first python3 >= 3.6 the service's
    user can run; (None, None, why) when there is none."""
    passed = []
    for path in SERVICE_PYTHONS + (sys.executable,):
        if path in [p for p, _ in passed] or not path:
            continue
        why = unreachable(path)
        if why is None:
            try:
                found = subprocess.run(
                    [path, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                    universal_newlines=True, timeout=30)
                version = found.stdout.strip()
                if found.returncode == 0 and tuple(map(int, version.split("."))) >= (3, 6):
                    return path, version, passed
                why = "is Python %s; the relay needs 3.6 or newer" % (version or "?")
            except (OSError, ValueError, subprocess.TimeoutExpired) as e:
                why = "does not run: %s" % (getattr(e, "strerror", None) or e)
        passed.append((path, why))
    return None, None, passed


def unreachable(path):
    """Why the service's user (any uid, ProtectHome=yes) could not run `path`, or None."""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        return "is not there"
    if real.startswith(HIDDEN_FROM_SERVICE) or path.startswith(HIDDEN_FROM_SERVICE):
        return "is under %s, which the service cannot see (ProtectHome=yes)" % (
            "/" + (real if real.startswith(HIDDEN_FROM_SERVICE) else path).split("/")[1])
    if SETTINGS_SPLIT_RE.search(path):
        return "has a space in its path"
    directory = real
    while directory != "/":
        directory = os.path.dirname(directory)
        if not os.stat(directory).st_mode & 0o001:
            return "is in %s, which other users may not enter" % directory
    if not os.stat(real).st_mode & 0o001:
        return "may be run by its owner only"
    return None


def say(line):
    print("install: %s" % line)
    sys.stdout.flush()


def systemctl(*arguments):
    """Run systemctl, its output passed through; True when it succeeded."""
    say("systemctl %s" % " ".join(arguments))
    try:
        return subprocess.run(["systemctl"] + list(arguments), stdin=subprocess.DEVNULL,
                              timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        say("systemctl failed: %s" % (getattr(e, "strerror", None) or e))
        return False


def unit_is(state):
    """Is the service `state` (active, enabled)? A question: systemctl is-STATE --quiet."""
    return subprocess.run(["systemctl", "is-" + state, "--quiet", SERVICE],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=60).returncode == 0


def may_install(what):
    """None when this process may install (root, systemd running), else the one-line reason."""
    if os.geteuid() != 0:
        return "%s writes /usr/local/bin, /etc/systemd/system and /etc/default: run it as root " \
            "(sudo python3 %s %s ...)" % (what, PROG, what)
    if not os.path.isdir(SYSTEMD_RUNNING):
        return "%s: this system does not run systemd (no %s), so nothing was installed; start " \
            "the relay from your init system instead (as root: %s --user NAME MAPPING ...)" \
            % (what, SYSTEMD_RUNNING, PROG)
    return None


def read_bytes(path):
    """The file's bytes, or None when it is not there."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def put_file(path, data, mode):
    """Write `data` to `path` as a whole (a new file renamed over the old: a reload never reads
    half a script), owned by root, with `mode` whatever the umask."""
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    new = path + ".tailwart-new"
    try:
        os.unlink(new)
    except FileNotFoundError:
        pass
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchown(f.fileno(), 0, 0)
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(new, path)
    except BaseException:
        try:
            os.unlink(new)
        except OSError:
            pass
        raise
    say("wrote %s (mode %04o)" % (path, mode))


def install_refusal(options):
    """What is wrong with --install's (or --uninstall's) other options, or None."""
    if options.install and options.uninstall:
        return "--install and --uninstall: give one of them"
    if options.uninstall and (options.mappings or options.replace_settings):
        return "--uninstall takes no MAPPING and no other option"
    if options.replace_settings and not options.install:
        return "--replace-settings goes with --install"
    if options.install and options.check:
        return "--install runs the check itself; leave --check out"
    if options.install and options.user:
        return "--install: the unit runs the relay as a user of its own (DynamicUser=); " \
            "leave --user out"
    return None


def install(options, mappings, argv):
    """--install with these command-line words (parse_args read them as options, mappings):
    the exit code (0 running, 1 not, 2 a mistake in the words)."""
    import difflib
    words = list(argv)
    if options.settings is not None:
        words = settings_words(options.settings) + words
    try:
        refusal = install_refusal(options)
        if refusal is not None:
            raise ConfigError(refusal)
        text = settings_text(words, (options, mappings))
    except ConfigError as e:
        return failed(2, str(e), None)
    refusal = may_install("--install")
    if refusal is not None:
        return failed(1, refusal, None)
    python, version, passed = service_python()
    for path, why in passed:
        say("not %s: it %s" % (path, why))
    if python is None:
        return failed(1, "--install: no python3 the service's user can run; install Debian's "
                      "(apt install python3-minimal) and run --install again", None)
    say("the unit runs %s (Python %s), which its user can run" % (python, version))

    # the settings: an admin's file that says something else is shown, never replaced unasked
    old = read_bytes(INSTALL_SETTINGS)
    settings = text.encode()
    if old is not None and old != settings:
        try:
            same = words_of_settings(old, INSTALL_SETTINGS) == \
                words_of_settings(settings, INSTALL_SETTINGS)
        except ConfigError:
            same = False
        if same:
            say("%s says the same as the command line: kept as it is" % INSTALL_SETTINGS)
            settings = old
        elif not options.replace_settings:
            sys.stdout.writelines(difflib.unified_diff(
                old.decode("utf-8", "replace").splitlines(True), text.splitlines(True),
                INSTALL_SETTINGS, "the command line"))
            return failed(1, "--install: %s says something else (above); nothing was changed. "
                          "Add --replace-settings to replace it, or run `%s --install` alone "
                          "to keep it" % (INSTALL_SETTINGS, PROG), None)

    # the doctor, run as the service will run: this interpreter, these settings
    check = [python, SCRIPT, "--check"] + words_of_settings(settings, INSTALL_SETTINGS)
    say("checking: %s --check --settings %s" % (python, INSTALL_SETTINGS))
    try:
        code = subprocess.run(check, stdin=subprocess.DEVNULL, timeout=CHECK_SLACK + 4 *
                              options.connect_timeout + 2 * PLAIN_WAIT).returncode
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        return failed(1, "--install: the check failed (above), so nothing was installed or "
                      "enabled%s; fix what it names, then run --install again"
                      % ("" if not unit_is("active") else " (the running relay carries on)"),
                      None)

    # the files: only what changed is written
    script = read_bytes(SCRIPT)
    changed = []
    for path, data, mode in ((INSTALL_SCRIPT, script, 0o755),
                             (INSTALL_UNIT, unit_text(python).encode(), 0o644),
                             (INSTALL_SETTINGS, settings, 0o644)):
        if read_bytes(path) != data:
            put_file(path, data, mode)
            changed.append(path)
    if not changed:
        say("every file is as it should be")
    if INSTALL_UNIT in changed and not systemctl("daemon-reload"):
        return failed(1, "--install: systemctl daemon-reload failed (above)", None)
    if unit_is("active"):
        # an upgrade: the new script takes the ports over from the running one, no gap
        if changed and not systemctl("reload", SERVICE):
            return failed(1, "--install: the reload failed (above) and the running relay "
                          "carries on; see journalctl -t %s -n 20" % SERVICE, None)
        if INSTALL_UNIT in changed:
            say("the unit changed: the sandbox and interpreter apply from the next "
                "`systemctl restart %s` (a restart refuses clients for a moment)" % SERVICE)
        if not unit_is("enabled") and not systemctl("enable", SERVICE):
            return failed(1, "--install: systemctl enable failed (above)", None)
    elif not systemctl("enable", "--now", SERVICE):
        return failed(1, "--install: the service did not start; see journalctl -t %s -n 20 "
                      "and systemctl status %s" % (SERVICE, SERVICE), None)
    say("%s is running; see it with: systemctl status %s; journalctl -t %s -f"
        % (SERVICE, SERVICE, SERVICE))
    return 0


def uninstall(options):
    """--uninstall: stop, disable, remove the unit and the script; the settings stay."""
    refusal = install_refusal(options)
    if refusal is not None:
        return failed(2, refusal, None)
    refusal = may_install("--uninstall")
    if refusal is not None:
        return failed(1, refusal, None)
    if os.path.exists(INSTALL_UNIT):
        # stop lets open sessions finish, up to --drain-timeout
        if not systemctl("disable", "--now", SERVICE):
            return failed(1, "--uninstall: could not stop and disable %s (above); nothing was "
                          "removed" % SERVICE, None)
    for path in (INSTALL_UNIT, INSTALL_SCRIPT):
        try:
            os.unlink(path)
            say("removed %s" % path)
        except FileNotFoundError:
            say("%s was not there" % path)
    systemctl("daemon-reload")
    subprocess.run(["systemctl", "reset-failed", SERVICE], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    if os.path.exists(INSTALL_UNIT + ".d"):
        say("left %s.d: not written by --install; remove it if it was for this service"
            % INSTALL_UNIT)
    if os.path.exists(INSTALL_SETTINGS):
        say("kept %s (your settings); remove it yourself if you no longer want it"
            % INSTALL_SETTINGS)
    return 0


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    """Parse, bind, drop privileges, serve. Returns the exit code."""
    catch_signals()
    open_standard_fds()
    argv = install_argv(sys.argv[1:] if argv is None else list(argv))
    predecessor = reload_channel()      # set when a reload started this process
    try:
        options, mappings = parse_args(argv)
    except ConfigError as e:
        return failed(2, str(e), predecessor)
    if options.reload is not None:
        return reload_client(options.reload)
    if options.install or options.uninstall or options.replace_settings:
        return install(options, mappings, argv) if options.install else uninstall(options)
    if options.check:
        return run_check(options, mappings)
    log.configure(options.verbose, options.quiet)
    log.start()
    raise_fd_limit()
    "tailwart".encode("idna")   # getaddrinfo() needs this codec: load it while files are readable
    try:
        user = lookup_user(options.user) if options.user else None
        listeners = open_listeners(mappings, options.proxy_protocol)
        server = Server(options, mappings, listeners, argv)
        if options.metrics is not None:
            server.metrics = Metrics(server, open_metrics(options.metrics))
        else:
            close_handed_metrics()
        if user is not None:
            drop_privileges(user)
    except (StartupError, ConfigError) as e:
        log.flush()
        return failed(1 if isinstance(e, StartupError) else 2, e.args[0], predecessor)
    if hasattr(os, "getuid") and os.getuid() == 0 and user is None:
        log(WARNING, "running as root; pass --user NAME to drop privileges once the "
            "listeners are bound")
    server.serve_forever(predecessor)
    log.flush()
    return 0


def failed(code, message, predecessor):
    """Say why we cannot start, in one line (to the old process too, on a reload)."""
    line = one_line(message)
    write_stderr("%s: error: %s\n" % (PROG, line))
    if predecessor is not None:
        send_line(predecessor, "failed " + line)
    return code


def reload_channel():
    """The socket to the process that started this one in a reload, or None."""
    fd = os.environ.pop("TAILWART_REPORT_FD", "")
    if not fd.isdigit():
        return None
    try:
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, int(fd))
    except OSError:
        return None


def one_line(message):
    """An error message as one line, whatever the arguments it quotes hold."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def open_standard_fds():
    """Started with stdin, stdout or stderr closed (`2>&-`), put /dev/null there: else the
    first socket would take descriptor 2, and log lines would go into a client's stream."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


if __name__ == "__main__":
    sys.exit(main())
