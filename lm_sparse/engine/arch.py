"""One table of module names per supported architecture.

Every sparsifiable matrix is named by the *input* it reads. A "site" is one linear layer of one decoder
layer; sites that read the same tensor share a `group` (TEAL keeps one histogram per group):

    group     sites (separate matrices)     fused variants
    attn_in   q, k, v                       qkv        (Phi-3)
    attn_out  o
    mlp_in    gate, up                      gate_up    (Phi-3)
    mlp_mid   down                          -- the FFN intermediate act(gate(x)) * up(x)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GROUP_OF_SITE = {
    "q": "attn_in", "k": "attn_in", "v": "attn_in", "qkv": "attn_in",
    "o": "attn_out",
    "gate": "mlp_in", "up": "mlp_in", "gate_up": "mlp_in",
    "down": "mlp_mid",
}
FFN_GROUPS = ("mlp_in", "mlp_mid")
ATTN_GROUPS = ("attn_in", "attn_out")

# Activations whose FFN intermediate has exact zeros of its own; those zeros are counted, never re-thresholded.
RELU_FAMILY = ("relu", "relu2", "fatrelu")

_LLAMA_LIKE = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
_PHI3 = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
         "down": "mlp.down_proj"}


@dataclass(frozen=True)
class ArchSpec:
    """Where the decoder layers and their linear layers live, for one `config.model_type`."""

    layers: tuple[str, ...]  # candidate paths of the ModuleList of decoder layers, first match wins
    sites: dict[str, str]  # site name -> module path inside a decoder layer
    activation_attr: str = "hidden_act"  # config attribute naming the FFN activation
    activation_module: str = "mlp.act_fn"  # the module computing act(gate(x)) inside a decoder layer


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(("model.layers",), _LLAMA_LIKE),
    "mistral": ArchSpec(("model.layers",), _LLAMA_LIKE),
    "qwen2": ArchSpec(("model.layers",), _LLAMA_LIKE),
    "qwen3": ArchSpec(("model.layers",), _LLAMA_LIKE),
    "gemma2": ArchSpec(("model.layers",), _LLAMA_LIKE, "hidden_activation"),
    "gemma3_text": ArchSpec(("model.layers",), _LLAMA_LIKE, "hidden_activation"),
    "gemma3": ArchSpec(("model.language_model.layers", "model.layers"), _LLAMA_LIKE, "hidden_activation"),
    "phi3": ArchSpec(("model.layers",), _PHI3, activation_module="mlp.activation_fn"),
}


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not in the table."""


def check_model_type(model_type: str | None) -> ArchSpec:
    """Return the table entry for `model_type` or raise one clear line listing the supported ones."""
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        raise UnsupportedArchitectureError(
            f"sparse-hf: unsupported architecture model_type={model_type!r}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return spec


def _text_config(config):
    # Multimodal configs (Gemma 3) keep the language model's settings in a sub-config.
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def activation_name(config) -> str:
    """The FFN activation's name as the config spells it (`silu`, `gelu_pytorch_tanh`, `relu`, ...)."""
    spec = check_model_type(getattr(config, "model_type", None))
    text = _text_config(config)
    act = getattr(text, spec.activation_attr, None) or getattr(text, "hidden_act", None)
    return str(act)


def is_relu_family(config) -> bool:
    return activation_name(config).lower() in RELU_FAMILY


@dataclass
class Site:
    """One linear layer whose input may be sparsified and is counted."""

    index: int  # position in the engine's site list
    layer: int
    name: str  # q, k, v, qkv, o, gate, up, gate_up, down
    module: nn.Linear
    path: str  # full module path in the model, for error messages

    @property
    def group(self) -> str:
        return GROUP_OF_SITE[self.name]

    @property
    def in_features(self) -> int:
        return int(self.module.in_features)

    @property
    def num_params(self) -> int:
        return int(self.module.weight.numel())


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _unwrap(model: nn.Module) -> nn.Module:
    # PEFT wraps the transformers model; the table's paths start at the transformers model.
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    if base is not None and inner is not None and base is not model and hasattr(inner, "config"):
        return inner
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's ModuleList of decoder layers (PEFT wrappers looked through); raise if the table's paths miss."""
    model = _unwrap(model)
    spec = check_model_type(getattr(model.config, "model_type", None))
    for path in spec.layers:
        found = _get_submodule(model, path)
        if isinstance(found, nn.ModuleList):
            return found
    raise UnsupportedArchitectureError(
        f"sparse-hf: no decoder layers at {' or '.join(spec.layers)} in {type(model).__name__}"
    )


def resolve_sites(model: nn.Module) -> list[Site]:
    """Find every site of the table in `model`; raise if the table's paths do not resolve."""
    layers = decoder_layers(model)
    model = _unwrap(model)
    config = model.config
    spec = check_model_type(getattr(config, "model_type", None))
    sites: list[Site] = []
    for layer_idx, layer in enumerate(layers):
        for name, sub in spec.sites.items():
            module = _get_submodule(layer, sub)
            if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
                raise UnsupportedArchitectureError(
                    f"sparse-hf: hook point {spec.layers[0]}.{layer_idx}.{sub} does not resolve in "
                    f"{type(model).__name__} (model_type={config.model_type})"
                )
            path = f"layers.{layer_idx}.{sub}"
            sites.append(Site(len(sites), layer_idx, name, module, path))  # type: ignore[arg-type]
    return sites


def resolve_activation_modules(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer's FFN activation module (its output is the gate score act(gate(x))); raise if the
    table's path does not resolve to one module per layer (a hook on a module shared by layers would fire in
    every one of them)."""
    layers = decoder_layers(model)
    model = _unwrap(model)
    spec = check_model_type(getattr(model.config, "model_type", None))
    found = []
    for layer_idx, layer in enumerate(layers):
        module = _get_submodule(layer, spec.activation_module)
        if not isinstance(module, nn.Module):
            raise UnsupportedArchitectureError(
                f"sparse-hf: hook point {spec.layers[0]}.{layer_idx}.{spec.activation_module} does not resolve to a "
                f"module in {type(model).__name__} (model_type={model.config.model_type})")
        found.append(module)
    if len({id(m) for m in found}) != len(found):
        raise UnsupportedArchitectureError(
            f"sparse-hf: {type(model).__name__} shares one {spec.activation_module} module between layers; "
            "rules on the gate score need one per layer")
    return found
