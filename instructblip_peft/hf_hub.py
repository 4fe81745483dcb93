"""The Hugging Face Hub, for fine-tuned models: fetching an exported one by its repo id (`snapshot_download`,
kept in the Hugging Face cache) and uploading one (`HfApi.create_repo` + `upload_folder`).

Where a model may come from, `fetch` decides: an existing local directory is used as it is; `hub:owner/name`,
or `owner/name` when no such local path exists, is downloaded. Network and hub failures become one-line
UserErrors (the CLI's -v shows the cause).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

HUB_PREFIX = "hub:"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_repo_id(text: str) -> bool:
    """`owner/name` as the hub spells repo ids (one slash, no spaces, no leading dot)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith(".")


def fetch(source: str | os.PathLike) -> Path:
    """A local directory holding `source`: itself when it exists here, else the hub repo downloaded."""
    text = os.fspath(source)
    explicit = text.startswith(HUB_PREFIX)
    repo_id = text[len(HUB_PREFIX):] if explicit else text
    if not explicit and Path(text).expanduser().exists():
        return Path(text).expanduser()
    if not is_repo_id(repo_id):
        if explicit:
            raise UserError(f"'{text}': not a hub repo id (expected hub:owner/name)")
        raise UserError(f"{text}: no such run directory or exported folder (nor a hub repo id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="model"))
    except Exception as e:  # any network/hub/cache failure, one line for the user
        raise UserError(f"'{text}' is not a local directory, and downloading hub repo '{repo_id}' failed: "
                        f"{_first_line(e)}") from e


def upload(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create `repo_id` (kept if it exists) and upload `folder` to it; the repo's URL."""
    if not is_repo_id(repo_id):
        raise UserError(f"'{repo_id}': not a hub repo id (expected owner/name, e.g. your-name/instructblip-lora)")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                          commit_message="Upload a fine-tuned model exported by instructblip-peft")
    except Exception as e:  # no network, no login, no permission: one line for the user
        raise UserError(f"cannot upload to hub repo '{repo_id}': {_first_line(e)} (log in with `hf auth login` "
                        "or set HF_TOKEN; `instructblip-peft export` writes the same folder locally)") from e
    return str(url)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
