"""Files from the Hugging Face hub (``snapshot_download``), with its failures turned into one-line ``EvlpError``s."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from evlp.errors import EvlpError


def fetch_snapshot(
    repo_id: str,
    local_dir: str | os.PathLike,
    allow_patterns: list[str],
    *,
    ignore_patterns: list[str] | None = None,
    token: str | None = None,
) -> Path:
    """Download the dataset files of ``repo_id`` matching ``allow_patterns`` into ``local_dir`` (resumable: files
    already there are not fetched again) and return ``local_dir``."""
    page = f"https://huggingface.co/datasets/{repo_id}"
    login = "log in with `hf auth login` (or set HF_TOKEN, or pass --token)"
    try:
        snapshot_download(
            repo_id,
            repo_type="dataset",
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            local_dir=local_dir,
            token=token,
        )
    except GatedRepoError as e:
        raise EvlpError(f"{repo_id} is gated: accept its terms at {page} with your account, then {login}") from e
    except RepositoryNotFoundError as e:
        raise EvlpError(f"dataset {repo_id} not found on the hub, or not visible without a login: check {page} "
                        f"and {login}") from e
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        raise EvlpError(f"cannot reach the Hugging Face hub for {repo_id}{offline}: {_first_line(e)}") from e
    except HfHubHTTPError as e:
        raise EvlpError(f"download of {repo_id} from the hub failed: {_first_line(e)}; rerun to resume") from e
    except OSError as e:
        raise EvlpError(f"download of {repo_id} into {local_dir} failed: {e.strerror or e}; rerun to resume") from e
    return Path(local_dir)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
