"""tquant.load / tquant.from_pretrained / tquant.export by hub id (tquant.interop.hub), offline, with the real
huggingface_hub: each checkpoint kind tquant.load reads is put in a hub cache folder of the hub's layout
(models--ORG--NAME/blobs, snapshots/<commit>/FILE -> ../../blobs/<hash>, refs/main) and loaded by its id, with the
logits of the load of the same folder by path.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, when huggingface_hub.constants is imported (transformers
reads them through that module at each call): in this process the `hub` fixture sets the two constants; one test
runs a fresh interpreter with the environment variables set before any import, as a user does."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tquant
from tests.interop import test_awq, test_gptq
from tests.interop.helpers import logits, quantized

huggingface_hub = pytest.importorskip("huggingface_hub")
pytest.importorskip("compressed_tensors")
from huggingface_hub import constants  # noqa: E402
from huggingface_hub.file_download import repo_folder_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LLMC = ROOT / "tests" / "fixtures" / "llmcompressor" / "w4a16_asym_g32"  # written by llm-compressor's oneshot
MAIN, OLD = "a" * 40, "b" * 40  # the commits refs/main and an older snapshot stand for


def tquant_checkpoint(path):
    tquant.save(quantized("rtn", bits=4, group_size=32, sym=False), path)


def ct_checkpoint(path):
    import shutil

    shutil.copytree(LLMC, path)


def gptq_checkpoint(path):
    test_gptq._fixture(path, desc_act=True)


def awq_checkpoint(path):
    test_awq._fixture(path)


KINDS = {"tquant": tquant_checkpoint, "compressed-tensors": ct_checkpoint, "gptq": gptq_checkpoint,
         "awq": awq_checkpoint}


def to_hub_cache(folder: Path, cache: Path, repo_id: str, commit: str, ref: str | None = "main") -> Path:
    """Put checkpoint `folder`'s files into `cache` as the hub's cache holds repo_id at `commit` (each file a blob
    named by its sha256, the snapshot's file a relative symlink to it, refs/<ref> the commit); returns the
    snapshot folder."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """{kind: local folder} of one checkpoint per kind, each also in a hub cache as tquant-test/tiny-<kind> at
    MAIN; the cache in force (constants set as at import, offline) while the module's tests run."""
    root = tmp_path_factory.mktemp("hub")
    cache, folders = root / "cache", {}
    for kind, write in KINDS.items():
        folders[kind] = root / kind
        write(str(folders[kind]))
        to_hub_cache(folders[kind], cache, f"tquant-test/tiny-{kind}", MAIN)
    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache), True
    yield cache, folders
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_hub_id_loads_what_its_folder_loads(hub, kind):
    cache, folders = hub
    by_path = tquant.load(str(folders[kind]))
    by_id = tquant.load(f"tquant-test/tiny-{kind}")
    assert by_id.config.quantization_config == by_path.config.quantization_config
    assert torch.equal(logits(by_id), logits(by_path))


def test_from_pretrained_is_load_and_takes_a_revision(hub, tmp_path):
    cache, folders = hub
    older = tmp_path / "older"
    tquant.save(quantized("rtn", bits=8, group_size=-1), str(older))
    to_hub_cache(older, cache, "tquant-test/tiny-tquant", OLD, ref="v0.1")
    assert tquant.from_pretrained is tquant.load
    for revision in (OLD, "v0.1"):  # a commit hash, and a tag through refs/v0.1
        got = tquant.from_pretrained("tquant-test/tiny-tquant", revision=revision)
        assert got.config.quantization_config["bits"] == 8
        assert torch.equal(logits(got), logits(tquant.load(str(older))))
    main = tquant.from_pretrained("tquant-test/tiny-tquant", revision="main")
    assert main.config.quantization_config["bits"] == 4


def test_an_id_not_in_the_cache_names_it_and_how_to_download(hub):
    with pytest.raises(ValueError, match=r"hub id 'tquant-test/absent' is not in the hub cache .*HF_HUB_OFFLINE is "
                                         r"set.*`hf download tquant-test/absent`"):
        tquant.load("tquant-test/absent")
    with pytest.raises(ValueError, match=r"hub id 'tquant-test/tiny-gptq' at revision 'v9' is not in the hub cache"
                                         r".*`hf download tquant-test/tiny-gptq --revision v9`"):
        tquant.load("tquant-test/tiny-gptq", revision="v9")
    with pytest.raises(ValueError, match=r"no checkpoint folder at './missing', and it is not a hub id"):
        tquant.load("./missing")


def test_a_revision_with_a_local_folder_is_refused(hub):
    _, folders = hub
    with pytest.raises(ValueError, match=r"revision='main' selects a version of a hub id, but .* is a local folder"):
        tquant.load(str(folders["tquant"]), revision="main")


def test_a_snapshot_file_linking_outside_its_repo_is_refused(hub, tmp_path):
    """The hub layout's exception is the repo's own blobs: a snapshot whose weights link into another repo's blobs
    (the same bytes, so the sha256 matches) is refused as any symlink out of a checkpoint folder."""
    cache, folders = hub
    snapshot = to_hub_cache(folders["tquant"], tmp_path, "tquant-test/borrowed", MAIN)
    elsewhere = (cache / repo_folder_name(repo_id="tquant-test/tiny-tquant", repo_type="model") / "snapshots" / MAIN /
                 "model.safetensors").resolve()
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(ValueError, match=r"outside the checkpoint folder .* or its hub cache blobs .*borrowed.*blobs"):
        tquant.load(str(snapshot))


def test_export_and_the_cli_take_a_hub_id(hub, tmp_path):
    from tquant.cli import main

    _, folders = hub
    tquant.export(str(folders["tquant"]), str(tmp_path / "by-path"), format="gptq")
    tquant.export("tquant-test/tiny-tquant", str(tmp_path / "by-id"), format="gptq")
    main(["export", "tquant-test/tiny-tquant", str(tmp_path / "cli"), "--format", "gptq"])
    expected = sorted(os.listdir(tmp_path / "by-path"))
    assert "generation_config.json" in expected  # copied from the source folder: the snapshot for a hub id
    for out in ("by-id", "cli"):
        assert sorted(os.listdir(tmp_path / out)) == expected
        for name in expected:
            got, want = tmp_path / out / name, tmp_path / "by-path" / name
            if name.endswith(".safetensors"):  # the same tensors (the header's metadata order may differ)
                got, want = load_file(got), load_file(want)
                assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), out
            elif name == "config.json":  # _name_or_path: the folder read, the snapshot's for a hub id
                assert dict(json.loads(got.read_text()), _name_or_path=None) == \
                    dict(json.loads(want.read_text()), _name_or_path=None), out
            else:
                assert got.read_bytes() == want.read_bytes(), (out, name)


def test_a_fresh_process_reads_the_environment(hub, tmp_path):
    """HF_HUB_CACHE and HF_HUB_OFFLINE=1 set before the interpreter starts, as a user sets them: tquant.load and
    transformers' from_pretrained (tquant's HfQuantizer) of the hub ids give the logits of the loads by path."""
    cache, folders = hub
    code = ("import sys, torch, transformers, tquant\n"
            "from tests.interop.helpers import logits\n"
            "out = {k: logits(tquant.load(f'tquant-test/tiny-{k}')) for k in ('tquant', 'compressed-tensors')}\n"
            "out['hf'] = logits(transformers.AutoModelForCausalLM.from_pretrained('tquant-test/tiny-tquant'))\n"
            "torch.save(out, sys.argv[1])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "logits.pt")], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    got = torch.load(tmp_path / "logits.pt")
    assert torch.equal(got["tquant"], logits(tquant.load(str(folders["tquant"]))))
    assert torch.equal(got["hf"], got["tquant"])
    assert torch.equal(got["compressed-tensors"], logits(tquant.load(str(folders["compressed-tensors"]))))
