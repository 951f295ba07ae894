"""Untrusted checkpoints: a name that comes from a checkpoint (a shard in its index, a file of a Hub repository, an
entry of its folder) never makes the plugin read or write outside the named folders, and a malformed checkpoint is
an error naming the file, never a crash, a hang or a partial output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from quantizer_plugin import CheckpointPathError, ConversionError, LowBitConfig, convert_checkpoint
from quantizer_plugin.cli import main as cli_main

from conftest import tiny_llama_config
from test_convert import bnb_checkpoint, plain_llama
from test_push_to_hub import hub  # noqa: F401  (the stand-in Hub fixture)

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded_bnb(tmp_path_factory) -> Path:
    """A sharded bitsandbytes NF4 checkpoint (bitsandbytes itself wrote it)."""
    source = plain_llama(tmp_path_factory.mktemp("plain") / "llama")
    folder, _ = bnb_checkpoint(source, tmp_path_factory.mktemp("bnb") / "model", "nf4-dq", shard="100KB")
    assert (folder / INDEX).is_file()
    return folder


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def rename_shard(folder: Path, new_name: str) -> tuple[str, Path]:
    """Point every index entry of the first shard at `new_name` (resolved against `folder`) and move the shard
    there, as the attacker did. Returns the shard's old name and where the file now is."""
    index = json.loads((folder / INDEX).read_text())
    old = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {key: (new_name if shard == old else shard) for key, shard in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    target = Path(os.path.normpath(folder / new_name)) if not os.path.isabs(new_name) else Path(new_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    (folder / old).rename(target)
    return old, target


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*")} if path.exists() else set()


@pytest.mark.parametrize("attack", ["parent", "grandparent", "absolute"])
def test_a_shard_name_leading_outside_the_folder_is_refused_before_anything_is_written(sharded_bnb, tmp_path, attack):
    work = tmp_path / "a" / "b"
    src = copy_folder(sharded_bnb, work / "model")
    evil = "evil-model-00001-of-00003.safetensors"
    name = {"parent": f"../{evil}", "grandparent": f"../../{evil}", "absolute": str(tmp_path / "elsewhere" / evil)}[attack]
    rename_shard(src, name)
    out_parent = tmp_path / "output-parent"
    out_parent.mkdir()
    before = files_under(tmp_path)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(src, out_parent / "out")
    message = str(error.value)
    assert INDEX in message and "weight_map[" in message and repr(name) in message
    assert files_under(tmp_path) == before  # nothing written anywhere, the output folder included
    with pytest.raises(SystemExit, match="weight_map"):
        cli_main(["convert", str(src), str(out_parent / "cli-out")])
    assert files_under(tmp_path) == before


def test_a_shard_that_is_a_symbolic_link_out_of_the_folder_is_refused(sharded_bnb, tmp_path):
    src = copy_folder(sharded_bnb, tmp_path / "model")
    shard = sorted(p for p in src.glob("*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(ConversionError, match=f"leads outside {src}"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_entry_of_the_folder_linking_outside_is_not_copied_into_the_output(sharded_bnb, tmp_path):
    src = copy_folder(sharded_bnb, tmp_path / "model")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the checkpoint")
    (src / "notes" / "secret.txt").symlink_to(secret)  # one level down, inside a copied folder
    with pytest.raises(ConversionError, match="entry 'notes'"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (src / "notes" / "secret.txt").unlink()
    (src / "inside-link.txt").symlink_to(src / "tokenizer_config.json")  # a link that stays inside is fine
    assert (convert_checkpoint(src, tmp_path / "out") / "inside-link.txt").read_text() == '{"model_max_length": 64}'


def test_a_hub_file_list_with_dot_dot_is_refused_before_any_download(hub, sharded_bnb, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tester/evil")
    api.upload_folder(repo_id="tester/evil", folder_path=str(sharded_bnb))
    sha, files = hub.repos["tester/evil"].commits[-1]
    hub.repos["tester/evil"].commits[-1] = (sha, {**files, "../../evil.txt": b"written outside the cache"})
    with pytest.raises(ConversionError, match=r"Hub repository tester/evil: file list: '\.\./\.\./evil\.txt'"):
        convert_checkpoint("tester/evil", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("attack", ["dot-dot", "symbolic-link"])
@pytest.mark.parametrize("prequantized", [False, True], ids=["quantize", "prequantized"])
def test_from_pretrained_refuses_a_shard_outside_the_folder_before_loading(tmp_path, capsys, prequantized, attack):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=320)).to(torch.bfloat16)
    if prequantized:
        model.save_pretrained(tmp_path / "plain")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=LowBitConfig())
    src = tmp_path / "x" / "model"
    model.save_pretrained(src, max_shard_size="100KB")
    if attack == "dot-dot":  # transformers >= 5.25 refuses this one itself; we do on older releases
        rename_shard(src, "../evil-model-00001.safetensors")
    else:
        shard = sorted(src.glob("*.safetensors"))[0]
        shard.rename(tmp_path / "x" / "outside.safetensors")
        shard.symlink_to(tmp_path / "x" / "outside.safetensors")
    config = {} if prequantized else {"quantization_config": LowBitConfig(weights="int4")}
    with pytest.raises(ValueError, match="outside"):
        AutoModelForCausalLM.from_pretrained(src, **config)
    if not prequantized:  # the CLI's quantize reports it by name, and writes nothing
        assert cli_main(["quantize", str(src), str(tmp_path / "out"), "--no-fidelity"]) == 2
        assert "outside" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_the_load_check_names_the_file_leading_outside(tmp_path):
    from quantizer_plugin.checkpoints.paths import check_checkpoint_files

    (tmp_path / "model").mkdir()
    with pytest.raises(CheckpointPathError, match=r"checkpoint file .*/model/\.\./x\.safetensors leads outside"):
        check_checkpoint_files([str(tmp_path / "model" / ".." / "x.safetensors")], str(tmp_path / "model"))
    with pytest.raises(CheckpointPathError, match="leads outside"):
        check_checkpoint_files(["/etc/hostname"], str(tmp_path / "model"))
    check_checkpoint_files([str(tmp_path / "model" / "a.safetensors")], str(tmp_path / "model"))  # fine


def test_an_ordinary_hub_snapshot_with_its_blob_links_still_converts(hub, sharded_bnb, tmp_path):
    # the Hub cache links every snapshot file to ../../blobs: inside the repository's cache folder, so allowed
    from huggingface_hub import HfApi

    HfApi().create_repo("tester/fine")
    HfApi().upload_folder(repo_id="tester/fine", folder_path=str(sharded_bnb))
    out = convert_checkpoint("tester/fine", tmp_path / "out")
    assert (out / INDEX).is_file()
