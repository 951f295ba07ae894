"""device_map offloading (CPU, disk, and GPU when there is one) keeps quantized layers packed, end to end.

On this CPU-only CI the execution device is the CPU: "cpu" entries stay in place and "disk" entries go to the
offload folder, from which accelerate's hooks bring each layer's tensors in when it runs and drop them after.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from quantizer_plugin import LowBitConfig, ops
from quantizer_plugin.checkpoints.headers import SAFETENSORS_DTYPES

from conftest import tiny_llama_config
from helpers import lowbit_modules, read_safetensors

FORMATS = {
    "nf4": dict(weights="nf4"), "fp4": dict(weights="fp4", double_quant=False), "int8": dict(weights="int8"),
    "int8-weight-only": dict(weights="int8", activations=None), "int4": dict(weights="int4"), "int2": dict(weights="int2"),
    "fp8": dict(weights="fp8"),
}  # fmt: skip
# Packed bytes on disk over the 16-bit bytes of the same weights (safetensors headers included).
BYTE_RATIO = {
    "nf4": (0.25, 0.27), "fp4": (0.25, 0.29), "int8": (0.5, 0.52), "int8-weight-only": (0.5, 0.52),
    "int4": (0.28, 0.30), "int2": (0.15, 0.17), "fp8": (0.5, 0.53),
}  # fmt: skip
N_LAYERS = 4


def split_map(placement: dict[int, str | int]) -> dict[str, str | int]:
    """A device map with decoder layer i on placement[i]; the rest on the execution device."""
    main = 0 if any(device == 0 for device in placement.values()) else "cpu"
    device_map = {"model.embed_tokens": main, "model.norm": main, "model.rotary_emb": main, "lm_head": main}
    device_map.update({f"model.layers.{i}": device for i, device in placement.items()})
    return device_map


CPU_DISK = split_map({0: "cpu", 1: "disk", 2: "cpu", 3: "disk"})
PLACEMENTS = {"cpu+disk": CPU_DISK}
if torch.cuda.is_available():
    PLACEMENTS["cuda+cpu+disk"] = split_map({0: 0, 1: "cpu", 2: "disk", 3: 0})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small bf16 Llama, big enough that safetensors headers are a small part of the offloaded bytes."""
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=256, intermediate_size=512, num_hidden_layers=N_LAYERS)
    path = tmp_path_factory.mktemp("offload") / "model"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(7))


def load(path, config=None, **kwargs):
    if config is not None:  # else a pre-quantized checkpoint: its config.json says how
        kwargs["quantization_config"] = LowBitConfig(**config)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def logits(model, prompt_ids, device="cpu"):
    with torch.no_grad():
        return model(prompt_ids.to(device)).logits.cpu()


def offloaded_layers(device_map) -> list[str]:
    return [name for name, device in device_map.items() if device == "disk"]


def record_stored_tensors_at_run_time(monkeypatch, model, module_name: str) -> list[tuple[str, torch.dtype, str]]:
    """What a quantized layer holds while it runs: (name, dtype, device type) of each stored tensor.

    Recorded inside the matmul: accelerate's hook brings offloaded tensors in around the layer's forward.
    """
    layer, seen, run = model.get_submodule(module_name), [], ops.lowbit_linear

    def recording(x, module):
        if module is layer:
            seen.extend((n, t.dtype, t.device.type) for n, t in module.quantized_tensors().items())
        return run(x, module)

    monkeypatch.setattr(ops, "lowbit_linear", recording)
    return seen


def files_under(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_while_loading_offloads_packed_layers_to_disk(model_dir, prompt_ids, tmp_path, monkeypatch, fmt):
    reference = load(model_dir, FORMATS[fmt], device_map="cpu")
    offload = tmp_path / "offload"
    model = load(model_dir, FORMATS[fmt], device_map=CPU_DISK, offload_folder=offload)
    assert model.hf_device_map == CPU_DISK
    assert reference.hf_quantizer.is_compileable and not model.hf_quantizer.is_compileable  # offloaded: not compiled

    disk_layers = offloaded_layers(CPU_DISK)
    prefixes = tuple(f"{layer}." for layer in disk_layers)
    disk_modules = {n: m for n, m in lowbit_modules(model).items() if n.startswith(prefixes)}
    assert len(disk_modules) == 7 * len(disk_layers)
    assert all(t.is_meta for m in disk_modules.values() for t in m.quantized_tensors().values())

    # The offload folder holds exactly the stored tensors of the offloaded quantized layers, packed as the format
    # says and equal to the single-device load's; their norms and every other 16-bit tensor are read from the
    # checkpoint itself, so nothing 16-bit is written.
    written = read_safetensors_tree(offload)
    expected = {f"{n}.{t}": spec for n, m in disk_modules.items() for t, spec in m.tensor_specs().items()}
    assert set(written) == set(expected)
    reference_state = reference.state_dict()
    for key, tensor in written.items():
        assert (tuple(tensor.shape), tensor.dtype) == (expected[key].shape, expected[key].dtype), key
        assert torch.equal(tensor, reference_state[key]), key

    source = read_safetensors(model_dir)
    bf16_bytes = sum(source[f"{name}.weight"].nbytes for name in disk_modules)
    ratio = sum(files_under(offload).values()) / bf16_bytes
    low, high = BYTE_RATIO[fmt]
    assert low <= ratio <= high, ratio

    seen = record_stored_tensors_at_run_time(monkeypatch, model, "model.layers.3.mlp.down_proj")
    assert torch.equal(logits(model, prompt_ids), logits(reference, prompt_ids))
    specs = model.model.layers[3].mlp.down_proj.tensor_specs()
    assert seen == [(name, spec.dtype, "cpu") for name, spec in specs.items()]  # packed bytes, moved in to run
    assert model.model.layers[3].mlp.down_proj.weight.is_meta  # and dropped again afterwards


def read_safetensors_tree(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                assert key not in tensors, f"{key} written twice"
                tensors[key] = handle.get_tensor(key)
    return tensors


def test_auto_device_map_with_max_memory_spills_packed_layers_to_disk(model_dir, prompt_ids, tmp_path):
    reference = load(model_dir, FORMATS["nf4"], device_map="cpu")
    layer_bytes = sum(t.nbytes for t in reference.model.layers[0].state_dict().values())
    embedding_bytes = reference.model.embed_tokens.weight.nbytes
    # Room for the embedding and about two decoder layers, beside the one layer accelerate keeps free for
    # bringing an offloaded layer in: the rest has to go to disk.
    budget = embedding_bytes + int(3.5 * layer_bytes)
    offload = tmp_path / "offload"
    model = load(model_dir, FORMATS["nf4"], device_map="auto", max_memory={"cpu": budget}, offload_folder=offload)

    placed = model.hf_device_map
    layer_devices = {placed.get(f"model.layers.{i}", placed.get("model.layers")) for i in range(N_LAYERS)}
    assert layer_devices == {"cpu", "disk"}, placed
    written = read_safetensors_tree(offload)
    assert written and all(key.split(".")[-1].startswith("weight") for key in written)
    assert {SAFETENSORS_DTYPES[t.dtype] for t in written.values()} <= {"U8", "F32"}
    assert torch.equal(logits(model, prompt_ids), logits(reference, prompt_ids))


@pytest.fixture(scope="module")
def saved_quantized(model_dir, tmp_path_factory):
    """Each format quantized once on the CPU and saved: the pre-quantized checkpoints."""
    folders = {}
    for fmt, config in FORMATS.items():
        folders[fmt] = tmp_path_factory.mktemp(f"saved-{fmt}")
        load(model_dir, config, device_map="cpu").save_pretrained(folders[fmt])
    return folders


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_prequantized_checkpoint_loads_with_an_offloading_device_map(
    saved_quantized, prompt_ids, tmp_path, monkeypatch, fmt, placement
):
    device_map = PLACEMENTS[placement]
    execution = "cuda" if placement.startswith("cuda") else "cpu"
    reference = load(saved_quantized[fmt], device_map={"": 0 if execution == "cuda" else "cpu"})
    offload = tmp_path / "offload"
    model = load(saved_quantized[fmt], device_map=device_map, offload_folder=offload)
    assert model.hf_device_map == device_map

    # The checkpoint already holds the packed tensors: offloaded layers read them from it, nothing is rewritten.
    assert files_under(offload) == {}
    offloaded = [n for n, d in device_map.items() if d == "disk" or (d == "cpu" and execution == "cuda")]
    seen = record_stored_tensors_at_run_time(monkeypatch, model, f"{offloaded[-1]}.self_attn.o_proj")
    assert torch.equal(logits(model, prompt_ids, execution), logits(reference, prompt_ids, execution))
    specs = model.get_submodule(f"{offloaded[-1]}.self_attn.o_proj").tensor_specs()
    assert seen == [(name, spec.dtype, execution) for name, spec in specs.items()]


def test_a_device_map_naming_a_missing_module_is_refused_before_anything_is_written(model_dir, tmp_path):
    device_map = dict(CPU_DISK)
    device_map["model.layer.3"] = device_map.pop("model.layers.3")  # misspelt
    offload = tmp_path / "offload"
    with pytest.raises(ValueError, match=r"device_map entries \['model.layer.3'\] name no module"):
        load(model_dir, FORMATS["nf4"], device_map=device_map, offload_folder=offload)
    assert not offload.exists()

    # An extra entry alone is only warned about by accelerate, and would otherwise load silently.
    with pytest.raises(ValueError, match=r"\['model.layers.9'\]"):
        load(model_dir, FORMATS["int8"], device_map=CPU_DISK | {"model.layers.9": "disk"}, offload_folder=offload)
    assert not offload.exists()


@pytest.mark.parametrize("where", ["an existing file", "under a file"])
def test_an_offload_folder_that_cannot_be_written_fails_naming_it(model_dir, tmp_path, where):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("keep me")
    offload = blocker if where == "an existing file" else blocker / "offload"
    with pytest.raises(OSError) as error:
        load(model_dir, FORMATS["nf4"], device_map=CPU_DISK, offload_folder=offload)
    assert str(offload) in str(error.value)
    assert files_under(tmp_path) == {"not-a-folder": len("keep me")} and blocker.read_text() == "keep me"


def test_a_repack_that_fails_partway_leaves_the_offload_folder_as_before_it(model_dir, tmp_path, monkeypatch):
    """Repacking is all or nothing: a failure after some modules were repacked (a full disk, say) leaves exactly
    the files a failure before the first one leaves (transformers' own), and no temporary file."""
    from quantizer_plugin import offload

    repack = offload._repacked_tensors

    def failing_after(count: int):
        done = []

        def repack_or_fail(name, *args):
            if len(done) == count:
                raise OSError(f"no space left while repacking '{name}'")
            packed = repack(name, *args)
            done.extend([name] if packed else [])
            return packed

        return repack_or_fail

    listings = {}
    for count in (0, 3):
        monkeypatch.setattr(offload, "_repacked_tensors", failing_after(count))
        folder = tmp_path / f"offload-{count}"
        with pytest.raises(OSError, match="no space left while repacking 'model.layers"):
            load(model_dir, FORMATS["nf4"], device_map=CPU_DISK, offload_folder=folder)
        listings[count] = files_under(folder)
    assert listings[3] == listings[0]
    assert not any(name.endswith(".partial") or name.endswith(".weight.safetensors") for name in listings[3])


def test_disk_offload_without_an_offload_folder_is_refused(model_dir):
    with pytest.raises(ValueError, match="offload_folder"):
        load(model_dir, FORMATS["nf4"], device_map=CPU_DISK)



@pytest.mark.parametrize("source", ["quantized-on-load", "pre-quantized"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_keeps_offloaded_layers_offloaded_and_equal(
    model_dir, saved_quantized, prompt_ids, tmp_path, fmt, source
):
    config = FORMATS[fmt] if source == "quantized-on-load" else None
    path = model_dir if config else saved_quantized[fmt]
    reference = load(path, config, device_map="cpu").dequantize()
    offload = tmp_path / "offload"
    model = load(path, config, device_map=CPU_DISK, offload_folder=offload).dequantize()

    assert not lowbit_modules(model)
    down_proj = model.model.layers[3].mlp.down_proj
    assert type(down_proj) is torch.nn.Linear and down_proj.weight.is_meta  # still offloaded, read on demand
    # on disk now: each offloaded layer's dequantized weight, in the compute dtype; no packed tensor is left
    written = read_safetensors_tree(offload)
    disk_weights = {f"{n}.weight" for n, m in reference.named_modules() if n.startswith(("model.layers.1.",
                    "model.layers.3.")) and type(m) is torch.nn.Linear}  # fmt: skip
    assert set(written) == disk_weights and {t.dtype for t in written.values()} == {torch.bfloat16}
    out = logits(model, prompt_ids)
    assert torch.isfinite(out).all() and torch.equal(out, logits(reference, prompt_ids))

    model.save_pretrained(tmp_path / "plain")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert "quantization_config" not in again.config.to_dict()
    assert torch.equal(logits(again, prompt_ids), logits(reference, prompt_ids))


def test_a_dequantize_that_fails_partway_changes_nothing(model_dir, prompt_ids, tmp_path, monkeypatch):
    from quantizer_plugin import offload as offload_module

    offload = tmp_path / "offload"
    model = load(model_dir, FORMATS["nf4"], device_map=CPU_DISK, offload_folder=offload)
    before_files, before_logits = files_under(offload), logits(model, prompt_ids)
    save, calls = offload_module.save_file, []

    def save_until_full(tensors, path):
        calls.append(path)
        if len(calls) == 4:
            raise OSError("no space left on device")
        save(tensors, path)

    monkeypatch.setattr(offload_module, "save_file", save_until_full)
    with pytest.raises(OSError, match="no space left"):
        model.dequantize()
    assert files_under(offload) == before_files
    assert len(lowbit_modules(model)) == 7 * N_LAYERS and model.is_quantized
    assert torch.equal(logits(model, prompt_ids), before_logits)


def test_dequantize_after_accelerates_cpu_offload_keeps_the_weights_in_its_state_dict(model_dir, prompt_ids):
    from accelerate import cpu_offload

    reference = load(model_dir, FORMATS["int8"], device_map="cpu").dequantize()
    model = load(model_dir, FORMATS["int8"], device_map="cpu")
    cpu_offload(model, execution_device="cpu")  # every module's tensors in one CPU state dict, read per forward
    store = model.model.layers[0].mlp.up_proj._hf_hook.weights_map.dataset
    model = model.dequantize()
    assert "model.layers.0.mlp.up_proj.weight_scale" not in store
    assert store["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight.is_meta
    assert torch.equal(logits(model, prompt_ids), logits(reference, prompt_ids))


def test_dequantize_refuses_a_layer_on_meta_without_an_offload_hook_and_changes_nothing(model_dir):
    model = load(model_dir, FORMATS["nf4"], device_map="cpu")
    model.model.layers[2].mlp.up_proj.to("meta")  # tensors gone, and no hook that could bring them back
    with pytest.raises(NotImplementedError, match="'model.layers.2.mlp.up_proj' has its tensors on the meta device"):
        model.dequantize()
    assert len(lowbit_modules(model)) == 7 * N_LAYERS and model.is_quantized
