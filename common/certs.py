"""Credentials for a real federation: a CA and a TLS certificate for the SuperLink, node key pairs.

* ``init_ca_and_server``: an EC P-384 CA (``ca.crt``, ``ca.key``) and a SuperLink certificate
  (``server.pem``, ``server.key``) with the given host names and IP addresses as subjectAltNames and
  serverAuth extended key usage. ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key``; nodes and the ``flwr`` CLI trust ``ca.crt``.
* ``create_node_keypair``: a SuperNode authentication key pair in the format Flower 1.42 reads: an OpenSSH EC
  (NIST P-384) private key for ``flower-supernode --auth-supernode-private-key`` and its OpenSSH public key
  for ``flwr supernode register``.

Private keys are written with mode 0600 (O_EXCL: nothing is overwritten unless asked); a new directory gets
mode 0700. Everything uses ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

ERR_NO_HOSTS = "--server-host: give at least one host name or IP address the SuperLink is reached at"
ERR_EXISTS = "{file}: already exists; pass --force to overwrite"
ERR_BAD_NAME = "node name {name!r}: use letters, digits, '-', '_' and '.' only"


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(ERR_EXISTS.format(file=path))
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _mkdir(out_dir: Path) -> None:
    if not out_dir.exists():
        out_dir.mkdir(parents=True, mode=0o700)


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def init_ca_and_server(out_dir: str | Path, *, server_hosts: list[str], days: int = 825,
                       overwrite: bool = False) -> dict[str, Path]:
    """Write ca.crt, ca.key, server.pem, server.key into ``out_dir``; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = [h.strip() for h in server_hosts if h and h.strip()]
    if not hosts:
        raise ValueError(ERR_NO_HOSTS)
    out_dir = Path(out_dir)
    _mkdir(out_dir)
    names = {k: out_dir / k for k in ("ca.crt", "ca.key", "server.pem", "server.key")}
    for p in names.values():
        if p.exists() and not overwrite:
            raise FileExistsError(ERR_EXISTS.format(file=p))
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpriv federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    nokey = serialization.NoEncryption()
    _write(names["ca.key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nokey), private=True,
           overwrite=overwrite)
    _write(names["ca.crt"], ca_cert.public_bytes(pem), private=False, overwrite=overwrite)
    _write(names["server.key"], srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nokey), private=True,
           overwrite=overwrite)
    _write(names["server.pem"], srv_cert.public_bytes(pem), private=False, overwrite=overwrite)
    return names


def create_node_keypair(out_dir: str | Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``<name>`` (OpenSSH EC P-384 private key, 0600) and ``<name>.pub`` (OpenSSH public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(ERR_BAD_NAME.format(name=name))
    out_dir = Path(out_dir)
    _mkdir(out_dir)
    priv_path, pub_path = out_dir / name, out_dir / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise FileExistsError(ERR_EXISTS.format(file=p))
    key = ec.generate_private_key(ec.SECP384R1())
    _write(priv_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()), private=True, overwrite=overwrite)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(pub_path, pub + f" fedpriv-node-{name}\n".encode(), private=False, overwrite=overwrite)
    return priv_path, pub_path
