"""Broker credentials and TLS for the fleet client.

Credentials come from ``FleetConfig.credentials_file`` (YAML or JSON with ``username`` and
``password``) or else from the environment (``EDGE_RUNTIME_MQTT_USERNAME`` /
``EDGE_RUNTIME_MQTT_PASSWORD``). Never from the command line: argv is world-readable in
``/proc/<pid>/cmdline`` and lands in shell history. A credentials file that group or other can
read is refused, as ssh refuses a private key with loose permissions: a password file that
anyone on the device can read is no secret.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
from pathlib import Path
from typing import Any

import yaml

from edge_runtime.config.schema import FleetConfig
from edge_runtime.errors import ConfigError

USERNAME_ENV = "EDGE_RUNTIME_MQTT_USERNAME"
PASSWORD_ENV = "EDGE_RUNTIME_MQTT_PASSWORD"


def load_credentials(config: FleetConfig) -> tuple[str | None, str | None]:
    """``(username, password)`` for the broker; ``(None, None)`` means anonymous."""
    return credentials_from(config.credentials_file)


def credentials_from(path: str | Path | None) -> tuple[str | None, str | None]:
    """From the file at ``path`` when given, else from the environment (the controller's and
    the operator's commands take ``--credentials FILE``)."""
    if path is not None:
        return _from_file(Path(path))
    user = os.environ.get(USERNAME_ENV) or None
    password = os.environ.get(PASSWORD_ENV) or None
    if password is not None and user is None:
        raise ConfigError(f"${PASSWORD_ENV} is set but ${USERNAME_ENV} is not")
    return user, password


def _from_file(path: Path) -> tuple[str | None, str | None]:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"fleet.credentials_file {path}: cannot read it ({exc})") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"fleet.credentials_file {path} is accessible by group/other "
            f"(mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}"
        )
    text = path.read_text(encoding="utf-8")
    try:
        # JSON is a subset of YAML 1.2 for our purposes, but json first gives exact errors.
        obj: Any = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"fleet.credentials_file {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"fleet.credentials_file {path} must hold a mapping")
    extra = sorted(set(obj) - {"username", "password"})
    if extra:
        raise ConfigError(f"fleet.credentials_file {path}: unknown key(s) {extra}")
    user, password = obj.get("username"), obj.get("password")
    for name, value in (("username", user), ("password", password)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"fleet.credentials_file {path}: {name} must be a string")
    if not user:
        raise ConfigError(f"fleet.credentials_file {path}: username is missing")
    return user, password


def tls_context(config: FleetConfig) -> ssl.SSLContext | None:
    """An SSL context for the broker when ``fleet.tls`` is true (else None).

    Server verification is always on: with ``ca_file`` that CA is trusted, else the system's.
    ``cert_file``/``key_file`` add a client certificate (mutual TLS).
    """
    if not config.tls:
        return None
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=None if config.ca_file is None else str(config.ca_file),
        )
        if config.cert_file is not None and config.key_file is not None:
            ctx.load_cert_chain(str(config.cert_file), str(config.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"fleet TLS files: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
