"""Provisioning a fleet: CA, broker certificate, server keys, broker users and access rules.

``edgefl fleet init|add-device|revoke`` drive this module. A *fleet directory* holds everything
the operator's side owns (private keys mode 0600, never overwritten)::

    fleet.json                 fleet name, broker host/port, the devices and revoked devices
    ca/ca.crt, ca/ca.key       the fleet's certificate authority (signs the broker's certificate)
    broker/broker.crt, .key    the broker's TLS identity (SANs: localhost, 127.0.0.1, the host)
    broker/mosquitto.conf      TLS listener, no anonymous access, password file, ACL file
    broker/passwd              Mosquitto 2 password hashes (PBKDF2-SHA512, ``$7$``)
    broker/acl                 who may publish and subscribe where (see :func:`acl_text`)
    server/signing.key         Ed25519: the server signs every message it publishes
    server/sealing.key         X25519: devices seal their updates to its public half
    server/credentials.json    the server's broker logins (one password: server, control,
                               ingestion workers)
    server/trust.json          the public keys (what every device pins)
    server/next/               a pending key rotation: the next signing and sealing keys
    server/previous/           the sealing key a rotation replaced, opened until it is finished
    server/key-notice          the signed notice of the last rotation (retained on ``key``)
    server/rotation.json       what the last rotation changed, and when
    devices/<id>/              one device bundle each (:func:`add_device`)

Why a password file and an ACL file, not Mosquitto's dynamic-security plugin: both are plain
files that edgefl writes atomically and Mosquitto re-reads on SIGHUP, need no plugin path (which
differs between distributions) and no admin principal with broker-wide rights, and every rule is
visible in one text file the operator can review; ``%u`` patterns give each device its own
topics with one rule set for the whole fleet. The plugin earns its keep with thousands of
devices changed at run time over MQTT; edgefl's provisioning is an operator action on files.
Identity is the login: ``use_username_as_clientid`` makes the broker use the user name as the
MQTT client id, so no device can take over another's session.

Ingestion workers (``edgefl server --ingest-workers N``) log in as ``<server user>.w<i>``, up to
:data:`MAX_INGEST_WORKERS`, each its own broker session, and may only read updates and write
receipts. They share the updates through an MQTT v5 shared subscription whose group name is
derived from the server's password (:meth:`Fleet.share_group`): Mosquitto's ACL file cannot
refuse a *subscription*, and a member of a share group that may not read the topic still takes
its turn of the messages, which the broker then drops. A device that could name the group could
make the workers miss a share of the updates (the devices would resend them, late); a group
name only the server's side can compute keeps it out.

Key rotation (``edgefl fleet rotate-keys``) has three steps, each its own operator or server
action, so that no key changes under a running server without the devices being told:

1. :func:`rotate_keys` writes the next keys into ``server/next/`` (nothing else changes);
2. the server, on start or within :data:`KEY_CHECK_INTERVAL` seconds while running, signs the
   key notice with the current key and calls :func:`promote_rotation`: the notice is stored,
   the current sealing key is kept in ``server/previous/``, the next keys become the current
   ones (the old signing key is gone: the stored notice is all it is still needed for), and
   ``trust.json`` and every bundle's copy name the new keys. The server publishes the notice
   retained on ``edgefl/<fleet>/key`` (again on every reconnection) before anything it signs
   with the new key, and opens updates sealed to either sealing key;
3. :func:`finish_rotation` (``--finish``) deletes the previous sealing key: updates still sealed
   to it are dropped from then on, and another rotation may start.

Every step of :func:`promote_rotation` is an atomic file replacement, and the stored notice
names the keys it moves to, so a server that crashed half way repeats the rest on its next
start with the same notice.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from edgefl.wire.protocol import Topics, check_name
from edgefl.durable import create_file, replace_file
from edgefl.trust import SignatureInvalid, key_id, key_notice, parse_key_notice, parse_signed
from edgefl.trust.keys import raw_public

from .key_files import load_private_key, write_private_key

log = logging.getLogger(__name__)

#: Mosquitto 2's password hash: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte hash (``$7$``).
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default; the passwords are 256-bit random tokens
DEFAULT_PORT = 8883
CERT_DAYS = 3650
#: Ingestion worker logins a fleet directory provisions (``<server user>.w0`` ...).
MAX_INGEST_WORKERS = 8
#: Seconds between a running server's (and ingestion worker's) looks for a key rotation.
KEY_CHECK_INTERVAL = 1.0


class ProvisioningError(RuntimeError):
    """A fleet directory that cannot be created or changed as asked; the message says why."""


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<salt b64>$<PBKDF2-SHA512 b64>``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def server_principal(fleet: str) -> str:
    """The server's broker user (and MQTT client id) for updates, status and receipts."""
    return f"edgefl-server-{fleet}"


def control_principal(fleet: str) -> str:
    """The server's second login, which publishes models, announcements and key notices."""
    return f"{server_principal(fleet)}.control"


def ingest_worker_principal(fleet: str, index: int) -> str:
    """The broker user (and MQTT client id) of ingestion worker ``index`` (0 based)."""
    if not 0 <= index < MAX_INGEST_WORKERS:
        raise ProvisioningError(f"a fleet provisions {MAX_INGEST_WORKERS} ingestion worker "
                                f"logins (0-{MAX_INGEST_WORKERS - 1}), not number {index}")
    return f"{server_principal(fleet)}.w{index}"


def observer_principal(fleet: str) -> str:
    """A read-only login for monitoring: models, announcements and device status."""
    return f"edgefl-observer-{fleet}"


def acl_text(fleet: str) -> str:
    """The Mosquitto ACL of a fleet: least privilege for each principal.

    A device (user name = client id, ``%u``) may publish only its own ``update`` and ``status``
    and read only ``model``, ``refresh``, ``round``, ``key`` and its own ``receipt``; only the
    server's principals write models, announcements, key notices and receipts and read updates
    (its ingestion workers: updates and receipts only).
    """
    t = Topics(fleet)
    client = f"{t.prefix}/clients"
    workers = []
    for i in range(MAX_INGEST_WORKERS):
        workers += [f"user {ingest_worker_principal(fleet, i)}",
                    f"topic read {client}/+/update",
                    f"topic write {client}/+/receipt",
                    ""]
    return "\n".join([
        "# Written by `edgefl fleet`; regenerated, not merged: change provisioning, not this file.",
        f"user {server_principal(fleet)}",
        f"topic read {client}/+/update",
        f"topic read {client}/+/status",
        f"topic write {client}/+/receipt",
        "",
        f"user {control_principal(fleet)}",
        f"topic write {t.model}",
        f"topic write {t.refresh}",
        f"topic write {t.round}",
        f"topic write {t.prefix}/key",
        "",
        *workers,
        f"user {observer_principal(fleet)}",
        f"topic read {t.model}",
        f"topic read {t.refresh}",
        f"topic read {t.round}",
        f"topic read {client}/+/status",
        "",
        "# every device, by its login",
        f"pattern read {t.model}",
        f"pattern read {t.refresh}",
        f"pattern read {t.round}",
        f"pattern read {t.prefix}/key",
        f"pattern write {client}/%u/update",
        f"pattern write {client}/%u/status",
        f"pattern read {client}/%u/receipt",
        "",
    ])


@dataclass(frozen=True)
class Fleet:
    """A provisioned fleet directory (see the module docstring)."""

    directory: Path
    fleet: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def path(self, *parts) -> Path:
        return self.directory.joinpath(*parts)

    @property
    def ca_cert(self) -> Path:
        return self.path("ca", "ca.crt")

    @property
    def mosquitto_conf(self) -> Path:
        return self.path("broker", "mosquitto.conf")

    @property
    def pid_file(self) -> Path:
        return self.path("broker", "mosquitto.pid")

    @property
    def trust_file(self) -> Path:
        return self.path("server", "trust.json")

    def manifest(self) -> dict:
        return json.loads(self.path("fleet.json").read_text())

    def devices(self) -> list[str]:
        return list(self.manifest()["devices"])

    def revoked(self) -> list[str]:
        return list(self.manifest()["revoked"])

    def server_credentials(self) -> dict:
        """``username``, ``control_username``, ``password`` of the server's broker logins."""
        return json.loads(self.path("server", "credentials.json").read_text())

    def share_group(self) -> str:
        """The name of the ingestion workers' MQTT share group: an HMAC of the server's
        password, so only the server's side can name it (see the module docstring)."""
        password = self.server_credentials()["password"].encode()
        return "edgefl-" + hmac.new(password, b"edgefl ingest share group",
                                    hashlib.sha256).hexdigest()[:32]

    def observer_credentials(self) -> dict:
        return json.loads(self.path("server", "observer.json").read_text())

    def signing_key(self) -> Ed25519PrivateKey:
        return load_private_key(self.path("server", "signing.key"), Ed25519PrivateKey)

    def sealing_key(self) -> X25519PrivateKey:
        return load_private_key(self.path("server", "sealing.key"), X25519PrivateKey)

    def sealing_keys(self) -> list[X25519PrivateKey]:
        """The sealing keys updates may be sealed to: the current one first, then the one a
        rotation replaced until the rotation is finished."""
        keys = [self.sealing_key()]
        previous = self.path("server", "previous", "sealing.key")
        if previous.exists():
            keys.append(load_private_key(previous, X25519PrivateKey))
        return keys

    def key_notice(self) -> bytes | None:
        """The signed notice of the last key rotation (published retained), if any."""
        try:
            return self.path("server", "key-notice").read_bytes()
        except FileNotFoundError:
            return None

    def key_state(self) -> tuple:
        """What changes when a rotation is made, promoted or finished (cheap to compare)."""
        return tuple((p.stat().st_ino, p.stat().st_ctime_ns) if p.exists() else None
                     for p in (self.path("server", "next", "sealing.key"),
                               self.path("server", "sealing.key"),
                               self.path("server", "previous", "sealing.key")))

    def rotation(self) -> dict | None:
        """The record of the last promoted rotation (``server/rotation.json``), if any."""
        try:
            return json.loads(self.path("server", "rotation.json").read_text())
        except FileNotFoundError:
            return None

    def bundle(self, client_id: str) -> Path:
        return self.path("devices", check_name("client id", client_id))


def open_fleet(directory) -> Fleet:
    """The fleet provisioned in ``directory``.

    Raises
    ------
    ProvisioningError
        If ``directory`` holds no fleet (run ``edgefl fleet init`` first).
    """
    directory = Path(directory).resolve()
    try:
        obj = json.loads((directory / "fleet.json").read_text())
        return Fleet(directory, obj["fleet"], obj["host"], int(obj["port"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProvisioningError(f"{directory} is not a fleet directory ({exc}): create one with "
                                "`edgefl fleet init --fleet NAME --dir DIR`") from None


# -- files -----------------------------------------------------------------------------------------

def _write_new(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Create ``path`` with ``data``; False (and nothing written) if it exists already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return create_file(path, data, mode=mode)


def _replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace a file that provisioning owns (password file, ACL, fleet.json) durably."""
    replace_file(path, data, mode=mode)


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _new_ca(fleet: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgefl fleet {fleet} CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _san(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    else:
        if str(ip) != "127.0.0.1":
            names.append(x509.IPAddress(ip))
    return names


def _broker_cert(ca_key, ca_cert: x509.Certificate, host: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(_san(host)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def mosquitto_config(fleet: Fleet, *, bind: str = "0.0.0.0", port: int | None = None,
                     persistence: bool = True, autosave_interval: int = 1) -> str:
    """The ``mosquitto.conf`` of a fleet: one TLS listener (on the fleet's port unless ``port``
    says otherwise), logins and ACL required."""
    b = fleet.path("broker")
    return "\n".join([
        "# Written by `edgefl fleet init`. Mosquitto 2.0: `mosquitto -c mosquitto.conf`.",
        "# Run the broker as the user that owns these files (the keys are mode 0600), or give",
        "# the files to the broker's user (e.g. `chown mosquitto broker/broker.key broker/passwd`).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {b / 'passwd'}",
        f"acl_file {b / 'acl'}",
        f"listener {port or fleet.port} {bind}",
        # Identity is the login: a device cannot take over another device's session. A listener
        # option: placed before the first `listener` line, Mosquitto 2.0 would open a default
        # plain-MQTT listener on 0.0.0.0:1883 for it.
        "use_username_as_clientid true",
        f"cafile {fleet.ca_cert}",
        f"certfile {b / 'broker.crt'}",
        f"keyfile {b / 'broker.key'}",
        "tls_version tlsv1.2",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {b / 'data'}/",
        f"autosave_interval {autosave_interval}",
        # Devices may be offline for hours: keep their queued QoS 1 messages.
        "max_queued_messages 10000",
        "max_packet_size 16777216",
        # Without it, Nagle's algorithm holds small packets (receipts, announcements) ~40 ms.
        "set_tcp_nodelay true",
        "",
    ])


def _password_file(entries: dict[str, str]) -> bytes:
    return "".join(f"{user}:{digest}\n" for user, digest in sorted(entries.items())).encode()


def _read_password_file(path: Path) -> dict[str, str]:
    entries = {}
    if path.exists():
        for line in path.read_text().splitlines():
            user, sep, digest = line.partition(":")
            if sep:
                entries[user] = digest
    return entries


# -- commands ----------------------------------------------------------------------------------------

def init_fleet(directory, fleet: str, *, host: str = "localhost",
               port: int = DEFAULT_PORT) -> tuple[Fleet, list[str]]:
    """Create (or complete) a fleet directory; return it and the files created.

    Re-running on an existing directory of the same fleet creates only what is missing; a
    different fleet, host or port there is refused (nothing is overwritten).

    Raises
    ------
    ProvisioningError
        If ``directory`` holds another fleet, or a certificate's key is missing.
    """
    check_name("fleet", fleet)
    if not 1 <= port <= 65535:
        raise ProvisioningError(f"port {port} is not in 1-65535")
    directory = Path(directory).resolve()
    manifest = directory / "fleet.json"
    if manifest.exists():
        existing = open_fleet(directory)
        if (existing.fleet, existing.host, existing.port) != (fleet, host, port):
            raise ProvisioningError(
                f"{directory} already holds fleet {existing.fleet!r} for {existing.url}; nothing "
                f"was changed. Use another directory for fleet {fleet!r} at mqtts://{host}:{port}")
    f = Fleet(directory, fleet, host, port)
    created: list[str] = []

    def new(path: Path, data: bytes, mode: int = 0o644) -> None:
        if _write_new(path, data, mode):
            created.append(str(path.relative_to(directory)))

    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("ca", "broker", "server", "devices"):
        f.path(sub).mkdir(exist_ok=True)
    new(manifest, json.dumps({"v": 1, "fleet": fleet, "host": host, "port": port,
                              "devices": [], "revoked": []}, indent=1).encode())
    ca_key_path, broker_key_path = f.path("ca", "ca.key"), f.path("broker", "broker.key")
    if not ca_key_path.exists():
        if f.ca_cert.exists():
            raise ProvisioningError(f"{f.ca_cert} exists without its key {ca_key_path}: restore "
                                    "the key, or start a new fleet directory")
        ca_key, ca_cert = _new_ca(fleet)
        write_private_key(ca_key_path, ca_key)
        new(f.ca_cert, _pem_cert(ca_cert))
        created.append("ca/ca.key")
    if not broker_key_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(f.ca_cert.read_bytes())
        key, cert = _broker_cert(ca_key, ca_cert, host)
        write_private_key(broker_key_path, key)
        created.append("broker/broker.key")
        f.path("broker", "broker.crt").unlink(missing_ok=True)  # belongs to the missing key
        new(f.path("broker", "broker.crt"), _pem_cert(cert))
    for name, kind in (("signing.key", Ed25519PrivateKey), ("sealing.key", X25519PrivateKey)):
        path = f.path("server", name)
        if not path.exists():
            write_private_key(path, kind.generate())
            created.append(f"server/{name}")
    trust = {"fleet": fleet, "signing_key": raw_public(f.signing_key()).hex(),
             "sealing_key": raw_public(f.sealing_key()).hex()}
    if f.trust_file.exists() and json.loads(f.trust_file.read_text()) != trust:
        raise ProvisioningError(f"{f.trust_file} does not match the server's keys: restore the "
                                "keys it was made from, or start a new fleet directory")
    new(f.trust_file, json.dumps(trust, indent=1).encode())
    new(f.path("server", "credentials.json"), json.dumps({
        "username": server_principal(fleet), "control_username": control_principal(fleet),
        "password": secrets.token_urlsafe(32)}, indent=1).encode(), 0o600)
    new(f.path("server", "observer.json"), json.dumps({
        "username": observer_principal(fleet), "password": secrets.token_urlsafe(32)},
        indent=1).encode(), 0o600)
    f.path("broker", "data").mkdir(exist_ok=True)
    new(f.mosquitto_conf, mosquitto_config(f).encode())
    # A directory made by an older edgefl gains the logins added since (ingestion workers).
    created += [p for p in _sync_broker_files(f) if p not in created]
    return f, created


def _sync_broker_files(f: Fleet) -> list[str]:
    """Rewrite the ACL and make the password file hold exactly the fleet's principals; return
    the broker files whose content changed (a running broker must reload them)."""
    server, observer = f.server_credentials(), f.observer_credentials()
    passwd = f.path("broker", "passwd")
    entries = _read_password_file(passwd)
    workers = [ingest_worker_principal(f.fleet, i) for i in range(MAX_INGEST_WORKERS)]
    wanted = {server["username"], server["control_username"], observer["username"], *workers,
              *f.devices()}
    for user in list(entries):
        if user not in wanted:
            del entries[user]
    for user, password in ((server["username"], server["password"]),
                           (server["control_username"], server["password"]),
                           *((w, server["password"]) for w in workers),
                           (observer["username"], observer["password"])):
        if user not in entries:
            entries[user] = hash_password(password)
    changed = []
    for path, data, mode in ((passwd, _password_file(entries), 0o600),
                             (f.path("broker", "acl"), acl_text(f.fleet).encode(), 0o644)):
        if not path.exists() or path.read_bytes() != data:
            changed.append(str(path.relative_to(f.directory)))
            _replace(path, data, mode)
    return changed


def _save_manifest(f: Fleet, devices: list[str], revoked: list[str]) -> None:
    obj = f.manifest()
    obj["devices"], obj["revoked"] = sorted(set(devices)), sorted(set(revoked))
    _replace(f.path("fleet.json"), json.dumps(obj, indent=1).encode())


def add_device(directory, client_id: str) -> tuple[Path, bool]:
    """Give ``client_id`` broker credentials and write its bundle; return (bundle, created).

    The bundle (``devices/<id>/``): ``ca.crt``, ``trust.json`` (the server's public keys),
    ``password`` (0600), ``bundle.json`` (what ``edgefl client --bundle DIR`` reads),
    ``device.env`` (the same as environment variables for a service file, 0600) and
    ``command.txt`` (the exact command line). A device that has a bundle already keeps it
    (``created`` is False); a revoked device gets new credentials.

    Raises
    ------
    ProvisioningError
        If the id is one of the server's principals.
    """
    f = open_fleet(directory)
    check_name("client id", client_id)
    server = server_principal(f.fleet)
    if client_id in (server, observer_principal(f.fleet)) or client_id.startswith(server + "."):
        raise ProvisioningError(f"{client_id!r} is the name of one of the server's logins; "
                                "choose another device id")
    bundle = f.bundle(client_id)
    devices, revoked = f.devices(), f.revoked()
    if client_id in devices and (bundle / "bundle.json").exists():
        return bundle, False
    password = secrets.token_urlsafe(32)
    bundle.mkdir(parents=True, exist_ok=True)
    for name in ("password", "device.env"):
        (bundle / name).unlink(missing_ok=True)  # a revoked device's old credentials
    _write_new(bundle / "ca.crt", f.ca_cert.read_bytes())
    _replace(bundle / "trust.json", f.trust_file.read_bytes())
    _write_new(bundle / "password", password.encode(), 0o600)
    _replace(bundle / "bundle.json", json.dumps({
        "v": 1, "fleet": f.fleet, "client_id": client_id, "broker": f.url,
        "username": client_id, "password_file": "password", "ca_certs": "ca.crt",
        "trust": "trust.json"}, indent=1).encode())
    _write_new(bundle / "device.env", "".join(f"{k}={v}\n" for k, v in (
        ("EDGEFL_BUNDLE", bundle), ("EDGEFL_BROKER", f.url), ("EDGEFL_FLEET", f.fleet),
        ("EDGEFL_CLIENT_ID", client_id), ("EDGEFL_USERNAME", client_id),
        ("EDGEFL_PASSWORD", password), ("EDGEFL_CA_CERTS", bundle / "ca.crt"),
        ("EDGEFL_TRUST", bundle / "trust.json"))).encode(), 0o600)
    _replace(bundle / "command.txt",
             f"edgefl client --bundle {bundle} --state-dir STATE_DIR --data FILE.npz\n".encode())
    entries = _read_password_file(f.path("broker", "passwd"))
    entries[client_id] = hash_password(password)
    _replace(f.path("broker", "passwd"), _password_file(entries), 0o600)
    _save_manifest(f, devices + [client_id], [d for d in revoked if d != client_id])
    _sync_broker_files(f)
    reload_broker(f)
    return bundle, True


def revoke_device(directory, client_id: str) -> bool:
    """Remove ``client_id``'s broker login and bundle credentials; reload a running broker.

    Returns True if the broker was told to reload (SIGHUP to the pid in ``broker/mosquitto.pid``);
    otherwise the revocation takes effect when the broker next starts or reloads.

    Raises
    ------
    ProvisioningError
        If the device was never added.
    """
    f = open_fleet(directory)
    devices = f.devices()
    if client_id not in devices:
        if client_id in f.revoked():
            return reload_broker(f)
        raise ProvisioningError(f"device {client_id!r} is not in fleet {f.fleet!r} "
                                f"(devices: {', '.join(devices) or 'none'})")
    _save_manifest(f, [d for d in devices if d != client_id], f.revoked() + [client_id])
    _sync_broker_files(f)
    bundle = f.bundle(client_id)
    for name in ("password", "device.env"):
        (bundle / name).unlink(missing_ok=True)
    (bundle / "bundle.json").unlink(missing_ok=True)
    return reload_broker(f)


def reload_broker(f: Fleet) -> bool:
    """Ask the broker running this fleet's configuration to re-read its password and ACL files."""
    try:
        pid = int(f.pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    return True


def check_private_files(f: Fleet) -> list[Path]:
    """Private files of the fleet that group or others may access (should be empty)."""
    private = [f.path("ca", "ca.key"), f.path("broker", "broker.key"),
               f.path("server", "signing.key"), f.path("server", "sealing.key"),
               f.path("server", "next", "signing.key"), f.path("server", "next", "sealing.key"),
               f.path("server", "previous", "sealing.key"),
               f.path("server", "credentials.json"), f.path("server", "observer.json"),
               f.path("broker", "passwd")]
    return [p for p in private
            if p.exists() and stat.S_IMODE(p.stat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO)]


# -- key rotation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rotation:
    """A pending or promoted key rotation: the key ids it moves from and to (hex)."""

    signing_from: str
    signing_to: str
    sealing_from: str
    sealing_to: str


class _RotationLock:
    """An exclusive lock on the fleet's key files: the CLI and a server never interleave."""

    def __init__(self, f: Fleet):
        self.path = f.path("server", "rotation.lock")

    def __enter__(self):
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self._fd)  # releases the lock


def _key_bytes(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pending_keys(f: Fleet):
    """The next (signing, sealing) private keys of a pending rotation, or None."""
    signing, sealing = f.path("server", "next", "signing.key"), f.path("server", "next",
                                                                      "sealing.key")
    if not (signing.exists() and sealing.exists()):
        return None
    return (load_private_key(signing, Ed25519PrivateKey),
            load_private_key(sealing, X25519PrivateKey))


def _rotation(f: Fleet, signing, sealing) -> Rotation:
    return Rotation(key_id(f.signing_key()).hex(), key_id(signing).hex(),
                    key_id(f.sealing_key()).hex(), key_id(sealing).hex())


def pending_rotation(directory) -> Rotation | None:
    """The rotation :func:`rotate_keys` made that no server has promoted yet, if any."""
    f = open_fleet(directory)
    keys = _pending_keys(f)
    return None if keys is None else _rotation(f, *keys)


def rotate_keys(directory, *, replace: bool = False) -> Rotation:
    """Write the next signing and sealing keys of the fleet (``server/next/``, mode 0600).

    The keys in use do not change: the server promotes the rotation (:func:`promote_rotation`)
    when it starts, or within :data:`KEY_CHECK_INTERVAL` seconds while it runs.

    Parameters
    ----------
    replace : bool
        Discard a pending rotation that no server promoted yet and make new keys; without it a
        pending rotation is refused.

    Raises
    ------
    ProvisioningError
        If a rotation is pending (without ``replace``), or the last one is not finished.
    """
    f = open_fleet(directory)
    with _RotationLock(f):
        if f.path("server", "previous", "sealing.key").exists():
            done = f.rotation() or {}
            raise ProvisioningError(
                f"the rotation to signing key {done.get('signing_to', '?')} is not finished: the "
                "server still opens updates sealed to the key it replaced. Run `edgefl fleet "
                "rotate-keys --finish` first (a device that has not read that notice by the next "
                "rotation must then be re-provisioned); nothing was changed")
        pending = _pending_keys(f)
        if pending is not None and not replace:
            raise ProvisioningError(
                f"a rotation to signing key {key_id(pending[0]).hex()} is pending already (no "
                "server has published it yet); nothing was changed. Start the server (or wait "
                f"{KEY_CHECK_INTERVAL:g} s for a running one) to publish it, or pass --replace to "
                "discard it and make new keys")
        directory = f.path("server", "next")
        directory.mkdir(mode=0o700, exist_ok=True)
        signing, sealing = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
        # The sealing key last: a server sees a rotation only once both files exist.
        for name in ("sealing.key", "signing.key"):
            (directory / name).unlink(missing_ok=True)
        replace_file(directory / "signing.key", _key_bytes(signing), mode=0o600)
        replace_file(directory / "sealing.key", _key_bytes(sealing), mode=0o600)
        return _rotation(f, signing, sealing)


def promote_rotation(directory, sign) -> tuple[Rotation, bytes] | None:
    """Make a pending rotation the fleet's keys; None if there is none.

    Parameters
    ----------
    sign : callable(bytes) -> bytes
        Signs a key notice payload (:func:`edgefl.trust.key_notice`) as a ``key`` message with
        the current signing key (the server's :class:`~edgefl.trust.Signer`). Not called when
        the stored notice already names the pending keys (a promotion a crash interrupted).

    Returns
    -------
    (Rotation, bytes)
        The rotation and its signed notice, to publish retained on ``edgefl/<fleet>/key``
        before anything is signed with the new key.
    """
    f = open_fleet(directory)
    with _RotationLock(f):
        keys = _pending_keys(f)
        if keys is None:
            return None
        signing, sealing = keys
        announced = (raw_public(signing), raw_public(sealing))
        notice = f.key_notice()
        if notice is None or _announces(notice) != announced:
            notice = sign(key_notice(signing.public_key(), sealing.public_key()))
            f.path("server", "rotation.json").unlink(missing_ok=True)  # the last rotation's
            replace_file(f.path("server", "key-notice"), notice, mode=0o644)
        server = f.path("server")
        rotation = f.rotation()
        if rotation is None:  # recorded before the first key file changes
            rotation = dataclasses.asdict(_rotation(f, signing, sealing))
            rotation["rotated_at"] = time.time()
            replace_file(server / "rotation.json", json.dumps(rotation, indent=1).encode(),
                         mode=0o644)
        previous = server / "previous"
        previous.mkdir(mode=0o700, exist_ok=True)
        if not (previous / "sealing.key").exists():
            replace_file(previous / "sealing.key", (server / "sealing.key").read_bytes(),
                         mode=0o600)
        replace_file(server / "sealing.key", _key_bytes(sealing), mode=0o600)
        replace_file(server / "signing.key", _key_bytes(signing), mode=0o600)
        trust = json.dumps({"fleet": f.fleet, "signing_key": announced[0].hex(),
                            "sealing_key": announced[1].hex()}, indent=1).encode()
        _replace(f.trust_file, trust)
        for device in f.devices():
            if (f.bundle(device) / "trust.json").exists():
                _replace(f.bundle(device) / "trust.json", trust)
        for name in ("signing.key", "sealing.key"):
            (server / "next" / name).unlink(missing_ok=True)
        (server / "next").rmdir()
        return Rotation(**{k: rotation[k] for k in ("signing_from", "signing_to",
                                                    "sealing_from", "sealing_to")}), notice


def _announces(notice: bytes) -> tuple[bytes, bytes] | None:
    """The raw (signing, sealing) keys a stored notice names; None if it is unreadable."""
    try:
        signing, sealing = parse_key_notice(parse_signed(notice)[0].payload)
    except SignatureInvalid:
        return None
    return raw_public(signing), raw_public(sealing)


def finish_rotation(directory) -> Rotation:
    """Delete the sealing key the last rotation replaced: the end of its grace period.

    Raises
    ------
    ProvisioningError
        If no promoted rotation is waiting to be finished.
    """
    f = open_fleet(directory)
    with _RotationLock(f):
        previous = f.path("server", "previous", "sealing.key")
        if not previous.exists():
            pending = _pending_keys(f)
            raise ProvisioningError(
                "no rotation to finish: " + (
                    f"the rotation to signing key {key_id(pending[0]).hex()} is not published "
                    "yet (start the server; it publishes it)" if pending is not None else
                    "start one with `edgefl fleet rotate-keys`") + "; nothing was changed")
        record = f.rotation() or {}
        previous.unlink()
        f.path("server", "previous").rmdir()
        return Rotation(**{k: record.get(k, "?") for k in ("signing_from", "signing_to",
                                                           "sealing_from", "sealing_to")})
