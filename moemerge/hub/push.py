"""Pushing a merged output to the Hugging Face Hub (`moemerge push`, `moemerge merge --push`)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from moemerge.errors import MoemergeError
from moemerge.files import CONFIG, MANIFEST
from moemerge.hub.ids import one_line, parse_hub_id


def check_push_target(repo_id: str, revision: str | None, create_pr: bool, need_token: bool = True) -> None:
    """Refuse a bad target before any work: a malformed id, --create-pr with --revision, no token."""
    if parse_hub_id(repo_id) is None or "@" in repo_id:
        raise MoemergeError(f"{repo_id!r} is not a Hub repo id; use namespace/name (e.g. my-org/my-moe)")
    if create_pr and revision:
        raise MoemergeError("--create-pr opens a pull request against main; drop --revision, or push to the branch")
    if need_token:
        from huggingface_hub import get_token

        if not get_token():
            raise MoemergeError(
                "pushing needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN"
            )


def _resume_command(out: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool) -> str:
    command = f"moemerge push {shlex.quote(str(out))} {repo_id}" + (" --private" if private else "")
    if create_pr:  # a second --create-pr would open a second pull request
        return f"{command} --revision refs/pr/N (N: the pull request named above; --create-pr opens a new one)"
    return command + (f" --revision {shlex.quote(revision)}" if revision else "")


def _push_error(exc: BaseException) -> str:
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if isinstance(exc, LocalTokenNotFoundError):
        return "no Hugging Face token (run `hf auth login` or set HF_TOKEN)"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        server = f": {one_line(exc.server_message)[:160]}" if exc.server_message else ""
        if status in (401, 403):
            return f"HTTP {status}, the token cannot write to this repo{server}"
        return f"HTTP {status}{server}"
    return f"{exc.__class__.__name__}: {one_line(exc)[:200]}"


def _scrub(text: str, api: Any) -> str:
    """Belt and braces: whatever a server echoes, the user's token is never printed."""
    try:
        from huggingface_hub import get_token

        tokens = [get_token(), getattr(api, "token", None)]
    except Exception:  # pragma: no cover
        tokens = []
    for token in tokens:
        if isinstance(token, str) and token:
            text = text.replace(token, "***")
    return text


def push(
    out: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    api: Any = None,
) -> str:
    """Upload the output folder `out` to the Hub model repo `repo_id`; returns the URL to look at.

    The repo is created if missing (`private` applies only then: an existing repo keeps its visibility);
    `revision` names a branch, created from main if missing. huggingface_hub 2.x's `upload_folder` is itself
    resumable (streamed multi-commit upload; re-running skips what was committed, and Xet deduplicates what
    was uploaded), so it is used; an older huggingface_hub's `upload_large_folder` serves the same purpose
    and is used when present, except for pull requests, which it cannot open. `api` is an `HfApi`.
    """
    out = Path(out)
    check_push_target(repo_id, revision, create_pr, need_token=False)
    if not (out / CONFIG).is_file() or not (out / MANIFEST).is_file():
        raise MoemergeError(f"{out}: not a moemerge output (no config.json / moemerge.json); nothing was pushed")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    message = f"Upload {out.name} with moemerge"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not revision.startswith("refs/pr/"):  # a pull request's ref exists already
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        large = getattr(api, "upload_large_folder", None)
        if large is not None and not create_pr:
            large(repo_id=repo_id, folder_path=out, repo_type="model", revision=revision, private=private)
            url = f"{api.endpoint}/{repo_id}" + (f"/tree/{revision}" if revision else "")
        else:
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=out,
                repo_type="model",
                revision=revision,
                create_pr=create_pr,
                commit_message=message,
            )
            url = getattr(info, "pr_url", None) or f"{api.endpoint}/{repo_id}" + (
                f"/tree/{revision}" if revision else ""
            )
    except (Exception, KeyboardInterrupt) as exc:
        resume = _resume_command(out, repo_id, private, revision, create_pr)
        raise MoemergeError(
            _scrub(f"push to {repo_id} failed ({_push_error(exc)}); {out} is intact; resume with: {resume}", api)
        ) from None
    return url
