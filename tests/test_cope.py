"""CoPEVideoLM keyframe path against a PyTorch reference of LLaVA-NeXT's grid path.

The reference is built from HF modules (SiglipVisionModel, Qwen2ForCausalLM, a Linear-GELU-Linear
projector) plus LLaVA-NeXT's `get_2dPool` and `add_token_per_grid` written in torch, and saved in
the three checkpoint layouts we read: LLaVA-NeXT `llava_qwen`, HF LlavaOnevision (legacy names as
transformers writes them to disk, and the current in-memory names).
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_close
from safetensors.torch import save_file

from cope_jax.convert import from_pytorch
from cope_jax.inference.generation import SamplingConfig, generate_from_embeddings
from cope_jax.models.cope.modeling import CoPEVideoLM, bilinear_matrix

VISION = dict(image_size=70, patch_size=14, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.25, max_position_embeddings=1024)


def perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))


def get_2d_pool(features: torch.Tensor, side: int, mode: str, stride: int = 2) -> torch.Tensor:
    """LLaVA-NeXT llava_arch.get_2dPool."""
    frames, _, dim = features.shape
    x = features.view(frames, side, side, -1).permute(0, 3, 1, 2)
    if mode == "average":
        x = torch.nn.functional.avg_pool2d(x, stride)
    else:
        x = torch.nn.functional.interpolate(x, size=[math.ceil(side / stride)] * 2, mode="bilinear")
    return x.permute(0, 2, 3, 1).reshape(frames, -1, dim)


def add_token_per_grid(features: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT llava_arch.add_token_per_grid: newline after every row of every frame."""
    rows = int(math.sqrt(features.shape[1]))
    frames, dim = features.shape[0], features.shape[-1]
    x = features.view(frames, 1, rows, rows, -1).permute(4, 0, 2, 1, 3).contiguous()
    x = x.flatten(1, 2).flatten(2, 3)
    x = torch.cat((x, newline[:, None, None].expand(*x.shape[:-1], 1)), dim=-1)
    return x.flatten(1, 2).transpose(0, 1)  # [frames*rows*(rows+1), D]


class Reference:
    """A LLaVA-Video model in PyTorch: tower (already truncated), projector, newline, Qwen2."""

    def __init__(self, keep_layers: int, vision: dict = VISION, text: dict = TEXT):
        torch.manual_seed(7)
        self.vision_config = transformers.SiglipVisionConfig(**vision)
        self.tower = transformers.SiglipVisionModel(self.vision_config)
        perturb(self.tower)
        del self.tower.encoder.layers[keep_layers:]  # LLaVA-NeXT drops the last layer
        width, llm_width = vision["hidden_size"], text["hidden_size"]
        self.projector = torch.nn.Sequential(torch.nn.Linear(width, llm_width), torch.nn.GELU(),
                                             torch.nn.Linear(llm_width, llm_width))
        self.newline = torch.randn(llm_width)
        self.lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**text))
        perturb(self.lm)
        for m in (self.tower, self.projector, self.lm):
            m.eval()

    def keyframe_tokens(self, pixels_nchw: torch.Tensor, mode: str) -> np.ndarray:
        with torch.no_grad():
            features = self.tower(pixel_values=pixels_nchw, output_hidden_states=True).hidden_states[-1]
            side = self.vision_config.image_size // self.vision_config.patch_size
            pooled = get_2d_pool(self.projector(features), side, mode)
            return add_token_per_grid(pooled, self.newline).numpy()

    def tower_state(self, prefix: str) -> dict:
        return {prefix + k: v for k, v in self.tower.state_dict().items()}

    def lm_state(self, decoder_prefix: str, head_key: str) -> dict:
        state = {}
        for k, v in self.lm.state_dict().items():
            state[head_key if k == "lm_head.weight" else decoder_prefix + k.removeprefix("model.")] = v
        return state


def save_llava_next(ref: Reference, path, mode: str) -> None:
    state = ref.lm_state("model.", "lm_head.weight") | ref.tower_state("model.vision_tower.vision_tower.vision_model.")
    state |= {"model.mm_projector.0.weight": ref.projector[0].weight, "model.mm_projector.0.bias": ref.projector[0].bias,
              "model.mm_projector.2.weight": ref.projector[2].weight, "model.mm_projector.2.bias": ref.projector[2].bias,
              "model.image_newline": ref.newline}
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    config = ref.lm.config.to_dict() | {
        "model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"],
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
        "mm_spatial_pool_mode": mode, "mm_spatial_pool_stride": 2, "mm_newline_position": "grid",
        "vision_config": ref.vision_config.to_dict()}  # describes the full tower; LLaVA drops its last layer
    (path / "config.json").write_text(json.dumps(config))


def save_onevision(ref: Reference, path, legacy: bool, feature_layer: int) -> None:
    """Through transformers' own LlavaOnevision class, so the key names are the real ones."""
    full_tower = transformers.SiglipVisionModel(ref.vision_config)
    full_tower.load_state_dict(ref.tower.state_dict(), strict=False)  # extra layer + head stay random
    config = transformers.LlavaOnevisionConfig(vision_config=ref.vision_config.to_dict(), text_config=ref.lm.config.to_dict(),
                                               vision_feature_layer=feature_layer)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(full_tower.state_dict())
    model.model.language_model.load_state_dict(ref.lm.model.state_dict())
    model.lm_head.load_state_dict(ref.lm.lm_head.state_dict())
    proj = model.model.multi_modal_projector
    proj.linear_1.load_state_dict(ref.projector[0].state_dict())
    proj.linear_2.load_state_dict(ref.projector[2].state_dict())
    with torch.no_grad():
        model.model.image_newline.copy_(ref.newline)
    if legacy:
        model.save_pretrained(path)  # transformers 5 writes the legacy key names to disk
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
        config.save_pretrained(path)


@pytest.fixture(scope="module")
def reference():
    return Reference(keep_layers=2)


def pixels():
    torch.manual_seed(3)
    return torch.rand(3, 3, 70, 70) * 2 - 1


LAYOUTS = [("llava_next", "bilinear"), ("llava_next", "average"), ("hf_onevision_legacy", "bilinear"),
           ("hf_onevision", "bilinear")]


@pytest.mark.parametrize("layout,mode", LAYOUTS)
def test_encode_keyframes_matches_llava_next_grid_path(tmp_path, reference, layout, mode):
    if layout == "llava_next":
        save_llava_next(reference, tmp_path, mode)
    else:
        # 3-layer tower, hidden_states[-2] = output of layer 2: the same truncation stated HF's way.
        save_onevision(reference, tmp_path, legacy=layout.endswith("legacy"), feature_layer=-2)
    model = from_pytorch(str(tmp_path))
    assert isinstance(model, CoPEVideoLM)
    assert model.config.vision.num_hidden_layers == 2 and model.config.pool_mode == mode
    frames = pixels()
    actual = model.encode_keyframes(jnp.asarray(frames.permute(0, 2, 3, 1).numpy()))
    expected = reference.keyframe_tokens(frames, mode)
    per_frame = 12 if mode == "bilinear" else 6  # 5x5 patches -> 3x3 (+newline) or 2x2 (+newline)
    assert actual.shape == (3, per_frame, 64) and model.config.tokens_per_keyframe == per_frame
    assert_close(np.asarray(actual).reshape(-1, 64), expected, rtol_to_scale=1e-5, what=f"{layout}/{mode} keyframe tokens")


def test_real_size_token_counts():
    from cope_jax.models.cope.modeling import CoPEConfig

    assert CoPEConfig.llava_video_7b().tokens_per_keyframe == 210  # 14 x (14 + 1)
    assert CoPEConfig(pool_mode="average").tokens_per_keyframe == 13 * 14


@pytest.mark.parametrize("in_size,out_size", [(27, 14), (5, 3), (4, 2), (7, 7)])
def test_bilinear_matrix_equals_torch_interpolate(in_size, out_size):
    x = torch.randn(1, 1, in_size, 1)
    expected = torch.nn.functional.interpolate(x, size=(out_size, 1), mode="bilinear", align_corners=False)
    actual = bilinear_matrix(in_size, out_size) @ x[0, 0, :, 0].numpy()
    np.testing.assert_allclose(actual, expected[0, 0, :, 0].numpy(), atol=1e-5)  # torch computes coords in fp32


def test_generation_from_keyframes_matches_hf(tmp_path, reference):
    """Dense LLaVA-Video baseline end to end: every step a keyframe, the stream merged into the
    prompt at the placeholder slots, 16 greedy tokens."""
    save_llava_next(reference, tmp_path, "bilinear")
    model = from_pytorch(str(tmp_path))
    frames = pixels()[:2]
    before, after = [5, 17, 42, 9], [33, 8, 21, 100, 7]
    visual = torch.tensor(reference.keyframe_tokens(frames, "bilinear"))
    embed = reference.lm.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([embed(torch.tensor(before)), visual, embed(torch.tensor(after))])[None]
        expected = reference.lm.generate(inputs_embeds=embeds, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                         pad_token_id=0).numpy()[0]
    tokens = model.config.tokens_per_keyframe
    token_source = jnp.arange(2 * tokens)[None]  # both keyframes, in order
    stream = model.encode_video(jnp.asarray(frames.permute(0, 2, 3, 1).numpy()), jnp.zeros((0, 70, 70, 2)),
                                jnp.zeros((0, 70, 70, 3), jnp.int16), token_source)
    ids = jnp.asarray([before + [0] * (2 * tokens) + after])
    is_visual = jnp.asarray([[False] * len(before) + [True] * (2 * tokens) + [False] * len(after)])
    prompt = model.merge_visual(ids, is_visual, stream)
    actual = generate_from_embeddings(model.language_model, prompt, jnp.ones(ids.shape, bool), SamplingConfig(max_new_tokens=16))
    np.testing.assert_array_equal(actual[0], expected[-16:])
