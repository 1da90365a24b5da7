"""Fetching from the Hugging Face Hub what a recipe names by id (`org/name[@revision]`).

Downloads go through `huggingface_hub` as it is configured (HF_TOKEN or the login cache, HF_ENDPOINT,
HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE), into its ordinary cache, so a second merge reuses what the first
fetched, also offline. Only what a merge reads is fetched:

- every source: config.json, adapter_config.json and the weight index;
- the base: also generation config, tokenizer files, chat template, README.md (for the licence) and every
  weight shard;
- a full-model expert: only the shards that hold `model.layers.*.mlp.*` tensors (everything else comes
  from the base);
- a LoRA adapter: adapter_model.safetensors.

Never fetched: `consolidated*`, `original/*`, GGUF, `.pth`/`.pt`, and pickled `.bin` unless `allow_pickle`.
"""

from __future__ import annotations

import atexit
import fnmatch
import json
import re
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from moemerge.errors import MoemergeError, OptionError
from moemerge.files import ADAPTER_CONFIG, CONFIG, MODEL_CARD, PICKLE_INDEX, SAFETENSORS_INDEX, SIDE_FILES
from moemerge.hub.ids import one_line, parse_hub_id
from moemerge.inputs.weight_index import read_weight_index
from moemerge.progress import Progress, Silent

BASE_SIDE_FILES = (*SIDE_FILES, MODEL_CARD)  # the model card: for the licence
# A guard under every allow-list: none of these is ever fetched, whatever an index says.
NEVER = ["consolidated*", "original/*", "*.gguf", "*.pth", "*.pt", "*.msgpack", "*.h5", "*.onnx", "*.ckpt"]
MLP_TENSOR = re.compile(r"model\.layers\.\d+\.mlp\.")
COMMIT = re.compile(r"[0-9a-f]{40}")


def _hub_error(exc: BaseException, key: str, text: str, repo_id: str, revision: str | None) -> MoemergeError:
    """huggingface_hub's exceptions (several lines each) → one line naming the recipe key and the id."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{key}: {text!r}"
    if isinstance(exc, GatedRepoError):
        return MoemergeError(f"{where}: {repo_id} is gated on the Hub; accept its terms on its page and log in")
    if isinstance(exc, RepositoryNotFoundError):
        return MoemergeError(
            f"{where} is not a local folder, and the Hugging Face Hub has no model {repo_id} "
            "(or it is private and your token cannot read it)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return MoemergeError(f"{where}: the Hub model {repo_id} has no revision {revision!r}")
    if isinstance(exc, IncompleteSnapshotError):
        return MoemergeError(
            f"{where}: the cached copy of {repo_id} is incomplete and the Hub cannot be reached; "
            "rerun with network access (unset HF_HUB_OFFLINE)"
        )
    if isinstance(exc, LocalEntryNotFoundError):
        return MoemergeError(
            f"{where}: {repo_id} is not in the Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set, or no network); rerun online once to fill the cache"
        )
    if isinstance(exc, EntryNotFoundError):
        return MoemergeError(f"{where}: a file of {repo_id} is missing on the Hub ({one_line(exc)[:200]})")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return MoemergeError(f"{where}: downloading {repo_id} failed with HTTP {status}")
    return MoemergeError(f"{where}: downloading {repo_id} failed ({exc.__class__.__name__}: {one_line(exc)[:200]})")


class HubFetcher:
    """Resolves recipe references that are Hub ids, and notes what every reference resolved to.

    `endpoint` and `cache_dir` default to huggingface_hub's own settings (HF_ENDPOINT, HF_HUB_CACHE).
    """

    def __init__(
        self,
        allow_pickle: bool = False,
        endpoint: str | None = None,
        cache_dir: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.allow_pickle = allow_pickle
        self.endpoint = endpoint
        self.cache_dir = cache_dir
        self.progress = progress or Silent()
        self.origins: dict[Path, dict[str, Any]] = {}  # a resolved local folder → its Hub id, revision, commit
        self.sources: dict[str, Any] = {}  # recipe key → what it resolved to, for moemerge.json

    # -- recording -------------------------------------------------------------------------------

    def describe(self, folder: Path) -> dict[str, Any]:
        """A Hub source by id, revision and commit; a local one by the path as the recipe found it (not
        resolved, so a pushed output does not reveal the folders of the machine that made it)."""
        return dict(self.origins.get(folder.resolve()) or {"path": str(folder)})

    def note(self, key: str, model: Path, adapter: Path | None = None) -> None:
        """Record what `key` resolved to: one source, or mergekit's model+adapter pair."""
        if adapter is None:
            self.sources[key] = self.describe(model)
        else:
            self.sources[key] = {"model": self.describe(model), "adapter": self.describe(adapter)}

    # -- downloading -----------------------------------------------------------------------------

    def fetch(self, text: str, key: str, role: str) -> Path | None:
        """Download what `role` ('base', 'expert' or 'adapter') needs of the Hub id `text`; None if `text`
        is not a Hub id. Returns a local folder the rest of moemerge reads like any other."""
        parsed = parse_hub_id(text)
        if parsed is None:
            return None
        repo_id, revision = parsed
        try:
            folder, commit = self._fetch(repo_id, revision, role, key, text)
        except MoemergeError:
            raise
        except Exception as exc:  # huggingface_hub / httpx / OS errors: one line naming key and id
            raise _hub_error(exc, key, text, repo_id, revision) from None
        origin = {"id": repo_id, "revision": revision or "main", "commit": commit}
        self.origins[folder.resolve()] = origin
        return folder

    def _snapshot(self, repo_id: str, revision: str | None, allow: list[str]) -> Path:
        """The small files, in one call that resolves the revision to a commit and caches the file listing
        (so that HF_HUB_OFFLINE runs later find both)."""
        from huggingface_hub import snapshot_download

        ignore = list(NEVER) + ([] if self.allow_pickle else ["*.bin"])
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow,
            ignore_patterns=ignore,
            endpoint=self.endpoint,
            cache_dir=self.cache_dir,
            tqdm_class=_quiet_bar(),
        )
        return Path(folder)

    def _files(self, repo_id: str, commit: str, names: list[str], sizes: dict[str, int] | None, key: str) -> None:
        """The weights, file by file at the pinned commit, a few at a time, advancing one progress bar by
        each file's size as it lands (cached files land at once; nothing is requested for them)."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        refused = [n for n in names if _never(n, self.allow_pickle)]
        if refused:
            raise MoemergeError(f"{key}: {repo_id} names weight file {refused[0]!r}, which moemerge never downloads")
        names = [n for n in names if not isinstance(try_to_load_from_cache(repo_id, n, self.cache_dir, commit), str)]
        if not names:
            return
        advance = self.progress.task(f"downloading {repo_id}", sum((sizes or {}).get(n, 0) for n in names))
        quiet = _quiet_bar()

        def one(name: str) -> str:
            return hf_hub_download(
                repo_id,
                name,
                revision=commit,
                endpoint=self.endpoint,
                cache_dir=self.cache_dir,
                tqdm_class=quiet,
            )

        with ThreadPoolExecutor(max_workers=min(4, len(names))) as pool:
            futures = {pool.submit(one, name): name for name in names}
            try:
                for future in as_completed(futures):
                    future.result()
                    advance((sizes or {}).get(futures[future], 0))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _listing(self, repo_id: str, commit: str | None) -> dict[str, int] | None:
        """The repo's files and sizes at `commit`, from the listing huggingface_hub cached (no request)."""
        try:
            from huggingface_hub import get_cached_repo_tree
        except ImportError:  # pragma: no cover - older huggingface_hub
            return None
        if commit is None:
            return None
        try:
            tree = get_cached_repo_tree(repo_id, revision=commit, cache_dir=self.cache_dir)
        except Exception:
            return None
        return {f.path: int(f.size or 0) for f in tree}

    def _fetch(self, repo_id: str, revision: str | None, role: str, key: str, text: str) -> tuple[Path, str | None]:
        first = [CONFIG, ADAPTER_CONFIG, SAFETENSORS_INDEX] + ([PICKLE_INDEX] if self.allow_pickle else [])
        if role == "base":
            first += BASE_SIDE_FILES
        folder = self._snapshot(repo_id, revision, first)
        commit = folder.name if COMMIT.fullmatch(folder.name) else None
        pinned = commit or revision or "main"  # the weights come from the very commit the first call resolved
        listing = self._listing(repo_id, commit)
        if (folder / ADAPTER_CONFIG).is_file() or role == "adapter":
            if not (folder / ADAPTER_CONFIG).is_file():
                raise MoemergeError(
                    f"{key}: {text!r} has no {ADAPTER_CONFIG}; the part after '+' must be a LoRA adapter"
                )
            names = self._adapter_weights(listing)
            if not names:
                hint = "" if self.allow_pickle else " (a pickled adapter_model.bin needs {allow_pickle})"
                template = "{key}: the Hub adapter {repo_id} has no adapter_model.safetensors" + hint
                raise OptionError(template, key=key, repo_id=repo_id)
            self._files(repo_id, pinned, names, listing, key)
            return folder, commit
        if not (folder / CONFIG).is_file():
            raise MoemergeError(f"{key}: the Hub model {repo_id} has no {CONFIG}; is it a transformers model?")
        for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
            if (folder / index_name).is_file():
                return self._fetch_sharded(repo_id, pinned, folder, index_name, listing, role, key), commit
        names = self._single_weights(listing)
        if not names:
            hint = "" if self.allow_pickle else " (pickled .bin weights need {allow_pickle})"
            template = "{key}: the Hub model {repo_id} has no safetensors weights moemerge reads" + hint
            raise OptionError(template, key=key, repo_id=repo_id)
        self._files(repo_id, pinned, names, listing, key)
        return folder, commit

    def _adapter_weights(self, listing: dict[str, int] | None) -> list[str]:
        preferred = ["adapter_model.safetensors"] + (["adapter_model.bin"] if self.allow_pickle else [])
        if listing is None:
            return preferred[:1]
        return [name for name in preferred if name in listing][:1]

    def _single_weights(self, listing: dict[str, int] | None) -> list[str]:
        """No index: the one weight file, as transformers would pick it."""
        preferred = ["model.safetensors"] + (["pytorch_model.bin"] if self.allow_pickle else [])
        if listing is None:
            return preferred[:1]
        for name in preferred:
            if name in listing:
                return [name]
        return []

    def _fetch_sharded(
        self,
        repo_id: str,
        pinned: str,
        folder: Path,
        index_name: str,
        listing: dict[str, int] | None,
        role: str,
        key: str,
    ) -> Path:
        index = read_weight_index(folder / index_name, f"{key}: {repo_id}'s {index_name}")
        weight_map, shards = index.weight_map, index.shards
        if role != "base":  # an expert gives only its MLPs; the rest comes from the base
            shards = sorted({shard for name, shard in weight_map.items() if MLP_TENSOR.match(name)})
            if not shards:
                raise MoemergeError(f"{key}: {repo_id}'s {index_name} lists no model.layers.*.mlp.* tensors")
        self._files(repo_id, pinned, shards, listing, key)
        if role == "base" or all((folder / s).is_file() for s in set(weight_map.values())):
            return folder
        return _mlp_view(folder, index_name, weight_map, shards)


def _never(name: str, allow_pickle: bool) -> bool:
    patterns = NEVER + ([] if allow_pickle else ["*.bin"])
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _quiet_bar() -> type:
    """A progress bar class that shows nothing: downloads report to moemerge's own progress instead."""
    from tqdm.auto import tqdm

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


_VIEWS: list[Path] = []


def _remove_views() -> None:
    for view in _VIEWS:
        shutil.rmtree(view, ignore_errors=True)


atexit.register(_remove_views)


def _mlp_view(folder: Path, index_name: str, weight_map: dict[str, str], shards: Iterable[str]) -> Path:
    """A folder of links to the config and the fetched shards, with an index of just their tensors, so an
    expert reads like a model folder without the shards it does not need (the cache itself is not touched)."""
    kept = set(shards)
    view = Path(tempfile.mkdtemp(prefix="moemerge-expert-"))
    _VIEWS.append(view)
    for name in [CONFIG, *sorted(kept)]:
        (view / name).symlink_to((folder / name).resolve())
    index = {"metadata": {}, "weight_map": {k: v for k, v in weight_map.items() if v in kept}}
    (view / index_name).write_text(json.dumps(index), encoding="utf-8")
    return view
