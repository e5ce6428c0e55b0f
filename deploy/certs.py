"""Credentials for a real federation: a CA and a TLS certificate for the SuperLink, node key pairs.

* ``init_ca_and_server``: an EC P-384 CA (``ca.crt``, ``ca.key``) and a SuperLink certificate
  (``server.pem``, ``server.key``) signed by it, with the given host names and IP addresses as
  subjectAltNames, serverAuth extended key usage and a TLS server key usage. Used as
  ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``;
  SuperNodes (``--root-certificates``) and the ``flwr`` CLI (``root-certificates`` in config.toml) trust
  ``ca.crt``.

  The loopback names ``localhost``, ``127.0.0.1`` and ``::1`` are added unless ``include_loopback=False``:
  flower-superlink 1.42 starts its own ``flower-superexec`` with ``--root-certificates <ssl-ca-certfile>``
  against ``127.0.0.1:<port>`` (the bind address, with 0.0.0.0 replaced by 127.0.0.1), so without the
  127.0.0.1 SAN no ServerApp can start ("IP address mismatch, certificate is not valid for '127.0.0.1'").
  The reverse proxy in ``deploy/nginx-fleet-only.conf`` verifies the upstream as ``localhost``.
* ``create_node_keypair``: a SuperNode authentication key pair in the format Flower 1.42 reads: an
  OpenSSH-format EC (NIST P-384) private key for ``flower-supernode --auth-supernode-private-key``
  (loaded with ``cryptography``'s ``load_ssh_private_key``, must be an EC key) and its OpenSSH public key
  for ``flwr supernode register`` (``load_ssh_public_key``, must be EC on a NIST curve).

Private keys are written with mode 0600, other files 0644; nothing is overwritten unless asked, and all
target files are checked before the first one is written. Even when asked (``overwrite``, ``--force``) only an
ordinary file is replaced, atomically: a target that is a symbolic link, a directory, a device, a FIFO or a
socket, or that is one of the command's inputs, is refused (:func:`common.fsutil.check_output_file`). A new
directory gets mode 0700. Only ``cryptography`` is used (imported inside the functions).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path

from common.fsutil import atomic_write_bytes, check_output_file

ERR_NO_HOSTS = "--server-host: give at least one host name or IP address the SuperLink is reached at"
ERR_BAD_HOST = (
    "--server-host {host!r}: not a host name or IP address (give a bare name such as superlink.example.org "
    "or an address such as 10.0.0.5; no scheme, port or brackets)"
)
ERR_EXISTS = "{file}: already exists; pass --force to overwrite"
ERR_BAD_NAME = "node name {name!r}: use letters, digits, '-', '_' and '.' only (not starting with '.')"
ERR_DAYS = "--days {days}: must be a whole number of days, at least 1"
ERR_NOT_DIR = "{dir}: exists and is not a directory"

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_FILES = ("ca.crt", "ca.key", "server.pem", "server.key")
PRIVATE_FILES = ("ca.key", "server.key")

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> Path:
    mode = 0o600 if private else 0o644
    if overwrite:  # checked by _check_targets: nothing there, or an ordinary file; replaced in one rename
        atomic_write_bytes(path, data, mode=mode)
        return path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # independent of the umask
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if fd != -1:
            os.close(fd)
    return path


def _prepare_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise NotADirectoryError(ERR_NOT_DIR.format(dir=out_dir))
        return
    out_dir.mkdir(parents=True, mode=0o700)
    os.chmod(out_dir, 0o700)


def _check_targets(paths: list[Path], *, overwrite: bool,
                   inputs: Iterable[tuple[str, str | Path | None]] = ()) -> None:
    """Refuse, before anything is written, a target that is not an ordinary file or is one of ``inputs`` (even
    with ``overwrite``), and any existing target without ``overwrite``."""
    for p in paths:
        check_output_file(p, inputs=inputs, create_parent=True)
        if not overwrite and p.exists():
            raise FileExistsError(ERR_EXISTS.format(file=p))


def parse_server_host(host: str) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A validated ``--server-host``: an IP address object, or a lower-case DNS name (``*.`` wildcard allowed)."""
    h = host.strip() if isinstance(host, str) else ""
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    name = h.lower().rstrip(".")
    labels = name.split(".")
    if labels and labels[0] == "*" and len(labels) > 2:  # *.example.org, never "*" or "*.org"
        labels = labels[1:]
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(ERR_BAD_HOST.format(host=host))
    if all(label.isdigit() for label in labels):  # "10.0.5" and the like: a mistyped address
        raise ValueError(ERR_BAD_HOST.format(host=host))
    return name


def server_hosts_with_loopback(server_hosts: list[str], *, include_loopback: bool = True) -> list:
    """The certificate's SAN values in order, without duplicates; raises ValueError naming --server-host."""
    given = [h for h in (server_hosts or []) if isinstance(h, str) and h.strip()]
    if not given:
        raise ValueError(ERR_NO_HOSTS)
    values: list = []
    for h in [*given, *(LOOPBACK_HOSTS if include_loopback else ())]:
        v = parse_server_host(h)
        if v not in values:
            values.append(v)
    return values


def init_ca_and_server(out_dir: str | Path, *, server_hosts: list[str], days: int = 825,
                       overwrite: bool = False, include_loopback: bool = True) -> dict[str, Path]:
    """Write ca.crt, ca.key (0600), server.pem, server.key (0600) into ``out_dir``; returns their paths.

    ``server_hosts``: the names and addresses SuperNodes (and the proxy, and the ``flwr`` CLI) dial; each
    becomes a DNS or IP subjectAltName. Loopback names are added unless ``include_loopback=False``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = server_hosts_with_loopback(server_hosts, include_loopback=include_loopback)
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(ERR_DAYS.format(days=days))
    out_dir = Path(out_dir)
    names = {k: out_dir / k for k in CA_FILES}
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(ERR_NOT_DIR.format(dir=out_dir))
    _check_targets(list(names.values()), overwrite=overwrite)
    _prepare_dir(out_dir)

    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    no_usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpriv federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"fedpriv federation CA {now:%Y-%m-%d %H:%M:%S}"),
    ])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **no_usage),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    srv_key = ec.generate_private_key(ec.SECP384R1())
    sans = [x509.IPAddress(h) if not isinstance(h, str) else x509.DNSName(h) for h in hosts]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0])[:64])]))
        .issuer_name(ca_name).public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **no_usage),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    pem, pkcs8, nokey = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    data = {
        "ca.key": ca_key.private_bytes(pem, pkcs8, nokey),
        "ca.crt": ca_cert.public_bytes(pem),
        "server.key": srv_key.private_bytes(pem, pkcs8, nokey),
        "server.pem": srv_cert.public_bytes(pem),
    }
    for k in ("ca.key", "server.key", "ca.crt", "server.pem"):
        _write(names[k], data[k], private=k in PRIVATE_FILES, overwrite=overwrite)
    return names


def create_node_keypair(out_dir: str | Path, name: str, *, overwrite: bool = False,
                        inputs: Iterable[tuple[str, str | Path | None]] = ()) -> tuple[Path, Path]:
    """Write ``<name>`` (OpenSSH EC P-384 private key, 0600) and ``<name>.pub`` (OpenSSH public key, 0644).

    ``inputs``: (description, path) pairs of files the command was given (``--data``); neither key file may
    be one of them, even with ``overwrite``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(name, str) or not _NODE_NAME.match(name) or name.endswith(".pub"):
        raise ValueError(ERR_BAD_NAME.format(name=name))
    out_dir = Path(out_dir)
    priv_path, pub_path = out_dir / name, out_dir / f"{name}.pub"
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(ERR_NOT_DIR.format(dir=out_dir))
    _check_targets([priv_path, pub_path], overwrite=overwrite, inputs=inputs)
    _prepare_dir(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(priv_path, priv, private=True, overwrite=overwrite)
    _write(pub_path, pub + f" fedpriv-node-{name}\n".encode(), private=False, overwrite=overwrite)
    return priv_path, pub_path


def ssh_public_key_fingerprint(pub_path: str | Path) -> str:
    """``SHA256:...`` of an OpenSSH public key file, as ``ssh-keygen -lf`` prints it (compare out of band)."""
    blob = base64.b64decode(Path(pub_path).read_text().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def certificate_fingerprint(cert_path: str | Path) -> str:
    """SHA-256 fingerprint of a PEM certificate, as ``openssl x509 -noout -fingerprint -sha256`` prints it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
