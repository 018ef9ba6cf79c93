"""CURVE keys, and the rule that keeps a job bus off the network by default.

Loopback and ipc:// endpoints need nothing. Any other endpoint needs CURVE:
the broker holds a server key pair and accepts only clients whose public key
is in its authorised-keys folder; each sidecar and reporter holds its own
key pair and the broker's public key. ``--insecure`` lifts the rule, loudly.

Key files are ZeroMQ certificates (``NAME.key`` public, ``NAME.key_secret``
secret); ``python -m broker keys DIR`` makes a set.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
from dataclasses import dataclass

# zmq.auth is imported only where keys are used: most runs have none, and
# every process would otherwise pay for it at start-up.


class SecurityError(ValueError):
    """Keys missing, unreadable, or too open; the message says what to do."""


def is_loopback(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or "*": could be any interface


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    authorized_dir: str


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server_public: bytes


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a secret key file that only its owner can read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SecurityError(f"cannot read key file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"secret key {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                            f"run: chmod 600 {path}")
    import zmq.auth

    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise SecurityError(f"{path} holds no secret key (give the .key_secret file)")
    return public, secret


def load_public(path: str) -> bytes:
    import zmq.auth

    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read public key {path}: {exc}") from None
    return public


def server_keys(secret_file: str | None, authorized_dir: str | None) -> ServerKeys | None:
    if not secret_file and not authorized_dir:
        return None
    if not (secret_file and authorized_dir):
        raise SecurityError("CURVE needs both --key (the broker's secret key) and --authorized-keys DIR")
    if not os.path.isdir(authorized_dir):
        raise SecurityError(f"authorised-keys folder not found: {authorized_dir}")
    public, secret = load_secret(secret_file)
    return ServerKeys(public, secret, authorized_dir)


def client_keys(secret_file: str | None, broker_key: str | None) -> ClientKeys | None:
    if not secret_file and not broker_key:
        return None
    if not (secret_file and broker_key):
        raise SecurityError("CURVE needs both --key (this client's secret key) and --broker-key (its public key)")
    public, secret = load_secret(secret_file)
    return ClientKeys(public, secret, load_public(broker_key))


def check_exposure(endpoints: list[str], keys, insecure: bool) -> list[str]:
    """Raise unless every non-loopback endpoint is protected; return the exposed ones."""
    exposed = [e for e in endpoints if not is_loopback(e)]
    if exposed and keys is None and not insecure:
        raise SecurityError(
            f"refusing to use {', '.join(exposed)} without CURVE keys: anyone who can reach it could "
            f"feed or read jobs. Give keys (python -m broker keys DIR makes them; see the README) "
            f"or --insecure on a network you trust."
        )
    return exposed


def start_authenticator(ctx: zmq.Context, keys: ServerKeys) -> ThreadAuthenticator:
    """ZAP handler: only clients whose public keys are in the folder get in."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=keys.authorized_dir)
    return auth


def secure_server(sock: zmq.Socket, keys: ServerKeys | None) -> None:
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: ClientKeys | None) -> None:
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_serverkey = keys.server_public


def make_keys(folder: str, clients: list[str]) -> list[str]:
    """The broker's key pair (once), one pair per new client, and the authorised folder.

    Existing pairs are kept, never overwritten. Returns the files made.
    """
    import zmq.auth

    os.makedirs(folder, exist_ok=True)
    authorized = os.path.join(folder, "authorized")
    os.makedirs(authorized, exist_ok=True)
    old_umask = os.umask(0o077)  # secret files are never readable by others, not even briefly
    try:
        made = []
        for name in ["broker", *clients]:
            if os.path.exists(os.path.join(folder, f"{name}.key_secret")):
                continue
            public, secret = zmq.auth.create_certificates(folder, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            made += [public, secret]
            if name != "broker":
                shutil.copy(public, os.path.join(authorized, f"{name}.key"))
    finally:
        os.umask(old_umask)
    return made
