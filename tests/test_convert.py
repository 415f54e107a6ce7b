"""Conversion CLI, checkpoint round trip, and every error path: one clear line, nothing half-written."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from cope_jax import checkpoints
from cope_jax.convert import convert, from_pytorch, main
from cope_jax.weights import ConversionError


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def copy_checkpoint(src, dst, *, edit_state=None, edit_config=None):
    """A modified copy of a single-file safetensors checkpoint."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True, exist_ok=True)
    state = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(config)
    save_file(state, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_convert_save_load_gives_identical_outputs(qwen2_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["--source", str(qwen2_dir), "--output", str(out)]) == 0
    direct = from_pytorch(str(qwen2_dir))
    loaded = checkpoints.load(str(out))
    ids = jnp.asarray(np.random.randint(0, 97, (2, 11)))
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(direct(ids)))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp directory left behind


def test_bfloat16_conversion_is_bit_exact(qwen2_dir, tmp_path):
    """bf16 source -> bf16 params without passing through a lossy path, and saved/loaded exactly."""
    model = transformers.Qwen2ForCausalLM.from_pretrained(qwen2_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    ours = from_pytorch(str(tmp_path / "bf16"), dtype="bfloat16")
    expected = model.model.layers[0].mlp.up_proj.weight.detach().float().numpy().T
    actual = ours.model.layers[0].mlp.up_proj.kernel[...]
    assert actual.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(actual, np.float32), expected)
    convert(str(tmp_path / "bf16"), str(tmp_path / "out"))
    # float32 output of a bf16 source is the exact upcast
    loaded = checkpoints.load(str(tmp_path / "out"))
    np.testing.assert_array_equal(np.asarray(loaded.model.layers[0].mlp.up_proj.kernel[...]), expected)


def test_sharded_safetensors_and_bin(qwen2_dir, tmp_path):
    model = transformers.Qwen2ForCausalLM.from_pretrained(qwen2_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((qwen2_dir / "config.json").read_text())
    ids = jnp.asarray([[3, 1, 4, 1, 5]])
    reference = np.asarray(from_pytorch(str(qwen2_dir))(ids))
    for variant in ("sharded", "bin"):
        np.testing.assert_array_equal(np.asarray(from_pytorch(str(tmp_path / variant))(ids)), reference)


def _error(path) -> str:
    with pytest.raises(ConversionError) as info:
        from_pytorch(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message  # one line naming the file
    return message


def test_unexpected_tensor_is_an_error(qwen2_dir, tmp_path):
    bad = copy_checkpoint(qwen2_dir, tmp_path / "c", edit_state=lambda s: s.update(extra=torch.zeros(3)))
    assert "unexpected source tensor extra" in _error(bad)


def test_missing_tensor_is_an_error(qwen2_dir, tmp_path):
    bad = copy_checkpoint(qwen2_dir, tmp_path / "c", edit_state=lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"))
    assert "model.layers.1.self_attn.k_proj.bias has no source tensor" in _error(bad)


def test_shape_mismatch_is_an_error(qwen2_dir, tmp_path):
    bad = copy_checkpoint(qwen2_dir, tmp_path / "c", edit_config=lambda c: c.update(intermediate_size=64))
    message = _error(bad)
    assert "does not fit" in message and "mlp" in message


def test_config_weight_layer_mismatch(qwen2_dir, tmp_path):
    bad = copy_checkpoint(qwen2_dir, tmp_path / "c", edit_config=lambda c: c.update(num_hidden_layers=3))
    assert "model.layers.2" in _error(bad)


def test_unknown_layout(qwen2_dir, tmp_path):
    bad = copy_checkpoint(qwen2_dir, tmp_path / "c", edit_config=lambda c: c.update(model_type="llama"))
    assert "unknown model_type 'llama'" in _error(bad)


def test_truncated_file(qwen2_dir, tmp_path):
    bad = copy_checkpoint(qwen2_dir, tmp_path / "c")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(bad)


def test_corrupt_header(qwen2_dir, tmp_path):
    bad = copy_checkpoint(qwen2_dir, tmp_path / "c")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:40] = b"#" * 32
    (bad / "model.safetensors").write_bytes(bytes(data))
    assert "corrupt safetensors header" in _error(bad)


def test_corrupt_bin(tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"not a zip file at all")
    assert "cannot read PyTorch checkpoint" in _error(tmp_path / "weights.pth")


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected, not executed."""
    torch.save({"conv1.weight": torch.zeros(1), "evil": os.getcwd}, tmp_path / "evil.pth")
    assert "cannot read PyTorch checkpoint" in _error(tmp_path / "evil.pth")


def test_empty_directory(tmp_path):
    assert "no weight files" in _error(tmp_path)


def test_cli_error_is_one_line_and_writes_nothing(qwen2_dir, tmp_path):
    bad = copy_checkpoint(qwen2_dir, tmp_path / "c", edit_config=lambda c: c.update(model_type="llama"))
    result = subprocess.run([sys.executable, "-m", "cope_jax.convert", "--source", str(bad), "--output", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert not (tmp_path / "o").exists() and not any(p.name.startswith("o.partial") for p in tmp_path.iterdir())


def test_cli_refuses_existing_output(qwen2_dir, tmp_path):
    (tmp_path / "o").mkdir()
    assert main(["--source", str(qwen2_dir), "--output", str(tmp_path / "o")]) == 1


def test_cli_help_teaches():
    result = subprocess.run([sys.executable, "-m", "cope_jax.convert", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for needle in ("--source", "--output", "--dtype", "llava_qwen", "torchvision", "checkpoints.load", "Example"):
        assert needle in result.stdout


def test_load_reports_non_checkpoint(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="not a cope_jax checkpoint"):
        checkpoints.load(str(tmp_path))
