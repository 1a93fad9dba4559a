"""Compressed checkpoints (bitmask-values-v1): exact bytes, bit-exact round trips, sharding, remote code, CLI."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import run_without_the_package, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_sparse_ift import SparseWideGPTForCausalLM
from hf_sparse_ift.cli import main as cli_main
from hf_sparse_ift.models.sparse_wide_gpt.sparse_safetensors import (
    BITMASK_FORMAT,
    compress_state_dict,
    compress_weight,
    decompress_state_dict,
    decompress_weight,
)
from hf_sparse_ift.sparsity.masks import pack_bits, sparse_layers

WIDTH = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float64: torch.int64,
}


def with_active_zeros(model):
    """Regrown weights are active and exactly 0 (and -0.0 must keep its sign bit)."""
    with torch.no_grad():
        for i, m in enumerate(sparse_layers(model).values()):
            active = m.weight_mask.view(-1).nonzero().squeeze(1)
            m.weight.view(-1)[active[i % 3 :: 7]] = 0.0
            m.weight.view(-1)[active[5 + i]] = -0.0
    return model


def assert_bit_exact(original, loaded):
    """Every tensor bit for bit, the signs of zeros included (inactive weights are +0.0 in a fresh model and after
    loading either layout; active zeros keep their sign)."""
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key, t in a.items():
        u = b[key]
        assert t.dtype == u.dtype and t.shape == u.shape, key
        width = WIDTH.get(t.dtype)
        assert torch.equal(t.view(width), u.view(width)) if width else torch.equal(t, u), key


def test_mask_bits_are_pack_bits_and_bad_bits_are_refused():
    mask = torch.rand(13, 7) < 0.3
    weight = torch.randn(13, 7).masked_fill(~mask, 0.0)
    bits, values, shape = compress_weight(weight, mask)
    assert bits.dtype == torch.uint8 and bits.shape == (12,)  # ceil(91 / 8)
    assert torch.equal(bits, pack_bits(mask))
    assert torch.equal(decompress_weight(bits, values, shape)[1], mask)
    with pytest.raises(ValueError, match=r"do not fit a weight of shape \(13, 8\): expected uint8 \[13\]"):
        decompress_weight(bits, values, (13, 8))
    bad = bits.clone()
    bad[-1] |= 0x80  # 91 = 11 * 8 + 3: bit 7 of the last byte is padding
    with pytest.raises(ValueError, match="non-zero padding bits"):
        decompress_weight(bad, values, shape)
    with pytest.raises(ValueError, match="needs a bool mask of the same shape"):
        compress_weight(weight, mask.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_compress_weight_exact_bytes_and_bits(dtype):
    torch.manual_seed(0)
    mask = torch.rand(37, 29) < 0.25
    weight = (torch.randn(37, 29) * mask).to(dtype)
    active = mask.view(-1).nonzero().squeeze(1)
    weight.view(-1)[active[:5]] = 0.0
    weight.view(-1)[active[5]] = -0.0
    bits, values, shape = compress_weight(weight, mask)
    assert bits.numel() == (37 * 29 + 7) // 8 and values.numel() == int(mask.sum()) and values.dtype == dtype
    assert shape.tolist() == [37, 29]
    w, m = decompress_weight(bits, values, shape)
    assert torch.equal(m, mask)
    width = WIDTH[dtype]
    assert torch.equal(w.view(width), weight.masked_fill(~mask, 0).view(width))
    assert torch.signbit(w.view(-1)[active[5]]) and not torch.signbit(w.view(-1)[active[4]])
    with pytest.raises(ValueError, match=r"layer: 3 stored values for a mask with \d+ active positions"):
        decompress_weight(bits, values[:3], shape, "layer")


def test_save_writes_compressed_layout_and_loads_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = with_active_zeros(SparseWideGPTForCausalLM(tiny_config()).eval())
    model.save_pretrained(tmp_path / "c")
    model.save_pretrained(tmp_path / "p", sparse_format="plain")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["sparse_format"]["format"] == BITMASK_FORMAT
    assert json.loads((tmp_path / "p" / "config.json").read_text()).get("sparse_format") is None
    assert model.config.sparse_format is None  # the in-memory config is left as it was
    with safe_open(tmp_path / "c" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    layers = sparse_layers(model)
    assert len(layers) == 12
    for name in layers:
        assert f"{name}.weight" not in keys and f"{name}.weight_mask" not in keys
        assert {f"{name}.weight_bitmask", f"{name}.weight_active_values", f"{name}.weight_shape"} <= keys
    # exact bytes: the sparse tensors shrink from 4 + 1 bytes per weight to 1/8 + 4 per active weight (+16 for shape)
    plain, compressed = load_file(tmp_path / "p" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    for name, m in layers.items():
        n, active = m.weight.numel(), int(m.weight_mask.sum())
        assert plain[f"{name}.weight"].nbytes + plain[f"{name}.weight_mask"].nbytes == 5 * n
        assert compressed[f"{name}.weight_bitmask"].nbytes == (n + 7) // 8
        assert compressed[f"{name}.weight_active_values"].nbytes == 4 * active
    x = torch.randint(0, 97, (2, 12))
    for folder in ("c", "p"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        assert_bit_exact(model, loaded)
        assert torch.equal(loaded(x).logits, model(x).logits)
    # and the plain file, decoded from the compressed one, is the plain one bit for bit
    decoded = decompress_state_dict(compressed)
    assert set(decoded) == set(plain)
    for key, t in plain.items():
        width = WIDTH.get(t.dtype)
        assert torch.equal(decoded[key].view(width), t.view(width)) if width else torch.equal(decoded[key], t), key


def test_sharded_bf16_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = with_active_zeros(SparseWideGPTForCausalLM(tiny_config()).eval()).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    # at least one layer's bits and values sit in different shards
    assert any(
        index[k] != index[k.replace("weight_bitmask", "weight_active_values")]
        for k in index
        if k.endswith("weight_bitmask")
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.dtype == torch.bfloat16
    assert_bit_exact(model, loaded)
    x = torch.randint(0, 97, (1, 9))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_unknown_format_and_bad_option_are_refused(tmp_path, tiny_model):
    with pytest.raises(
        ValueError,
        match=r"sparse_format='bitmask' is invalid: expected one of \['auto', "
        r"'bitmask-values-v1', 'plain'\]",
    ):
        tiny_model.save_pretrained(tmp_path / "x", sparse_format="bitmask")
    tiny_model.save_pretrained(tmp_path / "c")
    config_file = tmp_path / "c" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "sparse_format": {"format": "bitmask-v9"}}))
    with pytest.raises(ValueError, match="checkpoint sparse_format 'bitmask-v9' is not supported"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    config_file.write_text(json.dumps(config))
    # a layer whose mask bits are missing is an error, never a layer left at its random initialisation
    tensors = load_file(tmp_path / "c" / "model.safetensors")
    name = "transformer.h.0.mlp.fc_in"
    save_file(
        {k: v for k, v in tensors.items() if k != f"{name}.weight_bitmask"},
        tmp_path / "c" / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(
        ValueError, match=rf"compressed layer '{name}' is incomplete: missing \['{name}.weight_bitmask'\]"
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_state_dict_helpers_skip_unpaired_and_dense_tensors(tiny_model):
    state = tiny_model.state_dict()
    compressed = compress_state_dict(state)
    assert "transformer.wte.weight" in compressed and "transformer.h.0.ln_1.weight" in compressed
    assert not any(k.endswith(".weight_mask") for k in compressed)
    back = decompress_state_dict(compressed)
    assert set(back) == set(state)


def test_push_to_hub_writes_the_chosen_layout(tiny_model, monkeypatch, tmp_path):
    import transformers.utils.hub as hub

    seen = {}

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    def upload(self, folder, repo_id, **kwargs):
        seen[repo_id] = sorted(os.listdir(folder)), json.loads(Path(folder, "config.json").read_text())

    monkeypatch.setattr(hub, "hf_api", lambda: Api())
    monkeypatch.setattr(
        hub, "create_and_tag_model_card", lambda *a, **k: type("Card", (), {"save": lambda s, p: None})()
    )
    monkeypatch.setattr(type(tiny_model), "_upload_modified_files", upload)
    tiny_model.push_to_hub("me/compressed")
    tiny_model.push_to_hub("me/plain", sparse_format="plain")
    assert seen["me/compressed"][1]["sparse_format"]["format"] == BITMASK_FORMAT
    assert seen["me/plain"][1].get("sparse_format") is None
    assert "save_pretrained" not in tiny_model.__dict__


def test_cli_compress_and_decompress(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "plain", sparse_format="plain")
    assert cli_main(["compress", str(tmp_path / "plain"), str(tmp_path / "small")]) == 0
    assert json.loads((tmp_path / "small" / "config.json").read_text())["sparse_format"]["format"] == BITMASK_FORMAT
    assert (tmp_path / "small" / "modeling_sparse_wide_gpt.py").exists()  # code and other files are copied
    assert cli_main(["decompress", str(tmp_path / "small"), str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text()).get("sparse_format") is None
    original, back = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    # refuse to overwrite without --overwrite; a plain input to decompress is refused by name
    assert cli_main(["compress", str(tmp_path / "plain"), str(tmp_path / "small")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["compress", str(tmp_path / "plain"), str(tmp_path / "small"), "--overwrite"]) == 0
    assert cli_main(["decompress", str(tmp_path / "plain"), str(tmp_path / "nothing")]) == 2
    assert "is not compressed" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    x = torch.randint(0, 97, (1, 7))
    assert torch.equal(loaded(x).logits, tiny_model(x).logits)


LOADER = """
import subprocess, sys, torch
try:
    import hf_sparse_ift
    sys.exit("hf_sparse_ift is importable: the test would prove nothing")
except ModuleNotFoundError:
    pass
def refuse(self, args, *a, **k):  # remote code never compiles (or starts) anything, also to run condensed layers
    raise AssertionError(f"a process was started: {args}")
subprocess.Popen.__init__ = refuse
from transformers import AutoModelForCausalLM
x = torch.load(sys.argv[1])
out = {}
for name in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True).eval()
    assert "hf_sparse_ift" not in type(model).__module__, type(model).__module__
    with torch.no_grad():
        out[name] = {"logits": model(x).logits, "state": model.state_dict(),
                     "layer": type(model.transformer.h[0].mlp.fc_in).__name__}
torch.save(out, sys.argv[2])
"""


def test_remote_code_loads_compressed_and_condensed_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = with_active_zeros(SparseWideGPTForCausalLM(tiny_config()).eval())
    model.save_pretrained(tmp_path / "compressed")
    condensed = SparseWideGPTForCausalLM.from_pretrained(tmp_path / "compressed").eval().condense()
    condensed.save_pretrained(tmp_path / "condensed")
    x = torch.randint(0, 97, (2, 12))
    torch.save(x, tmp_path / "x.pt")
    run_without_the_package(
        tmp_path, LOADER, tmp_path / "x.pt", tmp_path / "out.pt", tmp_path / "compressed", tmp_path / "condensed"
    )
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        want = model(x).logits
    got = out[str(tmp_path / "compressed")]
    assert got["layer"] == "SparseLinear" and torch.equal(got["logits"], want)
    assert_bit_exact(model, type("M", (), {"state_dict": lambda self: got["state"]})())
    got = out[str(tmp_path / "condensed")]
    assert got["layer"] == "CondensedLinear"
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=1e-5)
    assert got["state"].keys() == condensed.state_dict().keys()


def test_compressed_checkpoint_loads_with_cpu_and_disk_offload(tmp_path):
    torch.manual_seed(0)
    model = with_active_zeros(SparseWideGPTForCausalLM(tiny_config()).eval())
    model.save_pretrained(tmp_path / "c")
    x = torch.randint(0, 97, (2, 6))
    for max_memory in ({"cpu": 20_000}, {"cpu": 60_000}):  # everything on disk; embeddings on CPU, blocks on disk
        loaded = AutoModelForCausalLM.from_pretrained(
            tmp_path / "c",
            device_map="auto",
            max_memory=max_memory,
            offload_folder=tmp_path / f"offload-{max_memory['cpu']}",
        )
        assert "disk" in set(loaded.hf_device_map.values())
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_a_model_trained_with_dst_round_trips_bit_exact(tmp_path):
    """After SET updates (dropped weights zeroed, regrown ones active at zero) every bit survives the compressed layout,
    inactive positions included."""
    from helpers import make, train_step

    model, opt, engine = make("set", interval=2)
    generator = torch.Generator().manual_seed(0)
    updates = [train_step(model, opt, engine, generator) for _ in range(8)]
    assert len([u for u in updates if u is not None]) >= 3
    regrown_zeros = sum(int((m.weight[m.weight_mask] == 0).sum()) for m in sparse_layers(model).values())
    assert regrown_zeros > 0  # the case a mask inferred from zeros would lose
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_bit_exact(model, loaded)


def test_without_the_loading_conversion_a_compressed_checkpoint_is_refused(tmp_path, tiny_model, monkeypatch):
    """The guard: if transformers ever stops applying the registered conversion, the compressed tensors come back as
    unexpected keys and the sparse layers without tensors; loading must fail, never return random layers."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping

    from hf_sparse_ift.models.sparse_wide_gpt import sparse_checkpoint

    tiny_model.save_pretrained(tmp_path / "c")
    tiny_model.save_pretrained(tmp_path / "p", sparse_format="plain")
    monkeypatch.setattr(
        sparse_checkpoint,
        "register_sparse_layouts",
        lambda model_type: register_checkpoint_conversion_mapping(model_type, [], overwrite=True),
    )
    with pytest.raises(
        ValueError,
        match=r"the checkpoint's sparse tensors \['transformer\.h\.0\.attn\.k_proj\."
        r"weight_active_values', .* were not decoded into the model",
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    # the plain layout needs no conversion
    x = torch.randint(0, 97, (1, 5))
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()(x).logits, tiny_model(x).logits)
    # a checkpoint with no tensors at all for a sparse layer is refused too (not left at its initialisation)
    tensors = load_file(tmp_path / "p" / "model.safetensors")
    name = "transformer.h.1.mlp.fc_out"
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith(name + ".weight")}, tmp_path / "p" / "model.safetensors"
    )
    with pytest.raises(ValueError, match=rf"no tensors for the sparse layer '{name}'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "p")


def test_loading_and_running_never_start_a_compiler(tmp_path, monkeypatch):
    """from_pretrained of every layout, and a forward of the condensed model, spawn no process (no compiler can run),
    with no compiler on PATH either."""
    import subprocess

    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path / "compressed")
    model.save_pretrained(tmp_path / "plain", sparse_format="plain")
    SparseWideGPTForCausalLM.from_pretrained(tmp_path / "compressed").condense().save_pretrained(tmp_path / "condensed")
    spawned = []

    def refuse(self, args, *a, **k):
        spawned.append(args)
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    monkeypatch.delenv("CC", raising=False)
    x = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        for folder in ("compressed", "plain", "condensed"):
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
            torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-5)
    assert spawned == []
