"""Certificates for tests and benchmarks: a private CA and certificates it signs, as PEM
files in a temporary directory (made with ``trustme``, a test dependency).

```python
from koala.testing.tls import TestCA

with TestCA() as ca:
    tls = ca.issue("host-1")      # a TLSConfig: cert + key for 127.0.0.1/localhost, ca
    rogue = TestCA().issue("x")   # signed by another CA: refused by ca's peers
```
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import trustme

from .._tls import TLSConfig

LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


class TestCA:
    """A certificate authority whose files live until ``close()`` (or the ``with``)."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self._ca = trustme.CA()
        self.dir = Path(tempfile.mkdtemp(prefix="koala-tls-"))
        self.ca_path = self.dir / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        self._count = 0

    def issue(self, name: str = "node", *identities: str) -> TLSConfig:
        """A certificate for ``identities`` (default: the loopback names) and its key,
        with this CA as the trusted one."""
        self._count += 1
        leaf = self._ca.issue_cert(*(identities or LOOPBACK_NAMES), common_name=name)
        cert = self.dir / f"{self._count}-{name}.pem"
        key = self.dir / f"{self._count}-{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        for extra in leaf.cert_chain_pems[1:]:
            extra.write_to_path(str(cert), append=True)
        leaf.private_key_pem.write_to_path(str(key))
        return TLSConfig(cert=str(cert), key=str(key), ca=str(self.ca_path))

    def trust_only(self) -> TLSConfig:
        """A client that trusts this CA and presents no certificate."""
        return TLSConfig(ca=str(self.ca_path))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TestCA:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
