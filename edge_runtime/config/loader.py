"""Reading configs and device profiles from YAML files.

Device profiles live in the repository's top-level ``firmware_configs/``. An
installed (non-editable) distribution carries the same YAML files as package data
under ``edge_runtime/firmware_configs/`` (pyproject maps that subpackage to the
top-level folder), so :func:`profiles_dir` looks in the checkout first and then in
the installed copy. ``EDGE_RUNTIME_PROFILES_DIR`` points it elsewhere (a device's
own profiles).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from edge_runtime.config.schema import RuntimeConfig, validate_config
from edge_runtime.errors import ConfigError

PROFILES_ENV = "EDGE_RUNTIME_PROFILES_DIR"
_PROFILE_SUFFIXES = (".yaml", ".yml")


def profiles_dir() -> Path:
    """The folder holding the device profiles (``<name>.yaml``)."""
    override = os.environ.get(PROFILES_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{PROFILES_ENV}={override}: not a directory")
        return path
    package = Path(__file__).resolve().parent.parent  # .../edge_runtime
    candidates = (
        package.parent / "firmware_configs",  # source checkout / editable install
        package / "firmware_configs",  # wheel: package data
    )
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise ConfigError(
        "no device profiles found (looked in "
        + ", ".join(str(c) for c in candidates)
        + f"); set {PROFILES_ENV}"
    )


def list_profiles() -> list[str]:
    """Names of the shipped device profiles, sorted (e.g. ``jetson-orin-nano-8gb``)."""
    folder = profiles_dir()
    return sorted(p.stem for p in folder.iterdir() if p.suffix in _PROFILE_SUFFIXES)


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict:
    """The YAML mapping in ``path``; ConfigError naming the file if it is unreadable or not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: config must be a mapping of sections (device, encoder, ...), "
            f"got {type(data).__name__}"
        )
    return data


def load_config(path: str | os.PathLike[str] | None = None) -> RuntimeConfig:
    """The config in YAML file ``path``, validated; ``None`` gives the defaults."""
    if path is None:
        return RuntimeConfig()
    return validate_config(read_yaml_mapping(path), source=str(path))


def resolve_profile_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A profile name (``jetson-orin-nano-8gb``) or a YAML path -> the file to read."""
    text = os.fspath(name_or_path)
    looks_like_path = (
        os.sep in text or "/" in text or text.endswith(_PROFILE_SUFFIXES) or Path(text).is_file()
    )
    if looks_like_path:
        return Path(text)
    folder = profiles_dir()
    for suffix in _PROFILE_SUFFIXES:
        candidate = folder / f"{text}{suffix}"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"unknown device profile {text!r} (available: {', '.join(list_profiles())}; "
        "or give a path to a YAML file)"
    )


def load_profile(name_or_path: str | os.PathLike[str]) -> RuntimeConfig:
    """A device profile by name (see :func:`list_profiles`) or by path."""
    return load_config(resolve_profile_path(name_or_path))
