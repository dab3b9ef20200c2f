"""Where dsr1 reads its environment, and the one place settings are resolved.

Precedence, written once: command-line flag > `DSR1_*` environment variable >
profile > built-in default. Every other module asks here rather than reading
os.environ itself, so the order cannot drift between commands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from dsr1.errors import UsageError

ENV_PREFIX = "DSR1_"


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def home(environ: Mapping[str, str] | None = None) -> Path:
    """dsr1's state directory: `DSR1_HOME`, else `$XDG_CACHE_HOME/dsr1` (~/.cache/dsr1)."""
    env = _env(environ)
    if env.get("DSR1_HOME"):
        return Path(env["DSR1_HOME"]).expanduser()
    cache = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "dsr1"


def user_profiles_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Users drop their own profile TOML files here (documented in docs/profiles.md)."""
    return home(environ) / "profiles"


def hf_home(environ: Mapping[str, str] | None = None) -> Path:
    """HF_HOME as huggingface_hub resolves it (without importing it: doctor stays fast)."""
    env = _env(environ)
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser()
    cache = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "huggingface"


def hf_hub_cache(environ: Mapping[str, str] | None = None) -> Path:
    env = _env(environ)
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    return hf_home(environ) / "hub"


def hf_endpoint(environ: Mapping[str, str] | None = None) -> str:
    """The hub or mirror to talk to. huggingface_hub reads HF_ENDPOINT once at import,
    so callers pass this value explicitly as `endpoint=`."""
    return (_env(environ).get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hf_token(environ: Mapping[str, str] | None = None) -> str | None:
    env = _env(environ)
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    path = Path(env.get("HF_TOKEN_PATH") or hf_home(environ) / "token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def debug(environ: Mapping[str, str] | None = None) -> bool:
    return _env(environ).get("DSR1_DEBUG", "").lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Resolved:
    """A setting's value and where it came from (flag, env, profile, default)."""

    name: str
    value: Any
    source: str


def _parse_env(name: str, raw: str, kind: Callable[[str], Any]) -> Any:
    if kind is bool:
        low = raw.strip().lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off", ""}:
            return False
        raise UsageError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean", hint="use 1/0, true/false")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise UsageError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {getattr(kind, '__name__', kind)}",
            hint=f"fix or unset {ENV_PREFIX}{name.upper()}",
        ) from None


def resolve(
    name: str,
    *,
    flag: Any = None,
    profile: Any = None,
    default: Any = None,
    kind: Callable[[str], Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Resolve one setting: flag > DSR1_<NAME> > profile > default.

    `None` means "not given" at every level. `kind` converts the environment
    string; it defaults to the type of whichever lower level has a value.
    """
    if flag is not None:
        return Resolved(name, flag, "flag")
    raw = _env(environ).get(ENV_PREFIX + name.upper())
    if raw is not None and raw != "":
        fallback = profile if profile is not None else default
        conv = kind or (type(fallback) if fallback is not None else str)
        return Resolved(name, _parse_env(name, raw, conv), "env")
    if profile is not None:
        return Resolved(name, profile, "profile")
    return Resolved(name, default, "default")


def api_key(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer key: --api-key, else DSR1_API_KEY. One source for serve, chat and bench, so a
    server dsr1 starts and the client dsr1 runs against it agree."""
    return resolve("api_key", flag=flag, kind=str, environ=environ).value or None
