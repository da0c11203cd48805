"""Whether the Hugging Face hub can be reached, decided once per process before its first use.

Without a network, the hub client retries every request with back-off: a hub id that is not
in the Hugging Face cache fails only after about 50 seconds of silence, and one that is cached
loads after the same wait. :func:`prepare_hub` instead tries one TCP connection to the hub's
endpoint (``HF_ENDPOINT``, default https://huggingface.co; :data:`PROBE_SECONDS` at most). When
that fails, the process goes offline as ``HF_HUB_OFFLINE=1`` would have made it: cached files
load at once, missing ones fail at once, and :func:`offline_reason` says why for the message.

Nothing is probed when the user already chose (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set),
when a proxy is configured (the endpoint is then reached through it, not directly), or with
``PREFKIT_HUB_PROBE=0`` (for a program that uses the hub for other things and must not find it
switched off). The switch holds for the rest of the process, and for the processes it starts.
Imports nothing from prefkit.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlsplit

PROBE_SECONDS = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_TRUE = {"1", "ON", "YES", "TRUE"}
_REASON_VARIABLE = "PREFKIT_HUB_UNREACHABLE"

_decided: bool = False
_unreachable: str | None = None  # why the probe failed, once it has


def prepare_hub() -> None:
    """Probe the hub once (later calls return at once); offline for the process if it cannot be reached."""
    global _decided, _unreachable
    if _decided:
        return
    _decided = True
    if _user_chose_offline() or any(os.environ.get(name) for name in _PROXY_VARIABLES) or \
            os.environ.get("PREFKIT_HUB_PROBE", "").strip() == "0":
        return
    endpoint = _endpoint()
    problem = probe(endpoint)
    if problem is not None:
        _unreachable = f"the hub at {endpoint} cannot be reached from this machine ({problem})"
        go_offline()
        os.environ[_REASON_VARIABLE] = _unreachable  # for the processes this one starts


def offline_reason() -> str | None:
    """Why the hub is not used in this process (None when it is, or may be)."""
    if _unreachable is not None:
        return _unreachable
    if os.environ.get(_REASON_VARIABLE):
        return os.environ[_REASON_VARIABLE]
    chosen = _user_chose_offline()
    return f"{chosen} is set" if chosen else None


def is_unreachable_error(exc: BaseException) -> bool:
    """Whether a hub client's exception means the files could not be fetched (offline, no network,
    not cached), rather than something else (an unknown split, a bad subset, a damaged file)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(mark in text for mark in ("offlinemode", "offline mode", "couldn't connect", "could not connect",
                                         "couldn't reach", "localentrynotfound", "cached files"))


def probe(endpoint: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when a TCP connection to ``endpoint``'s host and port opens within ``timeout`` seconds,
    else what went wrong in a few words."""
    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return f"HF_ENDPOINT {endpoint!r} names no host"
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:
        return f"HF_ENDPOINT {endpoint!r} has a bad port"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"the name {host} does not resolve"
    except TimeoutError:
        return f"no answer from {host}:{port} in {timeout:g} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def go_offline() -> None:
    """Offline mode for this process and the ones it starts, already-imported hub clients included."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")  # reads the setting once, at import
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def _user_chose_offline() -> str | None:
    """The offline variable the user set, if any."""
    return next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if (os.environ.get(name) or "").strip().upper() in _TRUE), None)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT
