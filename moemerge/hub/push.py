"""Pushing a merged output to the Hugging Face Hub (`moemerge push`, and `moemerge merge` when asked to)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moemerge.errors import MoemergeError, OptionError
from moemerge.files import CONFIG, MANIFEST
from moemerge.hub.ids import one_line, parse_hub_id


def check_push_target(repo_id: str, revision: str | None, create_pr: bool, need_token: bool = True) -> None:
    """Refuse a bad target before any work: a malformed id, `create_pr` with `revision`, no token."""
    if parse_hub_id(repo_id) is None or "@" in repo_id:
        raise MoemergeError(f"{repo_id!r} is not a Hub repo id; use namespace/name (e.g. my-org/my-moe)")
    if create_pr and revision:
        raise OptionError("{create_pr} opens a pull request against main; drop {revision}, or push to the branch")
    if need_token:
        from huggingface_hub import get_token

        if not get_token():
            raise MoemergeError(
                "pushing needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN"
            )


class PushFailed(MoemergeError):
    """A push that stopped part way; `out` is intact and pushing again resumes. It keeps push()'s arguments so
    that each front end says how to resume in its own words (str(): as a push() call; the CLI: as a command).
    A pull request is resumed on its own branch (revision refs/pr/N): create_pr again would open a second one."""

    def __init__(
        self, reason: str, out: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool
    ) -> None:
        self.reason, self.out, self.repo_id = reason, out, repo_id
        self.private, self.revision, self.create_pr = private, revision, create_pr
        super().__init__(self.with_resume(self._python_call()))

    def with_resume(self, how: str) -> str:
        """The message, with `how` as the way to resume."""
        return f"push to {self.repo_id} failed ({self.reason}); {self.out} is intact; resume with: {how}"

    def _python_call(self) -> str:
        revision = "refs/pr/N" if self.create_pr else self.revision
        arguments = [repr(str(self.out)), repr(self.repo_id)] + (["private=True"] if self.private else [])
        call = f"push({', '.join(arguments + ([f'revision={revision!r}'] if revision else []))})"
        return call + (" (N: the pull request named above; create_pr=True opens a new one)" if self.create_pr else "")


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
        raise PushFailed(_scrub(_push_error(exc), api), out, repo_id, private, revision, create_pr) from None
    return url
