"""Uploading a checkpoint folder to the Hub, with one-sentence errors (offline, not logged in, no access) found
before anything is written or uploaded."""

from __future__ import annotations

import contextlib

from ..errors import UsageError


def _network_errors() -> tuple[type[Exception], ...]:
    """What the Hub client raises when it cannot connect: OSError (requests' ConnectionError is one), huggingface_hub's
    offline-mode error, and the HTTP errors of httpx (or httpx2, as some installs name it)."""
    import importlib

    from huggingface_hub.errors import OfflineModeIsEnabled

    found: list[type[Exception]] = [OSError, OfflineModeIsEnabled]
    for name in ("httpx", "httpx2"):  # huggingface_hub's HTTP client, by the name this install gives it
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(name).HTTPError)
    return tuple(found)


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def check_hub_access(repo_id: str) -> None:
    """The Hub is reachable and a token is set, checked before a card is written or a file uploaded: raises
    ValueError naming `repo_id` and the way out."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        HfApi().whoami()
    except LocalTokenNotFoundError:
        raise UsageError(
            f"--push-to-hub {repo_id}: no Hugging Face token is set, so nothing was written or uploaded; log in with "
            "`hf auth login` (or set HF_TOKEN), or leave --push-to-hub out to only write the card"
        ) from None
    except HfHubHTTPError as err:
        raise UsageError(
            f"--push-to-hub {repo_id}: the Hub refused the token ({_reason(err)}); nothing was written or uploaded"
        ) from None
    except _network_errors() as err:
        raise UsageError(
            f"--push-to-hub {repo_id}: cannot reach the Hub ({_reason(err)}); nothing was written or uploaded. Run "
            "online (HF_HUB_OFFLINE unset), or leave --push-to-hub out to only write the card"
        ) from None


def push_folder(folder, repo_id: str, private: bool = False) -> None:
    """Create `repo_id` (if needed) and upload `folder`; a Hub failure is one sentence, not a traceback."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message="Upload Sparse Wide GPT checkpoint (hf-sparse-ift)"
        )
    except (HfHubHTTPError, *_network_errors()) as err:
        raise UsageError(
            f"--push-to-hub {repo_id}: the upload failed ({_reason(err)}); the card in {folder} is written, and "
            "running the command again retries the upload"
        ) from None
