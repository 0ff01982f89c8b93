"""Who may talk to whom: CURVE keys for ZeroMQ, bearer tokens and TLS for the cloud endpoint.

Layout of a key directory (``d3 keys --out DIR`` writes it):

* ``DIR/public/<name>.key``: each principal's CURVE public key (edge nodes and devices). The edge nodes'
  ZAP authenticator allows exactly the keys in this folder, so adding a device = dropping its public key in.
* ``DIR/private/<name>.key_secret``: each principal's CURVE key pair (mode 600; give each machine only its own).
* ``DIR/tokens.json``: ``{name: bearer token}`` for the cloud endpoint (mode 600). The cloud keeps only
  SHA-256 digests in memory and compares them in constant time.
* ``DIR/cloud.crt`` / ``DIR/cloud.key``: a self-signed TLS certificate for the cloud (when asked for).

Why these pieces: pyzmq's ``zmq.auth`` does the CURVE handshake and ZAP allow-list (libsodium inside
libzmq), Python's ``ssl`` does TLS for aiohttp, and the ``cryptography`` package only writes the
self-signed certificate. Nothing here invents a cipher.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

log = logging.getLogger("d3.security")

PUBLIC_DIR, PRIVATE_DIR, TOKENS_FILE = "public", "private", "tokens.json"
CERT_FILE, CERT_KEY_FILE = "cloud.crt", "cloud.key"


# ------------------------------------------------------------------------------------------ CURVE keys
@dataclass
class CurveKeys:
    public: bytes  # z85
    secret: bytes  # z85


def generate_curve_keys(keys_dir: str | Path, names: list[str]) -> None:
    """A key pair per name: public key under public/, pair under private/ (mode 600)."""
    keys_dir = Path(keys_dir)
    public_dir, private_dir = keys_dir / PUBLIC_DIR, keys_dir / PRIVATE_DIR
    public_dir.mkdir(parents=True, exist_ok=True)
    private_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(private_dir, 0o700)
    for name in names:
        _check_name(name)
        public_path, secret_path = zmq.auth.create_certificates(str(private_dir), name)
        os.replace(public_path, public_dir / f"{name}.key")
        os.chmod(secret_path, 0o600)


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"principal name {name!r} must be letters, digits, '-', '_' or '.'")


def load_curve_keys(keys_dir: str | Path, name: str) -> CurveKeys:
    path = Path(keys_dir) / PRIVATE_DIR / f"{name}.key_secret"
    if not path.is_file():
        raise FileNotFoundError(f"no CURVE secret key for {name!r}: {path} is missing (run d3 keys)")
    public, secret = zmq.auth.load_certificate(str(path))
    if not secret:
        raise ValueError(f"{path} holds no secret key")
    return CurveKeys(public, secret)


def load_public_key(keys_dir: str | Path, name: str) -> bytes:
    path = Path(keys_dir) / PUBLIC_DIR / f"{name}.key"
    if not path.is_file():
        raise FileNotFoundError(f"no CURVE public key for {name!r}: {path} is missing (run d3 keys)")
    public, _ = zmq.auth.load_certificate(str(path))
    return public


def curve_server(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``socket`` a CURVE server; call before bind (libzmq reads the options at bind/accept)."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def curve_client(socket: zmq.Socket, keys: CurveKeys, server_public: bytes) -> None:
    """Make ``socket`` a CURVE client of the server whose public key is ``server_public``; before connect."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = server_public


class LoggingAuthenticator(AsyncioAuthenticator):
    """pyzmq's ZAP allow-list, logging every refusal at WARNING (pyzmq logs them at DEBUG) and counting them."""

    def __init__(self, context: zmq.Context, what: str = "node"):
        super().__init__(context, log=logging.getLogger("d3.security.zap"))
        self.what = what
        self.refused = 0
        self.allowed = 0
        self._last_address = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) > 3:
            self._last_address = msg[3].decode("utf-8", "replace")
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code == b"200":
            self.allowed += 1
        else:
            self.refused += 1
            log.warning("%s: refused a ZeroMQ peer from %s: %s", self.what, self._last_address or "?",
                        status_text.decode("utf-8", "replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def start_authenticator(context: zmq.Context, keys_dir: str | Path, what: str = "node") -> LoggingAuthenticator:
    """A running ZAP handler on ``context`` that allows exactly the public keys in ``keys_dir/public``.
    Must run inside the event loop that serves the sockets."""
    public_dir = Path(keys_dir) / PUBLIC_DIR
    if not public_dir.is_dir():
        raise FileNotFoundError(f"CURVE allow-list folder {public_dir} is missing (run d3 keys)")
    auth = LoggingAuthenticator(context, what)
    auth.start()
    auth.configure_curve(domain="*", location=str(public_dir))
    return auth


HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


async def log_handshake_failures(socket, what: str, counter: dict | None = None) -> None:
    """Log peers whose handshake failed (e.g. no CURVE at all: those never reach the ZAP handler)."""
    from zmq.utils.monitor import parse_monitor_message

    monitor = socket.get_monitor_socket(HANDSHAKE_FAILURES)
    try:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if counter is not None:
                counter["handshake_failed"] = counter.get("handshake_failed", 0) + 1
            log.warning("%s: refused a ZeroMQ peer at %s (handshake failed, event %s, errno %s)", what,
                        event.get("endpoint", b"?").decode("utf-8", "replace"), event.get("event"),
                        event.get("value"))
    except (asyncio.CancelledError, zmq.ZMQError):
        pass
    finally:
        monitor.close(linger=0)


# ------------------------------------------------------------------------------------------ bearer tokens
def generate_tokens(names: list[str]) -> dict[str, str]:
    return {name: secrets.token_urlsafe(32) for name in names}


def write_tokens(path: str | Path, tokens: dict[str, str]) -> None:
    path = Path(path)
    existing = load_tokens(path) if path.is_file() else {}
    path.write_text(json.dumps({**existing, **tokens}, indent=2, sort_keys=True) + "\n")
    os.chmod(path, 0o600)


def load_tokens(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} is missing (run d3 keys)")
    try:
        tokens = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(tokens, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                               for k, v in tokens.items()):
        raise ValueError(f"{path}: must be a JSON object of name -> token strings")
    return tokens


class TokenCheck:
    """Which principal an ``Authorization: Bearer ...`` header belongs to (None: refuse).

    Only digests are kept; every known digest is compared (constant time) so timing does not tell how
    much of a guess was right."""

    def __init__(self, tokens: dict[str, str]):
        self._digests = [(name, hashlib.sha256(token.encode()).digest()) for name, token in tokens.items()]

    def who(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        digest = hashlib.sha256(authorization[len("Bearer "):].strip().encode()).digest()
        found = None
        for name, known in self._digests:
            if hmac.compare_digest(digest, known):
                found = name
        return found


# ------------------------------------------------------------------------------------------ TLS
def server_ssl_context(cert_path: str | Path, key_path: str | Path) -> ssl.SSLContext:
    for path in (cert_path, key_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"TLS file {path} is missing (d3 keys --tls-host makes a self-signed pair)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


def client_ssl_context(ca_path: str | Path | None = None) -> ssl.SSLContext:
    """Verifies the cloud's certificate: against ``ca_path`` (e.g. the self-signed cloud.crt) or the system CAs."""
    context = ssl.create_default_context(cafile=str(ca_path) if ca_path else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def make_self_signed_cert(cert_path: str | Path, key_path: str | Path, hosts: list[str],
                          days: int = 365) -> None:
    """A self-signed certificate for ``hosts`` (DNS names or IPs) with the ``cryptography`` package."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(key_path).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    os.chmod(key_path, 0o600)


# ------------------------------------------------------------------------------------------ one node's view
@dataclass
class NodeSecurity:
    """What one process needs: its own CURVE keys and the allow-list (edge nodes), the servers' public
    keys (to connect), its bearer token (to call the cloud), the TLS contexts, and for the cloud the
    token check. ``None`` anywhere = that part is off."""

    name: str
    keys_dir: Path | None = None
    curve: CurveKeys | None = None
    token: str | None = None
    token_check: TokenCheck | None = None
    ssl_server: ssl.SSLContext | None = None
    ssl_client: ssl.SSLContext | None = None
    edge_name: str | None = None  # for a device: the edge node it connects to (whose public key it needs)
    _server_keys: dict[str, bytes] = field(default_factory=dict)

    def server_key(self, node_name: str) -> bytes:
        if node_name not in self._server_keys:
            self._server_keys[node_name] = load_public_key(self.keys_dir, node_name)
        return self._server_keys[node_name]

    def secure_server(self, socket: zmq.Socket) -> None:
        if self.curve is not None:
            curve_server(socket, self.curve)

    def secure_client(self, socket: zmq.Socket, server_name: str | None) -> None:
        if self.curve is not None:
            if not server_name:
                raise ValueError(f"{self.name}: CURVE needs the name of the edge node to connect to")
            curve_client(socket, self.curve, self.server_key(server_name))

    def session_kwargs(self) -> dict:
        """Keyword arguments for ``aiohttp.ClientSession``: the bearer token and the TLS context."""
        import aiohttp

        kwargs: dict = {}
        if self.token:
            kwargs["headers"] = {"Authorization": f"Bearer {self.token}"}
        if self.ssl_client is not None:
            kwargs["connector"] = aiohttp.TCPConnector(ssl=self.ssl_client)
        return kwargs


def node_security(spec, name: str, role: str, edge_name: str | None = None) -> NodeSecurity | None:
    """The security of principal ``name`` (role: edge, device or cloud) from a cluster file's
    ``[security]`` table (``deploy.cluster.SecuritySpec``); None when the cluster runs without."""
    if spec is None:
        return None
    keys_dir = Path(spec.keys_dir) if spec.keys_dir else None
    security = NodeSecurity(name=name, keys_dir=keys_dir, edge_name=edge_name)
    tokens = load_tokens(keys_dir / TOKENS_FILE) if keys_dir and (keys_dir / TOKENS_FILE).is_file() else {}
    if role in ("edge", "device") and keys_dir is not None and spec.curve:
        security.curve = load_curve_keys(keys_dir, name)
    if role in ("edge", "device"):
        security.token = tokens.get(name)
        if spec.tls_cert or spec.tls_ca:
            security.ssl_client = client_ssl_context(spec.tls_ca or spec.tls_cert)
    if role == "cloud":
        if spec.tokens_required:
            if not tokens:
                raise ValueError(f"[security] requires bearer tokens but {keys_dir}/{TOKENS_FILE} has none")
            security.token_check = TokenCheck(tokens)
        if spec.tls_cert:
            security.ssl_server = server_ssl_context(spec.tls_cert, spec.tls_key)
    return security


def session_kwargs(security: NodeSecurity | None) -> dict:
    return security.session_kwargs() if security is not None else {}
