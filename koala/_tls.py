"""TLS settings, one place for every link: host to host, PD API, hosts' HTTP, gateway.

A cluster turns TLS on with three files, given as flags (``--tls-cert``, ``--tls-key``,
``--tls-ca``) or environment variables (``KOALA_TLS_CERT``, ``KOALA_TLS_KEY``,
``KOALA_TLS_CA``):

- ``cert``/``key``: this process's certificate chain and private key (PEM). A listener
  presents it; a host also presents it as a client on host links (mutual TLS).
- ``ca``: the certificates this process trusts (PEM). Servers are checked against it,
  including their name (the host part of the address dialled must be in the
  certificate's subjectAltName); on host links the listener also demands a client
  certificate signed by it.

``TLSConfig()`` (no files) means plain TCP, as without these settings.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ConfigError

CERT_ENV = "KOALA_TLS_CERT"
KEY_ENV = "KOALA_TLS_KEY"
CA_ENV = "KOALA_TLS_CA"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Where this process's certificate, key and trusted CA are (PEM files)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError(
                "TLS needs both a certificate and its private key: set --tls-cert and "
                "--tls-key (KOALA_TLS_CERT, KOALA_TLS_KEY) together"
            )
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS {what} file {path!r} does not exist")

    @classmethod
    def from_env(cls, **overrides: Any) -> TLSConfig:
        """Settings from KOALA_TLS_CERT/KEY/CA; a non-None override wins."""
        values: dict[str, Any] = {
            "cert": os.environ.get(CERT_ENV) or None,
            "key": os.environ.get(KEY_ENV) or None,
            "ca": os.environ.get(CA_ENV) or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def enabled(self) -> bool:
        """True when this process serves TLS (it has a certificate)."""
        return self.cert is not None

    @property
    def scheme(self) -> str:
        return "https" if self.enabled else "http"

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """A listener's context: presents ``cert``; with ``require_client_cert`` a peer
        must present a certificate that ``ca`` signed."""
        if self.cert is None or self.key is None:
            raise ConfigError("a TLS listener needs --tls-cert and --tls-key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if require_client_cert:
            if self.ca is None:
                raise ConfigError("mutual TLS needs --tls-ca (the CA that signs the peers)")
            ctx.load_verify_locations(self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A dialler's context: checks the server against ``ca`` (else the system's
        store) and its name; presents ``cert`` when there is one."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None and self.key is not None:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def hypercorn_settings(self, *, require_client_cert: bool = False) -> dict[str, Any]:
        """Attributes for a hypercorn ``Config`` serving HTTPS/wss (empty without TLS)."""
        if not self.enabled:
            return {}
        settings: dict[str, Any] = {"certfile": self.cert, "keyfile": self.key}
        if self.ca is not None:
            settings["ca_certs"] = self.ca
        if require_client_cert:
            settings["verify_mode"] = ssl.CERT_REQUIRED
        return settings
