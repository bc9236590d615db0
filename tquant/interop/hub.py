"""Checkpoints named by a hub id (org/name): tquant.load / tquant.from_pretrained / tquant.export take one where they
take a checkpoint folder, for every kind tquant.load reads (tquant, compressed-tensors, GPTQ, AWQ).

    checkpoint_folder("org/name", revision=None)   the local folder holding the checkpoint: a folder that exists is
                                                   taken as it is; otherwise the hub id's snapshot, through
                                                   huggingface_hub.snapshot_download (its cache, HF_HUB_OFFLINE, a
                                                   download of the files below when the hub is reachable)

The hub's cache (huggingface_hub's layout, under HF_HUB_CACHE, default ~/.cache/huggingface/hub):

    models--ORG--NAME/refs/main                 the commit hash a branch or tag names (one line, no newline)
    models--ORG--NAME/blobs/<hash>              each file's content once
    models--ORG--NAME/snapshots/<commit>/FILE   a symlink to ../../blobs/<hash>

so a snapshot's weights files resolve outside the snapshot folder: snapshot_blobs tells tquant.serialization's
folder check which blob folder belongs to a snapshot (the files' sha256 are checked against tquant.json as for any
folder). huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is first imported
(huggingface_hub.constants), not at each call: set them before the process imports it.
"""
from __future__ import annotations

import os

# what tquant.load, the tokenizer and tquant.export's copied side files read: weights, configs, tokenizer files
# (a repo's .bin / .gguf / .onnx copies of the same weights are not downloaded)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def checkpoint_folder(path_or_hub_id, revision: str | None = None) -> str:
    """The local folder of a checkpoint given as a folder or as a hub id (org/name, at `revision`: a branch, tag or
    commit hash; default main). A folder that exists wins over a hub id of the same name. ValueError naming the id,
    the revision and the cache, and saying how to download it, when the hub id cannot be resolved (not in the
    cache while offline, or not on the hub)."""
    name = os.fspath(path_or_hub_id)
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        if revision is not None:
            raise ValueError(f"revision={revision!r} selects a version of a hub id, but {name!r} is a local folder: "
                             "load the folder without revision=, or give the hub id")
        return folder
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    at = f" at revision {revision!r}" if revision is not None else ""
    try:  # offline, the cache alone: snapshot_download would still list a commit hash's files on the hub
        return snapshot_download(name, revision=revision, allow_patterns=HUB_FILES,
                                 local_files_only=constants.is_offline_mode())
    except HFValidationError:
        raise ValueError(f"no checkpoint folder at {name!r}, and it is not a hub id (org/name): give the folder "
                         "tquant.save, tquant.export or another library wrote, or a hub id") from None
    except LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub could not be reached"
        flag = f" --revision {revision}" if revision is not None else ""
        raise ValueError(
            f"{name!r} is not a local folder, and hub id {name!r}{at} is not in the hub cache {constants.HF_HUB_CACHE} "
            f"({why}; {err.__class__.__name__}): download it where the hub is reachable, into this cache "
            f"(HF_HUB_CACHE), with `hf download {name}{flag}` or huggingface_hub.snapshot_download({name!r}"
            f"{f', revision={revision!r}' if revision is not None else ''}), then load it by the same id; or copy "
            "its folder here and load the folder") from None
    except HfHubHTTPError as err:
        raise ValueError(f"{name!r} is not a local folder, and hub id {name!r}{at} could not be fetched from the hub: "
                         f"{err}") from None


def snapshot_blobs(folder: str) -> str | None:
    """The blob folder of the hub cache's snapshot `folder` (<cache>/models--ORG--NAME/snapshots/<commit> ->
    <cache>/models--ORG--NAME/blobs), where its files' symlinks point; None for a folder outside the hub's cache
    layout. Give it a resolved path (os.path.realpath)."""
    snapshots = os.path.dirname(folder)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith("models--"):
        return os.path.join(repo, "blobs")
    return None
