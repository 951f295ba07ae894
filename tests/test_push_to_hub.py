"""push_to_hub uploads a quantized checkpoint, with its model card, that from_pretrained(repo) reloads bit for bit.

Real: huggingface_hub's upload and download client, transformers' push and load code, our serialization and card.
Stood in: the Hub server (tests/fake_hub.py, an in-memory HTTP server on 127.0.0.1; its docstring says what it
implements). huggingface_hub reads its endpoint and cache paths into module constants at import, long before a
test runs, so the fixture sets the environment for anything read later and patches those constants too.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from transformers import AutoModelForCausalLM
from transformers.utils import hub as transformers_hub

from quantizer_plugin import LowBitConfig
from quantizer_plugin.model_card import SECTION_START

from fake_hub import FakeHub
from helpers import load_quantized, lowbit_modules


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub as the endpoint, a fake token, and every Hugging Face cache path under tmp_path."""
    home = tmp_path / "hf-home"
    with FakeHub() as fake:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
        url_template = fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url_template)
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        # Every path derived from HF_HOME at import (hub cache, token, xet cache, ...).
        for name, value in list(vars(constants).items()):
            if isinstance(value, str) and value.startswith(constants.HF_HOME) and name != "HF_HOME":
                monkeypatch.setattr(constants, name, str(home) + value[len(constants.HF_HOME) :])
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        # transformers keeps one HfApi, built with the endpoint of its day.
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
        yield fake
    assert not fake.unhandled, f"the client asked the fake Hub for routes it does not implement: {fake.unhandled}"


def card_sections(readme: str) -> int:
    return readme.count(SECTION_START)


def loading_snippet(readme: str) -> str:
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


@pytest.mark.parametrize("config", [dict(weights="nf4"), dict(weights="int8")], ids=["nf4", "int8"])
def test_push_to_hub_then_from_pretrained_reloads_bit_exact_with_a_card(hub, llama_dir, token_ids, tmp_path, config):
    model = load_quantized(llama_dir, **config)
    repo = f"tester/tiny-{config['weights']}"
    commit = model.push_to_hub(repo)

    files = hub.files(repo)
    assert commit.oid == hub.repos[repo].commits[-1][0]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    saved_config = json.loads(files["config.json"])
    assert saved_config["quantization_config"] == model.config.quantization_config.to_dict()

    readme = files["README.md"].decode()
    card = ModelCard(readme)
    bits = "4-bit" if config["weights"] == "nf4" else "8-bit"
    assert {"quantizer_plugin", "lowbit", config["weights"], bits} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert card_sections(readme) == 1 and f"**{config['weights']}** ({bits}" in readme
    assert "import quantizer_plugin" in loading_snippet(readme) and f'from_pretrained("{repo}")' in readme

    again = AutoModelForCausalLM.from_pretrained(repo)
    assert (tmp_path / "hf-home" / "hub" / f"models--tester--tiny-{config['weights']}").is_dir()
    assert set(lowbit_modules(again)) == set(lowbit_modules(model))
    expected, reloaded = model.state_dict(), again.state_dict()
    assert list(expected) == list(reloaded)
    for name in expected:
        assert expected[name].dtype == reloaded[name].dtype and torch.equal(expected[name], reloaded[name]), name
    with torch.no_grad():
        assert torch.equal(again(token_ids).logits, model(token_ids).logits)

    # The card's own loading instructions work as written.
    namespace = {}
    exec(loading_snippet(readme), namespace)
    with torch.no_grad():
        assert torch.equal(namespace["model"](token_ids).logits, model(token_ids).logits)


def test_save_pretrained_with_push_to_hub_writes_and_uploads_the_same_card(hub, llama_dir, tmp_path, token_ids):
    model = load_quantized(llama_dir, weights="fp4", double_quant=False)
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "README.md").exists()  # as in transformers: a local save writes no card

    folder = tmp_path / "tiny-fp4"
    model.save_pretrained(folder, push_to_hub=True, repo_id="tester/tiny-fp4")
    local_card = (folder / "README.md").read_text()
    assert card_sections(local_card) == 1 and "**fp4** (4-bit" in local_card
    assert hub.files("tester/tiny-fp4")["README.md"].decode() == local_card
    again = AutoModelForCausalLM.from_pretrained("tester/tiny-fp4")
    with torch.no_grad():
        assert torch.equal(again(token_ids).logits, model(token_ids).logits)


def test_a_gptq_checkpoint_s_card_records_its_calibration(hub, llama_dir):
    config = LowBitConfig(weights="int4", method="gptq", dataset=torch.arange(4000) % 320, calibration_samples=8,
                          calibration_length=32, compute_dtype="float32")  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config)
    model.push_to_hub("tester/tiny-gptq")
    readme = hub.files("tester/tiny-gptq")["README.md"].decode()
    assert card_sections(readme) == 1 and "**int4** (4-bit" in readme
    calibration = dict(re.findall(r"^\| `(\w+)` \| `(.*)` \|$", readme.split("| calibration | value |")[1], re.M))
    assert calibration | {"seconds": "0"} == {"method": '"gptq"', "dataset": '"Tensor"', "samples": "8", "length": "32",
                                            "damp": "0.01", "act_order": "true", "blocks": "2", "layers": "14",
                                            "seconds": "0"}  # fmt: skip
    assert "**gptq**" in readme and "dataset" not in readme.split("| setting | value |")[1].split("| calibration")[0]


def test_pushing_again_replaces_the_section_and_keeps_the_owners_edits(hub, llama_dir, token_ids):
    repo = "tester/tiny-nf4"
    load_quantized(llama_dir, weights="nf4", block_size=128).push_to_hub(repo)
    edited = hub.files(repo)["README.md"].decode() + "\n## Evaluation by the owner\n\nWritten on the Hub.\n"
    HfApi().upload_file(path_or_fileobj=edited.encode(), path_in_repo="README.md", repo_id=repo)

    # The reloaded (pre-quantized) model pushes a new revision: transformers starts from the card on the Hub.
    reloaded = AutoModelForCausalLM.from_pretrained(repo)
    reloaded.push_to_hub(repo, commit_message="second push")
    readme = hub.files(repo)["README.md"].decode()
    assert len(hub.repos[repo].commits) == 4  # creation, first push, the owner's edit, second push
    assert card_sections(readme) == 1 and "Written on the Hub." in readme
    assert '| `block_size` | `128` |' in readme
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(repo)(token_ids).logits, reloaded(token_ids).logits)


def test_a_dequantized_model_is_pushed_without_the_quantization_card(hub, llama_dir):
    plain = load_quantized(llama_dir, weights="int8").dequantize()
    plain.push_to_hub("tester/tiny-dequantized")
    files = hub.files("tester/tiny-dequantized")
    assert "quantization_config" not in json.loads(files["config.json"])
    card = ModelCard(files["README.md"].decode())
    assert card_sections(card.content) == 0 and "quantizer_plugin" not in (card.data.tags or [])
