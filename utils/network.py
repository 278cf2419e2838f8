"""Fail fast without network: one short probe per server instead of a library's retries with back-off.

huggingface_hub retries a failed request five times (about 25 s of sleeps, every attempt logged) before
datasets reports that the hub could not be reached; a blocked connection waits for its full timeout on each file.
"""
from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from functools import lru_cache
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 5.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_requested() -> str | None:
    """The variable that asks for offline mode (HF_HUB_OFFLINE=1 and its aliases), or None."""
    return next((name for name in OFFLINE_VARIABLES
                 if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")), None)


@lru_cache(maxsize=None)
def _probe(origin: str) -> str | None:
    try:
        urllib.request.urlopen(urllib.request.Request(origin, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # the server answered
    except OSError as err:
        reason = getattr(err, "reason", err)
        # Only a failure to connect means "no network"; anything else (TLS, proxy rules) the real request reports.
        if isinstance(reason, (socket.gaierror, ConnectionError, TimeoutError)):
            return f"{urlsplit(origin).netloc} is unreachable ({reason})"
    return None


def unreachable(url: str) -> str | None:
    """Why the server of `url` cannot be reached from here, or None when it answers (probed once per process,
    through the proxy settings of the environment, as the libraries' own requests are)."""
    parts = urlsplit(url)
    return _probe(f"{parts.scheme}://{parts.netloc}/")


def download_blocked(url: str) -> str | None:
    """Why a download from `url` should not be tried (offline mode asked for, or its server unreachable), or None."""
    variable = offline_requested()
    return f"{variable} is set" if variable else unreachable(url)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT) cannot be reached from here, or None."""
    from huggingface_hub import constants
    return unreachable(constants.ENDPOINT)
