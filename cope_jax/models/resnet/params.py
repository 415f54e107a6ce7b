"""HF ResNetModel / torchvision resnet18 -> cope_jax ResNet: config translation and weight maps."""

from __future__ import annotations

from cope_jax.models.resnet.modeling import ResNetConfig
from cope_jax.weights import ConversionError, Rule, conv_kernel, ignore

_BN = [("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")]


def _conv_bn(source_conv: str, source_bn: str, target: str, target_bn: str) -> list[Rule]:
    """A conv (no bias) + BatchNorm pair; `target`/`target_bn` are templates for our names."""
    out = [Rule(source_conv + r"\.weight", target + ".kernel", conv_kernel)]
    out += [Rule(source_bn + rf"\.{theirs}", f"{target_bn}.{ours}") for theirs, ours in _BN]
    return out


HF_RULES = (
    _conv_bn(r"embedder\.embedder\.convolution", r"embedder\.embedder\.normalization", "conv1", "bn1")
    + _conv_bn(r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.0\.convolution",
               r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.0\.normalization", r"stages.\1.\2.conv1", r"stages.\1.\2.bn1")
    + _conv_bn(r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.1\.convolution",
               r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.1\.normalization", r"stages.\1.\2.conv2", r"stages.\1.\2.bn2")
    + _conv_bn(r"encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution",
               r"encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization",
               r"stages.\1.\2.downsample.conv", r"stages.\1.\2.downsample.bn")
    + [ignore(r".*num_batches_tracked", "BatchNorm step counter"), ignore(r"classifier\..*", "classifier head")]
)


def torchvision_rules() -> list[Rule]:
    """torchvision names stages layer1..layer4; ours are stages.0..3."""
    rules = _conv_bn(r"conv1", r"bn1", "conv1", "bn1")
    for stage in range(1, 5):
        source, target = rf"layer{stage}\.(\d+)", rf"stages.{stage - 1}.\1"
        rules += _conv_bn(source + r"\.conv1", source + r"\.bn1", target + ".conv1", target + ".bn1")
        rules += _conv_bn(source + r"\.conv2", source + r"\.bn2", target + ".conv2", target + ".bn2")
        rules += _conv_bn(source + r"\.downsample\.0", source + r"\.downsample\.1",
                          target + ".downsample.conv", target + ".downsample.bn")
    return rules + [ignore(r".*num_batches_tracked", "BatchNorm step counter"),
                    ignore(r"fc\..*", "classifier head, not part of the trunk")]


def torchvision_config(keys: list[str], source: str) -> ResNetConfig:
    """resnet18 layout, with the number of stages read from the keys (layer1..layerN present)."""
    stages = sorted({int(k[5]) for k in keys if k.startswith("layer") and k[5].isdigit()})
    if not stages or stages != list(range(1, len(stages) + 1)):
        raise ConversionError(f"{source}: not a torchvision ResNet state dict (no layer1..layerN keys)")
    full = ResNetConfig.resnet18()
    depths = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{s}.")}) for s in stages)
    return ResNetConfig(hidden_sizes=full.hidden_sizes[: len(stages)], depths=depths)


def config_from_hf(hf: dict, source: str) -> ResNetConfig:
    if hf.get("layer_type", "basic") != "basic":
        raise ConversionError(f"{source}: ResNet layer_type {hf['layer_type']!r} is not supported (BasicBlock only)")
    if hf.get("hidden_act", "relu") != "relu":
        raise ConversionError(f"{source}: ResNet hidden_act {hf['hidden_act']!r} is not supported")
    try:
        return ResNetConfig(num_channels=hf.get("num_channels", 3), embedding_size=hf["embedding_size"],
                            hidden_sizes=tuple(hf["hidden_sizes"]), depths=tuple(hf["depths"]),
                            downsample_in_first_stage=bool(hf.get("downsample_in_first_stage", False)))
    except KeyError as e:
        raise ConversionError(f"{source}: ResNet config lacks {e.args[0]!r}") from None
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
