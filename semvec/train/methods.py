"""Fine-tuning methods: which parameters of a base encoder train, and how the result is exported.

apply_method wraps a Hugging Face AutoModel (BertModel, GPT2Model, ...) in a MethodEncoder whose
forward returns hidden states lined up with the input tokens, whatever the method adds. The
export is always a plain model directory that AutoModel loads; what cannot be folded into the
weights (adapters, prompt embeddings) is saved next to it and re-attached by load_extras.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from semvec.config import parse_enum
from semvec.errors import ConfigError


class Method(str, Enum):
    FULL = "full"
    LORA = "lora"
    PROMPT = "prompt"
    ADAPTER = "adapter"
    BITFIT = "bitfit"


@dataclass
class MethodConfig:
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None: the attention + FFN linears of the model type
    prompt_tokens: int = 8  # virtual tokens for prompt tuning
    adapter_size: int = 16  # bottleneck width
    freeze_embeddings: bool = False
    freeze_layers: int = 0  # freeze the lowest N transformer layers

    def __post_init__(self):
        for name in ("lora_r", "lora_alpha", "prompt_tokens", "adapter_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.freeze_layers, bool) or not isinstance(self.freeze_layers, int) \
                or self.freeze_layers < 0:
            raise ConfigError(f"freeze_layers must be an integer >= 0, got {self.freeze_layers!r}")
        targets = self.lora_targets
        if targets is not None and (not isinstance(targets, list) or not targets
                                    or not all(isinstance(t, str) and t for t in targets)):
            raise ConfigError(f"lora_targets must be a non-empty list of module names, got {targets!r}")


# Leaf module names of the attention and FFN linears; other model types get every linear.
_LORA_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


class MethodEncoder(nn.Module):
    """A base HF encoder with a fine-tuning method applied; build it with apply_method.

    forward(input_ids [b, t], attention_mask [b, t]) -> (hidden [b, t, d], mask [b, t]), lined up
    with the input tokens: prompt tuning's virtual positions are stripped before returning.
    """

    def __init__(self, model: nn.Module, method: Method, cfg: MethodConfig):
        super().__init__()
        self.model = model  # the HF model, or its peft wrapper for lora
        self.method = method
        self.cfg = cfg
        self.prompt: nn.Parameter | None = None  # [prompt_tokens, d]
        self.adapters = nn.ModuleList()

    @property
    def base(self) -> nn.Module:
        """The HF model itself (inside the peft wrapper for lora)."""
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


class _Bottleneck(nn.Module):
    """Houlsby adapter d -> size -> d with a residual; the zero up-projection starts it as identity."""

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


def apply_method(base_model: nn.Module, method: Method | str, cfg: MethodConfig) -> MethodEncoder:
    """Wrap base_model (changed in place, as peft does) so that only the method's parameters train.

    freeze_embeddings and freeze_layers then switch off everything in the embeddings and in the
    lowest layers, on top of any method (LoRA weights inside a frozen layer stay frozen too).
    """
    method = parse_enum(Method, "method", method)
    _check(base_model, method, cfg)
    if method == Method.LORA:
        encoder = MethodEncoder(_lora(base_model, cfg), method, cfg)
    else:
        base_model.requires_grad_(method == Method.FULL)
        encoder = MethodEncoder(base_model, method, cfg)
    if method == Method.BITFIT:
        for name, param in base_model.named_parameters():
            param.requires_grad_(name.endswith("bias"))
    elif method == Method.PROMPT:
        encoder.prompt = nn.Parameter(_init_prompt(base_model, cfg.prompt_tokens))
    elif method == Method.ADAPTER:
        _add_adapters(encoder, cfg.adapter_size)
    _freeze(encoder.base, cfg)
    return encoder


def _check(model: nn.Module, method: Method, cfg: MethodConfig) -> None:
    """Everything that can fail, before the model is changed."""
    if method == Method.ADAPTER or cfg.freeze_layers:
        n_layers = len(_layers(model))
        if cfg.freeze_layers > n_layers:
            raise ConfigError(f"freeze_layers={cfg.freeze_layers} but the model has {n_layers} layers")
    if method == Method.LORA:
        _peft()
        available = {name.rsplit(".", 1)[-1] for name, _ in _linears(model)}
        missing = sorted(set(_lora_targets(model, cfg)) - available)
        if missing:
            raise ConfigError(f"lora_targets {missing} are not linear layers of this "
                              f"{_model_type(model)} model; available: {', '.join(sorted(available))}")


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def _layers(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "h", "layers"):  # BERT family, GPT2 family, Llama family
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ConfigError(f"cannot find the transformer layers of model type {_model_type(model)!r}; "
                      "supported: BERT-style encoder.layer, GPT2-style h")


def _freeze(model: nn.Module, cfg: MethodConfig) -> None:
    if cfg.freeze_embeddings:
        for name, child in model.named_children():
            if name == "embeddings" or isinstance(child, nn.Embedding):  # BERT; GPT2 wte + wpe
                child.requires_grad_(False)
    if cfg.freeze_layers:
        for layer in _layers(model)[: cfg.freeze_layers]:
            layer.requires_grad_(False)


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("method 'lora' needs peft: pip install peft") from None
    return peft


def _linears(model: nn.Module):
    from transformers.pytorch_utils import Conv1D  # GPT2's transposed linear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _lora_targets(model: nn.Module, cfg: MethodConfig) -> list[str]:
    if cfg.lora_targets is not None:
        return list(cfg.lora_targets)
    known = _LORA_TARGETS.get(_model_type(model))
    return known or sorted({name.rsplit(".", 1)[-1] for name, _ in _linears(model)})


def _lora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    peft = _peft()
    targets = _lora_targets(model, cfg)
    # Conv1D stores its weight transposed; peft must know or the merge comes out wrong.
    fan_in_fan_out = any(isinstance(m, Conv1D) for name, m in _linears(model)
                         if name.rsplit(".", 1)[-1] in targets)
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                             task_type=peft.TaskType.FEATURE_EXTRACTION)
    return peft.get_peft_model(model, config)


def _init_prompt(model: nn.Module, n_tokens: int) -> torch.Tensor:
    # Start from real token embeddings: the right scale, and no different from text at step 0.
    weight = model.get_input_embeddings().weight  # [vocab, d]
    picks = torch.randint(0, weight.shape[0], (n_tokens,))
    return weight.detach()[picks.to(weight.device)].clone()  # [n_tokens, d]


def _adapter_sites(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    if hasattr(layer, "attention") and hasattr(layer, "output"):  # BERT: self-output, FFN output
        return [layer.attention.output, layer.output]
    if hasattr(layer, "attn") and hasattr(layer, "mlp"):  # GPT2: before each residual add
        return [layer.attn, layer.mlp]
    raise ConfigError(f"adapters do not know where to go in model type {_model_type(model)!r}; "
                      "supported: BERT-style and GPT2-style layers")


def _add_adapters(encoder: MethodEncoder, size: int) -> None:
    model = encoder.base
    param = next(model.parameters())
    dim = model.get_input_embeddings().weight.shape[1]
    sites = [site for layer in _layers(model) for site in _adapter_sites(model, layer)]
    for site in sites:
        adapter = _Bottleneck(dim, size).to(device=param.device, dtype=param.dtype)
        encoder.adapters.append(adapter)
        site.register_forward_hook(adapter.hook)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors count once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def export_model(encoder: MethodEncoder, out_dir: Path) -> dict:
    """Save a plain HF model directory (safetensors) with the method folded in where it can be.

    full/bitfit: the model. lora: the merged model, plus the unmerged adapter in lora_adapter/.
    adapter and prompt cannot be merged: the base model plus adapters.safetensors or
    prompt.safetensors. Returns the method's entry for semvec.json, which load_extras reads back.
    The tokenizer is not written here.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info: dict = {"method": encoder.method.value}
    if encoder.method == Method.LORA:
        encoder.model.save_pretrained(out_dir / "lora_adapter")
        copy.deepcopy(encoder.model).merge_and_unload().save_pretrained(out_dir)
        cfg = encoder.cfg
        info.update(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    lora_targets=_lora_targets(encoder.base, cfg), lora_adapter="lora_adapter",
                    merged=True)
        return info
    encoder.base.save_pretrained(out_dir)
    if encoder.method == Method.ADAPTER:
        state = {k: v.detach().contiguous() for k, v in encoder.adapters.state_dict().items()}
        save_file(state, str(out_dir / "adapters.safetensors"))
        info.update(adapter_size=encoder.cfg.adapter_size, adapters="adapters.safetensors")
    elif encoder.method == Method.PROMPT:
        save_file({"prompt": encoder.prompt.detach().contiguous()}, str(out_dir / "prompt.safetensors"))
        info.update(prompt_tokens=encoder.prompt.shape[0], prompt="prompt.safetensors")
    return info


def load_extras(model_dir: Path, base_model: nn.Module, info: dict) -> MethodEncoder:
    """Rebuild an inference MethodEncoder (eval, frozen) from export_model's directory and dict.

    base_model is the model loaded from model_dir; adapters or prompt embeddings are re-attached,
    full/bitfit/lora (already merged) are wrapped as they are.
    """
    from safetensors.torch import load_file

    method = parse_enum(Method, "method", info.get("method"))
    if method == Method.ADAPTER:
        encoder = apply_method(base_model, method, MethodConfig(adapter_size=int(info["adapter_size"])))
        encoder.adapters.load_state_dict(load_file(str(Path(model_dir) / info["adapters"])))
    elif method == Method.PROMPT:
        encoder = apply_method(base_model, method, MethodConfig(prompt_tokens=int(info["prompt_tokens"])))
        prompt = load_file(str(Path(model_dir) / info["prompt"]))["prompt"]
        encoder.prompt.data.copy_(prompt)
    else:
        encoder = MethodEncoder(base_model, method, MethodConfig())
    return encoder.requires_grad_(False).eval()
