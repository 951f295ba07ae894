"""The model card section that says a pushed checkpoint is quantized, and how to load it.

transformers writes README.md (the Hub's model card: its own template, or the card already on the Hub) into the
folder it is about to upload, then calls the model's `_upload_modified_files(folder, repo_id, ...)`; every push
path goes through that call: `push_to_hub`, `save_pretrained(push_to_hub=True)` and the distributed save. It
has no hook for a quantizer to add to the card, so a model loaded with our quantizer gets an
`_upload_modified_files` of its own that first adds our section to that README.md, built from the config.json
beside it (the checkpoint being uploaded), then uploads as transformers does. A plain `save_pretrained` writes no
model card in transformers, and none here either. The section sits between two HTML comments, so pushing again
replaces it instead of adding a second one.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard
from torch import nn

from .calibration import METADATA_KEY
from .checkpoints.headers import read_metadata
from .config import QUANT_METHOD, LowBitConfig
from .formats import get_format
from .integrations.transformers import run_before_upload, stop_running_before_upload
from .modules import LowBitLinear

SECTION_START = "<!-- quantizer_plugin: quantization -->"
SECTION_END = "<!-- /quantizer_plugin: quantization -->"


def card_tags(config: LowBitConfig) -> list[str]:
    return ["quantizer_plugin", QUANT_METHOD, config.weights, f"{get_format(config.weights).bits}-bit"]


def bits_per_weight(model: nn.Module) -> float | None:
    """Stored bits (codes and their scales) per weight over the model's quantized layers."""
    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    stored = sum(t.nbytes for layer in layers for t in layer.quantized_tensors().values())
    return 8 * stored / weights if weights else None


def calibration_record(folder: str | Path) -> dict | None:
    """The calibrated method's record (method="gptq": the method, its data and settings) from the safetensors
    metadata of the checkpoint in `folder`, or None for a data-free checkpoint."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        record = read_metadata(path).get(METADATA_KEY)
        if record is not None:
            return json.loads(record)
    return None


def calibration_paragraph(record: dict) -> str:
    rows = "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in record.items())
    return f"""
The weights were fitted by **{record.get("method", "a calibrated method")}** on calibration data, as recorded in
every shard's safetensors metadata under `{METADATA_KEY}` (reloading needs none of it):

| calibration | value |
|---|---|
{rows}
"""


def quantization_section(config: dict, repo_id: str, architecture: str | None, bits: float | None,
                         calibration: dict | None = None) -> str:  # fmt: skip
    """Markdown for a checkpoint whose config.json holds `config` (a lowbit quantization_config dict) and, for a
    calibrated one, whose metadata records `calibration`."""
    from . import __version__

    quantization = LowBitConfig.from_dict(config)  # also refuses a config this version cannot load
    fmt = get_format(quantization.weights)
    settings = {key: value for key, value in quantization.to_dict().items() if value is not None}
    measured = f", {bits:.2f} bits per weight with their scales" if bits is not None else ""
    model_class = architecture or "AutoModel"
    rows = "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in settings.items())
    return f"""{SECTION_START}
## Quantization

The linear layers of this checkpoint are stored as **{quantization.weights}** ({fmt.bits}-bit{measured}), written by
quantizer_plugin {__version__} (quant_method `"{QUANT_METHOD}"`). Its settings, as saved in `config.json` under
`quantization_config`:

| setting | value |
|---|---|
{rows}
{calibration_paragraph(calibration) if calibration else ""}
## How to load

Install quantizer_plugin, import it (the import registers the `"{QUANT_METHOD}"` quantization method with
transformers), then load as usual; the quantization settings come from `config.json`, and bitsandbytes is not
needed:

```python
import quantizer_plugin  # noqa: F401
from transformers import {model_class}

model = {model_class}.from_pretrained("{repo_id}")
```
{SECTION_END}"""


def add_section(card_text: str, section: str) -> str:
    """The card with `section` after its title (replacing an earlier one of ours); front matter kept."""
    card = ModelCard(card_text, ignore_metadata_errors=True)
    body = card.text
    if SECTION_START in body and SECTION_END in body:
        before, _, rest = body.partition(SECTION_START)
        body = before + section + rest.partition(SECTION_END)[2]
    else:
        lines = body.splitlines(keepends=True)
        title = next((i for i, line in enumerate(lines) if line.startswith("# ")), -1)
        body = "".join(lines[: title + 1]) + f"\n{section}\n\n" + "".join(lines[title + 1 :])
    card.text = body
    return str(card)


def write_section(model: nn.Module, folder: str, repo_id: str) -> bool:
    """Add our section to `folder`/README.md if the checkpoint in `folder` is ours; returns whether it did."""
    readme, config_file = Path(folder) / "README.md", Path(folder) / "config.json"
    if not readme.is_file() or not config_file.is_file():
        return False
    saved = json.loads(config_file.read_text())
    quantization = saved.get("quantization_config") or {}
    if quantization.get("quant_method") != QUANT_METHOD:
        return False
    architecture = (saved.get("architectures") or [None])[0]
    section = quantization_section(quantization, repo_id, architecture, bits_per_weight(model), calibration_record(folder))
    readme.write_text(add_section(readme.read_text(encoding="utf-8"), section), encoding="utf-8")
    return True


def attach_model_card(model: nn.Module, config: LowBitConfig) -> None:
    """Make `model`'s pushes carry our card section and tags (transformers puts `model_tags` in the card)."""
    model.model_tags = list(dict.fromkeys([*(model.model_tags or []), *card_tags(config)]))  # the model's own list
    run_before_upload(model, write_section)


def detach_model_card(model: nn.Module, config: LowBitConfig) -> None:
    """Undo attach_model_card (the model is no longer quantized)."""
    stop_running_before_upload(model)
    if model.model_tags:
        model.model_tags = [tag for tag in model.model_tags if tag not in card_tags(config)]
