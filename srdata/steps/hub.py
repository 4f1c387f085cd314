"""A model named by hub id, checked once before any slow work: offline, fail at once or use the cache.

Without a network, ``from_pretrained`` retries each file download (about a minute before
the error on a machine whose DNS fails). So before the data is loaded, a hub id (a
``--model`` that is not a local folder) gets one check: ``HF_HUB_OFFLINE`` set, or one TCP
connection to the hub (``HF_ENDPOINT``) refused, means offline. Offline, a model in the
Hugging Face cache is used from there (and every later load is told so, no retries); a
model not in the cache is an error at once, naming the fix.

Example:
    >>> check_hub_model("path/that/exists/or/not")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

TRUE = {"1", "on", "yes", "true"}


def offline_reason(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (``HF_HUB_OFFLINE`` set, or no connection), or ``None`` when it can.

    Example:
        >>> os.environ["HF_HUB_OFFLINE"] = "1"; offline_reason()   # doctest: +SKIP
        'HF_HUB_OFFLINE is set'
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in TRUE:
            return f"{name} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"the Hugging Face hub ({host}:{port}) cannot be reached ({err.strerror or err})"
    return None


def _cached(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # a name that is not a valid repo id: not in the cache
        return False


def check_hub_model(model: str) -> str | None:
    """For a ``--model`` that is no local folder: fail now when offline and not cached; returns a note to show, or ``None``.

    Offline with the model cached, the caller runs the rest inside :func:`hub_offline`, so the
    later loads read the cache without retrying the network.
    """
    if Path(model).expanduser().exists():
        return None
    reason = offline_reason()
    if reason is None:
        return None
    if not _cached(model):
        raise FileNotFoundError(
            f"could not load the tokenizer of model {model!r}: it is not a local folder, {reason}, and the model is not in the "
            "Hugging Face cache. Pass a "
            "folder saved with save_pretrained (check the path for a typo), or download the model where there is a network"
        )
    return f"{reason}: using the cached copy of {model}"


@contextmanager
def hub_offline(active: bool) -> Iterator[None]:
    """huggingface_hub in offline mode while the block runs (when ``active``), as it was afterwards.

    The later loads of a run then read the cache without retrying the network. Restored on
    exit: a library call must not leave the whole process offline (a later engine or load
    in the same process would behave differently).
    """
    if not active:
        yield
        return
    import huggingface_hub.constants as constants

    before_env, before_constant = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # read by is_offline_mode()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before_constant
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env
