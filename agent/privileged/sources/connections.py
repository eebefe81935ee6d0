"""Which database servers the running gunicorn master/workers are actually connected to.

TCP: psutil's per-process connections (ESTABLISHED, remote address and port).
Unix sockets: the connecting side of a unix socket has no address of its own and psutil
(which reads /proc/net/unix) cannot say what it is connected to. The kernel can: a
NETLINK_SOCK_DIAG dump of AF_UNIX sockets (what `ss -x` uses) gives every socket's inode,
its peer's inode and, for the server side, the bound path. The worker's socket inode
(from /proc/PID/fd) -> peer inode -> the peer's path, e.g. /run/postgresql/.s.PGSQL.5432.
The dump covers the agent's network namespace, which is the host's for normal services.

Steady state (root): nothing of the host's other sockets is read. The processes' own socket
inodes come from /proc/PID/fd; each socket is looked at through a duplicate of its descriptor
(pidfd_getfd(2), the ptrace access root has): family, TCP state, both addresses, the unix
peer's path and credentials; a unix socket's peer inode by an exact sock_diag lookup of its
own inode (only for a socket whose peer is a PostgreSQL socket). The cost grows with the
unit's sockets, not the host's. Where pidfd_getfd is refused (not
root, an old kernel) the table scan above is the fallback.
"""

from __future__ import annotations

import ctypes
import errno as errnos
import functools
import ipaddress
import os
import posixpath
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from agent.privileged.sources import procs

PG_SOCKET_PREFIX = ".s.PGSQL."
# Ports that speak the PostgreSQL protocol by convention (server, pgbouncer).
PG_PORTS = frozenset({5432, 6432})
# libpq's usual compiled-in socket directories (Debian, psycopg2-binary wheels, upstream).
DEFAULT_SOCKET_DIRS = ("/run/postgresql", "/tmp")


@dataclass(frozen=True)
class ObservedConnection:
    """One established connection of a process: TCP endpoint or unix socket path."""

    pid: int
    kind: str  # "tcp" or "unix"
    local_addr: str = ""
    local_port: int = 0
    remote_addr: str = ""
    remote_port: int = 0
    # Unix: the server's socket path ("" when the peer could not be found).
    socket_path: str = ""
    # Unix: the inode of the server side of the connection (its backend holds it).
    peer_inode: int = 0
    # Unix: the pid that listened on the server's socket (SO_PEERCRED), 0 when unknown.
    peer_pid: int = 0

    @property
    def endpoint(self) -> str:
        """'10.0.0.5:5432' or the unix socket path."""
        if self.kind == "unix":
            return self.socket_path or "unix socket (peer unknown)"
        addr = f"[{self.remote_addr}]" if ":" in self.remote_addr else self.remote_addr
        return f"{addr}:{self.remote_port}"

    def looks_like_postgres(self, extra_ports: Iterable[int] = ()) -> bool:
        """A unix .s.PGSQL.* socket, or TCP to a PostgreSQL-ish port."""
        if self.kind == "unix":
            return posixpath.basename(self.socket_path).startswith(PG_SOCKET_PREFIX)
        return self.remote_port in PG_PORTS or self.remote_port in set(extra_ports)


@dataclass(frozen=True)
class ConnectionVerdict:
    """Are the processes connected to the URL's server, to another one, or to none."""

    status: str  # "connected", "elsewhere" or "none" (an idle pool: not a finding by itself)
    matching: tuple[ObservedConnection, ...] = ()
    other: tuple[ObservedConnection, ...] = ()
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"status": self.status, "message": self.message,
                "matching": sorted({c.endpoint for c in self.matching}),
                "other": sorted({c.endpoint for c in self.other})}


# -- pure --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _norm_addr(addr: str) -> str:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)  # ::ffff:127.0.0.1 from a dual-stack socket
    return str(ip)


def _norm_dir(path: str) -> str:
    path = posixpath.normpath(path)
    return "/run" + path[len("/var/run"):] if path.startswith("/var/run") else path


def literal_addresses(host: str) -> tuple[str, ...]:
    """Pure: addresses a host string stands for without DNS (localhost, IP literals)."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return ("127.0.0.1", "::1")
    try:
        return (_norm_addr(str(ipaddress.ip_address(host.strip("[]")))),)
    except ValueError:
        return ()


def match_connections(url_host: str | Sequence[str], url_port: int,
                      url_socket_dir: str | None, observed: Iterable[ObservedConnection],
                      extra_ports: Iterable[int] = (), label: str = "") -> ConnectionVerdict:
    """Pure: url_host is a host string (only literals/localhost understood) or resolved
    addresses; url_socket_dir the unix socket directory when the URL uses one. TCP
    connections count as database connections on 5432/6432, the URL's port, extra_ports."""
    addrs = (set(literal_addresses(url_host)) if isinstance(url_host, str)
             else {_norm_addr(a) for a in url_host})
    sock_dirs = ({_norm_dir(url_socket_dir)} if url_socket_dir
                 else set() if addrs else {_norm_dir(d) for d in DEFAULT_SOCKET_DIRS})
    want_socket_name = f"{PG_SOCKET_PREFIX}{url_port}"
    extra = {url_port, *extra_ports}
    matching, other = [], []
    for conn in observed:
        if not conn.looks_like_postgres(extra):
            continue  # redis, HTTP upstreams...: not ours to judge
        if conn.kind == "tcp":
            hit = _norm_addr(conn.remote_addr) in addrs and conn.remote_port == url_port
        else:
            hit = (posixpath.basename(conn.socket_path) == want_socket_name
                   and _norm_dir(posixpath.dirname(conn.socket_path)) in sock_dirs)
        (matching if hit else other).append(conn)
    where = label or _describe_target(url_host, url_port, url_socket_dir)
    if matching:
        msg = f"connected to {where} ({len(matching)} connection(s))"
        if other:
            msg += "; also to " + ", ".join(sorted({c.endpoint for c in other}))
        return ConnectionVerdict("connected", tuple(matching), tuple(other), msg)
    if other:
        return ConnectionVerdict("elsewhere", (), tuple(other),
                                 f"not connected to {where}, but to "
                                 + ", ".join(sorted({c.endpoint for c in other})))
    return ConnectionVerdict("none", message=f"no database connection seen (to {where} or "
                             "any other server); an idle pool opens them on demand")


def _describe_target(url_host: str | Sequence[str], port: int, socket_dir: str | None) -> str:
    if socket_dir:
        return posixpath.join(socket_dir, f"{PG_SOCKET_PREFIX}{port}")
    host = url_host if isinstance(url_host, str) else "/".join(url_host)
    return f"{host or 'the default unix socket'}:{port}"


def sessions_by_connection(observed: Iterable[ObservedConnection],
                           sessions: Iterable[Any]) -> dict[ObservedConnection, str]:
    """Pure: TCP connections whose local address/port appear as a session's client
    address/port in pg_stat_activity (database.RoleSession) -> that session's database."""
    by_client = {(_norm_addr(s.client_addr), s.client_port): s.database for s in sessions
                 if s.client_port > 0}
    return {c: by_client[(_norm_addr(c.local_addr), c.local_port)] for c in observed
            if c.kind == "tcp" and (_norm_addr(c.local_addr), c.local_port) in by_client}


@dataclass(frozen=True)
class WorkerSession:
    """One worker connection named by the server: which database, as which role."""

    connection: ObservedConnection
    backend_pid: int
    database: str
    user: str
    how: str  # "client address" or "backend pid"


def name_connections(observed: Iterable[ObservedConnection], sessions: Iterable[Any],
                     backends: Mapping[ObservedConnection, int]) -> list[WorkerSession]:
    """Pure: the server's own view of each worker connection (pg_stat_activity rows,
    database.RoleSession): by the client address/port the server saw, else by the backend
    process that holds the other end (backends: connection -> backend pid)."""
    sessions = list(sessions)
    by_client = {(_norm_addr(s.client_addr), s.client_port): s for s in sessions
                 if s.client_port > 0}
    by_pid = {s.pid: s for s in sessions}
    named = []
    for conn in observed:
        session = by_client.get((_norm_addr(conn.local_addr), conn.local_port)) \
            if conn.kind == "tcp" else None
        how = "client address"
        if session is None and backends.get(conn) in by_pid:
            session, how = by_pid[backends[conn]], "backend pid"
        if session is not None:
            named.append(WorkerSession(conn, session.pid, session.database,
                                       getattr(session, "user", ""), how))
    return named


def backend_pids(observed: Iterable[ObservedConnection],
                 proc: str = "/proc") -> dict[ObservedConnection, int]:
    """Local servers only: the process holding the other end of each connection (the
    PostgreSQL backend; a pooler's process is not a backend and will not match)."""
    observed = list(observed)
    found: dict[ObservedConnection, int] = {}
    tcp = {(c.remote_addr, c.remote_port, c.local_addr, c.local_port): c
           for c in observed if c.kind == "tcp"}
    if tcp:
        try:
            table = psutil.net_connections(kind="inet")
        except (psutil.Error, OSError):
            table = []
        for c in table:
            if c.pid and c.raddr and c.status == psutil.CONN_ESTABLISHED:
                key = (_norm_addr(c.laddr.ip), c.laddr.port, _norm_addr(c.raddr.ip),
                       c.raddr.port)
                if key in tcp:
                    found[tcp[key]] = c.pid
    unix = {c.peer_inode: c for c in observed if c.kind == "unix" and c.peer_inode}
    if unix:
        for pid in _server_processes(observed, proc):
            try:
                fds = os.listdir(f"{proc}/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                inode = _socket_inode(pid, int(fd), proc)
                if inode in unix:
                    found[unix[inode]] = pid
    return found


def _server_processes(observed: list[ObservedConnection], proc: str) -> list[int]:
    """The processes that may hold the server side of the unix connections: the children
    of the postmasters that listen on them (SO_PEERCRED), else every postgres process."""
    listeners = {c.peer_pid for c in observed if c.kind == "unix" and c.peer_pid > 0}
    pids: list[int] = []
    for listener in sorted(listeners):
        kids = procs.descendants(listener, proc)
        if kids is None:   # gone, or no children files: look at every postgres process
            listeners = set()
            break
        pids += kids
    if listeners:
        return pids
    return [p.pid for p in psutil.process_iter(["name"])
            if (p.info.get("name") or "").startswith(("postgres", "postmaster"))]


# -- I/O ---------------------------------------------------------------------------------------
def resolve_host(host: str, port: int = 5432) -> tuple[str, ...]:
    """The addresses a URL's host resolves to (getaddrinfo); () when it does not resolve."""
    literal = literal_addresses(host)
    if literal:
        return literal
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        return ()
    return tuple(dict.fromkeys(_norm_addr(str(info[4][0])) for info in infos))


SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_PEER = 0x1, 0x4
UNIX_DIAG_NAME, UNIX_DIAG_PEER = 0, 2
TCP_ESTABLISHED = 1
NETLINK_SOCK_DIAG = 4


def unix_socket_table() -> dict[int, tuple[int, str]]:
    """Connected AF_UNIX sockets of this network namespace: inode -> (peer inode, path)."""
    table: dict[int, tuple[int, str]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 1 << TCP_ESTABLISHED, 0,
                          UDIAG_SHOW_NAME | UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF)
        nl.send(struct.pack("=LHHLL", 16 + len(req), SOCK_DIAG_BY_FAMILY,
                            NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, _flags, _seq, _pid = struct.unpack_from("=LHHLL", data, offset)
                if mtype == NLMSG_DONE:
                    return table
                if mtype == NLMSG_ERROR:
                    errno = -struct.unpack_from("=i", data, offset + 16)[0]
                    raise OSError(errno, os.strerror(errno))
                _parse_unix_diag(data[offset + 16: offset + length], table)
                offset += (length + 3) & ~3
                if length < 16:
                    return table


def _parse_unix_diag(msg: bytes, table: dict[int, tuple[int, str]]) -> None:
    if len(msg) < 16:
        return
    _fam, _type, _state, _pad, ino, _c0, _c1 = struct.unpack_from("=BBBBIII", msg)
    peer, name, pos = 0, "", 16
    while pos + 4 <= len(msg):
        rta_len, rta_type = struct.unpack_from("=HH", msg, pos)
        if rta_len < 4:
            break
        payload = msg[pos + 4: pos + rta_len]
        if rta_type == UNIX_DIAG_PEER and len(payload) >= 4:
            peer = struct.unpack_from("=I", payload)[0]
        elif rta_type == UNIX_DIAG_NAME and payload and payload[0] != 0:  # not abstract
            name = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += (rta_len + 3) & ~3
    table[ino] = (peer, name)


def _socket_inode(pid: int, fd: int, proc: str) -> int | None:
    try:
        link = os.readlink(f"{proc}/{pid}/fd/{fd}")
    except OSError:
        return None
    return int(link[8:-1]) if link.startswith("socket:[") else None


SYS_PIDFD_GETFD = 438   # the same number on every architecture (unified syscall table)
TCP_INFO_STATE = 0      # offset of tcpi_state in struct tcp_info
_libc = ctypes.CDLL(None, use_errno=True)


class SocketsUnavailable(OSError):
    """A process's sockets cannot be looked at one by one (no pidfd_getfd access)."""


def socket_inodes(pid: int, proc: str = "/proc") -> list[tuple[int, int]]:
    """(fd, socket inode) of every socket pid holds (/proc/PID/fd)."""
    found = []
    for fd in os.listdir(f"{proc}/{pid}/fd"):
        inode = _socket_inode(pid, int(fd), proc)
        if inode is not None:
            found.append((int(fd), inode))
    return found


def _borrow(pidfd: int, fd: int) -> int:
    """A duplicate of another process's descriptor (pidfd_getfd); SocketsUnavailable when
    the kernel or the agent's privileges refuse it, OSError when that fd is gone."""
    dup = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if dup < 0:
        err = ctypes.get_errno()
        if err in (errnos.EPERM, errnos.ENOSYS, errnos.EACCES):
            raise SocketsUnavailable(err, os.strerror(err))
        raise OSError(err, os.strerror(err))
    return dup


def unix_socket_info(inode: int) -> tuple[int, int, str] | None:
    """One AF_UNIX socket by inode (an exact sock_diag lookup, no dump): (state, peer inode,
    bound path), None when no such socket exists."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode,
                          UDIAG_SHOW_NAME | UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF)
        nl.send(struct.pack("=LHHLL", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                            1, 0) + req)
        data = nl.recv(65536)
    if len(data) < 16:
        return None
    length, mtype = struct.unpack_from("=LH", data)
    if mtype == NLMSG_ERROR:
        return None   # ENOENT: no unix socket has that inode
    table: dict[int, tuple[int, str]] = {}
    _parse_unix_diag(data[16:length], table)
    if inode not in table:
        return None
    return data[16 + 2], *table[inode]


def _socket_connection(pid: int, sock: socket.socket, inode: int,
                       ) -> ObservedConnection | None:
    """The connection one borrowed socket stands for, as observe() reports it."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[TCP_INFO_STATE]
        if state != TCP_ESTABLISHED:
            return None
        try:
            remote = sock.getpeername()
        except OSError:
            return None
        local = sock.getsockname()
        return ObservedConnection(pid, "tcp", _norm_addr(local[0]), local[1],
                                  _norm_addr(remote[0]), remote[1])
    if sock.family != socket.AF_UNIX:
        return None
    if sock.getsockname():
        return None   # bound: the process is a server, not a client
    try:
        peer_name = sock.getpeername()
    except OSError:
        return None   # not connected
    path = peer_name if isinstance(peer_name, str) else ""   # abstract names have no path
    peer, peer_pid = 0, 0
    if posixpath.basename(path).startswith(PG_SOCKET_PREFIX):
        # Only a database connection needs its server side (to name the backend later).
        info = unix_socket_info(inode)
        peer = info[1] if info is not None else 0
        if sock.type == socket.SOCK_STREAM:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            peer_pid = struct.unpack("=iII", creds)[0]
    return ObservedConnection(pid, "unix", socket_path=path, peer_inode=peer, peer_pid=peer_pid)


def observe_own(pids: Iterable[int], proc: str = "/proc",
                ) -> tuple[list[ObservedConnection], list[str]]:
    """observe(), looking only at the processes' own sockets (SocketsUnavailable when
    their descriptors cannot be borrowed)."""
    observed: list[ObservedConnection] = []
    errors: list[str] = []
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            errors.append(f"pid {pid}: cannot read its connections: {exc}")
            continue
        try:
            try:
                sockets = socket_inodes(pid, proc)
            except OSError as exc:
                errors.append(f"pid {pid}: cannot read its connections: {exc}")
                continue
            for fd, inode in sockets:
                try:
                    dup = _borrow(pidfd, fd)
                except SocketsUnavailable:
                    raise
                except OSError:
                    continue  # closed meanwhile
                try:
                    sock = socket.socket(fileno=dup)
                except OSError:
                    os.close(dup)
                    continue
                try:
                    conn = _socket_connection(pid, sock, inode)
                except OSError as exc:
                    errors.append(f"pid {pid}: socket {inode}: {exc}")
                    conn = None
                finally:
                    sock.close()   # our duplicate only: the process's socket stays open
                if conn is not None:
                    observed.append(conn)
        finally:
            os.close(pidfd)
    return observed, errors


def observe(pids: Iterable[int], proc: str = "/proc") -> tuple[list[ObservedConnection], list[str]]:
    """Established TCP and unix-socket connections of pids; errors as texts, never raised."""
    pids = list(pids)
    try:
        return observe_own(pids, proc)
    except SocketsUnavailable:
        return observe_scan(pids, proc)


def observe_scan(pids: Iterable[int], proc: str = "/proc",
                 ) -> tuple[list[ObservedConnection], list[str]]:
    """observe() through psutil and a sock_diag dump: reads the host's socket tables."""
    observed: list[ObservedConnection] = []
    errors: list[str] = []
    unix_table: Mapping[int, tuple[int, str]] | None = None
    for pid in pids:
        try:
            process = psutil.Process(pid)
            conns = process.net_connections(kind="inet")
            unix_conns = process.net_connections(kind="unix")
        except (psutil.Error, OSError) as exc:
            errors.append(f"pid {pid}: cannot read its connections: {exc}")
            continue
        for c in conns:
            if c.status == psutil.CONN_ESTABLISHED and c.raddr:
                observed.append(ObservedConnection(pid, "tcp", _norm_addr(c.laddr.ip),
                                                   c.laddr.port, _norm_addr(c.raddr.ip),
                                                   c.raddr.port))
        for c in unix_conns:
            if c.laddr:  # a bound socket: the process is a server, not a client
                continue
            if unix_table is None:
                try:
                    unix_table = unix_socket_table()
                except OSError as exc:
                    errors.append(f"unix socket peers unavailable (sock_diag): {exc}")
                    unix_table = {}
            inode = _socket_inode(pid, c.fd, proc)
            peer = unix_table.get(inode or -1, (0, ""))[0]
            path = unix_table.get(peer, (0, ""))[1] if peer else ""
            if inode in unix_table:  # only connected sockets are in the dump
                observed.append(ObservedConnection(pid, "unix", socket_path=path,
                                                   peer_inode=peer))
    return observed, errors


def local_postgres_ports() -> set[int]:
    """TCP ports this host's postgres/pgbouncer processes listen on (needs root for others')."""
    ports: set[int] = set()
    try:
        listeners = psutil.net_connections(kind="inet")
    except (psutil.Error, OSError):
        return ports
    for c in listeners:
        if c.status != psutil.CONN_LISTEN or not c.pid:
            continue
        try:
            name = psutil.Process(c.pid).name()
        except psutil.Error:
            continue
        if name.startswith(("postgres", "pgbouncer", "postmaster")):
            ports.add(c.laddr.port)
    return ports


def connection_verdict(url_host: str, url_port: int, pids: Iterable[int],
                       known_ports: Iterable[int] = (),
                       ) -> tuple[ConnectionVerdict, list[str]]:
    """Observe pids and judge against the URL's host (a socket dir when it starts with '/')."""
    observed, errors = observe(pids)
    # A local server on an unusual port is only recognisable by who listens there; that scan
    # costs ~0.1-0.3 s, so only do it when a loopback connection goes to an unknown port.
    unknown = any(c.kind == "tcp" and c.remote_port not in PG_PORTS | {url_port}
                  and ipaddress.ip_address(c.remote_addr).is_loopback for c in observed)
    # known_ports: database ports the caller already knows of (e.g. from the URL in the
    # running processes' own environment), recognised without scanning.
    extra = set(known_ports) | (local_postgres_ports() if unknown else set())
    if url_host.startswith("/"):
        return match_connections((), url_port, url_host, observed, extra), errors
    if not url_host:
        return match_connections((), url_port, None, observed, extra), errors
    addresses = resolve_host(url_host, url_port)
    if not addresses:
        errors.append(f"host {url_host} does not resolve")
    label = f"{url_host}:{url_port}"
    return match_connections(addresses, url_port, None, observed, extra, label), errors
