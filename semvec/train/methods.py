"""Fine-tuning methods: which parameters of a base encoder train, and how the result is exported.

apply_method wraps a Hugging Face AutoModel (BertModel, GPT2Model, ...) in a MethodEncoder whose
forward returns hidden states lined up with the input tokens, whatever the method adds. The
export is always a plain model directory that AutoModel loads; what cannot be folded into the
weights (adapters, prompt embeddings) is saved next to it; semvec.extras re-attaches it at inference.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from semvec.config import parse_enum
from semvec.errors import ConfigError
from semvec.extras import ADAPTERS_FILE, PROMPT_FILE, ExtendedEncoder, model_type, transformer_layers
from semvec.train.config import Method, MethodConfig

# Leaf module names of the attention and FFN linears; other model types get every linear.
_LORA_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


class MethodEncoder(ExtendedEncoder):
    """A base HF encoder with a fine-tuning method applied; build it with apply_method."""

    def __init__(self, model: nn.Module, method: Method, cfg: MethodConfig):
        super().__init__(model)
        self.method = method
        self.cfg = cfg


def apply_method(base_model: nn.Module, method: Method | str, cfg: MethodConfig) -> MethodEncoder:
    """Wrap base_model (changed in place, as peft does) so that only the method's parameters train.

    freeze_embeddings and freeze_layers then switch off everything in the embeddings and in the
    lowest layers, on top of any method (LoRA weights inside a frozen layer stay frozen too).
    """
    method = parse_enum(Method, "method", method)
    check(base_model, method, cfg)
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
        encoder.add_adapters(cfg.adapter_size)
    _freeze(encoder.base, cfg)
    return encoder


def check(model: nn.Module, method: Method, cfg: MethodConfig) -> None:
    """Everything that can fail, before the model is changed."""
    if method == Method.ADAPTER or cfg.freeze_layers:
        n_layers = len(transformer_layers(model))
        if cfg.freeze_layers > n_layers:
            raise ConfigError(f"freeze_layers {cfg.freeze_layers} exceeds the model's {n_layers} layers")
    if method == Method.LORA:
        _peft()
        available = {name.rsplit(".", 1)[-1] for name, _ in _linears(model)}
        missing = sorted(set(_lora_targets(model, cfg)) - available)
        if missing:
            raise ConfigError(f"lora_targets {missing} are not linear layers of this "
                              f"{model_type(model)} model; available: {', '.join(sorted(available))}")


def _freeze(model: nn.Module, cfg: MethodConfig) -> None:
    if cfg.freeze_embeddings:
        for name, child in model.named_children():
            if name == "embeddings" or isinstance(child, nn.Embedding):  # BERT; GPT2 wte + wpe
                child.requires_grad_(False)
    if cfg.freeze_layers:
        for layer in transformer_layers(model)[: cfg.freeze_layers]:
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
    known = _LORA_TARGETS.get(model_type(model))
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


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors count once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def export_model(encoder: MethodEncoder, out_dir: Path) -> dict:
    """Save a plain HF model directory (safetensors) with the method folded in where it can be.

    full/bitfit: the model. lora: the merged model, plus the unmerged adapter in lora_adapter/.
    adapter and prompt cannot be merged: the base model plus adapters.safetensors or
    prompt.safetensors. Returns the method's entry for the model card, which semvec.extras.load_extras
    reads back.
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
        save_file(state, str(out_dir / ADAPTERS_FILE))
        info.update(adapter_size=encoder.cfg.adapter_size, adapters=ADAPTERS_FILE)
    elif encoder.method == Method.PROMPT:
        save_file({"prompt": encoder.prompt.detach().contiguous()}, str(out_dir / PROMPT_FILE))
        info.update(prompt_tokens=encoder.prompt.shape[0], prompt=PROMPT_FILE)
    return info
