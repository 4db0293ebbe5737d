"""A certificate authority of the test's own, made with the openssl CLI (which every machine that
builds redis-server with TLS has): a CA, a server certificate for Redis and a client certificate
for the service, all valid for a day.

`tests.processes.start_redis(..., tls=ca)` runs Redis on TLS only with the server certificate, and
checks clients' certificates against the CA; `ca.env()` is the service's settings for it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# Elliptic-curve keys: made in milliseconds, where RSA takes a noticeable share of a test.
NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
# What a strict verifier (Python 3.13's default context sets VERIFY_X509_STRICT) asks of a leaf.
LEAF_EXTENSIONS = (
    "basicConstraints=critical,CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
)


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {done.stderr.strip()}")


@dataclass(frozen=True)
class CertAuthority:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path, addresses: tuple[str, ...] = ("127.0.0.1",)) -> CertAuthority:
        """A CA in `directory`, with a server certificate valid for `addresses` (IP SANs: the
        tests' Redis URLs name addresses, and redis-py checks the host name by default)."""
        d = directory
        d.mkdir(parents=True, exist_ok=True)
        ca = cls(d / "ca.crt", d / "redis.crt", d / "redis.key", d / "client.crt", d / "client.key")
        _openssl(
            "req", "-x509", *NEW_KEY, "-keyout", str(d / "ca.key"), "-out", str(ca.ca), "-days", "1",
            "-subj", "/CN=llmq test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        sans = ",".join(f"IP:{a}" for a in addresses)
        server = LEAF_EXTENSIONS + f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"
        ca._leaf("redis", ca.server_cert, ca.server_key, server)
        ca._leaf("llmq", ca.client_cert, ca.client_key, LEAF_EXTENSIONS + "extendedKeyUsage=clientAuth\n")
        return ca

    def _leaf(self, name: str, cert: Path, key: Path, extensions: str) -> None:
        d = self.ca.parent
        request, ext = d / f"{name}.csr", d / f"{name}.ext"
        ext.write_text(extensions)
        _openssl("req", "-new", *NEW_KEY, "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}")
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(self.ca), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext),
        )  # fmt: skip

    def server_args(self) -> list[str]:
        """redis-server's TLS configuration: its certificate, and clients must show one of ours."""
        return [
            "--tls-cert-file", str(self.server_cert), "--tls-key-file", str(self.server_key),
            "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes",
        ]  # fmt: skip

    def client_options(self) -> dict[str, str]:
        """redis-py's options for a test's own client."""
        return {
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.client_cert),
            "ssl_keyfile": str(self.client_key),
        }

    def env(self) -> dict[str, str]:
        """The service's settings (README "Redis over TLS")."""
        return {
            "REDIS_TLS_CA_FILE": str(self.ca),
            "REDIS_TLS_CERT_FILE": str(self.client_cert),
            "REDIS_TLS_KEY_FILE": str(self.client_key),
        }
