"""Deployment helpers for a real federation: ``certs`` (a CA, the SuperLink's TLS certificate and node
authentication keys) and ``nginx-fleet-only.conf`` (a reverse proxy exposing only the Fleet API)."""

__all__ = ["certs"]
