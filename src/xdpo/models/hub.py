"""Files of a hub id: from the Hugging Face cache first, else downloaded, with one line when neither works.

The hub is asked only when the file is not cached: offline (`HF_HUB_OFFLINE=1`) or unreachable (one probe
of the endpoint, a few seconds, instead of huggingface_hub's five retries), a gated, missing or private
repository each get one line that says so and what to do.
"""

from __future__ import annotations

from pathlib import Path

from xdpo.errors import ConfigError

PROBE_TIMEOUT_S = 5.0


def what_to_do(name: str) -> str:
    return (
        f"use a local pipeline folder, point HF_HOME at a Hugging Face cache that holds {name}, or run "
        f"`hf download {name}` (formerly `huggingface-cli download`) on a connected machine and copy its cache"
    )


def unreachable(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached (one request, no retries), None when it answers."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean "not reachable"
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def hub_file(name: str, filename: str, revision: str | None = None, key: str = "model.pretrained") -> Path:
    """The local path of `filename` of hub repository `name` (cached, or downloaded now)."""
    from huggingface_hub import constants, hf_hub_download, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cached = try_to_load_from_cache(name, filename, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache records that the file does not exist
        raise ConfigError(f"{key}: {name} has no {filename} (not a diffusers pipeline)")
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if is_offline_mode():
        raise ConfigError(
            f"{key}: {name} is not in {where} and the hub is offline (HF_HUB_OFFLINE=1): {what_to_do(name)}"
        )
    reason = unreachable(constants.ENDPOINT)
    if reason is not None:
        raise ConfigError(
            f"{key}: cannot reach {constants.ENDPOINT} ({reason}) and {name} is not in {where}: "
            f"{what_to_do(name)}"
        )
    try:
        return Path(hf_hub_download(name, filename, revision=revision))
    except GatedRepoError:
        raise ConfigError(
            f"{key}: {name} is gated: accept its licence on {constants.ENDPOINT}/{name} and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(f"{key}: {name} has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise ConfigError(f"{key}: {name} has no {filename} (not a diffusers pipeline)") from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{key}: no repository {name} on {constants.ENDPOINT} (or it is private: log in with "
            "`hf auth login` or HF_TOKEN)"
        ) from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot download {filename} of {name}: {str(e).splitlines()[0]}") from None
