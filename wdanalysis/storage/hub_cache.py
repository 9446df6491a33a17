"""Hub ids (``org/name`` or ``org/name@revision``) found in the local Hugging Face cache.

A model path that exists on disk is always used as it is. Otherwise, a string shaped like a
hub repo id is looked up in the local cache with ``huggingface_hub``'s own offline lookup
(``snapshot_download(..., local_files_only=True)``): nothing is ever downloaded and no
network connection is opened. The cache folder is read from the environment at call time,
with ``huggingface_hub``'s documented precedence: ``HF_HUB_CACHE`` (or the older
``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``,
else ``~/.cache/huggingface/hub``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from wdanalysis.errors import CheckpointFormatError


@dataclass(frozen=True)
class HubId:
    """A model repo id on the Hugging Face hub, with an optional revision (branch, tag, commit)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def hub_cache_dir() -> Path:
    """The hub cache folder ``huggingface_hub`` would use, from the environment *now*.

    ``huggingface_hub.constants`` freezes these variables when it is first imported; reading
    them here instead lets ``HF_HUB_CACHE=… wdanalysis …`` and tests that set the environment
    after import see the folder they named.
    """
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return _expand(env[name])
    if env.get("HF_HOME"):
        return _expand(env["HF_HOME"]) / "hub"
    cache_home = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return _expand(cache_home) / "huggingface" / "hub"


def _expand(text: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(text)))


def parse_hub_id(path: str | Path) -> HubId | None:
    """``org/name`` or ``org/name@revision`` as a :class:`HubId`; anything else: ``None``.

    Only two-part ids count (a bare ``name`` is far more often a mistyped local folder), and
    the repo part must pass ``huggingface_hub``'s own repo-id validation.
    """
    text = str(path)
    repo_id, at, revision = text.partition("@")
    if repo_id.count("/") != 1 or (at and not revision):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubId(repo_id, revision or None)


def resolve_model_path(path: str | Path) -> Path:
    """A local path as given when it exists; else the cached snapshot folder of a hub id.

    A path that neither exists nor looks like ``org/name[@revision]`` is returned unchanged,
    so that the loaders report it as a missing file. A hub id that is not in the cache raises
    :class:`~wdanalysis.errors.CheckpointFormatError` naming the id, the cache folder that was
    searched and how to fetch the model.
    """
    local = Path(path)
    if local.exists():
        return local
    hub_id = parse_hub_id(path)
    if hub_id is None:
        return local
    return cached_snapshot(hub_id)


def cached_snapshot(hub_id: HubId) -> Path:
    """The snapshot folder of ``hub_id`` in :func:`hub_cache_dir`, found offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = snapshot_download(
            hub_id.repo_id,
            revision=hub_id.revision,
            cache_dir=str(cache),
            local_files_only=True,
        )
    except LocalEntryNotFoundError as error:
        raise _not_cached(hub_id, cache, error) from None
    return Path(folder)


def _not_cached(hub_id: HubId, cache: Path, error: Exception) -> CheckpointFormatError:
    fetch = f"hf download {hub_id.repo_id}" + (
        f" --revision {hub_id.revision}" if hub_id.revision else ""
    )
    hint = (
        f"check the path; to use the hub model, fetch it with `{fetch}` "
        "(older clients: `huggingface-cli download`), or set HF_HUB_CACHE or HF_HOME "
        "to the cache that holds it"
    )
    cached = _cached_revisions(hub_id.repo_id, cache)
    if isinstance(error, _incomplete_snapshot_error()):
        problem = f"the cached copy of {hub_id} in {cache} is incomplete (a download cut short)"
    elif cached:
        problem = (
            f"no such file or folder, and revision {hub_id.revision or 'main'!r} of "
            f"{hub_id.repo_id} is not in the Hugging Face cache {cache} "
            f"(cached: {', '.join(cached)})"
        )
    else:
        problem = (
            f"no such file or folder, and no model {hub_id.repo_id} in the Hugging Face "
            f"cache {cache}"
        )
    return CheckpointFormatError(problem, str(hub_id), hint)


def _cached_revisions(repo_id: str, cache: Path) -> list[str]:
    """Refs and commit hashes cached for ``repo_id`` (``huggingface_hub``'s cache scan)."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache)
    except Exception:  # no cache folder, or one huggingface_hub cannot read: nothing cached
        return []
    found: list[str] = []
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            for revision in sorted(repo.revisions, key=lambda r: r.commit_hash):
                found.extend(sorted(revision.refs))
                found.append(revision.commit_hash)
    return found


def _incomplete_snapshot_error() -> tuple[type[Exception], ...]:
    """``IncompleteSnapshotError`` where this huggingface_hub has it (newer versions)."""
    try:
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:
        return ()
    return (IncompleteSnapshotError,)
