"""The settings a client reads (API key auth, TLS), apart from the server's: the SDK makes them
without importing `visearch.settings` (which names every server setting and its dependencies).
`visearch.settings` builds every other settings class on `Base` and re-exports `SecuritySettings`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Base(BaseSettings):
    """Every settings class: VISEARCH_* variables, unknown ones ignored, read once (frozen)."""

    model_config = SettingsConfigDict(env_prefix="VISEARCH_", extra="ignore", frozen=True)

    log_level: str = "INFO"
    log_json: bool = True


class SecuritySettings(Base):
    # "on" in every real deployment; "off" only for local experiments.
    auth: str = "on"
    # JSON file of hashed API keys and their grants (see visearch/auth.py).
    api_keys_file: Path | None = None
    # Shared secret the gateway and workers present to the internal services.
    internal_token: SecretStr = SecretStr("")
    # TLS: a server presents cert/key; with client_ca it requires client certificates (mTLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # TLS as a client: the CA that signed the servers (and our own cert/key for mTLS).
    tls_ca_file: Path | None = None
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None

    @field_validator("auth")
    @classmethod
    def _on_off(cls, v: str) -> str:
        if v not in ("on", "off"):
            raise ValueError("auth must be 'on' or 'off'")
        return v
