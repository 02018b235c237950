"""The weights a fine-tuned model directory may carry beside its Hugging Face model: bottleneck
adapters and a learned prompt, as torch modules.

Inference loads them from a model directory (``load_extras``) with no training code and no random
state; training (``semvec.train.methods``) builds the same modules empty and trains them. Methods
that fold into the weights (full, LoRA merged, BitFit) carry no extras.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from semvec.errors import ConfigError

ADAPTERS_FILE = "adapters.safetensors"
PROMPT_FILE = "prompt.safetensors"


class ExtendedEncoder(nn.Module):
    """A Hugging Face encoder with optional adapters and a learned prompt.

    forward(input_ids [b, t], attention_mask [b, t]) -> (hidden [b, t, d], mask [b, t]), lined up
    with the input tokens: the prompt's virtual positions are stripped before returning.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # the HF model, or its peft wrapper while LoRA trains
        self.prompt: nn.Parameter | None = None  # [prompt_tokens, d]
        self.adapters = nn.ModuleList()

    @property
    def base(self) -> nn.Module:
        """The HF model itself (inside the peft wrapper for LoRA)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if get_base else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if self.prompt is None:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return hidden, attention_mask
        b, p = input_ids.shape[0], self.prompt.shape[0]
        embeds = self.base.get_input_embeddings()(input_ids)  # [b, t, d]
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)  # [b, p, d]
        mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)  # [b, p + t]
        # No position ids: every model numbers positions 0..p+t-1, so the text's simply continue.
        out = self.model(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask)
        return out.last_hidden_state[:, p:], attention_mask

    def add_adapters(self, size: int) -> None:
        """One bottleneck adapter after each attention and feed-forward block of every layer."""
        model = self.base
        param = next(model.parameters())
        dim = model.get_input_embeddings().weight.shape[1]
        for layer in transformer_layers(model):
            for site in _adapter_sites(model, layer):
                adapter = Bottleneck(dim, size).to(device=param.device, dtype=param.dtype)
                self.adapters.append(adapter)
                site.register_forward_hook(adapter.hook)


class Bottleneck(nn.Module):
    """Adapter d -> size -> d with a residual, applied to a block's output (in BERT after the
    block's Add & LayerNorm, in GPT2 before its residual add). The zero up-projection makes a new
    adapter the identity."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.act = nn.GELU()
        self.up = nn.Linear(size, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))

    def hook(self, module: nn.Module, args, out):
        # A bound method, not a closure, so a deepcopy of the encoder hooks its own adapter copies.
        if isinstance(out, tuple):  # GPT2 attention returns (output, weights)
            return (self(out[0]), *out[1:])
        return self(out)


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "h", "layers"):  # BERT family, GPT2 family, Llama family
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ConfigError(f"cannot find the transformer layers of model type {model_type(model)!r}; "
                      "supported: BERT-style encoder.layer, GPT2-style h")


def _adapter_sites(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    if hasattr(layer, "attention") and hasattr(layer, "output"):  # BERT: self-output, FFN output
        return [layer.attention.output, layer.output]
    if hasattr(layer, "attn") and hasattr(layer, "mlp"):  # GPT2: before each residual add
        return [layer.attn, layer.mlp]
    raise ConfigError(f"adapters do not know where to go in model type {model_type(model)!r}; "
                      "supported: BERT-style and GPT2-style layers")


def has_extras(method: dict | None) -> bool:
    """Whether a model card's method entry names weights kept beside the model."""
    return isinstance(method, dict) and method.get("method") in ("adapter", "prompt")


def load_extras(model_dir: Path, model: nn.Module, method: dict | None) -> ExtendedEncoder:
    """The encoder of model_dir for inference (eval, frozen): model (loaded from model_dir) with
    the adapters or prompt that its card's method entry names, or as it is when there are none."""
    from safetensors.torch import load_file

    encoder = ExtendedEncoder(model)
    if has_extras(method):
        model_dir = Path(model_dir)
        try:
            if method["method"] == "adapter":
                encoder.add_adapters(int(method["adapter_size"]))
                encoder.adapters.load_state_dict(load_file(str(model_dir / method["adapters"])))
            else:
                prompt = load_file(str(model_dir / method["prompt"]))["prompt"]
                param = next(model.parameters())
                encoder.prompt = nn.Parameter(prompt.to(device=param.device, dtype=param.dtype))
        except (KeyError, ValueError, OSError, RuntimeError) as exc:
            raise ConfigError(f"model {str(model_dir)!r}: its {method['method']} weights cannot be "
                              f"loaded ({type(exc).__name__}: {str(exc)[:200]})") from None
    return encoder.requires_grad_(False).eval()
