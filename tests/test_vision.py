"""SigLIP and ResNet parity against transformers' PyTorch modules (tiny random checkpoints)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_close
from safetensors.torch import save_file

from cope_jax.convert import from_pytorch
from cope_jax.models.resnet.modeling import ResNet
from cope_jax.models.siglip.modeling import SiglipVisionModel

SIGLIP = dict(image_size=70, patch_size=14, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)


def perturb(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Move norms/biases away from their init so a dropped or swapped one shows in the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(scale * torch.randn_like(p))


def nchw_to_nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("which", ["SiglipVisionModel", "SiglipModel"])
def test_siglip_last_hidden_state(tmp_path, which):
    vision = transformers.SiglipVisionConfig(**SIGLIP)
    if which == "SiglipModel":
        text = transformers.SiglipTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2)
        hf = transformers.SiglipModel(transformers.SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
        tower = hf.vision_model
    else:
        hf = tower = transformers.SiglipVisionModel(vision)
    perturb(hf)
    hf.eval().save_pretrained(tmp_path)
    ours = from_pytorch(str(tmp_path))
    assert isinstance(ours, SiglipVisionModel) and ours.post_layernorm is not None
    pixels = torch.rand(2, 3, 70, 70) * 2 - 1
    with torch.no_grad():
        expected = tower(pixel_values=pixels).last_hidden_state.numpy()
    assert_close(ours(nchw_to_nhwc(pixels)), expected, rtol_to_scale=1e-5, what=f"{which} last_hidden_state")


def randomize_batch_norm(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so inference-mode BatchNorm is really tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.5 * torch.randn_like(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand_like(module.running_var))
                module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
                module.bias.copy_(0.3 * torch.randn_like(module.bias))


def tiny_hf_resnet() -> transformers.ResNetModel:
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 2, 1],
                                       layer_type="basic", hidden_act="relu")
    model = transformers.ResNetModel(config)
    randomize_batch_norm(model)
    return model.eval()


def test_hf_resnet_last_hidden_state(tmp_path):
    hf = tiny_hf_resnet()
    hf.save_pretrained(tmp_path)
    ours = from_pytorch(str(tmp_path))
    assert isinstance(ours, ResNet)
    x = torch.randn(2, 3, 45, 61)  # odd sizes exercise padding and the max-pool edge
    with torch.no_grad():
        expected = hf(x).last_hidden_state.permute(0, 2, 3, 1).numpy()
    assert_close(ours(nchw_to_nhwc(x)), expected, rtol_to_scale=1e-5, what="ResNet last_hidden_state")


def to_torchvision_names(hf_state: dict) -> dict:
    """HF ResNetModel keys -> torchvision resnet18 keys (torchvision itself cannot be installed here)."""
    out = {}
    for key, value in hf_state.items():
        key = key.replace("embedder.embedder.convolution", "conv1").replace("embedder.embedder.normalization", "bn1")
        if key.startswith("encoder.stages."):
            _, _, stage, _, block, rest = key.split(".", 5)
            rest = (rest.replace("layer.0.convolution", "conv1").replace("layer.0.normalization", "bn1")
                    .replace("layer.1.convolution", "conv2").replace("layer.1.normalization", "bn2")
                    .replace("shortcut.convolution", "downsample.0").replace("shortcut.normalization", "downsample.1"))
            key = f"layer{int(stage) + 1}.{block}.{rest}"
        out[key] = value
    out["fc.weight"], out["fc.bias"] = torch.randn(10, 512), torch.randn(10)
    return out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_resnet18_state_dict(tmp_path, suffix):
    config = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                       layer_type="basic")
    hf = transformers.ResNetModel(config)
    randomize_batch_norm(hf)
    hf.eval()
    state = to_torchvision_names(hf.state_dict())
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    ours = from_pytorch(str(path))
    assert ours.config.depths == (2, 2, 2, 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = hf(x).last_hidden_state.permute(0, 2, 3, 1).numpy()
    assert_close(ours(nchw_to_nhwc(x)), expected, rtol_to_scale=1e-5, what="torchvision-layout ResNet-18")


def test_resnet_train_mode_uses_batch_statistics():
    from flax import nnx

    from cope_jax.models.resnet.modeling import ResNetConfig

    model = ResNet(ResNetConfig.tiny(), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.randn(4, 32, 32, 3), jnp.float32)
    model.train()
    model(x)
    assert not np.allclose(np.asarray(model.bn1.mean[...]), 0.0)  # running stats moved
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
