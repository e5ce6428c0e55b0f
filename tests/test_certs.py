"""`fedpriv certs`: a CA that signs the SuperLink certificate with the right SANs; node keys in Flower's format."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.certs import ERR_NO_HOSTS, create_node_keypair, init_ca_and_server
from fedpriv.cli import main


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_ca_signs_server_certificate_with_sans_and_server_auth(tmp_path: Path) -> None:
    paths = init_ca_and_server(tmp_path / "c", server_hosts=["localhost", "127.0.0.1", "superlink.example.org"])
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    srv = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer do not match
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ExtendedKeyUsageOID.SERVER_AUTH in srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert _mode(paths["ca.key"]) == 0o600 and _mode(paths["server.key"]) == 0o600
    assert _mode(tmp_path / "c") == 0o700


def test_full_chain_verifies_with_a_tls_style_policy(tmp_path: Path) -> None:
    from cryptography.x509.verification import PolicyBuilder, Store

    paths = init_ca_and_server(tmp_path, server_hosts=["localhost"])
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    srv = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))
    chain = verifier.verify(srv, [])
    assert chain[-1] == ca


def test_refuses_to_overwrite_and_requires_hosts(tmp_path: Path) -> None:
    init_ca_and_server(tmp_path, server_hosts=["localhost"])
    with pytest.raises(FileExistsError, match="ca.crt: already exists"):
        init_ca_and_server(tmp_path, server_hosts=["localhost"])
    init_ca_and_server(tmp_path, server_hosts=["localhost"], overwrite=True)
    with pytest.raises(ValueError) as info:
        init_ca_and_server(tmp_path / "x", server_hosts=[])
    assert str(info.value) == ERR_NO_HOSTS


def test_node_keypair_loads_the_way_flower_loads_it(tmp_path: Path) -> None:
    priv, pub = create_node_keypair(tmp_path, "site-a")
    assert _mode(priv) == 0o600
    key = load_ssh_private_key(priv.read_bytes(), password=None)  # flower-supernode --auth-supernode-private-key
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    public = load_ssh_public_key(pub.read_bytes())  # flwr supernode register
    assert public.public_numbers() == key.public_key().public_numbers()
    with pytest.raises(FileExistsError):
        create_node_keypair(tmp_path, "site-a")
    with pytest.raises(ValueError, match="node name"):
        create_node_keypair(tmp_path, "../evil")


def test_cli(tmp_path: Path, capsys) -> None:
    assert main(["certs", "init", str(tmp_path / "c"), "--server-host", "localhost"]) == 0
    assert "flower-superlink --ssl-ca-certfile" in capsys.readouterr().out
    assert main(["certs", "node", str(tmp_path / "c"), "n0"]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    assert main(["certs", "node", str(tmp_path / "c"), "n0"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["certs", "init", str(tmp_path / "d")]) == 2
    assert "--server-host" in capsys.readouterr().err
