"""`xdpo export --push-to-hub REPO`: the export folder to a hub model repository (`huggingface_hub`).

Offline (`HF_HUB_OFFLINE=1`) or on any hub error, one line says what failed and how to push the folder
later (`hf upload REPO FOLDER`); the export itself stays on disk.
"""

from __future__ import annotations

from pathlib import Path

from xdpo.errors import XdpoError


def first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Create (or reuse) model repo `repo` and upload `folder` into it; return the repo's URL."""
    from huggingface_hub import HfApi, constants

    later = f"the export is in {folder}; push it later with `hf upload {repo} {folder}`"
    if constants.is_offline_mode():
        raise XdpoError(f"--push-to-hub {repo}: the hub is offline here (HF_HUB_OFFLINE=1); {later}")
    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="xdpo export")
    except Exception as e:  # network, authentication, permissions: one line, the export kept
        raise XdpoError(f"--push-to-hub {repo}: {type(e).__name__}: {first_line(e)}; {later}") from None
    return str(url)
